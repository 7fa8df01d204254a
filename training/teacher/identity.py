"""Which teacher a record of its targets (`--teacher_cache`) was made with: its identity, and the teacher it names.

The identity is what the targets depend on, read without loading the teacher: a local classifier's weights and
configuration files (its class count, its image processor's normalisation and size) by their hash, whatever its
directory is called; a timm teacher's model name (architecture, pretrained_cfg) with its checkpoint's hash, whatever
the file is called. A copy of the teacher elsewhere is the same teacher; other weights under the same name are not.

A record also names its teacher (its flags, paths made absolute): a replay given no teacher flag adopts it without
reading anything, and a run that needs the teacher itself (to record what the record lacks, or
`--teacher_cache_check`) finds it there or says in one line that it cannot.
"""

import hashlib
import logging
import os

from ..args import DistillationArguments
from ..argument_checks import TEACHER_IDENTITY_FLAGS
from .store import TeacherRecordError

logger = logging.getLogger(__name__)

WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json")
LOCAL_CLASSIFIER = "local classifier"


def _file_hash(files: dict[str, str]) -> str:
    """SHA-256 (16 hex digits) of the files' contents under their labels."""
    hasher = hashlib.sha256()
    for label, path in sorted(files.items()):
        hasher.update(label.encode())
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 24), b""):
                hasher.update(block)
    return hasher.hexdigest()[:16]


def teacher_identity(teacher_model: str, teacher_checkpoint: str | None) -> str:
    """The identity of the teacher these flags name, its weights hashed (see the module docstring)."""
    if os.path.isdir(teacher_model):
        files = {name: os.path.join(teacher_model, name) for name in os.listdir(teacher_model)
                 if name.endswith(WEIGHT_FILE_SUFFIXES)}
        return f"{LOCAL_CLASSIFIER}, files {_file_hash(files)}"
    if teacher_checkpoint is not None:
        return f"timm {teacher_model}, checkpoint {_file_hash({'': teacher_checkpoint})}"
    return f"timm {teacher_model}, timm's pretrained weights"


def teacher_name(distill_args) -> str:
    """The teacher as its flags name it."""
    checkpoint = distill_args.teacher_checkpoint
    return distill_args.teacher_model + (f" with checkpoint {checkpoint}" if checkpoint else "")


def teacher_flags(distill_args) -> dict:
    """The teacher's flags as a record keeps them: paths absolute, so that another working directory finds them."""
    flags = {flag: getattr(distill_args, flag) for flag in TEACHER_IDENTITY_FLAGS}
    for flag in ("teacher_model", "teacher_checkpoint"):
        if flags[flag] is not None and os.path.exists(flags[flag]):
            flags[flag] = os.path.abspath(flags[flag])
    return flags


def resolve_teacher(distill_args, recorded: dict | None) -> str | None:
    """The identity of the run's teacher. Named by a flag: hashed now. Named by none (`teacher_model` None, set by
    `training.argument_checks.check_cache_flags`): the `recorded` one's flags are adopted into `distill_args` and
    its identity returned, nothing read; with no record yet, the default teacher. Logs the teacher's name and
    identity."""
    if distill_args.teacher_model is None and recorded is not None:
        for flag, value in recorded["teacher"].items():
            setattr(distill_args, flag, value)
        identity = recorded["items"]["teacher"]
        logger.info("Teacher %s (%s): the record's, as no teacher flag names one.", teacher_name(distill_args),
                    identity)
        return identity
    if distill_args.teacher_model is None:
        distill_args.teacher_model = DistillationArguments.teacher_model  # the default: nothing recorded yet
    identity = teacher_identity(distill_args.teacher_model, distill_args.teacher_checkpoint)
    logger.info("Teacher %s (%s).", teacher_name(distill_args), identity)
    return identity


def confirm_recorded_teacher(distill_args, identity: str, purpose: str) -> None:
    """Refuse in one line, before loading it, an adopted teacher that is not where the record says or whose weights
    there changed; `purpose` says what needs it."""
    checkpoint = distill_args.teacher_checkpoint
    path = checkpoint or (distill_args.teacher_model if identity.startswith(LOCAL_CLASSIFIER) else None)
    name = teacher_name(distill_args)
    if path is not None and not os.path.exists(path):
        raise TeacherRecordError(f"{purpose} needs the record's teacher, {name}, but {path} is not there: name the "
                                 "teacher with --teacher_model (and --teacher_checkpoint).")
    if path is not None and (now := teacher_identity(distill_args.teacher_model, checkpoint)) != identity:
        raise TeacherRecordError(f"{purpose} needs the record's teacher, {name}, but its weights changed (recorded "
                                 f"{identity}, now {now}): name the record's teacher with --teacher_model.")
