"""training.randomness: the order and the views of an epoch, the same whatever the processes and DataLoader workers."""

import json
import random
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import timm
import timm.layers.drop
import torch
from accelerate.data_loader import BatchSamplerShard
from hypothesis import given, settings
from hypothesis import strategies as st
from timm.data.mixup import Mixup
from timm.data.random_erasing import RandomErasing
from torch.utils.data import BatchSampler
from transformers import TrainerCallback

from training.args import AugmentationArguments
from training.randomness import RepeatedViewSampler, StepSeeder
from training.train import main
from training.trainer import DistillationTrainer
from training.transforms import build_train_transform

from . import randomness_probe
from .conftest import IMAGE_SIZE, tiny_run_args
from .test_distributed import half_batches, launch, losses, two_processes
from .test_trainer import make_trainer, prepared, student

PROBE = Path(__file__).with_name("randomness_probe.py")
PATCHED = {"params_per_batch": (Mixup, "_params_per_batch"), "erase": (RandomErasing, "__call__"),
           "drop_path": (timm.layers.drop, "drop_path"), "training_step": (DistillationTrainer, "training_step")}


def process_batches(sampler: RepeatedViewSampler) -> list[list[list]]:
    """The batches each process reads, dealt as accelerate deals them (`BatchSamplerShard`, even batches)."""
    return [list(BatchSamplerShard(BatchSampler(sampler, sampler.batch_size, drop_last=False),
                                   sampler.num_processes, process)) for process in range(sampler.num_processes)]


def global_batches(sampler: RepeatedViewSampler) -> list[Counter]:
    """Each step's views on all processes together, as a multiset."""
    return [Counter(key for batch in step for key in batch) for step in zip(*process_batches(sampler), strict=True)]


