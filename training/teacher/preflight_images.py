"""The validation images the pre-flight reads (`training.teacher.preflight`): drawn from every class of the whole split.

A validation split is often sorted by class (an imagefolder directory, ImageNet's in class folders): its first batches
hold its first classes only, and a teacher with two later classes swapped would pass the check. So the check's images
are drawn from the whole split with a fixed seed, class by class (`stratified_sample`), reading only the label column;
as many as the check's batches hold, the same cost as reading its first batches. A streamed split has no random
access: its first batches are read, with a warning that they hold only the classes they hold.
"""

import logging

import datasets
import numpy as np

from ..labels import label_array
from .preflight import MIN_IMAGES_PER_CLASS

logger = logging.getLogger(__name__)

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
