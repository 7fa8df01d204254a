"""The private transformers methods deit-hf overrides or calls, pinned: each test names the change that breaks it.

transformers offers no public hook for these roles (checked against its callbacks, `get_train_dataloader`,
`compute_loss` and the save hooks); each override lives in one place, named in the test's message. When a test here
fails, transformers moved the method: read its new code, move the override, and update the pin.
"""

import dataclasses
import functools
import inspect

import pytest
from transformers import PreTrainedModel, Trainer, TrainingArguments
from transformers.modeling_utils import LoadStateDictConfig


def parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def source(function) -> str:
    return inspect.getsource(function)


@pytest.mark.parametrize(
    "method, leading_parameters, owner, role",
    [
        ("_get_train_sampler", ["self", "train_dataset"], "training.trainer.DistillationTrainer._get_train_sampler",
         "returns the training sampler (repeated augmentation's RepeatedViewSampler)"),
        ("_get_dataloader", ["self", "dataset", "description", "batch_size", "sampler_fn", "is_training"],
         "training.trainer.DistillationTrainer.get_train_dataloader",
         "builds a DataLoader from a dataset and a sampler function"),
        ("_run_epoch", ["self", "model", "epoch", "train_dataloader"],
         "training.trainer.DistillationTrainer._run_epoch",
         "runs one epoch, given its index, before the epoch's first batch is drawn"),
        ("_save_checkpoint", ["self", "model", "trial"], "training.trainer.DistillationTrainer._save_checkpoint",
         "writes one checkpoint under the directory `_get_output_dir` names"),
        ("_get_output_dir", ["self", "trial"], "training.trainer.DistillationTrainer._get_output_dir",
         "names the run directory checkpoints are written under (staging, training.checkpoints)"),
        ("_prepare_inputs", ["self", "inputs"], "training.trainer.DistillationTrainer._transform_batch",
         "moves a batch to the device"),
    ],
)
def test_trainer_private_methods_keep_their_signature(method, leading_parameters, owner, role):
    found = getattr(Trainer, method, None)
    assert found is not None, (
        f"transformers.Trainer.{method} is gone: {owner} relies on it ({role}). Find where transformers moved that "
        "role and move the override there."
    )
    assert parameters(found)[: len(leading_parameters)] == leading_parameters, (
        f"transformers.Trainer.{method} now takes {parameters(found)}, not {leading_parameters}...: {owner} "
        f"overrides or calls it ({role}); adapt it to the new signature."
    )


def test_the_training_loop_calls_run_epoch_once_per_epoch():
    loop = source(Trainer._inner_training_loop)
    assert "self._run_epoch(" in loop and "for epoch in range(" in loop, (
        "transformers.Trainer._inner_training_loop no longer calls self._run_epoch inside its epoch loop: "
        "DistillationTrainer._run_epoch sets each epoch's sampler and seeds there (training.randomness)."
    )
    run_epoch = source(Trainer._run_epoch)
    assert run_epoch.index("iter(train_dataloader)") > 0, (
        "transformers.Trainer._run_epoch no longer draws the epoch's batches itself: the epoch must be set on the "
        "sampler before that (DistillationTrainer._run_epoch)."
    )


def test_checkpoints_are_written_under_get_output_dir():
    assert "self._get_output_dir(" in source(Trainer._save_checkpoint), (
        "transformers.Trainer._save_checkpoint no longer asks _get_output_dir where to write: "
        "DistillationTrainer._save_checkpoint stages each checkpoint through it and publishes it whole "
        "(training.checkpoints); without it checkpoints would be written in place, visible half-written."
    )


def test_setup_devices_is_a_cached_property_of_training_arguments():
    assert isinstance(inspect.getattr_static(TrainingArguments, "_setup_devices"), functools.cached_property), (
        "transformers.TrainingArguments._setup_devices is no longer a cached property: "
        "training.args.DeiTTrainingArguments._setup_devices extends it to give a CPU process group its ddp_timeout."
    )


def test_pretrained_loading_takes_a_load_config_with_weight_mapping():
    assert parameters(PreTrainedModel._load_pretrained_model)[:5] == [
        "model", "state_dict", "checkpoint_files", "load_config", "expected_keys"
    ], (
        "transformers.PreTrainedModel._load_pretrained_model changed its signature: "
        "deit_hf.modeling_deit.DeiTPreTrainedModel._load_pretrained_model adds the position-embedding resampling "
        "to its load_config there."
    )
    assert "weight_mapping" in {field.name for field in dataclasses.fields(LoadStateDictConfig)}, (
        "transformers' LoadStateDictConfig has no weight_mapping: deit_hf resamples position embeddings as they load "
        "through it (deit_hf.position_embeddings)."
    )
