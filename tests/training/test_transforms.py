"""DeiT-recipe transforms (timm), image decoding in `ImageTransform`, and mixup for batches of any size."""

import io
import logging
import pickle
import random

import numpy as np
import PIL.Image
import pytest
import timm
import torch
from skimage import data as skimage_data
from timm.data import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    RandomResizedCropAndInterpolation,
    resolve_data_config,
)
from timm.data.auto_augment import RandAugment
from torchvision import transforms as T

from training.args import AugmentationArguments
from training.transforms import (
    AnyBatchMixup,
    BatchTransform,
    ImageTransform,
    build_batch_transform,
    build_eval_transform,
    build_mixup,
    build_train_transform,
)


def encode(image: PIL.Image.Image, format: str) -> dict:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return {"bytes": buffer.getvalue(), "path": None}


def step_types(transform):
    return [type(step) for step in transform.transforms]


def test_train_transform_is_the_deit_recipe():
    transform = build_train_transform(AugmentationArguments())

    assert step_types(transform) == [
        RandomResizedCropAndInterpolation, T.RandomHorizontalFlip, RandAugment, timm.data.transforms.MaybePILToTensor,
    ]
    crop, flip, rand_augment, _ = transform.transforms
    assert (crop.size, crop.scale, crop.interpolation) == ((224, 224), (0.08, 1.0), T.InterpolationMode.BICUBIC)
    assert flip.p == 0.5
    # rand-m9-mstd0.5-inc1: two ops per image, magnitude 9 with std 0.5, the "increasing" variants of the ops.
    assert rand_augment.num_layers == 2
    assert {(op.magnitude, op.magnitude_std) for op in rand_augment.ops} == {(9, 0.5)}
    assert "SolarizeIncreasing" in {op.name for op in rand_augment.ops}
    # normalization and random erasing are per-batch steps
    batch_transform = build_batch_transform(AugmentationArguments(), num_classes=10)
    assert (batch_transform.mean, batch_transform.std) == (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    assert (batch_transform.erasing_probability, batch_transform.erasing_mode, batch_transform.erasing_count) == (
        0.25, "pixel", 1
    )


def test_each_mix_group_is_erased_and_mixed_alike_whichever_batch_holds_it():
    """Two groups in one micro-batch, or each alone in its own: the same pixels and targets (their draws come from
    their seeds); the two groups' draws differ."""
    transform = build_batch_transform(AugmentationArguments(reprob=1.0), num_classes=10)
    torch.manual_seed(0)
    pixels, labels = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8), torch.randint(0, 10, (16,))
    together = transform(pixels, labels, True, [(8, 11), (8, 12)])
    alone = [transform(pixels[rows], labels[rows], True, [(8, seed)])
             for rows, seed in [(slice(0, 8), 11), (slice(8, 16), 12)]]
    assert torch.equal(together[0], torch.cat([pixels for pixels, _ in alone]))
    assert torch.equal(together[1], torch.cat([targets for _, targets in alone]))
    assert not torch.equal(transform(pixels[:8], labels[:8], True, [(8, 12)])[0], alone[0][0])


def test_train_transform_pieces_turn_off():
    aug_args = AugmentationArguments(auto_augment="none", reprob=0, hflip=0, mixup=0, cutmix=0, input_size=32)
    transform = build_train_transform(aug_args)

    crop, jitter, *_ = transform.transforms
    assert RandAugment not in step_types(transform) and T.RandomHorizontalFlip not in step_types(transform)
    batch_transform = build_batch_transform(aug_args, num_classes=10)
    assert batch_transform.erasing_probability == 0 and batch_transform.mixup is None
    # Without auto-augment timm falls back to color jitter, 0.3 for brightness, contrast and saturation.
    assert isinstance(jitter, T.ColorJitter) and jitter.brightness == (0.7, 1.3) and jitter.hue is None
    assert crop.size == (32, 32)


