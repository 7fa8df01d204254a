"""Record the teacher's targets without a student: one teacher, then any number of students replay them.

    python -m training.record_teacher --teacher_cache records/regnety --dataset_name ILSVRC/imagenet-1k \
        --num_train_epochs 300 [the students' flags]
    accelerate launch --multi_gpu --num_processes 8 -m training.record_teacher args.json --teacher_cache records/x

Takes `training.train`'s flags and builds the same run (`training.build.build_trainer`): the same batches on the same
processes, the same per-batch augmentation, keyed as the students' runs will look them up. Instead of training, each
process runs the teacher alone on its views, several of the students' batches at a time (at least
`--per_device_eval_batch_size` views per forward), and writes its parts of the record; epochs already recorded are
skipped, and a run stopped midway resumes at the first epoch it had not finished. The evaluation batches are
recorded too when the students' runs will evaluate. Each micro-batch is seeded from its `StepKey` as the trainer
seeds it (`training.randomness.StepSeeder`), so its random erasing and Mixup/CutMix draw what the students' runs
draw, and it is recorded under that key; the replaying runs compare each batch's pixels with the record's and stop
at the first difference. It only records: `--teacher_cache_check` (a replaying run's check) is refused here.
"""

import logging

import torch

from .argument_checks import check_recording_arguments
from .build import build_trainer
from .teacher.store import TeacherRecordError, part_name
from .teacher.targets import RecordedTeacher, needed_steps
from .train import parse_args

logger = logging.getLogger(__spec__.name)  # under `python -m`, "training.record_teacher" rather than "__main__"


class TeacherPass:
    """Runs the teacher on groups of the students' batches and records each batch's targets under its key."""

    def __init__(self, targets: RecordedTeacher, min_views: int):
        self.targets, self.min_views = targets, min_views
        self.waiting: list[tuple[str, tuple[int, int], torch.Tensor]] = []

    def add(self, name: str, key: tuple[int, int], pixel_values: torch.Tensor) -> None:
        if self.targets.has(name, key):
            self.targets.targets(name, key, pixel_values)  # compares its digest with the record's
            return
        self.waiting.append((name, key, pixel_values))
        if sum(len(batch[2]) for batch in self.waiting) >= self.min_views:
            self.flush()

    def flush(self) -> None:
        if not self.waiting:
            return
        logits = self.targets.run_teacher(torch.cat([batch[2] for batch in self.waiting]))
        for (name, key, pixel_values), batch_logits in zip(
            self.waiting, logits.split([len(batch[2]) for batch in self.waiting]), strict=True
        ):
            self.targets.targets(name, key, pixel_values, logits=batch_logits)
        self.waiting = []


def record(trainer, training_args) -> None:
    """Record every batch of the run `trainer` would train (and evaluate) that the record lacks."""
    targets: RecordedTeacher = trainer.teacher_targets
    teacher_pass = TeacherPass(targets, training_args.per_device_eval_batch_size)
    per_epoch, epochs = needed_steps(len(trainer.train_dataset), training_args)
    accumulation, rank = training_args.gradient_accumulation_steps, training_args.process_index
    dataloader = trainer.get_train_dataloader()
    for epoch, steps in epochs.items():
        name = part_name(epoch, rank)
        if all(targets.has(name, (step, 0)) for step in steps):
            logger.info("Epoch %d is recorded already.", epoch)
            continue
        # as transformers' training loop: the epoch's order from the sampler(s)
        for sampler in (dataloader, getattr(getattr(dataloader, "batch_sampler", None), "batch_sampler", None)):
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
        trainer.step_seeder.start_epoch(epoch)
        for batch_number, inputs in enumerate(dataloader):
            step = epoch * per_epoch + batch_number // accumulation
            if step not in steps:
                break
            # seeded as the trainer seeds each micro-batch, an empty one too: the same erasing and Mixup/CutMix draws
            trainer.step_seeder.seed_micro_batch(step)
            if inputs["labels"].numel() == 0:  # nothing decoded: the trainer asks no target for it
                continue
            inputs = trainer._transform_batch(inputs, training=True)
            teacher_pass.add(*targets.training_key(), inputs["pixel_values"])
        teacher_pass.flush()
        targets.verify()
        targets.save()
        logger.info("Recorded epoch %d.", epoch)
    if training_args.do_eval or training_args.eval_strategy != "no":
        name, number = part_name(None, rank), 0
        for inputs in trainer.get_eval_dataloader():
            inputs, *_ = trainer.evaluated_rows(inputs)  # what the trainer's `prediction_step` asks targets for
            teacher_pass.add(name, (number, 0), inputs["pixel_values"])
            number += 1
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
    training_args = arguments.training
    trainer = build_trainer(arguments)
    targets = trainer.teacher_targets
    if not isinstance(targets, RecordedTeacher):
        raise TeacherRecordError("training.record_teacher records a teacher: --distillation_type none or labels has "
                                 "none.")
    if targets.records:
        record(trainer, training_args)
    else:
        logger.info("%s holds every batch of this run already: nothing to record.", targets.record.directory)
    trainer.end()


if __name__ == "__main__":
    main()
