"""Smoke test of `python -m benchmarks.run --quick`: every benchmark runs and reports complete, positive figures."""

import json

import pytest
import torch

from benchmarks.run import END_MARKER, START_MARKER, main

COMMON_KEYS = {"benchmark", "case", "contender", "images_per_second", "seconds_per_call", "repeats"}
CONTENDERS = {
    "inference": {"deit_hf sdpa", "deit_hf eager", "timm", "transformers eager", "transformers sdpa"},
    "train": {"DistillationTrainer", "facebookresearch-style loop"},
    "input": {
        "deit_hf parquet", "deit_hf parquet + batch steps on this CPU", "timm ImageFolder", "timm ImageFolder prefetcher"
    },
}
RATIOS = {
    "deit_hf sdpa": {"ratio_vs_timm", "ratio_vs_transformers_eager", "ratio_vs_transformers_sdpa"},
    "DistillationTrainer": {"ratio_vs_loop"},
    "deit_hf parquet": {"ratio_vs_timm_ImageFolder", "ratio_vs_timm_ImageFolder_prefetcher"},
    "deit_hf parquet + batch steps on this CPU": {"ratio_vs_timm_ImageFolder"},
}
TRAIN_KEYS = {"gflop_per_image", "achieved_gflop_per_s", "peak_rss_mib", "peak_rss_above_imports_mib", "mfu"}


def test_quick_run_prints_every_measurement_and_records_them_between_the_markers(tmp_path, capsys):
    output = tmp_path / "BENCHMARKS.md"
    output.write_text(f"# Benchmarks\n\nbefore\n\n{START_MARKER}\nold results\n{END_MARKER}\n\nafter\n")

    main(["--quick", "--default-malloc", "--output", str(output)])  # leaves this process's allocator alone

    machine, *records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert set(machine) == {"device", "versions", "date"}
    assert {(r["benchmark"], r["contender"]) for r in records} == {
        (benchmark, contender) for benchmark, contenders in CONTENDERS.items() for contender in contenders
    }
    for record in records:
        assert COMMON_KEYS <= record.keys(), record
        assert record["images_per_second"] > 0 and record["seconds_per_call"] > 0 and record["repeats"] > 0, record
        for key in RATIOS.get(record["contender"], ()):
            assert record[key] > 0, (key, record)
        if record["benchmark"] == "train":
            assert all(record[key] > 0 for key in TRAIN_KEYS), record
            assert 0 < record["mfu"] < 2, record  # against a measured matmul peak, so it can pass 1 only by noise

    text = output.read_text()
    assert text.startswith("# Benchmarks\n\nbefore\n\n") and text.endswith("\n\nafter\n")
    assert "old results" not in text
    results = text.split(START_MARKER)[1].split(END_MARKER)[0]
    for contenders in CONTENDERS.values():
        for contender in contenders:
            assert f"| {contender} |" in results


def test_bf16_autocast_path_runs_and_says_so(capsys):
    main(["--quick", "--default-malloc", "--no-record", "--only", "inference,train", "--dtype", "bf16"])

    _, *records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {record["benchmark"] for record in records} == {"inference", "train"}
    assert all("bf16" in record["case"] and record["images_per_second"] > 0 for record in records)


def test_an_absent_accelerator_is_refused_before_anything_runs(capsys):
    with pytest.raises(SystemExit):
        main(["--quick", "--device", "cuda"] if not torch.cuda.is_available() else ["--device", "nonsense"])
    assert "--device" in capsys.readouterr().err


def test_convergence_smoke_run_reports_each_head_per_side_and_records_them(tmp_path, capsys):
    from benchmarks.convergence import END_MARKER as CONVERGENCE_END, START_MARKER as CONVERGENCE_START
    from benchmarks.convergence import main as convergence_main

    output = tmp_path / "BENCHMARKS.md"
    output.write_text(f"# Benchmarks\n\n{CONVERGENCE_START}\nstale results\n{CONVERGENCE_END}\n\nafter\n")
    summary = convergence_main(["--seeds", "0", "--epochs", "1", "--teacher-epochs", "1", "--train-samples", "64",
                                "--teacher-check-batches", "0", "--workdir", str(tmp_path / "work"), "--output", str(output)])
    for side in ("deit_hf", "reference"):
        for head in ("top1", "cls_top1", "dist_top1"):
            mean, std = summary[side][head]
            assert 0 <= mean <= 1 and std == 0  # one seed
    assert summary["difference"]["top1"] == summary["deit_hf"]["top1"][0] - summary["reference"]["top1"][0]
    text = output.read_text()
    assert "stale results" not in text and text.endswith("\n\nafter\n")
    assert "| deit_hf |" in text and "| reference |" in text and "deit_hf seed 0:" in text


def test_streaming_smoke_run_times_both_input_paths_on_two_processes(tmp_path):
    from benchmarks import streaming

    rows = list(streaming.run(tmp_path, num_images=16, num_shards=3, num_workers=1, input_size=32, batch_size=4,
                              warmup=0, repeats=1))
    assert [row.contender for row in rows] == [streaming.MAP_STYLE, streaming.STREAMED, streaming.DISPATCHED]
    assert all(row.images_per_second > 0 and "2 processes x 1 workers" in row.case for row in rows)
    assert all(row.extra["ratio_vs_map-style"] > 0 for row in rows[1:])
