"""Run the benchmarks, print one JSON line per measurement and record them in BENCHMARKS.md.

    python -m benchmarks.run [--quick] [--only inference,train,input,stream,end_to_end,teacher_sweep] [--full]
                             [--no-compile] [--threads N] [--compile-training]
    python -m benchmarks.run --device cuda      # bf16 autocast, the issue's GPU settings, eager and compiled

The tables go between the markers below in the output file (created if missing), so the analysis written around
them survives a rerun. Each table row is one contender; `ratio_vs_X` columns are deit-hf's throughput over X's.
With the accelerator settings, rows also carry the H100 figure measured for the same work (`H100_ANCHORS`) and
their ratio to it.
"""

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from . import (
    DTYPE_NAMES,
    Measurement,
    end_to_end,
    hold_freed_memory,
    inference,
    input_pipeline,
    machine_description,
    record_section,
    streaming,
    teacher_sweep,
    training_step,
)

BENCHMARKS = ("inference", "train", "input", "stream", "end_to_end", "teacher_sweep")
REPLAY_CPU_TEACHER = "regnety_040"
START_MARKER, END_MARKER = "<!-- benchmark results: start -->", "<!-- benchmark results: end -->"
# Smallest settings that still exercise every path, never waiting for a quiet machine: a smoke test, a first look.
QUICK = {
    "inference": dict(sizes=("tiny",), batch_size=1, warmup=1, repeats=1, busy_retries=0),
    # one timed product for the matmul peak: ~2 s each in bf16 on a CPU without bf16 units
    "train": dict(image_size=32, batch_size=8, steps_per_round=2, warmup_steps=1, rounds=1, busy_retries=0,
                  peak_repeats=1),
    "input": dict(num_images=16, batch_size=8, warmup=0, repeats=1, busy_retries=0),
    "stream": dict(num_images=16, num_shards=3, num_workers=1, input_size=32, batch_size=4, warmup=0, repeats=1),
    "end_to_end": dict(batch_size=8, workers=1, warmup_steps=1, timed_steps=2, rounds=1, busy_retries=0),
    # 2 steps per student at 32 px, with a teacher as small as the students
    "teacher_sweep": dict(
        teacher="regnety_002", input_size=32, patch_size=4, batch_size=16, train_samples=32, epochs=1, rounds=1,
        busy_retries=0,
    ),
}
FULL = {
    "inference": dict(sizes=("tiny", "small"), batch_size=8, warmup=3, repeats=20),
    "train": dict(steps_per_round=10, warmup_steps=3, rounds=4),
    "input": dict(num_images=200, batch_size=32, warmup=1, repeats=5),
    "stream": dict(num_images=256, num_shards=4, num_workers=1, batch_size=32, warmup=1, repeats=3),
    "end_to_end": dict(batch_size=32, workers=2, warmup_steps=3, timed_steps=12, rounds=2),
    "teacher_sweep": dict(),  # `teacher_sweep.SweepSettings`: 64 px digits, RegNetY-600MF, 2 epochs, 2 rounds
}
# On an accelerator, the GPU settings: batch 256 inference; DeiT-S⚗ + RegNetY-16GF (the paper's) at batch 128.
ACCELERATOR = {
    "inference": dict(sizes=("tiny", "small", "base"), batch_size=256, warmup=3, repeats=20),
    "train": dict(
        student="deit_small_distilled_patch16_224", teacher="regnety_160", image_size=224, num_labels=1000,
        batch_size=128, steps_per_round=12, warmup_steps=4, rounds=4,
    ),
    "input": FULL["input"],  # decoding and augmenting run on the CPU wherever the model runs
    "stream": FULL["stream"],
    "end_to_end": dict(
        preset="deit-small-distilled-patch16-224", timm_student="deit_small_distilled_patch16_224",
        teacher="regnety_160", input_size=224, batch_size=128, workers=max(1, (os.cpu_count() or 1) - 2),
        warmup_steps=10, timed_steps=30, rounds=1,
    ),
    "teacher_sweep": dict(batch_size=256, epochs=5),  # the same digits sweep, batches an accelerator can fill
}
# timm on an H100, bf16 autocast (/work/shared/README.md): (eager, compiled) img/s of the work the accelerator
# settings measure. Inference: timm at batch 256; train: timm's hard-distillation step, DeiT-S⚗ + RegNetY-16GF at
# batch 128, which also bounds the whole pipeline from above (end_to_end).
H100_ANCHORS = {
    ("inference", "tiny"): (31_648, 49_790),
    ("inference", "small"): (18_006, 24_639),
    ("inference", "base"): (8_331, 10_373),
    ("train", "small"): (1_898, 2_731),
    ("end_to_end", "small"): (1_898, 2_731),
}
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