def test_eval_transform_matches_timm_data_config_of_a_deit_model():
    pretrained_cfg = timm.models.get_pretrained_cfg("deit_small_distilled_patch16_224").to_dict()
    timm_transform = timm.data.create_transform(**resolve_data_config(pretrained_cfg=pretrained_cfg))
    transform = build_eval_transform(AugmentationArguments(eval_crop_pct=pretrained_cfg["crop_pct"]))
    photo = PIL.Image.fromarray(skimage_data.chelsea())  # 451 x 300, not square

    pixels = transform(photo)
    assert pixels.dtype == torch.uint8
    normalized, _ = BatchTransform()(pixels[None], torch.zeros(1), training=False)
    assert torch.equal(normalized[0], timm_transform(photo))
    # The DeiT recipe itself evaluates at crop 0.875: shorter side to 256, center 224.
    resize, crop, *_ = build_eval_transform(AugmentationArguments()).transforms
    assert (resize.size, resize.interpolation, crop.size) == (256, T.InterpolationMode.BICUBIC, (224, 224))


@pytest.mark.parametrize(
    "mode, format",
    [("L", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("CMYK", "JPEG"), ("I;16", "PNG"), ("RGB", "JPEG")],
)
def test_any_image_mode_becomes_three_channels(mode, format):
    photo = PIL.Image.fromarray(skimage_data.astronaut()).resize((40, 48))
    image = photo.convert(mode) if mode != "I;16" else PIL.Image.fromarray(
        np.asarray(photo.convert("L"), dtype=np.uint16) * 200
    )
    assert image.mode == mode
    transform = ImageTransform(build_eval_transform(AugmentationArguments(input_size=32)))

    output = transform({"image": [encode(image, format)], "label": [7]})

    assert output["pixel_values"][0].shape == (3, 32, 32) and output["labels"] == [7]


def test_sixteen_bit_images_are_scaled_not_clipped():
    gray = np.asarray(PIL.Image.fromarray(skimage_data.camera()).resize((32, 32)))
    sixteen_bit = PIL.Image.fromarray(gray.astype(np.uint16) * 257)  # 0..65535, the same picture
    assert sixteen_bit.mode == "I;16"
    transform = ImageTransform(T.PILToTensor())
    decoded = transform({"image": [encode(sixteen_bit, "PNG")], "label": [0]})["pixel_values"][0]
    expected = torch.from_numpy(gray.copy()).expand(3, -1, -1)
    assert torch.equal(decoded, expected)  # Pillow's own convert("RGB") would give 255 almost everywhere


def test_images_given_by_path_are_decoded(tmp_path):
    path = tmp_path / "rocket.jpg"
    PIL.Image.fromarray(skimage_data.rocket()).save(path)
    eval_transform = build_eval_transform(AugmentationArguments(input_size=32))

    output = ImageTransform(eval_transform)({"image": [{"bytes": None, "path": str(path)}], "label": [1]})

    assert torch.equal(output["pixel_values"][0], eval_transform(PIL.Image.open(path).convert("RGB")))


def test_undecodable_images_are_skipped_with_a_warning_naming_them(tmp_path, caplog):
    good = encode(PIL.Image.fromarray(skimage_data.coffee()), "JPEG")
    truncated = {"bytes": good["bytes"][:200], "path": None}
    (tmp_path / "garbage.jpg").write_bytes(b"this is not a jpeg")
    garbage = {"bytes": None, "path": str(tmp_path / "garbage.jpg")}
    transform = ImageTransform(build_eval_transform(AugmentationArguments(input_size=32)), "img", "cls")

    with caplog.at_level(logging.WARNING, logger="training.transforms"):
        output = transform({"img": [good, garbage, truncated], "cls": [0, 1, 2]})

    assert output["pixel_values"][0].shape == (3, 32, 32)
    assert output["pixel_values"][1:] == [None, None] and output["labels"] == [0, None, None]
    first, second = caplog.messages
    assert first.startswith(f"Skipping image '{tmp_path / 'garbage.jpg'}' (UnidentifiedImageError")
    assert second.startswith("Skipping image <200 bytes without a path> (OSError: ")


def test_image_transform_pickles_for_spawned_workers():
    transform = ImageTransform(build_train_transform(AugmentationArguments(input_size=32)))
    batch = {"image": [encode(PIL.Image.fromarray(skimage_data.astronaut()), "PNG")], "label": [3]}

    restored = pickle.loads(pickle.dumps(transform))

    assert restored(batch)["pixel_values"][0].shape == (3, 32, 32)


def test_no_mixup_when_both_alphas_are_zero():
    assert build_mixup(AugmentationArguments(mixup=0, cutmix=0), num_classes=10) is None
    mixup = build_mixup(AugmentationArguments(), num_classes=10)
    assert isinstance(mixup, AnyBatchMixup)
    assert (mixup.mixup_alpha, mixup.cutmix_alpha, mixup.switch_prob, mixup.label_smoothing) == (0.8, 1.0, 0.5, 0.1)


SMOOTH_ON, SMOOTH_OFF = 1 - 0.1 + 0.1 / 10, 0.1 / 10  # smoothing 0.1 over 10 classes


def mixed_batch(batch_size: int, **aug_kwargs):
    np.random.seed(0)  # timm draws lambda and the cutmix box with NumPy
    pixel_values = torch.randn(batch_size, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(batch_size) % 10
    mixup = build_mixup(AugmentationArguments(**aug_kwargs), num_classes=10)
    mixed, targets = mixup(pixel_values.clone(), labels)
    return pixel_values, labels, mixed, targets


@pytest.mark.parametrize("batch_size", [6, 5])
def test_mixup_mixes_each_sample_with_its_mirror(batch_size):
    pixel_values, labels, mixed, targets = mixed_batch(batch_size, cutmix=0)
    mixed_count = batch_size - batch_size % 2

    assert targets.shape == (batch_size, 10)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(batch_size))
    lam = (targets[0, labels[0]] - SMOOTH_OFF) / (SMOOTH_ON - SMOOTH_OFF)
    assert 0 < lam < 1
    for index in range(mixed_count):
        mirror = mixed_count - 1 - index
        torch.testing.assert_close(mixed[index], lam * pixel_values[index] + (1 - lam) * pixel_values[mirror])
        expected = torch.full((10,), SMOOTH_OFF)
        expected[labels[index]] += lam * (SMOOTH_ON - SMOOTH_OFF)
        expected[labels[mirror]] += (1 - lam) * (SMOOTH_ON - SMOOTH_OFF)
        torch.testing.assert_close(targets[index], expected)
    if batch_size % 2:
        # The odd sample out stays unmixed, with its smoothed one-hot target.
        torch.testing.assert_close(mixed[-1], pixel_values[-1])
        assert targets[-1, labels[-1]] == pytest.approx(SMOOTH_ON) and targets[-1].sum() == pytest.approx(1)


@pytest.mark.parametrize("batch_size", [1, 3, 7])
@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_cutmix_any_batch_size_and_mode(batch_size, mode):
    pixel_values, labels, mixed, targets = mixed_batch(batch_size, mixup=0, mixup_mode=mode)

    torch.testing.assert_close(targets.sum(dim=1), torch.ones(batch_size))
    assert batch_size == 1 or not torch.equal(mixed[:-1], pixel_values[:-1])
    # Cutmix pastes a box: every pixel comes from the sample itself or from its mirror.
    for index in range(batch_size - 1):
        mirror = batch_size - 2 - index
        from_self = mixed[index] == pixel_values[index]
        assert torch.all(from_self | (mixed[index] == pixel_values[mirror]))
    torch.testing.assert_close(mixed[-1], pixel_values[-1])
    assert targets[-1, labels[-1]] == pytest.approx(SMOOTH_ON)


def test_mixup_off_by_probability_gives_smoothed_one_hot_targets():
    pixel_values, labels, mixed, targets = mixed_batch(4, mixup_prob=0)

    torch.testing.assert_close(mixed, pixel_values)
    expected = torch.full((4, 10), SMOOTH_OFF)
    expected[torch.arange(4), labels] = SMOOTH_ON
    torch.testing.assert_close(targets, expected)


def test_augmentation_arguments_validation():
    assert AugmentationArguments(auto_augment="None").auto_augment is None
    with pytest.raises(ValueError, match=r"`reprob` is a probability and must be in \[0, 1\], got 1.5"):
        AugmentationArguments(reprob=1.5)
    with pytest.raises(ValueError, match=r"`scale` must be two fractions 0 < min <= max <= 1, got \[0.5\]"):
        AugmentationArguments(scale=[0.5])


def test_recipe_randaugment_posterize_to_zero_bits_gives_black_not_a_crash():
    # 'inc1' posterize keeps 4 - int(magnitude / 10 * 4) bits: 0 at magnitude 10, which mstd 0.5 noise reaches
    transform = build_train_transform(AugmentationArguments(input_size=32))
    rand_augment = next(t for t in transform.transforms if isinstance(t, RandAugment))
    posterize = next(op for op in rand_augment.ops if op.name == "PosterizeIncreasing")
    posterize.prob, posterize.magnitude, posterize.magnitude_std = 1.0, 10, 0
    photo = PIL.Image.fromarray(skimage_data.astronaut()).resize((32, 32))
    assert np.asarray(posterize(photo)).max() == 0
    assert pickle.loads(pickle.dumps(posterize)).aug_fn is posterize.aug_fn  # spawned workers get the same op
    from timm.data import auto_augment

    assert auto_augment.NAME_TO_OP["PosterizeIncreasing"] is auto_augment.posterize  # timm's table is restored


def seeded(seed: int, function, *args):
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    return function(*args)


def test_uint8_transform_then_batch_normalization_is_timms_float_transform():
    aug_args = AugmentationArguments(input_size=48, reprob=0)
    timm_transform = timm.data.create_transform(
        input_size=48, is_training=True, scale=tuple(aug_args.scale), hflip=aug_args.hflip,
        auto_augment=aug_args.auto_augment, interpolation=aug_args.train_interpolation, re_prob=0,
    )
    photos = [PIL.Image.fromarray(getattr(skimage_data, name)()) for name in ("astronaut", "chelsea", "coffee")]

    ours = torch.stack([seeded(seed, build_train_transform(aug_args), photo) for seed, photo in enumerate(photos)])
    theirs = torch.stack([seeded(seed, timm_transform, photo) for seed, photo in enumerate(photos)])

    assert ours.dtype == torch.uint8
    normalized, _ = build_batch_transform(aug_args, num_classes=10)(ours, torch.arange(3), training=False)
    assert torch.equal(normalized, theirs)  # bit for bit: a run gives the same numbers with either pipeline


def test_batch_transform_erases_and_mixes_training_batches_only():
    pixels = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 3])
    mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    normalized = (pixels.float() / 255 - mean) / std
    erasing = BatchTransform(erasing_probability=1.0, erasing_mode="const")

    evaluated, eval_labels = erasing(pixels, labels, training=False)
    torch.testing.assert_close(evaluated, normalized)
    assert eval_labels is labels

    erased, _ = seeded(0, erasing, pixels, labels, True)
    for image, reference in zip(erased, normalized, strict=True):
        changed = (image != reference).any(dim=0)
        rows, columns = changed.any(dim=1).nonzero(), changed.any(dim=0).nonzero()
        box = (rows.max() - rows.min() + 1) * (columns.max() - columns.min() + 1)
        assert 0 < changed.sum() <= box and (image[:, changed] == 0).all()  # one rectangle of zeros ("const")
        assert changed.sum() >= 0.9 * box  # (a zero-valued reference pixel may hide inside it)

    mixing = BatchTransform(mixup=build_mixup(AugmentationArguments(), num_classes=10))
    _, targets = seeded(0, mixing, pixels, labels, True)
    assert targets.shape == (4, 10)


