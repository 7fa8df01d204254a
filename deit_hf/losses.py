"""The DeiT distillation loss (facebookresearch/deit `losses.py`), shared by the model's forward and the Trainer."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import logging

from .distillation_types import TEACHER_TYPES, get_distillation_type

logger = logging.get_logger(__name__)


@dataclass
class DistillationLossOutput:
    """The total loss and its two parts; `distillation_loss` is None when `distillation_type="none"`."""

    loss: torch.Tensor
    base_loss: torch.Tensor
    distillation_loss: torch.Tensor | None = None


class DistillationLoss(nn.Module):
    """
    `(1 - alpha) * CE(cls_logits, labels) + alpha * distillation(student, teacher_logits)`.

    The distilled `student` logits are the distillation head's (token distillation, DeiT⚗) or, given no
    `distillation_logits` (a model without a distillation token), the class head's own: the paper's classical
    distillation, `(1 - alpha) * CE(cls, labels) + alpha * KD(cls, teacher)`.

    - base: cross-entropy of the class head; `labels` are class ids (smoothed by `label_smoothing`) or soft targets
      of shape (batch, num_classes) from Mixup/CutMix, which already carry their smoothing.
    - hard: cross-entropy of the student against the teacher's argmax (no smoothing on teacher targets).
    - soft: KL(student/tau || teacher/tau) * tau^2, summed and divided by the logits' element count, as the paper.
    - none, or no `teacher_logits`: the cross-entropy of the fused prediction `(cls + dist) / 2`, which trains both
      heads (timm's way of training a distilled DeiT without a teacher), so the prediction never averages in an
      untrained head. facebookresearch/deit's "none" trains the class head alone. Given only `cls_logits` (a model
      with one head), the base loss alone.
    - labels: no teacher; the distillation head learns the labels as the class head does,
      `(1 - alpha) * CE(cls, labels) + alpha * CE(dist, labels)`: the distillation token becomes a second class token
      (the paper's control, whose two tokens end aligned, cos 0.999). Needs `distillation_logits`.

    `teacher_logits` with "none" or "labels" are refused: they would go unread.
    """

    def __init__(
        self, distillation_type: str = "hard", alpha: float = 0.5, tau: float = 1.0, label_smoothing: float = 0.0
    ):
        super().__init__()
        self.kind = get_distillation_type(distillation_type)
        self.distillation_type = distillation_type
        self.alpha = alpha
        self.tau = tau
        self.label_smoothing = label_smoothing

    @classmethod
    def from_config(cls, config) -> "DistillationLoss":
        return cls(config.distillation_type, config.distillation_alpha, config.distillation_tau, config.label_smoothing)

    def forward(
        self,
        cls_logits: torch.Tensor,
        labels: torch.Tensor,
        distillation_logits: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | None = None,
    ) -> DistillationLossOutput:
        # Soft targets already carry Mixup's smoothing; smoothing them again would double it.
        smoothing = 0.0 if labels.is_floating_point() else self.label_smoothing
        if not self.kind.uses_teacher and teacher_logits is not None:
            raise ValueError(f"`teacher_logits` were given but distillation_type={self.distillation_type!r} does not "
                             f"use them: set distillation_type to one of {TEACHER_TYPES}, or do not run the teacher.")
        if self.kind.needs_distillation_token and distillation_logits is None:
            raise ValueError(f"distillation_type={self.distillation_type!r} trains the distillation head, but the "
                             "model has no distillation head: use 'none'.")
        if self.distillation_type == "labels":
            base_loss = F.cross_entropy(cls_logits, labels, label_smoothing=smoothing)
            second_class_loss = F.cross_entropy(distillation_logits, labels, label_smoothing=smoothing)
            loss = base_loss * (1 - self.alpha) + second_class_loss * self.alpha
            return DistillationLossOutput(loss=loss, base_loss=base_loss, distillation_loss=second_class_loss)
        if self.distillation_type == "none" or teacher_logits is None:
            if self.distillation_type != "none":
                logger.warning_once(
                    f"distillation_type={self.distillation_type!r} but no `teacher_logits` were given: training both "
                    "heads on the cross-entropy of the fused logits, without a teacher."
                )
            logits = cls_logits if distillation_logits is None else (cls_logits + distillation_logits) / 2
            base_loss = F.cross_entropy(logits, labels, label_smoothing=smoothing)
            return DistillationLossOutput(loss=base_loss, base_loss=base_loss)
        base_loss = F.cross_entropy(cls_logits, labels, label_smoothing=smoothing)
        student = cls_logits if distillation_logits is None else distillation_logits
        if teacher_logits.shape != student.shape:
            raise ValueError(
                f"teacher_logits has shape {tuple(teacher_logits.shape)} but the student's distilled logits have "
                f"shape {tuple(student.shape)}; teacher and student must predict the same classes."
            )
        teacher_logits = teacher_logits.detach().float()
        if self.distillation_type == "hard":
            distillation_loss = F.cross_entropy(student, teacher_logits.argmax(dim=1))
        else:
            distillation_loss = F.kl_div(
                F.log_softmax(student.float() / self.tau, dim=1),
                F.log_softmax(teacher_logits / self.tau, dim=1),
                reduction="sum",
                log_target=True,
            ) * (self.tau * self.tau) / student.numel()
        loss = base_loss * (1 - self.alpha) + distillation_loss * self.alpha
        return DistillationLossOutput(loss=loss, base_loss=base_loss, distillation_loss=distillation_loss)


__all__ = ["DistillationLoss", "DistillationLossOutput"]
