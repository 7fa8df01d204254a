"""The DeiT recipe's image transforms, built with timm, in two parts: per image in the workers, per batch on the device.

`ImageTransform` is what a dataset runs on each batch of rows, in the DataLoader workers: it decodes the images
(kept undecoded by `training.data`), replaces undecodable ones by `None` for `DistillationCollator` to drop, and
applies a timm transform ending in a uint8 tensor. `BatchTransform` is what the trainer applies on the device to
whole batches: normalization, then, when training, random erasing and Mixup/CutMix (for batches of any size).
"""

import contextlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from io import BytesIO

import PIL.Image
import PIL.ImageOps
import torch
from datasets.utils.file_utils import is_local_path, xopen
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, auto_augment, create_transform
from timm.data.mixup import mixup_target
from timm.data.random_erasing import RandomErasing

from deit_hf.image_processing_deit import convert_to_rgb

from .args import AugmentationArguments, DataArguments
from .randomness import seed_global_rngs

logger = logging.getLogger(__name__)

# DeiT evaluates with bicubic resizing whatever the training interpolation (which may be "random").
EVAL_INTERPOLATION = "bicubic"


def _posterize(image: PIL.Image.Image, bits_to_keep: int, **kwargs) -> PIL.Image.Image:
    # Keeping 0 bits makes the image black, as Pillow did when the recipe was written; Pillow 13 raises instead.
    if bits_to_keep <= 0:
        return PIL.Image.new(image.mode, image.size)
    return auto_augment.posterize(image, bits_to_keep, **kwargs)


@contextlib.contextmanager
def zero_bit_posterize():
    """Build auto-augment ops whose posterize takes 0 bits: RandAugment 'inc1' asks for that at magnitude 10
    (about 1 image in 700 with the recipe's `rand-m9-mstd0.5-inc1`). Ops keep the function they were built with,
    so timm's table is restored on exit."""
    names = ("Posterize", "PosterizeIncreasing", "PosterizeOriginal")
    saved = {name: auto_augment.NAME_TO_OP[name] for name in names}
    auto_augment.NAME_TO_OP.update(dict.fromkeys(names, _posterize))
    try:
        yield
    finally:
        auto_augment.NAME_TO_OP.update(saved)


def build_train_transform(aug_args: AugmentationArguments) -> Callable:
    """Random-resized crop, horizontal flip, auto-augment (or color jitter), to a uint8 tensor.

    Normalization and random erasing are per-batch steps of `BatchTransform`, on the device.
    """
    with zero_bit_posterize():
        return create_transform(
            input_size=aug_args.input_size,
            is_training=True,
            scale=tuple(aug_args.scale),
            hflip=aug_args.hflip,
            color_jitter=aug_args.color_jitter,
            auto_augment=aug_args.auto_augment,
            interpolation=aug_args.train_interpolation,
            use_prefetcher=True,  # uint8 out, as timm's own training loader: a quarter of float32's bytes to move
        )


def build_eval_transform(aug_args: AugmentationArguments) -> Callable:
    """Resize the shorter side to `int(input_size / eval_crop_pct)` (bicubic), center-crop, to a uint8 tensor."""
    return create_transform(
        input_size=aug_args.input_size,
        is_training=False,
        interpolation=EVAL_INTERPOLATION,
        crop_pct=aug_args.eval_crop_pct,
        use_prefetcher=True,
    )


