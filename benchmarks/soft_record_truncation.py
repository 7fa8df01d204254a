"""What a soft record's top-k truncation costs: KL between the teacher's full and truncated targets, and bytes a view.

    python -m benchmarks.soft_record_truncation [--workdir DIR]

The teacher is the convergence benchmark's (`benchmarks.convergence.prepare_teacher`: a timm ResNet-18 trained on the
digits, cached in the workdir); its logits are taken on the held-out digits. For k = 1, 3, 5, 10 and tau = 1, 3,
with p = softmax(logits / tau), the mean per view of KL(p || q) and KL(q || p) for three truncated targets q:

- `zero`: the top k logits kept, every other class probability 0 (the record as it is: q = p renormalised over the
  top k; KL(p || q) is infinite whenever the tail holds any mass);
- `uniform logit`: every other class given one logit, the tail's log-sum-exp minus log(classes - k) at tau 1 (one
  more fp16 number per view; the tail's mass is exact at tau 1 and approximate at other temperatures);
- `uniform mass`: TinyViT's: the top k probabilities kept and the leftover mass 1 - sum spread uniformly over the
  other classes (needs the temperature when recording).

Bytes per view at 1,000 classes: `TeacherRecord.size_per_view` of one epoch part of random logits, 100 batches of 128.
Prints one JSON line per row.
"""

import argparse
import json
import math
import tempfile
from pathlib import Path

import torch

from benchmarks.convergence import Settings, _eval_loader, _load_teacher, prepare_data, prepare_teacher
from training.teacher_record import TeacherRecord, encode, part_name


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
        entries = {(step, 0): (torch.zeros(2), encode(torch.randn(batch_size, num_labels), "soft", k))
                   for step in range(batches)}
        record.save(part_name(0, 0), entries)
        return record.size_per_view()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="outputs/soft_record_truncation")
    workdir = Path(parser.parse_args(argv).workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    settings = Settings()
    data_dir = prepare_data(workdir)
    path, top1 = prepare_teacher(workdir, data_dir, settings)
    teacher = _load_teacher(path, settings)
    with torch.no_grad():
        logits = torch.cat([teacher(images) for images, _ in _eval_loader(data_dir, settings)]).double()
    print(json.dumps({"teacher": settings.teacher_model, "top1": top1, "views": len(logits)}), flush=True)
    for tau in (1.0, 3.0):
        p = (logits / tau).softmax(1)
        for k in (1, 3, 5, 10):
            row = {"tau": tau, "k": k, "tail_mass": round(float(1 - p.topk(k, dim=1).values.sum(1).mean()), 6)}
            for variant in ("zero", "uniform logit", "uniform mass"):
                q = truncated(logits, k, tau, variant)
                row[variant] = {"kl_p_q": round(kl(p, q), 6), "kl_q_p": round(kl(q, p), 6)}
            print(json.dumps(row), flush=True)
    for k in (1, 3, 5, 10):
        print(json.dumps({"classes": 1000, "k": k, "bytes_per_view": round(bytes_per_view(1000, k), 2)}), flush=True)


if __name__ == "__main__":
    main()
