"""Input pipeline throughput per DataLoader worker: deit-hf's parquet path vs timm's ImageFolder path.

Both decode the same JPEGs and apply the DeiT recipe's training transform (random-resized crop, flip, RandAugment,
normalization, random erasing), batch them and stack them:

- deit-hf: a parquet file of JPEG bytes read by `datasets`, undecoded (`Image(decode=False)`, as `training.data`
  leaves it), with `training.transforms.ImageTransform` attached by `training.data.attach_transform` and batches
  collated by `training.collator.DistillationCollator`: the path `training.train` runs. Its workers stop at uint8
  tensors; normalization and random erasing are per-batch steps the trainer runs on the device
  (`training.transforms.BatchTransform`), timed in a second row as if the device were this CPU.
- timm: `timm.data.ImageDataset` on an imagefolder directory with `timm.data.create_transform`, default collation:
  float32 normalized and erased in the workers (the issue's peer); and the same with `use_prefetcher=True`, timm's
  own training-loader split (uint8 in the workers, the rest on the device), for a like-for-like ratio.

A DataLoader worker runs one torch thread, so each path runs in this process with one thread and no workers: the
figure is what one worker delivers.
"""

import io
import os
from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import torch
from skimage import data as skimage_data
from timm.data import ImageDataset, create_transform
from torch.utils.data import DataLoader

from training.args import AugmentationArguments
from training.collator import DistillationCollator
from training.data import attach_transform
from training.transforms import ImageTransform, build_batch_transform, build_train_transform, zero_bit_posterize

from . import Measurement, time_interleaved

# Photographs shipped with scikit-image (a test extra, installed by `make bench`), so the JPEGs hold natural images.
SOURCE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
IMAGE_SIZE = (500, 375)  # ImageNet's typical width x height
JPEG_QUALITY = 90
NUM_CLASSES = 4
DEIT_HF, DEIT_HF_WITH_BATCH_STEPS = "deit_hf parquet", "deit_hf parquet + batch steps on this CPU"
TIMM, TIMM_PREFETCHER = "timm ImageFolder", "timm ImageFolder prefetcher"


def write_jpegs(directory: Path, count: int, seed: int = 0) -> tuple[Path, Path]:
    """Write `count` JPEGs as an imagefolder under `directory` and as one parquet file; returns both paths.

    Each image is a random crop of a scikit-image photograph, resized to 500x375 (a quarter of them portrait),
    randomly flipped and tinted, saved at quality 90: ImageNet's pixel sizes (the files, ~44 KiB, are smaller than
    ImageNet's ~110 KiB: the upscaled crops are smoother than photographs at their native resolution).
    """
    rng = np.random.default_rng(seed)
    photos = [getattr(skimage_data, name)() for name in SOURCE_PHOTOS]
    folder = directory / "imagefolder"
    rows = {"image": [], "label": []}
    for index in range(count):
        photo = photos[rng.integers(len(photos))]
        height, width = photo.shape[:2]
        crop_height, crop_width = int(height * rng.uniform(0.6, 1.0)), int(width * rng.uniform(0.6, 1.0))
        top, left = rng.integers(height - crop_height + 1), rng.integers(width - crop_width + 1)
        pixels = photo[top : top + crop_height, left : left + crop_width].astype(np.float32)
        pixels = np.clip(pixels * rng.uniform(0.8, 1.2, size=3), 0, 255).astype(np.uint8)
        if rng.random() < 0.5:
            pixels = pixels[:, ::-1]
        size = IMAGE_SIZE if rng.random() < 0.75 else IMAGE_SIZE[::-1]
        image = PIL.Image.fromarray(np.ascontiguousarray(pixels)).resize(size, PIL.Image.BICUBIC)
        encoded = io.BytesIO()
        image.save(encoded, format="JPEG", quality=JPEG_QUALITY)
        label = index % NUM_CLASSES
        class_folder = folder / f"class_{label}"
        class_folder.mkdir(parents=True, exist_ok=True)
        (class_folder / f"image_{index:04d}.jpg").write_bytes(encoded.getvalue())
        rows["image"].append({"bytes": encoded.getvalue(), "path": None})
        rows["label"].append(label)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[f"class_{k}" for k in range(NUM_CLASSES)])}
    )
    parquet = directory / "train.parquet"
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(parquet))
    return folder, parquet


