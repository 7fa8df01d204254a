"""Fine-tune a classifier on the dataset's classes: the teacher that `training.train --teacher_model DIR` distils.

    python -m training.train_teacher --teacher_model resnet50 --pretrained --dataset_name path/to/dataset \
        --output_dir outputs/teacher
    python -m training.train --dataset_name path/to/dataset --teacher_model outputs/teacher --output_dir outputs/deit

`--teacher_model` is a timm model name (its pretrained weights with `--pretrained`, a `--teacher_checkpoint`, or
timm's random initialisation) or a Hugging Face image classifier (a local folder or a Hub id); its head is replaced
by one for the dataset's classes. The data, its label checks and skipped-image accounting, the augmentation and the
launch (`accelerate launch -m training.train_teacher ...`) are `training.train`'s; the recipe is a convnet's
fine-tuning: AdamW, lr 1e-3, weight decay 0.05, cosine, no Mixup/CutMix, label smoothing or random erasing (the
classifier's own loss takes the class ids). The folder holds the weights (a transformers model: timm ones through
`TimmWrapperForImageClassification`), the class names, an image processor with the normalisation trained with, the
input size in `config.image_size`, and a card with the teacher's held-out top-1.
"""

import logging
import shlex
import sys
from dataclasses import dataclass, field, fields

import timm
import torch
import transformers
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, resolve_model_data_config
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    HfArgumentParser,
    PreTrainedModel,
    TimmWrapperConfig,
    TimmWrapperForImageClassification,
)

from deit_hf import DeiTHfImageProcessorPil

from .args import AugmentationArguments, DataArguments, DeiTTrainingArguments
from .argument_checks import SOFT_TARGET_FLAGS, check_integrations_installed, settle_teacher_training_arguments
from .build import prepare_datasets, share_cpu_threads
from .checkpoints import resume_argument
from .collator import DistillationCollator
from .command_line import run_command, set_up_logging
from .metrics import compute_metrics, preprocess_logits_for_metrics
from .skipped_images import SkippedImageCounter
from .train import RECIPE_TRAINING_DEFAULTS
from .trainer import DistillationTrainer
from .transforms import build_batch_transform

logger = logging.getLogger(__spec__.name)

TEACHER_TRAINING_DEFAULTS = {
    **RECIPE_TRAINING_DEFAULTS,
    "output_dir": "outputs/teacher", "num_train_epochs": 30, "per_device_train_batch_size": 64,
    "learning_rate": 1e-3, "weight_decay": 0.05, "lr_scheduler_type": "cosine", "lr_scheduler_kwargs": {},
    "warmup_steps": 0.05, "save_strategy": "no",
}
# The classifier's own loss reads class ids: no soft targets (Mixup, CutMix, smoothing), and no erasing either.
TEACHER_AUGMENTATION_DEFAULTS = {**dict.fromkeys(SOFT_TARGET_FLAGS, 0.0), "reprob": 0.0, "repeated_aug": False}


@dataclass
class TeacherArguments:
    """The classifier to fine-tune into a teacher."""

    teacher_model: str = field(
        metadata={"help": "A timm model name (e.g. resnet50) or a Hugging Face image classifier (folder or Hub id)."}
    )
    pretrained: bool = field(default=False, metadata={"help": "Start a timm model from timm's pretrained weights."})
    teacher_checkpoint: str | None = field(
        default=None, metadata={"help": "Start a timm model from these weights (a .pth/.safetensors state dict)."}
    )


@dataclass(frozen=True)
class TeacherRunArguments:
    """The parsed arguments of `training.train_teacher`, each dataclass by its name."""

    teacher: TeacherArguments
    data: DataArguments
    augmentation: AugmentationArguments
    training: DeiTTrainingArguments


def parse_args(argv: list[str] | None = None) -> TeacherRunArguments:
    """The command's arguments; a refused value exits as argparse does, in one line naming the option (the rules
    between flags: `training.argument_checks.settle_teacher_training_arguments`)."""
    parser = HfArgumentParser(tuple(part.type for part in fields(TeacherRunArguments)),
                              usage="%(prog)s --teacher_model NAME (--dataset_name D | --train_dir D) [--option ...]")
    has_accelerator = torch.accelerator.is_available()
    parser.set_defaults(**TEACHER_TRAINING_DEFAULTS, **TEACHER_AUGMENTATION_DEFAULTS, use_cpu=not has_accelerator,
                        dataloader_pin_memory=has_accelerator)
    try:
        given = {token[2:].split("=", 1)[0] for token in (sys.argv[1:] if argv is None else argv) if token[:2] == "--"}
        check_integrations_installed(given)
        arguments = TeacherRunArguments(*parser.parse_args_into_dataclasses(argv))
        settle_teacher_training_arguments(arguments.teacher, arguments.data, arguments.augmentation,
                                          arguments.training)
    except (ValueError, OSError) as error:  # OSError: a file an option names (--accelerator_config) is unreadable
        parser.error(str(error))
    return arguments