@dataclass
class ImageTransform:
    """Decode a batch of undecoded images to RGB and transform them: `{"pixel_values": [...], "labels": [...]}`.

    Meant for `Dataset.with_transform` (see `training.data.attach_transform`), so it runs where examples are read:
    in the DataLoader workers. Images come as `datasets.Image(decode=False)` values, `{"bytes", "path"}`; any Pillow
    mode (L, RGBA, P, CMYK, I;16, ...) is converted to RGB. An image that cannot be decoded, or whose header shows
    more than `max_pixels` pixels or a side more than `max_aspect_ratio` times the other, gives `None` for both its
    pixel values and its label, and a warning naming it; `DistillationCollator` drops it and counts it. The bounds
    are read from the header, before any pixel is decoded; a JPEG over `max_pixels` is decoded at 1/2, 1/4 or 1/8
    scale instead (its DCT scaling costs only the smaller image).
    """

    transform: Callable
    image_column: str = "image"
    label_column: str = "label"
    max_pixels: int = DataArguments.max_image_pixels
    max_aspect_ratio: float = DataArguments.max_image_aspect_ratio

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        pixel_values, labels = [], []
        for image, label in zip(batch[self.image_column], batch[self.label_column], strict=True):
            decoded = self._decode(image)
            pixel_values.append(None if decoded is None else self.transform(decoded))
            labels.append(None if decoded is None else label)
        return {"pixel_values": pixel_values, "labels": labels}

    def _decode(self, image) -> PIL.Image.Image | None:
        try:
            return convert_to_rgb(self._load_within_bounds(_open_lazily(image)))
        except Exception as error:  # Pillow raises many types on bad files; none of them must stop a long run.
            logger.warning("Skipping image %s (%s: %s).", _describe(image), type(error).__name__, error)
            return None

    def _load_within_bounds(self, image: PIL.Image.Image) -> PIL.Image.Image:
        width, height = image.size
        if max(width, height) > self.max_aspect_ratio * min(width, height):
            raise ImageOutOfBoundsError(
                f"{width}x{height} pixels, more elongated than 1:{self.max_aspect_ratio:g} (--max_image_aspect_ratio)"
            )
        if width * height > self.max_pixels and image.format == "JPEG":
            scale = next((scale for scale in (2, 4, 8) if _scaled_pixels(image.size, scale) <= self.max_pixels), 8)
            image.draft(None, (max(1, width // scale), max(1, height // scale)))
        if image.size[0] * image.size[1] > self.max_pixels:
            raise ImageOutOfBoundsError(
                f"{width}x{height} pixels, over the {self.max_pixels} of --max_image_pixels"
            )
        image.load()
        # As datasets' decoder: the EXIF orientation is applied.
        if image.getexif().get(PIL.Image.ExifTags.Base.Orientation) is not None:
            image = PIL.ImageOps.exif_transpose(image)
        return image


class ImageOutOfBoundsError(ValueError):
    """An image whose size or aspect ratio would cost too much memory to decode and transform."""


def _open_lazily(value) -> PIL.Image.Image:
    """`PIL.Image.open` a `datasets.Image(decode=False)` value: the header is read, the pixels are not."""
    if isinstance(value, str):
        value = {"path": value, "bytes": None}
    if value.get("bytes") is not None:
        return PIL.Image.open(BytesIO(value["bytes"]))
    if not value.get("path"):
        raise ValueError(f"An image needs one of 'path' or 'bytes'; both are empty in {value}.")
    if is_local_path(value["path"]):
        return PIL.Image.open(value["path"])
    # URLs and hf:// paths, through datasets' own opener; read whole, as datasets does.
    with xopen(value["path"], "rb") as file:
        return PIL.Image.open(BytesIO(file.read()))


def _scaled_pixels(size: tuple[int, int], scale: int) -> int:
    return math.ceil(size[0] / scale) * math.ceil(size[1] / scale)


def _describe(image) -> str:
    if isinstance(image, dict):
        if image.get("path"):
            return repr(image["path"])
        if image.get("bytes") is not None:
            return f"<{len(image['bytes'])} bytes without a path>"
    return repr(image)


class AnyBatchMixup(Mixup):
    """timm's `Mixup`/CutMix for batches of any size, returning soft targets (smoothed, mixed one-hot rows).

    timm requires an even batch because it mixes each sample with its mirror in the batch (`x.flip(0)`). An odd
    batch (a last partial batch, or one a dropped corrupt image made odd) mixes its first `n - 1` samples and gives
    the last one, unmixed, its smoothed one-hot target: no sample is dropped and no sample is mixed with itself.
    Mixes `pixel_values` in place, as timm does.
    """

    def __call__(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if len(pixel_values) % 2 == 0:
            return super().__call__(pixel_values, labels)
        targets = mixup_target(labels, self.num_classes, lam=1.0, smoothing=self.label_smoothing)
        if len(pixel_values) > 1:
            pixel_values[:-1], targets[:-1] = super().__call__(pixel_values[:-1], labels[:-1])
        return pixel_values, targets


def build_mixup(aug_args: AugmentationArguments, num_classes: int) -> AnyBatchMixup | None:
    """The recipe's mixup/cutmix as a `(pixel_values, labels) -> (pixel_values, soft_targets)` callable.

    `None` when both alphas are 0: the model then trains on hard labels.
    """
    if aug_args.mixup == 0 and aug_args.cutmix == 0:
        return None
    return AnyBatchMixup(
        mixup_alpha=aug_args.mixup,
        cutmix_alpha=aug_args.cutmix,
        prob=aug_args.mixup_prob,
        switch_prob=aug_args.mixup_switch_prob,
        mode=aug_args.mixup_mode,
        label_smoothing=aug_args.smoothing,
        num_classes=num_classes,
    )


@dataclass
class BatchTransform:
    """The per-batch end of the recipe's transform, run by the trainer on the device, as timm's `PrefetchLoader` does.

    uint8 pixel values (what `build_train_transform` / `build_eval_transform` make) become floats normalized with
    `mean` and `std`; floating-point pixel values are taken as normalized already (an image processor's output, say).
    Training batches then get random erasing (timm's, in normalized space: `erasing_probability` per image) and
    `mixup`, which turns the labels into soft targets; given `group_seeds` (`(rows, seed)` of each mix group, in
    order: `training.randomness.MixGroups`), each group is erased and mixed on its own, its draws from its seed, so
    that a group is mixed alike in whichever micro-batch holds it. Evaluation batches are only normalized.
    """

    mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, ...] = IMAGENET_DEFAULT_STD
    erasing_probability: float = 0.0
    erasing_mode: str = "pixel"
    erasing_count: int = 1
    mixup: AnyBatchMixup | None = None
    _on_device: dict = field(default_factory=dict, init=False, repr=False)

    def __call__(
        self, pixel_values: torch.Tensor, labels: torch.Tensor, training: bool,
        group_seeds: Sequence[tuple[int, int]] = (),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std, random_erasing = self._for_device(pixel_values.device)
        if pixel_values.dtype == torch.uint8:
            # The operations of torchvision's ToTensor + Normalize, in their order: the same floats, bit for bit.
            pixel_values = pixel_values.float().div_(255).sub_(mean).div_(std)
        elif not pixel_values.is_floating_point():
            raise TypeError(
                f"pixel_values of dtype {pixel_values.dtype}: expected uint8 pixels (0-255) or normalized floats."
            )
        if not training or (random_erasing is None and self.mixup is None):
            return pixel_values, labels
        if not group_seeds:
            return self._augment(pixel_values, labels, random_erasing)
        targets, start = [], 0
        for rows, seed in group_seeds:
            if rows:
                seed_global_rngs(seed, devices=True)
                group = slice(start, start + rows)
                pixel_values[group], group_targets = self._augment(pixel_values[group], labels[group], random_erasing)
                targets.append(group_targets)
            start += rows
        return pixel_values, torch.cat(targets)

    def _augment(self, pixel_values: torch.Tensor, labels: torch.Tensor, random_erasing) -> tuple:
        if random_erasing is not None:
            pixel_values = random_erasing(pixel_values)
        if self.mixup is not None:
            pixel_values, labels = self.mixup(pixel_values, labels)
        return pixel_values, labels

    def _for_device(self, device: torch.device) -> tuple:
        # Built once per device, so no step copies constants from the host.
        if device not in self._on_device:
            mean = torch.tensor(self.mean, device=device).view(1, -1, 1, 1)
            std = torch.tensor(self.std, device=device).view(1, -1, 1, 1)
            random_erasing = None
            if self.erasing_probability > 0:
                random_erasing = RandomErasing(
                    self.erasing_probability, mode=self.erasing_mode, max_count=self.erasing_count, device=device
                )
            self._on_device[device] = mean, std, random_erasing
        return self._on_device[device]


def build_batch_transform(
    aug_args: AugmentationArguments,
    num_classes: int,
    mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN,
    std: tuple[float, ...] = IMAGENET_DEFAULT_STD,
) -> BatchTransform:
    """The recipe's per-batch steps: normalization, random erasing, Mixup/CutMix with label smoothing."""
    return BatchTransform(
        mean=tuple(mean),
        std=tuple(std),
        erasing_probability=aug_args.reprob,
        erasing_mode=aug_args.remode,
        erasing_count=aug_args.recount,
        mixup=build_mixup(aug_args, num_classes),
    )
