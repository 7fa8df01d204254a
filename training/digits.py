"""scikit-learn's handwritten digits as an ImageNet-style image dataset: real images that need no download.

1,797 grayscale 8x8 digits (values 0..16), 10 classes, shipped with scikit-learn. Each image becomes an RGB PIL
image of `image_size` pixels in an `image` column (`datasets.Image`) with a `label` column
(`ClassLabel(names=["0", ..., "9"])`), the layout of `ILSVRC/imagenet-1k`, so the whole data pipeline runs on it.
"""

import numpy as np
import PIL.Image
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image

DIGIT_NAMES = [str(digit) for digit in range(10)]
# Bicubic upscaling turns the 8x8 blocks into smooth strokes, closer to the photos the DeiT augmentations (crops,
# rotations, shears) are designed for; nearest would make every image a grid of flat squares whose edges dominate.
UPSCALE_RESAMPLE = PIL.Image.Resampling.BICUBIC


def load_digits_dataset(image_size: int = 32, seed: int = 0, validation_fraction: float = 0.2) -> DatasetDict:
    """`train`/`validation` splits of the digits, stratified by class, the same for the same `seed`."""
    from sklearn.datasets import load_digits  # scikit-learn is a test/demo extra, not a training dependency

    digits = load_digits()
    # 0..16 ink levels -> 0..255 gray levels.
    gray = np.round(digits.images * (255 / 16)).astype(np.uint8)
    images = [
        PIL.Image.fromarray(image).resize((image_size, image_size), UPSCALE_RESAMPLE).convert("RGB")
        for image in gray
    ]
    features = Features({"image": Image(), "label": ClassLabel(names=DIGIT_NAMES)})
    dataset = Dataset.from_dict({"image": images, "label": digits.target.tolist()}, features=features)
    splits = dataset.train_test_split(test_size=validation_fraction, seed=seed, stratify_by_column="label")
    return DatasetDict({"train": splits["train"], "validation": splits["test"]})
