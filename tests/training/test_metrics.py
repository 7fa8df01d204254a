"""Top-k reduction of the model outputs, the metrics computed from it, and the local evaluate module."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import EvalPrediction

from training.collator import IGNORE_INDEX
from training.metrics import DEIT_ACCURACY_PATH, compute_metrics, preprocess_logits_for_metrics


@pytest.mark.slow
def test_evaluate_module_loads_offline_by_path(tmp_path):
    # A fresh process, so that the offline switches are read when evaluate and datasets are first imported, and an
    # endpoint nobody listens on, so that any Hub request would fail.
    environment = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_EVALUATE_OFFLINE": "1",
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HOME": str(tmp_path / "hf_home"),
    }
    script = (
        "import evaluate; "
        f"metric = evaluate.load({str(DEIT_ACCURACY_PATH)!r}); "
        "print(metric.compute(predictions=[[2, 0, 1], [1, 2, 0], [0, 1, 2]], references=[2, 0, 2]))"
    )

    result = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "{'top1': 0.3333333333333333, 'top5': 1.0}"


LABELS = np.array([0, 1, 2, 3])
FUSED = np.array([[0, 1, 2, 3, 4], [2, 1, 0, 3, 4], [5, 6, 0, 1, 3], [3, 0, 1, 2, 4]])  # top1 2/4, top5 3/4
CLS = np.array([[1, 0, 2, 3, 4], [1, 0, 2, 3, 4], [6, 5, 4, 3, 1], [4, 5, 6, 0, 1]])  # top1 1/4, top5 2/4
DIST = np.array([[0, 1, 2, 3, 4], [1, 0, 2, 3, 4], [2, 0, 1, 3, 4], [0, 1, 2, 4, 5]])  # top1 3/4, top5 3/4
TEACHER = np.array([[0, 1, 2, 3, 4], [1, 0, 2, 3, 4], [6, 0, 1, 2, 3], [2, 0, 1, 3, 4]])  # top1 2/4
COSINE = np.array([0.1, 0.2, 0.3, 0.4], dtype=np.float32)


def test_compute_metrics_by_hand_without_teacher():
    metrics = compute_metrics(EvalPrediction(predictions=(FUSED, CLS, DIST, COSINE), label_ids=LABELS))

    assert metrics == pytest.approx(
        {"top1": 0.5, "top5": 0.75, "cls_top1": 0.25, "cls_top5": 0.5, "dist_top1": 0.75, "dist_top5": 0.75,
         "token_cosine": 0.25}
    )


def test_compute_metrics_by_hand_with_teacher():
    metrics = compute_metrics(EvalPrediction(predictions=(FUSED, CLS, DIST, COSINE, TEACHER), label_ids=LABELS))

    # Argmaxes: fused [0, 2, 5, 3], distillation [0, 1, 2, 0], teacher [0, 1, 6, 2].
    assert metrics["teacher_top1"] == pytest.approx(0.5)
    assert metrics["teacher_agreement"] == pytest.approx(0.25)
    assert metrics["dist_teacher_agreement"] == pytest.approx(0.5)
    assert metrics["top1"] == pytest.approx(0.5) and len(metrics) == 10


def test_rows_labelled_ignore_index_count_in_no_metric():
    def padded(values: np.ndarray) -> np.ndarray:  # a blank row before each row, as undecodable images leave them
        return np.stack([np.zeros_like(values), values], axis=1).reshape(-1, *values.shape[1:])

    labels = np.stack([np.full_like(LABELS, IGNORE_INDEX), LABELS], axis=1).reshape(-1)
    predictions = tuple(map(padded, (FUSED, CLS, DIST, COSINE, TEACHER)))
    metrics = compute_metrics(EvalPrediction(predictions=predictions, label_ids=labels))

    assert metrics == compute_metrics(EvalPrediction(predictions=(FUSED, CLS, DIST, COSINE, TEACHER), label_ids=LABELS))
    nothing_decoded = EvalPrediction(predictions=predictions, label_ids=np.full_like(labels, IGNORE_INDEX))
    assert compute_metrics(nothing_decoded) == {}


def test_preprocess_keeps_ranked_top5_ids_and_the_cosine():
    generator = torch.Generator().manual_seed(0)
    logits, cls_logits, dist_logits, teacher_logits = torch.randn(4, 6, 1000, generator=generator)
    cosine = torch.rand(6, generator=generator)

    reduced = preprocess_logits_for_metrics((logits, cls_logits, dist_logits, cosine, teacher_logits), None)

    assert len(reduced) == 5 and reduced[3] is cosine
    for ids, full in zip(reduced[:3] + reduced[4:], (logits, cls_logits, dist_logits, teacher_logits), strict=True):
        assert ids.dtype == torch.int64 and ids.shape == (6, 5)
        assert torch.equal(ids, full.argsort(dim=-1, descending=True)[:, :5])


def test_preprocess_then_compute_with_fewer_classes_than_five():
    generator = torch.Generator().manual_seed(1)
    logits, cls_logits, dist_logits = torch.randn(3, 8, 3, generator=generator)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])

    reduced = preprocess_logits_for_metrics((logits, cls_logits, dist_logits, torch.ones(8)), labels)
    metrics = compute_metrics(EvalPrediction(predictions=[t.numpy() for t in reduced], label_ids=labels.numpy()))

    assert reduced[0].shape == (8, 3)
    assert metrics["top1"] == pytest.approx((logits.argmax(-1) == labels).float().mean().item())
    assert metrics["cls_top1"] == pytest.approx((cls_logits.argmax(-1) == labels).float().mean().item())
    # With three classes, the three ranked ids always hold the label.
    assert metrics["top5"] == metrics["dist_top5"] == 1.0 and metrics["token_cosine"] == 1.0


def test_preprocess_rejects_other_outputs():
    logits = torch.zeros(2, 10)
    with pytest.raises(ValueError, match=r"Expected the model outputs \(logits, cls_logits, distillation_logits, "
                                         r"token_cosine_similarity\[, teacher_logits\]\), or .*got a tuple of 3"):
        preprocess_logits_for_metrics((logits, logits, logits), None)
    with pytest.raises(ValueError, match=r"got dict"):
        preprocess_logits_for_metrics({"logits": logits}, None)


@pytest.mark.parametrize("with_teacher", [False, True])
def test_one_head_model_gets_its_accuracy_and_no_distillation_head_metrics(with_teacher):
    generator = torch.Generator().manual_seed(2)
    logits, teacher_logits = torch.randn(2, 8, 10, generator=generator)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    # transformers hands a lone output tensor over unwrapped
    outputs = (logits, teacher_logits) if with_teacher else logits
    reduced = preprocess_logits_for_metrics(outputs, labels)
    predictions = tuple(t.numpy() for t in reduced) if with_teacher else reduced[0].numpy()
    metrics = compute_metrics(EvalPrediction(predictions=predictions, label_ids=labels.numpy()))
    top1 = (logits.argmax(-1) == labels).float().mean().item()
    assert metrics["top1"] == pytest.approx(top1) and metrics["cls_top1"] == pytest.approx(top1)
    assert not [name for name in metrics if name.startswith("dist_") or name == "token_cosine"]
    if with_teacher:
        agreement = (logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean().item()
        assert metrics["teacher_agreement"] == pytest.approx(agreement) and "teacher_top1" in metrics
    assert len(metrics) == (6 if with_teacher else 4)
