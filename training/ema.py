"""An exponential moving average of the student's weights, as facebookresearch/deit's `--model-ema` keeps it.

`--model_ema` (off by default) keeps timm's `ModelEmaV3` of the trained model, updated after every optimizer step with
`--model_ema_decay` (0.99996, facebookresearch/deit's default; no warm-up, as its `ModelEma`). At the end of training
the EMA weights are saved beside the model's (`output_dir/ema`, a checkpoint folder of their own) and, when the run
evaluates, evaluated too (`eval_ema_*` metrics). The average is not part of the checkpoints, so resuming a run that
keeps one is refused (`training.argument_checks`) rather than restarting the average from the resumed weights.
"""

import contextlib
import logging
from pathlib import Path

from timm.utils import ModelEmaV3
from transformers import TrainerCallback

logger = logging.getLogger(__name__)


class WeightAverage(TrainerCallback):
    """The EMA of the trainer's model, created when training begins and updated at each optimizer step's end."""

    def __init__(self, decay: float):
        self.decay = decay
        self.ema: ModelEmaV3 | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.ema = ModelEmaV3(model, decay=self.decay)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.ema.update(model)  # without a step: the decay from the first update on, as facebookresearch/deit

    @contextlib.contextmanager
    def swapped_into(self, model):
        """`model` holding the EMA weights for the duration, its own weights back afterwards."""
        own = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
        model.load_state_dict(self.ema.module.state_dict())
        try:
            yield model
        finally:
            model.load_state_dict(own)

    def save_and_evaluate(self, trainer, evaluate: bool) -> dict | None:
        """Save the EMA weights to `output_dir/ema` (with the image processor) and, with `evaluate`, return their
        `eval_ema_*` metrics."""
        directory = Path(trainer.args.output_dir) / "ema"
        with self.swapped_into(trainer.model):
            trainer.save_model(str(directory))
            metrics = trainer.evaluate(metric_key_prefix="eval_ema") if evaluate else None
        logger.info("EMA of the weights (decay %g) saved to %s.", self.decay, directory)
        return metrics