def add_anchor(measurement: Measurement) -> Measurement:
    """Add the H100 figure of the same work (eager or compiled) and the ratio to it, where there is one."""
    case = measurement.case.replace("_", "-")  # timm's model names and deit_hf's presets alike
    size = next((size for size in ("tiny", "small", "base") if f"deit-{size}" in case), None)
    anchors = H100_ANCHORS.get((measurement.benchmark, size))
    if anchors is not None:
        anchor = anchors["compiled" in measurement.contender or " compiled " in measurement.case]
        measurement.extra.update(
            h100_anchor_img_per_s=float(anchor), ratio_vs_h100_anchor=measurement.images_per_second / anchor
        )
    return measurement


def _format(column: str, value) -> str:
    if value is None:
        return "—"
    if column.startswith("ratio"):
        return f"{value:.2f}×"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def markdown_tables(measurements: list[Measurement]) -> str:
    """One table per benchmark and case: contender, img/s, median ms per call, then the benchmark's own figures."""
    sections = []
    groups: dict[tuple[str, str], list[Measurement]] = {}
    for measurement in measurements:
        groups.setdefault((measurement.benchmark, measurement.case), []).append(measurement)
    for (benchmark, case), rows in groups.items():
        extra_columns = list(dict.fromkeys(key for row in rows for key in row.extra))
        header = ["contender", "img/s", "ms per call", *extra_columns]
        busy = f"{rows[0].busy_rounds_dropped} busy rounds dropped" + (
            f", **{rows[0].busy_rounds_kept} busy rounds kept: figures suspect**" if rows[0].busy_rounds_kept else ""
        )
        title = f"**{benchmark}** — {case} (median of {rows[0].repeats}; {busy})"
        lines = [title, "", "| " + " | ".join(header) + " |"]
        lines.append("|" + "---|" * len(header))
        for row in rows:
            cells = [
                row.contender,
                _format("img/s", row.images_per_second),
                _format("ms", row.seconds_per_call * 1e3),
                *(_format(key, row.extra.get(key)) for key in extra_columns),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


def record(measurements: list[Measurement], machine: dict[str, str], command: str, path: Path) -> None:
    """Replace the results section of `path` (between the markers) by these measurements."""
    text = "\n".join(
        [
            f"Measured {machine['date']} with `{command}`.",
            "",
            f"- Device: {machine['device']}",
            f"- Versions: {machine['versions']}",
            "",
            markdown_tables(measurements),
        ]
    )
    record_section(text, path, (START_MARKER, END_MARKER), "Results")


def run_benchmarks(
    only: Iterable[str],
    quick: bool = False,
    full: bool = False,
    compile: bool = True,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    compile_training: bool | None = None,
    measure_memory: bool = True,
) -> Iterator[Measurement]:
    """Yield the measurements of the benchmarks named in `only`, with `QUICK`, `FULL` or `ACCELERATOR` settings.

    `compile_training` adds the `torch_compile` runs of the train and end_to_end benchmarks to the eager ones; by
    default on an accelerator without `quick` (on a CPU compiling a training step takes minutes). `measure_memory`:
    the train benchmark's peak memory per contender, each in a fresh process.
    """
    settings = QUICK if quick else FULL if device == "cpu" else ACCELERATOR
    if compile_training is None:
        compile_training = compile and device != "cpu" and not quick
    compile_variants = (False, True) if compile_training else (False,)
    for name in only:
        if name == "inference":
            sizes = settings["inference"]["sizes"]
            sizes = (*sizes, "base") if full and "base" not in sizes else sizes
            measurements = inference.run(
                **{**settings["inference"], "sizes": sizes}, compile=compile and not quick, device=device, dtype=dtype
            )
        elif name == "train":
            # and the replay of the teacher's recorded targets, on a pair with the paper's teacher/student step FLOP
            # ratio (RegNetY-16GF / DeiT-S⚗, ~1.15): on the CPU's 64 px DeiT-Ti⚗, RegNetY-4GF (1.10); a quick run
            # (a smoke test) keeps its small teacher
            replay = {"teacher": REPLAY_CPU_TEACHER} if device == "cpu" and not quick else {}
            measurements = (
                measurement
                for torch_compile, replay_row in [(variant, False) for variant in compile_variants] + [(False, True)]
                for measurement in training_step.run(
                    training_step.TrainSettings(
                        **{**settings["train"], **(replay if replay_row else {})}, device=device, dtype=dtype,
                        torch_compile=torch_compile, replay=replay_row,
                    ),
                    measure_memory=measure_memory,
                )
            )
        elif name == "input":
            measurements = _in_temporary_directory(input_pipeline.run, **settings["input"])
        elif name == "stream":
            measurements = _in_temporary_directory(streaming.run, **settings["stream"])
        elif name == "end_to_end":
            measurements = (
                measurement
                for torch_compile in compile_variants
                for measurement in _in_temporary_directory(
                    end_to_end.run,
                    end_to_end.EndToEndSettings(
                        **settings["end_to_end"], device=device, dtype=dtype, torch_compile=torch_compile
                    ),
                )
            )
        elif name == "teacher_sweep":
            measurements = _in_temporary_directory(
                teacher_sweep.run, teacher_sweep.SweepSettings(**settings["teacher_sweep"], device=device, dtype=dtype)
            )
        for measurement in measurements:
            yield add_anchor(measurement) if settings is ACCELERATOR else measurement


def _in_temporary_directory(run, *args, **kwargs) -> Iterator[Measurement]:
    with tempfile.TemporaryDirectory() as directory:
        yield from run(directory, *args, **kwargs)


def _benchmark_list(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown benchmark(s) {unknown or value!r}; choose from {list(BENCHMARKS)}")
    return names


def main(argv: list[str] | None = None) -> list[Measurement]:
    """Command-line entry point (`make bench`)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="Smallest settings: runs every path, times none well.")
    parser.add_argument("--full", action="store_true", help="Add DeiT-B to the inference benchmark (slow on a CPU).")
    parser.add_argument("--only", type=_benchmark_list, default=list(BENCHMARKS), help="Comma-separated subset.")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="Skip the torch.compile rows.")
    parser.add_argument(
        "--compile-training",
        action=argparse.BooleanOptionalAction,
        help="Add torch_compile runs of train and end_to_end (default: on an accelerator, unless --quick).",
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores).")
    parser.add_argument("--device", default="cpu", help="Where models run: cpu (default), cuda, ...")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), help="fp32, or bf16 autocast (default: fp32 on a CPU, bf16 elsewhere)."
    )
    parser.add_argument(
        "--output",
        type=Path,
        help="Markdown file whose results section this run's tables replace (default: BENCHMARKS.md, except with "
        "--quick, whose figures are not worth recording).",
    )
    parser.add_argument("--no-record", dest="record", action="store_false", help="Print JSON lines only.")
    parser.add_argument("--no-memory", dest="measure_memory", action="store_false",
                        help="Skip the train benchmark's peak memory (one fresh process per contender).")
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="Keep glibc's adaptive malloc thresholds (page faults then add noise; see benchmarks.hold_freed_memory).",
    )
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be positive, got {args.threads}.")
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        parser.error(f"--device {args.device!r}: {error}")
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if device.type != "cpu" and (accelerator is None or accelerator.type != device.type):
        parser.error(f"--device {args.device}: no such accelerator here.")
    dtype = DTYPES[args.dtype or ("fp32" if device.type == "cpu" else "bf16")]

    torch.set_num_threads(args.threads)
    if not args.default_malloc:
        hold_freed_memory()
    machine = machine_description(args.device, args.default_malloc)
    print(json.dumps(machine), flush=True)
    measurements = []
    runs = run_benchmarks(args.only, args.quick, args.full, args.compile, args.device, dtype, args.compile_training,
                          args.measure_memory)
    for measurement in runs:
        measurements.append(measurement)
        print(json.dumps(measurement.to_dict()), flush=True)
    output = args.output or (None if args.quick else Path("BENCHMARKS.md"))
    if args.record and output is not None:
        record(measurements, machine, "python -m benchmarks.run " + " ".join(argv or sys.argv[1:]), output)
    return measurements


if __name__ == "__main__":
    main()
