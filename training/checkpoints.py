"""Checkpoints that are complete or invisible: staged under a hidden folder, published by one atomic rename.

transformers writes `checkpoint-N/` file by file in place, and resumes from the highest-numbered folder whatever it
holds: a run killed while saving leaves a folder without `trainer_state.json` (resume crashes), or without the
optimizer or RNG state (transformers then resumes without them, silently). `DistillationTrainer` writes each
checkpoint under `STAGING_DIR` and renames it into place once every process has written its part, and resuming only
considers folders holding every file below, each of which reads (`damaged_files`).
"""

import glob
import json
import logging
import os
import pickle
import re
import shutil
import zipfile
from collections.abc import Collection, Iterator
from contextlib import contextmanager

import torch
from safetensors import SafetensorError, safe_open
from transformers import TrainingArguments
from transformers.trainer_pt_utils import safe_globals
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from deit_hf.convert import nonfinite_tensors, unreadable_weights_file

logger = logging.getLogger(__name__)

# Inside `output_dir`; its name matches neither transformers' `checkpoint-*` patterns nor `get_last_checkpoint`.
STAGING_DIR = ".incomplete-checkpoints"
CHECKPOINT_PATTERN = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
# What `Trainer._load_from_checkpoint`, `_load_optimizer_and_scheduler` and `_load_rng_state` read; each entry is
# satisfied by any one of its glob patterns.
REQUIRED_FILES = {
    "trainer state": ("trainer_state.json",),
    "model config": ("config.json",),
    "model weights": ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                      "pytorch_model.bin.index.json"),
    "optimizer state": ("optimizer.pt",),
    "scheduler state": ("scheduler.pt",),
    "RNG state": ("rng_state.pth", "rng_state_*.pth"),
}


def missing_parts(checkpoint: str) -> list[str]:
    """What `checkpoint` lacks to resume a run exactly: the names of the `REQUIRED_FILES` entries it has no file for,
    or its unreadable trainer state."""
    missing = [
        part for part, patterns in REQUIRED_FILES.items()
        if not any(glob.glob(os.path.join(glob.escape(checkpoint), pattern)) for pattern in patterns)
    ]
    if "trainer state" not in missing:
        try:
            with open(os.path.join(checkpoint, "trainer_state.json")) as state:
                json.load(state)
        except (OSError, ValueError):
            missing.append("readable trainer state")
    return missing


# The torch files transformers reads back when resuming, all with `torch.load(weights_only=True)`;
# `training_args.bin`, a full pickle, is never read back.
TORCH_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state*.pth", "pytorch_model*.bin")


def damaged_files(checkpoint: str, expected_tensors: Collection[str] = ()) -> list[str]:
    """What would make resuming from `checkpoint` crash or go silently wrong, one sentence per file, naming it:
    weights that are empty, cut short or not safetensors, lack some of `expected_tensors` (transformers only warns)
    or are not finite, and torch files that `torch.load(weights_only=True)` refuses (a pickled payload, a cut)."""
    problems, tensors = [], set()
    for path in sorted(glob.glob(os.path.join(glob.escape(checkpoint), "*.safetensors"))):
        if problem := unreadable_weights_file(path):
            problems.append(problem)
            continue
        try:
            with safe_open(path, "pt") as weights:
                names = list(weights.keys())
                nonfinite = nonfinite_tensors({name: weights.get_tensor(name) for name in names})
        except (SafetensorError, OSError) as error:
            problems.append(f"{path} is cut short or damaged: {error}.")
            continue
        tensors.update(names)
        if nonfinite:
            problems.append(f"{path} holds non-finite (NaN or inf) weights: {_some(nonfinite)}.")
    for pattern in TORCH_FILES:
        for path in sorted(glob.glob(os.path.join(glob.escape(checkpoint), pattern))):
            if problem := unreadable_weights_file(path) or _torch_file_problem(path):
                problems.append(problem)
    missing = sorted(set(expected_tensors) - tensors)
    if missing and tensors:
        problems.append(f"The weights of {checkpoint} lack {len(missing)} of the model's tensors: {_some(missing)}.")
    return problems


def _some(names: list[str]) -> str:
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def _torch_file_problem(path: str) -> str | None:
    try:  # with what transformers allows (numpy's RNG state); memory-mapped where possible: only the pickle is read
        with safe_globals():
            torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError:
        return f"{path} holds more than tensors, refused by torch.load(weights_only=True)."
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        return f"{path} is cut short or damaged: {str(error).strip().splitlines()[0]}"
    return None


