"""DeiT image processor on the PIL/NumPy backend (the DeiT recipe's eval transform), and the input rules both
DeiT processors share.

Every image is first brought to the 8-bit picture the recipe's eval transform sees (timm's, on a PIL image), by one
rule per input kind, the same for both backends:

- **PIL images** keep their mode, and the backends convert them to RGB (alpha composited onto white), except the
  modes Pillow would clip or blacken: `I`, `I;16*` (16-bit PNG/TIFF) are scaled from 0–65535, `F` (float TIFF) by
  the float rule below, `1` gives 0 / 255.
- **Arrays and tensors**, by dtype: `uint8` as is; `bool` gives 0 / 255; `uint16` is scaled from 0–65535; every other
  integer dtype holds 8-bit levels 0–255; floats whose values all lie in [0, 1] are taken as already rescaled (x255,
  as `ToTensor` makes them; said once per process), else as 0–255 levels. Values outside those ranges, NaN and
  infinities are refused with a `ValueError` naming them: never clipped, never near-black. Zero-size images are
  refused too, and so is `do_rescale=False` with a float image (transformers' idiom for [0, 1] floats, which here
  would leave them 255 times too large). Training's decode (`convert_to_rgb`) follows the same PIL rules.
- **Layout**: 2-D is grayscale; 3-D is channels-first or channels-last, with 1 (grey), 3 (RGB) or 4 (RGBA) channels;
  `input_data_format` is honoured when given. Without it, a shape whose both ends could be the channels (an image 1–4
  px tall or wide, e.g. `(1, 20000, 3)`) is read the way its library lays images out: NumPy arrays channels-last (as
  `np.asarray(pil_image)`), torch tensors channels-first (as torchvision), with a warning. Any memory order
  (Fortran, negative strides) is accepted.
- **Extreme aspect ratios**: before a shortest-edge resize, an image longer than `MAX_ASPECT_RATIO` (16) times its
  short side is center-cropped to that ratio. The recipe's center crop keeps only the middle anyway, so the pixels are
  those of resize-then-crop (up to a sub-pixel shift), but a 1x20000 image no longer becomes a 256x5,120,000
  intermediate (timm's and torchvision's eval transforms would build it: ~4 GB).
"""

import reprlib

import numpy as np
import PIL.Image
from transformers.dynamic_module_utils import custom_object_save
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_base import ImageProcessingMixin
from transformers.image_transforms import convert_to_rgb as transformers_convert_to_rgb
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ChannelDimension,
    ImageInput,
    PILImageResampling,
    SizeDict,
    is_valid_image,
)
from transformers.utils import logging

logger = logging.get_logger(__name__)

# The recipe's eval crop: resize to size / 0.875, crop size (timm's pretrained_cfg says 0.9 for some DeiT weights;
# the paper's numbers were measured with 0.875).
EVAL_CROP_PCT = 0.875
# Longest side / shortest side kept before a shortest-edge resize (see the module docstring).
MAX_ASPECT_RATIO = 16
# Pillow modes whose own convert("RGB") clips (16-bit integers at 255) or blackens (floats in [0, 1]) the picture.
SIXTEEN_BIT_PIL_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
CHANNEL_COUNTS = (1, 3, 4)
# Where plain transformers finds each backend's class in a saved checkpoint (`trust_remote_code=True`). A dict per
# backend, as transformers 5 reads it; the pipeline's video-processor lookup cannot take a dict for its own, where
# it would turn a single class name into a "VideoProcessor" one and ask at the terminal whether to run it.
AUTO_MAP = {
    "AutoImageProcessor": {
        "pil": "image_processing_deit.DeiTHfImageProcessorPil",
        "torchvision": "image_processing_deit_fast.DeiTHfImageProcessor",
    }
}


def eight_bit(pixels: np.ndarray, full_scale: float | None = None) -> np.ndarray:
    """`pixels` as uint8 levels by the dtype rules of the module docstring; `full_scale` (the value that means
    white) overrides the dtype's, as for Pillow's 32-bit `I` mode that holds 16-bit pictures."""
    if pixels.size == 0:
        raise ValueError(f"Image has zero size (shape {pixels.shape}).")
    if not pixels.dtype.isnative:  # big-endian data (e.g. Pillow's I;16B): the dtype rules compare native dtypes
        pixels = pixels.astype(pixels.dtype.newbyteorder("="))
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype == np.bool_:
        return pixels.astype(np.uint8) * 255
    if np.issubdtype(pixels.dtype, np.floating):
        pixels = pixels.astype(np.float32, copy=False)
        if not np.isfinite(pixels).all():
            raise ValueError("Image contains NaN or infinite values.")
        low, high = pixels.min().item(), pixels.max().item()
        if full_scale is None:
            full_scale = 1.0 if low >= 0 and high <= 1 else 255.0
            if full_scale == 1.0:
                logger.warning_once("Float images with all values in [0, 1] are read as already rescaled (x255).")
        if low < 0 or high > full_scale:
            raise ValueError(f"Float image values span [{low:g}, {high:g}]: expected [0, 1] or [0, 255].")
        return np.rint(pixels * (255 / full_scale)).astype(np.uint8)
    if not np.issubdtype(pixels.dtype, np.integer):
        raise TypeError(f"Images must have a boolean, integer or float dtype, not {pixels.dtype}.")
    if full_scale is None:
        full_scale = 65535 if pixels.dtype == np.uint16 else 255
    low, high = pixels.min().item(), pixels.max().item()
    if low < 0 or high > full_scale:
        hint = " (16-bit pictures: pass a uint16 array)" if full_scale == 255 and 255 < high <= 65535 else ""
        raise ValueError(f"{pixels.dtype} image values span [{low}, {high}]: expected [0, {full_scale}]{hint}.")
    if full_scale == 255:
        return pixels.astype(np.uint8)
    return np.rint(pixels * (255 / full_scale)).astype(np.uint8)


