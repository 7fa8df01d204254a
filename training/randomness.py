"""Where the training input pipeline's random draws come from: seeds derived from keys, never from global RNG history.

Every random choice between the dataset and the student's loss is drawn from a seed derived from `--seed` and a key:

- the order of an epoch: from `(seed, epoch)` (`RepeatedViewSampler`);
- each view of an image (random-resized crop, flip, RandAugment, in the DataLoader workers): from
  `(seed, epoch, position)`, the position of the view in the epoch's order (`SampleKey`, seeded by `SeededViews`);
- each mix group's random erasing and Mixup/CutMix (pairing, λ, mode, box): from `(seed, epoch, group)` (`MixGroup`).
  A mix group is `mix_group_size` views of an optimizer step's global batch (processes x per-device batch x
  accumulation), fixed by the recipe (by default the per-device batch: facebookresearch/deit mixes per GPU); which
  views form it depends on the global batch and the group size only (`MixGroups`), and every micro-batch holds
  whole groups, so the processes, per-device batch and accumulation may change and the groups stay the same;
- the student's own draws (drop path, dropout) on each micro-batch: from `(seed, epoch, step, micro_batch, process)`
  (`StepKey`, seeded by `StepSeeder` before the batch transform, and again before the forward).

So a view and a mix group are the same whatever the number of DataLoader workers or processes, the per-device batch
or the accumulation (for the same global batch and group size), and a run, resumed or not, with or without a
teacher built, draws the same numbers for the same step. A consumer of these keys (a record of the teacher's
targets, say) can take `SampleKey` as a view's identity and `MixGroup` as a group's. Python's `random`, NumPy's
global RNG and torch's are all seeded, as timm's transforms draw from all three. `transformers.set_seed(seed)` still
seeds the model's initialisation, the same on every process.
A streamed dataset has no epoch positions: its views come from the worker RNGs transformers seeds per process and
worker, reproducible for the same number of processes and workers, and each micro-batch is mixed whole.
"""

import random
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

# Separate streams of seeds, so that an epoch's order, a view, a micro-batch and a mix group never share one.
_ORDER, _VIEW, _STEP, _MIX = range(4)


class SampleKey(NamedTuple):
    """One view of one image: the dataset row `index`, at `position` in the order of `epoch` (the same on 1 or N
    processes, counted as on one process)."""

    index: int
    epoch: int
    position: int
    group: int = 0  # the view's mix group in the epoch (`MixGroups.group_of`)


class MixGroup(NamedTuple):
    """The `size` views of mix group `index` of `epoch` that a micro-batch holds (fewer than the group size when some
    of its images did not decode): they are mixed together, drawn from `(seed, epoch, index)`."""

    epoch: int
    index: int
    size: int


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


class MixGroups:
    """The mix groups of an epoch's order: each optimizer step's `global_batch` consecutive positions form
    `global_batch / group_size` groups, group k of the step holding its positions k, k + K, k + 2K, ... (K groups),
    so that repeated augmentation's copies of an image (side by side in the order) land in different groups, as
    `RASampler` spreads them over processes. Groups are numbered through the epoch: step s's k-th is s * K + k."""

    def __init__(self, global_batch: int, group_size: int):
        if group_size < 1 or global_batch % group_size:
            raise ValueError(f"A global batch of {global_batch} views does not split into mix groups of {group_size}.")
        self.global_batch, self.group_size = global_batch, group_size
        self.per_step = global_batch // group_size

    def group_of(self, position: int) -> int:
        step, offset = divmod(position, self.global_batch)
        return step * self.per_step + offset % self.per_step

    def step_order(self, step: int) -> list[int]:
        """The positions of step `step`, group after group, each group's in the order of the epoch."""
        start = step * self.global_batch
        return [start + k + j * self.per_step for k in range(self.per_step) for j in range(self.group_size)]

    def groups_of_steps(self, steps: range) -> range:
        """The groups of the epoch's steps `steps` (counted from the epoch's start)."""
        return range(steps.start * self.per_step, steps.stop * self.per_step)


