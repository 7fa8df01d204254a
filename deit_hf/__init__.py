"""deit-hf: DeiT with its distillation token as a Hugging Face model, trainable with a teacher.

Importing the package registers its config, models and image processors with transformers' Auto classes, so
`AutoModelForImageClassification.from_pretrained(dir)` and `pipeline("image-classification", model=dir)` work.
Saved checkpoints also carry `auto_map` and the model and processor code, so plain transformers loads them with
`trust_remote_code=True`.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification

from .configuration_deit import PRESETS, DeiTConfig
from .image_processing_deit import DeiTHfImageProcessorPil
from .image_processing_deit_fast import DeiTHfImageProcessor
from .losses import DistillationLoss, DistillationLossOutput
from .modeling_deit import (
    DeiTForImageClassification,
    DeiTForImageClassificationOutput,
    DeiTForImageClassificationWithTeacher,
    DeiTForImageClassificationWithTeacherOutput,
    DeiTModel,
    DeiTPreTrainedModel,
)

AutoConfig.register(DeiTConfig.model_type, DeiTConfig, exist_ok=True)
AutoModel.register(DeiTConfig, DeiTModel, exist_ok=True)
# Both heads answer AutoModelForImageClassification; `config.architectures` picks one, the distilled model by default.
AutoModelForImageClassification.register(
    DeiTConfig, (DeiTForImageClassificationWithTeacher, DeiTForImageClassification), exist_ok=True
)
AutoImageProcessor.register(
    DeiTConfig,
    image_processor_classes={"pil": DeiTHfImageProcessorPil, "torchvision": DeiTHfImageProcessor},
    exist_ok=True,
)

# The processors' names are not transformers' own (DeiTImageProcessor / DeiTImageProcessorPil): its DeiT checkpoints
# keep resolving to its classes with deit_hf imported. They save their own `auto_map`, naming both backends
# (`image_processing_deit.AUTO_MAP`).
DeiTConfig.register_for_auto_class()
DeiTModel.register_for_auto_class("AutoModel")
DeiTForImageClassification.register_for_auto_class("AutoModelForImageClassification")
DeiTForImageClassificationWithTeacher.register_for_auto_class("AutoModelForImageClassification")

__all__ = [
    "PRESETS",
    "DeiTConfig",
    "DeiTForImageClassification",
    "DeiTForImageClassificationOutput",
    "DeiTForImageClassificationWithTeacher",
    "DeiTForImageClassificationWithTeacherOutput",
    "DeiTHfImageProcessor",
    "DeiTHfImageProcessorPil",
    "DeiTModel",
    "DeiTPreTrainedModel",
    "DistillationLoss",
    "DistillationLossOutput",
]
