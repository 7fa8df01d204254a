"""What a soft record's top-k truncation costs: KL between the teacher's full and truncated targets, and bytes a view.

    python -m benchmarks.soft_record_truncation

The teacher is the test suite's quick one (`tests/training/conftest.py`, `fitted_teacher`): scikit-learn's logistic
regression on the 8x8 digits, fitted on 1,437 of them; its logits are taken on the 360 others. (The convergence
benchmark's ResNet-18 teacher takes too long to train on a shared 2-core machine.) For k = 1, 3, 5, 10 and tau = 1, 3,
with p = softmax(logits / tau), the mean per view of KL(p || q), KL(q || p) and the L1 distance |p - q| (the
difference it makes to the soft loss's gradient in the student's logits, up to 1 / tau) for three truncated targets q:

- `zero`: the top k logits kept, every other class probability 0 (records of format 1: q = p renormalised over the
  top k; KL(p || q) is infinite whenever the tail holds any mass);
- `uniform logit`: every other class given one logit, the tail's log-sum-exp minus log(classes - k) at tau 1 (one
  more fp16 number per view, the same for every temperature; the tail's mass is exact at tau 1 only);
- `uniform mass`: TinyViT's: the top k probabilities kept and the leftover mass 1 - sum spread uniformly over the
  other classes; what records store since format 2 (one fp16 logit per view for the other classes, computed at the
  run's temperature, which the fingerprint then holds).

Bytes per view at 1,000 classes: `TeacherRecord.size_per_view` of one epoch part of random logits, 100 batches of 128,
as `training.teacher.store.encode` stores them.
Prints one JSON line per row.
"""

import json
import math
import tempfile

import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from training.teacher.store import TeacherRecord, encode, part_name


def truncated(logits: torch.Tensor, k: int, tau: float, variant: str) -> torch.Tensor:
    """The probabilities q of `variant` (see the module docstring)."""
    classes = logits.shape[1]
    top = logits.topk(k, dim=1).indices
    in_top = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, top, True)
    if variant == "zero":
        return (logits / tau).masked_fill(~in_top, -math.inf).softmax(1)
    if variant == "uniform logit":
        if k == classes:
            return (logits / tau).softmax(1)
        tail = logits.masked_fill(in_top, -math.inf).logsumexp(1, keepdim=True) - math.log(classes - k)
        return (torch.where(in_top, logits, tail) / tau).softmax(1)
    p = (logits / tau).softmax(1)
    leftover = (p * ~in_top).sum(1, keepdim=True) / max(classes - k, 1)
    return torch.where(in_top, p, leftover)


def kl(p: torch.Tensor, q: torch.Tensor) -> float:
    """Mean over rows of KL(p || q) in nats (inf where q is 0 and p is not)."""
    terms = torch.where(p > 0, p * (p.log() - q.log()), torch.zeros_like(p))
    return float(terms.sum(1).mean())


def bytes_per_view(num_labels: int, k: int, batches: int = 100, batch_size: int = 128) -> float:
    with tempfile.TemporaryDirectory() as directory:
        record = TeacherRecord(directory, {"classes": num_labels})
        entries = {step: (torch.zeros(2), encode(torch.randn(batch_size, num_labels), "soft", k))
                   for step in range(batches)}
        record.save(part_name(0, 0), entries)
        return record.size_per_view()


def teacher_logits() -> torch.Tensor:
    """The logistic regression's logits on the held-out digits."""
    images, labels = load_digits(return_X_y=True)
    train_images, held_out, train_labels, held_out_labels = train_test_split(images, labels, test_size=360,
                                                                             random_state=0)
    teacher = LogisticRegression(max_iter=2000).fit(train_images, train_labels)
    print(json.dumps({"teacher": "logistic regression", "top1": round(teacher.score(held_out, held_out_labels), 4),
                      "views": len(held_out)}), flush=True)
    return torch.as_tensor(teacher.decision_function(held_out), dtype=torch.float64)


def main() -> None:
    logits = teacher_logits()
    for tau in (1.0, 3.0):
        p = (logits / tau).softmax(1)
        for k in (1, 3, 5, 10):
            row = {"tau": tau, "k": k, "tail_mass": round(float(1 - p.topk(k, dim=1).values.sum(1).mean()), 6)}
            for variant in ("zero", "uniform logit", "uniform mass"):
                q = truncated(logits, k, tau, variant)
                row[variant] = {"kl_p_q": round(kl(p, q), 6), "kl_q_p": round(kl(q, p), 6),
                                "l1": round(float((p - q).abs().sum(1).mean()), 6)}
            print(json.dumps(row), flush=True)
    for k in (1, 3, 5, 10):
        print(json.dumps({"classes": 1000, "k": k, "bytes_per_view": round(bytes_per_view(1000, k), 2)}), flush=True)


if __name__ == "__main__":
    main()
