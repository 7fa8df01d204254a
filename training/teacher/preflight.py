"""The pre-flight, before step 1: refuse a teacher that would teach the wrong thing, or validation images that do not
decode.

It reads validation images drawn from every class of the split, as many as `--teacher_check_batches` evaluation
batches hold (`training.teacher.preflight_images.check_batches`). `teacher_confusions` runs the teacher on them,
transformed as the student's evaluation batches are, with the input normalisation it declares and with each common one
(`COMMON_NORMALISATIONS`), and counts (true class, predicted class) pairs; `check_teacher` reads those counts and
refuses:

- a check on which no image decoded (nothing to judge; without a teacher to check, `preflight` refuses that alone);
- a declared normalisation that another common one beats by far (a processor saved with the wrong statistics);
- a top-1 near chance;
- classes mostly predicted as one other class (a head in another class order), naming the pairs.
"""

import contextlib
import logging
from collections.abc import Iterator, Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .model import Teacher, _affine_between, input_size_hint
from .preflight_images import MIN_IMAGES_PER_CLASS, check_batches

logger = logging.getLogger(__name__)

DECLARED = "declared"
# The statistics image classifiers are commonly trained with, tried besides the one the teacher declares.
COMMON_NORMALISATIONS = {
    "ImageNet": (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    "0.5/0.5": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "[0, 1]": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}
_WAY_OUT = "To train with it anyway, pass --teacher_check_batches 0."


def normalisations(teacher: Teacher) -> dict[str, tuple[Sequence[float], Sequence[float]] | None]:
    """The normalisations to check the teacher with: its declared one (None: as it is) and each common one that
    differs from it and has its channel count; only the declared one when the teacher declares none."""
    found = {DECLARED: None}
    if teacher.mean is None:
        return found
    declared = (teacher.mean, teacher.std)
    for name, (mean, std) in COMMON_NORMALISATIONS.items():
        if len(mean) == len(teacher.mean) and _affine_between(declared, (mean, std)) is not None:
            found[name] = (mean, std)
    return found


@contextlib.contextmanager
def normalised_as(teacher: Teacher, statistics: tuple[Sequence[float], Sequence[float]] | None) -> Iterator[Teacher]:
    """The teacher, fed as if it had been trained with `statistics` (mean, std) instead of its declared ones."""
    affine = None if statistics is None else _affine_between((teacher.mean, teacher.std), statistics)
    saved = teacher.input_scale, teacher.input_shift
    if affine is not None:
        device = next(teacher.model.parameters(), torch.empty(0)).device
        scale, shift = (part.to(device) for part in affine)
        if saved[0] is not None:  # the student's statistics to the declared ones, then to `statistics`
            scale, shift = saved[0] * scale, saved[1] * scale + shift
        teacher.input_scale, teacher.input_shift = scale, shift
    try:
        yield teacher
    finally:
        teacher.input_scale, teacher.input_shift = saved


def preflight(trainer, num_batches: int, label_column: str, label_names: Sequence[str], input_size: int) -> None:
    """The pre-flight of a `DistillationTrainer` on `num_batches` batches' worth of validation images (0: none): its
    teacher checked (`check_teacher`); without one (no distillation, or its targets replayed), when it trains and
    evaluates, that some image decodes (an epoch would be lost before its evaluation found none). The RNG is left
    untouched (the loader draws a seed): a run that replays the teacher's targets draws the same augmentations and
    drop paths as the run that recorded them. `input_size`: the student's, which the teacher may not have been
    trained at (`model.input_size_hint`)."""
    args = trainer.args
    check_the_teacher = trainer.teacher is not None
    if num_batches == 0 or not (check_the_teacher or args.do_train and args.eval_strategy != "no"):
        return
    device = trainer.accelerator.device
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device], device_type=device.type):
        if check_the_teacher:
            confusions = teacher_confusions(trainer, num_batches, label_column)
        else:
            decoded = sum(len(inputs["labels"]) for inputs in check_batches(trainer, num_batches, label_column))
            decoded = int(trainer.accelerator.reduce(torch.tensor(decoded, device=args.device), reduction="sum"))
    if check_the_teacher:
        check_teacher(confusions, label_names, input_size_hint(trainer.teacher, input_size))
    else:
        refuse_if_nothing_decoded(decoded, "every evaluation would measure nothing",
                                  "Fix the validation split, or train without evaluating (--eval_strategy no).")
        logger.info("Pre-flight: %d validation images decoded.", decoded)


