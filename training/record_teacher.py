"""Record the teacher's targets without a student: one teacher, then any number of students replay them.

    python -m training.record_teacher --teacher_cache records/regnety --dataset_name ILSVRC/imagenet-1k \
        --num_train_epochs 300 [the students' flags]
    accelerate launch --multi_gpu --num_processes 8 -m training.record_teacher args.json --teacher_cache records/x

Takes `training.train`'s flags and builds the same run (`training.build.build_trainer`): the same mix groups, the same
per-batch augmentation, keyed as the students' runs will look them up, on any layout with the same global batch and
mix group size. Instead of training, each
process runs the teacher alone on its views, several of the students' batches at a time (at least
`--per_device_eval_batch_size` views per forward), and writes its parts of the record; epochs already recorded are
skipped, and a run stopped midway resumes at the first epoch it had not finished. The evaluation batches are
recorded too when the students' runs will evaluate (on this evaluation layout). Each micro-batch is prepared by the
trainer's own `prepare_training_batch`, so its mix groups' random erasing and Mixup/CutMix draw what the students'
runs draw, and each group is recorded under its key; the replaying runs compare each group's pixels with the
record's and stop at the first difference. It only records: `--teacher_cache_check` (a replaying run's check) is
refused here.
"""

import logging
from collections.abc import Callable

import torch

from .argument_checks import check_recording_arguments
from .build import build_trainer
from .randomness import MixGroup
from .teacher.fingerprint import global_batch, needed_groups
from .teacher.store import TeacherRecordError, steps_per_epoch
from .teacher.targets import RecordedTeacher
from .train import parse_args

logger = logging.getLogger(__spec__.name)  # under `python -m`, "training.record_teacher" rather than "__main__"


class TeacherPass:
    """Runs the teacher on several of the students' batches at a time and hands each its logits to record."""

    def __init__(self, targets: RecordedTeacher, min_views: int):
        self.targets, self.min_views = targets, min_views
        self.waiting: list[tuple[torch.Tensor, Callable[[torch.Tensor | None], object]]] = []

    def add(self, pixel_values: torch.Tensor, recorded: bool, store: Callable[[torch.Tensor | None], object]) -> None:
        """`store(logits)` records a batch's targets; a `recorded` batch is stored at once, with None: its digest is
        compared with the record's."""
        if recorded:
            store(None)
            return
        self.waiting.append((pixel_values, store))
        if sum(len(batch) for batch, _ in self.waiting) >= self.min_views:
            self.flush()

    def flush(self) -> None:
        if not self.waiting:
            return
        logits = self.targets.run_teacher(torch.cat([batch for batch, _ in self.waiting]))
        for (_, store), batch_logits in zip(self.waiting, logits.split([len(batch) for batch, _ in self.waiting]),
                                            strict=True):
            store(batch_logits)
        self.waiting = []


def record(trainer, aug_args, training_args) -> None:
    """Record every mix group of the run `trainer` would train (and evaluate) that the record lacks."""
    targets: RecordedTeacher = trainer.teacher_targets
    teacher_pass = TeacherPass(targets, training_args.per_device_eval_batch_size)
    per_epoch = steps_per_epoch(len(trainer.train_dataset), global_batch(training_args),
                                training_args.dataloader_drop_last)
    accumulation = training_args.gradient_accumulation_steps
    groups_per_step = global_batch(training_args) // aug_args.mix_group(training_args.per_device_train_batch_size)
    dataloader = trainer.get_train_dataloader()
    for epoch, groups in needed_groups(len(trainer.train_dataset), aug_args, training_args).items():
        if set(groups) <= targets.record.recorded_groups(epoch):
            logger.info("Epoch %d is recorded already.", epoch)
            continue
        # as transformers' training loop: the epoch's order from the sampler(s)
        for sampler in (dataloader, getattr(getattr(dataloader, "batch_sampler", None), "batch_sampler", None)):
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
        trainer.step_seeder.start_epoch(epoch)
        for batch_number, inputs in enumerate(dataloader):
            step = batch_number // accumulation
            if step >= len(groups) // groups_per_step:
                break
            # prepared as the trainer prepares a micro-batch, an empty one too: the same erasing and Mixup/CutMix
            inputs = trainer.prepare_training_batch(inputs, epoch * per_epoch + step)
            batch_groups = tuple(MixGroup(*group) for group in inputs["mix_groups"])
            if inputs["labels"].numel() == 0:  # nothing decoded: the trainer asks no target for it
                targets.skip(batch_groups)
                continue
            pixel_values = inputs["pixel_values"]
            teacher_pass.add(pixel_values, all(targets.has(group) for group in batch_groups),
                             lambda logits, groups=batch_groups, views=pixel_values: targets.group_targets(
                                 groups, views, logits))
        teacher_pass.flush()
        targets.verify()
        targets.save()
        logger.info("Recorded epoch %d.", epoch)
    if training_args.do_eval or training_args.eval_strategy != "no":
        number = 0
        for number, inputs in enumerate(trainer.get_eval_dataloader(), 1):
            inputs, *_ = trainer.evaluated_rows(inputs)  # what the trainer's `prediction_step` asks targets for
            teacher_pass.add(inputs["pixel_values"], targets.has_eval(number - 1),
                             lambda logits, key=number - 1, views=inputs["pixel_values"]: targets.targets(
                                 targets.eval_part, key, views, logits))
        teacher_pass.flush()
        targets.verify()
        targets.save()
        logger.info("Recorded the %d evaluation batches.", number)


def main(argv: list[str] | None = None) -> None:
    """Record the targets of the run `argv` describes (training.train's flags, `--teacher_cache` required)."""
    arguments = parse_args(argv)  # `--help` exits here; a refused flag exits as training.train's do
    try:
        check_recording_arguments(arguments)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    aug_args, training_args = arguments.augmentation, arguments.training
    trainer = build_trainer(arguments)
    targets = trainer.teacher_targets
    if not isinstance(targets, RecordedTeacher):
        raise TeacherRecordError("training.record_teacher records a teacher: --distillation_type none or labels has "
                                 "none.")
    if targets.records:
        record(trainer, aug_args, training_args)
    else:
        logger.info("%s holds every batch of this run already: nothing to record.", targets.record.directory)
    trainer.end()


if __name__ == "__main__":
    main()
