"""Where the training input pipeline's random draws come from: seeds derived from keys, never from global RNG history.

Every random choice between the dataset and the student's loss is drawn from a seed derived from `--seed` and a key:

- the order of an epoch: from `(seed, epoch)` (`RepeatedViewSampler`);
- each view of an image (random-resized crop, flip, RandAugment, in the DataLoader workers): from
  `(seed, epoch, position)`, the position of the view in the epoch's order (`SampleKey`, seeded by `SeededViews`);
- each micro-batch on the device (random erasing, Mixup/CutMix's λ, mode and box, drop path and dropout): from
  `(seed, epoch, step, micro_batch, process)` (`StepKey`, seeded by `StepSeeder` right before the batch transform
  and the forward).

So a view is the same whatever the number of DataLoader workers or processes, every process draws its own batch-level
numbers, and a run, resumed or not, with or without a teacher built, draws the same numbers for the same step. A
consumer of these keys (a record of the teacher's targets, say) can take `SampleKey` as a view's identity and
`StepKey` as a micro-batch's. Python's `random`, NumPy's global RNG and torch's are all seeded, as timm's transforms
draw from all three. `transformers.set_seed(seed)` still seeds the model's initialisation, the same on every process.
A streamed dataset has no epoch positions: its views come from the worker RNGs transformers seeds per process and
worker, reproducible for the same number of processes and workers.
"""

import random
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

# Separate streams of seeds, so that an epoch's order, a view and a micro-batch never share one.
_ORDER, _VIEW, _STEP = range(3)


class SampleKey(NamedTuple):
    """One view of one image: the dataset row `index`, at `position` in the order of `epoch` (the same on 1 or N
    processes, counted as on one process)."""

    index: int
    epoch: int
    position: int


class StepKey(NamedTuple):
    """One micro-batch of one process: optimizer step `step` (the Trainer's `global_step` before it), gradient
    accumulation `micro_batch` of that step, on process `process`, in `epoch`."""

    epoch: int
    step: int
    micro_batch: int
    process: int


def derive_seed(seed: int, *key: int) -> int:
    """A 64-bit seed from `seed` and a key: keys that differ in any place give unrelated seeds (NumPy's
    `SeedSequence` hashing)."""
    high, low = np.random.SeedSequence([seed % 2**64, *key]).generate_state(2)
    return int(high) << 32 | int(low)


def seed_global_rngs(seed: int, devices: bool) -> None:
    """Seed Python's `random`, NumPy's global RNG and torch's CPU generator (and every device's, with `devices`)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    if devices:
        torch.manual_seed(seed)
    else:  # in the DataLoader workers: no device generator to touch
        torch.default_generator.manual_seed(seed)


class RepeatedViewSampler(Sampler[SampleKey]):
    """The order of an epoch's training views, with repeated augmentation, spread over processes as
    facebookresearch/deit's `RASampler` spreads them; it yields `SampleKey`s for `SeededViews`.

    The epoch's order is drawn from `(seed, epoch)`: a permutation of the images, each repeated `num_repeats` times
    side by side (1: no repetition), cut to `num_images` views (so an epoch holds `num_images / num_repeats` distinct
    images, `num_repeats` views of each), then extended to a whole number of global batches
    (`num_processes * batch_size` views) with the views that follow, or with `drop_last` cut to one. `RASampler`
    gives process `r` the views `r, r + num_processes, ...` of that order; so does this sampler once accelerate has
    dealt its batches to the processes (batch `b` to process `b % num_processes`): the views of each global batch are
    reordered so that process `r`'s batch holds views `r, r + num_processes, ...` of it. The copies of an image thus go
    to different processes, and a global batch holds the same views on 1 or N processes (for the same global batch
    size). No process ever gets a partial batch, so accelerate pads nothing. The Trainer skips the batches of a resumed
    epoch, after `set_epoch`, so it sees the same order.
    """

    def __init__(
        self, num_images: int, num_repeats: int, seed: int, num_processes: int, batch_size: int, drop_last: bool = False
    ):
        if num_images < 1 or num_repeats < 1 or num_processes < 1 or batch_size < 1:
            raise ValueError(f"Cannot sample {num_images} images x {num_repeats} repeats on {num_processes} "
                             f"processes x {batch_size} per batch: each must be at least 1.")
        self.num_images, self.num_repeats, self.seed = num_images, num_repeats, seed
        self.num_processes, self.batch_size = num_processes, batch_size
        global_batch = num_processes * batch_size
        self.num_views = (num_images // global_batch if drop_last else -(-num_images // global_batch)) * global_batch
        if self.num_views == 0:
            raise ValueError(f"{num_images} images make no global batch of {global_batch} (drop_last).")
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_views

    def epoch_order(self) -> torch.Tensor:
        """The image index of each position of this epoch's order (the order on one process)."""
        generator = torch.Generator().manual_seed(derive_seed(self.seed, _ORDER, self.epoch))
        repeated = torch.randperm(self.num_images, generator=generator).repeat_interleave(self.num_repeats)
        return repeated[torch.arange(self.num_views) % len(repeated)]

    def __iter__(self) -> Iterator[SampleKey]:
        order = self.epoch_order().tolist()
        # in each global batch, process r's batch (the r-th `batch_size` block) gets positions r, r + N, ...
        positions = torch.arange(self.num_views).view(-1, self.batch_size, self.num_processes).transpose(1, 2)
        for position in positions.flatten().tolist():
            yield SampleKey(order[position], self.epoch, position)


class SeededViews(Dataset):
    """A map-style dataset read with `SampleKey`s: each sample is read (and so transformed, by a transform attached
    with `datasets.Dataset.with_transform`) right after the global RNGs are seeded from `(seed, epoch, position)`."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: SampleKey):
        seed_global_rngs(derive_seed(self.seed, _VIEW, key.epoch, key.position), devices=False)
        return self.dataset[key.index]


class StepSeeder:
    """Seeds the global RNGs (devices included) before each micro-batch, from its `StepKey`: call `start_epoch` as an
    epoch begins and `seed_micro_batch` before each micro-batch's transform and forward. `key` is the last
    micro-batch's."""

    def __init__(self, seed: int, process: int):
        self.seed, self.process = seed, process
        self.epoch = 0
        self.key: StepKey | None = None

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def seed_micro_batch(self, step: int) -> StepKey:
        same_step = self.key is not None and (self.key.epoch, self.key.step) == (self.epoch, step)
        self.key = StepKey(self.epoch, step, self.key.micro_batch + 1 if same_step else 0, self.process)
        seed_global_rngs(derive_seed(self.seed, _STEP, *self.key), devices=True)
        return self.key
