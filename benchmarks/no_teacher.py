"""The paper's DeiT without distillation (one head, the labels alone) against facebookresearch/deit's loop without a
teacher, on the digits, over many seeds: without a teacher the tiny student's accuracy spreads widely.

    python -m benchmarks.no_teacher [--seeds 0 1 ... 11] [--jobs 2] [--output BENCHMARKS.md]

deit_hf is the distillation study's "no distillation" row (`training.train --distillation_token false
--distillation_type none --teacher_model none` with the convergence benchmark's recipe); the reference is
`benchmarks.convergence.train_reference` without a teacher (timm's `VisionTransformer` and `SoftTargetCrossEntropy` on
the Mixup/CutMix targets: facebookresearch/deit's `--distillation-type none`). Each side reports its held-out top-1 per
seed, their mean, spread, median, lowest and how many seeds stayed under 20 % (chance is 10 %); the table goes
between the markers of the output file.
"""

import argparse
import json
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from multiprocessing import get_context
from pathlib import Path

import torch

from . import machine_line, percent, record_section
from .convergence import Settings, prepare_data, train_reference
from .distillation_study import QUICK_FLAGS, train_row

START_MARKER, END_MARKER = "<!-- no-teacher baseline: start -->", "<!-- no-teacher baseline: end -->"
SIDES = ("deit_hf", "reference")
NEAR_CHANCE = 0.2


def _run_job(side: str, seed: int, settings: Settings, data_dir: Path, threads: int, extra_flags) -> dict:
    torch.set_num_threads(threads)
    start = time.perf_counter()
    if side == "deit_hf":
        top1 = train_row("no distillation", seed, settings, data_dir, None, extra_flags)["cls_top1"]
    else:
        top1 = train_reference(seed, settings, data_dir, None)["cls_top1"]
    return {"side": side, "seed": seed, "top1": top1, "seconds": time.perf_counter() - start}


def summarize(runs: list[dict]) -> dict:
    summary = {}
    for side in SIDES:
        values = [run["top1"] for run in runs if run["side"] == side]
        summary[side] = {
            "mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "median": statistics.median(values), "lowest": min(values),
            "near_chance": sum(value < NEAR_CHANCE for value in values), "seeds": len(values),
            "minutes": statistics.mean(run["seconds"] for run in runs if run["side"] == side) / 60,
        }
    return summary


def markdown(runs: list[dict], summary: dict, settings: Settings, machine: dict, wall: float) -> str:
    lines = [
        machine_line(machine),
        f"Wall time {wall / 60:.1f} min for {len(runs)} runs. Settings: {json.dumps(asdict(settings))} (no teacher).",
        "",
        f"| side | top-1 % mean ± std | median | lowest | seeds under {percent(NEAR_CHANCE)} % | seeds | min/run |",
        "|---|---|---|---|---|---|---|",
    ]
    for side, entry in summary.items():
        cells = [f"{percent(entry['mean'])} ± {percent(entry['std'])}", percent(entry["median"]),
                 percent(entry["lowest"]), entry["near_chance"], entry["seeds"], f"{entry['minutes']:.1f}"]
        lines.append(f"| {side} | " + " | ".join(map(str, cells)) + " |")
    by_seed = {(run["side"], run["seed"]): run["top1"] for run in runs}
    lines += ["", "Per seed (deit_hf / reference top-1 %):", ""]
    for seed in sorted({run["seed"] for run in runs}):
        lines.append(f"- seed {seed}: " + " / ".join(percent(by_seed[side, seed]) for side in SIDES))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(12)))
    parser.add_argument("--epochs", type=int, default=Settings.epochs)
    parser.add_argument("--quick", action="store_true", help="Smoke test: one seed, one epoch on 64 digits.")
    parser.add_argument("--jobs", type=int, default=1, help="Runs in parallel, each in its own process.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run.")
    parser.add_argument("--workdir", type=Path, default=Path("outputs/convergence"), help="Data cache.")
    parser.add_argument("--output", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--no-record", dest="record", action="store_false", help="Print JSON lines only.")
    args = parser.parse_args(argv)
    settings = Settings(epochs=args.epochs)
    if args.quick:
        settings, args.seeds = replace(settings, epochs=1, train_samples=64), [0]

    start = time.perf_counter()
    args.workdir.mkdir(parents=True, exist_ok=True)
    data_dir = prepare_data(args.workdir)
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        futures = [
            pool.submit(_run_job, side, seed, settings, data_dir, args.threads, QUICK_FLAGS if args.quick else ())
            for seed in args.seeds for side in SIDES
        ]
        runs = []
        for future in futures:
            runs.append(future.result())
            print(json.dumps(runs[-1]), flush=True)
    summary, wall = summarize(runs), time.perf_counter() - start
    print(json.dumps({"summary": summary, "wall_seconds": wall}), flush=True)
    if args.record:
        from .run import machine_description

        text = markdown(runs, summary, settings, machine_description(), wall)
        record_section(text, args.output, (START_MARKER, END_MARKER), "No-teacher baseline")
    return summary


if __name__ == "__main__":
    main()
