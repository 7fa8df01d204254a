"""The frozen teacher: no gradients, always eval, exact renormalisation, timm and HF teachers, clear errors."""

import logging

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    ConvNextConfig,
    ConvNextForImageClassification,
    ConvNextImageProcessor,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)

from deit_hf import DistillationLoss
from training.teacher.model import Teacher, check_class_names, load_teacher

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
TINY_VIT = dict(
    image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37
)


def raw_images(batch_size: int = 4) -> torch.Tensor:
    """Pixels in [0, 1], before any normalisation."""
    return torch.rand(batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    return (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def randomize_batch_norm(model: nn.Module) -> nn.Module:
    """Give every BatchNorm random statistics and affine weights (timm zero-inits some), so that a BN in train mode,
    or one that updates its statistics, changes the logits."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
    return model


@pytest.fixture
def hf_teacher_dirs(tmp_path):
    """A tiny ViT (normalised with mean/std 0.5) and a tiny ConvNeXt (ImageNet statistics), saved with processors."""
    vit = ViTForImageClassification(ViTConfig(**TINY_VIT, num_labels=10))
    convnext = ConvNextForImageClassification(
        ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], image_size=32, num_labels=10)
    )
    dirs = {}
    for name, model, processor in (
        ("vit", vit, ViTImageProcessor(image_mean=HALF, image_std=HALF)),
        ("convnext", convnext, ConvNextImageProcessor(image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)),
    ):
        model.save_pretrained(tmp_path / name)
        processor.save_pretrained(tmp_path / name)
        dirs[name] = tmp_path / name
    return dirs


def test_gradients_never_reach_the_teacher():
    teacher = load_teacher("resnet10t", num_labels=10, pretrained=False)
    student = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    pixel_values = raw_images().requires_grad_(True)
    teacher_logits = teacher(pixel_values)
    assert not teacher_logits.requires_grad
    student_logits = student(pixel_values)
    labels = torch.tensor([0, 1, 2, 3])
    losses = [
        DistillationLoss(kind)(student_logits, labels, student_logits, teacher_logits).loss for kind in ("hard", "soft")
    ]
    # a loss that keeps the teacher's logits for backward: fails if they were made under torch.inference_mode()
    losses.append((student_logits * teacher_logits).mean())
    sum(losses).backward()
    assert student[1].weight.grad is not None
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())


def test_train_on_a_parent_keeps_the_teacher_in_eval():
    model = randomize_batch_norm(timm.create_model("resnet10t", num_classes=10, drop_rate=0.5))
    teacher = Teacher(model, num_labels=10)
    parent = nn.ModuleDict({"student": nn.Linear(2, 2), "teacher": teacher})
    running_mean = teacher.model.bn1.running_mean.clone()

    parent.train()

    assert parent["student"].training
    assert not any(module.training for module in teacher.modules())
    pixel_values = raw_images()
    first, second = teacher(pixel_values), teacher(pixel_values)
    torch.testing.assert_close(first, second, rtol=0, atol=0)  # no dropout
    torch.testing.assert_close(teacher.model.bn1.running_mean, running_mean, rtol=0, atol=0)  # no BN updates


def test_renormalisation_matches_the_teachers_own_normalisation():
    teacher = load_teacher("resnet10t", num_labels=10, student_mean=HALF, student_std=HALF, pretrained=False)
    randomize_batch_norm(teacher.model)
    images = raw_images()
    assert teacher.renormalizes
    expected = teacher.model(normalize(images, IMAGENET_MEAN, IMAGENET_STD))  # timm's pretrained_cfg statistics
    torch.testing.assert_close(teacher(normalize(images, HALF, HALF)), expected, rtol=1e-5, atol=1e-5)


def test_same_normalisation_passes_input_unchanged():
    teacher = load_teacher(
        "resnet10t", num_labels=10, student_mean=IMAGENET_MEAN, student_std=IMAGENET_STD, pretrained=False
    )
    assert not teacher.renormalizes
    pixel_values = normalize(raw_images(), IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(teacher(pixel_values), teacher.model(pixel_values), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["resnet10t", "regnety_002"])
def test_timm_teacher(name):
    teacher = load_teacher(name, num_labels=10, student_mean=HALF, student_std=HALF, pretrained=False)
    assert teacher.num_labels == 10 and teacher.channels_last
    spatial_conv = next(m for m in teacher.model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size[0] > 1)
    assert spatial_conv.weight.is_contiguous(memory_format=torch.channels_last)
    logits = teacher(normalize(raw_images(), HALF, HALF))
    assert logits.shape == (4, 10) and logits.dtype == torch.float32


def test_timm_teacher_uses_the_callers_autocast():
    teacher = load_teacher("resnet10t", num_labels=10, student_mean=HALF, student_std=HALF, pretrained=False)
    pixel_values = normalize(raw_images(), HALF, HALF)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = teacher(pixel_values)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), teacher(pixel_values), rtol=0.05, atol=0.05)


def test_timm_teacher_loads_a_local_checkpoint(tmp_path):
    trained = randomize_batch_norm(timm.create_model("resnet10t", num_classes=10)).eval()
    checkpoint = tmp_path / "teacher.pth"
    torch.save({"model": trained.state_dict(), "epoch": 99}, checkpoint)
    teacher = load_teacher("resnet10t", checkpoint, num_labels=10)
    pixel_values = normalize(raw_images(), IMAGENET_MEAN, IMAGENET_STD)
    with torch.no_grad():
        torch.testing.assert_close(teacher(pixel_values), trained(pixel_values), rtol=1e-5, atol=1e-5)


def test_timm_checkpoint_with_other_classes_names_the_shapes(tmp_path):
    checkpoint = tmp_path / "teacher.pth"
    torch.save({"model": timm.create_model("resnet10t", num_classes=5).state_dict()}, checkpoint)
    with pytest.raises(ValueError, match=r"fc\.bias: \(5,\) vs \(10,\); fc\.weight: \(5, 512\) vs \(10, 512\)$"):
        load_teacher("resnet10t", checkpoint, num_labels=10)


@pytest.mark.parametrize(
    "name, own_mean, own_std, channels_last",
    [("vit", HALF, HALF, False), ("convnext", IMAGENET_MEAN, IMAGENET_STD, True)],
)
def test_hf_teacher_directory(hf_teacher_dirs, name, own_mean, own_std, channels_last):
    directory = hf_teacher_dirs[name]
    student_mean, student_std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)
    teacher = load_teacher(directory, num_labels=10, student_mean=student_mean, student_std=student_std)
    assert teacher.num_labels == 10 and teacher.channels_last is channels_last and teacher.renormalizes
    images = raw_images()
    logits = teacher(normalize(images, student_mean, student_std))
    assert logits.shape == (4, 10)
    expected = teacher.model(normalize(images, own_mean, own_std)).logits  # the processor's statistics
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_hf_teacher_without_image_processor_takes_batches_as_they_are(tmp_path, caplog):
    ViTForImageClassification(ViTConfig(**TINY_VIT, num_labels=3)).save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="training.teacher.model"):
        teacher = load_teacher(tmp_path, num_labels=3, student_mean=HALF, student_std=HALF)
    assert "No image processor with image_mean/image_std" in caplog.text
    assert not teacher.renormalizes


def test_hf_teacher_class_count_mismatch(hf_teacher_dirs):
    with pytest.raises(ValueError, match=r"predicts 10 classes but num_labels=7"):
        load_teacher(hf_teacher_dirs["vit"], num_labels=7)


def test_hf_teacher_refuses_a_checkpoint(hf_teacher_dirs, tmp_path):
    with pytest.raises(ValueError, match="checkpoint_path is for timm teachers"):
        load_teacher(hf_teacher_dirs["vit"], tmp_path / "weights.pth")


def test_unknown_teacher_name(tmp_path):
    with pytest.raises(ValueError, match="'facebook/regnet-y-160' is neither a local directory nor a timm model name"):
        load_teacher("facebook/regnet-y-160")
    with pytest.raises(ValueError, match="is neither a local directory"):
        load_teacher(tmp_path / "absent")


def test_inconsistent_statistics_are_refused():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="Give both student_mean and student_std, or neither"):
        Teacher(model, 2, IMAGENET_MEAN, IMAGENET_STD, student_mean=HALF)
    with pytest.raises(ValueError, match="different channel counts: student mean/std 1/1, teacher mean/std 3/3"):
        Teacher(model, 2, IMAGENET_MEAN, IMAGENET_STD, student_mean=(0.5,), student_std=(0.5,))
    with pytest.raises(ValueError, match="Standard deviations must be positive"):
        Teacher(model, 2, IMAGENET_MEAN, (0.2, 0.0, 0.2), student_mean=HALF, student_std=HALF)


def test_timm_teacher_fetches_pretrained_weights_and_says_what_to_do_offline(monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(
        RuntimeError, match="Could not fetch the pretrained weights of timm teacher 'resnet10t'.*--teacher_checkpoint"
    ):
        load_teacher("resnet10t", num_labels=1000)


def test_pretrained_timm_teacher_of_other_classes_is_refused_not_given_a_random_head(monkeypatch):
    create_model = timm.create_model
    # stands in for the download: timm's 1000-class model, as pretrained weights would come
    monkeypatch.setattr(timm, "create_model", lambda name, pretrained, **kwargs: create_model(name, **kwargs))
    with pytest.raises(ValueError, match="predicts 1000 classes but num_labels=10"):
        load_teacher("resnet10t", num_labels=10)


def test_checkpoint_and_pretrained_together_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        load_teacher("resnet10t", tmp_path / "weights.pth", pretrained=True)


def test_explicit_statistics_replace_the_architectures_and_are_logged(caplog):
    caplog.set_level(logging.INFO, logger="training.teacher.model")
    teacher = load_teacher("resnet10t", num_labels=10, student_mean=IMAGENET_MEAN, student_std=IMAGENET_STD,
                           teacher_mean=HALF, teacher_std=HALF, pretrained=False)
    images = raw_images()
    torch.testing.assert_close(
        torch.addcmul(teacher.input_shift, normalize(images, IMAGENET_MEAN, IMAGENET_STD), teacher.input_scale),
        normalize(images, HALF, HALF),
    )
    assert "mean [0.5, 0.5, 0.5], std [0.5, 0.5, 0.5] (from --teacher_mean/--teacher_std" in caplog.text
    caplog.clear()
    load_teacher("resnet10t", num_labels=10, pretrained=False)
    assert "from timm's pretrained_cfg of resnet10t" in caplog.text


def test_half_given_statistics_are_refused():
    with pytest.raises(ValueError, match="--teacher_mean, --teacher_std"):
        load_teacher("resnet10t", num_labels=10, pretrained=False, teacher_mean=HALF)


def test_a_fixed_size_teacher_gets_the_students_batches_resized(tmp_path):
    torch.manual_seed(0)
    vit = ViTForImageClassification(ViTConfig(**{**TINY_VIT, "image_size": 64, "patch_size": 8}, num_labels=10))
    vit.save_pretrained(tmp_path)
    ViTImageProcessor(image_mean=HALF, image_std=HALF).save_pretrained(tmp_path)
    teacher = load_teacher(tmp_path, num_labels=10, student_mean=HALF, student_std=HALF, student_size=(32, 32))
    assert teacher.input_size == (64, 64)
    images = normalize(raw_images(), HALF, HALF)
    # resized as its image processor resizes (ViTImageProcessor: bilinear)
    expected = vit.eval()(F.interpolate(images, size=(64, 64), mode="bilinear", align_corners=False)).logits
    torch.testing.assert_close(teacher(images), expected)
    # a teacher that takes the student's size is left alone
    assert load_teacher("resnet10t", num_labels=10, pretrained=False, student_size=(32, 32)).input_size is None


def test_a_teacher_that_runs_at_no_size_is_refused_naming_both_sizes(tmp_path):
    vit = ViTForImageClassification(ViTConfig(**{**TINY_VIT, "image_size": 64, "patch_size": 8, "num_channels": 1},
                                              num_labels=10))  # one input channel: runs on nothing the student has
    vit.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"cannot run on the student's 32x32 images .*, nor on its own 64x64"):
        load_teacher(tmp_path, num_labels=10, student_size=(32, 32))


def _named_teacher(names):
    return Teacher(nn.Linear(1, len(names)), len(names), label_names=names)


def test_class_names_must_agree_in_order():
    digits = [str(digit) for digit in range(10)]
    check_class_names(_named_teacher(digits), digits)
    swapped = digits[:]
    swapped[3], swapped[7] = swapped[7], swapped[3]
    with pytest.raises(
        ValueError, match=r"\(2 of 10 differ\): class 3: teacher '7', dataset '3'; class 7: teacher '3'"
    ):
        check_class_names(_named_teacher(swapped), digits)


def test_class_names_in_another_vocabulary_or_unnamed_are_not_compared(tmp_path, hf_teacher_dirs):
    check_class_names(_named_teacher(["n01440764", "n01443537"]), ["tench, Tinca tinca", "goldfish"])
    # transformers' placeholders (LABEL_0, ...) name nothing
    assert load_teacher(hf_teacher_dirs["convnext"], num_labels=10).label_names is None


def test_a_teacher_directory_without_config_json_says_so(tmp_path):
    (tmp_path / "teacher").mkdir()
    with pytest.raises(ValueError, match=r"Teacher directory .*teacher holds no config.json: not a saved transformers"):
        load_teacher(tmp_path / "teacher", num_labels=10)
