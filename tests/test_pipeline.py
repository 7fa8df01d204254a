"""A saved checkpoint through `pipeline("image-classification")` and the Auto classes: after `import deit_hf`, via
`trust_remote_code` in an interpreter without deit_hf, and transformers' own DeiT checkpoints left to transformers."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification, pipeline

from deit_hf import DeiTConfig, DeiTForImageClassificationWithTeacher, DeiTHfImageProcessor, DeiTHfImageProcessorPil
from deit_hf.image_processing_deit import AUTO_MAP

from .conftest import TINY

LABELS = {0: "cat", 1: "dog", 2: "bird"}
SMALL = {"size": {"shortest_edge": 36}, "crop_size": {"height": 32, "width": 32}}
BACKENDS = {"pil": DeiTHfImageProcessorPil, "torchvision": DeiTHfImageProcessor}
PROCESSOR_FILES = {"image_processing_deit.py", "image_processing_deit_fast.py"}


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = DeiTForImageClassificationWithTeacher(
        DeiTConfig(**TINY, id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    )
    processor = DeiTHfImageProcessorPil(**SMALL)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    return tmp_path, model.eval(), processor


@pytest.fixture
def image():
    # 48x40 -> 43x36 -> crop 32: an odd margin (11), where transformers' crop floors the offset and timm rounds it.
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8))


@pytest.fixture
def no_prompt(monkeypatch):
    """Fail the test if transformers asks at the terminal whether to run a checkpoint's code."""
    prompts = []
    monkeypatch.setattr("builtins.input", lambda prompt="": prompts.append(prompt) or "n")
    yield
    assert not prompts, prompts


def run_script(script: str, *args, env: dict, cwd) -> str:
    """Run `script` in a fresh interpreter (stdin closed, so a prompt would show in the output instead of waiting)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **env}
    result = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        capture_output=True, text=True, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def expected_scores(model, processor, image):
    with torch.no_grad():
        logits = model(**processor(image, return_tensors="pt")).logits
    return torch.softmax(logits, -1)[0]


def test_pipeline_after_import(checkpoint, image, no_prompt):
    path, model, processor = checkpoint
    classifier = pipeline("image-classification", model=str(path))
    assert isinstance(classifier.model, DeiTForImageClassificationWithTeacher)
    assert isinstance(classifier.image_processor, DeiTHfImageProcessor)
    predictions = classifier(image, top_k=3)
    scores = expected_scores(model, processor, image)
    assert {p["label"] for p in predictions} == set(LABELS.values())
    for prediction in predictions:
        label_id = model.config.label2id[prediction["label"]]
        assert prediction["score"] == pytest.approx(scores[label_id].item(), abs=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_auto_classes_resolve_to_deit_hf(checkpoint, backend, no_prompt):
    path, _, _ = checkpoint
    assert isinstance(AutoConfig.from_pretrained(path), DeiTConfig)
    assert isinstance(AutoModelForImageClassification.from_pretrained(path), DeiTForImageClassificationWithTeacher)
    for trust_remote_code in (None, True):  # deit_hf's registration wins over the checkpoint's copy of its code
        processor = AutoImageProcessor.from_pretrained(path, backend=backend, trust_remote_code=trust_remote_code)
        assert type(processor) is BACKENDS[backend]
        assert processor.size == {"shortest_edge": 36} and processor.crop_size == {"height": 32, "width": 32}


def test_checkpoint_carries_auto_map_and_code(checkpoint):
    path, _, _ = checkpoint
    assert json.loads((path / "preprocessor_config.json").read_text())["auto_map"] == AUTO_MAP
    config = json.loads((path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageClassification"].endswith("DeiTForImageClassificationWithTeacher")
    assert config["auto_map"]["AutoConfig"].endswith("DeiTConfig")
    saved_files = {p.name for p in path.iterdir()}
    assert {"modeling_deit.py", "embeddings.py", "configuration_deit.py", "losses.py"} | PROCESSOR_FILES <= saved_files


def test_both_backends_save_the_same_config(tmp_path):
    saved = {}
    for backend, processor_class in BACKENDS.items():
        processor_class(**SMALL).save_pretrained(tmp_path / backend)
        saved[backend] = json.loads((tmp_path / backend / "preprocessor_config.json").read_text())
        assert PROCESSOR_FILES <= {p.name for p in (tmp_path / backend).iterdir()}
    assert saved["pil"] == saved["torchvision"]
    assert saved["pil"]["image_processor_type"] == "DeiTHfImageProcessor"


REMOTE_CODE_SCRIPT = """
import sys, torch
from PIL import Image
from transformers import AutoImageProcessor, pipeline
path, image_path, output = sys.argv[1:]
image = Image.open(image_path)
result = {"pixels": {}, "classes": {}}
for backend in ("pil", "torchvision"):
    processor = AutoImageProcessor.from_pretrained(path, backend=backend, trust_remote_code=True)
    result["classes"][backend] = f"{type(processor).__module__}.{type(processor).__name__}"
    result["pixels"][backend] = processor(image, return_tensors="pt").pixel_values
