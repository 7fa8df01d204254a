"""DeiT image processor on the torch/torchvision backend (batched, runs on GPU): the DeiT eval transform."""

import torch
from torchvision.transforms.v2 import functional as tvF
from transformers.image_processing_backends import TorchvisionBackend
from transformers.image_utils import SizeDict

from .image_processing_deit import DeiTHfImageProcessorPil, DeiTImageInputMixin, flat_list_of_images


class DeiTHfImageProcessor(DeiTImageInputMixin, TorchvisionBackend):
    r"""
    Torchvision twin of [`DeiTHfImageProcessorPil`], with the same settings and input rules: resize the shortest
    edge to 256 (bicubic, antialiased), center crop 224x224, rescale by 1/255, normalize with the ImageNet mean and
    std. Its bicubic kernel is torchvision's, so pixels differ slightly from the PIL processor's. Without `device`,
    it works where its input tensors are.
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

    def _prepare_image_like_inputs(self, images, *args, device=None, **kwargs):
        if device is None:  # the input rules read tensors on the CPU; the work goes back where they were
            device = next((image.device for image in flat_list_of_images(images) if torch.is_tensor(image)), None)
        return super()._prepare_image_like_inputs(images, *args, device=device, **kwargs)

    def center_crop(self, image: torch.Tensor, size: SizeDict, **kwargs) -> torch.Tensor:
        """Crop with torchvision's own center crop, as timm's eval transform does (see the PIL processor)."""
        if size.height is None or size.width is None:
            return super().center_crop(image, size, **kwargs)  # raises its error naming the expected keys
        return tvF.center_crop(image, [size.height, size.width])


__all__ = ["DeiTHfImageProcessor"]
