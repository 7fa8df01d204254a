"""`accelerate launch --multi_gpu --num_processes 2` on CPU (gloo) trains as one process with the same global batch."""

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate.utils.launch import _get_mpirun_args
from safetensors.torch import load_file

from training.train import main

from .conftest import tiny_run_args

REPO = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).with_name("save_probe.py")
FAULT_PROBE = Path(__file__).with_name("fault_probe.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A few steps of a tiny run, with nothing random but the model's initialisation and the order of the batches.
THREE_STEPS = ["--max_steps", "3", "--logging_steps", "1", "--save_strategy", "no", "--eval_strategy", "no",
               "--do_eval", "false", "--mixup", "0", "--cutmix", "0"]


def probe_env(**env: str) -> dict[str, str]:
    """This environment for a launched probe: the checkout importable, one thread per process, offline, CPU only."""
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "CUDA_VISIBLE_DEVICES": "", **env}


def launch(launcher: list[str], probe: Path, args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*launcher, str(probe), *args], capture_output=True, text=True, env=probe_env(**env),
                          cwd=REPO, timeout=300)


def run(launcher: list[str], args: list[str], probe_file: Path) -> str:
    result = launch(launcher, PROBE, args, SAVE_PROBE_FILE=str(probe_file))
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def two_processes() -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
            "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]


def half_batches(args: list[str]) -> list[str]:
    args[args.index("--per_device_train_batch_size") + 1] = "4"  # global batch 8 = 2 x 4
    return args


def losses(output_dir: Path) -> list[float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


@pytest.fixture(scope="module")
def three_steps_on_one_process(small_digits_dir, random_teacher_dir, tmp_path_factory) -> Path:
    """The output of `THREE_STEPS` on one process with the global batch 8, trained here (not launched: a launch
    costs an interpreter's imports): what each launcher's 2-process run must match."""
    output_dir = tmp_path_factory.mktemp("three_steps") / "one"
    main(tiny_run_args(small_digits_dir, random_teacher_dir, output_dir, *THREE_STEPS))
    return output_dir


@pytest.mark.slow
def test_two_processes_train_as_one_with_the_same_global_batch(small_digits_dir, random_teacher_dir, tmp_path):
    common = ["--num_train_epochs", "1", "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "3",
              "--repeated_aug", "true", "--mixup", "0", "--cutmix", "0", "--eval_strategy", "no", "--do_eval", "false"]
    main(tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path / "one", *common))  # global batch 8 = 1 x 8

    double_args = half_batches(tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path / "two", *common))
    stdout = run(two_processes(), double_args, tmp_path / "two.saves")
    assert "WORLD_SIZE 2 DISTRIBUTED MULTI_CPU" in stdout

    assert len(losses(tmp_path / "one")) == len(losses(tmp_path / "two")) == 6  # 48 images / 8
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    for name, tensor in one.items():
        torch.testing.assert_close(two[name], tensor, atol=1e-5, rtol=1e-4, msg=name)
    # the weights of checkpoints 3 and 6 and of the final model: written by rank 0 alone
    assert (tmp_path / "two.saves").read_text().split() == ["0", "0", "0"]
    assert sorted(p.name for p in (tmp_path / "two").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]


@pytest.mark.slow
def test_all_corrupt_batches_keep_the_ranks_in_lockstep(small_digits_dir, random_teacher_dir, tmp_path):
    """Step 3: rank 1's batch is all corrupt, rank 0's still trains both; step 5: both are, the step is skipped."""
    args = half_batches(tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path / "out", "--num_train_epochs", "1",
                                      "--logging_steps", "1", "--save_strategy", "no", "--eval_strategy", "no"))
    result = launch(two_processes(), FAULT_PROBE, args, EMPTY_AT="1:2,*:4")
    assert result.returncode == 0, result.stderr[-3000:]
    weights = dict(re.findall(r"WEIGHTS (\d) (-?[\d.]+(?:e[-+]?\d+)?)", result.stdout))  # lines can interleave
    assert len(weights) == 2 and weights["0"] == weights["1"], result.stdout  # the ranks hold the same weights
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    logs = {entry["step"]: entry for entry in state["log_history"] if "learning_rate" in entry}
    assert sorted(logs) == [1, 2, 3, 4, 5, 6]
    assert "loss" in logs[3] and logs[3]["skipped_empty_steps"] == 0
    assert "loss" not in logs[5] and logs[5]["skipped_empty_steps"] == 1
    # step 6 runs at the learning rate the skipped step 5 would have had: the schedule did not move past it
    assert logs[6]["learning_rate"] == logs[5]["learning_rate"] != logs[4]["learning_rate"]


@pytest.mark.slow
def test_a_stuck_rank_ends_the_job_within_the_ddp_timeout(small_digits_dir, random_teacher_dir, tmp_path):
    """Rank 1 SIGSTOPped: rank 0 gives up at its next collective after `--ddp_timeout`, then the launcher kills rank 1
    after its 30 s grace for SIGTERM (which a stopped process does not act on)."""
    args = half_batches(tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path / "out", "--num_train_epochs", "1",
                                      "--save_strategy", "no", "--eval_strategy", "no", "--ddp_timeout", "5"))
    result = launch(two_processes(), FAULT_PROBE, args, STOP_AT="1:2")
    ended = time.time()
    assert result.returncode != 0
    stopped = float(next(line.split()[2] for line in result.stdout.splitlines() if line.startswith("STOPPED AT")))
    assert 5 <= ended - stopped < 5 + 30 + 15, ended - stopped


