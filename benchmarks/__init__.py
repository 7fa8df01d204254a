"""Benchmarks of deit-hf side by side with timm, transformers and facebookresearch/deit's training loop.

`python -m benchmarks.run` runs them (see `benchmarks/run.py`); each benchmark module yields `Measurement`s, one JSON
line each. Timing is interleaved: every round runs each contender once in turn, starting one contender later each
round, so slow drifts of the machine and the effect of what ran just before hit all of them alike. On a machine
shared with other work, a round during which other processes kept the CPU busy is dropped and run again: a
two-thread matmul with one core taken runs several times slower, not half as fast. Figures are medians over the
kept rounds. Linux only (`/proc`, glibc).
"""

import contextlib
import ctypes
import ctypes.util
import datetime
import functools
import itertools
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path

import psutil
import timm
import torch
import transformers

# glibc `mallopt` parameters (malloc.h) and the values `hold_freed_memory` sets.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest; bigger blocks are mmapped whatever is set
_TRIM_THRESHOLD_BYTES = 1 << 30
# Rounds during which other processes used more than this many cores on average are dropped.
MAX_FOREIGN_CORES = 0.25
# Busy rounds run again, per wanted round, before giving up on a quiet machine and keeping them all.
BUSY_RETRIES_PER_REPEAT = 3


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def autocast(device: torch.device | str, dtype: torch.dtype) -> torch.autocast:
    """Autocast to `dtype` on `device`'s type; off for float32, the models' own dtype."""
    return torch.autocast(torch.device(device).type, dtype, enabled=dtype != torch.float32)


def synchronize(device: torch.device | str) -> None:
    """Wait for the work queued on an accelerator, so a timer stopped after this covers it (nothing on a CPU)."""
    if torch.device(device).type != "cpu":
        torch.accelerator.synchronize(device)


@functools.cache  # one measurement per process: the training step benchmark's rows (online, replay) share it
def matmul_peak_flops(device: torch.device | str, dtype: torch.dtype, repeats: int = 10) -> float:
    """FLOP/s of a large dense matmul in `dtype`: the peak that MFU is measured against, as achieved, not quoted.

    (A datasheet's peak is not reached by any kernel; e.g. ~790 TFLOP/s measured for bf16 on an H100/H200.)
    """
    # long enough to time, short enough to repeat (a CPU without bf16 units takes ~2 s per bf16 product at 1024)
    size = 1024 if torch.device(device).type == "cpu" else 8192
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    for _ in range(min(2, repeats)):  # warm-up
        a @ b
    synchronize(device)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(seconds)


@dataclass
class Measurement:
    """One contender of one benchmark: its median throughput and whatever else the benchmark records."""

    benchmark: str  # "inference", "train" or "input"
    case: str  # what is measured, e.g. "deit-tiny bs8 fp32"
    contender: str  # who is measured, e.g. "deit_hf sdpa" or "timm"
    images_per_second: float
    seconds_per_call: float  # median over the kept rounds
    repeats: int  # samples the median is taken over
    busy_rounds_dropped: int = 0  # rounds run again because other processes kept the CPU busy
    busy_rounds_kept: int = 0  # busy rounds kept when the machine never went quiet: then the figures are suspect
    extra: dict = field(default_factory=dict)  # benchmark-specific figures (GFLOP/s, peak RSS, ratios)

    def to_dict(self) -> dict:
        record = asdict(self)
        record.update(record.pop("extra"))
        return record


