"""Skipping optimizer steps whose gradients are non-finite or all zero, without a host synchronization per step.

Why on the device: reading a per-step flag on the host (`loss.item()`, `if torch.isnan(...)`) stalls the CPU until
the GPU has finished the step, every step. Instead the flag stays a device tensor and is handed to the optimizer as
`found_inf`, the argument torch's fused AdamW (transformers' default `adamw_torch_fused`) takes from the AMP grad
scaler: with it set, the kernel leaves weights, both Adam moments and the step count as they were. The host reads
the counters only where transformers already synchronizes, at logging and checkpointing steps, and then:

- rewinds the learning-rate schedule by the steps skipped since the last reading (transformers stepped it
  regardless), so that each logged and checkpointed schedule is exactly that of the applied steps; between two
  readings the steps after a skipped one run a few schedule steps ahead;
- stops the run with `NonFiniteTrainingError` once `max_consecutive_nonfinite` non-finite steps came in a row.
  Detection therefore comes at the next logging step; the steps in between change nothing.

The flag is computed from the gradients after their all-reduce (the largest absolute value: exact, it cannot
overflow), so every DDP rank takes the same decision, and it catches a non-finite loss or teacher on any rank
(`DistillationTrainer.compute_loss` turns those into NaN gradients) as well as an overflow in the backward pass.
All-zero gradients mean that no process had a decodable image (`DistillationCollator`'s empty batch): that step is
skipped too, so that an all-corrupt batch moves nothing through momentum or weight decay. Optimizers without
`found_inf` support fall back to a host check per step, with a warning. Under `--fp16` the AMP grad scaler sets
`found_inf` itself, and overflows are its normal way of finding a scale: the guard then stands aside (warning), the
scaler skips non-finite steps, and nothing stops the run; the recipe's `--bf16` has no scaler.
"""

import logging
import math

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

MAX_CONSECUTIVE_NONFINITE = 5
# Positions in the guard's device counter tensor.
NONFINITE, EMPTY, STREAK, WORST_STREAK = range(4)


class NonFiniteTrainingError(RuntimeError):
    """Training produced non-finite losses, gradients or weights beyond what skipping steps can absorb."""


def poison_if_nonfinite(loss: torch.Tensor, *tensors: torch.Tensor | None) -> torch.Tensor:
    """`loss`, or NaN times it when it or any of `tensors` is not finite: every gradient then comes out NaN (even
    where the loss's own gradient would be finite or zero), which the guard sees after the DDP all-reduce."""
    finite = torch.isfinite(loss)
    for tensor in tensors:
        if tensor is not None:
            finite = finite & torch.isfinite(tensor).all()
    return loss * torch.where(finite, 1.0, math.nan).to(loss.dtype)


