"""SIGTERM mid-run, as schedulers send it before preempting: to the launcher, to each rank's process group (its
DataLoader workers included), or to one process alone. The run saves a checkpoint at the current step on every
process and exits 143, and `--resume_from_checkpoint last` ends it as if it had never stopped. A signal while a
checkpoint is being written, or a second one, leaves only whole checkpoints."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from training.checkpoints import STAGING_DIR, damaged_files, last_complete_checkpoint, missing_parts
from training.preemption import ignore_sigterm_in_workers
from training.train import main

from .conftest import tiny_run_args
from .test_distributed import FAULT_PROBE, REPO, half_batches, losses, probe_env, two_processes

COMMON = ["--num_train_epochs", "1", "--logging_steps", "1", "--save_strategy", "no", "--eval_strategy", "no",
          "--resume_from_checkpoint", "last"]


def workers(args: list[str], count: int) -> list[str]:
    args[args.index("--dataloader_num_workers") + 1] = str(count)
    return args


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command (state first, process group third); None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()
    except OSError:
        return None


def alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"  # a zombie has exited


def group_members(group: int) -> list[int]:
    """The live processes of process group `group`."""
    return [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
            if alive(pid) and (fields := _stat(pid)) is not None and int(fields[2]) == group]


def wait_until_gone(groups: list[int], timeout: float = 120) -> list[int]:
    """Wait (up to `timeout`: PyTorch's workers check for their parent every 5 s) until no process of `groups` is
    left; returns those left."""
    deadline = time.monotonic() + timeout
    while (left := [pid for group in groups for pid in group_members(group)]) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


class Preempted(subprocess.CompletedProcess):
    """A preempted run: its output, the pid of each process that waited for the signal, and the seconds from the
    signal to the launcher's exit."""

    pids: dict[int, int]
    seconds: float


def preempt(launcher: list[str], args: list[str], tmp_path, send, ranks: list[int], step: int, **env: str) -> Preempted:
    """Run the fault probe in a session of its own; once every process of `ranks` has reached `step` (it writes its
    pid to a marker file and waits for the signal; `$PREEMPT_IN=save`: in that step's checkpoint save), call
    `send(run, pids)` to signal it (`pids`: rank -> pid)."""
    marker = tmp_path / "marker"
    waiting = "*" if len(ranks) > 1 else str(ranks[0])
    with open(tmp_path / "preempted.out", "w") as out, open(tmp_path / "preempted.err", "w") as err:
        run = subprocess.Popen([*launcher, str(FAULT_PROBE), *args], stdout=out, stderr=err, text=True, cwd=REPO,
                               env=probe_env(PREEMPT_AT=f"{waiting}:{step}:{marker}", **env), start_new_session=True)
        try:
            deadline = time.monotonic() + 300  # what it waits for: the markers, written by the probe
            markers = [tmp_path / f"marker.{rank}" for rank in ranks]
            while not all(path.exists() for path in markers) and run.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert all(path.exists() for path in markers), (tmp_path / "preempted.err").read_text()[-3000:]
            pids = {rank: int(path.read_text()) for rank, path in zip(ranks, markers, strict=True)}
            sent = time.monotonic()
            send(run, pids)
            returncode = run.wait(timeout=300)
            seconds = time.monotonic() - sent
        finally:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
    result = Preempted(run.args, returncode, (tmp_path / "preempted.out").read_text(),
                       (tmp_path / "preempted.err").read_text())
    result.pids, result.seconds = pids, seconds
    print(f"SIGTERM to exit: {seconds:.1f} s")  # the grace period this save needed (README, Reliability)
    return result


def to_groups(run, pids):  # what Slurm does (every process of the job step), here each rank's process group
    for pid in pids.values():
        os.killpg(pid, signal.SIGTERM)


def to_launcher(run, pids):  # torchrun forwards it to each rank's process group
    os.kill(run.pid, signal.SIGTERM)


def resume(launcher: list[str], args: list[str], checkpoint: str) -> None:
    resumed = subprocess.run([*launcher, str(FAULT_PROBE), *args], capture_output=True, text=True, cwd=REPO,
                             env=probe_env(), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from {checkpoint}" in resumed.stderr


def assert_resumed_as_never_stopped(output_dir, reference_dir):
    assert losses(output_dir) == pytest.approx(losses(reference_dir), rel=1e-4)
    assert len(losses(output_dir)) == 6
    final, expected = load_file(output_dir / "model.safetensors"), load_file(reference_dir / "model.safetensors")
    for name, tensor in expected.items():
        torch.testing.assert_close(final[name], tensor, atol=1e-5, rtol=1e-4, msg=name)


def assert_stopped_with_checkpoint(result: Preempted, output_dir, step: int, returncode: int) -> None:
    assert result.returncode == returncode, result.stderr[-3000:]
    assert "is killed by signal" not in result.stderr  # no DataLoader worker died of the signal
    assert f"SIGTERM received: saving a checkpoint at step {step}" in result.stderr
    assert last_complete_checkpoint(str(output_dir)) == str(output_dir / f"checkpoint-{step}")
    assert not (output_dir / "model.safetensors").exists()  # no final model from a stopped run
    assert not wait_until_gone(list(result.pids.values()))  # no DataLoader worker outlives its process


# Each case signals the processes as a scheduler does, with DataLoader workers that get the signal too.
# torchrun reports a rank's exit 143 as its failure, 1; a launcher that got the signal exits 143 itself.
CASES = {
    "one process, its process group, 2 workers": (1, [0], to_groups, 2, 143),
    "one process, its process group, no workers": (1, [0], to_groups, 0, 143),
    # rank 0 learns of the signal from the per-step all-reduce
    "two processes, rank 1's process group only, 1 worker": (2, [1], to_groups, 1, 1),
    "two processes, the launcher, 2 workers": (2, [0, 1], to_launcher, 2, 143),
}


@pytest.fixture(scope="module")
def never_stopped(small_digits_dir, random_teacher_dir, tmp_path_factory):
    """The run each case stops and resumes, trained here once without a stop: 6 steps of 8 on one process."""
    output_dir = tmp_path_factory.mktemp("never_stopped") / "reference"
    main(tiny_run_args(small_digits_dir, random_teacher_dir, output_dir, *COMMON))
    return output_dir


@pytest.mark.parametrize("case", CASES)
@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_at_the_current_step_and_last_resumes_from_it(small_digits_dir,
                                                                                   random_teacher_dir, never_stopped,
                                                                                   tmp_path, case):
    processes, ranks, send, num_workers, returncode = CASES[case]

    args = workers(tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path / "out", *COMMON), num_workers)
    launcher = [sys.executable] if processes == 1 else two_processes()
    if processes == 2:
        args = half_batches(args)
    result = preempt(launcher, args, tmp_path, send, ranks, step=3)
    assert_stopped_with_checkpoint(result, tmp_path / "out", 3, returncode)
    rng_files = sorted(path.name for path in (tmp_path / "out" / "checkpoint-3").glob("rng_state*"))
    assert rng_files == (["rng_state.pth"] if processes == 1 else ["rng_state_0.pth", "rng_state_1.pth"])

    resume(launcher, args, str(tmp_path / "out" / "checkpoint-3"))
    assert_resumed_as_never_stopped(tmp_path / "out", never_stopped)


@pytest.mark.slow
def test_sigterms_while_a_checkpoint_is_written_leave_it_whole_and_workers_end_with_a_sigkilled_run(
        small_digits_dir, tmp_path):
    """A streamed run with 2 DataLoader workers for training and for evaluation (persistent, alive all along)."""
    args = workers(tiny_run_args(small_digits_dir, None, tmp_path / "out", "--streaming", "true",
                                 "--distillation_type", "none", "--max_steps", "6", "--logging_steps", "1",
                                 "--save_strategy", "steps", "--save_steps", "2", "--eval_strategy", "steps",
                                 "--eval_steps", "1", "--resume_from_checkpoint", "last"), 2)

    def twice_to_the_group(run, pids):  # the second SIGTERM changes nothing
        for _ in range(2):
            os.killpg(run.pid, signal.SIGTERM)

    result = preempt([sys.executable], args, tmp_path, twice_to_the_group, [0], step=2, PREEMPT_IN="save")
    assert_stopped_with_checkpoint(result, tmp_path / "out", 3, 143)  # the save went on; the next step stopped
    checkpoint = str(tmp_path / "out" / "checkpoint-2")  # the one being written when the signals came
    assert not missing_parts(checkpoint) and not damaged_files(checkpoint)
    assert not list((tmp_path / "out" / STAGING_DIR).iterdir())

    def sigkill(run, pids):  # as a scheduler does once its grace period is over
        os.kill(pids[0], signal.SIGKILL)

    (tmp_path / "killed").mkdir()
    killed = preempt([sys.executable], args, tmp_path / "killed", sigkill, [0], step=4, PREEMPT_IN="save")
    assert killed.returncode == -signal.SIGKILL
    assert "Resuming from" in killed.stderr and "checkpoint-3" in killed.stderr
    assert not wait_until_gone([killed.pids[0]])  # its DataLoader workers noticed and exited
    assert last_complete_checkpoint(str(tmp_path / "out")) == str(tmp_path / "out" / "checkpoint-3")


class Pids(torch.utils.data.Dataset):
    def __len__(self):
        return 100

    def __getitem__(self, index):
        return os.getpid()


def test_a_worker_ignores_a_sigterm_from_another_process_and_exits_on_its_parents(tmp_path):
    marker = tmp_path / "initialised"
    loader = ignore_sigterm_in_workers(torch.utils.data.DataLoader(
        Pids(), batch_size=1, num_workers=1, worker_init_fn=lambda worker_id: marker.write_text(str(worker_id))))
    iterator = iter(loader)
    worker = int(next(iterator))
    assert marker.read_text() == "0"  # the loader's own worker_init_fn ran too
    subprocess.run(["kill", "-TERM", str(worker)], check=True)  # from another process, as a scheduler sends it
    # beyond the 2 batches it had ready: made after the signal was delivered
    assert [int(next(iterator)) for _ in range(10)] == [worker] * 10
    os.kill(worker, signal.SIGTERM)  # from its parent, as the DataLoader (or multiprocessing at exit) stops it
    deadline = time.monotonic() + 60  # what it waits for: the worker's exit
    while alive(worker):
        assert time.monotonic() < deadline, "the worker ignored its parent's SIGTERM"
        time.sleep(0.1)
    del iterator