def _busy_cpu_seconds() -> float:
    # First line of /proc/stat: cumulative ticks of all CPUs in user, nice, system, idle, iowait, irq, softirq, steal.
    with open("/proc/stat") as stat:
        ticks = [int(value) for value in stat.readline().split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


class ForeignCpu:
    """Context manager measuring the average number of cores other processes kept busy during its block.

    With `include_children`, the CPU time of this process's child processes counts as its own: of the live ones
    (DataLoader workers), and of those waited for (a launched run).
    """

    cores: float = 0.0

    def __init__(self, include_children: bool = False):
        self.include_children = include_children

    def _own_cpu_seconds(self) -> float:
        own = time.process_time()
        if self.include_children:
            waited = resource.getrusage(resource.RUSAGE_CHILDREN)
            own += waited.ru_utime + waited.ru_stime
            for child in psutil.Process().children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    times = child.cpu_times()
                    own += times.user + times.system
        return own

    def start(self) -> None:
        self._start = (time.perf_counter(), _busy_cpu_seconds(), self._own_cpu_seconds())

    def stop(self) -> None:
        now = (time.perf_counter(), _busy_cpu_seconds(), self._own_cpu_seconds())
        wall, busy, own = (end - start for end, start in zip(now, self._start, strict=True))
        self.cores = max(0.0, busy - own) / wall if wall > 0 else 0.0

    def __enter__(self) -> "ForeignCpu":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


@dataclass
class Timing:
    """What `keep_quiet_rounds` measured: the median seconds per contender, over how many samples, busy rounds."""

    seconds: dict[str, float]
    repeats: int
    busy_rounds_dropped: int
    busy_rounds_kept: int

    def measurement(self, benchmark: str, case: str, contender: str, images_per_call: int, **extra) -> Measurement:
        """The `Measurement` of one contender; `images_per_call` converts its seconds into img/s."""
        seconds = self.seconds[contender]
        return Measurement(
            benchmark, case, contender, images_per_call / seconds, seconds, self.repeats,
            self.busy_rounds_dropped, self.busy_rounds_kept, extra,
        )


def keep_quiet_rounds(
    run_round: Callable[[], dict[str, list[float]]],
    repeats: int,
    busy_retries: int | None = None,
    reports_foreign_cores: bool = False,
) -> Timing:
    """Run `run_round` (contender -> its timed samples) until `repeats` rounds ran on a quiet machine.

    Rounds during which other processes used more than `MAX_FOREIGN_CORES` are dropped and run again, at most
    `busy_retries` times (default `BUSY_RETRIES_PER_REPEAT * repeats`); then all rounds are kept, so the figures
    exist but say the machine was busy. With `reports_foreign_cores`, `run_round` returns `(samples, cores)`, the
    cores other processes used during its timed spans (a `ForeignCpu` of its own), instead of being measured whole.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}.")
    max_rounds = repeats + (BUSY_RETRIES_PER_REPEAT * repeats if busy_retries is None else busy_retries)
    quiet, busy = [], []
    while len(quiet) < repeats and len(quiet) + len(busy) < max_rounds:
        if reports_foreign_cores:
            samples, cores = run_round()
        else:
            with ForeignCpu() as foreign:
                samples = run_round()
            cores = foreign.cores
        (quiet if cores <= MAX_FOREIGN_CORES else busy).append(samples)
    enough = len(quiet) >= repeats
    kept = quiet if enough else quiet + busy
    seconds = {name: statistics.median(sample for round_ in kept for sample in round_[name]) for name in kept[0]}
    samples = sum(len(next(iter(round_.values()))) for round_ in kept)
    return Timing(seconds, samples, len(busy) if enough else 0, 0 if enough else len(busy))


def rotating_orders(names: Iterable[str]) -> Iterator[list[str]]:
    """The contenders' order for each round, each round starting one contender later: a call runs slower or faster
    depending on what ran just before it (caches, the allocator's free lists), and the rotation spreads that over
    all contenders alike."""
    names = list(names)
    for shift in itertools.cycle(range(len(names))):
        yield names[shift:] + names[:shift]


def time_interleaved(
    calls: dict[str, Callable[[], object]], warmup: int, repeats: int, busy_retries: int | None = None
) -> Timing:
    """Median wall-clock seconds of each call over `repeats` quiet rounds, each timing every call once, in turn.

    Each call runs `warmup` times first (torch.compile compiles there, untimed).
    """
    for _ in range(warmup):
        for call in calls.values():
            call()

    orders = rotating_orders(calls)

    def run_round() -> dict[str, list[float]]:
        samples = {}
        for name in next(orders):
            start = time.perf_counter()
            calls[name]()
            samples[name] = [time.perf_counter() - start]
        return samples

    return keep_quiet_rounds(run_round, repeats, busy_retries)


def hold_freed_memory() -> None:
    """Make glibc malloc keep freed memory for reuse instead of handing it back to the kernel after each call.

    With glibc's default, adaptive thresholds, a forward pass's large temporaries (attention scores, MLP
    activations) are often returned to the kernel when freed and faulted in again, zeroed page by page, on the next
    call: measured here up to 66,000 minor page faults per DeiT-Ti batch of 8, 40-80 % more time, and an amount that
    depends on what ran before, so the same model timed in two processes differed by 1.8x. Fixed thresholds end
    that (0 faults per call) for every contender alike; jemalloc or tcmalloc do the same for a real CPU job.
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    mmap_set = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
    if not (mmap_set and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)):
        raise RuntimeError("glibc mallopt refused the thresholds; run with --default-malloc.")


def peak_rss_mib() -> float:
    """The peak resident memory of this process so far, in MiB (`VmHWM` of `/proc/self/status`).

    Not `resource.getrusage(...).ru_maxrss`: Linux carries that figure over from the parent into a forked or
    spawned child, so a child started by a big process reports the parent's peak.
    """
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # reported in kB
    raise RuntimeError("/proc/self/status has no VmHWM line: peak memory is measured on Linux only.")


def machine_description(device: str = "cpu", default_malloc: bool = False) -> dict[str, str]:
    """Accelerator, CPU model, cores, torch threads and allocator, versions and the date: a results section's header."""
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), cpu)
    malloc = "its default adaptive thresholds" if default_malloc else "fixed thresholds (benchmarks.hold_freed_memory)"
    accelerator = ""
    if device != "cpu":
        properties = torch.get_device_module(device).get_device_properties(device)
        accelerator = f"{device}: {properties.name}, {properties.total_memory / 2**30:.0f} GiB; "
    return {
        "device": f"{accelerator}CPU: {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, glibc "
        f"malloc with {malloc}",
        # the input pipeline's libraries too: deit_hf's per-seed training figures changed with them (BENCHMARKS.md,
        # no-teacher baseline) where torch, transformers and timm had not
        "versions": (
            f"torch {torch.__version__}, transformers {transformers.__version__}, timm {timm.__version__}, "
            f"accelerate {version('accelerate')}, datasets {version('datasets')}, numpy {version('numpy')}, "
            f"pillow {version('pillow')}, deit_hf {version('deit-hf')}, python {platform.python_version()}"
        ),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def percent(fraction: float) -> str:
    """A fraction as the tables' percentage, one decimal."""
    return f"{100 * fraction:.1f}"


def machine_line(machine: dict[str, str]) -> str:
    """The tables' first line: the machine, the library versions and the date (`machine_description`)."""
    return f"Machine: {machine['device']}. {machine['versions']}. {machine['date']}."


def record_section(text: str, path: Path, markers: tuple[str, str], heading: str) -> None:
    """Put `text` between `markers` in `path`, or append it under a `## heading` section when they are absent."""
    start_marker, end_marker = markers
    block = f"{start_marker}\n{text}\n{end_marker}"
    current = path.read_text() if path.exists() else ""
    if start_marker in current and end_marker in current:
        before, rest = current.split(start_marker, 1)
        current = before + block + rest.split(end_marker, 1)[1]
    else:
        current = (current.rstrip("\n") + "\n\n" if current.strip() else "") + f"## {heading}\n\n{block}\n"
    path.write_text(current)
