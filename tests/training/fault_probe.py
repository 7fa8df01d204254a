"""`training.train` with the faults that environment variables name (`accelerate launch` runs it in a test too).

`$STOP_AT=<rank>:<step>`: that process prints `STOPPED AT <time>` and SIGSTOPs itself as the step after that one
begins (a stuck rank).
`$EMPTY_AT=<rank>:<step>,...`: that process's batch for the step after that one is all corrupt (`*`: every process).
`$PREEMPT_AT=<rank>:<step>:<file>`: at the end of that step (`*`: on every process), that process writes its pid to
`<file>.<rank>` and waits until it has received SIGTERM (sent by the test) before going on; with `$PREEMPT_IN=save`,
it waits while saving that step's checkpoint instead, its weights written and its optimizer state not yet.
At the end each process prints `WEIGHTS <rank> <sum of its weights>`.

`$KILL_AT=<point>:<global step>`: the process SIGKILLs itself at that point:

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
import threading
import time

import torch
from transformers import Trainer, TrainerCallback, TrainerState

from training import preemption, train, trainer
from training.collator import DistillationCollator

POINT, _, STEP = os.environ.get("KILL_AT", "none:0").partition(":")
STEP = int(STEP)
STOP_AT = os.environ.get("STOP_AT", "")
EMPTY_AT = set(filter(None, os.environ.get("EMPTY_AT", "").split(",")))
PREEMPT_AT = os.environ.get("PREEMPT_AT", "::").split(":", 2)
PREEMPT_IN = os.environ.get("PREEMPT_IN", "step")
published = []
signalled = threading.Event()


def kill_at(point: str, step: int) -> None:
    if point == POINT and step == STEP:
        os.kill(os.getpid(), signal.SIGKILL)


_training_step = trainer.DistillationTrainer.training_step
_save_optimizer_and_scheduler = Trainer._save_optimizer_and_scheduler
_save_to_json = TrainerState.save_to_json
_publish_checkpoint = trainer.publish_checkpoint
_rotate_checkpoints = trainer.rotate_checkpoints


def training_step(self, model, inputs, *args, **kwargs):
    kill_at("step", self.state.global_step)
    if STOP_AT == f"{self.args.process_index}:{self.state.global_step}":
        print("STOPPED AT", time.time(), flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
    if EMPTY_AT & {f"{self.args.process_index}:{self.state.global_step}", f"*:{self.state.global_step}"}:
        inputs = DistillationCollator()([{"pixel_values": None, "labels": None}])
    return _training_step(self, model, inputs, *args, **kwargs)


def save_optimizer_and_scheduler(self, output_dir):
    kill_at("optimizer", self.state.global_step)
    if PREEMPT_IN == "save":
        wait_for_signal(self.args.process_index, self.state.global_step)
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


_handle = preemption.Preemption._handle


def handle(self, signal_number, frame):
    _handle(self, signal_number, frame)
    signalled.set()


def wait_for_signal(rank: int, step: int) -> None:
    if PREEMPT_AT[0] in ("*", str(rank)) and PREEMPT_AT[1] == str(step):
        with open(f"{PREEMPT_AT[2]}.{rank}.tmp", "w") as marker:
            marker.write(str(os.getpid()))
        os.replace(f"{PREEMPT_AT[2]}.{rank}.tmp", f"{PREEMPT_AT[2]}.{rank}")  # whole when the test reads it
        assert signalled.wait(timeout=240), "no SIGTERM came"


class WaitForSignal(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if PREEMPT_IN == "step":
            wait_for_signal(args.process_index, state.global_step)


if __name__ == "__main__":
    preemption.Preemption._handle = handle
    torch.set_num_threads(1)
    trainer.DistillationTrainer.training_step = training_step
    Trainer._save_optimizer_and_scheduler = save_optimizer_and_scheduler
    TrainerState.save_to_json = save_to_json
    trainer.publish_checkpoint = publish_checkpoint
    trainer.rotate_checkpoints = rotate_checkpoints
    run = train.main(sys.argv[1:], callbacks=[WaitForSignal()])
    weights = sum(parameter.double().sum().item() for parameter in run.model.parameters())
    print(f"WEIGHTS {run.args.process_index} {weights!r}", flush=True)
