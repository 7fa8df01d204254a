"""DeiT image processor on the PIL/NumPy backend: the DeiT recipe's eval transform."""

import reprlib

import numpy as np
import PIL.Image
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_base import ImageProcessingMixin
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ImageInput,
    PILImageResampling,
    SizeDict,
    is_valid_image,
    make_flat_list_of_images,
)

# The recipe's eval crop: resize to size / 0.875, crop size (timm's pretrained_cfg says 0.9 for some DeiT weights;
# the paper's numbers were measured with 0.875).
EVAL_CROP_PCT = 0.875
# Modes Pillow decodes 16-bit grayscale PNG/TIFF into; its own convert("RGB") clips their values at 255.
SIXTEEN_BIT_PIL_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})


def _sixteen_to_eight_bit(pixels: np.ndarray) -> np.ndarray:
    """Map 16-bit pixel values (0-65535) onto 0-255, so that 65535 stays full white."""
    return np.clip(np.rint(pixels * (255 / 65535)), 0, 255).astype(np.uint8)


def convert_to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """An RGB copy of a PIL image of any mode; 16-bit grayscale is scaled to 8 bits where Pillow would clip it."""
    if image.mode in SIXTEEN_BIT_PIL_MODES:
        image = PIL.Image.fromarray(_sixteen_to_eight_bit(np.asarray(image)))
    return image.convert("RGB")


def _as_backend_input(images: ImageInput) -> ImageInput:
    """Turn the images the stock backends mishandle into ones they convert to RGB correctly.

    16-bit PIL images and `uint16` arrays become 8-bit arrays (the backends would clip them or rescale them by
    1/255), and 2-D arrays and tensors get a leading channel axis (the backends only batch 3-D images), which
    sends them through the backends' grayscale-to-RGB path.
    """
    if isinstance(images, (list, tuple)):
        return [_as_backend_input(image) for image in images]
    if isinstance(images, PIL.Image.Image) and images.mode in SIXTEEN_BIT_PIL_MODES:
        images = _sixteen_to_eight_bit(np.asarray(images))
    elif isinstance(images, np.ndarray) and images.dtype == np.uint16:
        images = _sixteen_to_eight_bit(images)
    if not isinstance(images, (str, PIL.Image.Image)) and images.ndim == 2:
        images = images[None]
    return images


def check_images_argument(images: ImageInput, processor_name: str) -> None:
    """Raise a clear error for an empty batch or for anything that is neither an image nor a path/URL."""
    batch = images if isinstance(images, (list, tuple)) else [images]
    flat = [image for item in batch for image in (item if isinstance(item, (list, tuple)) else [item])]
    if not flat:
        raise ValueError(f"{processor_name} received an empty batch of images ({images!r}): pass at least one image.")
    for image in flat:
        if not (isinstance(image, str) or is_valid_image(image)):
            raise TypeError(
                f"{processor_name} expects PIL images, numpy arrays, torch tensors, or image paths/URLs, "
                f"but received {type(image).__name__}: {reprlib.repr(image)}"
            )


class DeiTImageInputMixin:
    """Input handling shared by both DeiT image processors (put it before the backend in the bases).

    Adds what the stock backends lack: clear errors for empty batches and non-images, 16-bit grayscale scaled
    to 8-bit instead of clipped, and 2-D (grayscale) arrays accepted like grayscale PIL images.
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

    def _prepare_images_structure(self, images: ImageInput, expected_ndims: int = 3) -> ImageInput:
        check_images_argument(images, type(self).__name__)
        return make_flat_list_of_images(_as_backend_input(self.fetch_images(images)), expected_ndims=expected_ndims)


class DeiTHfImageProcessorPil(DeiTImageInputMixin, PilBackend):
    r"""
    DeiT image processor (PIL/NumPy backend) implementing the eval transform of the DeiT recipe and timm:
    resize the shortest edge to `int(224 / 0.875) = 256` with bicubic resampling, center crop 224x224, rescale
    by 1/255 and normalize with the ImageNet mean and std. (transformers' own DeiT processor resizes to a 256x256
    square and normalizes with mean/std 0.5, which is not what DeiT was trained with.)

    For another resolution use `DeiTHfImageProcessorPil.for_input_size(R)`.
    An int `size` means the shortest edge. Grayscale, RGBA, paletted, CMYK and 16-bit images are converted to RGB.
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


__all__ = ["DeiTImageInputMixin", "DeiTHfImageProcessorPil", "check_images_argument"]
