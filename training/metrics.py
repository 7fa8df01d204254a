"""Evaluation metrics of DeiT: accuracy of each head, and agreement with the teacher.

`preprocess_logits_for_metrics` runs on the device after each evaluation step and reduces every logits tensor to
its top-5 class ids, so the evaluation loop gathers (batch, 5) integers instead of (batch, num_classes) floats.
`compute_metrics` turns the gathered ids into accuracies with the local `deit_accuracy` evaluate module.
"""

from functools import cache
from pathlib import Path

import evaluate
import numpy as np
import torch
from transformers import EvalPrediction

from .collator import IGNORE_INDEX

# A local module: `evaluate.load("accuracy")` needs the Hub, this path does not.
DEIT_ACCURACY_PATH = Path(__file__).parent / "metrics" / "deit_accuracy"
TOP_K = 5
_OUTPUT_ELEMENTS = (
    "(logits, cls_logits, distillation_logits, token_cosine_similarity[, teacher_logits]), or for a model without "
    "distillation token (logits[, teacher_logits])"
)


def preprocess_logits_for_metrics(
    outputs: tuple[torch.Tensor, ...], labels: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """`Trainer` hook: reduce each logits tensor of the model outputs to its top-k class ids, k = min(5, classes).

    `outputs` is `(logits, cls_logits, distillation_logits, token_cosine_similarity)`, followed by `teacher_logits`
    when a teacher runs; the token cosine similarity, shape (batch,), is kept as is. A model without distillation
    token gives `logits` alone (transformers passes a lone tensor unwrapped), or `(logits, teacher_logits)`.
    """
    if isinstance(outputs, torch.Tensor):
        outputs = (outputs,)
    if not isinstance(outputs, (tuple, list)) or len(outputs) not in (1, 2, 4, 5):
        found = f"a tuple of {len(outputs)}" if isinstance(outputs, (tuple, list)) else type(outputs).__name__
        raise ValueError(f"Expected the model outputs {_OUTPUT_ELEMENTS}, got {found}.")
    if len(outputs) <= 2:  # one head
        return tuple(_top_k_ids(tensor) for tensor in outputs)
    logits, cls_logits, distillation_logits, token_cosine_similarity, *teacher_logits = outputs
    ranked = [_top_k_ids(tensor) for tensor in (logits, cls_logits, distillation_logits)]
    return (*ranked, token_cosine_similarity, *(_top_k_ids(tensor) for tensor in teacher_logits))


def compute_metrics(eval_pred: EvalPrediction) -> dict[str, float]:
    """Accuracies of the fused, class and distillation heads, token cosine and, with a teacher, agreement with it.

    Returns `top1`/`top5` (fused logits), `cls_top1`/`cls_top5`, `dist_top1`/`dist_top5`, `token_cosine` (mean) and,
    when the predictions carry the teacher's ids, `teacher_top1`, `teacher_agreement` (fused vs teacher argmax) and
    `dist_teacher_agreement` (distillation head vs teacher argmax). A model without distillation token has one head:
    `top1`/`top5` and `cls_top1`/`cls_top5` are its accuracy, and there are no `dist_*` or `token_cosine`. Rows
    labelled `IGNORE_INDEX` (images that did not decode, kept as blank rows) count in none of them; without any other
    row there is no metric (`training.skipped_images` stops the run, or reports `eval_images` 0).
    """
    predictions, labels = eval_pred.predictions, eval_pred.label_ids
    predictions = (predictions,) if isinstance(predictions, np.ndarray) else tuple(predictions)
    decoded = labels != IGNORE_INDEX
    if not decoded.any():
        return {}
    predictions, labels = tuple(values[decoded] for values in predictions), labels[decoded]
    if len(predictions) <= 2:  # one head
        logits_ranked, *teacher = predictions
        metrics = {prefix + name: value for prefix in ("", "cls_")
                   for name, value in _accuracy(logits_ranked, labels).items()}
        return {**metrics, **_teacher_metrics(teacher, logits_ranked, labels)}
    fused, cls_ranked, distillation_ranked, token_cosine, *teacher = predictions
    metrics = {}
    for prefix, ranked in (("", fused), ("cls_", cls_ranked), ("dist_", distillation_ranked)):
        metrics.update({prefix + name: value for name, value in _accuracy(ranked, labels).items()})
    metrics["token_cosine"] = float(np.mean(token_cosine))
    metrics.update(_teacher_metrics(teacher, fused, labels))
    if teacher:
        metrics["dist_teacher_agreement"] = float(np.mean(distillation_ranked[:, 0] == teacher[0][:, 0]))
    return metrics


def _teacher_metrics(teacher: list[np.ndarray], prediction_ranked: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    if not teacher:
        return {}
    (teacher_ranked,) = teacher
    return {
        "teacher_top1": _accuracy(teacher_ranked, labels)["top1"],
        "teacher_agreement": float(np.mean(prediction_ranked[:, 0] == teacher_ranked[:, 0])),
    }


def _top_k_ids(logits: torch.Tensor) -> torch.Tensor:
    return logits.topk(min(TOP_K, logits.shape[-1]), dim=-1).indices


@cache
def _accuracy_metric() -> evaluate.EvaluationModule:
    return evaluate.load(str(DEIT_ACCURACY_PATH))


def _accuracy(ranked: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return _accuracy_metric().compute(predictions=ranked.tolist(), references=labels.tolist())
