"""End to end: images per second of `training.train` itself vs the same pipeline built from timm, as its train.py is.

Both train the same student architecture (DeiT⚗ at `input_size`, random init) with the same teacher weights (a
timm convnet saved once to a safetensors file) on the same parquet of real JPEGs (`input_pipeline.write_jpegs`),
with the DeiT recipe's augmentation, Mixup/CutMix, hard distillation (alpha 0.5), AdamW and cosine schedule, the
same number of DataLoader workers and the same torch threads in the training process:

- deit-hf: `training.train.main([...])`, the command-line entry point, on the parquet file: `datasets` reads it,
  the workers decode and augment to uint8, `DistillationTrainer` normalizes, erases and mixes each batch on the
  device, runs the teacher and the student.
- timm: what its `train.py` builds for `--dataset hfds/<dir> --kd-distill-type token --kd-token-distill-type hard
  --task-loss-weight 0.5 --opt adamw --sched cosine` with mixup (its default prefetcher on): `create_dataset` with
  timm's Hugging Face datasets reader on the same parquet (timm reads no parquet file directly; `hfds/` gives the
  directory to `datasets.load_dataset`, whose parquet builder reads the same file), `create_loader` (uint8 in the
  workers, `FastCollateMixup` in their collate, normalize + random erasing in its `PrefetchLoader`),
  `TokenDistillationTask`, `create_optimizer_v2`, `create_scheduler_v2`, and `train_one_epoch`'s step (autocast,
  backward, optimizer step, `loss.item()`, zero_grad, `step_update`).

What differs unavoidably: each side's own defaults (the Trainer's fused AdamW and channels-last teacher; timm's mixing
in the workers' collate rather than on the device), and `training.train` holds out 5 % of the file for validation
(never run here). Repeated augmentation is off on both (a sampler choice, the same work per image; timm's sampler
needs a process group). `training.train` picks the torch threads of its process (cores less workers, at least 1);
the timm side is given the same.

Timing: the first `warmup_steps` steps (workers starting, the first batches, compilation) are dropped; the figure
is `timed_steps` x batch over the wall time from the end of the last warm-up step to the end of the last timed
step, data loading included. A round runs each side once, the order alternating. The workers' CPU time counts as the
run's own when deciding whether other processes kept the machine busy (see `benchmarks.keep_quiet_rounds`).
"""

import contextlib
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file
from timm.data import FastCollateMixup, create_dataset, create_loader, resolve_data_config
from timm.scheduler import create_scheduler_v2
from transformers import TrainerCallback

import training.train
from training.args import AugmentationArguments
from training.build import share_cpu_threads
from training.transforms import zero_bit_posterize

from . import DTYPE_NAMES, ForeignCpu, Measurement, autocast, keep_quiet_rounds, rotating_orders, synchronize
from .input_pipeline import IMAGE_SIZE, NUM_CLASSES, write_jpegs
from .reference import timm_adamw, timm_mixup_args, timm_token_distillation_task

DEIT_HF, TIMM = "deit_hf training.train", "timm pipeline (create_loader + TokenDistillationTask)"
# `training.train` carves this share of a file without a validation split off for evaluation.
HELD_OUT = 0.05


@dataclass(frozen=True)
class EndToEndSettings:
    """The models, data and length of each run; the same on both sides."""

    preset: str = "deit-tiny-distilled-patch16-224"  # deit_hf's name of the student
    timm_student: str = "deit_tiny_distilled_patch16_224"  # timm's name of the same architecture
    teacher: str = "regnety_002"
    input_size: int = 64
    batch_size: int = 32
    workers: int = 2
    warmup_steps: int = 3
    timed_steps: int = 12
    rounds: int = 2
    busy_retries: int | None = None  # see `benchmarks.keep_quiet_rounds`
    alpha: float = 0.5
    drop_path_rate: float = 0.1
    device: str = "cpu"
    dtype: torch.dtype = torch.float32  # bf16 = autocast on both sides
    torch_compile: bool = False  # student and teacher on both sides

    @property
    def steps(self) -> int:
        return self.warmup_steps + self.timed_steps

    @property
    def num_images(self) -> int:
        """Enough JPEGs that neither side reaches the end of an epoch: an epoch boundary would be timed."""
        return math.ceil(self.steps * self.batch_size / (1 - HELD_OUT)) + 1

    @property
    def learning_rate(self) -> float:
        return 5e-4 * self.batch_size / 512  # the recipe's linear scaling rule, as `training.train` derives it


