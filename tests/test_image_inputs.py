"""The input rules both DeiT processors share (`deit_hf/image_processing_deit.py` docstring): by property over
sizes, dtypes, PIL modes, layouts and memory orders, the PIL processor equals a plainly written reference conversion
plus timm's eval transform, and the torchvision one equals itself on the reference picture; or the documented error."""

import numpy as np
import PIL.Image
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deit_hf.image_processing_deit import MAX_ASPECT_RATIO, DeiTHfImageProcessorPil, convert_to_rgb
from deit_hf.image_processing_deit_fast import DeiTHfImageProcessor

from .test_image_processing import (
    FAST_MAX_DIFF,
    PIL_TIMM_ATOL,
    PROCESSORS,
    SMALL,
    pixels,
)

DTYPES = ["uint8", "bool", "uint16", "int8", "int16", "int32", "int64", "uint32", "float16", "float32", "float64"]


def reference_picture(pixels: np.ndarray, channels_first: bool) -> PIL.Image.Image:
    """The documented rule written plainly: 8-bit levels by dtype (floats by range), then PIL's RGB."""
    if pixels.dtype == np.bool_:
        levels = pixels.astype(np.float32) * 255
    elif pixels.dtype == np.uint16:
        levels = pixels.astype(np.float32) * np.float32(255 / 65535)
    elif pixels.dtype.kind == "f" and pixels.max() <= 1:
        levels = pixels.astype(np.float32) * np.float32(255)
    else:
        levels = pixels.astype(np.float32)
    levels = np.rint(levels).astype(np.uint8)
    if levels.ndim == 3 and channels_first:
        levels = np.moveaxis(levels, 0, -1)
    if levels.ndim == 3 and levels.shape[-1] == 1:
        levels = levels[..., 0]
    picture = PIL.Image.fromarray(np.ascontiguousarray(levels))
    if picture.mode == "RGBA":
        white = PIL.Image.new("RGBA", picture.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, picture).convert("RGB")
    return picture.convert("RGB")


def random_pixels(seed: int, shape: tuple, dtype: str, unit_floats: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        return rng.random(shape) > 0.5
    if dtype == "uint16":
        return rng.integers(0, 65536, shape).astype(np.uint16)
    if dtype.startswith("float"):
        pixels = rng.random(shape) if unit_floats else rng.random(shape) * 255
        pixels.flat[0] = 1.0 if unit_floats else 255.0  # the top of its range, so the range is what the test says
        return pixels.astype(dtype)
    return rng.integers(0, 128 if dtype == "int8" else 256, shape).astype(dtype)


def lay_out(pixels: np.ndarray, memory: str, container: str):
    """The same values in another memory order (torch has no negative strides: a transposed view for both) or as a
    tensor (torch has no uint32 arithmetic: int64)."""
    if container == "torch":
        pixels = pixels.astype(np.int64) if pixels.dtype == np.uint32 else pixels
        if memory == "C":
            return torch.from_numpy(np.ascontiguousarray(pixels))
        return torch.from_numpy(np.ascontiguousarray(pixels.T)).permute(*reversed(range(pixels.ndim)))
    if memory == "fortran":
        return np.asfortranarray(pixels)
    if memory == "negative strides":
        return np.flip(np.ascontiguousarray(np.flip(pixels)))
    return pixels


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    height=st.integers(1, 16),  # aspect ratios up to MAX_ASPECT_RATIO: no cap (tested below)
    width=st.integers(1, 16),
    channels=st.sampled_from([None, 1, 3, 4]),
    dtype=st.sampled_from(DTYPES),
    unit_floats=st.booleans(),
    channels_first=st.booleans(),
    memory=st.sampled_from(["C", "fortran", "negative strides"]),
    container=st.sampled_from(["numpy", "torch"]),
)
def test_every_input_kind_is_the_reference_picture(
    timm_eval_transform, seed, height, width, channels, dtype, unit_floats, channels_first, memory, container
):
    shape = (height, width, channels) if channels else (height, width)
    shape = (channels, height, width) if channels and channels_first else shape
    values = random_pixels(seed, shape, dtype, unit_floats)
    picture = reference_picture(values, channels_first)
    image = lay_out(values, memory, container)
    layout = {"input_data_format": "channels_first" if channels_first else "channels_last"} if channels else {}
    slow, fast = DeiTHfImageProcessorPil(**SMALL), DeiTHfImageProcessor(**SMALL)

    torch.testing.assert_close(
        pixels(slow, image, **layout), timm_eval_transform(32)(picture)[None], atol=PIL_TIMM_ATOL, rtol=0
    )
    # the same picture to the torchvision backend (whose bicubic kernel differs from PIL's: see the photo tests)
    torch.testing.assert_close(pixels(fast, image, **layout), pixels(fast, picture), atol=0, rtol=0)


