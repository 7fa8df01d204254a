"""DeiT image processor on the torch/torchvision backend (batched, runs on GPU): the DeiT eval transform."""

import torch
from torchvision.transforms.v2 import functional as tvF
from transformers.image_processing_backends import TorchvisionBackend
from transformers.image_utils import SizeDict

from .image_processing_deit import DeiTImageInputMixin, DeiTHfImageProcessorPil


class DeiTHfImageProcessor(DeiTImageInputMixin, TorchvisionBackend):
    r"""
    Torchvision twin of [`DeiTHfImageProcessorPil`], with the same settings: resize the shortest edge to 256
    (bicubic, antialiased), center crop 224x224, rescale by 1/255, normalize with the ImageNet mean and std.
    Its bicubic kernel is torchvision's, so pixels differ slightly from the PIL processor's.
    """

    resample = DeiTHfImageProcessorPil.resample
    image_mean = DeiTHfImageProcessorPil.image_mean
    image_std = DeiTHfImageProcessorPil.image_std
    size = DeiTHfImageProcessorPil.size
    default_to_square = DeiTHfImageProcessorPil.default_to_square
    crop_size = DeiTHfImageProcessorPil.crop_size
    do_resize = True
    do_center_crop = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True

    def center_crop(self, image: torch.Tensor, size: SizeDict, **kwargs) -> torch.Tensor:
        """Crop with torchvision's own center crop, as timm's eval transform does (see `DeiTHfImageProcessorPil`)."""
        if size.height is None or size.width is None:
            return super().center_crop(image, size, **kwargs)  # raises its error naming the expected keys
        return tvF.center_crop(image, [size.height, size.width])


__all__ = ["DeiTHfImageProcessor"]
