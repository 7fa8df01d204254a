"""Model cards: generated from the presets and current, in the Hub's format, honest about whose numbers they show."""

import re

import pytest
from huggingface_hub import ModelCard

from deit_hf import PRESETS, DeiTConfig, DeiTForImageClassificationWithTeacher
from deit_hf.convert import main as convert_main
from deit_hf.modelcard import CARDS_DIR, PAPER_RESULTS, PAPER_URL, count_parameters, main, preset_card

from .conftest import TINY
from .test_snippets import PYTHON, blocks, run_python, snippet_folder  # noqa: F401

# The paper's parameter counts (millions), rounded as it prints them.
PAPER_PARAMETERS = {"tiny": 6, "small": 22, "base": 87}
RELATIVE_LINK = re.compile(r"\]\((?!https?://|#)([^)]*)\)")


def test_committed_cards_are_current():
    assert main(["--check"]) == 0, "regenerate the cards: python -m deit_hf.modelcard"


def test_a_stale_or_missing_card_is_named(tmp_path, capsys):
    assert main(["--output", str(tmp_path)]) == 0 and main(["--output", str(tmp_path), "--check"]) == 0
    small = tmp_path / "deit-small-distilled-patch16-224" / "README.md"
    small.write_text(small.read_text().replace("81.2", "82.0"))
    (tmp_path / "deit-base-distilled-patch16-384" / "README.md").unlink()
    assert main(["--output", str(tmp_path), "--check"]) == 1
    error = capsys.readouterr().err
    assert "deit-small-distilled-patch16-224" in error and "deit-base-distilled-patch16-384" in error
    assert "deit-tiny" not in error


def test_parameter_count_is_the_models():
    config = DeiTConfig(**TINY)
    model = DeiTForImageClassificationWithTeacher(config)
    assert count_parameters(config) == sum(parameter.numel() for parameter in model.parameters())


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_card_metadata_is_in_the_hubs_format(preset):
    card = ModelCard(preset_card(preset))
    data = card.data
    assert (data.license, data.library_name, data.pipeline_tag) == ("apache-2.0", "deit-hf", "image-classification")
    assert data.datasets == ["ILSVRC/imagenet-1k"] and "custom_code" in data.tags
    (result,) = data.eval_results  # parsed back from `model-index`
    assert (result.task_type, result.dataset_type, result.dataset_split) == (
        "image-classification", "ILSVRC/imagenet-1k", "validation"
    )
    assert result.metric_value == PAPER_RESULTS[preset].top1 and result.source_url == PAPER_URL
    parameters = count_parameters(DeiTConfig.from_preset(preset, num_labels=1000))
    assert abs(parameters / 1e6 - PAPER_PARAMETERS[preset.split("-")[1]]) < 1
    assert f"{parameters:,}" in card.text


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_card_says_whose_numbers_these_are(preset):
    text = (CARDS_DIR / preset / "README.md").read_text(encoding="utf-8")
    assert "not measurements by deit-hf" in text and "reproduced none" in text
    assert "has not measured this checkpoint's accuracy" in text
    assert not RELATIVE_LINK.findall(text), "relative links break on the Hub"
    assert "[" + "path" not in text and "Replace the bracketed" not in text  # no template placeholders


def test_converter_writes_a_card_whose_snippets_run_as_written(tmp_path, snippet_folder):  # noqa: F811
    output = tmp_path / "converted"
    convert_main(["--timm-model", "deit_tiny_distilled_patch16_224", "--random-init", "--output", str(output)])
    card = ModelCard.load(output / "README.md")
    assert "random initialisation" in card.text and "not a trained model" in card.text
    assert card.data.eval_results is None  # the paper's top-1 is not claimed for weights the converter cannot vouch for
    assert f"{count_parameters(DeiTConfig.from_pretrained(output)):,}" in card.text
    snippets = blocks(output / "README.md", PYTHON)
    assert len(snippets) == 3 and all(str(output) in code for code in snippets)
    for index, code in enumerate(snippets):
        run_python(code, f"converted card #python{index}")

