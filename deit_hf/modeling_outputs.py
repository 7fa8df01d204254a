"""The typed outputs of deit_hf's classifiers."""

from dataclasses import dataclass

import torch
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.utils import ModelOutput


@dataclass
class DeiTForImageClassificationOutput(ImageClassifierOutput):
    r"""
    Output of [`DeiTForImageClassification`]: transformers' `ImageClassifierOutput` and the two parts of the loss.

    base_loss, distillation_loss (`torch.Tensor` of shape `()`):
        The cross-entropy of the class head on the labels and, with a teacher (classical distillation), its
        distillation loss (`deit_hf.losses.DistillationLoss`); `distillation_loss` is None without a teacher.
    """

    base_loss: torch.Tensor | None = None
    distillation_loss: torch.Tensor | None = None


@dataclass
class DeiTForImageClassificationWithTeacherOutput(ModelOutput):
    r"""
    Output of [`DeiTForImageClassificationWithTeacher`].

    loss (`torch.Tensor` of shape `()`, returned when `labels` are given):
        `(1 - alpha) * base_loss + alpha * distillation_loss` (see `deit_hf.losses.DistillationLoss`).
    logits (`torch.Tensor` of shape `(batch_size, num_labels)`):
        The prediction at inference: the average of `cls_logits` and `distillation_logits` (late fusion).
    cls_logits (`torch.Tensor` of shape `(batch_size, num_labels)`):
        Head on the final class token.
    distillation_logits (`torch.Tensor` of shape `(batch_size, num_labels)`):
        Head on the final distillation token.
    token_cosine_similarity (`torch.Tensor` of shape `(batch_size,)`):
        Cosine similarity of the final class and distillation token embeddings (the paper reports ~0.93): a
        value near 1 means the two tokens learned the same thing.
    base_loss, distillation_loss (`torch.Tensor` of shape `()`):
        The two parts of `loss`, for logging; `distillation_loss` is None without a teacher (then `base_loss` is the
        cross-entropy of the fused `logits`).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cls_logits: torch.Tensor | None = None
    distillation_logits: torch.Tensor | None = None
    token_cosine_similarity: torch.Tensor | None = None
    base_loss: torch.Tensor | None = None
    distillation_loss: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


__all__ = ["DeiTForImageClassificationOutput", "DeiTForImageClassificationWithTeacherOutput"]
