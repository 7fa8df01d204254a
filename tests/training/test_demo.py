"""`training.demo`: the README's caption is the recorded demo run's, and `--record` rewrites it from a run."""

import json

import pytest

from training import demo


def test_the_readmes_caption_is_the_recorded_runs():
    figures = json.loads(demo.RECORDED_FIGURES.read_text())
    block = demo.CAPTION.search((demo.ROOT / "README.md").read_text())
    assert block is not None and block.group(2) == demo.caption(figures), (
        "README.md's demo caption is not docs/distillation_run.json's run: run `python -m training.demo --record`."
    )
    assert demo.RECORDED_PICTURE.stat().st_size > 0


def test_record_rewrites_the_caption_block_only(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "RECORDED_PICTURE", tmp_path / "run.png")
    monkeypatch.setattr(demo, "RECORDED_FIGURES", tmp_path / "run.json")
    picture, readme = tmp_path / "drawn.png", tmp_path / "README.md"
    picture.write_bytes(b"png")
    readme.write_text("before\n<!-- demo caption -->\nold\n<!-- /demo caption -->\nafter\n")
    figures = {"epochs": 3, "eval_top1": 0.5, "eval_cls_top1": 0.4, "eval_dist_top1": 0.45, "eval_teacher_top1": 0.9,
               "eval_dist_teacher_agreement": 0.6, "token_cosines": [-0.1, 0.2, 0.3]}
    demo.record(picture, figures, readme)
    block = f"<!-- demo caption -->\n{demo.caption(figures)}\n<!-- /demo caption -->"
    assert readme.read_text() == f"before\n{block}\nafter\n"
    assert json.loads((tmp_path / "run.json").read_text()) == figures
    assert "fused 0.500" in demo.caption(figures) and "0.30 at the output" in demo.caption(figures)
    readme.write_text("no block\n")
    with pytest.raises(ValueError, match="no <!-- demo caption --> block"):
        demo.record(picture, figures, readme)
