"""Batch collation for image classification with a teacher: stack what decoded, drop and count what did not."""

from dataclasses import dataclass

import torch

# transformers' ignore index: the label of a row that holds no image (`DistillationCollator.blank_shape`).
IGNORE_INDEX = -100


@dataclass
class DistillationCollator:
    """Stack `pixel_values` and `labels` (int64) of the samples that `ImageTransform` could decode.

    uint8 pixel values (the recipe's transforms) stay uint8: the trainer normalizes them on the device
    (`training.transforms.BatchTransform`), after a copy of a quarter of float32's bytes. Floating-point ones become
    float32 (other dtypes are refused by `BatchTransform`). Samples whose `pixel_values` is `None` (images skipped by
    `ImageTransform`) are dropped, so a batch can be smaller than the DataLoader's batch size, and odd
    (`AnyBatchMixup` handles that). How many were dropped is `skipped_images`, an int64 tensor of shape (1,): the
    collator runs in the DataLoader workers, whose Python counters the main process never sees, so the count travels
    with the batch for `training.skipped_images.SkippedImageCounter` to sum. A batch with no decodable image at all
    comes back empty: `pixel_values` of shape (0,) and `labels` of shape (0,); the trainer skips a batch whose
    `labels` has no element.

    With `blank_shape` (one image's `(channels, height, width)`), as in evaluation, nothing is dropped: a skipped
    image becomes a row of zeros of that shape labelled `IGNORE_INDEX`, so the batch keeps the DataLoader's size and
    order, which accelerate's gathering over processes needs (`DistillationTrainer.prediction_step` runs the model on
    the other rows only), and there is no `skipped_images`: the ignored labels are the count.

    Training samples read through `training.randomness.SeededViews` carry their mix group, `(epoch, group)`; the
    batch then says which rows form each group, in order: `mix_groups`, a tuple of `(epoch, group, rows)` (rows that
    decoded; a group none of whose images decoded has 0), plain ints, read on the host without a device sync.
    """

    blank_shape: tuple[int, ...] | None = None

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        if self.blank_shape is not None:
            return self._keep_size(samples)
        kept = [sample for sample in samples if sample["pixel_values"] is not None]
        skipped_images = torch.tensor([len(samples) - len(kept)], dtype=torch.int64)
        groups = {"mix_groups": _mix_groups(samples)} if samples and "mix_group" in samples[0] else {}
        if not kept:
            return {
                "pixel_values": torch.empty(0),
                "labels": torch.empty(0, dtype=torch.int64),
                "skipped_images": skipped_images,
                **groups,
            }
        labels = torch.tensor([sample["labels"] for sample in kept], dtype=torch.int64)
        return {"pixel_values": _stack([sample["pixel_values"] for sample in kept]), "labels": labels,
                "skipped_images": skipped_images, **groups}

    def _keep_size(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        pixel_values = [sample["pixel_values"] for sample in samples]
        dtype = next((torch.as_tensor(values).dtype for values in pixel_values if values is not None), torch.uint8)
        blank = torch.zeros(self.blank_shape, dtype=dtype)
        labels = [IGNORE_INDEX if sample["pixel_values"] is None else sample["labels"] for sample in samples]
        return {"pixel_values": _stack([blank if values is None else values for values in pixel_values]),
                "labels": torch.tensor(labels, dtype=torch.int64)}


def _mix_groups(samples: list[dict]) -> tuple[tuple[int, int, int], ...]:
    """`(epoch, group, rows that decoded)` of each run of samples of one mix group, in order."""
    groups: list[list[int]] = []
    for sample in samples:
        epoch, group = sample["mix_group"]
        if not groups or groups[-1][:2] != [epoch, group]:
            groups.append([epoch, group, 0])
        groups[-1][2] += sample["pixel_values"] is not None
    return tuple(tuple(group) for group in groups)


def _stack(pixel_values: list) -> torch.Tensor:
    stacked = torch.stack([torch.as_tensor(values) for values in pixel_values])
    return stacked.float() if stacked.is_floating_point() else stacked
