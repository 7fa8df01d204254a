"""Train DeiT⚗ with a teacher on an image dataset loaded with `datasets`.

    python -m training.train --dataset_name ILSVRC/imagenet-1k --teacher_model regnety_160.deit_in1k \
        --output_dir outputs/deit-s
    accelerate launch --multi_gpu --num_processes 8 -m training.train args.json

Arguments are the dataclasses of `training.args` plus transformers' `TrainingArguments`, as flags or one JSON file.
Their defaults are the DeiT recipe (facebookresearch/deit `main.py`); see `--help`.
"""

import logging
import math
import os
import sys

import torch
import transformers
from transformers import HfArgumentParser, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from deit_hf import DeiTConfig, DeiTForImageClassificationWithTeacher, DeiTImageProcessor

from .args import AugmentationArguments, DataArguments, DeiTTrainingArguments, DistillationArguments, ModelArguments
from .checkpoints import last_complete_checkpoint, missing_parts
from .collator import DistillationCollator
from .data import attach_transform, load_image_datasets
from .metrics import compute_metrics, preprocess_logits_for_metrics
from .teacher import load_teacher
from .trainer import DistillationTrainer
from .transforms import ImageTransform, build_batch_transform, build_eval_transform, build_train_transform

logger = logging.getLogger(__name__)

# The recipe's TrainingArguments (facebookresearch/deit main.py); the learning rate and warm-up are derived below.
RECIPE_TRAINING_DEFAULTS = dict(
    output_dir="outputs/deit",
    do_train=True,
    num_train_epochs=300,
    per_device_train_batch_size=128,
    per_device_eval_batch_size=128,
    weight_decay=0.05,
    adam_epsilon=1e-8,
    max_grad_norm=0.0,  # facebookresearch/deit does not clip gradients (its --clip-grad defaults to None)
    lr_scheduler_type="cosine_with_min_lr",
    lr_scheduler_kwargs={"min_lr": 1e-5},
    eval_strategy="epoch",
    save_strategy="epoch",
    save_total_limit=2,
    logging_steps=50,
    # transformers' NaN/inf filter reads each step's loss on the host, a synchronization per step; without it a
    # non-finite loss shows in the logged mean instead of being replaced.
    logging_nan_inf_filter=False,
    report_to=["tensorboard"],
    remove_unused_columns=False,  # the image transform needs the raw columns
    dataloader_num_workers=8,
    # How long a process waits at a collective for a stuck one before the job fails (transformers: 30 min). It must
    # exceed the longest legitimate wait: another process compiling its first step or the main one writing a
    # checkpoint, minutes at most. The launcher adds its 30 s grace before it kills the stuck process.
    ddp_timeout=600,
)
ARGUMENT_CLASSES = (ModelArguments, DistillationArguments, DataArguments, AugmentationArguments, DeiTTrainingArguments)


def parse_args(argv: list[str] | None = None):
    """The five argument dataclasses from flags, or from a single `.json` file."""
    argv = sys.argv[1:] if argv is None else argv
    parser = HfArgumentParser(ARGUMENT_CLASSES)
    # Without an accelerator, `accelerate launch` forms a gloo group only for CPU runs; otherwise every process
    # would train alone on all the data.
    has_accelerator = torch.accelerator.is_available()
    parser.set_defaults(**RECIPE_TRAINING_DEFAULTS, use_cpu=not has_accelerator, dataloader_pin_memory=has_accelerator)
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(argv[0])
    return parser.parse_args_into_dataclasses(argv)


def build_student(
    model_args: ModelArguments, distill_args: DistillationArguments, aug_args: AugmentationArguments, id2label: dict
) -> DeiTForImageClassificationWithTeacher:
    """A DeiT⚗ from a preset (random init) or a checkpoint to fine-tune, with the dataset's labels."""
    settings = dict(
        label_smoothing=aug_args.smoothing,  # reaches the loss on hard labels; Mixup's soft targets carry their own
        distillation_type=distill_args.distillation_type,
        distillation_alpha=distill_args.distillation_alpha,
        distillation_tau=distill_args.distillation_tau,
        drop_path_rate=model_args.drop_path_rate,
        id2label=id2label,
        label2id={name: index for index, name in id2label.items()},
    )
    if model_args.model_name_or_path:
        return DeiTForImageClassificationWithTeacher.from_pretrained(
            model_args.model_name_or_path,
            attn_implementation=model_args.attn_implementation,
            ignore_mismatched_sizes=True,  # a new label set replaces the heads
            **settings,
        )
    config = DeiTConfig.from_preset(
        model_args.model_preset, image_size=aug_args.input_size, **model_args.config_overrides_dict(), **settings
    )
    return DeiTForImageClassificationWithTeacher._from_config(config, attn_implementation=model_args.attn_implementation)


