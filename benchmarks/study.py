"""The skeleton of the training studies (`convergence`, `distillation_study`, `no_teacher`): many seeded runs of a
small training, each in its own process, summarised and recorded as a table in BENCHMARKS.md.

A study names its section (`Study`), adds its own flags to `Study.parser`'s common ones and hands `Study.run` its
jobs, the function that trains one (it returns its runs, `timed`), its summary and its table. Finished runs print
one JSON line each; the table is recorded after every one, labelled partial until all are in, so a study stopped
early keeps what it finished. `--quick` is a smoke run (one seed, one epoch; each study shrinks the rest) and
records nothing unless `--output` names a file: its figures are not worth recording.
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
        parser.add_argument("--seeds", type=int, nargs="+", help=f"Default {' '.join(map(str, self.seeds))}.")
        parser.add_argument("--epochs", type=int, help=f"Default {self.epochs}.")
        parser.add_argument("--quick", action="store_true",
                            help=f"Smoke run, recorded nowhere unless --output is given: seed 0, 1 epoch, {quick}.")
        parser.add_argument("--jobs", type=int, default=1, help="Runs in parallel, each in its own process.")
        parser.add_argument("--threads", type=int, default=1, help="torch threads per run.")
        parser.add_argument("--workdir", type=Path, help=f"Data and teacher cache (default {self.workdir}, or "
                            f"{self.workdir}-quick).")
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
            args.workdir = Path(self.workdir + ("-quick" if args.quick else ""))
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
        runs = []
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(_in_worker, job, args.threads, job_args) for job_args in jobs]
            for future in as_completed(futures):
                for run in future.result():
                    runs.append(run)
                    print(json.dumps(run), flush=True)
                if args.output is not None:
                    summary = summarize(runs)
                    self._record(runs, planned, summary, table, time.perf_counter() - args.started, args.output)
                    if on_record is not None:
                        on_record(summary)
        summary = summarize(runs)
        print(json.dumps({"summary": summary, "wall_seconds": time.perf_counter() - args.started}), flush=True)
        return summary

    def _record(self, runs: list[dict], planned: int, summary: dict, table, wall: float, output: Path) -> None:
        text = f"{machine_line(machine_description())}\n{table(runs, summary, wall)}"
        if len(runs) < planned:
            text = f"**Partial: {len(runs)} of {planned} runs finished so far** (seeds run in order).\n\n{text}"
        record_section(text, output, self.markers, self.heading)
