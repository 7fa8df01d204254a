"""`accelerate launch --multi_gpu --num_processes 2` on CPU (gloo) trains as one process with the same global batch."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import tiny_run_args

REPO = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).with_name("save_probe.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(launcher: list[str], args: list[str], probe_file: Path) -> str:
    env = {**os.environ, "SAVE_PROBE_FILE": str(probe_file), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([*launcher, str(PROBE), *args], capture_output=True, text=True, env=env, cwd=REPO,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def losses(output_dir: Path) -> list[float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def test_two_processes_train_as_one_with_the_same_global_batch(small_digits_dir, random_teacher_dir, tmp_path):
    common = ["--num_train_epochs", "1", "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "3",
              "--repeated_aug", "true", "--mixup", "0", "--cutmix", "0", "--eval_strategy", "no", "--do_eval", "false"]
    run([sys.executable], tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path / "one", *common),
        tmp_path / "one.saves")  # global batch 8 = 1 x 8

    double_args = tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path / "two", *common)
    double_args[double_args.index("--per_device_train_batch_size") + 1] = "4"  # global batch 8 = 2 x 4
    stdout = run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
         "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())],
        double_args, tmp_path / "two.saves",
    )
    assert "WORLD_SIZE 2 DISTRIBUTED MULTI_CPU" in stdout

    assert len(losses(tmp_path / "one")) == len(losses(tmp_path / "two")) == 6  # 48 images / 8
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    for name, tensor in one.items():
        torch.testing.assert_close(two[name], tensor, atol=1e-5, rtol=1e-4, msg=name)
    # the weights of checkpoints 3 and 6 and of the final model: written by rank 0 alone
    assert (tmp_path / "two.saves").read_text().split() == ["0", "0", "0"]
    assert sorted(p.name for p in (tmp_path / "two").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
