"""A saved checkpoint through `pipeline("image-classification")`: after `import deit_hf`, and via trust_remote_code."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification, pipeline

from deit_hf import DeiTConfig, DeiTForImageClassificationWithTeacher, DeiTHfImageProcessorPil

from .conftest import TINY

LABELS = {0: "cat", 1: "dog", 2: "bird"}


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = DeiTForImageClassificationWithTeacher(DeiTConfig(**TINY, id2label=LABELS, label2id={v: k for k, v in LABELS.items()}))
    processor = DeiTHfImageProcessorPil(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32})
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    return tmp_path, model.eval(), processor


@pytest.fixture
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8))


def expected_scores(model, processor, image):
    with torch.no_grad():
        logits = model(**processor(image, return_tensors="pt")).logits
    return torch.softmax(logits, -1)[0]


def test_pipeline_after_import(checkpoint, image):
    path, model, processor = checkpoint
    classifier = pipeline("image-classification", model=str(path))
    assert isinstance(classifier.model, DeiTForImageClassificationWithTeacher)
    predictions = classifier(image, top_k=3)
    scores = expected_scores(model, processor, image)
    assert {p["label"] for p in predictions} == set(LABELS.values())
    for prediction in predictions:
        label_id = model.config.label2id[prediction["label"]]
        assert prediction["score"] == pytest.approx(scores[label_id].item(), abs=1e-4)


def test_auto_classes_resolve_to_deit_hf(checkpoint):
    path, _, _ = checkpoint
    assert isinstance(AutoConfig.from_pretrained(path), DeiTConfig)
    assert isinstance(AutoModelForImageClassification.from_pretrained(path), DeiTForImageClassificationWithTeacher)
    processor = AutoImageProcessor.from_pretrained(path)
    assert processor.size == {"shortest_edge": 36} and processor.crop_size == {"height": 32, "width": 32}


def test_checkpoint_carries_auto_map_and_code(checkpoint):
    path, _, _ = checkpoint
    # no processor auto_map: pipeline() would read it as a video processor's and prompt for trust_remote_code
    assert "auto_map" not in json.loads((path / "preprocessor_config.json").read_text())
    config = json.loads((path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageClassification"].endswith("DeiTForImageClassificationWithTeacher")
    assert config["auto_map"]["AutoConfig"].endswith("DeiTConfig")
    assert {"modeling_deit.py", "configuration_deit.py", "losses.py"} <= {p.name for p in path.iterdir()}


TRUST_REMOTE_CODE_SCRIPT = """
import sys, json
import numpy as np
from PIL import Image
from transformers import pipeline
classifier = pipeline("image-classification", model=sys.argv[1], trust_remote_code=True)
image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (36, 36, 3), dtype=np.uint8))
print(json.dumps({"module": type(classifier.model).__module__, "predictions": classifier(image, top_k=3)}))
"""


def test_plain_transformers_loads_it_with_trust_remote_code(checkpoint):
    path, model, processor = checkpoint
    # Without deit_hf the processor is transformers' DeiTImageProcessor reading the saved settings; it rounds an odd
    # center-crop offset down where timm rounds it to nearest, so the image is one whose crop offset is whole.
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (36, 36, 3), dtype=np.uint8))
    # A fresh interpreter that never imports deit_hf: only the code saved with the checkpoint is there.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(path.parent / "modules")}
    result = subprocess.run(
        [sys.executable, "-c", TRUST_REMOTE_CODE_SCRIPT, str(path)],
        capture_output=True, text=True, env=env, cwd=path.parent, check=True,
    )
    output = json.loads(result.stdout.strip().splitlines()[-1])
    assert output["module"].startswith("transformers_modules")
    scores = expected_scores(model, processor, image)
    for prediction in output["predictions"]:
        assert prediction["score"] == pytest.approx(scores[model.config.label2id[prediction["label"]]].item(), abs=1e-4)
