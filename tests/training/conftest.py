"""Fixtures for training runs: the digits as a saved dataset, a fitted teacher, tiny student settings."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import DatasetDict
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from transformers import ResNetConfig, ResNetForImageClassification

from deit_hf import DeiTHfImageProcessorPil
from training.digits import load_digits_dataset
from training.teacher.model import Teacher

IMAGE_SIZE = 32
TINY_STUDENT = "patch_size=8,hidden_size=64,num_hidden_layers=4,num_attention_heads=4,intermediate_size=128"
# Deterministic images: full-image crops of 32 px digits (RandomResizedCrop at scale 1 keeps the whole square),
# no flips, RandAugment, erasing or mixing; what stays random is the order, from the sampler.
STILL_AUGMENTATION = [
    "--input_size", str(IMAGE_SIZE), "--auto_augment", "none", "--hflip", "0", "--scale", "1", "1",
    "--reprob", "0", "--color_jitter", "0", "--mixup", "0", "--cutmix", "0",
]


def tiny_run_args(dataset_dir, teacher_dir, output_dir, *extra):
    """`training.train` flags for a few-second run of a tiny DeiT⚗ on CPU; `teacher_dir` None: no teacher flags (a
    run with `--distillation_type none` or `labels`, which refuses them)."""
    teacher = [] if teacher_dir is None else [
        "--teacher_model", str(teacher_dir),
        "--teacher_check_batches", "0",  # the tests' random teachers are at chance by design
    ]
    return [
        "--dataset_name", str(dataset_dir), *teacher, "--output_dir", str(output_dir),
        "--model_preset", "deit-tiny-distilled-patch16-224", "--config_overrides", TINY_STUDENT,
        "--drop_path_rate", "0", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "32",
        "--dataloader_num_workers", "0", "--report_to", "none", "--disable_tqdm", "true",
        *STILL_AUGMENTATION, *extra,
    ]


@pytest.fixture(scope="session")
def digits():
    return load_digits_dataset(IMAGE_SIZE)


@pytest.fixture(scope="session")
def small_digits_dir(digits, tmp_path_factory):
    """48 training and 32 validation digits, saved as `save_to_disk` would leave ImageNet."""
    path = tmp_path_factory.mktemp("small_digits")
    small = DatasetDict(
        {"train": digits["train"].select(range(48)), "validation": digits["validation"].select(range(32))}
    )
    small.save_to_disk(str(path))
    return path


@pytest.fixture(scope="session")
def random_teacher_dir(tmp_path_factory):
    """A tiny random-init transformers ResNet with its image processor: deterministic, not knowledgeable."""
    path = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    names = [str(digit) for digit in range(10)]
    ResNetForImageClassification(
        ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=10,
            id2label=dict(enumerate(names)), label2id={name: i for i, name in enumerate(names)},
        )
    ).save_pretrained(path)
    DeiTHfImageProcessorPil(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


class PooledLinearClassifier(nn.Module):
    """8x8 gray average pooling and a linear layer: logistic regression on the digits' native resolution."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray):
        super().__init__()
        self.linear = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(torch.as_tensor(weight))
            self.linear.bias.copy_(torch.as_tensor(bias))

    @staticmethod
    def features(pixel_values: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(pixel_values.mean(1, keepdim=True), 8).flatten(1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(pixel_values))


@pytest.fixture(scope="session")
def fitted_teacher(digits):
    """A real teacher in a second: scikit-learn's logistic regression on the training digits (~95 % held out)."""
    from sklearn.linear_model import LogisticRegression

    processor = DeiTHfImageProcessorPil(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32})
    pixels = processor(list(digits["train"]["image"]), return_tensors="pt")["pixel_values"]
    regression = LogisticRegression(max_iter=2000).fit(
        PooledLinearClassifier.features(pixels).numpy(), list(digits["train"]["label"])
    )
    model = PooledLinearClassifier(regression.coef_.astype(np.float32), regression.intercept_.astype(np.float32))
    return Teacher(model, num_labels=10, teacher_mean=IMAGENET_DEFAULT_MEAN, teacher_std=IMAGENET_DEFAULT_STD)


@pytest.fixture(scope="session")
def few_digits():
    """Three training and two validation digits per class, 8 px: ImageNet's columns, small enough to write often."""
    full = load_digits_dataset(image_size=8)

    def per_class(split, count):
        labels = np.asarray(split["label"][:])
        return split.select([index for digit in range(10) for index in np.flatnonzero(labels == digit)[:count]])

    return DatasetDict({"train": per_class(full["train"], 3), "validation": per_class(full["validation"], 2)})
