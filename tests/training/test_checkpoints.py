"""Checkpoints are complete or invisible: a run SIGKILLed anywhere resumes with `last` and ends as if never killed."""

import json
import logging
import os
import pickle
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from training.checkpoints import STAGING_DIR, damaged_files, last_complete_checkpoint, missing_parts
from training.train import main, parse_args, resume_argument

from .conftest import tiny_run_args

REPO = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).with_name("fault_probe.py")
COMPLETE = ["trainer_state.json", "config.json", "model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"]


WEIGHTS = {"weight": torch.ones(4, 2), "bias": torch.zeros(4)}


def fake_checkpoint(path: Path, files=COMPLETE) -> Path:
    """A checkpoint whose files read as transformers reads them: JSON, safetensors `WEIGHTS`, torch pickles."""
    path.mkdir(parents=True)
    for name in files:
        if name.endswith(".json"):
            (path / name).write_text("{}")
        elif name.endswith(".safetensors"):
            save_file(WEIGHTS, path / name)
        else:
            torch.save({"state": torch.zeros(2)}, path / name)
    return path


class Payload:
    def __reduce__(self):
        return os.system, ("echo payload ran",)


def cut_in_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# Ways a checkpoint's files get damaged, each with the words of the problem reported for that file.
DAMAGE = {
    "NaN weights": ("model.safetensors", lambda path: save_file({**WEIGHTS, "bias": torch.full((4,), float("nan"))},
                                                                path), "holds non-finite (NaN or inf) weights: bias"),
    "a missing tensor": ("model.safetensors", lambda path: save_file({"weight": WEIGHTS["weight"]}, path),
                         "lack 1 of the model's tensors: bias"),
    "cut-short weights": ("model.safetensors", cut_in_half, "is cut short or damaged"),
    "empty weights": ("model.safetensors", lambda path: path.write_bytes(b""), "is empty"),
    "a payload in scaler.pt": ("scaler.pt", lambda path: path.write_bytes(pickle.dumps(Payload())),
                               "holds more than tensors, refused by torch.load(weights_only=True)"),
    "a cut-short optimizer state": ("optimizer.pt", cut_in_half, "is cut short or damaged"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_checkpoint_is_skipped_by_last_and_refused_when_named(tmp_path, caplog, capfd, damage):
    name, spoil, problem = DAMAGE[damage]
    fake_checkpoint(tmp_path / "checkpoint-4", [*COMPLETE, "scaler.pt"])
    damaged = fake_checkpoint(tmp_path / "checkpoint-8", [*COMPLETE, "scaler.pt"])
    spoil(damaged / name)
    with caplog.at_level(logging.WARNING):
        assert last_complete_checkpoint(str(tmp_path), WEIGHTS) == str(tmp_path / "checkpoint-4")
    assert f"Skipping the damaged checkpoint {damaged}: " in caplog.text and problem in caplog.text
    if name != "model.safetensors" or "tensors" not in problem:
        assert str(damaged / name) in caplog.text  # the file is named
    training_args = parse_args(["--dataset_name", "x", "--output_dir", str(tmp_path),
                                "--resume_from_checkpoint", str(damaged)]).training
    with pytest.raises(ValueError, match=f"Cannot resume from {re.escape(str(damaged))}: .*{re.escape(problem)}"):
        resume_argument(training_args, WEIGHTS)
    assert damaged_files(str(tmp_path / "checkpoint-4"), WEIGHTS) == []
    assert "payload ran" not in capfd.readouterr().out


def test_the_newest_complete_checkpoint_is_found_and_newer_incomplete_ones_are_skipped(tmp_path, caplog):
    fake_checkpoint(tmp_path / "checkpoint-4")
    fake_checkpoint(tmp_path / "checkpoint-8", [name for name in COMPLETE if name != "optimizer.pt"])
    fake_checkpoint(tmp_path / "checkpoint-12")
    (tmp_path / "checkpoint-12" / "trainer_state.json").write_text('{"global_step": 1')  # cut short
    fake_checkpoint(tmp_path / STAGING_DIR / "checkpoint-16")  # staged, not yet published
    with caplog.at_level(logging.WARNING):
        assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-4")
    assert "checkpoint-12: it has no readable trainer state" in caplog.text
    assert "checkpoint-8: it has no optimizer state" in caplog.text
    assert missing_parts(str(tmp_path / "nowhere")) == [
        "trainer state", "model config", "model weights", "optimizer state", "scheduler state", "RNG state"]


def test_resume_last_without_a_complete_checkpoint_starts_from_step_0_and_a_named_incomplete_one_is_refused(tmp_path):
    fake_checkpoint(tmp_path / "checkpoint-8", [name for name in COMPLETE if not name.startswith("rng")])
    training_args = parse_args(["--dataset_name", "x", "--output_dir", str(tmp_path),
                                "--resume_from_checkpoint", "last"]).training
    assert resume_argument(training_args) is None
    training_args.resume_from_checkpoint = str(tmp_path / "checkpoint-8")
    with pytest.raises(ValueError, match="Cannot resume from .*checkpoint-8: it has no RNG state"):
        resume_argument(training_args)


# Each launch SIGKILLs itself at one of these points (tests/training/fault_probe.py), with the newest complete
# checkpoint the next launch must resume from: 18 steps, a checkpoint every 3, the last 2 kept.
KILLS = [
    ("optimizer:3", None),  # the first checkpoint half-written
    ("state:6", "checkpoint-3"),  # its last file half-written
    ("publish:9", "checkpoint-9"),  # published, older ones not rotated yet
    ("rotate:12", "checkpoint-12"),  # the oldest one half-deleted
    ("step:16", "checkpoint-15"),  # between checkpoints
]


@pytest.mark.slow
def test_a_run_killed_at_any_point_resumes_to_the_same_steps_and_weights(small_digits_dir, random_teacher_dir,
                                                                         tmp_path):
    common = ["--num_train_epochs", "3", "--save_strategy", "steps", "--save_steps", "3", "--save_total_limit", "2",
              "--logging_steps", "1", "--eval_strategy", "no", "--resume_from_checkpoint", "last"]
    reference = main(tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path / "reference", *common))
    assert reference.state.global_step == 18

    output_dir = tmp_path / "killed"
    args = tiny_run_args(small_digits_dir, random_teacher_dir, output_dir, *common)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    for launch, (kill_at, resumable) in enumerate(KILLS + [("none:0", None)]):
        result = subprocess.run([sys.executable, str(PROBE), *args], env={**env, "KILL_AT": kill_at}, cwd=REPO,
                                capture_output=True, text=True, timeout=300)
        if launch in (0, 1):  # nothing complete to resume from yet
            assert "No complete checkpoint" in result.stderr and "starting from step 0" in result.stderr
        if kill_at == "none:0":
            assert result.returncode == 0, result.stderr[-3000:]
        else:
            assert result.returncode == -signal.SIGKILL, (kill_at, result.stderr[-3000:])
            newest = last_complete_checkpoint(str(output_dir))
            assert (newest and os.path.basename(newest)) == resumable, kill_at

    state = json.loads((output_dir / "trainer_state.json").read_text())
    logged = [entry for entry in state["log_history"] if "loss" in entry]
    assert [entry["step"] for entry in logged] == list(range(1, 19))  # no step lost or repeated
    expected = [entry["loss"] for entry in reference.state.log_history if "loss" in entry]
    assert [entry["loss"] for entry in logged] == pytest.approx(expected, rel=1e-4)
    final = load_file(output_dir / "model.safetensors")
    for name, tensor in load_file(tmp_path / "reference" / "model.safetensors").items():
        torch.testing.assert_close(final[name], tensor, atol=1e-5, rtol=1e-4, msg=name)
    assert sorted(path.name for path in output_dir.glob("checkpoint-*")) == ["checkpoint-15", "checkpoint-18"]
    assert not any((output_dir / STAGING_DIR).iterdir())  # what the killed saves left was cleaned up


def test_the_best_checkpoint_is_recorded_where_it_is_published(small_digits_dir, random_teacher_dir, tmp_path):
    output_dir = tmp_path / "out"
    trainer = main(tiny_run_args(small_digits_dir, random_teacher_dir, output_dir, "--max_steps", "6",
                                 "--eval_strategy", "steps", "--eval_steps", "2", "--save_steps", "2",
                                 "--save_strategy", "steps", "--load_best_model_at_end", "true",
                                 "--metric_for_best_model", "loss", "--greater_is_better", "false"))
    best = trainer.state.best_model_checkpoint
    assert os.path.dirname(best) == str(output_dir) and os.path.isdir(best)
    for checkpoint in output_dir.glob("checkpoint-*"):
        recorded = json.loads((checkpoint / "trainer_state.json").read_text())["best_model_checkpoint"]
        assert STAGING_DIR not in recorded and recorded.startswith(str(output_dir)), (checkpoint, recorded)
