"""The paper's distillation study (DeiT, arXiv 2012.12877: Table 3, Table 2 and section 4's token cosines) on the
bundled digits, in one command.

    python -m benchmarks.distillation_study [--seeds 0 1 2] [--epochs 30] [--jobs 2] [--quick]

Each row trains the convergence benchmark's tiny student (`benchmarks.convergence.Settings`: 64 dims, 4 layers,
4 heads, patch 4, 32 px, the DeiT recipe) with `training.train.main` on scikit-learn's digits (or MNIST-5k,
`--dataset mnist5k`), once per seed:

- no distillation: the one-head DeiT (`--distillation_token false --distillation_type none`);
- classical soft / hard: the teacher's loss on the class head of the one-head DeiT (`--distillation_token false`);
- token soft / hard: the distillation token's head learns from the teacher (DeiT⚗, hard is the default);
- two class tokens, labels only: DeiT⚗ with `--distillation_type labels` (each head on the labels: the paper's
  control, its distillation token a second class token);
- token hard, transformer teacher: a DeiT teacher of about the convnet teacher's held-out accuracy (Table 2).

The convnet teacher is a timm `resnet18`, the transformer teacher timm's `deit_tiny` architecture at the student's
size (`TRANSFORMER_TEACHER`, ImageNet normalisation as resnet18's), both trained on the digits once and cached in
`--workdir` with their held-out top-1. Two-token rows also report the cosine of the class and distillation tokens
at the encoder's input, after each layer and at the output (`training.plots.token_cosine_per_layer`, held-out
digits). The table goes between the study's markers of `--output`, the picture to `--figure`.
"""

import json
import statistics
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import timm
import torch
from timm.models import register_model
from timm.models.deit import _create_deit

from . import percent
from .convergence import HEADS, QUICK_FLAGS, Settings, deit_hf_flags, prepare_teacher, study_settings
from .study import DATASETS, Study, prepare_data, timed

START_MARKER, END_MARKER = "<!-- distillation study: start -->", "<!-- distillation study: end -->"
TRANSFORMER_TEACHER = "deit_tiny_patch4_32_digits"
EPOCHS = 30  # the convergence benchmark's length; 15 left students near chance (seed 0 without teacher: 10 %)
STUDY = Study("Distillation study", (START_MARKER, END_MARKER), seeds=(0, 1, 2), epochs=EPOCHS,
              workdir="outputs/distillation_study")
FIGURE = Path("docs/distillation_study.png")  # the digits'; another dataset's gets its name after the stem
# Teacher epochs picked so the two teachers' held-out top-1 are close (measured: both stated in the output).
TEACHER_EPOCHS = {"convnet": Settings.teacher_epochs, "transformer": 60}
TEACHER_MODELS = {"convnet": Settings.teacher_model, "transformer": TRANSFORMER_TEACHER}


def _deit_digits_teacher(pretrained: bool = False, **kwargs) -> torch.nn.Module:
    """timm's DeiT-Ti recipe at the study's student size: patch 4 on 32 px, 64 dims, 4 layers, 4 heads."""
    size = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4)
    # deit_tiny's pretrained_cfg (ImageNet mean/std, as resnet18's), at this size
    kwargs["pretrained_cfg_overlay"] = {**(kwargs.get("pretrained_cfg_overlay") or {}), "input_size": (3, 32, 32)}
    return _create_deit("deit_tiny_patch16_224", pretrained=pretrained, **{**size, **kwargs})


_deit_digits_teacher.__name__ = TRANSFORMER_TEACHER  # timm registers a model under its function's name


def register_transformer_teacher() -> None:
    """Make `TRANSFORMER_TEACHER` a timm model name (`timm.create_model`, `--teacher_model`), once per process."""
    if not timm.is_model(TRANSFORMER_TEACHER):
        register_model(_deit_digits_teacher)