def apply_recipe_schedule(training_args: TrainingArguments, distill_args: DistillationArguments, train_size: int | None):
    """DeiT's linear scaling rule (lr = blr x global batch / 512) and warm-up counted in epochs."""
    global_batch = (
        training_args.per_device_train_batch_size * training_args.world_size * training_args.gradient_accumulation_steps
    )
    if distill_args.blr > 0:
        training_args.learning_rate = distill_args.blr * global_batch / 512
    if distill_args.warmup_epochs > 0:
        if train_size is None:
            logger.warning("A streamed dataset has no length: warm-up in epochs is off, use --warmup_steps.")
        else:
            training_args.warmup_steps = int(distill_args.warmup_epochs * math.ceil(train_size / global_batch))
    logger.info(
        "Global batch %d: learning rate %.3g, %d warm-up steps.",
        global_batch, training_args.learning_rate, training_args.warmup_steps,
    )


def resume_argument(training_args: TrainingArguments) -> str | None:
    """`--resume_from_checkpoint last` (or true) resumes the newest complete checkpoint of `output_dir`, or starts
    from step 0 when there is none (one command for the first start and every restart); a path resumes it.

    Incomplete checkpoints (`training.checkpoints.missing_parts`) are skipped with a warning, or refused when named.
    A new run into an `output_dir` that already holds checkpoints is refused rather than left to overwrite them.
    """
    resume = training_args.resume_from_checkpoint
    if resume is not None and resume.lower() in ("last", "true"):
        checkpoint = last_complete_checkpoint(training_args.output_dir)
        if checkpoint is None:
            logger.warning("No complete checkpoint in %s: starting from step 0.", training_args.output_dir)
        return checkpoint
    if resume is not None and (missing := missing_parts(resume)):
        raise ValueError(f"Cannot resume from {resume}: it has no {', no '.join(missing)}.")
    existing = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
    if resume is None and existing is not None:
        raise ValueError(
            f"{training_args.output_dir} already holds checkpoints ({os.path.basename(existing)}, ...): pass "
            "--resume_from_checkpoint last to continue that run, or another --output_dir to start a new one."
        )
    return resume


def main(argv: list[str] | None = None) -> DistillationTrainer:
    model_args, distill_args, data_args, aug_args, training_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=training_args.get_process_log_level())
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    transformers.set_seed(training_args.seed)

    data = load_image_datasets(data_args)
    train_dataset, eval_dataset = data.dataset_dict["train"], data.dataset_dict["validation"]
    model = build_student(model_args, distill_args, aug_args, data.id2label)
    processor = DeiTImageProcessor.for_input_size(aug_args.input_size, aug_args.eval_crop_pct)
    mean, std = processor.image_mean, processor.image_std
    train_dataset = attach_transform(
        train_dataset, ImageTransform(build_train_transform(aug_args), data.image_column, data.label_column)
    )
    eval_dataset = attach_transform(
        eval_dataset, ImageTransform(build_eval_transform(aug_args), data.image_column, data.label_column)
    )
    teacher = None
    if distill_args.distillation_type != "none":
        teacher = load_teacher(
            distill_args.teacher_model, distill_args.teacher_checkpoint, num_labels=len(data.label_names),
            student_mean=mean, student_std=std,
        )
    apply_recipe_schedule(training_args, distill_args, getattr(train_dataset, "num_rows", None))

    trainer = DistillationTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=DistillationCollator(),
        processing_class=processor,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        teacher=teacher,
        batch_transform=build_batch_transform(aug_args, len(data.label_names), mean, std),
        num_repeats=aug_args.num_repeats if aug_args.repeated_aug else 0,
        max_consecutive_nonfinite=training_args.max_consecutive_nonfinite,
    )
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=resume_argument(training_args))
        trainer.save_model()  # model + image processor: `pipeline("image-classification", output_dir)` loads it
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
    if training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    # Trackers finished, process group destroyed: a gloo group left to the interpreter's exit sometimes aborts it
    # ("terminate called without an active exception"), failing a finished run.
    trainer.end()
    return trainer


if __name__ == "__main__":
    main()
