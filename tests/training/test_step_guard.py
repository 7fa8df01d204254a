"""Non-finite and empty steps change nothing (weights, Adam state, schedule, logged loss) and too many stop the run."""

import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file
from transformers import TrainerCallback, TrainingArguments

from training.args import AugmentationArguments
from training.collator import DistillationCollator
from training.skipped_images import SkippedImageCounter
from training.step_guard import NonFiniteStepGuard, NonFiniteTrainingError, largest_magnitude
from training.teacher.model import Teacher
from training.trainer import DistillationTrainer
from training.transforms import ImageTransform, build_train_transform

from .conftest import IMAGE_SIZE, PooledLinearClassifier, tiny_run_args
from .test_trainer import student

REPO = Path(__file__).resolve().parents[2]
STEPS = 6  # 48 digits, batch 8


class Snapshots(TrainerCallback):
    """Weights, Adam state and learning rate after each training log (which follows each step, at logging_steps 1)."""

    def __init__(self):
        self.taken: dict[int, dict] = {}

    def on_log(self, args, state, control, model=None, optimizer=None, logs=None, **kwargs):
        if "learning_rate" in logs:
            adam = [value.clone() for per_param in optimizer.state.values() for value in per_param.values()]
            self.taken[state.global_step] = {
                "weights": [parameter.detach().clone() for parameter in model.parameters()], "adam": adam,
                "lr": optimizer.param_groups[0]["lr"], "logs": dict(logs),
            }


class Sabotage:
    """Calls `function` unchanged, except on the calls numbered in `calls` (from 1), where `sabotage` does."""

    def __init__(self, function, sabotage, calls):
        self.function, self.sabotage, self.calls, self.count = function, sabotage, set(calls), 0

    def __call__(self, *args):
        self.count += 1
        return (self.sabotage if self.count in self.calls else self.function)(*args)


def nan_like(logits):
    return torch.full_like(logits, float("nan"))


def trainer_for(tmp_path, digits, teacher, collator=None, model=None, min_decodable_fraction=0.9, **overrides):
    augmentation = AugmentationArguments(input_size=IMAGE_SIZE, auto_augment=None, hflip=0, scale=[1, 1], reprob=0)
    train = digits["train"].select(range(8 * STEPS)).cast_column("image", datasets.Image(decode=False))
    args = TrainingArguments(**{
        "output_dir": str(tmp_path), "per_device_train_batch_size": 8, "learning_rate": 1e-3, "weight_decay": 0.05,
        "num_train_epochs": 1, "lr_scheduler_type": "linear", "logging_steps": 1, "save_strategy": "no",
        "report_to": "none", "remove_unused_columns": False, "disable_tqdm": True, "use_cpu": True, "seed": 0,
        **overrides,
    })
    snapshots = Snapshots()
    trainer = DistillationTrainer(
        model=model or student(), args=args, train_dataset=train.with_transform(
            ImageTransform(build_train_transform(augmentation))),
        data_collator=collator or DistillationCollator(), teacher=teacher, callbacks=[snapshots],
        max_consecutive_nonfinite=3, skipped_images=SkippedImageCounter(min_decodable_fraction),
    )
    return trainer, snapshots


def assert_unchanged(before: dict, after: dict):
    for old, new in zip(before["weights"] + before["adam"], after["weights"] + after["adam"], strict=True):
        assert torch.equal(old, new)
    assert after["lr"] == before["lr"]


# fused AdamW skips on the device; other optimizers fall back to a host check
@pytest.mark.parametrize("optim", ["adamw_torch_fused", "adamw_torch"])
def test_a_step_with_a_nan_teacher_output_is_skipped_and_training_goes_on(optim, tmp_path, digits, fitted_teacher):
    trainer, snapshots = trainer_for(tmp_path, digits, fitted_teacher, optim=optim)
    teacher_forward = fitted_teacher.forward
    fitted_teacher.forward = Sabotage(teacher_forward, lambda pixels: nan_like(teacher_forward(pixels)), [3])
    try:
        trainer.train()
    finally:
        del fitted_teacher.forward
    assert trainer.step_guard.skips_on_device == (optim == "adamw_torch_fused")
    taken = snapshots.taken
    assert_unchanged(taken[2], taken[3])  # weights, both Adam moments, Adam's step count, learning rate
    assert not torch.equal(taken[3]["weights"][0], taken[4]["weights"][0])  # and the next step trains
    assert taken[3]["logs"]["skipped_nonfinite_steps"] == 1
    assert sum(snapshot["logs"]["skipped_nonfinite_steps"] for snapshot in taken.values()) == 1
    # the schedule runs over the applied steps only: 5 of 6
    assert trainer.lr_scheduler.last_epoch == STEPS - 1


def test_an_all_corrupt_batch_changes_nothing_and_leaves_the_logged_loss_alone(tmp_path, digits, fitted_teacher):
    collator = DistillationCollator()
    corrupt = Sabotage(collator, lambda samples: collator([{"pixel_values": None, "labels": None}] * len(samples)),
                       [4])
    # one batch in six corrupt: under the default decodable fraction, which is not what this test is about
    trainer, snapshots = trainer_for(tmp_path, digits, fitted_teacher, collator=corrupt, min_decodable_fraction=0.5)
    result = trainer.train()
    taken = snapshots.taken
    assert_unchanged(taken[3], taken[4])
    assert not torch.equal(taken[4]["weights"][0], taken[5]["weights"][0])
    assert taken[4]["logs"]["skipped_empty_steps"] == 1
    assert "loss" not in taken[4]["logs"]  # no batch, no loss: not a zero averaged into the mean
    assert all(snapshot["logs"]["loss"] > 0.5 for step, snapshot in taken.items() if step != 4)
    # the run's mean loss is that of the five batches that had images
    assert result.metrics["train_loss"] == pytest.approx(
        np.mean([taken[step]["logs"]["loss"] for step in (1, 2, 3, 5, 6)])
    )
    assert trainer.lr_scheduler.last_epoch == STEPS - 1