def wait_for_machines(machines: list[subprocess.Popen], stderr_files: list[Path], timeout: float = 900) -> None:
    """Wait until every machine's launcher has exited with 0, and fail as soon as one exits otherwise.

    A machine whose worker failed exits at once, but torch elastic's agent on the other one, its worker done or
    broken off, then waits up to 300 s in its exit barrier for the failed agent, which never arrives (a failed agent
    skips the barrier): waiting on each machine in turn for a fixed time made a busy machine's slow run plus that wait
    time out, hiding the failing machine's error. `timeout` only bounds a run in which no machine ever exits."""
    deadline = time.monotonic() + timeout
    try:
        while (returncodes := [machine.poll() for machine in machines]) != [0] * len(machines):
            failed = [rank for rank, code in enumerate(returncodes) if code not in (None, 0)]
            assert not failed, "".join(f"machine {rank}: {stderr_files[rank].read_text()[-3000:]}" for rank in failed)
            assert time.monotonic() < deadline, "no machine exited: " + "".join(
                path.read_text()[-1500:] for path in stderr_files)
            time.sleep(1)
    finally:
        for machine in machines:
            machine.kill()


@pytest.mark.slow
def test_an_accelerate_config_file_and_a_two_machine_launch_train_as_one(small_digits_dir, random_teacher_dir,
                                                                          three_steps_on_one_process, tmp_path):
    """`accelerate launch --config_file` with a multi-GPU YAML (the script itself runs on the CPU here), and two
    "machines" on one host (`--num_machines 2 --machine_rank 0|1`): both form a 2-process group that trains as one."""
    config = tmp_path / "accelerate.yaml"
    config.write_text(f"compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_processes: 2\n"
                      f"num_machines: 1\nmachine_rank: 0\nmixed_precision: 'no'\nmain_process_port: {free_port()}\n")
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    stdout = run(launcher, half_batches(tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path / "yaml",
                                                      *THREE_STEPS)), tmp_path / "yaml.saves")
    assert "WORLD_SIZE 2 DISTRIBUTED MULTI_CPU" in stdout

    port, env = str(free_port()), probe_env(SAVE_PROBE_FILE=str(tmp_path / "nodes.saves"))
    args = half_batches(tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path / "nodes", *THREE_STEPS))
    # Each machine's output goes to a file: a pipe left undrained while waiting on the other machine fills up and
    # blocks its writer mid-run, and then both wait for each other.
    logs = [(tmp_path / f"machine{rank}.out", tmp_path / f"machine{rank}.err") for rank in (0, 1)]
    machines = []
    for rank, (out, err) in enumerate(logs):
        with open(out, "w") as stdout, open(err, "w") as stderr:
            machines.append(subprocess.Popen(
                [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                 "--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                 "--main_process_port", port, "--mixed_precision", "no", "--dynamo_backend", "no", str(PROBE), *args],
                stdout=stdout, stderr=stderr, text=True, env=env, cwd=REPO,
            ))
    wait_for_machines(machines, [err for _, err in logs])
    assert "WORLD_SIZE 2 DISTRIBUTED MULTI_CPU" in logs[0][0].read_text()  # printed by the global rank 0

    for folder in ("yaml", "nodes"):
        assert losses(tmp_path / folder) == pytest.approx(losses(three_steps_on_one_process), rel=1e-4), folder


@pytest.mark.slow
def test_a_multi_cpu_accelerate_config_trains_with_all_its_processes(small_digits_dir, random_teacher_dir,
                                                                      three_steps_on_one_process, tmp_path,
                                                                      monkeypatch):
    """accelerate starts a `MULTI_CPU` config's processes with `mpirun` (the `mpich` test dependency provides one) on
    the hosts of its hostfile; with no MASTER_ADDR exported, `training.train` meets on this host when all its ranks
    are here."""
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")  # its mpirun
    for variable in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(variable, raising=False)
    hostfile_flag = _get_mpirun_args()[1]  # accelerate's own choice of MPI program and flags
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n" if hostfile_flag == "--hostfile" else "localhost:2\n")  # Open MPI, MPICH
    config = tmp_path / "accelerate.yaml"
    config.write_text(f"compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\nnum_processes: 2\n"
                      f"num_machines: 1\nmachine_rank: 0\nmixed_precision: 'no'\nuse_cpu: true\n"
                      f"main_process_port: {free_port()}\nmpirun_config:\n  mpirun_hostfile: {hostfile}\n")
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    stdout = run(launcher, half_batches(tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path / "mpi",
                                                      *THREE_STEPS)), tmp_path / "mpi.saves")
    assert "WORLD_SIZE 2 DISTRIBUTED MULTI_CPU" in stdout
    assert losses(tmp_path / "mpi") == pytest.approx(losses(three_steps_on_one_process), rel=1e-4)
    assert (tmp_path / "mpi.saves").read_text().split() == ["0"]  # the final model, written by rank 0 alone
