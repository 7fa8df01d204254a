"""The model card a training run leaves in its output_dir: the run's measured metrics per head, teacher and recipe."""

import json
from pathlib import Path
from types import SimpleNamespace

import transformers.trainer
from huggingface_hub import ModelCard

from training.run_card import last_evaluation
from training.train import main

from ..test_snippets import PYTHON, blocks, run_python, snippet_folder  # noqa: F401
from .conftest import tiny_run_args


class FakeHub:
    """transformers' `hf_api()` offline: each upload keeps the card the folder held when it was pushed."""

    def __init__(self):
        self.uploaded_cards = []

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, repo_id, folder_path, **kwargs):
        self.uploaded_cards.append((repo_id, (Path(folder_path) / "README.md").read_text()))


def test_a_training_run_writes_a_card_with_its_own_facts(
    small_digits_dir, random_teacher_dir, tmp_path, snippet_folder, monkeypatch  # noqa: F811
):
    output, hub = tmp_path / "run", FakeHub()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: hub)
    main(tiny_run_args(small_digits_dir, random_teacher_dir, output, "--max_steps", "3", "--learning_rate", "1e-3",
                       "--push_to_hub", "true", "--hub_model_id", "me/tiny", "--save_strategy", "no"))
    measured = json.loads((output / "eval_results.json").read_text())
    card = ModelCard.load(output / "README.md")
    # --push_to_hub is honoured: the last push carries the run card, metrics included
    assert [repo for repo, _ in hub.uploaded_cards] == ["me/tiny", "me/tiny"]
    assert hub.uploaded_cards[-1][1] == (output / "README.md").read_text() != hub.uploaded_cards[0][1]

    (result,) = card.data.eval_results  # the run's own top-1, not the paper's
    assert result.metric_value == round(100 * measured["eval_top1"], 2) and result.source_url is None
    assert card.data.datasets is None  # a local folder is no Hub dataset id
    for key in ("eval_top1", "eval_cls_top1", "eval_dist_top1", "eval_teacher_top1", "eval_dist_teacher_agreement"):
        assert f"{measured[key]:.4f}" in card.text, key
    assert f"`{random_teacher_dir}`, hard distillation, α = 0.5" in card.text
    assert "| steps | 3 × 8 images (24 images, 0.5 epochs) |" in card.text and "lr 0.001" in card.text
    assert f"Measured by this run on the validation split of {small_digits_dir} (" in card.text
    assert "| global batch | 8 (1 process(es)) |" in card.text
    assert "| skipped images | training: 0; validation: 0 of 32 |" in card.text
    assert card.text.startswith("\n# DeiT⚗ trained with deit-hf") and "| fused (cls + dist) / 2 |" in card.text
    assert "trained from scratch (random init) as `deit-tiny-distilled-patch16-224`" in card.text
    for index, code in enumerate(blocks(output / "README.md", PYTHON)):  # the card's snippets load this run's model
        run_python(code, f"run card #python{index}")


def test_last_evaluation_is_the_latest_eval_entry():
    history = [{"eval_top1": 0.1, "epoch": 1}, {"loss": 2.0}, {"eval_top1": 0.3, "eval_loss": 1.0, "epoch": 2}]
    assert last_evaluation(history) == {"eval_top1": 0.3, "eval_loss": 1.0}
    assert last_evaluation([{"loss": 2.0}]) is None


def test_a_streamed_run_on_imagefolders_says_what_it_saw_and_where_it_was_evaluated(digits, random_teacher_dir,
                                                                                      tmp_path):
    for split, directory in (("train", "train"), ("validation", "val")):
        for index, example in enumerate(digits[split].select(range(60))):
            folder = tmp_path / directory / str(example["label"])
            folder.mkdir(parents=True, exist_ok=True)
            example["image"].save(folder / f"{index}.png")
    args = tiny_run_args("x", random_teacher_dir, tmp_path / "run", "--max_steps", "2", "--streaming", "true")
    args[args.index("--dataset_name"):args.index("--dataset_name") + 2] = [
        "--train_dir", str(tmp_path / "train"), "--validation_dir", str(tmp_path / "val")]
    main(args)
    text = ModelCard.load(tmp_path / "run" / "README.md").text
    # transformers counts a stream's max_steps as 1 epoch; 16 of the 60 images were seen
    assert "| steps | 2 × 8 images (16 images, the stream's epochs are not counted) |" in text
    assert "epochs) |" not in text
    assert f"Measured by this run on `{tmp_path / 'val'}` (" in text
    (result,) = ModelCard.load(tmp_path / "run" / "README.md").data.eval_results
    assert result.dataset_name == result.dataset_type == str(tmp_path / "val")


def test_a_one_head_run_has_a_deit_card_without_a_fused_row(small_digits_dir, random_teacher_dir, tmp_path):
    output = tmp_path / "run"
    main(tiny_run_args(small_digits_dir, random_teacher_dir, output, "--max_steps", "2", "--distillation_token",
                       "false"))
    card = ModelCard.load(output / "README.md")
    measured = json.loads((output / "eval_results.json").read_text())
    assert card.text.startswith(f"\n# DeiT trained with deit-hf on {small_digits_dir}\n")
    assert "fused (cls" not in card.text and "cls + dist" not in card.text
    assert f"| class head | {measured['eval_cls_top1']:.4f} |" in card.text
    assert "`model-index` carries the class head's top-1 in %" in card.text
    (result,) = card.data.eval_results
    assert (result.dataset_name, result.dataset_split) == (str(small_digits_dir), "validation")
    assert "| skipped images | training: 0; validation: 0 of 32 |" in card.text