def build_classifier(teacher_args: TeacherArguments, label_names: list[str]) -> tuple[PreTrainedModel, tuple, tuple]:
    """The classifier with a new head for `label_names`, and the mean and std its inputs are normalised with."""
    id2label = dict(enumerate(label_names))
    labels = dict(num_labels=len(label_names), id2label=id2label, label2id={name: i for i, name in id2label.items()})
    name = teacher_args.teacher_model
    if timm.is_model(name):
        checkpoint = teacher_args.teacher_checkpoint
        # timm drops a pretrained head of another class count itself
        source = timm.create_model(name, pretrained=teacher_args.pretrained or checkpoint is not None,
                                   num_classes=len(label_names),
                                   **({"pretrained_cfg_overlay": {"file": checkpoint}} if checkpoint else {}))
        model = TimmWrapperForImageClassification(TimmWrapperConfig(architecture=name, **labels))
        model.timm_model.load_state_dict(source.state_dict())
        data_config = resolve_model_data_config(source)
        return model, tuple(data_config["mean"]), tuple(data_config["std"])
    model = AutoModelForImageClassification.from_pretrained(name, **labels, ignore_mismatched_sizes=True)
    try:
        processor = AutoImageProcessor.from_pretrained(name)
    except OSError:
        processor = None
    if getattr(processor, "image_mean", None) is None:
        logger.warning("%s has no image processor with image_mean/image_std: normalising with ImageNet's.", name)
        return model, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    return model, tuple(processor.image_mean), tuple(processor.image_std)


def main(argv: list[str] | None = None) -> DistillationTrainer:
    """Fine-tune the classifier as `argv` says, save it with its processor and card; returns the trainer."""
    arguments = parse_args(argv)
    teacher_args, data_args = arguments.teacher, arguments.data
    aug_args, training_args = arguments.augmentation, arguments.training
    set_up_logging(training_args)
    transformers.set_seed(training_args.seed)
    share_cpu_threads(training_args.dataloader_num_workers)
    data, train_dataset, eval_dataset, own_stream_part = prepare_datasets(data_args, aug_args, training_args)
    model, mean, std = build_classifier(teacher_args, data.label_names)
    own_size = getattr(model.config, "image_size", aug_args.input_size)
    if own_size != aug_args.input_size:  # its weights may be shaped for that size (a ViT's position embeddings)
        raise ValueError(f"{teacher_args.teacher_model}'s config has image_size {own_size}, not --input_size "
                         f"{aug_args.input_size}: train it at {own_size}, or choose a timm model.")
    # What `DistillationTrainer` reads of a model's config (blank rows, no teacher); image_size stays in the folder
    # as the size the teacher was trained at (`training.teacher.model.load_teacher` reads it).
    model.config.update({"image_size": aug_args.input_size, "num_channels": 3, "distillation_type": "none"})
    processor = DeiTHfImageProcessorPil.for_input_size(aug_args.input_size, aug_args.eval_crop_pct,
                                                       image_mean=list(mean), image_std=list(std))
    trainer = DistillationTrainer(
        model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        data_collator=DistillationCollator(), processing_class=processor, compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        batch_transform=build_batch_transform(aug_args, len(data.label_names), mean, std),
        skipped_images=SkippedImageCounter(data_args.min_decodable_fraction),
        max_consecutive_nonfinite=training_args.max_consecutive_nonfinite, own_stream_part=own_stream_part,
    )
    result = trainer.train(resume_from_checkpoint=resume_argument(training_args, model.state_dict().keys()))
    metrics = trainer.evaluate()  # held-out top-1 for the card: the teacher is evaluated whatever --do_eval says
    del model.config.distillation_type  # the trainer's, not the teacher's
    trainer.save_model()
    for split, values in (("train", result.metrics), ("eval", metrics)):
        trainer.log_metrics(split, values)
        trainer.save_metrics(split, values)
    if trainer.is_world_process_zero():
        card = teacher_card(teacher_args, data_args, aug_args, len(data.label_names), metrics)
        card.save(f"{training_args.output_dir}/README.md")
    logger.info("Teacher saved to %s: held-out top-1 %.4f; train a student with --teacher_model %s.",
                training_args.output_dir, metrics["eval_top1"], training_args.output_dir)
    trainer.end()
    return trainer


def teacher_card(teacher_args: TeacherArguments, data_args: DataArguments, aug_args: AugmentationArguments,
                 num_labels: int, metrics: dict) -> ModelCard:
    """The folder's card: what the teacher started from, what it was trained on, its held-out top-1."""
    dataset = data_args.dataset_name or data_args.train_dir
    evaluated_on = data_args.validation_dir or dataset
    if teacher_args.pretrained or teacher_args.teacher_checkpoint:
        start = "timm's pretrained weights" if teacher_args.pretrained else f"`{teacher_args.teacher_checkpoint}`"
    else:
        start = "timm's random initialisation" if timm.is_model(teacher_args.teacher_model) else "its own weights"
    top1 = 100 * metrics["eval_top1"]
    result = EvalResult(task_type="image-classification", dataset_type=evaluated_on, dataset_name=evaluated_on,
                        dataset_split=data_args.validation_split, metric_type="accuracy", metric_name="top-1 (%)",
                        metric_value=round(top1, 2))
    data = ModelCardData(library_name="transformers", pipeline_tag="image-classification", tags=["deit-hf-teacher"],
                         model_name=f"{teacher_args.teacher_model} teacher", eval_results=[result])
    text = (
        f"# A `{teacher_args.teacher_model}` teacher for {dataset}\n\n"
        f"Fine-tuned by `training.train_teacher` from {start} on {dataset} at {aug_args.input_size} px, with a new "
        f"head for its {num_labels} classes. Held-out top-1: {top1:.2f} % on {evaluated_on} "
        f"({metrics['eval_images']} images, {metrics['eval_skipped_images']} skipped).\n\n"
        f"Distil a DeiT from it: `python -m training.train {data_flags(data_args)} --teacher_model <this folder>`."
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text}\n")


def data_flags(data_args: DataArguments) -> str:
    """The flags that chose the teacher's data (those not at their defaults), for the student's command."""
    chosen = [(flag.name, value) for flag in fields(data_args)
              if (value := getattr(data_args, flag.name)) != flag.default]
    return shlex.join(word for name, value in chosen for word in (f"--{name}", str(value)))


if __name__ == "__main__":
    run_command(main, "training.train_teacher")