classifier = pipeline("image-classification", model=path, trust_remote_code=True)
result["model_module"] = type(classifier.model).__module__
result["pipeline_processor"] = type(classifier.image_processor).__name__
result["predictions"] = classifier(image, top_k=3)
result["deit_hf_imported"] = "deit_hf" in sys.modules
torch.save(result, output)
"""


@pytest.mark.slow
def test_plain_transformers_loads_it_with_trust_remote_code(checkpoint, image, tmp_path):
    path, model, processor = checkpoint
    image.save(tmp_path / "image.png")
    # A fresh interpreter that never imports deit_hf (not on its path): only the code saved with the checkpoint is
    # there.
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    log = run_script(REMOTE_CODE_SCRIPT, path, tmp_path / "image.png", tmp_path / "out.pt", env=env, cwd=tmp_path)
    assert "Do you wish to run the custom code" not in log
    output = torch.load(tmp_path / "out.pt", weights_only=True)

    assert not output["deit_hf_imported"]
    assert output["model_module"].startswith("transformers_modules")
    assert output["pipeline_processor"] == "DeiTHfImageProcessor"
    for backend, processor_class in BACKENDS.items():
        assert output["classes"][backend].startswith("transformers_modules")
        assert output["classes"][backend].endswith(processor_class.__name__)
        # the recipe's exact preprocessing, including the rounded crop offset of this image
        expected = processor_class(**SMALL)(image, return_tensors="pt").pixel_values
        torch.testing.assert_close(output["pixels"][backend], expected, atol=0, rtol=0)
    scores = expected_scores(model, DeiTHfImageProcessor(**SMALL), image)
    for prediction in output["predictions"]:
        assert prediction["score"] == pytest.approx(scores[model.config.label2id[prediction["label"]]].item(), abs=1e-5)


@pytest.fixture
def transformers_deit_folder(tmp_path):
    """A transformers DeiT checkpoint as the hub's facebook/deit-* ones are: model_type "deit", DeiTFeatureExtractor
    (or DeiTImageProcessor), an int size read as a square (256 and 224 there; 36 and 32 for the tiny model),
    written by transformers' own classes."""

    def build(processor_key: str):
        folder = tmp_path / processor_key
        config = transformers.DeiTConfig(**TINY)
        torch.manual_seed(0)
        transformers.DeiTForImageClassificationWithTeacher(config).save_pretrained(folder)
        transformers.DeiTImageProcessor(size=36, crop_size=32).save_pretrained(folder)
        settings = json.loads((folder / "preprocessor_config.json").read_text())
        if processor_key == "feature_extractor_type":
            del settings["image_processor_type"]
            settings["feature_extractor_type"] = "DeiTFeatureExtractor"  # as the hub's facebook/deit-* configs say
        (folder / "preprocessor_config.json").write_text(json.dumps(settings))
        return folder

    return build


