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

    `add` takes each batch's mean loss over its decoded images that the gather keeps, and which of its rows these
    are; the rows of all processes are gathered with `gather_for_metrics`, so the images repeated to even the
    processes out are not counted. `take` returns `{prefix}_loss` (the mean over the decoded images),
    `{prefix}_images` (how many decoded) and `{prefix}_skipped_images`, and starts the next evaluation.
    """

    def __init__(self):
        self._totals: torch.Tensor | float = 0.0  # loss sum, decoded images, rows: on the device

    def add(self, accelerator: Accelerator, loss: torch.Tensor, decoded: torch.Tensor) -> None:
        decoded = decoded.to(loss.device)
        image_losses = torch.where(decoded, loss.float(), 0.0)  # the batch mean, for each of its decoded images
        image_losses, decoded = accelerator.gather_for_metrics((image_losses, decoded.float()))
        self._totals = self._totals + torch.stack([image_losses.sum(), decoded.sum(), torch.tensor(
            float(len(decoded)), device=decoded.device)])

    def take(self, prefix: str) -> dict[str, float | int]:
        totals, self._totals = self._totals, 0.0
        loss_sum, decoded, rows = totals.tolist() if isinstance(totals, torch.Tensor) else (0.0, 0, 0)
        metrics = {f"{prefix}_images": int(decoded), f"{prefix}_skipped_images": int(rows - decoded)}
        if decoded:
            metrics[f"{prefix}_loss"] = loss_sum / decoded
        return metrics
