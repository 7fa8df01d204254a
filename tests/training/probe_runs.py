"""Several `training.train` runs in one launch: a probe's arguments are the runs' flags separated by `NEXT_RUN`, and
it trains them one after the other in the same processes, so one set of interpreters (each importing torch and
transformers, ~10 s) serves them all."""

import itertools

NEXT_RUN = "--next_run"


def joined(runs: list[list[str]]) -> list[str]:
    """The probe's arguments for `runs`, each a run's flags."""
    return [*itertools.chain.from_iterable([NEXT_RUN, *flags] for flags in runs)][1:]


def split(argv: list[str]) -> list[list[str]]:
    """Each run's flags, from the probe's arguments."""
    return [list(flags) for separator, flags in itertools.groupby(argv, NEXT_RUN.__eq__) if not separator]
