"""Convergence: deit-hf's `training.train` against a facebookresearch/deit-style loop on the same data, teacher and
seeds.

    python -m benchmarks.convergence [--seeds 0 1 2] [--epochs 30] [--jobs 2] [--no-replay] [--quick]

The data are scikit-learn's handwritten digits upscaled to 32 px RGB (a stratified 80/20 split), or MNIST-5k with
`--dataset mnist5k` (`benchmarks.study`), the teacher a timm `resnet18` trained on them once (cached in `--workdir`),
the student a tiny DeiT⚗ (64 dims, 4 layers, 4 heads, patch 4). Both sides run the DeiT recipe as its authors wrote it:
hard distillation (alpha 0.5) with the teacher on the mixed batch, RandAugment, Mixup/CutMix with smoothing 0.1, random
erasing, AdamW with weight decay 0.05 (none on tokens, norms, biases), 5 warm-up epochs then cosine to 1e-5, drop path
0.1, no repeated augmentation (one process). The reference is written from facebookresearch/deit (`main.py`,
`engine.py`, `losses.py`): timm's `VisionTransformerDistilled` with timm's init, timm's transforms and `Mixup`, and
timm's `CosineLRScheduler` stepped once per epoch. Each side reports fused, class-head and distillation-head top-1 on
the held-out images; the table goes between the convergence markers of the output file. A third side, `deit_hf replay`,
trains deit_hf again from the teacher targets its first run recorded (`--teacher_cache`): it must reach the recording
run's accuracy.
"""

import json
import math
import statistics
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.data import Mixup, create_transform
from timm.loss import SoftTargetCrossEntropy
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler

from . import percent
from .reference import facebookresearch_hard_distillation_loss
from .study import Study, prepare_data, timed

START_MARKER, END_MARKER = "<!-- convergence results: start -->", "<!-- convergence results: end -->"
HEADS = ("top1", "cls_top1", "dist_top1")


@dataclass(frozen=True)
class Settings:
    """One recipe for both sides (the issue's: facebookresearch/deit's defaults at a digits scale)."""

    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 2e-3  # already scaled: both sides get it as the learning rate
    warmup_epochs: int = 5
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    drop_path_rate: float = 0.1
    alpha: float = 0.5
    image_size: int = 32
    patch_size: int = 4
    hidden_size: int = 64
    depth: int = 4
    heads: int = 4
    mlp_size: int = 256
    auto_augment: str = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25
    mixup: float = 0.8
    cutmix: float = 1.0
    smoothing: float = 0.1
    teacher_model: str = "resnet18"
    teacher_epochs: int = 15
    teacher_check_batches: int = 8  # deit_hf's check of the teacher before step 1 (0: off, for smoke runs)
    train_samples: int | None = None  # all training images (1,437 digits, 4,000 MNIST-5k)


# --quick (`benchmarks.study`): 64 training digits, a 1-epoch teacher, no teacher check (it is untrained), and
# training.train's evaluation on 64 held-out digits without DataLoader worker processes (joining them dominated a
# 1-step run)
QUICK_SETTINGS = dict(train_samples=64, teacher_epochs=1, teacher_check_batches=0)
QUICK_FLAGS = ("--max_eval_samples", "64", "--dataloader_num_workers", "0")


def _train_split(data_dir: Path, settings: Settings):
    from datasets import load_from_disk

    train = load_from_disk(str(data_dir))["train"]
    return train if settings.train_samples is None else train.select(range(settings.train_samples))


class _TransformedImages(torch.utils.data.Dataset):
    """(transform(image), label) pairs of a `datasets` split, as torchvision's ImageFolder gives them."""

    def __init__(self, split, transform):
        self.split, self.transform = split, transform

    def __len__(self):
        return len(self.split)

    def __getitem__(self, index):
        example = self.split[index]
        return self.transform(example["image"].convert("RGB")), example["label"]


def _eval_loader(data_dir: Path, settings: Settings):
    from datasets import load_from_disk

    transform = create_transform(settings.image_size, is_training=False, interpolation="bicubic", crop_pct=0.875)
    validation = _TransformedImages(load_from_disk(str(data_dir))["validation"], transform)
    return torch.utils.data.DataLoader(validation, batch_size=256)


