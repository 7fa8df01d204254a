"""DeiT image processors: parity with timm's eval transform, slow/fast agreement, the input rules, save/load."""

import functools

import numpy as np
import PIL.Image
import pytest
import timm
import timm.data
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage import data
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling

from deit_hf.image_processing_deit import MAX_ASPECT_RATIO, DeiTHfImageProcessorPil, convert_to_rgb
from deit_hf.image_processing_deit_fast import DeiTHfImageProcessor

PROCESSORS = [DeiTHfImageProcessorPil, DeiTHfImageProcessor]
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket"]  # rocket is 640x427: its resized long side minus 224 is odd
SMALL = {"size": {"shortest_edge": int(32 / 0.875)}, "crop_size": {"height": 32, "width": 32}}

# One 8-bit grey level after normalization (≈ 0.0175). torchvision's antialiased bicubic on uint8 rounds a few
# pixels one level away from PIL's; measured on the four photos at 224 and 32 px: max 1 level, mean <= 1.1e-4.
ONE_LEVEL = 1 / (255 * min(IMAGENET_DEFAULT_STD))
FAST_MAX_DIFF = ONE_LEVEL + 1e-5
FAST_MEAN_DIFF = 2e-4
# The PIL processor resizes with PIL exactly as timm's transform does: measured difference 0.
PIL_TIMM_ATOL = 1e-6


def photo(name: str) -> PIL.Image.Image:
    return PIL.Image.fromarray(getattr(data, name)())


def pixels(processor, images, **kwargs) -> torch.Tensor:
    return processor(images, return_tensors="pt", **kwargs).pixel_values


def assert_close_to_one_level(actual: torch.Tensor, expected: torch.Tensor) -> None:
    difference = (actual - expected).abs()
    assert difference.max().item() <= FAST_MAX_DIFF, difference.max().item()
    assert difference.mean().item() <= FAST_MEAN_DIFF, difference.mean().item()


@pytest.fixture(scope="module")
def timm_eval_transform():
    """The DeiT recipe's eval transform as timm builds it (crop_pct 0.875; timm's own DeiT default is 0.9)."""

    @functools.cache  # building the model is the slow part
    def build(resolution: int):
        model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False)
        overrides = {"crop_pct": 0.875, "input_size": (3, resolution, resolution)}
        return timm.data.create_transform(**timm.data.resolve_data_config(overrides, model=model))

    return build


@pytest.mark.parametrize("resolution", [224, 32])
@pytest.mark.parametrize("name", PHOTOS)
def test_processors_match_timm_eval_transform(timm_eval_transform, name, resolution):
    image = photo(name)
    crop_size = {"height": resolution, "width": resolution}
    sizes = {"size": {"shortest_edge": int(resolution / 0.875)}, "crop_size": crop_size}
    expected = timm_eval_transform(resolution)(image)[None]

    slow = pixels(DeiTHfImageProcessorPil(**sizes), image)
    fast = pixels(DeiTHfImageProcessor(**sizes), image)

    torch.testing.assert_close(slow, expected, atol=PIL_TIMM_ATOL, rtol=0)
    assert_close_to_one_level(fast, expected)
    assert_close_to_one_level(fast, slow)


@pytest.mark.parametrize("processor_class", PROCESSORS)
def test_defaults_are_the_deit_eval_transform(processor_class):
    processor = processor_class()

    assert processor.size.shortest_edge == int(224 / 0.875) == 256
    assert (processor.crop_size.height, processor.crop_size.width) == (224, 224)
    assert tuple(processor.image_mean) == tuple(IMAGENET_DEFAULT_MEAN)
    assert tuple(processor.image_std) == tuple(IMAGENET_DEFAULT_STD)
    assert processor.resample == PILImageResampling.BICUBIC


@pytest.mark.parametrize("processor_class", PROCESSORS)
def test_batch_shape_and_dtype(processor_class):
    batch = pixels(processor_class(), [photo(name) for name in PHOTOS])

    assert batch.shape == (len(PHOTOS), 3, 224, 224)
    assert batch.dtype == torch.float32


@pytest.mark.parametrize("processor_class", PROCESSORS)
def test_non_default_size_and_int_size_means_shortest_edge(processor_class):
    image = photo("rocket")
    small = pixels(processor_class(**SMALL), image)

    assert small.shape == (1, 3, 32, 32)
    torch.testing.assert_close(pixels(processor_class(size=36, crop_size=32), image), small, atol=0, rtol=0)


@pytest.mark.parametrize("processor_class", PROCESSORS)
@pytest.mark.parametrize("mode", ["P", "CMYK"])
def test_paletted_and_cmyk_images_convert_to_rgb(processor_class, mode):
    processor = processor_class(**SMALL)
    image = photo("chelsea").convert(mode)

    torch.testing.assert_close(pixels(processor, image), pixels(processor, image.convert("RGB")), atol=0, rtol=0)