@dataclass(frozen=True)
class Row:
    """One row of the study: the student's tokens, the loss and the teacher (None: the labels alone)."""

    distillation_token: bool
    distillation_type: str
    teacher: str | None = "convnet"

    @property
    def heads(self) -> tuple[str, ...]:
        """The heads this student has: a one-head DeiT has its class head only."""
        return HEADS if self.distillation_token else ("cls_top1",)


ROWS = {
    "no distillation": Row(False, "none", None),
    "classical soft": Row(False, "soft"),
    "classical hard": Row(False, "hard"),
    "token soft": Row(True, "soft"),
    "token hard": Row(True, "hard"),
    "two class tokens, labels only": Row(True, "labels", None),
    "token hard, transformer teacher": Row(True, "hard", "transformer"),
}
# DeiT-Ti 224 / DeiT-B 224 top-1 of the paper's Table 3 (class head, or the row's only head), Table 2 for the last row
PAPER = {
    "no distillation": "72.2 / 81.8",
    "classical soft": "72.2 / 81.8",
    "classical hard": "74.3 / 83.0",
    "token soft": "no such row",
    "token hard": "cls 73.9 / 83.0, dist 74.6 / 83.1, fused 74.5 / 83.4",
    "two class tokens, labels only": "no row (text: no gain, cos 0.999)",
    "token hard, transformer teacher": "B: 81.9 (DeiT-B teacher, 81.8) vs 82.7 (RegNetY-8GF, 81.7)",
}


def _flags(row: Row, seed: int, settings: Settings, data_dir: Path, teacher_path: Path | None, output_dir: str,
           extra: tuple[str, ...]) -> list[str]:
    teacher = ["--teacher_model", "none"] if row.teacher is None else [
        "--teacher_model", TEACHER_MODELS[row.teacher], "--teacher_checkpoint", str(teacher_path),
        "--teacher_check_batches", str(settings.teacher_check_batches)]
    return [
        *deit_hf_flags(seed, settings, data_dir, output_dir), *teacher,
        "--distillation_token", str(row.distillation_token).lower(), "--distillation_type", row.distillation_type,
        *extra,  # argparse keeps a repeated flag's last value
    ]


def held_out_pixels(data_dir: Path, processor) -> torch.Tensor:
    """The held-out digits as the trained model's own image processor prepares them for evaluation."""
    from datasets import load_from_disk

    images = [image.convert("RGB") for image in load_from_disk(str(data_dir))["validation"]["image"]]
    return processor(images=images, return_tensors="pt")["pixel_values"]


def train_row(name: str, seed: int, settings: Settings, data_dir: Path, teacher_path: Path | None,
              extra_flags: tuple[str, ...] = ()) -> dict:
    """One run: each head's held-out top-1 the student has and, with two tokens, their cosine at every layer."""
    from training.plots import token_cosine_per_layer
    from training.train import main

    row = ROWS[name]
    if row.teacher == "transformer":
        register_transformer_teacher()  # in the worker process training.train loads the teacher in
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = main(_flags(row, seed, settings, data_dir, teacher_path, output_dir, extra_flags))
        metrics = json.loads((Path(output_dir) / "eval_results.json").read_text())
    result = {head: metrics[f"eval_{head}"] for head in row.heads}
    if row.distillation_token:
        result["cosine_per_layer"] = token_cosine_per_layer(
            trainer.model, held_out_pixels(data_dir, trainer.processing_class)
        )
    return result


def _run_job(name: str, seed: int, settings: Settings, data_dir: Path, teacher_path, extra_flags) -> list[dict]:
    return [timed({"row": name, "seed": seed}, lambda: train_row(name, seed, settings, data_dir, teacher_path,
                                                                 extra_flags))]


def summarize(runs: list[dict]) -> dict:
    """Per row: mean and standard deviation of each head's top-1 over seeds, and the mean cosine at each layer."""
    summary = {}
    for name, row in ROWS.items():
        row_runs = [run for run in runs if run["row"] == name]
        if not row_runs:
            continue
        entry = {"seeds": len(row_runs), "minutes": statistics.mean(run["seconds"] for run in row_runs) / 60}
        for head in row.heads:
            values = [run[head] for run in row_runs]
            entry[head] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
        if row.distillation_token:
            entry["cosine_per_layer"] = [statistics.mean(layer) for layer in
                                         zip(*(run["cosine_per_layer"] for run in row_runs), strict=True)]
        summary[name] = entry
    return summary


