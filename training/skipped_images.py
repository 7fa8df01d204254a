"""Skipped images summed over DataLoader workers and processes, reported per epoch, and a stop when too many are.

`ImageTransform` skips images that do not decode or are out of bounds; `DistillationCollator` drops them and puts
their number in each batch (`skipped_images`), since the workers' own counters never reach the main process.
`SkippedImageCounter` adds those counts up on the device and reads them on the host only when the trainer logs.
Evaluation batches keep their skipped images as ignored rows instead, counted by `training.evaluation`.
"""

import logging
import math

import torch
from accelerate import PartialState
from accelerate.utils import reduce, slice_tensors
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

# An epoch's decodable fraction is checked at its end, and at each log once this many of its images were read:
# early enough to stop a hopeless run within minutes, late enough that a few bad images at the start do not.
MIN_IMAGES_FOR_EARLY_CHECK = 1000


def slice_dispatched_batch(batch: dict, data_slice: slice, process_index: int = 0, num_processes: int = 1) -> dict:
    """accelerate's slicing of a dispatched batch (`slice_fn_for_dispatch`: process 0 reads a stream's batches, each
    process keeps a slice of the images), except for the `skipped_images` count, which is not per image.

    accelerate slices every tensor by the number of images that decoded, so a batch in which none did would lose its
    count (and a stream whose images mostly fail would never stop the run). Process 0 keeps the whole count, the
    others none: summed over processes, each skipped image counts once.
    """
    sliced = slice_tensors({key: value for key, value in batch.items() if key != "skipped_images"}, data_slice)
    if "skipped_images" in batch:
        skipped = batch["skipped_images"]
        sliced["skipped_images"] = skipped if process_index == 0 else skipped[:0]
    return sliced


class TooFewDecodableImagesError(RuntimeError):
    """Fewer of an epoch's or an evaluation's images could be used than `--min_decodable_fraction` asks for."""


class SkippedImageCounter(TrainerCallback):
    """Counts the images skipped in training, over all DataLoader workers and processes, and checks evaluations'.

    The trainer passes each training batch to `record`, which pops the collator's `skipped_images` and adds it to a
    total kept on the device (no host synchronisation per step), and each log to `report`, which sums the totals
    over processes (one all-reduce per log) and adds them to the log:

    - training logs get `skipped_images`, the count of the epoch so far; a log is forced at each epoch end, so the
      last value of an epoch is its total, also logged as a line (`Epoch 3: 12 of 5000 images skipped`);
    - `train()`'s closing metrics get `train_skipped_images`, the total of the run;
    - `evaluate()`'s metrics come with `eval_images` and `eval_skipped_images` (with its metric prefix; counted by
      `training.evaluation.EvaluationTally`, each validation image once), which `report` checks.

    When a smaller fraction of an epoch's images than `min_decodable_fraction` could be used (checked at the epoch
    end, and at each log once `MIN_IMAGES_FOR_EARLY_CHECK` images were read), or of an evaluation's, the run stops
    with `TooFewDecodableImagesError`: a dataset that is mostly corrupt never yields a quietly untrained model.
    Every process sees the same sums, so all of them stop at the same point. The training counts are of images read:
    in a run over several processes, the images accelerate repeats to even out a last, partial batch
    (`even_batches`) are read, and counted, twice.
    """

    def __init__(self, min_decodable_fraction: float = 0.9):
        self.min_decodable_fraction = min_decodable_fraction
        self._pending = [0, 0]  # skipped (a device tensor, or 0), decoded: this process, since the last log
        self._epoch_counts = [0, 0]  # skipped, decoded: all processes, this epoch
        self._run_skipped = 0
        self._epoch_number = 1

    def record(self, inputs: dict) -> None:
        """Take the `skipped_images` count out of a training batch (the model does not expect it) and add it up."""
        skipped = inputs.pop("skipped_images", None)
        if skipped is not None:
            self._pending[0] = self._pending[0] + skipped.sum()
        self._pending[1] += len(inputs["labels"])  # a shape, known on the host

    def report(self, logs: dict) -> None:
        """Add the skipped-image counts to a log of the trainer's, and stop the run if too few images decoded."""
        if "loss" in logs:  # a training log
            self._add_to_epoch(*self._collect())
            logs["skipped_images"] = self._epoch_counts[0]
            self._check(*self._epoch_counts, f"epoch {self._epoch_number}", complete=False)
        elif "train_runtime" in logs:  # train()'s closing metrics
            logs["train_skipped_images"] = self._run_skipped
        else:
            prefix = next((key[: -len("_runtime")] for key in logs if key.endswith("_runtime")), None)
            if prefix is not None and f"{prefix}_images" in logs:  # evaluate()'s metrics
                self._check(logs[f"{prefix}_skipped_images"], logs[f"{prefix}_images"], "the evaluation", complete=True)

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._epoch_counts = [0, 0]
        self._epoch_number = math.floor(state.epoch or 0) + 1

    def on_epoch_end(self, args, state, control, **kwargs):
        self._add_to_epoch(*self._collect())
        skipped, decoded = self._epoch_counts
        if skipped:
            logger.warning(
                "Epoch %d: %d of %d images skipped (%.2f %%), summed over DataLoader workers and processes.",
                self._epoch_number, skipped, skipped + decoded, 100 * skipped / (skipped + decoded),
            )
        self._check(skipped, decoded, f"epoch {self._epoch_number}", complete=True)
        control.should_log = True  # the epoch's total reaches the logged metrics

    def _collect(self) -> tuple[int, int]:
        (skipped, decoded), self._pending = self._pending, [0, 0]
        counts = torch.tensor([0, decoded], device=PartialState().device)
        counts[0] += skipped
        skipped, decoded = reduce(counts, reduction="sum").tolist()
        return skipped, decoded

    def _add_to_epoch(self, skipped: int, decoded: int) -> None:
        self._epoch_counts = [self._epoch_counts[0] + skipped, self._epoch_counts[1] + decoded]
        self._run_skipped += skipped

    def _check(self, skipped: int, decoded: int, where: str, complete: bool) -> None:
        read = skipped + decoded
        if read == 0 or (not complete and read < MIN_IMAGES_FOR_EARLY_CHECK):
            return
        if decoded / read < self.min_decodable_fraction:
            raise TooFewDecodableImagesError(
                f"Only {decoded} of the {read} images read in {where} could be used ({decoded / read:.1%}; the rest "
                f"did not decode or were out of bounds), under --min_decodable_fraction {self.min_decodable_fraction:g}"
                ": stopping. The warnings of training.transforms name the skipped images; a lower "
                "--min_decodable_fraction trains on what decodes."
            )
