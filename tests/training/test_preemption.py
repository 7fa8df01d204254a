"""SIGTERM mid-run (what a scheduler sends before preempting): the run saves a checkpoint at the current step on
every process, exits 143, and `--resume_from_checkpoint last` ends it as if it had never stopped."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from training.checkpoints import last_complete_checkpoint
from training.train import main

from .conftest import tiny_run_args
from .test_distributed import FAULT_PROBE, REPO, half_batches, losses, probe_env, two_processes

COMMON = ["--num_train_epochs", "1", "--logging_steps", "1", "--save_strategy", "no", "--eval_strategy", "no",
          "--resume_from_checkpoint", "last"]


def preempt(launcher: list[str], args: list[str], rank: int, step: int, tmp_path) -> subprocess.CompletedProcess:
    """Run the fault probe; once process `rank` has finished `step` (it writes its pid to a marker file and waits
    for the signal), SIGTERM that process alone."""
    marker = tmp_path / "marker"
    with open(tmp_path / "preempted.out", "w") as out, open(tmp_path / "preempted.err", "w") as err:
        run = subprocess.Popen([*launcher, str(FAULT_PROBE), *args], stdout=out, stderr=err, text=True, cwd=REPO,
                               env=probe_env(PREEMPT_AT=f"{rank}:{step}:{marker}"))
        try:
            deadline = time.monotonic() + 300  # what it waits for: the marker, written by the probe
            while not (marker.exists() and marker.read_text()) and run.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert marker.exists(), (tmp_path / "preempted.err").read_text()[-3000:]
            os.kill(int(marker.read_text()), signal.SIGTERM)
            returncode = run.wait(timeout=300)
        finally:
            run.kill()
    return subprocess.CompletedProcess(run.args, returncode, (tmp_path / "preempted.out").read_text(),
                                       (tmp_path / "preempted.err").read_text())


def assert_resumed_as_never_stopped(output_dir, reference_dir):
    assert losses(output_dir) == pytest.approx(losses(reference_dir), rel=1e-4)
    assert len(losses(output_dir)) == 6
    final, expected = load_file(output_dir / "model.safetensors"), load_file(reference_dir / "model.safetensors")
    for name, tensor in expected.items():
        torch.testing.assert_close(final[name], tensor, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_saves_a_checkpoint_at_the_current_step_and_last_resumes_from_it(small_digits_dir,
                                                                                   random_teacher_dir, tmp_path,
                                                                                   processes):
    main(tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path / "reference", *COMMON))  # 6 steps of 8

    args = tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path / "out", *COMMON)
    launcher = [sys.executable] if processes == 1 else two_processes()
    if processes == 2:
        args = half_batches(args)
    # on 2 processes only rank 1 gets the signal: rank 0 must learn it from the per-step all-reduce
    result = preempt(launcher, args, rank=processes - 1, step=3, tmp_path=tmp_path)
    assert result.returncode == (143 if processes == 1 else 1), result.stderr[-3000:]
    assert "SIGTERM received: saving a checkpoint at step 3" in result.stderr
    assert last_complete_checkpoint(str(tmp_path / "out")) == str(tmp_path / "out" / "checkpoint-3")
    rng_files = sorted(path.name for path in (tmp_path / "out" / "checkpoint-3").glob("rng_state*"))
    assert rng_files == (["rng_state.pth"] if processes == 1 else ["rng_state_0.pth", "rng_state_1.pth"])
    assert not (tmp_path / "out" / "model.safetensors").exists()  # no final model from a stopped run

    resumed = subprocess.run([*launcher, str(FAULT_PROBE), *args], capture_output=True, text=True, cwd=REPO,
                             env=probe_env(), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stderr and "checkpoint-3" in resumed.stderr
    assert_resumed_as_never_stopped(tmp_path / "out", tmp_path / "reference")