def markdown(runs: list[dict], summary: dict, settings: Settings, teachers: dict, wall: float) -> str:
    """The table below the machine line (`benchmarks.study`)."""

    def cell(entry: dict, head: str) -> str:  # one seed has no spread to show
        if head not in entry:
            return "—"
        mean, std = entry[head]
        return f"{percent(mean)} ± {percent(std)}" if entry["seeds"] > 1 else percent(mean)

    teacher_text = "; ".join(f"{kind} `{TEACHER_MODELS[kind]}` {epochs} epochs, held-out top-1 {percent(top1)} %"
                             for kind, (_, top1, epochs) in teachers.items())
    lines = [
        f"Wall time {wall / 60:.1f} min for {len(runs)} runs. Settings: {json.dumps(asdict(settings))}.",
        f"Teachers: {teacher_text}. Soft distillation at τ = 1.0 (`--distillation_tau` default), α = 0.5.",
        "",
        "| row | tokens | loss | class head % | dist head % | fused % | output cos | seeds | min/run "
        "| paper top-1 (Ti / B 224) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in summary.items():
        row = ROWS[name]
        teacher = "labels" if row.teacher is None else f"{row.distillation_type}, {row.teacher}"
        cosine = f"{entry['cosine_per_layer'][-1]:.3f}" if "cosine_per_layer" in entry else "—"
        lines.append(
            f"| {name} | {2 if row.distillation_token else 1} | {teacher} | {cell(entry, 'cls_top1')} | "
            f"{cell(entry, 'dist_top1')} | {cell(entry, 'top1')} | {cosine} | {entry['seeds']} | "
            f"{entry['minutes']:.1f} | {PAPER[name]} |"
        )
    lines += ["", "cos(class token, distillation token), mean over seeds: input, after each layer, output (norm):", ""]
    for name, entry in summary.items():
        if "cosine_per_layer" in entry:
            lines.append(f"- {name}: " + ", ".join(f"{value:.3f}" for value in entry["cosine_per_layer"]))
    lines += ["", "Per seed (class / dist / fused top-1 %):", ""]
    for run in sorted(runs, key=lambda run: (list(ROWS).index(run["row"]), run["seed"])):
        heads = [percent(run[head]) for head in ("cls_top1", "dist_top1", "top1") if head in run]
        lines.append(f"- {run['row']} seed {run['seed']}: " + " / ".join(heads))
    return "\n".join(lines)


def plot(summary: dict, path: Path, dataset: str = "digits") -> Path:
    """Each row's held-out top-1 per head (bars, ± std over seeds), and the two-token rows' cosine per layer."""
    from matplotlib.figure import Figure  # the object API, headless, as training.plots

    figure = Figure(figsize=(12, 4.6), layout="constrained")
    bars, curves = figure.subplots(1, 2, width_ratios=(3, 2))
    names = list(summary)
    for offset, (head, label) in enumerate((("cls_top1", "class head"), ("dist_top1", "distillation head"),
                                            ("top1", "fused"))):
        positions = [index + (offset - 1) * 0.27 for index, name in enumerate(names) if head in summary[name]]
        values = [summary[name][head] for name in names if head in summary[name]]
        bars.bar(positions, [100 * mean for mean, _ in values], 0.27, yerr=[100 * std for _, std in values],
                 label=label, capsize=2)
    bars.axhline(10, color="gray", linestyle=":", label="chance (10 classes)")
    bars.set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize="small")
    bars.set(ylabel="held-out top-1 %", title=f"{DATASETS[dataset]}, 32 px: each row's heads (mean ± std over seeds)")
    bars.grid(axis="y", alpha=0.3)
    bars.legend(fontsize="small")
    for name, entry in summary.items():
        if "cosine_per_layer" in entry:
            cosines = entry["cosine_per_layer"]
            curves.plot(range(len(cosines)), cosines, "o-", label=name)
    depth = max((len(entry["cosine_per_layer"]) for entry in summary.values() if "cosine_per_layer" in entry),
                default=2)
    curves.set_xticks(range(depth), ["input", *map(str, range(1, depth - 1)), "output\n(norm)"])
    curves.axhline(0.93, color="gray", linestyle=":", label="paper, token hard output (0.93)")
    curves.set(xlabel="layer", ylabel="cos(cls token, dist token)", ylim=(-1.05, 1.05),
               title="the two tokens through the trained model")
    curves.grid(alpha=0.3)
    curves.legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


