"""The pre-flight's images: drawn from every class of a validation split sorted by class, not its first classes."""

import copy
import logging
import re
import subprocess

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import training.build
from training.args import AugmentationArguments, DataArguments
from training.data import attach_transform, load_image_datasets
from training.teacher.preflight import DECLARED, MIN_IMAGES_PER_CLASS, check_teacher, teacher_confusions
from training.teacher.preflight_images import CHECK_SEED, check_images, stratified_sample
from training.train import parse_args
from training.transforms import ImageTransform, build_batch_transform, build_eval_transform

from ..conftest import IMAGE_SIZE, tiny_run_args
from ..test_data import write_imagefolder
from ..test_distributed import REPO, probe_env, two_processes
from ..test_trainer import make_trainer, student

NAMES = [str(digit) for digit in range(10)]


def taken_per_class(labels: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    return np.bincount(labels[chosen], minlength=labels.max() + 1)


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=25), budget=st.integers(0, 600),
       seed=st.integers(0, 2 ** 32 - 1), sorted_by_class=st.booleans())
def test_the_sample_keeps_its_budget_and_spreads_it_over_every_class(sizes, budget, seed, sorted_by_class):
    labels = np.repeat(np.arange(len(sizes)), sizes)
    if not sorted_by_class:
        labels = np.random.default_rng(seed).permutation(labels)
    chosen = stratified_sample(labels, budget, seed)

    assert len(chosen) == min(budget, len(labels)) and len(set(chosen.tolist())) == len(chosen)
    assert np.array_equal(chosen, stratified_sample(labels, budget, seed))  # the same seed, the same images
    taken = taken_per_class(labels, chosen)
    sizes = np.asarray(sizes)
    if budget >= np.minimum(sizes, MIN_IMAGES_PER_CLASS).sum():  # every class gets its few images first
        assert (taken >= np.minimum(sizes, MIN_IMAGES_PER_CLASS)).all()
    # then one more of each in turn: a class with images left has at most one fewer than any other beyond the few
    for left in np.flatnonzero(taken < sizes):
        assert (taken <= max(taken[left], MIN_IMAGES_PER_CLASS) + 1).all()


def test_a_class_sorted_split_is_sampled_from_every_class_and_the_seed_decides_which_images():
    labels = np.repeat(np.arange(10), 36)  # the digits' validation split in an imagefolder: 36 per class, in order
    chosen = stratified_sample(labels, 256)
    assert set(taken_per_class(labels, chosen).tolist()) <= {25, 26}
    assert not np.array_equal(chosen, np.arange(256))
    assert not np.array_equal(chosen, stratified_sample(labels, 256, seed=CHECK_SEED + 1))
    # 1,000 classes, a budget of 1,024: 256 classes of 4 images (enough to name a swap) rather than 1,000 of 1
    imagenet = np.repeat(np.arange(1000), 50)
    assert np.bincount(taken_per_class(imagenet, stratified_sample(imagenet, 1024))).tolist()[1:] == [0, 0, 0, 256]


@pytest.fixture(scope="module")
def sorted_digits_dir(digits, tmp_path_factory):
    """The digits' 360 validation images as an imagefolder directory, which datasets reads sorted by class."""
    return str(write_imagefolder(digits["validation"], tmp_path_factory.mktemp("sorted_digits") / "val"))


def swapped(teacher, first: int, second: int):
    swapped = copy.deepcopy(teacher)
    with torch.no_grad():
        for parameter in (swapped.model.linear.weight, swapped.model.linear.bias):
            parameter[[first, second]] = parameter[[second, first]].clone()
    return swapped


def sorted_trainer(tmp_path, directory, teacher, streaming=False):
    data = load_image_datasets(DataArguments(train_dir=directory, validation_dir=directory, streaming=streaming,
                                             cache_dir=str(tmp_path / "cache")))
    augmentation = AugmentationArguments(input_size=IMAGE_SIZE, auto_augment=None, reprob=0, mixup=0, cutmix=0)
    held_out = attach_transform(data.dataset_dict["validation"], ImageTransform(build_eval_transform(augmentation)))
    assert next(iter(data.dataset_dict["validation"]))["label"] == 0  # sorted by class
    return make_trainer(tmp_path, student(), None, held_out, teacher,
                        batch_transform=build_batch_transform(augmentation, 10))