PIL_MODES = ["L", "RGB", "RGBA", "LA", "P", "PA", "CMYK", "YCbCr", "I;16", "I;16B", "I", "F", "1"]


def random_pil_image(seed: int, height: int, width: int, mode: str, unit_floats: bool) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    if mode in ("I;16", "I;16B", "I"):
        deep = rng.integers(0, 65536, (height, width)).astype(np.uint16)
        return PIL.Image.fromarray(deep).convert("I") if mode == "I" else PIL.Image.fromarray(deep).convert(mode)
    if mode in ("F", "1"):
        dtype = "float32" if mode == "F" else "bool"
        return PIL.Image.fromarray(random_pixels(seed, (height, width), dtype, unit_floats))
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8)).convert(mode)


def reference_pil_picture(image: PIL.Image.Image) -> PIL.Image.Image:
    """Pillow's RGB (alpha composited onto white, as transformers does), except the modes the rule scales."""
    if image.mode in ("I;16", "I;16B", "I"):
        levels = np.asarray(image).astype(np.float32) * np.float32(255 / 65535)
        return PIL.Image.fromarray(np.rint(levels).astype(np.uint8)).convert("RGB")
    if image.mode in ("F", "1"):
        return reference_picture(np.asarray(image), channels_first=False)
    if "A" in image.getbands() or "transparency" in image.info:
        white = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    height=st.integers(1, 16),
    width=st.integers(1, 16),
    mode=st.sampled_from(PIL_MODES),
    unit_floats=st.booleans(),
)
def test_every_pil_mode_is_the_reference_picture(timm_eval_transform, seed, height, width, mode, unit_floats):
    image = random_pil_image(seed, height, width, mode, unit_floats)
    assert image.mode == mode
    picture = reference_pil_picture(image)
    slow, fast = DeiTHfImageProcessorPil(**SMALL), DeiTHfImageProcessor(**SMALL)

    torch.testing.assert_close(pixels(slow, image), timm_eval_transform(32)(picture)[None], atol=PIL_TIMM_ATOL, rtol=0)
    torch.testing.assert_close(pixels(fast, image), pixels(fast, picture), atol=0, rtol=0)
    assert np.array_equal(np.asarray(convert_to_rgb(image)), np.asarray(picture))  # training's decode path


@pytest.mark.parametrize("processor_class", PROCESSORS)
@pytest.mark.parametrize(
    "image, message",
    [
        (np.full((8, 8, 3), np.nan, dtype=np.float32), "NaN or infinite"),
        (torch.full((3, 8, 8), float("inf")), "NaN or infinite"),
        (np.zeros((0, 8, 3), dtype=np.uint8), r"zero size \(shape \(0, 8, 3\)\)"),
        (torch.zeros(3, 8, 0), "zero size"),
        (PIL.Image.new("RGB", (0, 5)), r"zero size \(0x5\)"),
        (np.full((8, 8, 3), 300, dtype=np.int32), r"int32 image values span \[300, 300\]: expected \[0, 255\] \(16"),
        (np.full((8, 8, 3), -1, dtype=np.int8), r"int8 image values span \[-1, -1\]: expected \[0, 255\]\.$"),
        (np.full((8, 8, 3), 2**20, dtype=np.uint32), r"uint32 image values span"),
        (np.full((8, 8, 3), 256.0), r"Float image values span \[256, 256\]: expected \[0, 1\] or \[0, 255\]"),
        (np.full((8, 8, 3), -0.5), r"Float image values span \[-0.5, -0.5\]"),
        (PIL.Image.fromarray(np.full((8, 8), 70000, dtype=np.int32)), r"span \[70000, 70000\]: expected \[0, 65535\]"),
        (PIL.Image.fromarray(np.full((8, 8), np.nan, dtype=np.float32)), "NaN or infinite"),
        (np.zeros((8, 8, 2), dtype=np.uint8), "no axis of 1, 3 or 4 channels"),
        (np.zeros((3, 8, 8), dtype=np.uint8), r"has 8 channels, not 1/3/4"),  # with input_data_format below
        (np.zeros((2, 8, 8, 3, 1), dtype=np.uint8), "2 or 3 dimensions"),
    ],
)
def test_bad_inputs_are_refused_by_both_backends(processor_class, image, message):
    layout = {"input_data_format": "channels_last"} if "8 channels" in message else {}
    with pytest.raises(ValueError, match=message):
        processor_class(**SMALL)(image, **layout)