def step_groups(sampler: RepeatedViewSampler) -> list[dict[int, list]]:
    """Each optimizer step's mix groups (group -> its views in order), from the micro-batches of every process, each
    of which must hold whole groups."""
    batches = process_batches(sampler)
    steps = []
    for step in range(len(batches[0]) // sampler.accumulation):
        groups: dict[int, list] = {}
        for micro_batch in range(sampler.accumulation):
            for process in range(sampler.num_processes):
                batch = batches[process][step * sampler.accumulation + micro_batch]
                held = {key.group for key in batch}
                assert not held & set(groups), "a mix group split over micro-batches"
                for key in batch:
                    groups.setdefault(key.group, []).append(key)
        steps.append(groups)
    return steps


@settings(max_examples=40, deadline=None)
@given(num_images=st.integers(1, 60), num_repeats=st.integers(1, 4), global_batch=st.sampled_from([4, 8, 16]),
       group_size=st.sampled_from([1, 2, 4]), epoch=st.integers(0, 5), seed=st.integers(0, 2**70))
def test_a_step_holds_the_same_mix_groups_on_any_layout_of_its_global_batch(num_images, num_repeats, global_batch,
                                                                             group_size, epoch, seed):
    """1 process x G, 2 x G/2, 1 x G/2 with accumulation 2, 4 x G/4, 2 x G/4 x 2: the same groups of the same views,
    each micro-batch holding whole groups."""
    layouts = [(1, global_batch, 1), (2, global_batch // 2, 1), (1, global_batch // 2, 2), (4, global_batch // 4, 1),
               (2, global_batch // 4, 2)]
    steps = []
    for processes, batch_size, accumulation in layouts:
        if batch_size % group_size:
            continue
        sampler = RepeatedViewSampler(num_images, num_repeats, seed, processes, batch_size, accumulation, group_size)
        sampler.set_epoch(epoch)
        steps.append(step_groups(sampler))
    assert all(layout == steps[0] for layout in steps[1:])
    # an epoch: as many views as images, rounded up to whole global batches, in groups of `group_size`
    assert len(steps[0]) == -(-num_images // global_batch)
    assert all(len(views) == group_size for groups in steps[0] for views in groups.values())


def test_the_copies_of_an_image_go_to_different_mix_groups():
    """As RASampler spreads them over processes: with 4 groups per step or more, never two views of an image in one
    group, whichever process or micro-batch holds it."""
    for layout in [(4, 8, 1), (1, 16, 2), (2, 8, 2)]:
        sampler = RepeatedViewSampler(960, 3, 0, *layout, group_size=8)
        for groups in step_groups(sampler):
            assert all(len({key.index for key in views}) == len(views) for views in groups.values())


@settings(max_examples=40, deadline=None)
@given(num_images=st.integers(1, 60), num_repeats=st.integers(1, 4), processes=st.sampled_from([1, 2, 3, 4]),
       batch_size=st.integers(1, 6), seed=st.integers(0, 1000))
def test_each_process_reads_the_views_rasampler_gives_its_rank(num_images, num_repeats, processes, batch_size, seed):
    """facebookresearch/deit `RASampler`: of the epoch's order (each image `num_repeats` times side by side), rank r
    takes positions r, r + N, r + 2N, ..."""
    sampler = RepeatedViewSampler(num_images, num_repeats, seed, processes, batch_size)
    order = sampler.epoch_order().tolist()
    copies = [order[start:start + num_repeats] for start in range(0, num_images, num_repeats)]
    assert all(len(set(views)) == 1 for views in copies)  # each image's views side by side
    assert len({views[0] for views in copies}) == len(copies)  # of distinct images
    for process, batches in enumerate(process_batches(sampler)):
        keys = [key for batch in batches for key in batch]
        assert [key.position for key in keys] == list(range(process, len(sampler), processes))
        assert [key.index for key in keys] == order[process::processes]


def test_the_copies_of_an_image_go_to_different_processes():
    """The issue's case: 16-image batches on 2 processes (32 per step) held 6 distinct images with the copies kept
    together; RASampler's spread gives 11 (3 views per image, 2 processes: at most 2 views of an image per batch)."""
    sampler = RepeatedViewSampler(num_images=960, num_repeats=3, seed=0, num_processes=2, batch_size=16)
    for batches in process_batches(sampler):
        for batch in batches:
            assert max(Counter(key.index for key in batch).values()) <= 2
            assert len({key.index for key in batch}) >= 10
    four = RepeatedViewSampler(num_images=960, num_repeats=3, seed=0, num_processes=4, batch_size=8)
    for batches in process_batches(four):  # as many processes as copies or more: never two views in one batch
        assert all(len({key.index for key in batch}) == len(batch) for batch in batches)


def test_an_epoch_is_num_images_views_of_a_third_of_them():
    sampler = RepeatedViewSampler(num_images=96, num_repeats=3, seed=0, num_processes=1, batch_size=8)
    counts = Counter(sampler.epoch_order().tolist())
    assert len(sampler) == 96 and len(counts) == 32 and set(counts.values()) == {3}
    sampler.set_epoch(1)
    assert Counter(sampler.epoch_order().tolist()) != counts  # another third of the images in the next epoch


def test_the_order_comes_from_the_seed_and_the_epoch():
    orders = {}
    for seed, epoch in [(0, 0), (0, 1), (1, 0), (0, 0)]:
        sampler = RepeatedViewSampler(50, 3, seed, 2, 4)
        sampler.set_epoch(epoch)
        orders.setdefault((seed, epoch), []).append(list(sampler))
    assert orders[0, 0][0] == orders[0, 0][1]
    assert len({str(runs[0]) for runs in orders.values()}) == 3


def test_micro_batches_are_keyed_by_epoch_step_micro_batch_and_process():
    seeder = StepSeeder(seed=7, process=1)
    seeder.start_epoch(2)
    keys, draws = [], []
    for step in (10, 10, 11):
        keys.append(seeder.seed_micro_batch(step))
        draws.append((np.random.rand(), torch.rand(1).item()))
    assert [tuple(key) for key in keys] == [(2, 10, 0, 1), (2, 10, 1, 1), (2, 11, 0, 1)]
    assert len(set(draws)) == 3
    other = StepSeeder(seed=7, process=0)
    other.start_epoch(2)
    other.seed_micro_batch(10)
    assert (np.random.rand(), torch.rand(1).item()) != draws[0]
    again = StepSeeder(seed=7, process=1)
    again.start_epoch(2)
    np.random.rand(5), torch.rand(5)  # whatever came before
    again.seed_micro_batch(10)
    assert (np.random.rand(), torch.rand(1).item()) == draws[0]


@pytest.mark.parametrize("num_repeats", [3, 0])
def test_the_views_are_the_same_with_0_or_2_dataloader_workers(tmp_path, small_digits, num_repeats):
    """The recipe's per-image transforms (random-resized crop, flip, RandAugment), read through the trainer's train
    DataLoader for two epochs."""
    augmentation = AugmentationArguments(input_size=IMAGE_SIZE)  # the recipe: rand-m9-mstd0.5-inc1, flips, crops
    train = prepared(small_digits, build_train_transform(augmentation))
    epochs = []
    for workers in (0, 2):
        trainer = make_trainer(tmp_path, student(distillation_type="none"), train, None, None, num_repeats=num_repeats)
        trainer.args.dataloader_num_workers = workers
        loader = trainer.get_train_dataloader()
        views = []
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            trainer._view_sampler.set_epoch(epoch)  # what `_run_epoch` does
            views.append(torch.cat([batch["pixel_values"] for batch in loader]))
        epochs.append(views)
        torch.rand(7), np.random.rand(7)  # the main process's RNGs move on; the views must not
    for zero_workers, two_workers in zip(*epochs, strict=True):
        torch.testing.assert_close(two_workers, zero_workers, rtol=0, atol=0)
        assert zero_workers.shape == (64, 3, IMAGE_SIZE, IMAGE_SIZE)  # 48 views, to whole batches of 32
    assert not torch.equal(epochs[0][0], epochs[0][1])  # another epoch, other views


@pytest.fixture(scope="module")
def small_digits(digits):
    return digits["train"].select(range(48))


# The recipe's random steps all on: RandAugment, flips, crops, random erasing, Mixup/CutMix, drop path (high, so that
# its masks differ), repeated augmentation; 48 images in global batches of 8, 6 steps per epoch.
FULL_RECIPE = ["--auto_augment", "rand-m9-mstd0.5-inc1", "--hflip", "0.5", "--scale", "0.08", "1", "--reprob", "0.5",
               "--mixup", "0.8", "--cutmix", "1.0", "--drop_path_rate", "0.5", "--repeated_aug", "true",
               "--num_train_epochs", "2", "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "8",
               "--eval_strategy", "no", "--do_eval", "false"]


def probe_records(probe_dir: Path, process: int) -> dict[int, dict[str, list]]:
    """What process `process` drew, by step and kind."""
    records: dict[int, dict[str, list]] = {}
    for line in (probe_dir / f"rank{process}.jsonl").read_text().splitlines():
        entry = json.loads(line)
        step = entry.pop("step")
        (kind, value), = entry.items()
        records.setdefault(step, {}).setdefault(kind, []).append(value)
    return records


@pytest.mark.slow
def test_each_process_draws_its_own_batch_randomness_and_a_resumed_run_draws_the_same(
    small_digits_dir, random_teacher_dir, tmp_path
):
    """2 processes, full recipe: the ranks draw different λ, erasing and drop-path masks at every step; a run resumed
    at step 8 (in its second epoch) draws what the uninterrupted run drew, and its losses are the same."""
    runs = {}
    for name in ("uninterrupted", "resumed"):
        (tmp_path / f"{name}.probe").mkdir()
        extra = ["--resume_from_checkpoint", "last"] if name == "resumed" else []
        if name == "resumed":  # what the uninterrupted run had written when it was at step 8
            shutil.copytree(tmp_path / "uninterrupted" / "checkpoint-8", tmp_path / "resumed" / "checkpoint-8")
        args = half_batches(tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path / name, *FULL_RECIPE, *extra))
        result = launch(two_processes(), PROBE, args, RANDOMNESS_PROBE_DIR=str(tmp_path / f"{name}.probe"))
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = [probe_records(tmp_path / f"{name}.probe", process) for process in (0, 1)]

    rank0, rank1 = runs["uninterrupted"]
    assert sorted(rank0) == sorted(rank1) == list(range(12))
    for step in range(12):
        assert rank0[step]["mixup"] != rank1[step]["mixup"], step
        assert rank0[step]["erasing_rng"] != rank1[step]["erasing_rng"], step
        assert len(rank0[step]["drop_path"]) == 6  # two per block, but the first (rate 0)
    assert [rank0[step]["drop_path"] for step in range(12)] != [rank1[step]["drop_path"] for step in range(12)]

    for uninterrupted, resumed in zip(runs["uninterrupted"], runs["resumed"], strict=True):
        assert sorted(resumed) == list(range(8, 12))
        assert {step: uninterrupted[step] for step in resumed} == resumed
    assert len(losses(tmp_path / "uninterrupted")) == 12
    assert losses(tmp_path / "resumed")[-4:] == pytest.approx(losses(tmp_path / "uninterrupted")[-4:], rel=1e-5)


class DrawBeforeTraining(TrainerCallback):
    """Draws from the three global RNGs as training begins, as the teacher's accuracy check does (its DataLoader
    draws a worker seed from torch's RNG): a random teacher here cannot pass that check."""

    def on_train_begin(self, args, state, control, **kwargs):
        random.random(), np.random.rand(), torch.rand(1)


def test_the_students_draws_do_not_depend_on_a_teacher_or_what_drew_before_training(
    small_digits_dir, tmp_path, monkeypatch
):
    """A timm teacher (its creation draws a random initialisation, before its checkpoint loads) against none and
    other draws before step 1: the same λ, erasing and drop-path masks."""
    for name, (owner, attribute) in PATCHED.items():
        monkeypatch.setattr(owner, attribute, getattr(randomness_probe, name))
    monkeypatch.setenv("RANDOMNESS_PROBE_DIR", str(tmp_path))
    checkpoint = tmp_path / "resnet10t.pth"
    torch.save(timm.create_model("resnet10t", num_classes=10).state_dict(), checkpoint)
    draws = []
    runs = [("teacher", "resnet10t", ["--teacher_checkpoint", str(checkpoint)], []),
            ("alone", None, ["--distillation_type", "none"], [DrawBeforeTraining()])]
    for name, teacher, flags, callbacks in runs:
        args = tiny_run_args(small_digits_dir, teacher, tmp_path / name, *FULL_RECIPE, "--max_steps", "3",
                             "--save_strategy", "no", *flags)
        main(args, callbacks)
        draws.append(probe_records(tmp_path, 0))
        (tmp_path / "rank0.jsonl").unlink()
    assert sorted(draws[0]) == [0, 1, 2]
    assert draws[0] == draws[1]


def test_drop_last_cuts_the_epoch_to_whole_global_batches():
    assert len(RepeatedViewSampler(50, 3, 0, 2, 4, drop_last=True)) == 48
    assert len(RepeatedViewSampler(50, 3, 0, 2, 4)) == 56
    with pytest.raises(ValueError, match="5 images make no global batch of 8"):
        RepeatedViewSampler(5, 3, 0, 2, 4, drop_last=True)
