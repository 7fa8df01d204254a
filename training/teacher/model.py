"""The frozen teacher of DeiT distillation: a timm model (the paper's RegNetY-16GF) or a local HF image classifier."""

import logging
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.data import resolve_model_data_config
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification
from transformers.image_utils import PILImageResampling
from transformers.utils import ModelOutput

from deit_hf.convert import load_state_dict_file, load_state_dict_strict

from ..command_line import InputUnavailableError

logger = logging.getLogger(__name__)


def _is_convnet(model: nn.Module) -> bool:
    # A convolution whose kernel differs from its stride does spatial work; a ViT's only conv is a patch embedding.
    return any(isinstance(m, nn.Conv2d) and m.kernel_size != m.stride for m in model.modules())


def _affine_between(
    source: tuple[Sequence[float], Sequence[float]], target: tuple[Sequence[float], Sequence[float]]
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(scale, shift) of shape (1, C, 1, 1) taking inputs normalised with `source` (mean, std) to `target`'s; None
    when they agree."""
    (source_mean, source_std), (target_mean, target_std) = (
        (torch.as_tensor(mean, dtype=torch.float64).flatten(), torch.as_tensor(std, dtype=torch.float64).flatten())
        for mean, std in (source, target)
    )
    if not len(source_mean) == len(source_std) == len(target_mean) == len(target_std):
        raise ValueError(
            f"Normalisation statistics have different channel counts: student mean/std {len(source_mean)}/"
            f"{len(source_std)}, teacher mean/std {len(target_mean)}/{len(target_std)}."
        )
    if not ((source_std > 0).all() and (target_std > 0).all()):
        raise ValueError(f"Standard deviations must be positive, got {source_std.tolist()} and {target_std.tolist()}.")
    # x_target = (x * std_s + mean_s - mean_t) / std_t; in float64, so scale and shift are each rounded once to float32
    scale, shift = source_std / target_std, (source_mean - target_mean) / target_std
    if torch.equal(scale, torch.ones_like(scale)) and torch.equal(shift, torch.zeros_like(shift)):
        return None
    return scale.float().view(1, -1, 1, 1), shift.float().view(1, -1, 1, 1)


class Teacher(nn.Module):
    """
    A frozen classifier whose logits the DeiT student distils.

    Its parameters never require gradients, it stays in eval mode whatever `.train()` says (dropout off, batch-norm
    statistics frozen), and its forward runs under `torch.no_grad()`. (Not `torch.inference_mode()`: its tensors
    could not be saved for backward, so any loss that multiplies by the teacher's logits, rather than taking
    their argmax or softmax first, would fail.)

    The student's batch is normalised with `student_mean`/`student_std`; the teacher was trained with its own
    `teacher_mean`/`teacher_std`. Forward maps one onto the other with a single fused multiply-add,
    `x_teacher = (x * std_s + mean_s - mean_t) / std_t`, skipped when the two agree (or no student statistics
    are given).

    Mixed precision is the caller's: run it under `torch.autocast` (the DistillationTrainer uses
    `accelerator.autocast()`); the logits come back in the dtype the model computes them in.

    Args:
        model: a timm model (returns logits) or a transformers image classifier (returns `.logits`).
        num_labels: the number of classes the model predicts.
        teacher_mean, teacher_std: per-channel statistics the teacher's inputs were normalised with.
        student_mean, student_std: those of the batches it will be given. Inputs pass unchanged when either pair
            is left out.
        channels_last: run in channels-last memory format (faster convolutions on GPU); default: for convnets.
        input_size: (height, width) the model only accepts (a ViT without position interpolation, say) or was trained
            at (`--teacher_input_size`): batches of another size are resized to it on their device. None: batches
            pass at their own size.
        interpolation: how they are resized, `bicubic` or `bilinear` (as the teacher's own preprocessing resizes).
        native_size: (height, width) the model was trained at, when its config or timm's pretrained_cfg says.
        label_names: the class names the model predicts, in order, when it names them.
    """

    def __init__(
        self,
        model: nn.Module,
        num_labels: int,
        teacher_mean: Sequence[float] | None = None,
        teacher_std: Sequence[float] | None = None,
        student_mean: Sequence[float] | None = None,
        student_std: Sequence[float] | None = None,
        channels_last: bool | None = None,
        input_size: tuple[int, int] | None = None,
        label_names: Sequence[str] | None = None,
        interpolation: str = "bicubic",
        native_size: tuple[int, int] | None = None,
    ):
        super().__init__()
        for name, (mean, std) in (("teacher", (teacher_mean, teacher_std)), ("student", (student_mean, student_std))):
            if (mean is None) != (std is None):
                raise ValueError(f"Give both {name}_mean and {name}_std, or neither.")
        self.model = model.requires_grad_(False)
        self.num_labels = num_labels
        self.input_size = tuple(input_size) if input_size is not None else None
        self.label_names = list(label_names) if label_names is not None else None
        self.interpolation, self.native_size = interpolation, native_size
        self.mean = None if teacher_mean is None else tuple(float(value) for value in teacher_mean)
        self.std = None if teacher_std is None else tuple(float(value) for value in teacher_std)
        affine = (
            _affine_between((student_mean, student_std), (teacher_mean, teacher_std))
            if teacher_mean is not None and student_mean is not None
            else None
        )
        self.register_buffer("input_scale", affine[0] if affine else None, persistent=False)
        self.register_buffer("input_shift", affine[1] if affine else None, persistent=False)
        self.channels_last = _is_convnet(model) if channels_last is None else channels_last
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.train(False)

    @property
    def renormalizes(self) -> bool:
        """Whether forward maps the student's normalisation onto the teacher's (False when they agree)."""
        return self.input_scale is not None

    def train(self, mode: bool = True) -> "Teacher":
        """Keep eval mode: a parent's `.train()` must not turn on the teacher's dropout or batch-norm updates."""
        return super().train(False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Logits `(batch, num_labels)` for a batch normalised with the student's statistics."""
        with torch.no_grad():
            if self.input_scale is not None:
                pixel_values = torch.addcmul(self.input_shift, pixel_values, self.input_scale)
            if self.input_size is not None and tuple(pixel_values.shape[-2:]) != self.input_size:
                downscaling = pixel_values.shape[-2] > self.input_size[0] or pixel_values.shape[-1] > self.input_size[1]
                pixel_values = F.interpolate(
                    pixel_values, size=self.input_size, mode=self.interpolation, align_corners=False,
                    antialias=downscaling,
                )
            if self.channels_last:
                pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
            outputs = self.model(pixel_values)
        return outputs.logits if isinstance(outputs, ModelOutput) else outputs


def _image_processor_statistics(path: str) -> tuple[list[float] | None, list[float] | None]:
    """Mean and std the directory's image processor normalises with; (None, None) when it has none."""
    try:
        processor = AutoImageProcessor.from_pretrained(path)
    except OSError:
        processor = None
    if processor is None or getattr(processor, "image_mean", None) is None:
        logger.warning(
            "No image processor with image_mean/image_std in %s: the teacher gets the student's batches unchanged.",
            path,
        )
        return None, None
    if not getattr(processor, "do_normalize", True):  # it feeds the model rescaled [0, 1] pixels
        channels = len(processor.image_mean)
        return [0.0] * channels, [1.0] * channels
    return list(processor.image_mean), list(processor.image_std)


def load_teacher(
    name_or_path: str | Path,
    checkpoint_path: str | Path | None = None,
    num_labels: int | None = None,
    student_mean: Sequence[float] | None = None,
    student_std: Sequence[float] | None = None,
    channels_last: bool | None = None,
    pretrained: bool | None = None,
    teacher_mean: Sequence[float] | None = None,
    teacher_std: Sequence[float] | None = None,
    student_size: tuple[int, int] | None = None,
    input_size: int | None = None,
) -> Teacher:
    """Load a frozen `Teacher`.

    `name_or_path` is either a local directory holding a transformers image classifier (with its image
    processor, whose `image_mean`/`image_std` give the teacher's normalisation), or a timm model name such as
    the paper's `regnety_160.deit_in1k`, normalised as its `pretrained_cfg` says. `teacher_mean`/`teacher_std`
    replace either source (a checkpoint trained with other statistics than its architecture's default). The
    statistics used and where they came from are logged. A timm teacher is loaded from `checkpoint_path`
    (`.pth`/`.pt`, optionally under a `"model"` key, or `.safetensors`) when one is given, else timm fetches its
    pretrained weights (`pretrained=None` means: when there is no checkpoint); `pretrained=False` without a
    checkpoint keeps timm's random initialisation (tests, benchmarks).

    With `student_size`, one blank batch of that size is run through the teacher: a teacher that only takes its own
    input size gets the student's batches resized to it, and one that takes neither is refused now, not at step 1.
    `input_size` (`--teacher_input_size`) resizes them to that size instead, as the teacher's own preprocessing
    interpolates (its image processor's `resample`, timm's `interpolation`): a teacher trained at another size than
    the student's.

    Raises:
        ValueError: the name is neither; a directory's model predicts another number of classes than
            `num_labels`; the checkpoint does not fit the timm model (names the keys or shapes); the teacher cannot
            run on `student_size` inputs nor on its own input size.
    """
    name_or_path = str(name_or_path)
    if (teacher_mean is None) != (teacher_std is None):
        raise ValueError("Give both teacher_mean and teacher_std (--teacher_mean, --teacher_std), or neither.")
    label_names = None
    if Path(name_or_path).is_dir():
        if checkpoint_path is not None:
            raise ValueError(
                f"checkpoint_path is for timm teachers; the directory {name_or_path} carries its own weights."
            )
        if not (Path(name_or_path) / "config.json").is_file():
            raise ValueError(
                f"Teacher directory {name_or_path} holds no config.json: not a saved transformers model "
                "(`save_pretrained` writes config.json beside the weights); for a timm model pass its name and "
                "--teacher_checkpoint."
            )
        config = AutoConfig.from_pretrained(name_or_path)
        if num_labels is not None and config.num_labels != num_labels:
            raise ValueError(
                f"The teacher in {name_or_path} predicts {config.num_labels} classes but num_labels={num_labels}; "
                "teacher and student must predict the same classes."
            )
        model = AutoModelForImageClassification.from_pretrained(name_or_path)
        own_mean, own_std = _image_processor_statistics(name_or_path)
        source = f"the image processor in {name_or_path}"
        num_labels = config.num_labels
        label_names = _named_labels(config.id2label, num_labels)
        native_size = _pair_or_none(getattr(config, "image_size", None))
        interpolation = _processor_interpolation(name_or_path)
    elif timm.is_model(name_or_path):
        model = _timm_teacher(name_or_path, checkpoint_path, num_labels, pretrained)
        data_config = resolve_model_data_config(model)
        own_mean, own_std = data_config["mean"], data_config["std"]
        source = f"timm's pretrained_cfg of {name_or_path}"
        num_labels = model.num_classes
        native_size = tuple(data_config["input_size"][1:])
        interpolation = data_config.get("interpolation", "bicubic")
    else:
        raise ValueError(
            f"Teacher {name_or_path!r} is neither a local directory nor a timm model name "
            "(see timm.list_models(); hub downloads are not supported: pass a local directory)."
        )
    if teacher_mean is not None:
        own_mean, own_std, source = teacher_mean, teacher_std, "--teacher_mean/--teacher_std"
    if own_mean is not None:
        logger.info(
            "Teacher %s normalises its input with mean %s, std %s (from %s; override with --teacher_mean, "
            "--teacher_std).", name_or_path, _rounded(own_mean), _rounded(own_std), source,
        )
    teacher = Teacher(model, num_labels, own_mean, own_std, student_mean, student_std, channels_last,
                      label_names=label_names, native_size=native_size,
                      interpolation=interpolation if interpolation in ("bicubic", "bilinear") else "bicubic")
    if input_size is not None:
        if error := _runs_at(teacher, (input_size, input_size)):
            raise ValueError(f"Teacher {name_or_path} cannot run on --teacher_input_size {input_size} images "
                             f"({type(error).__name__}: {error}).")
        teacher.input_size = (input_size, input_size)
        logger.info("The teacher's batches are resized to %d px (%s; --teacher_input_size).", input_size,
                    teacher.interpolation)
    elif student_size is not None:
        teacher.input_size = _runnable_input_size(teacher, name_or_path, tuple(student_size), native_size)
    return teacher


def _processor_interpolation(path: str) -> str:
    """How the directory's image processor resizes (`bicubic` when it does not say)."""
    try:
        resample = getattr(AutoImageProcessor.from_pretrained(path), "resample", None)
    except OSError:
        return "bicubic"
    return {PILImageResampling.BILINEAR: "bilinear"}.get(resample, "bicubic")


def input_size_hint(teacher: Teacher, student_size: int) -> str | None:
    """A line for the pre-flight when the teacher sees images of another size than it was trained at, else None."""
    fed = teacher.input_size or (student_size, student_size)
    if teacher.native_size is None or tuple(fed) == tuple(teacher.native_size):
        return None
    return (f"it sees {fed[0]}x{fed[1]} images, its config or pretrained_cfg says {teacher.native_size[0]}x"
            f"{teacher.native_size[1]}: try --teacher_input_size {teacher.native_size[0]}")


def _rounded(values: Sequence[float]) -> list[float]:
    return [round(float(value), 4) for value in values]


def _pair_or_none(size) -> tuple[int, int] | None:
    if size is None:
        return None
    return tuple(size) if isinstance(size, (list, tuple)) else (size, size)


def _named_labels(id2label: dict, num_labels: int) -> list[str] | None:
    """The model's class names, unless they are transformers' placeholders (LABEL_0, ...)."""
    names = [str(id2label.get(index, id2label.get(str(index), ""))) for index in range(num_labels)]
    return None if all(name in ("", f"LABEL_{index}") for index, name in enumerate(names)) else names


def _runs_at(teacher: Teacher, size: tuple[int, int]) -> Exception | None:
    channels = len(teacher.mean) if teacher.mean is not None else 3
    try:
        teacher(torch.zeros(1, channels, *size))
    except (RuntimeError, ValueError, AssertionError) as error:  # what models raise for an input size they refuse
        return error
    return None


def _runnable_input_size(
    teacher: Teacher, name: str, student_size: tuple[int, int], native_size: tuple[int, int] | None
) -> tuple[int, int] | None:
    """None when the teacher runs on the student's batches as they are; else its own size, to resize them to."""
    error = _runs_at(teacher, student_size)
    if error is None:
        return None
    if native_size is not None and native_size != student_size and _runs_at(teacher, native_size) is None:
        logger.info(
            "Teacher %s does not take %dx%d inputs (%s): the student's batches are resized to its %dx%d on the device.",
            name, *student_size, type(error).__name__, *native_size,
        )
        return native_size
    raise ValueError(
        f"Teacher {name} cannot run on the student's {student_size[0]}x{student_size[1]} images "
        f"({type(error).__name__}: {error})"
        + (f", nor on its own {native_size[0]}x{native_size[1]}" if native_size else "")
        + ". Choose a teacher that accepts that input size, or change --input_size."
    )


def check_class_names(teacher: Teacher, dataset_names: Sequence[str], show: int = 5) -> None:
    """Refuse a teacher whose class names differ from the dataset's, index by index, when both name them alike.

    Names written in different vocabularies (ImageNet synsets vs descriptions, say: no name in common) cannot be
    compared and pass with a log line.
    """
    if teacher.label_names is None:
        return
    normalise = lambda names: [str(name).strip().casefold() for name in names]  # noqa: E731
    ours, theirs = normalise(teacher.label_names), normalise(dataset_names)
    if not set(ours) & set(theirs):
        logger.info("The teacher's and the dataset's class names have nothing in common: not compared.")
        return
    mismatches = [(index, a, b) for index, (a, b) in enumerate(zip(teacher.label_names, dataset_names, strict=False)) if
                  normalise([a]) != normalise([b])]
    if mismatches:
        listed = "; ".join(f"class {index}: teacher {a!r}, dataset {b!r}" for index, a, b in mismatches[:show])
        raise ValueError(
            f"The teacher's classes are not the dataset's, in order ({len(mismatches)} of {len(dataset_names)} "
            f"differ): {listed}. Teacher and student must predict the same classes in the same order."
        )


def _timm_teacher(name: str, checkpoint_path, num_labels: int | None, pretrained: bool | None) -> nn.Module:
    pretrained = checkpoint_path is None if pretrained is None else pretrained
    if pretrained and checkpoint_path is not None:
        raise ValueError(f"Teacher {name!r}: give a checkpoint or ask for the pretrained weights, not both.")
    if not pretrained:
        model = timm.create_model(name, pretrained=False, **({"num_classes": num_labels} if num_labels else {}))
        if checkpoint_path is None:
            logger.warning("Teacher %s keeps timm's random initialisation (pretrained=False, no checkpoint).", name)
        else:
            load_state_dict_strict(
                model, load_state_dict_file(checkpoint_path), f"checkpoint {checkpoint_path}", f"timm model {name!r}"
            )
        return model
    try:
        model = timm.create_model(name, pretrained=True)
    except OSError as error:  # offline, or no such weights on the hub
        raise InputUnavailableError(
            f"Could not fetch the pretrained weights of timm teacher {name!r} ({type(error).__name__}); pass a "
            "local file with --teacher_checkpoint."
        ) from error
    # Asking timm for another class count would silently replace the trained head with a random one.
    if num_labels is not None and model.num_classes != num_labels:
        raise ValueError(
            f"The pretrained timm teacher {name!r} predicts {model.num_classes} classes but num_labels={num_labels}; "
            "teacher and student must predict the same classes (give a checkpoint trained on your classes)."
        )
    return model
