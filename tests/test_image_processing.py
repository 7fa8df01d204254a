"""DeiT image processors: parity with timm's eval transform, slow/fast agreement, odd inputs, save/load (the input
rules by property: test_image_inputs.py)."""


import numpy as np
import PIL.Image
import pytest
import torch
from skimage import data
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling

from deit_hf.image_processing_deit import DeiTHfImageProcessorPil
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
