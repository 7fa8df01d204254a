"""Where the distillation token's targets come from: the teacher online, or a record of its targets (`--teacher_cache`).

`DistillationTrainer` calls its `TeacherTargets` once per batch, `targets(pixel_values, training, groups)`, with a
training micro-batch's mix groups as its key, and reads the result as the teacher's logits; it does not know which
source it has:

- `OnlineTeacher`: the frozen teacher runs on the batch (under the accelerator's autocast);
- `RecordedTeacher`: targets from a `training.teacher.store.TeacherRecord`, keyed by (epoch, mix group) for training
  batches, so that any layout with the record's global batch and mix group size replays it, and by batch number for
  evaluation batches (per evaluation layout). With a teacher, the batches the record
  lacks are run through it and recorded (a recording run, or one that extends a record to more epochs); without one,
  every batch must be in the record (a replaying run: the teacher is not even loaded), and so with
  `--teacher_cache_check`, whose teacher only checks. A missing part or batch is an error naming it.

Replayed targets are what the loss reads: hard, logits whose argmax is the recorded class; soft, the top-k logits in
place and the other classes' shared logit elsewhere. A recording run trains on these same decoded targets, so a
replaying run with the same seed computes the same losses.
"""

import logging
import os
import random
from collections.abc import Callable

import torch
from transformers import TrainerCallback

from deit_hf.distillation_types import TEACHER_TYPES, get_distillation_type

from ..randomness import MixGroup
from .fingerprint import needed_groups, record_fingerprint
from .identity import (
    confirm_recorded_teacher,
    resolve_teacher,
    teacher_flags,
)
from .model import Teacher
from .store import (
    PART_PATTERN,
    Entries,
    TeacherRecord,
    TeacherRecordError,
    decode,
    digest,
    digests_match,
    encode,
    eval_part_name,
    part_name,
)

logger = logging.getLogger(__name__)

EXACT_FIELDS = ("classes", "indices")  # the others are fp16 logits, compared with a tolerance