def deit_hf_loader(parquet: Path, aug_args: AugmentationArguments, batch_size: int) -> DataLoader:
    """The training input path of deit-hf on a parquet file, without workers (datasets caches beside the file)."""
    dataset = datasets.load_dataset(
        "parquet", data_files=str(parquet), split="train", cache_dir=str(parquet.parent / "cache")
    )
    dataset = dataset.cast_column("image", datasets.Image(decode=False))
    dataset = attach_transform(dataset, ImageTransform(build_train_transform(aug_args)))
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=DistillationCollator())


def timm_loader(folder: Path, aug_args: AugmentationArguments, batch_size: int, use_prefetcher: bool) -> DataLoader:
    """timm's ImageFolder path with the recipe's transform settings, without workers.

    Built with deit-hf's posterize fix, as ours: timm's own RandAugment asks Pillow 13 for 0-bit posterize, which
    raises, about once in 700 images (a crash within the first pass).
    """
    with zero_bit_posterize():
        transform = create_transform(
            input_size=aug_args.input_size, is_training=True, scale=tuple(aug_args.scale), hflip=aug_args.hflip,
            color_jitter=aug_args.color_jitter, auto_augment=aug_args.auto_augment,
            interpolation=aug_args.train_interpolation, re_prob=aug_args.reprob, re_mode=aug_args.remode,
            re_count=aug_args.recount, use_prefetcher=use_prefetcher,
        )
    dataset = ImageDataset(str(folder), transform=transform)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True)


def run(
    directory: str | os.PathLike,
    num_images: int = 200,
    input_size: int = 224,
    batch_size: int = 32,
    warmup: int = 1,
    repeats: int = 5,
    busy_retries: int | None = None,
) -> Iterator[Measurement]:
    """Yield img/s of one pass over `num_images` JPEGs per path; deit-hf's row carries its ratio to timm's."""
    folder, parquet = write_jpegs(Path(directory), num_images)
    aug_args = AugmentationArguments(input_size=input_size)  # the DeiT recipe's defaults
    deit_hf = deit_hf_loader(parquet, aug_args, batch_size)
    batch_transform = build_batch_transform(aug_args, NUM_CLASSES)
    batch_transform.mixup = None  # mixing is the trainer's, not part of the input pipeline on either side
    loaders = {
        DEIT_HF: (deit_hf, None),
        DEIT_HF_WITH_BATCH_STEPS: (deit_hf, batch_transform),
        TIMM: (timm_loader(folder, aug_args, batch_size, use_prefetcher=False), None),
        TIMM_PREFETCHER: (timm_loader(folder, aug_args, batch_size, use_prefetcher=True), None),
    }

    def one_pass(loader, batch_steps):
        def call():
            images = 0
            for batch in loader:
                pixel_values, labels = (batch["pixel_values"], batch["labels"]) if isinstance(batch, dict) else batch
                if batch_steps is not None:
                    batch_steps(pixel_values, labels, training=True)
                images += len(pixel_values)
            if images != num_images:
                raise RuntimeError(f"A pass read {images} images instead of {num_images}.")

        return call

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what a DataLoader worker runs with
    try:
        timing = time_interleaved(
            {name: one_pass(*loader) for name, loader in loaders.items()}, warmup, repeats, busy_retries
        )
    finally:
        torch.set_num_threads(threads)
    seconds = timing.seconds
    case = f"recipe train transform {input_size}px, {num_images} JPEGs {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} q{JPEG_QUALITY}"
    # Like with like: workers that stop at uint8 against timm's prefetcher split; all the work on this CPU against
    # timm's default transform. The target is per worker against the default.
    peers = {DEIT_HF: (TIMM, TIMM_PREFETCHER), DEIT_HF_WITH_BATCH_STEPS: (TIMM,)}
    for name, value in seconds.items():
        ratios = {f"ratio_vs_{peer.replace(' ', '_')}": seconds[peer] / value for peer in peers.get(name, ())}
        yield timing.measurement("input", case, name, num_images, **ratios)
