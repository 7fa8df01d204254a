"""One teacher, three students on three layouts: the wall time of a sweep with the teacher online in every run, against
the teacher's targets recorded once on 2 processes and replayed by each student (`--teacher_cache`).

The paper trains DeiT-Ti, S and B from one RegNetY-16GF teacher. Here three tiny analogues of them (depth 4, MLP 4x,
hidden 32 / 64 / 128 with 2 / 4 / 8 heads: each step costs ~3.5x the one before, as Ti -> S -> B do) are trained
one after the other on scikit-learn's digits (`training.digits`, saved with `save_to_disk`), with the recipe's
defaults (RandAugment, random erasing, Mixup/CutMix, repeated augmentation, drop path, hard distillation), the same
seed and a random-init timm convnet teacher saved once to safetensors (only time is measured, so the teacher check
is off). The teacher is picked so that its forward costs about one step of the S analogue, as RegNetY-16GF's costs
about one DeiT-S⚗ step (FLOP ratios in the table's title):

The global batch (`batch_size`) is the same for every run, on three layouts (`LAYOUTS`), in mix groups of half of it
(the recording layout's per-device batch): Ti on 2 processes x half of it (`accelerate launch`, gloo on the CPU), S on
1 process x half with accumulation 2, B on 1 process x all of it.

- *online teacher, each run*: the three students' `training.train`, each run loading and running the teacher;
- *record once + replay*: `training.record_teacher` on 2 processes (the teacher alone over the same views), then the
  three students' `training.train --teacher_cache DIR`, none of which loads the teacher.

The one-process runs run in this process, the two-process ones are launched (their start and imports timed with
them, on both sides); each is timed whole: dataset loading, model building, training, saving (what only this
process's first run pays is left out by one untimed one-step run first). A round runs each side once,
the order alternating. The replay row's `ratio_vs_online` is the sweep's speed-up; `ratio_bound_flops` is what FLOPs
allow (the three online runs' teacher and student FLOPs over one teacher pass plus the students'). Every round also
checks the point of the record: each replayed student's per-step training losses equal its online run's on its own
layout (hard distillation replays the teacher's class), and a replaying run that built a teacher is an error.
DataLoader workers: none (the digits' augmentation is light; the machine's cores go to torch).
"""

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode

import training.record_teacher
import training.train
from deit_hf import DeiTConfig, DeiTForImageClassificationWithTeacher
from training.digits import DIGIT_NAMES, load_digits_dataset

from . import DTYPE_NAMES, ForeignCpu, Measurement, keep_quiet_rounds, rotating_orders

ONLINE, REPLAY = "online teacher, each run", "record once + replay"
RECORD_PASS = "teacher pass (training.record_teacher)"
PRESET = "deit-tiny-distilled-patch16-224"
# (hidden size, heads) of the analogues of DeiT-Ti, S and B: head size 16, like the paper's 64 scaled down
STUDENTS = {"Ti": (32, 2), "S": (64, 4), "B": (128, 8)}
# Each student's layout of the global batch: (processes, share of the global batch per device, accumulation).
LAYOUTS = {"Ti": (2, 2, 1), "S": (1, 2, 2), "B": (1, 1, 1)}
RECORD_LAYOUT = (2, 2, 1)
NUM_LABELS = len(DIGIT_NAMES)


@dataclass(frozen=True)
class SweepSettings:
    """The students, the teacher, the data and how often the sweep runs."""

    teacher: str = "regnety_006"  # at 64 px: 1.06x the S analogue's step FLOPs (RegNetY-16GF / DeiT-S⚗: ~1.15)
    input_size: int = 64
    patch_size: int = 8
    depth: int = 4
    batch_size: int = 64
    epochs: int = 2
    train_samples: int | None = None  # None: all 1,437 training digits
    rounds: int = 2
    busy_retries: int | None = None  # see `benchmarks.keep_quiet_rounds`
    device: str = "cpu"
    dtype: torch.dtype = torch.float32  # bf16: `--bf16 true`

    def student_overrides(self, hidden: int, heads: int) -> str:
        return (f"patch_size={self.patch_size},hidden_size={hidden},num_hidden_layers={self.depth},"
                f"num_attention_heads={heads},intermediate_size={4 * hidden}")

    def student_config(self, hidden: int, heads: int) -> DeiTConfig:
        return DeiTConfig.from_preset(
            PRESET, image_size=self.input_size, patch_size=self.patch_size, hidden_size=hidden,
            num_hidden_layers=self.depth, num_attention_heads=heads, intermediate_size=4 * hidden,
            num_labels=NUM_LABELS,
        )


