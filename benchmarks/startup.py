"""Start-up: `python -m training.train --help` against `python -c "import torch"`, measured in the same run.

    python -m benchmarks.startup [--rounds 5]

Each round runs both commands once, in turn, in fresh processes; the figures are medians over the rounds (wall time,
so a busy machine slows both). The goal (issue 26): `--help` within 2x `import torch`.
"""

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "import torch": [sys.executable, "-c", "import torch"],
    "training.train --help": [sys.executable, "-m", "training.train", "--help"],
    "training.train --bogus (a usage error)": [sys.executable, "-m", "training.train", "--bogus"],
}


def wall_time(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, capture_output=True, check=False)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    rounds = parser.parse_args(argv).rounds
    times = {name: [] for name in COMMANDS}
    for _ in range(rounds):
        for name, command in COMMANDS.items():
            times[name].append(wall_time(command))
    medians = {name: statistics.median(values) for name, values in times.items()}
    reference = medians["import torch"]
    for name, seconds in medians.items():
        print(f"{name:40s} {seconds:6.2f} s  ({seconds / reference:.2f}x import torch)")
    return medians


if __name__ == "__main__":
    main()
