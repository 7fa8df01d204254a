"""`training.train` recording each process's batch-level random draws: `accelerate launch` runs this in a test.

Each process appends one JSON line per draw to `$RANDOMNESS_PROBE_DIR/rank<process>.jsonl`, tagged with the
optimizer step it belongs to: Mixup/CutMix's λ and mode, a digest of the Python RNG state random erasing draws its
boxes from, and each drop-path mask of the student's forward.
"""

import hashlib
import json
import os
import random
import sys

import timm.layers.drop
import torch
from timm.data.mixup import Mixup
from timm.data.random_erasing import RandomErasing

from training import train, trainer

current = {"step": None, "process": None}


def record(kind: str, value) -> None:
    path = os.path.join(os.environ["RANDOMNESS_PROBE_DIR"], f"rank{current['process']}.jsonl")
    with open(path, "a") as probe:
        probe.write(json.dumps({"step": current["step"], kind: value}) + "\n")


_training_step = trainer.DistillationTrainer.training_step
_params_per_batch = Mixup._params_per_batch
_erase = RandomErasing.__call__
_drop_path = timm.layers.drop.drop_path


def training_step(self, model, inputs, *args, **kwargs):
    current.update(step=self.state.global_step, process=self.args.process_index)
    return _training_step(self, model, inputs, *args, **kwargs)


def params_per_batch(self):
    lam, use_cutmix = _params_per_batch(self)
    record("mixup", [float(lam), bool(use_cutmix)])
    return lam, use_cutmix


def erase(self, pixel_values):
    record("erasing_rng", hashlib.sha1(repr(random.getstate()).encode()).hexdigest())
    return _erase(self, pixel_values)


def drop_path(x, drop_prob=0.0, training=False, scale_by_keep=True):
    dropped = _drop_path(x, drop_prob, training, scale_by_keep)
    if training and drop_prob > 0:
        record("drop_path", (dropped.flatten(1) == 0).all(1).tolist())
    return dropped


if __name__ == "__main__":
    torch.set_num_threads(1)  # two processes on two cores
    trainer.DistillationTrainer.training_step = training_step
    Mixup._params_per_batch = params_per_batch
    RandomErasing.__call__ = erase
    timm.layers.drop.drop_path = drop_path
    train.main(sys.argv[1:])
