"""Preemption: on SIGTERM, finish the current step, save a complete checkpoint at it and stop.

A cluster scheduler sends SIGTERM some seconds before it kills a job it preempts (Slurm, Kubernetes; torch elastic's
agent passes it on to its workers and kills them 30 s later). By default the signal ends the process at once, losing
every step since the last checkpoint. `Preemption`'s handler only records the signal; at the end of each optimizer
step the processes agree on whether any of them received it, and if so all save a checkpoint there (through the
trainer's complete-or-invisible saving, `training.checkpoints`) and stop training. `--resume_from_checkpoint last`
then continues from that step.

On several processes the agreement is one all-reduce (max) of a one-element CPU tensor per step, on a gloo group: no
device synchronization, the cost of a host round trip (tens of microseconds between local processes), and every
process stops at the same step whichever of them got the signal, so that none waits forever in the next collective.

Schedulers signal more than the training process: Slurm every process of the job step, torchrun (`accelerate
launch`) each worker's whole process group, Kubernetes the container's processes. The DataLoader workers would die of
it (PyTorch's workers exit on SIGTERM) and the training process then fail with "DataLoader worker ... is killed by
signal: Terminated" before its checkpoint. `ignore_sigterm_in_workers` gives each DataLoader a `worker_init_fn` that
makes its workers ignore a SIGTERM from anyone but the training process, leaving the stop to that process. They still
end with it: the DataLoader, or multiprocessing as the process exits, stops them with a SIGTERM of its own, and they
exit once it is gone (PyTorch's workers watch their parent), SIGKILLed included. SIGINT is left as it is. Where the
sender of a signal cannot be known (no `signal.sigwaitinfo`: macOS, Windows), workers keep PyTorch's behaviour.
"""

import logging
import os
import signal
import threading

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from transformers import TrainerCallback

logger = logging.getLogger(__name__)


class WorkerIgnoringSigterm:
    """A DataLoader `worker_init_fn`: the worker exits on a SIGTERM from its parent and ignores any other, then
    `worker_init_fn` (if any) runs."""

    def __init__(self, worker_init_fn=None):
        self.worker_init_fn = worker_init_fn

    def __call__(self, worker_id: int) -> None:
        if hasattr(signal, "sigwaitinfo"):
            # Blocked here, so in every thread started later: only the thread below receives it, with its sender.
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
            threading.Thread(target=_exit_on_sigterm_from, args=(os.getppid(),), daemon=True).start()
        if self.worker_init_fn is not None:
            self.worker_init_fn(worker_id)


def _exit_on_sigterm_from(parent: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(0)  # as PyTorch's own handler does: the parent is stopping its workers


def ignore_sigterm_in_workers(data_loader: DataLoader) -> DataLoader:
    """`data_loader`, its workers (started after this) made to ignore a SIGTERM from anyone but their parent; its own
    `worker_init_fn` kept."""
    if not isinstance(data_loader.worker_init_fn, WorkerIgnoringSigterm):
        data_loader.worker_init_fn = WorkerIgnoringSigterm(data_loader.worker_init_fn)
    return data_loader


class Preemption(TrainerCallback):
    """Turns SIGTERM during `train()` into a checkpoint at the end of the current step and the end of training.

    `signal_number` is the signal received (None when training ended otherwise); the handler is installed at the
    start of training and the previous one restored at its end, in the main thread only.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.signals = signals
        self.signal_number: int | None = None
        self._received: int | None = None
        self._previous: dict[int, object] = {}
        self._group = None

    def _handle(self, signal_number, frame) -> None:
        self._received = signal_number

    def on_train_begin(self, args, state, control, **kwargs):
        self._received = self.signal_number = None
        if threading.current_thread() is threading.main_thread():
            self._previous = {number: signal.signal(number, self._handle) for number in self.signals}
        if args.world_size > 1 and self._group is None:  # every process creates it, in the same order
            self._group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    def on_step_end(self, args, state, control, **kwargs):
        received = torch.tensor(self._received or 0)
        if self._group is not None:
            dist.all_reduce(received, op=dist.ReduceOp.MAX, group=self._group)
        if received:
            self.signal_number = int(received)
            logger.warning("%s received: saving a checkpoint at step %d and stopping; rerun with "
                           "--resume_from_checkpoint last to continue.", signal.Signals(self.signal_number).name,
                           state.global_step)
            control.should_save = True
            control.should_evaluate = False  # the grace period is for saving
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}
