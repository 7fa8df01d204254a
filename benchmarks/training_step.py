"""Hard-distillation training step: `DistillationTrainer` vs facebookresearch/deit's loop and timm's own task.

Three contenders train the same DeiT-Ti⚗ student (timm's initialisation, converted to deit_hf for the Trainer) with
the same frozen convnet teacher (the same weights), on the same pre-made batches, with the recipe's Mixup/CutMix
(smoothing 0.1), hard distillation (alpha 0.5), drop path 0.1 and AdamW (lr 5e-4 x batch / 512, weight decay 0.05
without decay on norms, biases and tokens). None clips gradients: the recipe does not.

- `DistillationTrainer`: its real loop, `trainer.train()`.
- the facebookresearch-style loop: `engine.py`'s `train_one_epoch` with `losses.DistillationLoss` (hard).
- timm's `TokenDistillationTask`, built and stepped as timm's `train.py` does for `--kd-distill-type token
  --kd-token-distill-type hard --task-loss-weight 0.5 --opt adamw --no-prefetcher` with mixup on: the task wraps the
  teacher in `DistillationTeacher` (which renormalises the input from the student's `pretrained_cfg` mean/std to the
  teacher's when they differ; for these two timm models they are the same, and it compares them on every step),
  `SoftTargetCrossEntropy` for the class head, `create_optimizer_v2` AdamW on the student, timm `Mixup` in the step,
  and `loss.item()` after the optimizer step (train.py's loss meter). What differs unavoidably: train.py builds the
  teacher from a name with pretrained weights (here the module is handed over, so both sides have the same random
  weights); with its default prefetcher, train.py mixes in the DataLoader's collate (`FastCollateMixup`, uint8 in
  the workers), outside the step, while pre-made float batches are the `--no-prefetcher` path, where Mixup runs in
  the step as for the other two; and its per-update `lr_scheduler.step_update` is left out, as in the loop (the
  Trainer keeps its constant schedule's step: a few Python operations).

With `torch_compile`, the Trainer runs with `TrainingArguments(torch_compile=True)` (student and teacher compiled)
and timm's task after `task.compile()` (student and teacher, as train.py's `--torchcompile`); facebookresearch/deit
has no compile switch, so the loop is left out.

How steps are timed, like with like: the Trainer runs its real loop, `trainer.train()`, over an in-memory dataset,
and a callback times each step from `on_step_begin` to `on_step_end`: mixup, teacher, student, loss, backward,
optimizer step, scheduler step and zero_grad, not the data loading before it. The hand-written loop times the same
span of each of its steps (mixup to zero_grad, plus engine.py's `loss.item()` check). Rounds of steps alternate
between the two; the first steps of each round are warm-up and dropped; the figure is the median step of the rounds
run while no other process kept the CPU busy (see `benchmarks.keep_quiet_rounds`).

The replay row (`replay`): the Trainer replaying a record of the teacher's targets made in an untimed first round.
Its `ratio_vs_online` is bounded by the teacher's share of the online step: `ratio_bound_flops` counts it in FLOPs,
`ratio_bound_time` in time, (teacher forward + replayed step) / replayed step, the teacher's forward alone (the
Trainer's `Teacher` wrapper, `teacher_forward_ms`) timed in the same rounds; time and FLOP ratios differ where the
teacher's kernels run at another efficiency than the student's training step.

On an accelerator both run under bf16 autocast (the Trainer through `bf16=True`, its teacher under the
accelerator's autocast; the loop as engine.py's `torch.autocast`), the batch is on the device before the timer
starts, and each timed span ends with a device synchronization.

Peak memory is that of a fresh process running one round of one contender, so neither sees the other's: peak RSS
on a CPU, `max_memory_allocated` on an accelerator. Achieved GFLOP/s = the FLOPs of one step (counted by
`torch.utils.flop_counter.FlopCounterMode`: teacher forward, student forward and backward) / the median step time;
MFU = that over the FLOP/s of a large dense matmul in the same dtype on the same device (`matmul_peak_flops`).
"""

import dataclasses
import functools
import multiprocessing
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.flop_counter import FlopCounterMode
from transformers import PrinterCallback, TrainerCallback, TrainingArguments, set_seed

