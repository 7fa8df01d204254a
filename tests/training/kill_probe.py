"""`training.train` that SIGKILLs itself at the point `$KILL_AT` names, as `<point>:<global step>`:

- `step`: as the step after that one begins, between checkpoints;
- `optimizer`: while saving that step's checkpoint, its weights written and its optimizer state not yet;
- `state`: half-way through writing that checkpoint's `trainer_state.json`, its last file;
- `publish`: once that checkpoint is in place, before older ones are rotated away;
- `rotate`: while rotation deletes the oldest checkpoint (one of its files gone, the rest still there).
"""

import dataclasses
import json
import os
import signal
import sys

import torch
from transformers import Trainer, TrainerState

from training import train, trainer

POINT, _, STEP = os.environ.get("KILL_AT", "none:0").partition(":")
STEP = int(STEP)
published = []


def kill_at(point: str, step: int) -> None:
    if point == POINT and step == STEP:
        os.kill(os.getpid(), signal.SIGKILL)


_training_step = trainer.DistillationTrainer.training_step
_save_optimizer_and_scheduler = Trainer._save_optimizer_and_scheduler
_save_to_json = TrainerState.save_to_json
_publish_checkpoint = trainer.publish_checkpoint
_rotate_checkpoints = trainer.rotate_checkpoints


def training_step(self, *args, **kwargs):
    kill_at("step", self.state.global_step)
    return _training_step(self, *args, **kwargs)


def save_optimizer_and_scheduler(self, output_dir):
    kill_at("optimizer", self.state.global_step)
    return _save_optimizer_and_scheduler(self, output_dir)


def save_to_json(self, json_path):
    if POINT == "state" and self.global_step == STEP:
        text = json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)
        with open(json_path, "w") as file:
            file.write(text[: len(text) // 2])
    kill_at("state", self.global_step)
    return _save_to_json(self, json_path)


def publish_checkpoint(staged, final):
    _publish_checkpoint(staged, final)
    published.append(int(final.rpartition("-")[2]))
    kill_at("publish", published[-1])


def rotate_checkpoints(output_dir, *args, **kwargs):
    if POINT == "rotate" and published[-1] == STEP:
        steps = [int(name.rpartition("-")[2]) for name in os.listdir(output_dir) if name.startswith("checkpoint-")]
        os.remove(os.path.join(output_dir, f"checkpoint-{min(steps)}", "model.safetensors"))
    kill_at("rotate", published[-1])
    return _rotate_checkpoints(output_dir, *args, **kwargs)


if __name__ == "__main__":
    torch.set_num_threads(1)
    trainer.DistillationTrainer.training_step = training_step
    Trainer._save_optimizer_and_scheduler = save_optimizer_and_scheduler
    TrainerState.save_to_json = save_to_json
    trainer.publish_checkpoint = publish_checkpoint
    trainer.rotate_checkpoints = rotate_checkpoints
    train.main(sys.argv[1:])