@pytest.mark.parametrize("processor_class", PROCESSORS)
def test_float_images_refuse_do_rescale_false(processor_class):
    with pytest.raises(ValueError, match="keep `do_rescale=True` for float images"):
        processor_class(**SMALL)(torch.rand(3, 8, 8), do_rescale=False)
    levels = pixels(processor_class(**SMALL, do_normalize=False), np.full((8, 8, 3), 200, np.uint8), do_rescale=False)
    assert torch.all(levels == 200)  # 8-bit inputs keep transformers' meaning: values stay 0-255 levels


@pytest.mark.parametrize("processor_class", PROCESSORS)
def test_ambiguous_layout_follows_its_library(processor_class):
    """Shapes whose both ends could be channels: NumPy arrays are read channels-last, tensors channels-first, as each
    library lays images out; `input_data_format` overrides."""
    rng = np.random.default_rng(0)
    four_px_tall = rng.integers(0, 256, (4, 60, 3), dtype=np.uint8)  # RGB 4x60, or RGBA 60x3 channels-first
    four_px_wide = rng.integers(0, 256, (60, 4, 3), dtype=np.uint8)  # as a tensor (3, 60, 4): also 3 RGBA px tall
    processor = processor_class(**SMALL)

    as_picture = pixels(processor, PIL.Image.fromarray(four_px_tall))
    torch.testing.assert_close(pixels(processor, four_px_tall), as_picture, atol=0, rtol=0)
    as_tensor = torch.from_numpy(four_px_wide).permute(2, 0, 1)
    as_picture = pixels(processor, PIL.Image.fromarray(four_px_wide))
    torch.testing.assert_close(pixels(processor, as_tensor), as_picture, atol=0, rtol=0)
    rgba = PIL.Image.fromarray(np.ascontiguousarray(np.moveaxis(four_px_tall, 0, -1)))
    explicit = pixels(processor, four_px_tall, input_data_format="channels_first")
    torch.testing.assert_close(explicit, pixels(processor, rgba), atol=0, rtol=0)


def test_special_pil_modes_are_scaled_by_their_real_range(gray):
    gray, _ = gray
    levels = np.asarray(gray)
    as_float = PIL.Image.fromarray((levels / 255).astype(np.float32))
    as_float_levels = PIL.Image.fromarray(levels.astype(np.float32))
    as_int32 = PIL.Image.fromarray(levels.astype(np.int32) * 257)
    binary = PIL.Image.fromarray(levels > 127)
    assert (as_float.mode, as_float_levels.mode, as_int32.mode, binary.mode) == ("F", "F", "I", "1")

    for image in (as_float, as_float_levels, as_int32):
        assert np.array_equal(np.asarray(convert_to_rgb(image)), np.asarray(gray.convert("RGB")))
    assert np.array_equal(np.asarray(convert_to_rgb(binary))[..., 0], (levels > 127) * 255)
    for processor_class in PROCESSORS:
        processor = processor_class(**SMALL)
        torch.testing.assert_close(pixels(processor, as_float), pixels(processor, gray), atol=0, rtol=0)


@pytest.mark.parametrize("processor_class", PROCESSORS)
def test_extreme_aspect_ratio_is_capped_before_the_resize(processor_class, monkeypatch, timm_eval_transform):
    backend = processor_class.__mro__[2]
    resized_shapes = []
    original_resize = backend.resize

    def recording_resize(self, image, *args, **kwargs):
        resized = original_resize(self, image, *args, **kwargs)
        resized_shapes.append(tuple(resized.shape))
        return resized

    monkeypatch.setattr(backend, "resize", recording_resize)
    line = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (1, 20000, 3), dtype=np.uint8))
    assert pixels(processor_class(), line).shape == (1, 3, 224, 224)
    assert resized_shapes[-1][-2:] == (256, 256 * MAX_ASPECT_RATIO)  # not 256 x 5,120,000

    # 8x400 (1:50): the recipe's crop keeps the middle, which the capped resize reproduces (here exactly, as the
    # resize factor, 32, is whole)
    wide = PIL.Image.fromarray(np.random.default_rng(1).integers(0, 256, (8, 400, 3), dtype=np.uint8))
    expected = timm_eval_transform(224)(wide)[None]
    actual = pixels(processor_class(), wide)
    tolerance = PIL_TIMM_ATOL if processor_class is DeiTHfImageProcessorPil else FAST_MAX_DIFF
    assert (actual - expected).abs().max().item() <= tolerance
