"""`deit_hf.distillation_types`: each type's properties are what the loss does with it."""

import pytest
import torch

from deit_hf import DistillationLoss
from deit_hf.distillation_types import DISTILLATION_TYPES, get_distillation_type

GENERATOR = torch.Generator().manual_seed(0)
CLS, DIST, TEACHER = (torch.randn(6, 4, generator=GENERATOR) for _ in range(3))
LABELS = torch.tensor([0, 1, 2, 3, 0, 1])


def loss(name: str, alpha: float = 0.5, tau: float = 1.0, distillation_logits=DIST, teacher_logits=None) -> float:
    kind = get_distillation_type(name)
    teacher_logits = TEACHER if teacher_logits is None and kind.uses_teacher else teacher_logits
    return float(DistillationLoss(name, alpha, tau)(CLS, LABELS, distillation_logits, teacher_logits).loss)


@pytest.mark.parametrize("name", DISTILLATION_TYPES)
def test_each_property_is_what_the_loss_does(name):
    kind = get_distillation_type(name)
    refuses_teacher = not kind.uses_teacher
    if refuses_teacher:
        with pytest.raises(ValueError, match="does not use them"):
            loss(name, teacher_logits=TEACHER)
    if kind.needs_distillation_token:
        with pytest.raises(ValueError, match="no distillation head"):
            loss(name, distillation_logits=None)
    else:
        loss(name, distillation_logits=None)
    assert (loss(name, tau=3.0) != loss(name)) == kind.uses_teacher_distribution
    assert (loss(name, alpha=0.2) != loss(name)) == kind.weighs_two_parts


def test_an_unknown_type_is_refused_with_the_list():
    with pytest.raises(ValueError, match=r"one of \('hard', 'soft', 'none', 'labels'\), got 'medium'"):
        get_distillation_type("medium")


def test_the_command_line_offers_exactly_the_types():
    from training.train import build_parser

    (action,) = [action for action in build_parser()._actions if action.dest == "distillation_type"]
    assert list(action.choices) == list(DISTILLATION_TYPES)