def last_complete_checkpoint(output_dir: str, expected_tensors: Collection[str] = ()) -> str | None:
    """The highest-numbered `checkpoint-N` of `output_dir` holding everything needed to resume, undamaged (see
    `damaged_files`); each newer one that is incomplete or damaged is skipped with a warning saying why."""
    if not os.path.isdir(output_dir):
        return None
    steps = sorted(
        (int(match.group(1)), name) for name in os.listdir(output_dir)
        if (match := CHECKPOINT_PATTERN.match(name)) and os.path.isdir(os.path.join(output_dir, name))
    )
    for _, name in reversed(steps):
        checkpoint = os.path.join(output_dir, name)
        missing = missing_parts(checkpoint)
        if missing:
            logger.warning("Skipping the incomplete checkpoint %s: it has no %s.", checkpoint, ", no ".join(missing))
        elif damaged := damaged_files(checkpoint, expected_tensors):
            logger.warning("Skipping the damaged checkpoint %s: %s", checkpoint, " ".join(damaged))
        else:
            return checkpoint
    return None


def resume_argument(training_args: TrainingArguments, expected_tensors: Collection[str] = ()) -> str | None:
    """`--resume_from_checkpoint last` (or true) resumes the newest complete checkpoint of `output_dir`, or starts
    from step 0 when there is none (one command for the first start and every restart); a path resumes it.

    Incomplete or damaged checkpoints (`training.checkpoints.missing_parts`, `damaged_files`: weights that do not
    read, are not finite or lack some of `expected_tensors`, torch files holding more than tensors) are skipped with
    a warning naming the file, or refused when named. A new run into an `output_dir` that already holds checkpoints
    is refused rather than left to overwrite them.
    """
    resume = training_args.resume_from_checkpoint
    if resume is not None and resume.lower() in ("last", "true"):
        resume = last_complete_checkpoint(training_args.output_dir, expected_tensors)
        if resume is None:
            logger.warning("No complete checkpoint in %s: starting from step 0.", training_args.output_dir)
            return None
    elif resume is not None:
        if missing := missing_parts(resume):
            raise ValueError(f"Cannot resume from {resume}: it has no {', no '.join(missing)}.")
        if damaged := damaged_files(resume, expected_tensors):
            raise ValueError(f"Cannot resume from {resume}: {' '.join(damaged)}")
    else:
        existing = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
        if existing is not None:
            raise ValueError(
                f"{training_args.output_dir} already holds checkpoints ({os.path.basename(existing)}, ...): pass "
                "--resume_from_checkpoint last to continue that run, or another --output_dir to start a new one."
            )
        return None
    logger.info("Resuming from %s.", resume)
    return resume


def publish_checkpoint(staged: str, final: str) -> None:
    """Move the fully written `staged` folder to `final` by a rename, atomic on one filesystem.

    A `final` that already exists (a resumed run saving the same step again) is first moved aside, so that at every
    instant the name holds one whole checkpoint or none.
    """
    if os.path.isdir(final):
        replaced = f"{staged}.replaced"
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
        os.replace(staged, final)
        shutil.rmtree(replaced, ignore_errors=True)
    else:
        os.replace(staged, final)


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (a full disk, say): nothing was published."""


@contextmanager
def writing_checkpoint(staged: str, output_dir: str, remove: bool) -> Iterator[None]:
    """Turn a failure to write the checkpoint staged at `staged` (OSError, safetensors' or torch.save's write error)
    into a one-line `CheckpointWriteError` naming it, `--output_dir` and the checkpoint a rerun resumes from; with
    `remove` (the process that saves), the staged copy is removed, freeing its space."""
    try:
        yield
    except (OSError, SafetensorError, RuntimeError) as error:
        if isinstance(error, RuntimeError) and "PytorchStreamWriter" not in str(error):
            raise  # not a write
        if remove:
            shutil.rmtree(staged, ignore_errors=True)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        where = getattr(error, "filename", None) or staged
        resume = last_complete_checkpoint(output_dir)
        raise CheckpointWriteError(
            f"Cannot write the checkpoint {where} (--output_dir {output_dir}): {reason}. Nothing of it was published; "
            + (f"make room and rerun with --resume_from_checkpoint last to continue from {resume}." if resume else
               "there is no earlier checkpoint to resume: make room and start again.")
        ) from error