def prepare_teacher(workdir: Path, data_dir: Path, settings: Settings) -> tuple[Path, float]:
    """A timm convnet trained on the digits with light augmentation; cached with its held-out top-1."""
    samples = f"-{settings.train_samples}samples" if settings.train_samples else ""  # not a cache hit for all digits
    path = workdir / f"teacher-{settings.teacher_model}-{settings.teacher_epochs}ep{samples}.safetensors"
    if path.exists():
        return path, json.loads(path.with_suffix(".json").read_text())["top1"]
    torch.manual_seed(0)
    model = timm.create_model(settings.teacher_model, num_classes=10)
    transform = create_transform(settings.image_size, is_training=True, scale=(0.6, 1.0), hflip=0.0, color_jitter=0.0)
    loader = torch.utils.data.DataLoader(
        _TransformedImages(_train_split(data_dir, settings), transform), batch_size=64, shuffle=True, drop_last=True
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=settings.teacher_epochs * len(loader))
    for _ in range(settings.teacher_epochs):
        model.train()
        for images, labels in loader:
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    top1 = _evaluate_logits(_one_head(model), model, _eval_loader(data_dir, settings))["top1"]
    save_file(model.state_dict(), str(path))
    path.with_suffix(".json").write_text(json.dumps({"top1": top1}))
    return path, top1


def _load_teacher(path: Path, settings: Settings) -> torch.nn.Module:
    teacher = timm.create_model(settings.teacher_model, num_classes=10)
    teacher.load_state_dict(load_file(str(path)))
    return teacher.eval().requires_grad_(False)


@torch.no_grad()
def _evaluate_logits(heads, model, loader) -> dict[str, float]:
    """Top-1 of each of the (fused, cls, dist) logits that `heads(images)` returns."""
    model.eval()
    correct, total = [0, 0, 0], 0
    for images, labels in loader:
        for index, logits in enumerate(heads(images)):
            correct[index] += (logits.argmax(1) == labels).sum().item()
        total += len(labels)
    return {name: count / total for name, count in zip(HEADS, correct, strict=True)}


def _one_head(model: torch.nn.Module):
    """A one-head model's logits in the three places of (fused, cls, dist)."""
    return lambda images: (model(images),) * 3


def _timm_heads(model: VisionTransformerDistilled):
    def heads(images):
        tokens = model.forward_features(images)
        cls_logits, dist_logits = model.head(tokens[:, 0]), model.head_dist(tokens[:, 1])
        return (cls_logits + dist_logits) / 2, cls_logits, dist_logits

    return heads


def train_reference(seed: int, settings: Settings, data_dir: Path, teacher_path: Path | None) -> dict[str, float]:
    """facebookresearch/deit's `main.py` + `engine.train_one_epoch` on one process, without AMP or EMA; with no
    `teacher_path`, its `--distillation-type none` run: a ViT without a distillation token on the labels alone."""
    from training.transforms import zero_bit_posterize  # timm's posterize raises on 0 bits under Pillow 13

    torch.manual_seed(seed)
    numpy.random.seed(seed)  # as main.py: timm's Mixup draws its lambda and mode from numpy
    with zero_bit_posterize():
        transform = create_transform(
            settings.image_size, is_training=True, scale=(0.08, 1.0), hflip=0.5, color_jitter=0.3,
            auto_augment=settings.auto_augment, interpolation="bicubic", re_prob=settings.reprob, re_mode="pixel",
            re_count=1,
        )
    loader = torch.utils.data.DataLoader(
        _TransformedImages(_train_split(data_dir, settings), transform), batch_size=settings.batch_size,
        shuffle=True, drop_last=True, num_workers=1, persistent_workers=True,
        generator=torch.Generator().manual_seed(seed),
    )
    mixup = Mixup(
        mixup_alpha=settings.mixup, cutmix_alpha=settings.cutmix, prob=1.0, switch_prob=0.5, mode="batch",
        label_smoothing=settings.smoothing, num_classes=10,
    )
    model = (VisionTransformer if teacher_path is None else VisionTransformerDistilled)(
        img_size=settings.image_size, patch_size=settings.patch_size, embed_dim=settings.hidden_size,
        depth=settings.depth, num_heads=settings.heads, mlp_ratio=settings.mlp_size / settings.hidden_size,
        num_classes=10, drop_path_rate=settings.drop_path_rate,
    )
    if teacher_path is not None:
        model.set_distilled_training(True)
        teacher = _load_teacher(teacher_path, settings)
    optimizer = create_optimizer_v2(model, "adamw", lr=settings.learning_rate, weight_decay=settings.weight_decay,
                                    eps=1e-8)
    scheduler = CosineLRScheduler(
        optimizer, t_initial=settings.epochs, lr_min=settings.min_lr, warmup_lr_init=1e-6,
        warmup_t=settings.warmup_epochs, cycle_limit=1, t_in_epochs=True,
    )
    for epoch in range(settings.epochs):
        model.train()
        for images, labels in loader:
            images, labels = mixup(images, labels)
            if teacher_path is None:
                loss = SoftTargetCrossEntropy()(model(images), labels)  # its DistillationLoss with type none
            else:
                with torch.no_grad():
                    teacher_logits = teacher(images)
                loss = facebookresearch_hard_distillation_loss(model(images), labels, teacher_logits, settings.alpha)
            if not math.isfinite(loss.item()):
                raise RuntimeError(f"Reference loss is {loss.item()}, stopping training")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step(epoch)  # as main.py: after the epoch, with that epoch's index
    heads = _one_head(model) if teacher_path is None else _timm_heads(model)
    return _evaluate_logits(heads, model, _eval_loader(data_dir, settings))