def test_batch_transform_keeps_float_batches_and_refuses_other_dtypes():
    floats = torch.randn(2, 3, 8, 8)
    assert BatchTransform()(floats, torch.arange(2), training=False)[0] is floats
    with pytest.raises(TypeError, match="pixel_values of dtype torch.int64: expected uint8 pixels"):
        BatchTransform()(floats.long(), torch.arange(2), training=False)


class RecordSize:
    """A transform that keeps the size of each image it is given (and so shows which ones it was given)."""

    def __init__(self):
        self.sizes = []

    def __call__(self, image):
        self.sizes.append(image.size)
        return torch.zeros(3, 1, 1, dtype=torch.uint8)


def test_extreme_aspect_ratio_is_skipped_from_its_header(caplog):
    # 143 bytes that a short-side resize to 256 px would turn into 256 x 5,120,000 x 3 bytes (3.9 GB).
    sliver = encode(PIL.Image.new("L", (1, 20000)), "PNG")
    assert len(sliver["bytes"]) < 200
    recorder = RecordSize()

    with caplog.at_level(logging.WARNING, logger="training.transforms"):
        output = ImageTransform(recorder)({"image": [sliver], "label": [0]})

    assert output == {"pixel_values": [None], "labels": [None]} and recorder.sizes == []
    (message,) = caplog.messages
    assert "1x20000 pixels, more elongated than 1:100 (--max_image_aspect_ratio)" in message
    ImageTransform(recorder, max_aspect_ratio=20000)({"image": [sliver], "label": [0]})
    assert recorder.sizes == [(1, 20000)]  # the bound, not the file, skipped it