def group_seed(seed: int, group: MixGroup) -> int:
    """The seed of mix group `group`'s random erasing and Mixup/CutMix draws."""
    return derive_seed(seed, _MIX, group.epoch, group.index)


class RepeatedViewSampler(Sampler[SampleKey]):
    """The order of an epoch's training views, with repeated augmentation, spread over processes as
    facebookresearch/deit's `RASampler` spreads them; it yields `SampleKey`s for `SeededViews`.

    The epoch's order is drawn from `(seed, epoch)`: a permutation of the images, each repeated `num_repeats` times
    side by side (1: no repetition), cut to `num_images` views (so an epoch holds `num_images / num_repeats` distinct
    images, `num_repeats` views of each), then extended to a whole number of optimizer steps' global batches
    (`num_processes * batch_size * accumulation` views) with the views that follow, or with `drop_last` cut to one.
    Each step's views are yielded mix group after mix group (`MixGroups`); accelerate deals the DataLoader's batches
    of `batch_size` to the processes in turn (batch j of a step to process j % num_processes, as its micro-batch
    j // num_processes), and as `batch_size` is a multiple of `group_size`, each micro-batch holds whole groups. The
    copies of an image thus go to different groups, and an optimizer step holds the same groups on any layout with
    the same global batch and group size. No process ever gets a partial batch, so accelerate pads nothing. The
    Trainer skips the batches of a resumed epoch, after `set_epoch`, so it sees the same order.
    """

    def __init__(self, num_images: int, num_repeats: int, seed: int, num_processes: int, batch_size: int,
                 accumulation: int = 1, group_size: int | None = None, drop_last: bool = False):
        if min(num_images, num_repeats, num_processes, batch_size, accumulation) < 1:
            raise ValueError(f"Cannot sample {num_images} images x {num_repeats} repeats on {num_processes} "
                             f"processes x {batch_size} per batch x {accumulation} accumulation: each must be at "
                             "least 1.")
        group_size = batch_size if group_size is None else group_size
        if batch_size % group_size:
            raise ValueError(f"A batch of {batch_size} does not hold whole mix groups of {group_size}.")
        self.num_images, self.num_repeats, self.seed = num_images, num_repeats, seed
        self.num_processes, self.batch_size, self.accumulation = num_processes, batch_size, accumulation
        global_batch = num_processes * batch_size * accumulation
        self.groups = MixGroups(global_batch, group_size)
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
        for step in range(self.num_views // self.groups.global_batch):
            for position in self.groups.step_order(step):
                yield SampleKey(order[position], self.epoch, position, self.groups.group_of(position))


class SeededViews(Dataset):
    """A map-style dataset read with `SampleKey`s: each sample is read (and so transformed, by a transform attached
    with `datasets.Dataset.with_transform`) right after the global RNGs are seeded from `(seed, epoch, position)`;
    it carries its mix group (`mix_group`) for the collator to batch."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: SampleKey):
        seed_global_rngs(derive_seed(self.seed, _VIEW, key.epoch, key.position), devices=False)
        return {**self.dataset[key.index], "mix_group": (key.epoch, key.group)}


class StepSeeder:
    """Seeds the global RNGs (devices included) before each micro-batch, from its `StepKey`: call `start_epoch` as an
    epoch begins, `seed_micro_batch` before each micro-batch's transform, and `reseed` before its forward when the
    transform drew from its mix groups' seeds. `key` is the last micro-batch's."""

    def __init__(self, seed: int, process: int):
        self.seed, self.process = seed, process
        self.epoch = 0
        self.key: StepKey | None = None

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def seed_micro_batch(self, step: int) -> StepKey:
        same_step = self.key is not None and (self.key.epoch, self.key.step) == (self.epoch, step)
        self.key = StepKey(self.epoch, step, self.key.micro_batch + 1 if same_step else 0, self.process)
        self.reseed()
        return self.key

    def reseed(self) -> None:
        """Seed the global RNGs from the last micro-batch's key again (its student's draws)."""
        seed_global_rngs(derive_seed(self.seed, _STEP, *self.key), devices=True)
