"""`training.train` recording, per process, what it decodes and trains on: `accelerate launch` runs it in a test.

Into `$STREAM_PROBE_DIR` (one line per example, the label being the example's id):
- `decoded-<rank>`: `<split> <path>` for each image that process's `ImageTransform` decodes (in any of its workers);
- `seen-<rank>`: `<epoch> <label>` for each example of its training batches;
- `eval-<rank>`: the labels `compute_metrics` receives, gathered over the processes, one line per evaluation.
Training stops at the end of epoch `$STOP_AFTER_EPOCHS`, so that no batch is read ahead and left unused.
"""

import os
import sys

import torch
from transformers import TrainerCallback

from training import build, train, trainer, transforms

PROBE_DIR = os.environ["STREAM_PROBE_DIR"]
RANK = os.environ.get("RANK", "0")  # inherited by the DataLoader workers
_image_transform = transforms.ImageTransform.__call__
_init = trainer.DistillationTrainer.__init__
_training_step = trainer.DistillationTrainer.training_step
_compute_metrics = build.compute_metrics


def record(name: str, lines: list[str]) -> None:
    with open(os.path.join(PROBE_DIR, f"{name}-{RANK}"), "a") as file:
        file.write("".join(f"{line}\n" for line in lines))


def image_transform(self, batch):
    paths = [image["path"] for image in batch[self.image_column]]
    record("decoded", [f"{path.partition('-')[0]} {path}" for path in paths])
    return _image_transform(self, batch)


class EpochCounter(TrainerCallback):
    epoch = -1

    def on_epoch_begin(self, args, state, control, **kwargs):
        EpochCounter.epoch += 1

    def on_epoch_end(self, args, state, control, **kwargs):
        if EpochCounter.epoch + 1 == int(os.environ["STOP_AFTER_EPOCHS"]):
            control.should_training_stop = True


def init(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    self.add_callback(EpochCounter)


def training_step(self, model, inputs, *args, **kwargs):
    record("seen", [f"{EpochCounter.epoch} {label}" for label in inputs["labels"].tolist()])
    return _training_step(self, model, inputs, *args, **kwargs)


def compute_metrics(eval_pred):
    record("eval", [" ".join(map(str, sorted(eval_pred.label_ids.tolist())))])
    return _compute_metrics(eval_pred)


if __name__ == "__main__":
    torch.set_num_threads(1)  # two processes on two cores
    transforms.ImageTransform.__call__ = image_transform
    trainer.DistillationTrainer.__init__ = init
    trainer.DistillationTrainer.training_step = training_step
    build.compute_metrics = compute_metrics
    train.main(sys.argv[1:])
