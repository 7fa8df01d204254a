"""The images' arguments: where they come from (`DataArguments`) and how each is augmented (`AugmentationArguments`).

Each `__post_init__` refuses a value outside its own field's range, as `HfArgumentParser`'s dataclasses do (the
parser builds each one from the flags, so the refusal names the option as it is parsed); a rule that relates two
flags is `training.argument_checks`'.
"""

import re
from dataclasses import dataclass, field
from typing import Literal

from timm.data import create_transform

# Values that switch a string-valued option off from the command line (`--auto_augment none`).
OFF_VALUES = ("", "none", "null", "off", "false")
# Evaluation resizes to input_size / eval_crop_pct: below this, the center crop keeps less than half of each side
# (timm's pretrained models use 0.875 to 1).
MIN_EVAL_CROP_PCT = 0.5

@dataclass
class DataArguments:
    """Where the images come from and which columns hold them; one of `dataset_name` or `train_dir` is required."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A dataset on the Hub (e.g. `ILSVRC/imagenet-1k`), a local parquet/arrow file or directory of "
            "such files, or a directory written by `Dataset(Dict).save_to_disk`."
        },
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "The configuration of the Hub dataset, if it has several."}
    )
    train_dir: str | None = field(
        default=None, metadata={"help": "An imagefolder directory (one sub-directory per class) to train on."}
    )
    validation_dir: str | None = field(
        default=None, metadata={"help": "An imagefolder directory (one sub-directory per class) to evaluate on."}
    )
    train_split: str = field(default="train", metadata={"help": "The split to train on."})
    validation_split: str = field(
        default="validation",
        metadata={"help": "The split to evaluate on; when the dataset has none, it is carved off the train split."},
    )
    validation_split_percentage: float = field(
        default=5.0,
        metadata={"help": "Percentage of the train split held out for evaluation when there is no validation split."},
    )
    image_column: str | None = field(
        default=None,
        metadata={"help": "The column holding the images; default: the column with an `Image` feature or named "
                  "image/img/jpg/png/pixel_values."},
    )
    label_column: str | None = field(
        default=None,
        metadata={"help": "The column holding the integer class labels; default: the `ClassLabel` column or the "
                  "column named label/labels/cls."},
    )
    streaming: bool = field(
        default=False, metadata={"help": "Stream the dataset instead of downloading and preparing it first."}
    )
    shuffle_buffer_size: int = field(
        default=4096,  # as timm for streamed Hugging Face datasets; held undecoded in each DataLoader worker
        metadata={"help": "With --streaming: the train stream's shuffle buffer (examples per DataLoader worker), and "
                  "its shards' order reshuffled each epoch from --seed; 0 trains in the files' order."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on the first N examples only (debugging, quick runs)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on the first N examples only (debugging, quick runs)."}
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where downloaded and prepared datasets are cached."}
    )
    num_labels: int | None = field(
        default=None,
        metadata={"help": "The number of classes of an integer label column without a ClassLabel feature; default: "
                  "the largest train label + 1 when the labels are dense (at least half the ids occur)."},
    )
    max_image_pixels: int = field(
        default=89_478_485,  # Pillow's MAX_IMAGE_PIXELS, its decompression-bomb warning threshold
        metadata={"help": "Images with more pixels are skipped, read from their header before decoding; JPEGs are "
                  "decoded at 1/2, 1/4 or 1/8 scale instead when that fits."},
    )
    max_image_aspect_ratio: float = field(
        default=100.0,
        metadata={"help": "Images whose long side exceeds this many times the short side are skipped (a 1x20000 "
                  "image resized to 256 px on its short side would take gigabytes)."},
    )
    min_decodable_fraction: float = field(
        default=0.9,
        metadata={"help": "Stop when a smaller fraction of an epoch's (or an evaluation's) images could be used; "
                  "checked at each epoch end, and at each log once 1000 images of the epoch were read. 0 never stops."},
    )

    def __post_init__(self):
        if not 0 < self.validation_split_percentage < 100:
            raise ValueError(
                f"`validation_split_percentage` must be in (0, 100), got {self.validation_split_percentage}."
            )
        if self.shuffle_buffer_size < 0:
            raise ValueError(f"`shuffle_buffer_size` must be >= 0 (0: no shuffling), got {self.shuffle_buffer_size}.")
        for name in ("max_train_samples", "max_eval_samples", "num_labels"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"`{name}` must be a positive number, got {value}.")
        if self.max_image_pixels < 1 or self.max_image_aspect_ratio < 1:
            raise ValueError(
                f"`max_image_pixels` ({self.max_image_pixels}) and `max_image_aspect_ratio` "
                f"({self.max_image_aspect_ratio}) must be >= 1."
            )
        if not 0 <= self.min_decodable_fraction <= 1:
            raise ValueError(f"`min_decodable_fraction` must be in [0, 1], got {self.min_decodable_fraction}.")


@dataclass
class AugmentationArguments:
    """Image augmentation, defaults = the DeiT recipe (facebookresearch/deit `main.py`).

    Turn a piece off with 0 for its probability or alpha (`--reprob 0 --mixup 0 --cutmix 0`),
    `--auto_augment none` or `--repeated_aug false`.
    """

    input_size: int = field(default=224, metadata={"help": "Side of the square images fed to the model."})
    auto_augment: str | None = field(
        default="rand-m9-mstd0.5-inc1",
        metadata={"help": "timm auto-augment policy (RandAugment `rand-...`, `augmix-...`, AutoAugment "
                  "`original`/`v0`); `none` to disable."},
    )
    color_jitter: float = field(
        default=0.3, metadata={"help": "Color jitter strength; timm ignores it when `auto_augment` is set."}
    )
    train_interpolation: Literal["bicubic", "bilinear", "nearest", "random"] = field(
        default="bicubic", metadata={"help": "Interpolation of the training random-resized crop and augmentations."}
    )
    reprob: float = field(default=0.25, metadata={"help": "Random erasing probability (0 disables it)."})
    remode: Literal["pixel", "rand", "const"] = field(
        default="pixel", metadata={"help": "Random erasing fill: per-pixel noise, per-channel noise, or zeros."}
    )
    recount: int = field(default=1, metadata={"help": "Number of random erasing regions per image."})
    hflip: float = field(default=0.5, metadata={"help": "Horizontal flip probability."})
    scale: list[float] = field(
        default_factory=lambda: [0.08, 1.0],
        metadata={"help": "Area range (min max) of the random-resized crop, as fractions of the image."},
    )
    eval_crop_pct: float = field(
        default=0.875, metadata={"help": "Evaluation resizes to input_size / eval_crop_pct, then center-crops."}
    )
    mixup: float = field(default=0.8, metadata={"help": "Mixup alpha (0 disables mixup)."})
    cutmix: float = field(default=1.0, metadata={"help": "CutMix alpha (0 disables cutmix)."})
    mixup_prob: float = field(
        default=1.0, metadata={"help": "Probability of mixing a batch when mixup or cutmix is on."}
    )
    mixup_switch_prob: float = field(
        default=0.5, metadata={"help": "Probability of cutmix instead of mixup when both are on."}
    )
    mixup_mode: Literal["batch", "pair", "elem"] = field(
        default="batch", metadata={"help": "Draw mixing parameters per batch, per pair of samples, or per sample."}
    )
    smoothing: float = field(default=0.1, metadata={"help": "Label smoothing of the (mixed) class targets."})
    repeated_aug: bool = field(
        default=True,
        metadata={"help": "Repeated augmentation (facebookresearch/deit's RASampler): an epoch of N views holds "
                  "N / `num_repeats` distinct images, `num_repeats` differently augmented views of each, spread over "
                  "the processes."},
    )
    num_repeats: int = field(default=3, metadata={"help": "Views per image with `repeated_aug`."})
    mix_group_size: int = field(
        default=0,
        metadata={"help": "Views of an optimizer step's global batch erased and mixed together (Mixup/CutMix pairs "
                  "and λ), drawn from one seed; 0: the per-device train batch, as facebookresearch/deit mixes per GPU. "
                  "The per-device batch must be a multiple of it; with the global batch, it decides the views, so a "
                  "--teacher_cache record replays on any layout with the same two."},
    )

    def mix_group(self, per_device_train_batch_size: int) -> int:
        """The mix group size, `mix_group_size` or by default the per-device train batch."""
        return self.mix_group_size or per_device_train_batch_size

    def __post_init__(self):
        if self.auto_augment is not None and self.auto_augment.strip().lower() in OFF_VALUES:
            self.auto_augment = None
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"`scale` must be two fractions 0 < min <= max <= 1, got {self.scale}.")
        for name in ("reprob", "hflip", "mixup_prob", "mixup_switch_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"`{name}` is a probability and must be in [0, 1], got {getattr(self, name)}.")
        for name in ("mixup", "cutmix", "color_jitter"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}.")
        if not 0 <= self.smoothing < 1:
            raise ValueError(f"`smoothing` must be in [0, 1), got {self.smoothing}.")
        if not MIN_EVAL_CROP_PCT <= self.eval_crop_pct <= 1:
            raise ValueError(
                f"--eval_crop_pct {self.eval_crop_pct:g} is out of range [{MIN_EVAL_CROP_PCT:g}, 1] (DeiT: 0.875; 1 at "
                f"384 px): evaluation would resize to {self.input_size / self.eval_crop_pct:.0f} px and keep only the "
                f"central {self.eval_crop_pct:.0%} of each side."
            )
        if self.input_size < 1 or self.recount < 1 or self.num_repeats < 1 or self.mix_group_size < 0:
            raise ValueError("`input_size`, `recount` and `num_repeats` must be positive integers, `mix_group_size` "
                             "one or 0.")
        if self.auto_augment is not None:
            try:  # timm parses the policy string only when it builds it
                create_transform(self.input_size, is_training=True, auto_augment=self.auto_augment)
            except Exception as error:
                raise ValueError(
                    f"--auto_augment {self.auto_augment!r} is not a policy timm can build ({type(error).__name__}: "
                    f"{error}); e.g. rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, original, v0, or none."
                ) from None
            name, *sections = self.auto_augment.split("-")
            # timm reads `key<number>` sections (and RandAugment's `t<choices>`) and skips any other, unread.
            ignored = [s for s in sections if not re.search(r"\d", s) and not (name == "rand" and s.startswith("t"))]
            if name in ("rand", "augmix") and ignored:
                raise ValueError(
                    f"--auto_augment {self.auto_augment!r}: timm would ignore {ignored} (sections are a key and a "
                    "number, e.g. m9, mstd0.5, inc1)."
                )