class TeacherTargets(TrainerCallback):
    """The source of the teacher's targets; a Trainer callback, so that it can follow the steps and save its state.

    Attributes:
        num_labels: the classes the targets are over.
        teacher: the `Teacher` model when this source runs one (None when it only replays).
    """

    teacher: Teacher | None = None
    num_labels: int

    def attach(self, trainer) -> None:
        """Called by the trainer once: move to its device, follow its steps."""
        self.trainer = trainer
        trainer.add_callback(self)
        if self.teacher is not None:
            self.teacher.to(trainer.accelerator.device)
            if trainer.args.torch_compile:
                # `--torch_compile` compiles the teacher too: its forward costs more than the student's whole step.
                self.teacher.compile(backend=trainer.args.torch_compile_backend, mode=trainer.args.torch_compile_mode)

    def run_teacher(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with self.trainer.accelerator.autocast():
            return self.teacher(pixel_values)

    def __call__(self, pixel_values: torch.Tensor, training: bool, groups: tuple[MixGroup, ...] = ()) -> torch.Tensor:
        """The teacher's logits (or targets read as such) for a batch normalised with the student's statistics;
        `groups`: a training micro-batch's mix groups, its rows group after group (its key)."""
        raise NotImplementedError

    def skip(self, groups: tuple[MixGroup, ...]) -> None:
        """A training micro-batch none of whose images decoded: no targets are asked for its `groups`."""


class OnlineTeacher(TeacherTargets):
    """The frozen teacher, run on every batch."""

    def __init__(self, teacher: Teacher):
        self.teacher = teacher
        self.num_labels = teacher.num_labels

    def __call__(self, pixel_values: torch.Tensor, training: bool, groups: tuple[MixGroup, ...] = ()) -> torch.Tensor:
        return self.run_teacher(pixel_values)


class RecordedTeacher(TeacherTargets):
    """
    Targets from `record`, keyed by mix group for training (`training.randomness.MixGroup`: any layout with the
    record's global batch and group size finds them, in whichever process's part of the epoch holds them) and by
    batch number for evaluation (in this evaluation layout's parts). Each process writes its own parts.

    Args:
        record: the record directory.
        num_labels: the classes of the targets.
        distillation_type: `hard` (the class) or `soft` (the top-k logits) is what is recorded.
        top_k: the logits kept per view with soft distillation.
        tau: the soft loss's temperature, at which the classes outside the top k keep the teacher's mass.
        teacher: runs on the groups the record lacks, which are then recorded; None: replay only.
        check_groups: `(epoch, group)`s on which the teacher (then required) is also run and its targets compared
            with the record (`--teacher_cache_check`); with them, nothing is recorded: a group the record lacks is an
            error, as in a replay.
        eval_part: this process's evaluation part (`training.teacher.store.eval_part_name`).
    """

    def __init__(self, record: TeacherRecord, num_labels: int, distillation_type: str, top_k: int,
                 teacher: Teacher | None = None, check_groups: frozenset[tuple[int, int]] = frozenset(),
                 tau: float = 1.0, eval_part: str = eval_part_name(1, 1, 0)):
        if check_groups and teacher is None:
            raise ValueError("Checking recorded groups needs the teacher.")
        self.record, self.num_labels, self.teacher = record, num_labels, teacher
        self.distillation_type, self.top_k, self.tau = distillation_type, top_k, tau
        self.check_groups, self.eval_part = check_groups, eval_part
        self.process_index = 0
        self._parts: dict[str, Entries] = {}  # loaded parts by file name
        self._epoch: int | None = None  # the training epoch whose parts are loaded
        self._present = set(os.listdir(record.directory)) if os.path.isdir(record.directory) else set()
        self._unchecked: set[str] = set()  # parts loaded whose first replayed batch's digest is not compared yet
        self._unsaved: set[str] = set()
        self._pending: list[tuple[str, int, torch.Tensor, torch.Tensor]] = []  # digests to compare
        self._eval_batches = 0

    def attach(self, trainer) -> None:
        super().attach(trainer)
        self.process_index = trainer.args.process_index

    @property
    def records(self) -> bool:
        """Whether groups the record lacks are recorded (else they are an error)."""
        return self.teacher is not None and not self.check_groups

    def __call__(self, pixel_values: torch.Tensor, training: bool, groups: tuple[MixGroup, ...] = ()) -> torch.Tensor:
        if not training:
            self._eval_batches += 1
            stored = [self.targets(self.eval_part, self._eval_batches - 1, pixel_values)]
        else:
            if not groups:
                raise TeacherRecordError("A teacher record keys training targets by mix group: this batch has none "
                                         "(a stream's batches cannot be recorded).")
            stored = self.group_targets(groups, pixel_values)
        return torch.cat([decode(part, self.num_labels, pixel_values.device) for part in stored])

    def group_targets(self, groups: tuple[MixGroup, ...], pixel_values: torch.Tensor,
                      logits: torch.Tensor | None = None) -> list[dict[str, torch.Tensor]]:
        """The stored targets of each of `groups` (the rows of `pixel_values`, group after group): the record's, or
        the teacher's (given as `logits`, or run now on the whole batch) recorded."""
        if logits is None and self.records and not all(self.has(group) for group in groups):
            logits = self.run_teacher(pixel_values)
        stored, start = [], 0
        for group in groups:
            rows = slice(start, start + group.size)
            name = self._holder(group)
            stored.append(self.targets(name, group.index, pixel_values[rows], None if logits is None else logits[rows]))
            start += group.size
        return stored

    def skip(self, groups: tuple[MixGroup, ...]) -> None:
        """Groups none of whose images decoded: recorded as such, so that the record covers them."""
        for group in groups:
            self.targets(self._holder(group), group.index, torch.empty(0, device=self.trainer.args.device),
                         torch.zeros(0, self.num_labels, device=self.trainer.args.device))

    def has(self, group: MixGroup) -> bool:
        """Whether mix group `group` is recorded."""
        return group.index in self._parts[self._holder(group)]

    def has_eval(self, number: int) -> bool:
        """Whether evaluation batch `number` is recorded (on this evaluation layout)."""
        return number in self._part(self.eval_part)

    def _holder(self, group: MixGroup) -> str:
        """The part holding `group`, or this process's part of its epoch, where it is recorded."""
        names = self._load_epoch(group.epoch)
        return next((name for name in names if group.index in self._parts[name]), part_name(group.epoch,
                                                                                            self.process_index))

    def _load_epoch(self, epoch: int) -> list[str]:
        """Load the parts of training epoch `epoch` (one epoch at a time in memory, the last one saved first)."""
        own = part_name(epoch, self.process_index)
        if self._epoch != epoch:
            for old in [name for name in self._parts if PART_PATTERN.match(name)]:
                self.save(old)
                del self._parts[old]
            self._epoch = epoch
            names = self.record.epoch_parts(epoch)
            if not self.records and (gone := sorted(name for name in self._present - set(names)
                                                    if name.startswith(own.split(".")[0]))):
                raise TeacherRecordError(
                    f"Teacher record {self.record.path(gone[0])} is missing: this run's targets for "
                    f"{_describe(gone[0], None)} are not there (removed since the run started?). Record it again."
                )
            for name in names:
                self._parts[name] = self.record.load(name)
                self._unchecked.add(name)
            self._parts.setdefault(own, {})
        return sorted(name for name in self._parts if PART_PATTERN.match(name))

    def targets(self, name: str, key: int, pixel_values: torch.Tensor,
                logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The stored targets of `key` (a mix group, or an evaluation batch) of part `name`: the record's, or the
        teacher's (given as `logits`, or run now) recorded."""
        part = self._part(name)
        batch_digest = digest(pixel_values)
        if key in part:
            recorded_digest, stored = part[key]
            self._pending.append((name, key, recorded_digest, batch_digest))
            if name in self._unchecked:  # a part's first batch at once (a host sync): a wrong record stops at once
                self._unchecked.discard(name)
                self.verify()
            if PART_PATTERN.match(name) and (self._epoch, key) in self.check_groups and len(pixel_values):
                self._check(name, key, stored, self.run_teacher(pixel_values))
            return stored
        if not self.records:
            raise TeacherRecordError(
                f"Teacher record {self.record.path(name)} has no targets for {_describe(name, key)}: it was recorded "
                "for fewer steps or evaluation batches (another evaluation set or run length?). Record it again."
            )
        stored = encode(self.run_teacher(pixel_values) if logits is None else logits, self.distillation_type,
                        self.top_k, self.tau)
        part[key] = batch_digest, stored  # on the device until saved: no host sync per step
        self._unsaved.add(name)
        return stored

    def _part(self, name: str) -> Entries:
        if name not in self._parts:  # an evaluation part (an epoch's are loaded by `_load_epoch`)
            if not self.records and not os.path.exists(self.record.path(name)):
                raise TeacherRecordError(
                    f"Teacher record {self.record.path(name)} is missing: this run's targets for "
                    f"{_describe(name, None)} are not there (removed since the run started?). Record it again."
                )
            self._parts[name] = self.record.load(name)
            self._unchecked.add(name)
        return self._parts[name]

    def _check(self, name: str, key: int, stored: dict, logits: torch.Tensor) -> None:
        recomputed = encode(logits, self.distillation_type, self.top_k, self.tau)
        same = all(torch.equal(recomputed[field], stored[field]) if field in EXACT_FIELDS else torch.allclose(
            recomputed[field].float(), stored[field].float(), atol=1e-2, rtol=1e-2, equal_nan=True) for field in stored)
        logger.info("--teacher_cache_check: %s: the teacher's targets %s the record's.", _describe(name, key),
                    "match" if same else "DIFFER FROM")
        if not same:
            raise TeacherRecordError(
                f"--teacher_cache_check: the teacher's targets for {_describe(name, key)} differ from those in "
                f"{self.record.path(name)}: the record was made with other weights or settings; record it again."
            )

    def verify(self) -> None:
        """Compare the digests of the batches replayed since the last call with the record's (one host sync)."""
        if not self._pending:
            return
        current = torch.stack([entry[3] for entry in self._pending])
        recorded = torch.stack([entry[2].to(current.device) for entry in self._pending])
        recorded, current = recorded.cpu(), current.cpu()
        pending, self._pending = self._pending, []
        for (name, key, _, _), recorded_digest, current_digest in zip(pending, recorded, current, strict=True):
            if not digests_match(recorded_digest, current_digest):
                raise TeacherRecordError(
                    f"The views of {_describe(name, key)} differ from those recorded in {self.record.path(name)}: "
                    "this run's input pipeline does not reproduce the recording run's (its randomness, or the data "
                    "changed). Its targets would belong to other images; record again."
                )

    def save(self, name: str | None = None) -> None:
        """Write the parts holding newly recorded batches (or only `name`)."""
        for unsaved in sorted(self._unsaved if name is None else self._unsaved & {name}):
            self.record.save(unsaved, self._parts[unsaved])
            self._unsaved.discard(unsaved)

    # Callbacks: digests compared at each log, save and epoch end; parts saved before each checkpoint (so that a run
    # resumed from it finds every batch before it) and at the end of each epoch and evaluation.
    def on_step_end(self, args, state, control, **kwargs):
        if control.should_log or control.should_save or control.should_evaluate:
            self.verify()
        if control.should_save:
            self.save()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.verify()
        self.save()

    def on_evaluate(self, args, state, control, **kwargs):
        self.verify()
        self.save()
        self._eval_batches = 0

    def on_predict(self, args, state, control, **kwargs):
        self._eval_batches = 0

    def on_train_end(self, args, state, control, **kwargs):
        self.verify()
        self.save()


def targets_for(config, teacher: Teacher | None, teacher_targets: TeacherTargets | None) -> TeacherTargets | None:
    """The student's source of teacher targets (`teacher` run online, or `teacher_targets`), checked against the
    distillation its `config` names: hard and soft need one predicting the student's classes, none and labels none."""
    if teacher is not None and teacher_targets is not None:
        raise ValueError("Give the teacher or the teacher_targets that run it, not both.")
    teacher_targets = OnlineTeacher(teacher) if teacher is not None else teacher_targets
    if not get_distillation_type(config.distillation_type).uses_teacher:
        if teacher_targets is not None:
            raise ValueError(f"A teacher was given but distillation_type={config.distillation_type!r} would not use "
                             f"it: set distillation_type to one of {TEACHER_TYPES}, or train without the teacher.")
        return None
    if teacher_targets is None:
        raise ValueError(f"distillation_type={config.distillation_type!r} needs a teacher; give one, or set "
                         "distillation_type='none' or 'labels' to train without.")
    if teacher_targets.num_labels != config.num_labels:
        raise ValueError(f"The teacher predicts {teacher_targets.num_labels} classes but the student "
                         f"{config.num_labels}; they must predict the same classes in the same order.")
    return teacher_targets


def _describe(name: str, key: int | None) -> str:
    """Mix group or evaluation batch `key` of part `name` in words; None: the part's."""
    process = name.rsplit(".", 2)[1]
    if name.startswith("eval"):
        layout = name.split(".")[0].removeprefix("eval-").replace("x", " x ")
        what = "the evaluation" if key is None else f"evaluation batch {key}"
        return f"{what} of {process} (on {layout} per device)"
    epoch = int(PART_PATTERN.match(name).group(1))
    return f"epoch {epoch} of {process}" if key is None else f"mix group {key} of epoch {epoch}"


def open_teacher_targets(distill_args, aug_args, training_args, datasets: dict, student_statistics: tuple,
                         num_labels: int, load_teacher: Callable[[], Teacher]) -> TeacherTargets:
    """The run's source of targets: online without `--teacher_cache`; else replay when the record holds every batch
    of this run (the teacher is not loaded), or record what it lacks (`load_teacher` is called only then, or for
    `--teacher_cache_check`, which records nothing)."""
    if distill_args.teacher_cache is None:
        return OnlineTeacher(load_teacher())
    recorded = TeacherRecord(distill_args.teacher_cache, {}).recorded()
    adopted = distill_args.teacher_model is None and recorded is not None
    identity = resolve_teacher(distill_args, recorded)
    fingerprint = record_fingerprint(datasets, distill_args, aug_args, training_args, *student_statistics, identity)
    record = TeacherRecord(distill_args.teacher_cache, fingerprint)
    epochs = needed_groups(len(datasets["train"]), aug_args, training_args)
    evaluates = training_args.do_eval or training_args.eval_strategy != "no"
    eval_parts = [eval_part_name(training_args.world_size, training_args.per_device_eval_batch_size, rank)
                  for rank in range(training_args.world_size)]
    missing = record.missing(epochs, eval_parts if evaluates else []) if record.check_fingerprint() else ["all"]
    settings = dict(num_labels=num_labels, distillation_type=distill_args.distillation_type,
                    top_k=distill_args.teacher_cache_top_k, tau=distill_args.distillation_tau,
                    eval_part=eval_parts[training_args.process_index])
    check = distill_args.teacher_cache_check
    if not missing and check == 0:
        logger.info("replaying teacher targets from %s; teacher not loaded", record.directory)
        return RecordedTeacher(record, **settings)
    if missing and check:
        raise TeacherRecordError(f"--teacher_cache_check {check}: {record.directory} is not a complete record of this "
                                 f"run yet ({len(missing)} parts missing, {missing[0]} first); record it first.")
    if adopted:
        purpose = f"--teacher_cache_check {check}" if check else f"Recording the {len(missing)} parts it lacks"
        confirm_recorded_teacher(distill_args, identity, purpose)
    if check:
        every = [(epoch, group) for epoch, groups in epochs.items() for group in groups]
        check_groups = frozenset(random.Random(training_args.seed).sample(every, min(check, len(every))))
        logger.info("replaying teacher targets from %s; teacher loaded to check (epoch, mix group) %s "
                    "(--teacher_cache_check)", record.directory, sorted(check_groups))
        return RecordedTeacher(record, **settings, teacher=load_teacher(), check_groups=check_groups)
    teacher = load_teacher()
    os.makedirs(record.directory, exist_ok=True)
    record.write_fingerprint(teacher_flags(distill_args))
    logger.info("recording teacher targets to %s", record.directory)
    if missing != ["all"]:
        logger.info("The record lacks %d of this run's parts (%s, ...): they are recorded, the others replayed.",
                    len(missing), missing[0])
    return RecordedTeacher(record, **settings, teacher=teacher)
