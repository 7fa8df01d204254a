"""The peers' side of the benchmarks, written from facebookresearch/deit: its hard distillation loss."""

import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy


def facebookresearch_hard_distillation_loss(outputs, labels, teacher_logits, alpha: float) -> torch.Tensor:
    """facebookresearch/deit `losses.DistillationLoss` with distillation_type='hard', base SoftTargetCrossEntropy."""
    cls_logits, dist_logits = outputs
    base_loss = SoftTargetCrossEntropy()(cls_logits, labels)
    distillation_loss = F.cross_entropy(dist_logits, teacher_logits.argmax(dim=1))
    return base_loss * (1 - alpha) + distillation_loss * alpha