def convert_to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """An RGB copy of a PIL image of any mode, as both processors see it: `I`/`I;16*`, `F` and `1` scaled by their
    real range (see the module docstring) where Pillow's own conversion would clip or blacken them, and transparency
    composited onto white (transformers' rule), so that training decodes images as inference does."""
    return PIL.Image.fromarray(transformers_convert_to_rgb(_as_eight_bit_pil(image), return_numpy=True))


def _as_eight_bit_pil(image: PIL.Image.Image) -> PIL.Image.Image:
    if image.width == 0 or image.height == 0:
        raise ValueError(f"Image has zero size ({image.width}x{image.height}).")
    if image.mode in SIXTEEN_BIT_PIL_MODES:
        return PIL.Image.fromarray(eight_bit(np.asarray(image), full_scale=65535))
    if image.mode in ("F", "1"):
        return PIL.Image.fromarray(eight_bit(np.asarray(image)))
    return image


def _channels_last(pixels: np.ndarray, input_data_format, tensor: bool) -> np.ndarray:
    """`pixels` as (height, width, channels), by the layout rule of the module docstring."""
    if pixels.ndim == 2:
        return pixels[..., None]
    if pixels.ndim != 3:
        raise ValueError(f"An image must have 2 or 3 dimensions, got shape {pixels.shape}.")
    if input_data_format is None:
        first, last = pixels.shape[0] in CHANNEL_COUNTS, pixels.shape[-1] in CHANNEL_COUNTS
        if not (first or last):
            raise ValueError(f"Image of shape {pixels.shape} has no axis of 1, 3 or 4 channels at either end.")
        if first and last:
            layout = "channels-first, as torchvision" if tensor else "channels-last, as NumPy and PIL"
            logger.warning_once(
                f"Image shape {pixels.shape} could be channels-first or channels-last; reading it {layout} lay "
                "images out. Pass `input_data_format` to choose."
            )
            input_data_format = ChannelDimension.FIRST if tensor else ChannelDimension.LAST
        else:
            input_data_format = ChannelDimension.FIRST if first else ChannelDimension.LAST
    if ChannelDimension(input_data_format) == ChannelDimension.FIRST:
        pixels = np.moveaxis(pixels, 0, -1)
    if pixels.shape[-1] not in CHANNEL_COUNTS:
        raise ValueError(f"Image of shape {pixels.shape} (channels last) has {pixels.shape[-1]} channels, not 1/3/4.")
    return pixels


def as_eight_bit_image(image, input_data_format=None) -> PIL.Image.Image:
    """One input image (PIL, NumPy or torch) as the 8-bit PIL image both DeiT processors work from."""
    if isinstance(image, PIL.Image.Image):
        return _as_eight_bit_pil(image)
    tensor = not isinstance(image, np.ndarray)
    if tensor:
        image = image.detach().cpu()
        image = (image.float() if image.is_floating_point() else image).numpy()
    pixels = _channels_last(eight_bit(image), input_data_format, tensor)
    return PIL.Image.fromarray(np.ascontiguousarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels))


def _is_float_image(image) -> bool:
    if isinstance(image, PIL.Image.Image):
        return image.mode == "F"
    return image.dtype.is_floating_point if hasattr(image.dtype, "is_floating_point") else image.dtype.kind == "f"


def flat_list_of_images(images) -> list:
    """The images of a single image, a list, a nested list or a 4-D batch, in order."""
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in flat_list_of_images(item)]
    if is_valid_image(images) and not isinstance(images, PIL.Image.Image) and images.ndim == 4:
        return list(images)
    return [images]


def check_images_argument(images: ImageInput, processor_name: str) -> None:
    """Raise a clear error for an empty batch or for anything that is neither an image nor a path/URL."""
    flat = flat_list_of_images(images)
    if not flat:
        raise ValueError(f"{processor_name} received an empty batch of images ({images!r}): pass at least one image.")
    for image in flat:
        if not (isinstance(image, str) or is_valid_image(image)):
            raise TypeError(
                f"{processor_name} expects PIL images, numpy arrays, torch tensors, or image paths/URLs, "
                f"but received {type(image).__name__}: {reprlib.repr(image)}"
            )