class _TimedWindow:
    """Marks the end of each step; times the span after the warm-up steps and what other processes ran during it."""

    def __init__(self, settings: EndToEndSettings):
        self.settings = settings
        self.steps = 0
        self.seconds: float | None = None
        self.foreign = ForeignCpu(include_children=True)

    def step_done(self) -> None:
        self.steps += 1
        if self.steps in (self.settings.warmup_steps, self.settings.steps):
            synchronize(self.settings.device)  # the queued work of the steps before this mark is done
            now = time.perf_counter()
            if self.steps == self.settings.warmup_steps:
                self.foreign.start()
                self._start = now
            else:
                self.foreign.stop()
                self.seconds = now - self._start


class _StepEnds(TrainerCallback):
    def __init__(self, window: _TimedWindow):
        self.window = window

    def on_step_end(self, args, state, control, **kwargs):
        self.window.step_done()


def _save_teacher(settings: EndToEndSettings, path: Path) -> None:
    torch.manual_seed(1)
    save_file(timm.create_model(settings.teacher, pretrained=False, num_classes=NUM_CLASSES).state_dict(), str(path))


def run_deit_hf(settings: EndToEndSettings, parquet: Path, teacher: Path, output_dir: str) -> _TimedWindow:
    """One `training.train.main` run, with one callback more, marking the end of each step."""
    window = _TimedWindow(settings)
    argv = [
        "--dataset_name", str(parquet), "--cache_dir", str(parquet.parent / "cache"),
        "--teacher_model", settings.teacher, "--teacher_checkpoint", str(teacher), "--teacher_check_batches", "0",
        "--model_preset", settings.preset, "--input_size", str(settings.input_size),
        "--drop_path_rate", str(settings.drop_path_rate), "--distillation_alpha", str(settings.alpha),
        "--per_device_train_batch_size", str(settings.batch_size), "--dataloader_num_workers", str(settings.workers),
        "--max_steps", str(settings.steps), "--repeated_aug", "false", "--eval_strategy", "no",
        "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true", "--output_dir", output_dir,
        "--bf16", str(settings.dtype == torch.bfloat16).lower(), "--torch_compile", str(settings.torch_compile).lower(),
    ]

    with contextlib.redirect_stdout(sys.stderr):  # `main` prints its metrics: stdout is for the JSON lines
        training.train.main(argv, callbacks=[_StepEnds(window)])
    return window