@pytest.mark.slow
def test_on_a_class_sorted_split_a_swap_of_the_last_classes_is_refused(tmp_path, sorted_digits_dir, fitted_teacher,
                                                                       caplog):
    with caplog.at_level(logging.INFO, logger="training"):
        confusions = teacher_confusions(sorted_trainer(tmp_path, sorted_digits_dir, swapped(fitted_teacher, 8, 9)),
                                        num_batches=2, label_column="label")
    assert "reads 256 of the 360 validation images, from 10 of its 10 classes" in caplog.text
    assert confusions[DECLARED].sum() == 256 and (confusions[DECLARED].sum(dim=1) >= 25).all()
    with pytest.raises(ValueError, match=r"predicts 2 class\(es\) mostly as another one on 256 validation images: "
                                         r"'8' as '9' \(\d+ of 2\d\); '9' as '8'"):
        check_teacher(confusions, NAMES)
    right = teacher_confusions(sorted_trainer(tmp_path, sorted_digits_dir, fitted_teacher), 2, "label")
    assert check_teacher(right, NAMES) > 0.9


def test_a_streamed_split_is_read_from_its_start_and_says_so(tmp_path, sorted_digits_dir, fitted_teacher, caplog):
    # No random access: its first batches, a warning, and the log line counting the classes they held.
    with caplog.at_level(logging.INFO, logger="training"):
        confusions = teacher_confusions(sorted_trainer(tmp_path, sorted_digits_dir, swapped(fitted_teacher, 8, 9),
                                                       streaming=True), num_batches=2, label_column="label")
        check_teacher(confusions, NAMES)  # the swap is out of its sight
    assert "is streamed (no random access): the pre-flight reads its first 256 images" in caplog.text
    assert confusions[DECLARED][8:].sum() == 0
    assert "Teacher top-1 on 256 validation images of 8 of the 10 classes" in caplog.text


def test_check_images_of_a_stream_is_none_and_of_a_split_its_sample(tmp_path, sorted_digits_dir):
    data = load_image_datasets(DataArguments(train_dir=sorted_digits_dir, validation_dir=sorted_digits_dir,
                                             cache_dir=str(tmp_path / "cache")))
    validation = data.dataset_dict["validation"]
    labels = np.asarray(validation["label"][:])
    images = check_images(validation, "label", 40)
    assert images["label"][:] == labels[stratified_sample(labels, 40)].tolist()
    assert check_images(validation.to_iterable_dataset(), "label", 40) is None


def test_a_run_on_a_class_sorted_validation_dir_refuses_a_teacher_with_its_last_classes_swapped(
        tmp_path, sorted_digits_dir, fitted_teacher, monkeypatch):
    # Its first 8 batches of 32 held classes 0-7 only: the swapped teacher passed (97.7 %) and trained.
    args = ["--train_dir", sorted_digits_dir, "--validation_dir", sorted_digits_dir, "--teacher_model", "fitted",
            *tiny_run_args("unused", None, tmp_path / "out", "--max_steps", "1")[2:]]
    monkeypatch.setattr(training.build, "load_teacher", lambda *args, **kwargs: swapped(fitted_teacher, 8, 9))
    with pytest.raises(ValueError, match=r"mostly as another one on 256 validation images: '8' as '9' .*'9' as '8'"):
        training.build.build_trainer(parse_args(args))
    monkeypatch.setattr(training.build, "load_teacher", lambda *args, **kwargs: fitted_teacher)
    training.build.build_trainer(parse_args(args))


@pytest.mark.slow
def test_on_two_processes_each_reads_its_part_and_both_refuse_on_the_sum(small_digits_dir, random_teacher_dir,
                                                                         tmp_path):
    # 1 batch of 32 per process: 64 images asked for, the 32 of the split read once, 16 by each rank; a rank
    # judging its own part, or both reading all 32, would say 16 or 64 (and a rank that passed would hang the other)
    args = tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path / "out")
    args[args.index("--teacher_check_batches") + 1] = "1"
    result = subprocess.run([*two_processes(), "-m", "training.train", *args, "--max_steps", "1"], capture_output=True,
                            text=True, env=probe_env(), cwd=REPO, timeout=300)
    assert result.returncode != 0
    # one line per rank that got to print it (torchrun stops the other rank once one has failed)
    refusals = re.findall(r"error: The teacher's top-1 on (\d+) validation images is .* near chance", result.stderr)
    assert refusals and set(refusals) == {"32"}, result.stderr[-3000:]