def linear_teacher(weight: float) -> Teacher:
    """A teacher whose every weight is `weight` (NaN, inf)."""
    return Teacher(PooledLinearClassifier(np.full((10, 64), weight, dtype=np.float32), np.zeros(10, np.float32)), 10)


@pytest.mark.parametrize("fault", ["teacher with a NaN head", "teacher with inf weights", "student with a NaN head"])
def test_non_finite_steps_in_a_row_stop_the_run_with_nothing_changed(fault, tmp_path, digits, fitted_teacher):
    teacher = {"teacher with a NaN head": linear_teacher(float("nan")),
               "teacher with inf weights": linear_teacher(float("inf"))}.get(fault, fitted_teacher)
    model = student()
    if fault.startswith("student"):
        torch.nn.init.constant_(model.cls_classifier.weight, float("nan"))
    initial = [parameter.detach().clone() for parameter in model.parameters()]
    trainer, snapshots = trainer_for(tmp_path, digits, teacher, model=model)
    with pytest.raises(NonFiniteTrainingError, match="3 optimizer steps in a row had a non-finite"):
        trainer.train()
    assert trainer.state.global_step == 3
    for old, new in zip(initial, model.parameters(), strict=True):
        torch.testing.assert_close(new.detach(), old, equal_nan=True)
    assert all(int(state["step"]) == 0 for state in trainer.optimizer.state.values())
    assert trainer.lr_scheduler.last_epoch == 0
    with pytest.raises(NonFiniteTrainingError, match="not finite") if fault.startswith("student") else nullcontext():
        trainer.save_model(str(tmp_path / "final"))


@pytest.mark.slow
def test_an_exploding_run_exits_non_zero_with_the_message_and_saves_no_non_finite_model(
    small_digits_dir, random_teacher_dir, tmp_path
):
    args = tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path / "out", "--learning_rate", "1e6",
                         "--warmup_epochs", "0", "--num_train_epochs", "4", "--logging_steps", "2",
                         "--save_strategy", "steps", "--save_steps", "2", "--save_total_limit", "1",
                         "--eval_strategy", "no")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-m", "training.train", *args], env=env, cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode != 0
    # step 1 throws the weights far out, steps 2 to 6 are non-finite and skipped
    assert "5 optimizer steps in a row had a non-finite loss" in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "out" / "model.safetensors").exists()  # no final model
    checkpoints = list((tmp_path / "out").glob("checkpoint-*"))
    assert checkpoints
    for checkpoint in checkpoints:
        assert all(torch.isfinite(t).all() for t in load_file(checkpoint / "model.safetensors").values()), checkpoint


def test_no_host_read_in_the_training_step_or_the_guard(tmp_path, digits, fitted_teacher, monkeypatch):
    """An `.item()`, `.tolist()` or `bool()` of a tensor there would stall the CPU until the GPU finished each step.
    (The DataLoader's CPU transforms are not counted; logging reads the counters, every 100 steps here.)"""
    trainer, _ = trainer_for(tmp_path, digits, fitted_teacher, num_train_epochs=3, logging_steps=100,
                             logging_nan_inf_filter=False)  # as the recipe: transformers' filter reads every loss
    reads, inside = [], []
    for method in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, method)
        monkeypatch.setattr(torch.Tensor, method, lambda self, *args, _original=original, _name=method: (
            inside and reads.append(_name), _original(self, *args))[1])

    def counted(function):
        def call(*args, **kwargs):
            inside.append(1)
            try:
                return function(*args, **kwargs)
            finally:
                inside.pop()
        return call

    guard = trainer.step_guard
    trainer.training_step = counted(trainer.training_step)
    guard.on_pre_optimizer_step, guard.on_optimizer_step = map(counted, (guard.on_pre_optimizer_step,
                                                                        guard.on_optimizer_step))
    trainer.train()
    assert trainer.state.global_step == 3 * STEPS
    assert reads == []


def test_max_consecutive_nonfinite_must_be_positive():
    with pytest.raises(ValueError, match="`max_consecutive_nonfinite` must be at least 1"):
        NonFiniteStepGuard(0)


@given(values=st.lists(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=1, max_size=5),
                       min_size=1, max_size=4))
def test_largest_magnitude_is_the_infinity_norm_nan_and_inf_included(values):
    tensors = [torch.tensor(row, dtype=torch.float32) for row in values]
    expected = torch.nn.utils.get_total_norm(tensors, norm_type=float("inf"))
    torch.testing.assert_close(largest_magnitude(tensors), expected, equal_nan=True)


def test_the_advice_on_non_finite_weights_names_the_newest_checkpoint_with_finite_ones(tmp_path, digits,
                                                                                        fitted_teacher):
    model = student()
    trainer, _ = trainer_for(tmp_path, digits, fitted_teacher, model=model)
    for step in (4, 8):  # checkpoint-8's weights are NaN
        if step == 8:
            torch.nn.init.constant_(model.cls_classifier.bias, float("nan"))
        checkpoint = tmp_path / f"checkpoint-{step}"
        model.save_pretrained(checkpoint, safe_serialization=True)
        (checkpoint / "trainer_state.json").write_text("{}")
        for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
            torch.save({}, checkpoint / name)
    with pytest.raises(NonFiniteTrainingError, match=r"with finite weights is .*checkpoint-4; resume from it"):
        trainer.save_model(str(tmp_path / "final"))