def deit_hf_flags(seed: int, settings: Settings, data_dir: Path, output_dir: str) -> list[str]:
    """`training.train`'s flags for the tiny DeiT⚗ at this scale: the recipe's defaults, given only what differs; the
    teacher's and the distillation's flags are the caller's."""
    return [
        "--dataset_name", str(data_dir), "--output_dir", output_dir, "--seed", str(seed),
        "--model_preset", "deit-tiny-distilled-patch16-224", "--config_overrides",
        f"patch_size={settings.patch_size},hidden_size={settings.hidden_size},"
        f"num_hidden_layers={settings.depth},num_attention_heads={settings.heads},"
        f"intermediate_size={settings.mlp_size}",
        "--input_size", str(settings.image_size), "--drop_path_rate", str(settings.drop_path_rate),
        "--num_train_epochs", str(settings.epochs), "--per_device_train_batch_size", str(settings.batch_size),
        "--learning_rate", str(settings.learning_rate), "--warmup_epochs", str(settings.warmup_epochs),
        "--repeated_aug", "false", "--eval_strategy", "no", "--save_strategy", "no", "--do_eval", "true",
        "--dataloader_num_workers", "1", "--report_to", "none", "--disable_tqdm", "true",
        *(["--max_train_samples", str(settings.train_samples)] if settings.train_samples else []),
    ]


def train_deit_hf(seed: int, settings: Settings, data_dir: Path, teacher_path: Path,
                  teacher_cache: Path | None = None, extra_flags: tuple[str, ...] = ()) -> dict[str, float]:
    """`training.train.main` with the recipe's defaults, given only what differs at this scale, then `extra_flags`;
    with `teacher_cache`, the teacher's targets are recorded there, or replayed from there when it holds this run's
    record."""
    from training.train import main

    with tempfile.TemporaryDirectory() as output_dir:
        main([
            *deit_hf_flags(seed, settings, data_dir, output_dir),
            "--teacher_model", settings.teacher_model, "--teacher_checkpoint", str(teacher_path),
            "--teacher_check_batches", str(settings.teacher_check_batches),
            *(["--teacher_cache", str(teacher_cache)] if teacher_cache else []),
            *extra_flags,  # argparse keeps a repeated flag's last value
        ])
        metrics = json.loads((Path(output_dir) / "eval_results.json").read_text())
    return {name: metrics[f"eval_{name}"] for name in HEADS}


SIDES = {"deit_hf": train_deit_hf, "reference": train_reference}
REPLAY = "deit_hf replay"  # deit_hf again, its teacher's targets replayed from the deit_hf run's record
STUDY = Study("Convergence", (START_MARKER, END_MARKER), seeds=(0, 1, 2), epochs=Settings.epochs,
              workdir="outputs/convergence")


def _run_job(side: str, seed: int, settings: Settings, data_dir: Path, teacher_path: Path, replay: bool,
             extra_flags: tuple[str, ...]) -> list[dict]:
    """One side's run; deit_hf's records its teacher's targets when `replay`, then a second run replays them."""
    if side == "reference":
        return [timed({"side": side, "seed": seed}, lambda: train_reference(seed, settings, data_dir, teacher_path))]
    if not replay:
        return [timed({"side": side, "seed": seed},
                      lambda: train_deit_hf(seed, settings, data_dir, teacher_path, extra_flags=extra_flags))]
    with tempfile.TemporaryDirectory() as cache:
        return [
            timed({"side": name, "seed": seed},
                  lambda: train_deit_hf(seed, settings, data_dir, teacher_path, Path(cache), extra_flags))
            for name in ("deit_hf", REPLAY)
        ]


