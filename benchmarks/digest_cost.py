"""The cost of the replay's pixel digest (`training.teacher.store.digest`) against the replayed training step.

    python -m benchmarks.digest_cost

The replay row's setting (`benchmarks.training_step.TrainSettings`: DeiT-Ti⚗ at 64 px, batch 32, fp32 on the CPU):
the replayed step timed by `benchmarks.training_step.TrainerLoop` (which digests every batch), and the digest of one
such batch timed alone, median of many calls. Prints one JSON line.
"""

import json
import statistics
import tempfile
import time

import torch

from benchmarks.training_step import TrainerLoop, TrainSettings
from training.teacher.store import digest


def digest_seconds(pixel_values: torch.Tensor, calls: int = 200) -> float:
    digest(pixel_values)  # the fixed probes drawn once
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        digest(pixel_values)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    settings = TrainSettings(replay=True)
    with tempfile.TemporaryDirectory() as output_dir:
        loop = TrainerLoop(settings, output_dir, replay=True)
        steps = [step for _ in range(settings.rounds) for step in loop.run_round()[settings.warmup_steps:]]
    step, digested = statistics.median(steps), digest_seconds(settings.batch()[0])
    print(json.dumps({"threads": torch.get_num_threads(), "replayed_step_ms": round(step * 1e3, 1),
                      "digest_ms": round(digested * 1e3, 3), "digest_share": round(digested / step, 5)}))


if __name__ == "__main__":
    main()
