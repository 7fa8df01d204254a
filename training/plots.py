"""The pictures of a distillation run: each head's accuracy per epoch, and the two tokens' cosine at every layer.

`plot_run` draws, from `trainer.state.log_history` (one evaluation per epoch: `--eval_strategy epoch`), the top-1 of
the fused prediction and of each head, the teacher's top-1, the distillation head's agreement with the teacher and
the cosine of the output class and distillation tokens; beside it, the tokens' cosine at the input and after every
layer of the final model (`token_cosine_per_layer`; the paper reports 0.06 at the input, 0.93 at the last layer).
"""

from collections.abc import Sequence
from pathlib import Path

import torch
from torch.nn import functional as F

try:
    from matplotlib.figure import Figure  # the object API: no pyplot state, no display backend needed
except ImportError as error:  # matplotlib is the `demo` extra, not a training dependency
    raise ImportError("The run's pictures need matplotlib: pip install 'deit-hf[demo]'.") from error

# eval metric -> legend; the first three are accuracies against the labels, the rest how the heads relate.
EPOCH_CURVES = {
    "eval_top1": "fused (cls + dist) / 2",
    "eval_cls_top1": "class head",
    "eval_dist_top1": "distillation head",
    "eval_teacher_top1": "teacher",
    "eval_dist_teacher_agreement": "distillation head = teacher",
    "eval_token_cosine": "cos(cls token, dist token)",
}


def epoch_metrics(log_history: Sequence[dict]) -> dict[str, list[float]]:
    """`epoch` and each of `EPOCH_CURVES` per evaluation in `log_history`, in order; missing curves are left out.

    Raises a ValueError when the history holds fewer than two evaluations: no curve to draw."""
    evaluations = [entry for entry in log_history if "eval_top1" in entry and "epoch" in entry]
    if len(evaluations) < 2:
        raise ValueError(
            f"The log history holds {len(evaluations)} evaluation(s); per-epoch curves need an evaluation per epoch "
            "(--eval_strategy epoch) and at least two epochs."
        )
    curves = {"epoch": [entry["epoch"] for entry in evaluations]}
    for key in EPOCH_CURVES:
        if all(key in entry for entry in evaluations):
            curves[key] = [entry[key] for entry in evaluations]
    return curves


@torch.no_grad()
def token_cosine_per_layer(model: torch.nn.Module, pixel_values: torch.Tensor) -> list[float]:
    """Mean cosine of the class and distillation tokens at the input of the encoder, after each layer, and at the
    output (after the final norm, where the heads read them); `model` is a `DeiTForImageClassificationWithTeacher`."""
    model.eval()
    outputs = model(pixel_values, output_hidden_states=True)
    per_layer = [
        F.cosine_similarity(hidden[:, 0], hidden[:, 1], dim=-1).mean().item() for hidden in outputs.hidden_states
    ]
    return per_layer + [outputs.token_cosine_similarity.mean().item()]


def _floor(curves) -> float:
    """The axis' lower limit: 0, or below the lowest value (a cosine can be negative)."""
    return min(0.0, *(min(values) for values in curves)) - 0.05


def plot_run(log_history: Sequence[dict], layer_cosines: Sequence[float], path: str | Path, title: str = "") -> Path:
    """Write the run's picture (PNG) to `path`: per-epoch curves (left), token cosine per layer (right)."""
    curves = epoch_metrics(log_history)
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    per_epoch, per_layer = figure.subplots(1, 2, width_ratios=(3, 2))
    for key, label in EPOCH_CURVES.items():
        if key in curves:
            dashed = key in ("eval_dist_teacher_agreement", "eval_token_cosine")
            per_epoch.plot(curves["epoch"], curves[key], "--" if dashed else "-", label=label)
    per_epoch.set(xlabel="epoch", ylabel="held-out top-1 / agreement / cosine", ylim=(_floor(curves.values()), 1.02),
                  title="evaluation after each epoch")
    per_epoch.grid(alpha=0.3)
    per_epoch.legend(loc="center right", fontsize="small")

    layers = list(range(len(layer_cosines)))
    per_layer.plot(layers, layer_cosines, "o-", color="tab:purple")
    per_layer.set_xticks(layers, ["input", *map(str, layers[1:-1]), "output\n(norm)"])
    per_layer.set(xlabel="layer", ylabel="cos(cls token, dist token)", ylim=(_floor([layer_cosines]), 1.02),
                  title="the two tokens through the final model")
    per_layer.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path
