"""The loss against facebookresearch/deit `losses.py` written out by hand on fixed tensors."""

import pytest
import torch
import torch.nn.functional as F

from deit_hf import DistillationLoss

g = torch.Generator().manual_seed(0)
CLS = torch.randn(6, 5, generator=g)
DIST = torch.randn(6, 5, generator=g)
TEACHER = torch.randn(6, 5, generator=g)
LABELS = torch.tensor([0, 1, 2, 3, 4, 0])


def reference(distillation_type, alpha, tau, labels=LABELS):
    """facebookresearch/deit DistillationLoss.forward, inlined."""
    if labels.is_floating_point():  # SoftTargetCrossEntropy
        base = torch.sum(-labels * F.log_softmax(CLS, dim=-1), dim=-1).mean()
    else:
        base = F.cross_entropy(CLS, labels)
    if distillation_type == "none":  # deit_hf trains both heads on the fused logits (timm's way), see below
        return base
    if distillation_type == "soft":
        distillation = F.kl_div(
            F.log_softmax(DIST / tau, dim=1), F.log_softmax(TEACHER / tau, dim=1), reduction="sum", log_target=True
        ) * (tau * tau) / DIST.numel()
    else:
        distillation = F.cross_entropy(DIST, TEACHER.argmax(dim=1))
    return base * (1 - alpha) + distillation * alpha


@pytest.mark.parametrize("distillation_type, alpha, tau", [("hard", 0.5, 1.0), ("soft", 0.5, 3.0), ("soft", 0.1, 1.0)])
def test_matches_facebookresearch(distillation_type, alpha, tau):
    out = DistillationLoss(distillation_type, alpha, tau)(CLS, LABELS, DIST, TEACHER)
    torch.testing.assert_close(out.loss, reference(distillation_type, alpha, tau))
    torch.testing.assert_close(out.loss, (1 - alpha) * out.base_loss + alpha * out.distillation_loss)


def test_single_head_base_loss_matches_facebookresearch_none():
    out = DistillationLoss("none")(CLS, LABELS)
    torch.testing.assert_close(out.loss, reference("none", 0.5, 1.0))
    assert out.distillation_loss is None


def test_hard_loss_value_by_hand():
    # alpha 0.5: the mean of the two cross-entropies; the teacher's argmax is the distillation target
    out = DistillationLoss("hard")(CLS, LABELS, DIST, TEACHER)
    by_hand = 0.5 * F.cross_entropy(CLS, LABELS) + 0.5 * F.cross_entropy(DIST, TEACHER.argmax(1))
    torch.testing.assert_close(out.loss, by_hand)


def test_soft_targets_from_mixup_use_soft_cross_entropy():
    soft = torch.softmax(torch.randn(6, 5, generator=g), dim=1)
    out = DistillationLoss("hard", label_smoothing=0.1)(CLS, soft, DIST, TEACHER)
    # smoothing is not applied twice to Mixup's (already smoothed) targets
    torch.testing.assert_close(out.loss, reference("hard", 0.5, 1.0, labels=soft))


def test_label_smoothing_applies_to_class_ids_but_not_to_teacher_targets():
    out = DistillationLoss("hard", label_smoothing=0.1)(CLS, LABELS, DIST, TEACHER)
    torch.testing.assert_close(out.base_loss, F.cross_entropy(CLS, LABELS, label_smoothing=0.1))
    torch.testing.assert_close(out.distillation_loss, F.cross_entropy(DIST, TEACHER.argmax(1)))


def test_teacher_gets_no_gradient_and_student_heads_do():
    cls, dist = CLS.clone().requires_grad_(), DIST.clone().requires_grad_()
    teacher = TEACHER.clone().requires_grad_()
    DistillationLoss("soft", tau=2.0)(cls, LABELS, dist, teacher).loss.backward()
    assert teacher.grad is None
    assert cls.grad.abs().sum() > 0 and dist.grad.abs().sum() > 0


@pytest.mark.parametrize("distillation_type", ["none", "hard", "soft"])
@pytest.mark.parametrize("labels", [LABELS, torch.softmax(torch.randn(6, 5, generator=g), dim=1)])
def test_without_a_teacher_both_heads_train_on_the_fused_logits(distillation_type, labels):
    cls, dist = CLS.clone().requires_grad_(), DIST.clone().requires_grad_()
    out = DistillationLoss(distillation_type, label_smoothing=0.1)(cls, labels, dist)
    smoothing = 0.0 if labels.is_floating_point() else 0.1
    torch.testing.assert_close(out.loss, F.cross_entropy((CLS + DIST) / 2, labels, label_smoothing=smoothing))
    assert out.distillation_loss is None
    out.loss.backward()
    assert cls.grad.abs().sum() > 0 and dist.grad.abs().sum() > 0
    torch.testing.assert_close(cls.grad, dist.grad)  # the average passes the same gradient to both heads


