"""Top-1 and top-5 accuracy from ranked class predictions, as an `evaluate` module that loads offline by path."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Top-1 and top-5 accuracy of image classification, the numbers DeiT reports on ImageNet. Predictions are the top-k
class ids of each example, best first (k >= 1); a reference counts for top-5 when it is among the first five.
With fewer than five ranked ids (fewer than five classes), top-5 is the accuracy over all the ids given.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `int`): for each example, class ids ranked by decreasing score.
    references (`list` of `int`): the true class id of each example.
Returns:
    top1 (`float`): fraction of examples whose best-ranked id is the reference.
    top5 (`float`): fraction of examples whose reference is among the five best-ranked ids.
Examples:
    >>> metric = evaluate.load("training/metrics/deit_accuracy")
    >>> metric.compute(predictions=[[2, 0, 1], [1, 2, 0]], references=[2, 0])
    {'top1': 0.5, 'top5': 1.0}
"""

_CITATION = """
@inproceedings{touvron2021training,
  title={Training data-efficient image transformers \\& distillation through attention},
  author={Touvron, Hugo and Cord, Matthieu and Douze, Matthijs and Massa, Francisco and Sablayrolles, Alexandre
          and J{\\'e}gou, Herv{\\'e}},
  booktitle={International Conference on Machine Learning},
  year={2021}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class DeitAccuracy(evaluate.Metric):
    """Top-1 and top-5 accuracy from ranked top-k class ids."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("int64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        ranked = np.asarray(predictions, dtype=np.int64)
        if ranked.ndim != 2 or ranked.shape[1] == 0:
            raise ValueError(f"Predictions must be equally long, non-empty lists of class ids; shape {ranked.shape}.")
        hits = ranked[:, :5] == np.asarray(references, dtype=np.int64)[:, None]
        return {"top1": float(hits[:, 0].mean()), "top5": float(hits.any(axis=1).mean())}
