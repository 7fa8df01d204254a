"""The paper's DeiT without distillation (one head, the labels alone) against facebookresearch/deit's loop without a
teacher, on the digits, over many seeds: without a teacher the tiny student's accuracy spreads widely.

    python -m benchmarks.no_teacher [--seeds 0 1 ... 11] [--jobs 2] [--quick]

deit_hf is the distillation study's "no distillation" row (`training.train --distillation_token false
--distillation_type none --teacher_model none` with the convergence benchmark's recipe); the reference is
`benchmarks.convergence.train_reference` without a teacher (timm's `VisionTransformer` and `SoftTargetCrossEntropy` on
the Mixup/CutMix targets: facebookresearch/deit's `--distillation-type none`). Each side reports its held-out top-1 per
seed, their mean, spread, median, lowest and how many seeds stayed under 20 % (chance is 10 %); the table goes
between the markers of the output file.
"""

import json
import statistics
from dataclasses import asdict
from pathlib import Path

from . import percent
from .convergence import QUICK_FLAGS, Settings, study_settings, train_reference
from .distillation_study import train_row
from .study import Study, prepare_data, timed

START_MARKER, END_MARKER = "<!-- no-teacher baseline: start -->", "<!-- no-teacher baseline: end -->"
SIDES = ("deit_hf", "reference")
NEAR_CHANCE = 0.2
# the convergence benchmark's data cache: no teacher is trained here
STUDY = Study("No-teacher baseline", (START_MARKER, END_MARKER), seeds=tuple(range(12)), epochs=Settings.epochs,
              workdir="outputs/convergence")


def _top1(side: str, seed: int, settings: Settings, data_dir: Path, extra_flags) -> dict:
    if side == "deit_hf":
        return {"top1": train_row("no distillation", seed, settings, data_dir, None, extra_flags)["cls_top1"]}
    return {"top1": train_reference(seed, settings, data_dir, None)["cls_top1"]}


def _run_job(side: str, seed: int, settings: Settings, data_dir: Path, extra_flags) -> list[dict]:
    return [timed({"side": side, "seed": seed}, lambda: _top1(side, seed, settings, data_dir, extra_flags))]


def summarize(runs: list[dict]) -> dict:
    summary = {}
    for side in SIDES:
        values = [run["top1"] for run in runs if run["side"] == side]
        if not values:  # a partial record: this side has no finished run yet
            continue
        summary[side] = {
            "mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "median": statistics.median(values), "lowest": min(values),
            "near_chance": sum(value < NEAR_CHANCE for value in values), "seeds": len(values),
            "minutes": statistics.mean(run["seconds"] for run in runs if run["side"] == side) / 60,
        }
    if all(side in summary for side in SIDES):
        summary["fisher_p"] = tail_test(*(summary[side] for side in SIDES))
    return summary


def tail_test(deit_hf: dict, reference: dict) -> dict[str, float]:
    """Fisher's exact test of the two sides' near-chance counts: two-sided, and one-sided for deit_hf's rate above the
    reference's (the defect this benchmark looks for)."""
    from scipy.stats import fisher_exact  # scikit-learn's dependency, in the test extra

    table = [[entry["near_chance"], entry["seeds"] - entry["near_chance"]] for entry in (deit_hf, reference)]
    return {"two-sided": float(fisher_exact(table).pvalue),
            "deit_hf higher": float(fisher_exact(table, "greater").pvalue)}


def markdown(runs: list[dict], summary: dict, settings: Settings, wall: float) -> str:
    """The table below the machine line (`benchmarks.study`)."""
    lines = [
        f"Wall time {wall / 60:.1f} min for {len(runs)} runs. Settings: {json.dumps(asdict(settings))} (no teacher).",
        "",
        f"| side | top-1 % mean ± std | median | lowest | seeds under {percent(NEAR_CHANCE)} % | seeds | min/run |",
        "|---|---|---|---|---|---|---|",
    ]
    for side, entry in [(side, summary[side]) for side in SIDES if side in summary]:
        cells = [f"{percent(entry['mean'])} ± {percent(entry['std'])}", percent(entry["median"]),
                 percent(entry["lowest"]), entry["near_chance"], entry["seeds"], f"{entry['minutes']:.1f}"]
        lines.append(f"| {side} | " + " | ".join(map(str, cells)) + " |")
    if "fisher_p" in summary:
        counts = " vs ".join(f"{side} {summary[side]['near_chance']} of {summary[side]['seeds']}" for side in SIDES)
        lines += ["", f"Fisher's exact test of the seeds under {percent(NEAR_CHANCE)} % ({counts}): p = "
                  f"{summary['fisher_p']['two-sided']:.3f} two-sided, {summary['fisher_p']['deit_hf higher']:.3f} "
                  "one-sided (deit_hf's rate higher)."]
    by_seed = {(run["side"], run["seed"]): percent(run["top1"]) for run in runs}
    lines += ["", "Per seed (deit_hf / reference top-1 %):", ""]
    for seed in sorted({run["seed"] for run in runs}):
        lines.append(f"- seed {seed}: " + " / ".join(by_seed.get((side, seed), "—") for side in SIDES))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = STUDY.parser(__doc__, quick="64 training digits, deit_hf evaluated on 64 held-out digits")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES),
                        help="Train these sides only (default both): e.g. one side's rate over more seeds first, the "
                        "other's runs merged later with --merge.")
    args = STUDY.parse(parser, argv)
    settings = study_settings(args)
    data_dir = prepare_data(args.workdir, args.dataset, settings.image_size)
    extra_flags = QUICK_FLAGS if args.quick else ()
    jobs = [(side, seed, settings, data_dir, extra_flags) for seed in args.seeds for side in args.sides]
    return STUDY.run(args, _run_job, jobs, summarize,
                     lambda runs, summary, wall: markdown(runs, summary, settings, wall))


if __name__ == "__main__":
    main()