@pytest.mark.parametrize("distillation_type", ["none", "labels"])
@pytest.mark.parametrize("distillation_logits", [DIST, None])
def test_teacher_logits_without_a_teacher_type_are_refused_not_ignored(distillation_type, distillation_logits):
    with pytest.raises(ValueError, match=f"`teacher_logits` were given but distillation_type='{distillation_type}' "
                       "does not use them"):
        DistillationLoss(distillation_type)(CLS, LABELS, distillation_logits, TEACHER)


@pytest.mark.parametrize("alpha", [0.5, 0.2])
@pytest.mark.parametrize("labels", [LABELS, torch.softmax(torch.randn(6, 5, generator=g), dim=1)])
def test_labels_trains_each_head_on_the_labels_as_two_class_tokens(alpha, labels):
    # the paper's control: the distillation token's head gets the class head's target, the label (smoothed alike)
    cls, dist = CLS.clone().requires_grad_(), DIST.clone().requires_grad_()
    out = DistillationLoss("labels", alpha, label_smoothing=0.1)(cls, labels, dist)
    smoothing = 0.0 if labels.is_floating_point() else 0.1
    by_hand = [F.cross_entropy(logits, labels, label_smoothing=smoothing) for logits in (CLS, DIST)]
    torch.testing.assert_close(out.loss, (1 - alpha) * by_hand[0] + alpha * by_hand[1])
    torch.testing.assert_close((out.base_loss, out.distillation_loss), tuple(by_hand))
    out.loss.backward()
    # each head's gradient is its own cross-entropy's, weighted: not the fused logits' shared gradient
    torch.testing.assert_close(cls.grad, (1 - alpha) * torch.func.grad(
        lambda z: F.cross_entropy(z, labels, label_smoothing=smoothing))(CLS))
    torch.testing.assert_close(dist.grad, alpha * torch.func.grad(
        lambda z: F.cross_entropy(z, labels, label_smoothing=smoothing))(DIST))


def test_labels_without_a_distillation_head_is_refused():
    with pytest.raises(ValueError, match="no distillation head: use 'none'"):
        DistillationLoss("labels")(CLS, LABELS)


def classical_by_the_paper(alpha, tau, hard, labels=LABELS):
    """The paper's "usual distillation" of the class head (section 5.2), written out with its own symbols.

    soft: (1 - λ) L_CE(ψ(Z_s), y) + λ τ² KL(ψ(Z_s/τ), ψ(Z_t/τ)), with KL(teacher || student) summed over the classes
    and averaged over the images and the classes (facebookresearch/deit: `sum / numel`); hard: the teacher's argmax
    y_t = argmax_c Z_t(c) as a second true label, (1 - λ) L_CE(ψ(Z_s), y) + λ L_CE(ψ(Z_s), y_t).
    """
    log_p = lambda z: z - z.logsumexp(dim=1, keepdim=True)  # noqa: E731  log ψ
    cross_entropy = lambda z, y: -log_p(z)[torch.arange(len(y)), y].mean()  # noqa: E731
    base = cross_entropy(CLS, labels)
    if hard:
        distillation = cross_entropy(CLS, TEACHER.argmax(dim=1))
    else:
        student, teacher = log_p(CLS / tau), log_p(TEACHER / tau)
        distillation = tau**2 * (teacher.exp() * (teacher - student)).sum() / CLS.numel()
    return (1 - alpha) * base + alpha * distillation


@pytest.mark.parametrize("distillation_type, alpha, tau", [("hard", 0.5, 1.0), ("soft", 0.5, 3.0), ("soft", 0.1, 1.0)])
def test_classical_distillation_of_the_class_head_matches_the_paper(distillation_type, alpha, tau):
    cls = CLS.clone().requires_grad_()
    out = DistillationLoss(distillation_type, alpha, tau)(cls, LABELS, teacher_logits=TEACHER)
    torch.testing.assert_close(out.loss, classical_by_the_paper(alpha, tau, hard=distillation_type == "hard"))
    torch.testing.assert_close(out.base_loss, F.cross_entropy(CLS, LABELS))
    torch.testing.assert_close(out.loss, (1 - alpha) * out.base_loss + alpha * out.distillation_loss)
    out.loss.backward()  # both terms reach the one head
    assert cls.grad.abs().sum() > 0


def test_teacher_with_other_classes_is_a_clear_error():
    with pytest.raises(ValueError, match=r"teacher_logits has shape \(6, 7\).*\(6, 5\)"):
        DistillationLoss("hard")(CLS, LABELS, DIST, torch.randn(6, 7))


def test_unknown_type():
    with pytest.raises(ValueError, match="distillation_type"):
        DistillationLoss("strong")