def test_too_many_pixels_are_skipped_and_big_jpegs_decoded_smaller(caplog):
    photo = PIL.Image.fromarray(skimage_data.astronaut()).resize((64, 48))
    recorder = RecordSize()
    transform = ImageTransform(recorder, max_pixels=1000)

    with caplog.at_level(logging.WARNING, logger="training.transforms"):
        output = transform({"image": [encode(photo, "PNG"), encode(photo, "JPEG")], "label": [0, 1]})

    # 3072 pixels: the PNG cannot decode smaller; the JPEG decodes at the largest scale that fits, 1/2 (768 pixels).
    assert output["labels"] == [None, 1]
    (message,) = caplog.messages
    assert "64x48 pixels, over the 1000 of --max_image_pixels" in message
    assert recorder.sizes == [(32, 24)]
    assert ImageTransform(recorder, max_pixels=47)({"image": [encode(photo, "JPEG")], "label": [0]})["labels"] == [None]
    assert ImageTransform(recorder, max_pixels=48)({"image": [encode(photo, "JPEG")], "label": [0]})["labels"] == [0]
    assert recorder.sizes[-1] == (8, 6)  # 1/8, the smallest JPEG's DCT scaling decodes to


def test_decompression_bomb_is_a_skip(monkeypatch, caplog):
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 100)  # Pillow refuses above twice this
    with caplog.at_level(logging.WARNING, logger="training.transforms"):
        output = ImageTransform(RecordSize())({"image": [encode(PIL.Image.new("RGB", (20, 20)), "PNG")], "label": [0]})
    assert output["labels"] == [None] and "DecompressionBombError" in caplog.messages[0]


def test_exif_orientation_is_applied():
    exif = PIL.Image.Exif()
    exif[PIL.Image.ExifTags.Base.Orientation] = 6  # stored on its side: rotate by 90 degrees to view
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (40, 20)).save(buffer, format="JPEG", exif=exif)
    recorder = RecordSize()
    ImageTransform(recorder)({"image": [{"bytes": buffer.getvalue(), "path": None}], "label": [0]})
    assert recorder.sizes == [(20, 40)]