def prepare_teachers(workdir: Path, data_dir: Path, settings: Settings, epochs: dict[str, int]) -> dict:
    """Both teachers, trained once on the digits and cached: kind -> (path, held-out top-1, epochs)."""
    teachers = {}
    register_transformer_teacher()
    for kind, model in TEACHER_MODELS.items():
        path, top1 = prepare_teacher(workdir, data_dir, replace(settings, teacher_model=model,
                                                                 teacher_epochs=epochs[kind]))
        teachers[kind] = (path, top1, epochs[kind])
    return teachers


def main(argv: list[str] | None = None) -> dict:
    parser = STUDY.parser(__doc__, quick="64 training and 64 held-out digits, teachers of 1 epoch, no teacher check, "
                          "no DataLoader workers (the cosines still use all held-out digits)")
    parser.add_argument("--warmup-epochs", type=float, help=f"Default {Settings.warmup_epochs}.")
    parser.add_argument("--convnet-teacher-epochs", type=int, help=f"Default {TEACHER_EPOCHS['convnet']}.")
    parser.add_argument("--transformer-teacher-epochs", type=int, help=f"Default {TEACHER_EPOCHS['transformer']}.")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), metavar="ROW",
                        help=f"Rows to run (default all): {', '.join(repr(name) for name in ROWS)}.")
    parser.add_argument("--figure", type=Path, help=f"The picture, recorded with the table (default {FIGURE}, "
                        f"{FIGURE.stem}_mnist5k.png for MNIST-5k).")
    args = STUDY.parse(parser, argv)
    settings = study_settings(args, warmup_epochs=args.warmup_epochs)
    given = {"convnet": args.convnet_teacher_epochs, "transformer": args.transformer_teacher_epochs}
    epochs = {kind: (1 if args.quick else TEACHER_EPOCHS[kind]) if given[kind] is None else given[kind]
              for kind in TEACHER_EPOCHS}
    if args.figure is not None and args.output is None:
        parser.error("--figure is drawn with the recorded table, and nothing is recorded (--no-record, or --quick "
                     "without --output).")
    own_figure = FIGURE if args.dataset == "digits" else FIGURE.with_stem(f"{FIGURE.stem}_{args.dataset}")
    figure = args.figure or (None if args.quick else own_figure)

    data_dir = prepare_data(args.workdir, args.dataset, settings.image_size)
    teachers = prepare_teachers(args.workdir, data_dir, settings, epochs)
    for kind, (_, top1, teacher_epochs) in teachers.items():
        print(json.dumps({"teacher": TEACHER_MODELS[kind], "epochs": teacher_epochs, "top1": top1}), flush=True)
    jobs = [
        (name, seed, settings, data_dir, None if ROWS[name].teacher is None else teachers[ROWS[name].teacher][0],
         QUICK_FLAGS if args.quick else ())
        for seed in args.seeds for name in args.rows
    ]
    return STUDY.run(
        args, _run_job, jobs, summarize,
        lambda runs, summary, wall: markdown(runs, summary, settings, teachers, wall),
        on_record=None if figure is None else lambda summary: plot(summary, figure, args.dataset),
    )


if __name__ == "__main__":
    main()