def common_args(settings: SweepSettings, dataset: Path, teacher: Path, output_dir: str) -> list[str]:
    """`training.train` flags shared by every run of the sweep (the students add theirs)."""
    return [
        "--dataset_name", str(dataset), "--input_size", str(settings.input_size),
        "--teacher_model", settings.teacher, "--teacher_checkpoint", str(teacher), "--teacher_check_batches", "0",
        "--model_preset", PRESET, "--mix_group_size", str(settings.batch_size // 2),
        "--num_train_epochs", str(settings.epochs), "--dataloader_num_workers", "0",
        *(["--max_train_samples", str(settings.train_samples)] if settings.train_samples else []),
        "--logging_steps", "1", "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none",
        "--disable_tqdm", "true", "--use_cpu", str(settings.device == "cpu").lower(),
        "--bf16", str(settings.dtype == torch.bfloat16).lower(), "--output_dir", output_dir,
    ]


def step_flops_per_image(settings: SweepSettings) -> tuple[int, dict[str, int]]:
    """FLOPs per image: the teacher's forward, and each student's forward and backward (eager attention)."""
    teacher = timm.create_model(settings.teacher, pretrained=False, num_classes=NUM_LABELS).eval()
    pixel_values = torch.randn(1, 3, settings.input_size, settings.input_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        teacher(pixel_values)
    teacher_flops, student_flops = counter.get_total_flops(), {}
    for name, (hidden, heads) in STUDENTS.items():
        student = DeiTForImageClassificationWithTeacher(settings.student_config(hidden, heads))
        student.set_attn_implementation("eager")  # the CPU sdpa kernel has no FLOP formula in FlopCounterMode
        with FlopCounterMode(display=False) as counter:
            student(pixel_values, labels=torch.tensor([0]), teacher_logits=torch.randn(1, NUM_LABELS)).loss.backward()
        student_flops[name] = counter.get_total_flops()
    return teacher_flops, student_flops


def layout_args(settings: SweepSettings, layout: tuple[int, int, int]) -> list[str]:
    _, share, accumulation = layout
    return ["--per_device_train_batch_size", str(settings.batch_size // share),
            "--gradient_accumulation_steps", str(accumulation)]


def _timed(entry_point, argv: list[str]):
    threads = torch.get_num_threads()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # `main` prints its metrics: stdout is for the JSON lines
            result = entry_point(argv)
    finally:
        torch.set_num_threads(threads)  # `training.train` gives its process all cores
    return time.perf_counter() - start, result


def _launched(settings: SweepSettings, module: str, argv: list[str]) -> tuple[float, str]:
    """`module` on 2 processes (`accelerate launch`; gloo on the CPU): (seconds, its log)."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(port), "-m", module, *argv]
    cpu = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // 2))}
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=3600,
                            env={**os.environ, **(cpu if settings.device == "cpu" else {})})
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{module} on 2 processes failed: {result.stderr.strip().splitlines()[-1:]}")
    return seconds, result.stderr


def _losses(log_history: list[dict]) -> list[float]:
    return [entry["loss"] for entry in log_history if "loss" in entry]


def sweep(settings: SweepSettings, common: Callable[[str], list[str]], work: str,
          record: str | None) -> tuple[dict[str, float], dict]:
    """Train the three students one after the other, each on its layout (replaying `record`, after recording it on 2
    processes, when given), under `work`: (seconds of each part, each student's per-step losses). `common(output_dir)`:
    the flags of every run."""
    seconds, losses = {}, {}
    cache = ["--teacher_cache", record] if record else []

    def student(name: str, layout: tuple[int, int, int]) -> list[str]:
        return [*common(os.path.join(work, name)), "--config_overrides", settings.student_overrides(*STUDENTS[name]),
                *layout_args(settings, layout), *cache]

    if record is not None:  # the record does not depend on the student: the pass builds the first one, unused
        seconds[RECORD_PASS], _ = _launched(settings, "training.record_teacher", student("Ti", RECORD_LAYOUT))
    for name, layout in LAYOUTS.items():
        if layout[0] == 2:
            seconds[name], log = _launched(settings, "training.train", student(name, layout))
            replayed = "teacher not loaded" in log
            state = json.loads(Path(work, name, "trainer_state.json").read_text())["log_history"]
        else:
            seconds[name], trainer = _timed(training.train.main, student(name, layout))
            replayed, state = trainer.teacher is None, trainer.state.log_history
        if record is not None and not replayed:
            raise RuntimeError(f"The {name} student's run loaded the teacher instead of replaying {record}.")
        losses[name] = _losses(state)
    return seconds, losses


def check_same_losses(online: dict[str, list[float]], replayed: dict[str, list[float]]) -> None:
    """Each student's replayed per-step losses must be its online run's: the record's exactness is the point."""
    for name, expected in online.items():
        if replayed[name] != expected or not expected:
            pairs = zip(expected, replayed[name], strict=False)  # the shorter one's length
            step = next((i for i, (online_loss, replayed_loss) in enumerate(pairs) if online_loss != replayed_loss),
                        min(len(expected), len(replayed[name])))
            raise RuntimeError(
                f"The {name} student's replayed losses differ from its online run's (first at step {step}: "
                f"{len(replayed[name])} replayed, {len(expected)} online): the record did not replay the teacher."
            )


def run(directory: str | os.PathLike, settings: SweepSettings = SweepSettings()) -> Iterator[Measurement]:
    """Yield the wall time of the sweep online and recorded + replayed; the replay row carries the speed-up."""
    if settings.device != "cpu" and torch.cuda.device_count() < 2:
        raise RuntimeError("The teacher sweep trains on 2 processes: on an accelerator it needs 2 of them.")
    if settings.batch_size % 2:
        raise ValueError(f"The sweep's global batch {settings.batch_size} must halve over 2 processes.")
    directory = Path(directory)
    dataset, teacher = directory / "digits", directory / "teacher.safetensors"
    digits = load_digits_dataset(settings.input_size)
    digits.save_to_disk(str(dataset))
    train_size = min(settings.train_samples or len(digits["train"]), len(digits["train"]))
    torch.manual_seed(1)
    save_file(timm.create_model(settings.teacher, pretrained=False, num_classes=NUM_LABELS).state_dict(), str(teacher))
    with tempfile.TemporaryDirectory(dir=directory) as work:  # untimed: what a process's first run alone pays
        _timed(training.train.main, [*common_args(settings, dataset, teacher, work),
                                     *layout_args(settings, LAYOUTS["B"]), "--max_steps", "1"])
    orders = rotating_orders((ONLINE, REPLAY))
    steps: list[int] = []

    def run_round() -> tuple[dict[str, list[float]], float]:
        parts, losses, foreign = {}, {}, 0.0
        for name in next(orders):
            with tempfile.TemporaryDirectory(dir=directory) as work, ForeignCpu(include_children=True) as cpu:
                parts[name], losses[name] = sweep(
                    settings, lambda output_dir: common_args(settings, dataset, teacher, output_dir), work,
                    os.path.join(work, "record") if name == REPLAY else None,
                )
            foreign = max(foreign, cpu.cores)
        check_same_losses(losses[ONLINE], losses[REPLAY])
        steps[:] = [len(student_losses) for student_losses in losses[ONLINE].values()]
        samples = {name: [sum(parts[name].values())] for name in (ONLINE, REPLAY)}
        samples.update({f"{name}: {part}": [seconds] for name in parts for part, seconds in parts[name].items()})
        return samples, foreign

    timing = keep_quiet_rounds(run_round, settings.rounds, settings.busy_retries, reports_foreign_cores=True)
    teacher_flops, student_flops = step_flops_per_image(settings)
    online_flops = sum(student_flops.values()) + len(STUDENTS) * teacher_flops
    ratios = "/".join(f"{teacher_flops / flops:.2f}" for flops in student_flops.values())
    case = (
        f"{'/'.join(STUDENTS)} analogues (hidden {'/'.join(str(h) for h, _ in STUDENTS.values())}, depth "
        f"{settings.depth}, patch {settings.patch_size}) + {settings.teacher} teacher, digits {settings.input_size}px, "
        f"{train_size} images x {settings.epochs} epoch(s), global batch {settings.batch_size} in mix groups of "
        f"{settings.batch_size // 2}, Ti on 2 processes, S on 1 with accumulation 2, B on 1 (recorded on 2), "
        f"{DTYPE_NAMES[settings.dtype]} on {settings.device}; teacher forward / student step FLOP ratio {ratios} "
        "(the paper's RegNetY-16GF / DeiT-Ti, S, B⚗: 4.1/1.16/0.30)"
    )
    images = sum(steps) * settings.batch_size  # the students' training views (the last batch of an epoch padded)
    for name in (ONLINE, REPLAY):
        extra = {part.split(": ", 1)[1] + "_s": seconds for part, seconds in timing.seconds.items()
                 if part.startswith(f"{name}: ")}
        if name == REPLAY:
            replay_flops = sum(student_flops.values()) + teacher_flops
            extra.update(ratio_vs_online=timing.seconds[ONLINE] / timing.seconds[REPLAY],
                         ratio_bound_flops=online_flops / replay_flops, same_losses_as_online=True)
        yield timing.measurement("teacher_sweep", case, name, images, **extra)
