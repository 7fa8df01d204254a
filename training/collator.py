"""Batch collation for image classification with a teacher: stack what decoded, drop and count what did not."""

from dataclasses import dataclass

import torch


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
    """

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        kept = [sample for sample in samples if sample["pixel_values"] is not None]
        skipped_images = torch.tensor([len(samples) - len(kept)], dtype=torch.int64)
        if not kept:
            return {
                "pixel_values": torch.empty(0),
                "labels": torch.empty(0, dtype=torch.int64),
                "skipped_images": skipped_images,
            }
        pixel_values = torch.stack([torch.as_tensor(sample["pixel_values"]) for sample in kept])
        if pixel_values.is_floating_point():
            pixel_values = pixel_values.float()
        labels = torch.tensor([sample["labels"] for sample in kept], dtype=torch.int64)
        return {"pixel_values": pixel_values, "labels": labels, "skipped_images": skipped_images}
