"""The peers' side of the benchmarks, written from facebookresearch/deit and timm's `train.py`: the hard distillation
loss, the recipe's Mixup and AdamW as they build them, and the training steps the training step benchmark times
(`benchmarks.training_step`) against `DistillationTrainer`."""

import math
import time
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.task import TokenDistillationTask

from . import autocast, synchronize

if TYPE_CHECKING:
    from training.args import AugmentationArguments

    from .training_step import TrainSettings


def facebookresearch_hard_distillation_loss(outputs, labels, teacher_logits, alpha: float) -> torch.Tensor:
    """facebookresearch/deit `losses.DistillationLoss` with distillation_type='hard', base SoftTargetCrossEntropy."""
    cls_logits, dist_logits = outputs
    base_loss = SoftTargetCrossEntropy()(cls_logits, labels)
    distillation_loss = F.cross_entropy(dist_logits, teacher_logits.argmax(dim=1))
    return base_loss * (1 - alpha) + distillation_loss * alpha


def timm_mixup_args(aug: "AugmentationArguments", num_classes: int) -> dict:
    """The keyword arguments of timm's `Mixup` / `FastCollateMixup` for the recipe, as train.py builds them."""
    return dict(
        mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, prob=aug.mixup_prob, switch_prob=aug.mixup_switch_prob,
        mode=aug.mixup_mode, label_smoothing=aug.smoothing, num_classes=num_classes,
    )


def timm_token_distillation_task(
    student: torch.nn.Module, teacher: torch.nn.Module, alpha: float, device: str
) -> TokenDistillationTask:
    """timm train.py's task for `--kd-distill-type token --kd-token-distill-type hard --task-loss-weight 1-alpha`
    with mixup on (so `SoftTargetCrossEntropy` on the class head); `teacher` must already be on `device`."""
    return TokenDistillationTask(
        student, teacher, criterion=SoftTargetCrossEntropy(), distill_type="hard", task_loss_weight=1 - alpha,
        device=torch.device(device), verbose=False,
    )


def timm_adamw(student: torch.nn.Module, learning_rate: float) -> torch.optim.Optimizer:
    """The recipe's AdamW as the peers build it: timm's `create_optimizer_v2` (no decay on norms, biases, tokens)."""
    return create_optimizer_v2(student, "adamw", lr=learning_rate, weight_decay=0.05, eps=1e-8)


class StepLoop:
    """A hand-made loop over copies of the settings' batch (`benchmarks.training_step.TrainSettings`), timing each
    step; subclasses define `step`."""

    settings: "TrainSettings"

    def step(self, samples: torch.Tensor, targets: torch.Tensor) -> None:
        raise NotImplementedError

    def run_round(self) -> list[float]:
        """Seconds of each of `steps_per_round` steps on copies of the same batch (Mixup mixes in place)."""
        pixel_values, labels = (tensor.to(self.settings.device) for tensor in self.settings.batch())
        seconds = []
        for _ in range(self.settings.steps_per_round):
            samples = pixel_values.clone()
            synchronize(self.settings.device)
            start = time.perf_counter()
            self.step(samples, labels)
            synchronize(self.settings.device)
            seconds.append(time.perf_counter() - start)
        return seconds


class HandWrittenLoop(StepLoop):
    """One training step as facebookresearch/deit's `train_one_epoch` with its `DistillationLoss` (hard), training a
    timm `VisionTransformerDistilled` with a teacher already on the settings' device."""

    def __init__(self, settings: "TrainSettings", student: torch.nn.Module, teacher: torch.nn.Module):
        self.settings = settings
        self.student = student.to(settings.device)
        self.student.set_distilled_training(True)
        self.student.train()
        self.teacher = teacher
        self.mixup = Mixup(**timm_mixup_args(settings.aug_args(), settings.num_labels))
        self.optimizer = timm_adamw(self.student, settings.learning_rate)

    def step(self, samples: torch.Tensor, targets: torch.Tensor) -> None:
        samples, targets = self.mixup(samples, targets)
        with autocast(self.settings.device, self.settings.dtype):
            outputs = self.student(samples)
            with torch.no_grad():
                teacher_outputs = self.teacher(samples)
            loss = facebookresearch_hard_distillation_loss(outputs, targets, teacher_outputs, self.settings.alpha)
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"Loss is {loss.item()}, stopping training")
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()


class TimmTaskLoop(StepLoop):
    """One training step as timm's `train.py` runs `TokenDistillationTask` (`train_one_epoch`, no prefetcher), with a
    teacher already on the settings' device."""

    def __init__(self, settings: "TrainSettings", student: torch.nn.Module, teacher: torch.nn.Module):
        self.settings = settings
        self.task = timm_token_distillation_task(student.to(settings.device), teacher, settings.alpha, settings.device)
        if settings.torch_compile:
            self.task.compile()  # train.py's --torchcompile (inductor): student and teacher
        self.mixup = Mixup(**timm_mixup_args(settings.aug_args(), settings.num_labels))
        self.optimizer = timm_adamw(self.task.get_trainable_module(), settings.learning_rate)
        self.task.get_trainable_module().train()  # the teacher stays in eval mode (DistillationTeacher)
        self.optimizer.zero_grad()

    def step(self, samples: torch.Tensor, targets: torch.Tensor) -> None:
        samples, targets = self.mixup(samples, targets)
        with autocast(self.settings.device, self.settings.dtype):
            loss = self.task(samples, targets)["loss"]
        loss.backward()
        self.optimizer.step()
        loss.item()  # train.py's `losses_m.update(loss.item(), ...)`: a host synchronization per step
        self.optimizer.zero_grad()
