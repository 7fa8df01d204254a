"""How the training entry points end on a user's error: one line naming what to change, not a traceback.

Errors found while parsing are argparse's usage errors (`training.train.parse_args`). Those found later, while the
data, the teacher or its record load, are `USER_ERRORS`: the project's own refusals (`ValueError`, with
`training.teacher.store.TeacherRecordError` among them), inputs that cannot be fetched or read (`OSError`:
a dataset not found, the hub unreachable; `InputUnavailableError`) and a run stopped by its data or its numbers.
`python -m training.X` prints their message in one line and exits with status 1; `DEIT_HF_TRACEBACK=1` shows the
traceback instead. Called from Python, the entry points raise them as they are.
"""

import logging
import os
import sys
from collections.abc import Callable

import transformers
from transformers import TrainingArguments

from .skipped_images import TooFewDecodableImagesError
from .step_guard import NonFiniteTrainingError

TRACEBACK_VARIABLE = "DEIT_HF_TRACEBACK"


class InputUnavailableError(RuntimeError):
    """An input the run names (a teacher's pretrained weights, say) cannot be fetched; the message says what to pass
    instead."""


USER_ERRORS = (ValueError, OSError, InputUnavailableError, TooFewDecodableImagesError, NonFiniteTrainingError)


def set_up_logging(training_args: TrainingArguments) -> None:
    """Log as the run's process log level says, with the `training` package's facts (schedule, teacher check, data)
    at INFO on the process that logs: entry points name their logger by `__spec__.name`, `training.X` under
    `python -m` too (where `__name__` is `__main__`)."""
    log_level = training_args.get_process_log_level()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logging.getLogger(__package__).setLevel(min(log_level, logging.INFO) if training_args.should_log else log_level)


def run_command(main: Callable[[], object], program: str) -> None:
    """Run an entry point's `main` as `python -m program` does: a user error ends it with one line on stderr."""
    try:
        main()
    except USER_ERRORS as error:
        if os.environ.get(TRACEBACK_VARIABLE, "0") not in ("", "0"):
            raise
        message = " ".join(str(error).split()) or type(error).__name__  # one line, whatever the message's breaks
        sys.exit(f"{program}: error: {message} ({TRACEBACK_VARIABLE}=1 shows the traceback)")
