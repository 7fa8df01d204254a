"""Checkpoints that are complete or invisible: staged under a hidden folder, published by one atomic rename.

transformers writes `checkpoint-N/` file by file in place, and resumes from the highest-numbered folder whatever it
holds: a run killed while saving leaves a folder without `trainer_state.json` (resume crashes), or without the
optimizer or RNG state (transformers then resumes without them, silently). `DistillationTrainer` writes each
checkpoint under `STAGING_DIR` and renames it into place once every process has written its part, and resuming only
considers folders holding every file below.
"""

import glob
import json
import logging
import os
import re
import shutil

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

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


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The highest-numbered `checkpoint-N` of `output_dir` holding everything needed to resume; each newer but
    incomplete one is skipped with a warning saying what it lacks."""
    if not os.path.isdir(output_dir):
        return None
    steps = sorted(
        (int(match.group(1)), name) for name in os.listdir(output_dir)
        if (match := CHECKPOINT_PATTERN.match(name)) and os.path.isdir(os.path.join(output_dir, name))
    )
    for _, name in reversed(steps):
        checkpoint = os.path.join(output_dir, name)
        missing = missing_parts(checkpoint)
        if not missing:
            return checkpoint
        logger.warning("Skipping the incomplete checkpoint %s: it has no %s.", checkpoint, ", no ".join(missing))
    return None


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
