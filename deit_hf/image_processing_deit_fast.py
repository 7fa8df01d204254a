"""DeiT image processor on the torch/torchvision backend (batched, runs on GPU): the DeiT eval transform."""

import torch
from torchvision.transforms.v2 import functional as tvF
from transformers.image_processing_backends import TorchvisionBackend
from transformers.image_utils import SizeDict

from .image_processing_deit import DeiTImageInputMixin, DeiTImageProcessor


class DeiTImageProcessorFast(DeiTImageInputMixin, TorchvisionBackend):
    r"""
    Torchvision twin of [`DeiTImageProcessor`], with the same settings: resize the shortest edge to 256
    (bicubic, antialiased), center crop 224x224, rescale by 1/255, normalize with the ImageNet mean and std.
    Its bicubic kernel is torchvision's, so pixels differ slightly from the PIL processor's.
    """

    resample = DeiTImageProcessor.resample
    image_mean = DeiTImageProcessor.image_mean
    image_std = DeiTImageProcessor.image_std
    size = DeiTImageProcessor.size
    default_to_square = DeiTImageProcessor.default_to_square
    crop_size = DeiTImageProcessor.crop_size
    do_resize = True
    do_center_crop = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True

    def center_crop(self, image: torch.Tensor, size: SizeDict, **kwargs) -> torch.Tensor:
        """Crop with torchvision's own center crop, as timm's eval transform does (see `DeiTImageProcessor`)."""
        if size.height is None or size.width is None:
            return super().center_crop(image, size, **kwargs)  # raises its error naming the expected keys
        return tvF.center_crop(image, [size.height, size.width])


__all__ = ["DeiTImageProcessorFast"]