TRANSFORMERS_FOLDER_SCRIPT = """
import sys, torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification
folder, image_path, output = sys.argv[1:]
image = Image.open(image_path)

def load():
    processor = AutoImageProcessor.from_pretrained(folder)
    model = AutoModelForImageClassification.from_pretrained(folder)
    pixels = processor(image, return_tensors="pt").pixel_values
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits
    return {"processor": f"{type(processor).__module__}.{type(processor).__name__}",
            "model": f"{type(model).__module__}.{type(model).__name__}", "pixels": pixels, "logits": logits}

result = {"without": load()}
import deit_hf
result["with"] = load()
torch.save(result, output)
"""


@pytest.mark.parametrize("processor_key", ["image_processor_type", "feature_extractor_type"])
@pytest.mark.slow
def test_transformers_deit_checkpoint_is_not_shadowed(transformers_deit_folder, processor_key, tmp_path):
    folder = transformers_deit_folder(processor_key)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(tmp_path / "image.png")
    run_script(TRANSFORMERS_FOLDER_SCRIPT, folder, tmp_path / "image.png", tmp_path / "out.pt", env={}, cwd=tmp_path)
    result = torch.load(tmp_path / "out.pt", weights_only=True)

    image = Image.open(tmp_path / "image.png")
    expected_pixels = transformers.DeiTImageProcessor(size=36, crop_size=32)(image, return_tensors="pt").pixel_values
    # what deit_hf's processor would have made of the same settings: a shortest edge, not a square
    deit_hf_pixels = DeiTHfImageProcessor(size=36, crop_size=32)(image, return_tensors="pt").pixel_values
    assert not torch.allclose(deit_hf_pixels, expected_pixels)
    for case in ("without", "with"):
        assert result[case]["processor"] == "transformers.models.deit.image_processing_deit.DeiTImageProcessor"
        assert result[case]["model"].startswith("transformers.models.deit.modeling_deit.")
        torch.testing.assert_close(result[case]["pixels"], expected_pixels, atol=0, rtol=0)
    torch.testing.assert_close(result["with"]["logits"], result["without"]["logits"], atol=0, rtol=0)


AUTO_CLASSES_SCRIPT = """
import json, sys, torch
from transformers import AutoModel, AutoModelForImageClassification
loaded = {}
for name, auto_class in (("model", AutoModel), ("classifier", AutoModelForImageClassification)):
    for folder in sys.argv[1:3]:
        model = auto_class.from_pretrained(folder, trust_remote_code=True)
        model(torch.zeros(1, 3, 32, 32))
        loaded[f"{name} from {folder[-4:]}"] = f"{type(model).__module__}.{type(model).__name__}"
assert "deit_hf" not in sys.modules
open(sys.argv[3], "w").write(json.dumps(loaded))
"""


@pytest.mark.slow
def test_every_auto_class_resolves_to_deit_hf_code_without_deit_hf(tmp_path):
    # Without AutoModel in the saved auto_map, transformers picked its own DeiTModel by the config's class name and
    # crashed ('DeiTConfig' object has no attribute 'pooler_output_size'); a saved DeiTModel likewise.
    from deit_hf import DeiTModel

    config = DeiTConfig(**TINY, id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    DeiTForImageClassificationWithTeacher(config).save_pretrained(tmp_path / "head")
    DeiTModel(config).save_pretrained(tmp_path / "base")
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    run_script(AUTO_CLASSES_SCRIPT, tmp_path / "head", tmp_path / "base", tmp_path / "loaded.json", env=env,
               cwd=tmp_path)
    loaded = json.loads((tmp_path / "loaded.json").read_text())
    assert {key: value.split(".")[-1] for key, value in loaded.items()} == {
        "model from head": "DeiTModel", "model from base": "DeiTModel",
        "classifier from head": "DeiTForImageClassificationWithTeacher",
        "classifier from base": "DeiTForImageClassificationWithTeacher",
    }
    assert all(value.startswith("transformers_modules") for value in loaded.values()), loaded