def largest_magnitude(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The largest |value| of `tensors` (NaN if any is NaN), without a host synchronization."""
    if tensors and tensors[0].device.type == "cpu":
        # torch has no foreach kernels on the CPU, where `get_total_norm`'s per-tensor infinity norm is ~6x slower
        # than a min and max (3 % of a DeiT-Ti training step)
        return torch.stack([torch.stack(torch.aminmax(tensor)) for tensor in tensors]).abs().max()
    return torch.nn.utils.get_total_norm(tensors, norm_type=math.inf)


def weights_are_finite(model: torch.nn.Module) -> bool:
    """Whether every parameter of `model` is finite (one host synchronization)."""
    return bool(torch.stack([torch.isfinite(parameter).all() for parameter in model.parameters()]).all())


class NonFiniteStepGuard(TrainerCallback):
    """Makes each optimizer step a no-op on the device when its gradients are non-finite or all zero; counts them.

    `sync` is the one place the host learns about skipped steps (see the module docstring).

    Args:
        max_consecutive_nonfinite: the run stops once this many non-finite steps came in a row.
    """

    def __init__(self, max_consecutive_nonfinite: int = MAX_CONSECUTIVE_NONFINITE):
        if max_consecutive_nonfinite < 1:
            raise ValueError(f"`max_consecutive_nonfinite` must be at least 1, got {max_consecutive_nonfinite}.")
        self.max_consecutive_nonfinite = max_consecutive_nonfinite
        self.counters: torch.Tensor | None = None
        self.unlogged = {"skipped_nonfinite_steps": 0, "skipped_empty_steps": 0}
        self.totals = dict(self.unlogged)  # over this `train()` call
        self.skips_on_device = True

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.take_unlogged()
        self.totals = dict.fromkeys(self.totals, 0)
        if args.fp16:
            self.counters = None
            logger.warning("--fp16: the grad scaler skips non-finite steps; --max_consecutive_nonfinite and the "
                           "skipping of steps without any image are off (use --bf16).")
            return
        self.counters = torch.zeros(4, device=args.device)
        optimizer = getattr(optimizer, "optimizer", optimizer)  # under accelerate's AcceleratedOptimizer
        self.skips_on_device = getattr(optimizer, "_step_supports_amp_scaling", False)
        if not self.skips_on_device:
            logger.warning(
                "%s cannot skip a step on the device (no `found_inf` support, unlike `--optim adamw_torch_fused`): "
                "non-finite steps are detected with a host synchronization per step.", type(optimizer).__name__,
            )

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.counters is None:
            return
        gradients = [parameter.grad for parameter in model.parameters() if parameter.grad is not None]
        largest = largest_magnitude(gradients).to(self.counters.device)
        nonfinite, empty = ~torch.isfinite(largest), largest == 0
        counters = self.counters
        counters[NONFINITE] += nonfinite
        counters[EMPTY] += empty
        # an empty step neither extends nor breaks a run of non-finite ones
        counters[STREAK] = torch.where(nonfinite, counters[STREAK] + 1, torch.where(empty, counters[STREAK], 0.0))
        counters[WORST_STREAK] = torch.maximum(counters[WORST_STREAK], counters[STREAK])
        skip = nonfinite | empty
        if self.skips_on_device:
            optimizer = getattr(optimizer, "optimizer", optimizer)
            optimizer.found_inf = skip.float()
        elif skip.item():
            model.zero_grad(set_to_none=True)  # torch optimizers leave parameters without a gradient untouched

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        optimizer = getattr(optimizer, "optimizer", optimizer)
        if hasattr(optimizer, "found_inf"):
            del optimizer.found_inf

    def sync(self, global_step: int, lr_scheduler=None) -> None:
        """Reads the device counters (one host synchronization) into `unlogged`, rewinds `lr_scheduler` by the steps
        skipped since the last call, and raises `NonFiniteTrainingError` after too many non-finite steps in a row."""
        if self.counters is None:
            return
        nonfinite, empty, _, worst_streak = (int(value) for value in self.counters.tolist())
        self.counters[[NONFINITE, EMPTY]] = 0
        self.counters[WORST_STREAK] = self.counters[STREAK]
        for counts in (self.unlogged, self.totals):
            counts["skipped_nonfinite_steps"] += nonfinite
            counts["skipped_empty_steps"] += empty
        skipped = nonfinite + empty
        if skipped and isinstance(lr_scheduler, LambdaLR):  # every transformers schedule but reduce_lr_on_plateau
            lr_scheduler.last_epoch -= skipped + 1
            lr_scheduler.step()  # recomputes the learning rates at the rewound step
        if nonfinite:
            logger.warning("Skipped %d optimizer step(s) with non-finite gradients (up to step %d).", nonfinite,
                           global_step)
        if empty:
            logger.warning("Skipped %d optimizer step(s) with no decodable image (up to step %d).", empty, global_step)
        if worst_streak >= self.max_consecutive_nonfinite:
            message = (
                f"{worst_streak} optimizer steps in a row had a non-finite loss, teacher output or gradient (up to "
                f"step {global_step}; --max_consecutive_nonfinite {self.max_consecutive_nonfinite}): stopping. They "
                "were skipped, so the weights are those before them; resume with --resume_from_checkpoint last (the "
                "newest checkpoint whose files read and whose weights are finite) and a lower learning rate, or check "
                "the teacher and the data."
            )
            logger.error(message)
            raise NonFiniteTrainingError(message)

    def take_unlogged(self) -> dict[str, int]:
        """The skipped-step counts read by `sync` since the last call, for the training logs."""
        counts, self.unlogged = self.unlogged, dict.fromkeys(self.unlogged, 0)
        return counts