from deit_hf import DeiTForImageClassificationWithTeacher
from deit_hf.convert import convert_timm_model
from training.args import AugmentationArguments
from training.collator import DistillationCollator
from training.teacher.model import load_teacher
from training.teacher.store import TeacherRecord
from training.teacher.targets import OnlineTeacher, RecordedTeacher
from training.trainer import DistillationTrainer
from training.transforms import BatchTransform, build_mixup

from . import (
    DTYPE_NAMES,
    Measurement,
    autocast,
    keep_quiet_rounds,
    matmul_peak_flops,
    peak_rss_mib,
    rotating_orders,
    synchronize,
)
from .reference import HandWrittenLoop, StepLoop, TimmTaskLoop

TRAINER, HAND_WRITTEN, TIMM_TASK = "DistillationTrainer", "facebookresearch-style loop", "timm TokenDistillationTask"
REPLAY = "DistillationTrainer, replayed teacher targets"
TEACHER_FORWARD = "the Trainer's teacher alone"  # timed in the same rounds as the replay row, not a row of its own


@dataclass(frozen=True)
class TrainSettings:
    """What is trained and how long; picklable, so a fresh process can rebuild the same contender."""

    student: str = "deit_tiny_distilled_patch16_224"
    teacher: str = "regnety_002"
    image_size: int = 64
    patch_size: int = 16
    num_labels: int = 100
    batch_size: int = 32
    drop_path_rate: float = 0.1
    alpha: float = 0.5
    steps_per_round: int = 8
    warmup_steps: int = 2  # dropped at the start of each round
    rounds: int = 3
    busy_retries: int | None = None  # see `benchmarks.keep_quiet_rounds`
    peak_repeats: int = 10  # timed products of the matmul peak MFU is measured against (`matmul_peak_flops`)
    device: str = "cpu"
    dtype: torch.dtype = torch.float32  # bf16 = autocast
    torch_compile: bool = False  # compile student and teacher (the Trainer's and timm's); the loop is then left out
    replay: bool = False  # add the Trainer replaying a record of the teacher's targets (`--teacher_cache`)

    @property
    def learning_rate(self) -> float:
        return 5e-4 * self.batch_size / 512  # the recipe's linear scaling rule

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch every step trains on, on the host."""
        generator = torch.Generator().manual_seed(0)
        pixel_values = torch.randn(self.batch_size, 3, self.image_size, self.image_size, generator=generator)
        return pixel_values, torch.randint(0, self.num_labels, (self.batch_size,), generator=generator)

    def aug_args(self) -> AugmentationArguments:
        return AugmentationArguments(input_size=self.image_size)  # the recipe's mixup, cutmix and smoothing

    @property
    def contenders(self) -> tuple[str, ...]:
        contenders = (TRAINER, TIMM_TASK) if self.torch_compile else (TRAINER, HAND_WRITTEN, TIMM_TASK)
        return (*contenders, REPLAY) if self.replay else contenders


def _timm_student(settings: TrainSettings) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        settings.student,
        pretrained=False,
        img_size=settings.image_size,
        patch_size=settings.patch_size,
        num_classes=settings.num_labels,
        drop_path_rate=settings.drop_path_rate,
    )


def _deit_hf_student(settings: TrainSettings) -> DeiTForImageClassificationWithTeacher:
    student, _ = convert_timm_model(
        _timm_student(settings), drop_path_rate=settings.drop_path_rate, distillation_alpha=settings.alpha
    )
    return student


def _teacher(settings: TrainSettings):
    torch.manual_seed(1)
    return load_teacher(
        settings.teacher,
        num_labels=settings.num_labels,
        student_mean=IMAGENET_DEFAULT_MEAN,
        student_std=IMAGENET_DEFAULT_STD,
        pretrained=False,  # random weights: speed does not depend on them, and nothing is downloaded
    )


def _peer_teacher(settings: TrainSettings) -> torch.nn.Module:
    # The same weights as the Trainer's teacher, without its wrapper, contiguous as the peers leave a convnet.
    teacher = _teacher(settings).model
    return teacher.to(settings.device, memory_format=torch.contiguous_format).eval()


class TeacherForward(StepLoop):
    """The Trainer's teacher (`training.teacher.model.Teacher`, as `OnlineTeacher` runs it) alone on the batch: the time
    replaying saves per step, measured beside the FLOPs."""

    def __init__(self, settings: TrainSettings):
        self.settings = settings
        self.teacher = _teacher(settings).to(settings.device)

    def step(self, samples: torch.Tensor, targets: torch.Tensor) -> None:
        with autocast(self.settings.device, self.settings.dtype):
            self.teacher(samples)


class _StepTimer(TrainerCallback):
    def __init__(self, device: str):
        self.device = device
        self.seconds: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        synchronize(self.device)  # the batch's copy to the device is done, as in the loop
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        synchronize(self.device)
        self.seconds.append(time.perf_counter() - self._start)


class TrainerLoop:
    """`DistillationTrainer.train()` over an in-memory dataset of the same batch, timed step by step."""

    def __init__(self, settings: TrainSettings, output_dir: str, replay: bool = False):
        self.settings, self.replay = settings, replay
        pixel_values, labels = settings.batch()
        dataset = [
            {"pixel_values": pixel, "labels": label.item()} for pixel, label in zip(pixel_values, labels, strict=True)
        ]
        self.timer = _StepTimer(settings.device)
        args = TrainingArguments(
            output_dir=output_dir,
            per_device_train_batch_size=settings.batch_size,
            max_steps=settings.steps_per_round,
            learning_rate=settings.learning_rate,
            weight_decay=0.05,
            adam_epsilon=1e-8,
            lr_scheduler_type="constant",
            max_grad_norm=0.0,  # facebookresearch/deit does not clip by default
            logging_nan_inf_filter=False,  # as `training.train` sets it: no host synchronization per step
            logging_strategy="no",
            save_strategy="no",
            report_to="none",
            use_cpu=settings.device == "cpu",
            bf16=settings.dtype == torch.bfloat16,
            torch_compile=settings.torch_compile,
            dataloader_num_workers=0,
            remove_unused_columns=False,
            disable_tqdm=True,
        )
        self.trainer = DistillationTrainer(
            model=_deit_hf_student(settings),
            args=args,
            train_dataset=dataset * settings.steps_per_round,
            data_collator=DistillationCollator(),
            teacher_targets=(
                self._replayed_targets(settings, output_dir) if replay else OnlineTeacher(_teacher(settings))
            ),
            batch_transform=BatchTransform(mixup=build_mixup(settings.aug_args(), settings.num_labels)),
            callbacks=[self.timer],
        )
        self.trainer.remove_callback(PrinterCallback)  # it prints each round's metrics amid the JSON lines
        if replay:  # one untimed round records the teacher's targets; the timed ones replay them without it
            self.run_round()
            self.trainer.teacher_targets.teacher = None

    @staticmethod
    def _replayed_targets(settings: TrainSettings, output_dir: str) -> RecordedTeacher:
        record = TeacherRecord(tempfile.mkdtemp(dir=output_dir), {"benchmark": repr(settings)})
        return RecordedTeacher(record, settings.num_labels, "hard", 0, _teacher(settings))

    def run_round(self) -> list[float]:
        self.timer.seconds = []
        if self.replay:
            set_seed(0)  # every round draws the recorded round's Mixup/CutMix and drop paths: the same views
        self.trainer.train()
        return self.timer.seconds


def _build(contender: str, settings: TrainSettings, output_dir: str):
    if contender in (TRAINER, REPLAY):
        return TrainerLoop(settings, output_dir, replay=contender == REPLAY)
    return {HAND_WRITTEN: HandWrittenLoop, TIMM_TASK: TimmTaskLoop}[contender](
        settings, _timm_student(settings), _peer_teacher(settings)
    )


def _peak_memory_of_one_round(contender: str, settings: TrainSettings, threads: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    after_imports = peak_rss_mib()
    with tempfile.TemporaryDirectory() as output_dir:
        _build(contender, settings, output_dir).run_round()
    if settings.device == "cpu":
        peak = peak_rss_mib()
        return {"peak_rss_mib": peak, "peak_rss_above_imports_mib": peak - after_imports}
    return {"peak_device_memory_mib": torch.accelerator.max_memory_allocated() / 2**20}


def peak_memory_in_fresh_process(contender: str, settings: TrainSettings) -> dict[str, float]:
    """Peak memory (MiB) of a new interpreter that builds `contender` and trains one round.

    On a CPU, its peak RSS and that peak less the peak before building anything (what importing torch,
    transformers, timm and the project costs, the same for both); on an accelerator, its peak allocated memory.
    A contender is measured once per settings: the replay run's peers, where they train as in the run before it
    (only the replay row reads `replay`), reuse that run's figures rather than start an interpreter again.
    """
    if contender != REPLAY:
        settings = dataclasses.replace(settings, replay=False)
    return dict(_peak_memory_in_fresh_process(contender, settings, torch.get_num_threads()))


@functools.cache
def _peak_memory_in_fresh_process(contender: str, settings: TrainSettings, threads: int) -> dict[str, float]:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_peak_memory_of_one_round, (contender, settings, threads))


def step_flops(settings: TrainSettings) -> tuple[int, int]:
    """FLOPs of one step: the teacher's forward, and the student's forward and backward (eager attention, so its
    matmuls count)."""
    student = _deit_hf_student(settings).to(settings.device)
    student.set_attn_implementation("eager")  # the CPU sdpa kernel has no FLOP formula in FlopCounterMode
    teacher = _teacher(settings).to(settings.device)
    pixel_values, labels = (tensor.to(settings.device) for tensor in settings.batch())
    with FlopCounterMode(display=False) as teacher_counter:
        teacher_logits = teacher(pixel_values)
    with FlopCounterMode(display=False) as student_counter:
        student(pixel_values, labels=labels, teacher_logits=teacher_logits).loss.backward()
    return teacher_counter.get_total_flops(), student_counter.get_total_flops()


def run(settings: TrainSettings = TrainSettings(), measure_memory: bool = True) -> Iterator[Measurement]:
    """Yield img/s, achieved GFLOP/s, MFU and peak memory of each contender; the Trainer's row has its ratios."""
    if settings.steps_per_round <= settings.warmup_steps:
        raise ValueError(
            f"steps_per_round ({settings.steps_per_round}) must exceed warmup_steps ({settings.warmup_steps})."
        )
    teacher_flops, student_flops = step_flops(settings)
    flops = teacher_flops + student_flops
    peak_flops = matmul_peak_flops(settings.device, settings.dtype, settings.peak_repeats)
    with tempfile.TemporaryDirectory() as output_dir:
        loops = {name: _build(name, settings, output_dir) for name in settings.contenders}
        if settings.replay:
            loops[TEACHER_FORWARD] = TeacherForward(settings)
        orders = rotating_orders(loops)

        def run_round() -> dict[str, list[float]]:
            return {name: loops[name].run_round()[settings.warmup_steps :] for name in next(orders)}

        timing = keep_quiet_rounds(run_round, settings.rounds, settings.busy_retries)
    case = (
        f"{settings.student} student {settings.image_size}px/patch{settings.patch_size} + {settings.teacher} teacher,"
        f" hard, bs{settings.batch_size} {DTYPE_NAMES[settings.dtype]}{' compiled' if settings.torch_compile else ''}"
        f" on {settings.device} (matmul peak {peak_flops / 1e9:,.0f} GFLOP/s; teacher/student step FLOP ratio "
        f"{teacher_flops / student_flops:.2f})"
    )
    peers = {HAND_WRITTEN: "ratio_vs_loop", TIMM_TASK: "ratio_vs_timm_task"}
    for name in settings.contenders:
        seconds = timing.seconds[name]
        computed = student_flops if name == REPLAY else flops  # replay runs no teacher
        extra = {
            "gflop_per_image": computed / settings.batch_size / 1e9,
            "achieved_gflop_per_s": computed / seconds / 1e9,
            "mfu": computed / seconds / peak_flops,
        }
        if measure_memory:
            extra.update(peak_memory_in_fresh_process(name, settings))
        if name == TRAINER:
            extra.update({column: timing.seconds[peer] / seconds for peer, column in peers.items() if peer in loops})
        if name == REPLAY:  # the speed-up of replaying over the online teacher and over timm's task
            teacher_seconds = timing.seconds[TEACHER_FORWARD]
            extra.update({
                "ratio_vs_online": timing.seconds[TRAINER] / seconds,
                "ratio_vs_timm_task": timing.seconds[TIMM_TASK] / seconds,
                # what the speed-up over the online Trainer can reach: by FLOPs, and by the measured times
                "ratio_bound_flops": flops / student_flops,
                "ratio_bound_time": (teacher_seconds + seconds) / seconds,
                "teacher_forward_ms": teacher_seconds * 1e3,
            })
        yield timing.measurement("train", case, name, settings.batch_size, **extra)
