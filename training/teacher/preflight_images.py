"""The validation images the pre-flight reads (`training.teacher.preflight`): drawn from every class of the whole split.

A validation split is often sorted by class (an imagefolder directory, ImageNet's in class folders): its first batches
hold its first classes only, and a teacher with two later classes swapped would pass the check. So the check's images
are drawn from the whole split with a fixed seed, class by class (`stratified_sample`), reading only the label column;
as many as the check's batches hold, the same cost as reading its first batches. A streamed split has no random
access: its first batches are read, with a warning that they hold only the classes they hold.
"""

import itertools
import logging
from collections.abc import Iterator

import datasets
import numpy as np
from torch.utils.data import DataLoader

from ..collator import IGNORE_INDEX
from ..labels import label_array

logger = logging.getLogger(__name__)

# A class is taken as swapped when at least this many of its check images went mostly to one other class
# (`training.teacher.preflight`): the sample holds that many of each class first.
MIN_IMAGES_PER_CLASS = 4

# Fixed, not --seed: every run on a split checks the same images.
CHECK_SEED = 0


def stratified_sample(labels: np.ndarray, budget: int, seed: int = CHECK_SEED,
                      min_per_class: int = MIN_IMAGES_PER_CLASS) -> np.ndarray:
    """The sorted indices of `budget` examples of `labels` (all of them when there are fewer), spread over the classes:
    `min_per_class` of each class in a random order of the classes (enough to name a swapped class), then one more of
    each class in turn while it has some left. Which examples of a class are taken is drawn from `seed` too."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(len(labels))
    order = shuffled[np.argsort(labels[shuffled], kind="stable")]  # grouped by class, in random order within each
    _, starts, sizes = np.unique(labels[order], return_index=True, return_counts=True)
    position = np.arange(len(order)) - np.repeat(starts, sizes)  # within its class
    turn = np.maximum(position - min_per_class + 1, 0)  # the first `min_per_class` of each class come in turn 0
    class_rank = np.repeat(rng.permutation(len(sizes)), sizes)
    return np.sort(order[np.lexsort((position, class_rank, turn))[:budget]])


def check_images(dataset: datasets.Dataset | datasets.IterableDataset, label_column: str,
                 budget: int) -> datasets.Dataset | None:
    """The `budget` examples of a validation split the pre-flight reads, drawn from its every class
    (`stratified_sample`), with the split's transform; None for a streamed split, whose first batches are read."""
    if not isinstance(dataset, datasets.Dataset):
        logger.warning(
            "The validation set is streamed (no random access): the pre-flight reads its first %d images, which hold "
            "only the classes they hold (a split sorted by class: its first classes). Its log says how many it saw.",
            budget,
        )
        return None
    labels = label_array(dataset, label_column).to_numpy()
    chosen = stratified_sample(labels, budget)
    logger.info("The pre-flight reads %d of the %d validation images, from %d of its %d classes.", len(chosen),
                len(labels), len(np.unique(labels[chosen])), len(np.unique(labels)))
    return dataset.select(chosen)


def check_batches(trainer, num_batches: int, label_column: str) -> Iterator[dict]:
    """The decoded rows of the pre-flight's batches, on this process: its part of as many images as `num_batches`
    evaluation batches of every process hold, drawn from every class of the `trainer`'s evaluation split
    (`check_images`); for a stream, its first `num_batches` evaluation batches."""
    args = trainer.args
    images = check_images(trainer.eval_dataset, label_column, num_batches * args.eval_batch_size * args.world_size)
    if images is None:
        batches = itertools.islice(trainer.get_eval_dataloader(), num_batches)
    else:  # not the Trainer's evaluation loader, which it keeps for the evaluations (persistent workers)
        workers = min(args.dataloader_num_workers, num_batches)
        batches = DataLoader(
            images.select(range(args.process_index, len(images), args.world_size)), args.eval_batch_size,
            collate_fn=trainer.data_collator, num_workers=workers, pin_memory=args.dataloader_pin_memory,
            multiprocessing_context=args.dataloader_multiprocessing_context if workers else None,
            prefetch_factor=args.dataloader_prefetch_factor if workers else None,
        )
    for inputs in batches:
        decoded = inputs["labels"] != IGNORE_INDEX  # a stream's evaluation batches keep blank rows
        if decoded.any():
            yield {"pixel_values": inputs["pixel_values"][decoded], "labels": inputs["labels"][decoded]}