def cap_aspect_ratio(image, max_ratio: float = MAX_ASPECT_RATIO):
    """Center-crop a (..., height, width) array or tensor to at most `max_ratio` long side / short side."""
    height, width = image.shape[-2:]
    if height > max_ratio * width:
        keep = int(max_ratio * width)
        top = (height - keep) // 2
        return image[..., top : top + keep, :]
    if width > max_ratio * height:
        keep = int(max_ratio * height)
        left = (width - keep) // 2
        return image[..., left : left + keep]
    return image


class DeiTImageInputMixin:
    """Input handling shared by both DeiT image processors (put it before the backend in the bases).

    Applies the input rules of this module's docstring, raises clear errors for empty batches and non-images, caps
    the aspect ratio before a shortest-edge resize, and saves an `auto_map` with both backends' code.
    """

    # Decode paths and URLs with PIL in both backends: a file gives the same pixels to both, and a string that is
    # not an image gets PIL's error naming it rather than a decoder crash.
    fetch_images = ImageProcessingMixin.fetch_images

    @classmethod
    def for_input_size(cls, image_size: int | list[int], crop_pct: float = EVAL_CROP_PCT, **kwargs):
        """The recipe's eval transform for a model of `image_size`: shortest edge to int(side / crop_pct), then a
        center crop to `image_size` (256 -> 224 at the default)."""
        height, width = image_size if isinstance(image_size, (list, tuple)) else (image_size, image_size)
        size = {"shortest_edge": int(min(height, width) / crop_pct)}
        return cls(size=size, crop_size={"height": height, "width": width}, **kwargs)

    def _prepare_image_like_inputs(self, images, *args, input_data_format=None, expected_ndims=3, **kwargs):
        check_images_argument(images, type(self).__name__)
        images = flat_list_of_images(self.fetch_images(images))
        if kwargs.get("do_rescale") is False and any(_is_float_image(image) for image in images):
            # transformers' idiom for images already in [0, 1]; here it would leave them 255 times too large
            raise ValueError(
                f"{type(self).__name__} reads a float image's scale from its values ([0, 1] or 0-255) and brings it "
                "to 0-255 levels: keep `do_rescale=True` for float images."
            )
        images = [as_eight_bit_image(image, input_data_format) for image in images]
        return [self.process_image(image, *args, **kwargs) for image in images]

    def resize(self, image, size: SizeDict, *args, **kwargs):
        if size.shortest_edge and not size.longest_edge:
            image = cap_aspect_ratio(image)
        return super().resize(image, size, *args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save the settings with an `auto_map` of both backends, and both backends' code beside them, so that plain
        transformers loads either through `trust_remote_code=True` (deit_hf's registration wins where imported)."""
        from .image_processing_deit_fast import DeiTHfImageProcessor  # here, as that module imports this one

        self.auto_map = AUTO_MAP
        saved = super().save_pretrained(save_directory, *args, **kwargs)
        custom_object_save(DeiTHfImageProcessor, save_directory)  # its module and the one it imports: this one
        return saved


class DeiTHfImageProcessorPil(DeiTImageInputMixin, PilBackend):
    r"""
    DeiT image processor (PIL/NumPy backend) implementing the eval transform of the DeiT recipe and timm:
    resize the shortest edge to `int(224 / 0.875) = 256` with bicubic resampling, center crop 224x224, rescale
    by 1/255 and normalize with the ImageNet mean and std. (transformers' own DeiT processor resizes to a 256x256
    square and normalizes with mean/std 0.5, which is not what DeiT was trained with.)

    For another resolution use `DeiTHfImageProcessorPil.for_input_size(R)`. An int `size` means the shortest edge.
    Inputs of any kind are read by the rules of this module's docstring, identically to [`DeiTHfImageProcessor`].
    """

    resample = PILImageResampling.BICUBIC
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    size = {"shortest_edge": 256}
    default_to_square = False
    crop_size = {"height": 224, "width": 224}
    do_resize = True
    do_center_crop = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True

    def center_crop(self, image: np.ndarray, size: SizeDict, **kwargs) -> np.ndarray:
        """Crop at torchvision's offset, as timm's eval transform does.

        torchvision rounds an odd margin half to even where transformers floors it: a one-pixel shift on images
        whose resized long side minus the crop is odd (e.g. 640x427 -> 383x256 -> 224).
        """
        height, width = image.shape[-2:]
        if size.height is None or size.width is None or size.height > height or size.width > width:
            return super().center_crop(image, size, **kwargs)  # its size check, and padding of small images
        top, left = round((height - size.height) / 2), round((width - size.width) / 2)
        return image[..., top : top + size.height, left : left + size.width]


__all__ = ["DeiTHfImageProcessorPil", "DeiTImageInputMixin", "check_images_argument", "convert_to_rgb"]
