"""The teacher's pre-flight: near chance, swapped classes, a wrong normalisation and nothing decoded are refused."""

import copy

import numpy as np
import pytest
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from deit_hf import DeiTHfImageProcessorPil
from training.args import AugmentationArguments
from training.teacher.model import Teacher
from training.teacher.preflight import DECLARED, check_teacher, teacher_confusions
from training.transforms import build_batch_transform, build_eval_transform

from ..conftest import IMAGE_SIZE, PooledLinearClassifier
from ..test_trainer import make_trainer, prepared, student

NAMES = [str(digit) for digit in range(10)]


def counts(pairs: list[tuple[int, int]]) -> torch.Tensor:
    """Confusion counts (true class x predicted class) of (true, predicted) pairs."""
    confusion = torch.zeros(10, 10, dtype=torch.int64)
    for true, predicted in pairs:
        confusion[true, predicted] += 1
    return confusion


def check_batches(tmp_path, digits, teacher):
    augmentation = AugmentationArguments(input_size=IMAGE_SIZE, auto_augment=None, reprob=0, mixup=0, cutmix=0)
    held_out = prepared(digits["validation"], build_eval_transform(augmentation))
    trainer = make_trainer(tmp_path, student(), None, held_out, teacher,
                           batch_transform=build_batch_transform(augmentation, 10))
    return teacher_confusions(trainer, num_batches=2, label_column="label")


@pytest.mark.parametrize("correct, refused", [(20, True), (27, True), (29, False), (95, False)])
def test_a_teacher_near_chance_is_refused_with_the_causes_and_the_way_out(correct, refused):
    # 100 images, 10 per class: `correct` right, the others spread over the next classes (no class mostly another)
    pairs = [(index % 10, index % 10 if index < correct else (index + index // 10) % 10) for index in range(100)]
    confusions = {DECLARED: counts(pairs)}
    if refused:
        with pytest.raises(ValueError, match=r"near chance .* normalisation .*--teacher_mean.*--teacher_check_batches"):
            check_teacher(confusions, NAMES)
    else:
        assert check_teacher(confusions, NAMES) == correct / 100


def test_nothing_decoded_is_a_clear_error_not_a_division_by_zero():
    with pytest.raises(ValueError, match="No validation image decoded among the pre-flight.s images: the teacher"):
        check_teacher({DECLARED: counts([])}, NAMES)


def test_a_good_teacher_passes_on_the_students_evaluation_batches(tmp_path, digits, fitted_teacher):
    confusions = check_batches(tmp_path, digits, fitted_teacher)
    assert confusions[DECLARED].sum() == 256  # two batches of 128
    # ImageNet statistics are the declared ones: the other two common ones are tried
    assert set(confusions) == {DECLARED, "0.5/0.5", "[0, 1]"}
    assert check_teacher(confusions, NAMES) > 0.9


def test_a_teacher_with_two_classes_swapped_is_refused_naming_them(tmp_path, digits, fitted_teacher):
    swapped = copy.deepcopy(fitted_teacher)
    with torch.no_grad():
        for parameter in (swapped.model.linear.weight, swapped.model.linear.bias):
            parameter[[3, 7]] = parameter[[7, 3]].clone()
    confusions = check_batches(tmp_path, digits, swapped)
    assert 0.7 < confusions[DECLARED].diagonal().sum() / 256 < 0.9  # good enough to pass the near-chance check
    with pytest.raises(ValueError, match=r"predicts 2 class\(es\) mostly as another one on 256 validation images: "
                                         r"'3' as '7' \(\d+ of \d+\); '7' as '3' \(\d+ of \d+\)\. .*another order"):
        check_teacher(confusions, NAMES)


class ThresholdedLinearClassifier(PooledLinearClassifier):
    """The digits' pooled gray levels and a ReLU above 1: the nonlinearity makes it depend on the input's scale, as
    a convnet does (a linear model on these almost binary images barely notices another normalisation)."""

    @staticmethod
    def features(pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = PooledLinearClassifier.features(pixel_values)
        return torch.cat([pooled, torch.relu(pooled - 1)], dim=1)


@pytest.fixture(scope="module")
def imagenet_trained_model(digits):
    from sklearn.linear_model import LogisticRegression

    processor = DeiTHfImageProcessorPil(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32})
    train = digits["train"].select(range(600))  # enough for 98 %, in a few seconds
    features = ThresholdedLinearClassifier.features(processor(list(train["image"]),
                                                              return_tensors="pt")["pixel_values"])
    regression = LogisticRegression(max_iter=3000).fit(features.numpy(), list(train["label"]))
    return ThresholdedLinearClassifier(regression.coef_.astype(np.float32), regression.intercept_.astype(np.float32))


def test_a_teacher_declaring_the_wrong_normalisation_is_refused_naming_the_right_one(tmp_path, digits,
                                                                                      imagenet_trained_model):
    # trained on ImageNet-normalised inputs, its processor says [0, 1] (do_normalize false): 16 % against 97 %
    mislabelled = Teacher(imagenet_trained_model, num_labels=10, teacher_mean=(0.0,) * 3, teacher_std=(1.0,) * 3,
                          student_mean=IMAGENET_DEFAULT_MEAN, student_std=IMAGENET_DEFAULT_STD)
    confusions = check_batches(tmp_path, digits, mislabelled)
    assert set(confusions) == {DECLARED, "ImageNet", "0.5/0.5"}
    with pytest.raises(ValueError, match=r"scores \d+\.\d % on 256 validation images with the normalisation it "
                                         r"declares, but 9\d\.\d % with ImageNet statistics \(mean \[0\.485, 0\.456, "
                                         r"0\.406\], std \[0\.229, 0\.224, 0\.225\]\).*Pass --teacher_mean 0\.485 "
                                         r"0\.456 0\.406 --teacher_std 0\.229 0\.224 0\.225"):
        check_teacher(confusions, NAMES)
    right = Teacher(imagenet_trained_model, num_labels=10, teacher_mean=IMAGENET_DEFAULT_MEAN,
                    teacher_std=IMAGENET_DEFAULT_STD, student_mean=IMAGENET_DEFAULT_MEAN,
                    student_std=IMAGENET_DEFAULT_STD)
    assert check_teacher(check_batches(tmp_path, digits, right), NAMES) > 0.95


def test_a_weak_teacher_that_confuses_one_class_is_not_taken_for_a_swapped_head():
    # 10 images per class, all right but the 6s, mostly taken for 4s: the 4s are still recognised, no head moved
    pairs = [(label, label) for label in range(10) for _ in range(10) if label != 6] + [(6, 4)] * 7 + [(6, 6)] * 3
    assert check_teacher({DECLARED: counts(pairs)}, NAMES) == 0.93


def test_a_head_in_a_cyclic_class_order_is_refused():
    # 4 -> 6 -> 8 -> 4: each class's output taken by the next; the other classes right
    moved = {4: 6, 6: 8, 8: 4}
    pairs = [(label, moved.get(label, label)) for label in range(10) for _ in range(10)]
    with pytest.raises(ValueError, match="predicts 3 class"):
        check_teacher({DECLARED: counts(pairs)}, NAMES)
