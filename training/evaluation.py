"""Evaluation on 1 or N processes that counts each validation image once, the undecodable ones too.

The evaluation batches keep the DataLoader's size (`DistillationCollator.blank_shape`: a skipped image is a blank
row labelled `IGNORE_INDEX`). accelerate then gathers batches of equal size from every process, and
`gather_for_metrics` drops, by position, the images repeated at the end to give each process a full last batch
(`even_batches`): a batch whose undecodable images were dropped was smaller on one process than on another (the
gather aborted) and put the repeated images where real ones were expected.

`DistillationTrainer.prediction_step` runs the model on the rows of a batch that decoded and that the gather keeps
(`rows_kept_by_gather`), puts their outputs back in their rows with `fill_rows` (the metrics ignore the labels
`IGNORE_INDEX`), and gives `EvaluationTally` the loss of those rows, which it sums over the decoded images of all
processes: the evaluation's loss is the mean over its decoded images, as on one process, and its counts of images are
exact.
"""

import torch
from accelerate import Accelerator
from accelerate.utils import recursively_apply


def rows_kept_by_gather(accelerator: Accelerator, size: int, device: torch.device) -> torch.Tensor:
    """Which of this process's `size` rows `gather_for_metrics` keeps (boolean): all of them, but in the last batch
    not the images repeated to give every process a full batch. The gather puts the processes' rows in their order."""
    if not accelerator.gradient_state.end_of_dataloader:  # gather_for_metrics trims the last batch only
        return torch.ones(size, dtype=torch.bool, device=device)
    kept = len(accelerator.gather_for_metrics(torch.zeros(size, device=device)))
    first = accelerator.process_index * size
    return torch.arange(first, first + size, device=device) < kept


def fill_rows(outputs, rows: torch.Tensor):
    """Each tensor of `outputs` (a tensor or nested tuples of them) with its rows put at the positions where `rows`
    (boolean, one per row of the batch) is true, the other rows zero."""

    def fill(tensor: torch.Tensor) -> torch.Tensor:
        filled = tensor.new_zeros(len(rows), *tensor.shape[1:])
        filled[rows.to(tensor.device)] = tensor
        return filled

    return recursively_apply(fill, outputs)


class EvaluationTally:
    """The loss and the numbers of decoded and skipped images of one evaluation, over all processes.

    `add` takes each batch's mean loss over its rows the model saw, which of its rows decoded and are kept by the
    gather (`counted`), and which are kept by the gather (`kept`): the images repeated to even the processes out are
    not counted. The sums stay on each process's device until `take` adds them over the processes (one reduction per
    evaluation) and returns `{prefix}_loss` (the mean over the decoded images), `{prefix}_images` (how many decoded)
    and `{prefix}_skipped_images`, and starts the next evaluation.
    """

    def __init__(self):
        self._totals: torch.Tensor | float = 0.0  # this process's loss sum, decoded images and kept rows

    def add(self, loss: torch.Tensor, counted: torch.Tensor, kept: torch.Tensor) -> None:
        counted, kept = counted.to(loss.device), kept.to(loss.device)
        image_losses = torch.where(counted, loss.float(), 0.0)  # the batch mean, for each of its counted images
        self._totals = self._totals + torch.stack([image_losses.sum(), counted.sum().float(), kept.sum().float()])

    def take(self, accelerator: Accelerator, prefix: str) -> dict[str, float | int]:
        totals, self._totals = self._totals, 0.0
        if not isinstance(totals, torch.Tensor):  # no batch here: this process still joins the reduction
            totals = torch.zeros(3, device=accelerator.device)
        loss_sum, decoded, rows = accelerator.reduce(totals, reduction="sum").tolist()
        metrics = {f"{prefix}_images": int(decoded), f"{prefix}_skipped_images": int(rows - decoded)}
        if decoded:
            metrics[f"{prefix}_loss"] = loss_sum / decoded
        return metrics
