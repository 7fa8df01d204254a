"""The run's pictures: curves from the Trainer's log history, token cosine at every layer, a PNG written."""

import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from deit_hf import DeiTConfig, DeiTForImageClassificationWithTeacher
from training.plots import epoch_metrics, plot_run, token_cosine_per_layer

from ..conftest import TINY


def history(epochs):
    """Trainer-style log history: training logs between evaluations, which carry the metrics."""
    entries = []
    for epoch in range(1, epochs + 1):
        entries.append({"loss": 1.0 / epoch, "epoch": epoch - 0.5, "step": 2 * epoch - 1})
        entries.append({"eval_top1": 0.1 * epoch, "eval_cls_top1": 0.09 * epoch, "eval_dist_top1": 0.08 * epoch,
                        "eval_teacher_top1": 0.9, "eval_dist_teacher_agreement": 0.1 * epoch,
                        "eval_token_cosine": 0.05 * epoch, "epoch": float(epoch), "step": 2 * epoch})
    return entries


def test_epoch_metrics_follow_the_evaluations_in_order():
    curves = epoch_metrics(history(3) + [{"train_runtime": 1.0, "epoch": 3.0}])
    assert curves["epoch"] == [1.0, 2.0, 3.0]
    assert curves["eval_top1"] == pytest.approx([0.1, 0.2, 0.3])
    assert curves["eval_teacher_top1"] == [0.9] * 3


def test_curves_missing_from_an_evaluation_are_left_out():
    entries = history(2)
    for entry in entries:
        entry.pop("eval_teacher_top1", None)  # a run without a teacher
    assert "eval_teacher_top1" not in epoch_metrics(entries) and "eval_dist_top1" in epoch_metrics(entries)


def test_a_run_without_per_epoch_evaluation_is_refused_clearly():
    with pytest.raises(ValueError, match="--eval_strategy epoch"):
        epoch_metrics(history(1))


def test_token_cosine_is_measured_at_the_input_after_each_layer_and_at_the_output(pixel_values):
    torch.manual_seed(0)
    model = DeiTForImageClassificationWithTeacher(DeiTConfig(**TINY))
    cosines = token_cosine_per_layer(model, pixel_values)
    assert len(cosines) == TINY["num_hidden_layers"] + 2
    embeddings = model.deit.embeddings(pixel_values)
    assert cosines[0] == pytest.approx(F.cosine_similarity(embeddings[:, 0], embeddings[:, 1], dim=-1).mean().item())
    assert cosines[-1] == pytest.approx(model(pixel_values).token_cosine_similarity.mean().item())


def test_plot_run_writes_a_png(tmp_path):
    path = plot_run(history(4), [0.06, 0.3, 0.9, 0.93], tmp_path / "pictures" / "run.png", title="a run")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 600
