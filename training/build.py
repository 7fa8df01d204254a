"""The run a training command line describes, built: its datasets, student, teacher (or the teacher's recorded
targets), schedule and `DistillationTrainer` (`build_trainer`), from the parsed arguments (`training.train`)."""

import logging
import math
import os
from collections.abc import Callable

import torch
import transformers
from accelerate.utils import get_int_from_env
from transformers import TrainerCallback, TrainingArguments

from deit_hf import DeiTHfImageProcessorPil, DeiTPreTrainedModel
from deit_hf.distillation_types import get_distillation_type

from .args import AugmentationArguments, DataArguments, DistillationArguments, RunArguments
from .collator import DistillationCollator
from .command_line import set_up_logging
from .data import attach_transform, load_image_datasets, prepare_train_stream
from .memory_check import check_activation_memory
from .metrics import compute_metrics, preprocess_logits_for_metrics
from .skipped_images import SkippedImageCounter
from .student import build_student
from .teacher.model import check_class_names, load_teacher
from .teacher.preflight import preflight
from .teacher.targets import open_teacher_targets
from .trainer import DistillationTrainer
from .transforms import ImageTransform, build_batch_transform, build_eval_transform, build_train_transform

logger = logging.getLogger(__name__)


def apply_recipe_schedule(
    training_args: TrainingArguments, distill_args: DistillationArguments, train_size: int | None
):
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


def share_cpu_threads(dataloader_num_workers: int) -> int:
    """Give this process's intra-op pool the cores left to it by the other local processes and its DataLoader
    workers (each runs one thread), so none of them spins against another; `OMP_NUM_THREADS` set by the user (or
    by `accelerate launch`) wins. Returns the thread count."""
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    # torchrun's count, else mpirun's (accelerate's MULTI_CPU launch), which accelerate copies only later
    local_processes = get_int_from_env(
        ["LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE"], 1
    )
    threads = max(1, cores // local_processes - dataloader_num_workers)
    torch.set_num_threads(threads)
    return threads


def prepare_datasets(data_args: DataArguments, aug_args: AugmentationArguments, training_args: TrainingArguments):
    """The run's `ImageDatasets`, its train and validation splits with their image transforms attached, and whether
    the train split is this process's own part of a stream (`training.argument_checks.check_stream_dispatch`)."""
    data = load_image_datasets(data_args)
    train_dataset, eval_dataset = data.dataset_dict["train"], data.dataset_dict["validation"]
    own_stream_part = data_args.streaming and training_args.world_size > 1
    if data_args.streaming:  # before the transform: each process decodes only its own examples
        train_dataset = prepare_train_stream(
            train_dataset, data_args, training_args.process_index, training_args.world_size,
            training_args.dataloader_num_workers, training_args.seed, own_stream_part,
        )
    bounds = dict(max_pixels=data_args.max_image_pixels, max_aspect_ratio=data_args.max_image_aspect_ratio)
    train_dataset = attach_transform(
        train_dataset, ImageTransform(build_train_transform(aug_args), data.image_column, data.label_column, **bounds)
    )
    eval_dataset = attach_transform(
        eval_dataset, ImageTransform(build_eval_transform(aug_args), data.image_column, data.label_column, **bounds)
    )
    return data, train_dataset, eval_dataset, own_stream_part


def build_trainer(
    arguments: RunArguments,
    callbacks: list[TrainerCallback] | None = None,
    prepare_model: Callable[[DeiTPreTrainedModel], torch.nn.Module] | None = None,
) -> DistillationTrainer:
    """The run's `DistillationTrainer`, ready to train: data, student, teacher (or its recorded targets,
    `--teacher_cache`) and the schedule, as the parsed `arguments` say (`training.train.parse_args`); the pre-flight
    passed (`training.teacher.preflight`). `callbacks` join the Trainer's own; `prepare_model`: see
    `training.train.main`."""
    model_args, distill_args, data_args = arguments.model, arguments.distillation, arguments.data
    aug_args, training_args = arguments.augmentation, arguments.training
    set_up_logging(training_args)
    transformers.set_seed(training_args.seed)
    logger.info("%d torch threads per process.", share_cpu_threads(training_args.dataloader_num_workers))

    data, train_dataset, eval_dataset, own_stream_part = prepare_datasets(data_args, aug_args, training_args)
    model = build_student(model_args, distill_args, aug_args, data.id2label)
    check_activation_memory(model.config, training_args)
    if prepare_model is not None:
        model = prepare_model(model)
    processor = DeiTHfImageProcessorPil.for_input_size(aug_args.input_size, aug_args.eval_crop_pct)
    mean, std = processor.image_mean, processor.image_std

    def load_checked_teacher():
        teacher = load_teacher(
            distill_args.teacher_model, distill_args.teacher_checkpoint, num_labels=len(data.label_names),
            student_mean=mean, student_std=std, teacher_mean=distill_args.teacher_mean,
            teacher_std=distill_args.teacher_std, student_size=(aug_args.input_size, aug_args.input_size),
            input_size=distill_args.teacher_input_size,
        )
        check_class_names(teacher, data.label_names)
        return teacher

    teacher_targets = None
    if get_distillation_type(distill_args.distillation_type).uses_teacher:  # the teacher, or its recorded targets
        teacher_targets = open_teacher_targets(
            distill_args, aug_args, training_args, data.dataset_dict, (mean, std), len(data.label_names),
            load_checked_teacher,
        )
    apply_recipe_schedule(training_args, distill_args, getattr(train_dataset, "num_rows", None))

    trainer = DistillationTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,  # evaluation only: no --max_steps for a stream
        eval_dataset=eval_dataset,
        data_collator=DistillationCollator(),
        processing_class=processor,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        teacher_targets=teacher_targets,
        batch_transform=build_batch_transform(aug_args, len(data.label_names), mean, std),
        num_repeats=aug_args.num_repeats if aug_args.repeated_aug else 0,
        mix_group_size=aug_args.mix_group(training_args.per_device_train_batch_size),
        skipped_images=SkippedImageCounter(data_args.min_decodable_fraction),
        max_consecutive_nonfinite=training_args.max_consecutive_nonfinite,
        own_stream_part=own_stream_part,
        callbacks=callbacks,
    )
    preflight(trainer, distill_args.teacher_check_batches, data.label_column, data.label_names, aug_args.input_size)
    return trainer