@pytest.mark.parametrize("processor_class", PROCESSORS)
def test_rgba_is_composited_onto_white(processor_class):
    processor = processor_class(**SMALL)
    rgb = np.asarray(photo("chelsea"))
    alpha = np.full(rgb.shape[:2] + (1,), 128, dtype=np.uint8)
    rgba = PIL.Image.fromarray(np.concatenate([rgb, alpha], axis=-1))
    on_white = PIL.Image.alpha_composite(PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")

    torch.testing.assert_close(pixels(processor, rgba), pixels(processor, on_white), atol=0, rtol=0)
    assert not torch.equal(pixels(processor, rgba), pixels(processor, rgba.convert("RGB")))


@pytest.fixture(scope="module")
def gray():
    """An 8-bit grey photo and the RGB image that replicates it."""
    gray = photo("astronaut").convert("L")
    return gray, PIL.Image.merge("RGB", [gray] * 3)


@pytest.mark.parametrize("processor_class", PROCESSORS)
@pytest.mark.parametrize("as_input", [lambda gray: gray, np.array, lambda gray: torch.from_numpy(np.array(gray))])
def test_grayscale_image_and_2d_array_replicate_the_grey(processor_class, gray, as_input):
    processor = processor_class(**SMALL)
    gray, replicated = gray

    torch.testing.assert_close(pixels(processor, as_input(gray)), pixels(processor, replicated), atol=0, rtol=0)


@pytest.mark.parametrize("processor_class", PROCESSORS)
@pytest.mark.parametrize("sixteen_bit", ["I;16", "I;16B", "I", "uint16 array", "big-endian uint16 array"])
def test_sixteen_bit_image_equals_its_eight_bit_version(processor_class, gray, sixteen_bit):
    processor = processor_class(**SMALL)
    gray, replicated = gray
    # Offsets below half an 8-bit step (257 / 2) keep each value within rounding of its 8-bit level.
    offsets = np.random.default_rng(0).integers(-128, 129, size=np.asarray(gray).shape)
    deep = np.clip(np.asarray(gray, dtype=np.int64) * 257 + offsets, 0, 65535).astype(np.uint16)
    image = {
        "I;16": PIL.Image.fromarray(deep),
        "I;16B": PIL.Image.frombytes("I;16B", gray.size, deep.astype(">u2").tobytes()),
        "I": PIL.Image.fromarray(deep).convert("I"),
        "uint16 array": deep,
        "big-endian uint16 array": deep.astype(">u2"),
    }[sixteen_bit]
    assert getattr(image, "mode", sixteen_bit) == sixteen_bit

    torch.testing.assert_close(pixels(processor, image), pixels(processor, replicated), atol=0, rtol=0)


@pytest.mark.parametrize("processor_class", PROCESSORS)
@pytest.mark.parametrize("empty", [[], [[]]])
def test_empty_batch_is_rejected(processor_class, empty):
    with pytest.raises(ValueError, match=rf"{processor_class.__name__} received an empty batch of images"):
        processor_class()(empty)


@pytest.mark.parametrize("processor_class", PROCESSORS)
@pytest.mark.parametrize(
    "not_an_image, received", [(3, "int: 3"), (None, "NoneType: None"), ([photo("coffee"), None], "NoneType: None")]
)
def test_non_image_is_rejected_naming_what_was_received(processor_class, not_an_image, received):
    expected = "expects PIL images, numpy arrays, torch tensors, or image paths/URLs, but received "
    with pytest.raises(TypeError, match=rf"{processor_class.__name__} {expected}{received}"):
        processor_class()(not_an_image)


@pytest.mark.parametrize("processor_class", PROCESSORS)
def test_string_that_is_not_a_path_or_url_is_rejected(processor_class):
    with pytest.raises(ValueError, match=r"Incorrect image source.*Got notapath"):
        processor_class()("notapath")


@pytest.mark.parametrize("processor_class", PROCESSORS)
def test_save_and_load_keeps_the_settings(processor_class, tmp_path):
    processor = processor_class(
        **SMALL, image_mean=(0.5, 0.4, 0.3), image_std=(0.2, 0.25, 0.3), resample=PILImageResampling.BILINEAR
    )
    processor.save_pretrained(tmp_path)
    loaded = processor_class.from_pretrained(tmp_path)

    assert loaded.size.shortest_edge == 36
    assert (loaded.crop_size.height, loaded.crop_size.width) == (32, 32)
    assert tuple(loaded.image_mean) == (0.5, 0.4, 0.3) and tuple(loaded.image_std) == (0.2, 0.25, 0.3)
    assert loaded.resample == PILImageResampling.BILINEAR
    image = photo("coffee")
    torch.testing.assert_close(pixels(loaded, image), pixels(processor, image), atol=0, rtol=0)


@pytest.mark.parametrize("processor_class", [DeiTHfImageProcessorPil, DeiTHfImageProcessor])
@pytest.mark.parametrize("image_size, shortest_edge", [(224, 256), (384, 438), (32, 36)])
def test_for_input_size_is_the_recipe_eval_transform(processor_class, image_size, shortest_edge):
    processor = processor_class.for_input_size(image_size)
    assert processor.size == {"shortest_edge": shortest_edge}
    assert processor.crop_size == {"height": image_size, "width": image_size}
    assert processor_class.for_input_size(224, crop_pct=1.0).size == {"shortest_edge": 224}


# --- Input rules (deit_hf/image_processing_deit.py docstring), by property: slow == reference, fast ≈ reference ---

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