def teacher_confusions(trainer, num_batches: int, label_column: str) -> dict[str, torch.Tensor]:
    """The `trainer`'s teacher's counts of (true class, predicted class) on the pre-flight's images (`check_batches`),
    for each normalisation of `normalisations`, summed over processes so that every rank reaches the same verdict
    (`check_teacher`)."""
    teacher, accelerator = trainer.teacher, trainer.accelerator
    statistics = normalisations(teacher)
    num_labels = teacher.num_labels
    counts = torch.zeros(len(statistics), num_labels * num_labels, dtype=torch.int64, device=trainer.args.device)
    for inputs in check_batches(trainer, num_batches, label_column):
        inputs = trainer.prepare_evaluation_batch(inputs)
        for row, normalisation in enumerate(statistics.values()):
            with normalised_as(teacher, normalisation), accelerator.autocast():
                predictions = teacher(inputs["pixel_values"]).argmax(dim=1)
            counts[row] += torch.bincount(inputs["labels"] * num_labels + predictions, minlength=num_labels ** 2)
    counts = accelerator.reduce(counts, reduction="sum").cpu().view(-1, num_labels, num_labels)
    return dict(zip(statistics, counts, strict=True))


def refuse_if_nothing_decoded(decoded: int, consequence: str, way_out: str) -> None:
    """The pre-flight's refusal of a validation set of which none of the check images decoded."""
    if decoded == 0:
        raise ValueError(
            f"No validation image decoded among the pre-flight's images: {consequence}. The warnings of "
            f"training.transforms name the images that failed. {way_out}"
        )


def check_teacher(confusions: dict[str, torch.Tensor], label_names: Sequence[str], size_hint: str | None = None,
                  show: int = 5) -> float:
    """The teacher's top-1 with its declared normalisation, after refusing (`ValueError`) a teacher that the check
    batches show to be fed wrongly or to predict other classes. `confusions` maps each normalisation of
    `normalisations` to its counts (true class × predicted class); `size_hint` (`model.input_size_hint`), when the
    teacher sees another size than it was trained at, is the first likely cause of a top-1 near chance."""
    declared = confusions[DECLARED].double()
    total = int(declared.sum())
    refuse_if_nothing_decoded(total, "the teacher cannot be checked", _WAY_OUT)
    top1 = {name: int(counts.diagonal().sum()) / max(int(counts.sum()), 1) for name, counts in confusions.items()}
    num_labels = declared.shape[0]
    chance = 1 / num_labels
    logger.info("Teacher top-1 on %d validation images of %d of the %d classes: %.1f %% (chance: %.1f %%).", total,
                int((declared.sum(dim=1) > 0).sum()), num_labels, 100 * top1[DECLARED], 100 * chance)
    best = max(top1, key=top1.get)
    # far better: at least 10 points up, and at most half the errors
    if best != DECLARED and top1[best] - top1[DECLARED] >= 0.1 and 1 - top1[best] <= (1 - top1[DECLARED]) / 2:
        mean, std = COMMON_NORMALISATIONS[best]
        raise ValueError(
            f"The teacher scores {100 * top1[DECLARED]:.1f} % on {total} validation images with the normalisation it "
            f"declares, but {100 * top1[best]:.1f} % with {best} statistics (mean {list(mean)}, std {list(std)}): it "
            f"was trained with those. Pass --teacher_mean {' '.join(map(str, mean))} --teacher_std "
            f"{' '.join(map(str, std))} (or fix its image processor). {_WAY_OUT}"
        )
    threshold = chance + 0.2 * (1 - chance)  # a fifth of the way from chance to perfect
    if top1[DECLARED] < threshold:
        raise ValueError(
            f"The teacher's top-1 on {total} validation images is {100 * top1[DECLARED]:.1f} %, near chance "
            f"({100 * chance:.1f} %; the check asks for {100 * threshold:.1f} %). Likely causes: "
            + (f"its input size ({size_hint}); " if size_hint else "") + "its input "
            "normalisation (set --teacher_mean and --teacher_std to what it was trained with), its checkpoint "
            f"(--teacher_checkpoint), or a class order other than the dataset's. {_WAY_OUT}"
        )
    swapped = _mostly_predicted_as_another(declared)
    if swapped:
        named = "; ".join(
            f"{label_names[true]!r} as {label_names[predicted]!r} ({count} of {support})"
            for true, predicted, count, support in swapped[:show]
        )
        raise ValueError(
            f"The teacher predicts {len(swapped)} class(es) mostly as another one on {total} validation images: "
            f"{named}. Its classes are likely in another order than the dataset's (a swapped head?). {_WAY_OUT}"
        )
    return top1[DECLARED]


def _mostly_predicted_as_another(counts: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """(class, the other class, how many of its images went there, its images) for each class of at least
    `MIN_IMAGES_PER_CLASS` check images of which at least half went to one other class, twice as many as to itself,
    when that other class's own images are not mostly recognised: in a head of another class order, the class whose
    output a class took has moved on too; a weak teacher that confuses a 6 with a 4 still knows its 4s."""
    support = counts.sum(dim=1)
    correct = counts.diagonal()
    off_diagonal = counts - torch.diag(correct)
    most, predicted = off_diagonal.max(dim=1)
    target_moved = 2 * correct[predicted] < support[predicted]
    mostly = (support >= MIN_IMAGES_PER_CLASS) & (2 * most >= support) & (most >= 2 * correct) & target_moved
    return [(int(c), int(predicted[c]), int(most[c]), int(support[c])) for c in torch.nonzero(mostly).flatten()]