def run_timm(settings: EndToEndSettings, parquet: Path, teacher: Path) -> _TimedWindow:
    """The same run as timm's train.py builds it, stopped after `settings.steps` optimizer steps."""
    window = _TimedWindow(settings)
    device = torch.device(settings.device)
    share_cpu_threads(settings.workers)  # the threads `training.train` gives its process
    aug = AugmentationArguments(input_size=settings.input_size, repeated_aug=False)  # the recipe's defaults
    student = timm.create_model(
        settings.timm_student, pretrained=False, img_size=settings.input_size, num_classes=NUM_CLASSES,
        drop_path_rate=settings.drop_path_rate,
    ).to(device)
    teacher_model = timm.create_model(
        settings.teacher, pretrained=False, num_classes=NUM_CLASSES, checkpoint_path=str(teacher)
    ).to(device)
    task = timm_token_distillation_task(student, teacher_model, settings.alpha, settings.device)
    if settings.torch_compile:
        task.compile()
    dataset = create_dataset(
        f"hfds/{parquet.parent}", root=str(parquet.parent / "timm_cache"), split="train", is_training=True,
        batch_size=settings.batch_size, input_img_mode="RGB",
    )
    data_config = resolve_data_config({"input_size": (3, settings.input_size, settings.input_size)}, model=student)
    with zero_bit_posterize():  # timm's RandAugment crashes on Pillow 13 without it (see BENCHMARKS.md)
        loader = create_loader(
            dataset, input_size=data_config["input_size"], batch_size=settings.batch_size, is_training=True,
            re_prob=aug.reprob, re_mode=aug.remode, re_count=aug.recount, scale=tuple(aug.scale), hflip=aug.hflip,
            color_jitter=aug.color_jitter, auto_augment=aug.auto_augment, interpolation=aug.train_interpolation,
            mean=data_config["mean"], std=data_config["std"], num_workers=settings.workers,
            collate_fn=FastCollateMixup(**timm_mixup_args(aug, NUM_CLASSES)), pin_memory=device.type != "cpu",
            device=device, use_prefetcher=True,
        )
    optimizer = timm_adamw(task.get_trainable_module(), settings.learning_rate)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched="cosine", num_epochs=300, warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5,
        updates_per_epoch=len(loader),
    )
    task.get_trainable_module().train()
    optimizer.zero_grad()
    for step, (input, target) in enumerate(loader, start=1):
        with autocast(device, settings.dtype):
            loss = task(input, target)["loss"]
        loss.backward()
        optimizer.step()
        loss.item()  # train.py's loss meter
        optimizer.zero_grad()
        scheduler.step_update(num_updates=step)
        window.step_done()
        if step == settings.steps:
            break
    return window


def run(directory: str | os.PathLike, settings: EndToEndSettings = EndToEndSettings()) -> Iterator[Measurement]:
    """Yield the img/s of both pipelines after warm-up; deit-hf's row carries its ratio to timm's."""
    if settings.warmup_steps < 1 or settings.timed_steps < 1:
        raise ValueError(f"warmup_steps and timed_steps must be at least 1, got {settings}.")
    directory = Path(directory)
    _, parquet = write_jpegs(directory, settings.num_images)
    teacher = directory / "teacher.safetensors"
    _save_teacher(settings, teacher)
    threads = torch.get_num_threads()
    orders = rotating_orders((DEIT_HF, TIMM))

    def run_round() -> tuple[dict[str, list[float]], float]:
        windows = {}
        for name in next(orders):
            try:
                if name == DEIT_HF:
                    with tempfile.TemporaryDirectory(dir=directory) as output_dir:
                        windows[name] = run_deit_hf(settings, parquet, teacher, output_dir)
                else:
                    windows[name] = run_timm(settings, parquet, teacher)
            finally:
                torch.set_num_threads(threads)
        for name, window in windows.items():
            if window.seconds is None:
                raise RuntimeError(f"{name} stopped after {window.steps} of {settings.steps} steps.")
        samples = {name: [window.seconds / settings.timed_steps] for name, window in windows.items()}
        return samples, max(window.foreign.cores for window in windows.values())

    timing = keep_quiet_rounds(run_round, settings.rounds, settings.busy_retries, reports_foreign_cores=True)
    case = (
        f"{settings.preset} + {settings.teacher} teacher, {settings.input_size}px, bs{settings.batch_size}, "
        f"{settings.workers} workers, {DTYPE_NAMES[settings.dtype]}{' compiled' if settings.torch_compile else ''} "
        f"on {settings.device}, {settings.timed_steps} steps after {settings.warmup_steps}; "
        f"JPEGs {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}"
    )
    for name in (DEIT_HF, TIMM):
        ratio = {"ratio_vs_timm": timing.seconds[TIMM] / timing.seconds[name]} if name == DEIT_HF else {}
        yield timing.measurement("end_to_end", case, name, settings.batch_size, **ratio)
