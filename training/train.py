"""Train DeiT⚗ with a teacher on an image dataset loaded with `datasets`.

    python -m training.train --dataset_name ILSVRC/imagenet-1k --teacher_model regnety_160.deit_in1k \
        --output_dir outputs/deit-s
    accelerate launch --multi_gpu --num_processes 8 -m training.train args.json

Arguments are the dataclasses of `training.args` plus transformers' `TrainingArguments`, as flags or one JSON file.
Their defaults are the DeiT recipe (facebookresearch/deit `main.py`); see `--help`.
"""

import json
import logging
import math
import os
import sys

import torch
import transformers
from transformers import HfArgumentParser, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from deit_hf import DeiTConfig, DeiTForImageClassificationWithTeacher, DeiTImageProcessor

from .args import AugmentationArguments, DataArguments, DistillationArguments, ModelArguments
from .collator import DistillationCollator
from .data import attach_transform, load_image_datasets
from .metrics import compute_metrics, preprocess_logits_for_metrics
from .run_card import write_run_card
from .teacher import check_class_names, check_teacher_accuracy, load_teacher
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
    ddp_find_unused_parameters=False,  # every parameter gets a gradient (both heads, with or without a teacher)
    report_to=["tensorboard"],
    remove_unused_columns=False,  # the image transform needs the raw columns
    dataloader_num_workers=8,
)
ARGUMENT_CLASSES = (ModelArguments, DistillationArguments, DataArguments, AugmentationArguments, TrainingArguments)


# A flag of the recipe's rule and the TrainingArguments value it derives: the one the user gave wins.
RECIPE_RULES = (("blr", "learning_rate"), ("warmup_epochs", "warmup_steps"))


def _given_names(argv: list[str]) -> set[str]:
    """Argument names given on the command line (`--name value`, `--name=value`) or as keys of a JSON file."""
    if len(argv) == 1 and argv[0].endswith(".json"):
        with open(argv[0]) as file:
            return set(json.load(file))
    return {token[2:].split("=", 1)[0].replace("-", "_") for token in argv if token.startswith("--")}


def parse_args(argv: list[str] | None = None):
    """The five argument dataclasses from flags, or from a single `.json` file.

    An explicit `--learning_rate` or `--warmup_steps` replaces the recipe's rule that would derive it (`--blr`,
    `--warmup_epochs`); giving both of a pair is refused.
    """
    argv = sys.argv[1:] if argv is None else argv
    parser = HfArgumentParser(ARGUMENT_CLASSES)
    # Without an accelerator, `accelerate launch` forms a gloo group only for CPU runs; otherwise every process
    # would train alone on all the data.
    has_accelerator = torch.accelerator.is_available()
    parser.set_defaults(**RECIPE_TRAINING_DEFAULTS, use_cpu=not has_accelerator, dataloader_pin_memory=has_accelerator)
    if len(argv) == 1 and argv[0].endswith(".json"):
        arguments = parser.parse_json_file(argv[0])
    else:
        arguments = parser.parse_args_into_dataclasses(argv)
    given = _given_names(argv)
    distill_args = arguments[1]
    for rule, derived in RECIPE_RULES:
        if rule in given and derived in given:
            parser.error(f"--{rule} and --{derived} both set the {derived.replace('_', ' ')}: give one of them.")
        if derived in given:
            setattr(distill_args, rule, 0)  # 0 turns the rule off and keeps the value given
    return arguments


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
    """DeiT's linear scaling rule (lr = blr x global batch / 512) and warm-up counted in epochs, then checks of the
    schedule that results; the values used are logged."""
    global_batch = (
        training_args.per_device_train_batch_size * training_args.world_size * training_args.gradient_accumulation_steps
    )
    steps_per_epoch = None if train_size is None else math.ceil(train_size / global_batch)
    if distill_args.blr > 0:
        training_args.learning_rate = distill_args.blr * global_batch / 512
    if distill_args.warmup_epochs > 0:
        if steps_per_epoch is None:
            logger.warning("A streamed dataset has no length: warm-up in epochs is off, use --warmup_steps.")
        else:
            training_args.warmup_steps = int(distill_args.warmup_epochs * steps_per_epoch)
    min_lr = (training_args.lr_scheduler_kwargs or {}).get("min_lr")
    if min_lr is not None and min_lr >= training_args.learning_rate:
        # The cosine would climb from the learning rate up to its floor instead of decaying.
        logger.warning(
            "The learning rate %.3g is not above the cosine's min_lr %.3g: the cosine decays to 0 instead.",
            training_args.learning_rate, min_lr,
        )
        training_args.lr_scheduler_kwargs = {**training_args.lr_scheduler_kwargs, "min_lr": 0.0}
    total_steps = (
        training_args.max_steps if training_args.max_steps > 0
        else None if steps_per_epoch is None else math.ceil(training_args.num_train_epochs * steps_per_epoch)
    )
    warmup_steps = training_args.get_warmup_steps(total_steps or 0)
    if total_steps is not None and warmup_steps >= total_steps:
        logger.warning(
            "Warm-up (%d steps) is as long as the whole run (%d steps): the learning rate never reaches %.3g.",
            warmup_steps, total_steps, training_args.learning_rate,
        )
    logger.info(
        "Global batch %d: learning rate %.3g, %d warm-up steps, %s steps in all.",
        global_batch, training_args.learning_rate, warmup_steps, total_steps if total_steps is not None else "unknown",
    )


def resume_argument(training_args: TrainingArguments) -> str | bool | None:
    """`--resume_from_checkpoint last` (or true) resumes the newest checkpoint of `output_dir`; a path resumes it.

    A new run into an `output_dir` that already holds checkpoints is refused rather than left to overwrite them.
    """
    resume = training_args.resume_from_checkpoint
    if resume is not None and resume.lower() in ("last", "true"):
        return True
    existing = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
    if resume is None and existing is not None:
        raise ValueError(
            f"{training_args.output_dir} already holds checkpoints ({os.path.basename(existing)}, ...): pass "
            "--resume_from_checkpoint last to continue that run, or another --output_dir to start a new one."
        )
    return resume


def main(argv: list[str] | None = None) -> DistillationTrainer:
    model_args, distill_args, data_args, aug_args, training_args = parse_args(argv)
    log_level = training_args.get_process_log_level()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=log_level)
    transformers.utils.logging.set_verbosity(log_level)
    # The run's own facts (schedule, teacher check, data) are shown at the default level, once.
    logging.getLogger(__package__).setLevel(min(log_level, logging.INFO) if training_args.should_log else log_level)
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
            student_mean=mean, student_std=std, teacher_mean=distill_args.teacher_mean,
            teacher_std=distill_args.teacher_std, student_size=(aug_args.input_size, aug_args.input_size),
        )
        check_class_names(teacher, data.label_names)
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
    )
    if teacher is not None and distill_args.teacher_check_batches > 0:
        check_teacher_accuracy(*trainer.count_teacher_correct(distill_args.teacher_check_batches), len(data.label_names))
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
    if training_args.do_train:  # the saved model's README.md: this run's metrics per head, teacher and recipe
        write_run_card(trainer, model_args, distill_args, data_args, aug_args)
    # Trackers finished, process group destroyed: a gloo group left to the interpreter's exit sometimes aborts it
    # ("terminate called without an active exception"), failing a finished run.
    trainer.end()
    return trainer


if __name__ == "__main__":
    main()