def summarize(runs: list[dict]) -> dict:
    """Mean and standard deviation of each head's top-1 per side with runs, deit_hf's mean minus the reference's
    once both have runs and, with a replay side, the largest per-seed difference between the replayed and the
    recording run (0 when exact)."""
    summary = {}
    for side in [side for side in (*SIDES, REPLAY) if any(run["side"] == side for run in runs)]:
        values = {name: [run[name] for run in runs if run["side"] == side] for name in HEADS}
        summary[side] = {
            name: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0) for name, v in values.items()
        }
    if "deit_hf" in summary and "reference" in summary:
        summary["difference"] = {name: summary["deit_hf"][name][0] - summary["reference"][name][0] for name in HEADS}
    if REPLAY in summary:
        recording = {run["seed"]: run for run in runs if run["side"] == "deit_hf"}
        summary["replay difference"] = max(
            abs(run[name] - recording[run["seed"]][name]) for run in runs if run["side"] == REPLAY for name in HEADS
        )
    return summary


def markdown(runs: list[dict], summary: dict, settings: Settings, teacher_top1: float) -> str:
    """The table below the machine line (`benchmarks.study`)."""
    lines = [
        f"Settings: {json.dumps(asdict(settings))}; teacher held-out top-1 {percent(teacher_top1)} %.",
        "",
        "| side | fused top-1 % | cls top-1 % | dist top-1 % | seeds | minutes per run |",
        "|---|---|---|---|---|---|",
    ]
    for side in [side for side in summary if side in (*SIDES, REPLAY)]:
        side_runs = [run for run in runs if run["side"] == side]
        cells = [f"{percent(mean)} ± {percent(std)}" for mean, std in (summary[side][name] for name in HEADS)]
        minutes = statistics.mean(run["seconds"] for run in side_runs) / 60
        lines.append(f"| {side} | {' | '.join(cells)} | {len(side_runs)} | {minutes:.1f} |")
    if "difference" in summary:
        differences = " | ".join(f"{100 * summary['difference'][name]:+.1f}" for name in HEADS)
        lines.append(f"| difference (deit_hf − reference) | {differences} | | |")
    if REPLAY in summary:
        lines += ["", f"{REPLAY}: deit_hf again with the teacher's targets replayed from the deit_hf run's "
                  f"`--teacher_cache` record, the teacher not loaded; largest per-seed difference from the recording "
                  f"run over the three heads: {100 * summary['replay difference']:.2f} points."]
    lines += ["", "Per seed (fused / cls / dist top-1 %):", ""]
    for run in sorted(runs, key=lambda run: (run["side"], run["seed"])):
        lines.append(f"- {run['side']} seed {run['seed']}: " + " / ".join(percent(run[name]) for name in HEADS))
    return "\n".join(lines)


def study_settings(args, **given) -> Settings:
    """The recipe at `args.epochs`, shrunk by `--quick` (`QUICK_SETTINGS`), then the flags the user gave in `given`
    (None: not given)."""
    quick = QUICK_SETTINGS if args.quick else {}
    return Settings(**{**quick, "epochs": args.epochs, **{name: v for name, v in given.items() if v is not None}})


def main(argv: list[str] | None = None) -> dict:
    parser = STUDY.parser(__doc__, quick="64 training digits, a 1-epoch teacher, no teacher check, deit_hf "
                          "evaluated on 64 held-out digits")
    parser.add_argument("--teacher-epochs", type=int, help=f"Default {Settings.teacher_epochs}.")
    parser.add_argument("--train-samples", type=int, help="Train on the first N digits (default all).")
    parser.add_argument("--teacher-check-batches", type=int,
                        help=f"deit_hf's teacher check before step 1 (default {Settings.teacher_check_batches}); 0 "
                        "for a smoke run's untrained teacher.")
    parser.add_argument("--no-replay", dest="replay", action="store_false",
                        help="Skip the deit_hf run that replays the recorded teacher targets.")
    args = STUDY.parse(parser, argv)
    settings = study_settings(args, teacher_epochs=args.teacher_epochs, train_samples=args.train_samples,
                              teacher_check_batches=args.teacher_check_batches)

    data_dir = prepare_data(args.workdir, args.dataset, settings.image_size)
    teacher_path, teacher_top1 = prepare_teacher(args.workdir, data_dir, settings)
    print(json.dumps({"teacher": settings.teacher_model, "top1": teacher_top1}), flush=True)
    extra_flags = QUICK_FLAGS if args.quick else ()
    jobs = [(side, seed, settings, data_dir, teacher_path, args.replay, extra_flags)
            for seed in args.seeds for side in SIDES]
    return STUDY.run(
        args, _run_job, jobs, summarize, lambda runs, summary, wall: markdown(runs, summary, settings, teacher_top1),
        planned=len(args.seeds) * (3 if args.replay else 2),
    )


if __name__ == "__main__":
    main()
