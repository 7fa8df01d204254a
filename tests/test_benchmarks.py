"""Smoke tests of `python -m benchmarks.run --quick` and of the training studies' `--quick`: every benchmark runs and
reports complete, positive figures, and a quick run never touches the recorded figures."""

import json
from pathlib import Path

import pytest
import torch

from benchmarks import record_section
from benchmarks.run import END_MARKER, START_MARKER, main

COMMON_KEYS = {"benchmark", "case", "contender", "images_per_second", "seconds_per_call", "repeats"}
CONTENDERS = {
    "inference": {"deit_hf sdpa", "deit_hf eager", "timm", "transformers eager", "transformers sdpa"},
    "train": {"DistillationTrainer", "facebookresearch-style loop", "timm TokenDistillationTask",
              "DistillationTrainer, replayed teacher targets"},
    "input": {
        "deit_hf parquet", "deit_hf parquet + batch steps on this CPU", "timm ImageFolder",
        "timm ImageFolder prefetcher",
    },
    # on 2 processes
    "stream": {"map-style", "streamed", "streamed, dispatched from process 0"},
    "end_to_end": {"deit_hf training.train", "timm pipeline (create_loader + TokenDistillationTask)"},
    "teacher_sweep": {"online teacher, each run", "record once + replay"},
}
RATIOS = {
    "deit_hf sdpa": {"ratio_vs_timm", "ratio_vs_transformers_eager", "ratio_vs_transformers_sdpa"},
    "DistillationTrainer": {"ratio_vs_loop", "ratio_vs_timm_task"},
    "DistillationTrainer, replayed teacher targets": {
        "ratio_vs_online", "ratio_vs_timm_task", "ratio_bound_flops", "ratio_bound_time", "teacher_forward_ms"
    },
    "record once + replay": {"ratio_vs_online", "ratio_bound_flops"},
    "deit_hf training.train": {"ratio_vs_timm"},
    "streamed": {"ratio_vs_map-style"},
    "streamed, dispatched from process 0": {"ratio_vs_map-style"},
    "deit_hf parquet": {"ratio_vs_timm_ImageFolder", "ratio_vs_timm_ImageFolder_prefetcher"},
    "deit_hf parquet + batch steps on this CPU": {"ratio_vs_timm_ImageFolder"},
}
TRAIN_KEYS = {"gflop_per_image", "achieved_gflop_per_s", "peak_rss_mib", "peak_rss_above_imports_mib", "mfu"}
REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.fixture
def recorded_figures_untouched():
    """Fails the test if BENCHMARKS.md or a picture in docs/ changed while it ran."""
    paths = [REPOSITORY / "BENCHMARKS.md", *sorted((REPOSITORY / "docs").glob("*.png"))]
    before = {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in paths}
    yield
    assert {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in paths} == before
    assert sorted((REPOSITORY / "docs").glob("*.png")) == paths[1:]


@pytest.mark.slow
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
        if record["contender"] == "record once + replay":  # the sweep compared each student's per-step losses
            assert record["same_losses_as_online"] is True
            assert {"teacher pass (training.record_teacher)_s", "Ti_s", "S_s", "B_s"} <= record.keys(), record

    text = output.read_text()
    assert text.startswith("# Benchmarks\n\nbefore\n\n") and text.endswith("\n\nafter\n")
    assert "old results" not in text
    results = text.split(START_MARKER)[1].split(END_MARKER)[0]
    for contenders in CONTENDERS.values():
        for contender in contenders:
            assert f"| {contender} |" in results


def test_a_section_replaces_the_text_between_its_markers_or_is_appended_under_its_heading(tmp_path):
    path, markers = tmp_path / "BENCHMARKS.md", ("<!-- a: start -->", "<!-- a: end -->")
    record_section("first", path, markers, "A")  # no file yet
    assert path.read_text() == "## A\n\n<!-- a: start -->\nfirst\n<!-- a: end -->\n"
    path.write_text("# Benchmarks\n\n" + path.read_text() + "\ntext after\n")
    record_section("second", path, markers, "A")
    assert path.read_text() == "# Benchmarks\n\n## A\n\n<!-- a: start -->\nsecond\n<!-- a: end -->\n\ntext after\n"
    record_section("other", path, ("<!-- b: start -->", "<!-- b: end -->"), "B")  # markers absent: a new section
    assert path.read_text().endswith("text after\n\n## B\n\n<!-- b: start -->\nother\n<!-- b: end -->\n")
    assert path.read_text().count("second") == 1


@pytest.mark.slow
def test_bf16_autocast_path_runs_and_says_so(capsys):
    # without the peak-memory processes (one per contender, each emulating bf16 again): the first test measures them
    main(["--quick", "--default-malloc", "--no-record", "--no-memory", "--only", "inference,train", "--dtype", "bf16"])

    _, *records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {record["benchmark"] for record in records} == {"inference", "train"}
    assert all("bf16" in record["case"] and record["images_per_second"] > 0 for record in records)
    assert not [record for record in records if "peak_rss_mib" in record]  # --no-memory honoured


def test_an_absent_accelerator_is_refused_before_anything_runs(capsys):
    with pytest.raises(SystemExit):
        main(["--quick", "--device", "cuda"] if not torch.cuda.is_available() else ["--device", "nonsense"])
    assert "--device" in capsys.readouterr().err


@pytest.mark.slow
def test_convergence_smoke_run_reports_each_head_per_side_and_records_them(tmp_path, recorded_figures_untouched):
    from benchmarks.convergence import END_MARKER as CONVERGENCE_END
    from benchmarks.convergence import START_MARKER as CONVERGENCE_START
    from benchmarks.convergence import main as convergence_main

    output = tmp_path / "BENCHMARKS.md"
    output.write_text(f"# Benchmarks\n\n{CONVERGENCE_START}\nstale results\n{CONVERGENCE_END}\n\nafter\n")
    # a quick run records where --output says
    summary = convergence_main(["--quick", "--workdir", str(tmp_path / "work"), "--output", str(output)])
    for side in ("deit_hf", "reference", "deit_hf replay"):
        for head in ("top1", "cls_top1", "dist_top1"):
            mean, std = summary[side][head]
            assert 0 <= mean <= 1 and std == 0  # one seed
    assert summary["difference"]["top1"] == summary["deit_hf"]["top1"][0] - summary["reference"]["top1"][0]
    assert summary["replay difference"] == 0  # the replayed run trains on the recorded targets: the same model
    text = output.read_text()
    assert "stale results" not in text and text.endswith("\n\nafter\n")
    assert "| deit_hf |" in text and "| reference |" in text and "| deit_hf replay |" in text
    assert "deit_hf seed 0:" in text and "deit_hf replay seed 0:" in text
    assert "Partial" not in text  # all runs in


def test_compiled_training_rows_compile_student_and_teacher_on_both_sides(monkeypatch):
    from benchmarks.training_step import TIMM_TASK, TRAINER, TrainSettings, run

    compiled = []

    def record_compile(target, *args, **kwargs):  # compiling on a CPU takes minutes: record what would be compiled
        compiled.append(type(getattr(target, "__self__", target)).__name__)  # nn.Module.compile passes _call_impl
        return target

    monkeypatch.setattr(torch, "compile", record_compile)
    settings = TrainSettings(
        image_size=32, batch_size=4, steps_per_round=2, warmup_steps=1, rounds=1, busy_retries=0, torch_compile=True
    )
    trainer, timm_task = run(settings, measure_memory=False)

    assert (trainer.contender, timm_task.contender) == (TRAINER, TIMM_TASK)  # facebookresearch/deit compiles nothing
    assert " compiled " in trainer.case and trainer.extra.keys() >= {"ratio_vs_timm_task", "mfu"}
    assert "ratio_vs_loop" not in trainer.extra
    # the Trainer: its student (accelerate) and teacher wrapper; timm's task: its student and teacher model
    expected = ["DeiTForImageClassificationWithTeacher", "Teacher", "VisionTransformerDistilled", "RegNet"]
    assert sorted(compiled) == sorted(expected)


def test_accelerator_settings_run_eager_and_compiled_training_and_carry_the_h100_anchors(monkeypatch):
    from benchmarks import Measurement, end_to_end, inference, training_step
    from benchmarks import run as run_module

    built = []

    def fake_run(benchmark):
        def run(*args, **kwargs):
            settings = next((arg for arg in (*args, *kwargs.values()) if hasattr(arg, "torch_compile")), None)
            built.append((benchmark, settings, kwargs))
            compiled = " compiled " if getattr(settings, "torch_compile", False) else " "
            case = f"deit-small-distilled bs128{compiled}on cuda" if benchmark != "train" else (
                f"deit_small_distilled_patch16_224 student + regnety_160 teacher{compiled}on cuda")
            yield Measurement(benchmark, case, "contender", 2_000.0, 0.064, 1)
        return run

    for module, benchmark in ((inference, "inference"), (training_step, "train"), (end_to_end, "end_to_end")):
        monkeypatch.setattr(module, "run", fake_run(benchmark))
    benchmarks = ["inference", "train", "end_to_end"]
    measurements = list(run_module.run_benchmarks(benchmarks, device="cuda", dtype=torch.bfloat16))

    train_settings = [settings for benchmark, settings, _ in built if benchmark == "train"]
    # eager, compiled, then the replay of the teacher's targets beside the eager contenders
    assert [(settings.torch_compile, settings.replay) for settings in train_settings] == [
        (False, False), (True, False), (False, True)]
    assert all(
        (s.student, s.teacher, s.batch_size, s.dtype, s.device)
        == ("deit_small_distilled_patch16_224", "regnety_160", 128, torch.bfloat16, "cuda")
        for s in train_settings
    )
    e2e_settings = [settings for benchmark, settings, _ in built if benchmark == "end_to_end"]
    assert [settings.torch_compile for settings in e2e_settings] == [False, True]
    assert built[0][2]["compile"] and built[0][2]["batch_size"] == 256
    anchors = [(m.benchmark, m.extra["h100_anchor_img_per_s"]) for m in measurements]
    assert anchors == [("inference", 18_006), ("train", 1_898), ("train", 2_731), ("train", 1_898),
                       ("end_to_end", 1_898), ("end_to_end", 2_731)]
    assert measurements[2].extra["ratio_vs_h100_anchor"] == pytest.approx(2_000 / 2_731)
    assert "| 2,731 | 0.73× |" in run_module.markdown_tables(measurements)

    built.clear()
    cpu = list(run_module.run_benchmarks(["train", "end_to_end"]))  # CPU: eager only, no anchors
    assert [settings.torch_compile for _, settings, _ in built] == [False, False, False]
    assert [settings.teacher for benchmark, settings, _ in built if benchmark == "train"] == [
        training_step.TrainSettings().teacher, run_module.REPLAY_CPU_TEACHER]
    assert all("h100_anchor_img_per_s" not in m.extra for m in cpu)


def _burn_cpu_then_wait(burnt, release):
    import time

    while time.process_time() < 0.5:
        pass
    burnt.set()
    release.wait(60)


def test_foreign_cpu_with_children_counts_the_live_workers_cpu_as_its_own():
    import multiprocessing

    from benchmarks import ForeignCpu

    context = multiprocessing.get_context("fork")  # as DataLoader workers start on Linux
    burnt, release = context.Event(), context.Event()
    with_children, alone = ForeignCpu(include_children=True), ForeignCpu()
    before = with_children._own_cpu_seconds(), alone._own_cpu_seconds()
    worker = context.Process(target=_burn_cpu_then_wait, args=(burnt, release))
    worker.start()
    try:
        assert burnt.wait(60)
        after = with_children._own_cpu_seconds(), alone._own_cpu_seconds()
    finally:
        release.set()
        worker.join()
    assert after[0] - before[0] >= 0.5 > 0.2 > after[1] - before[1]


@pytest.mark.slow
def test_the_replay_row_times_the_trainer_without_its_teacher():
    from benchmarks.training_step import REPLAY, TRAINER, TrainSettings, run

    settings = TrainSettings(image_size=32, batch_size=4, steps_per_round=3, warmup_steps=1, rounds=2, busy_retries=0,
                             replay=True)
    rows = {row.contender: row for row in run(settings, measure_memory=False)}
    assert set(rows) >= {TRAINER, REPLAY}
    replay = rows[REPLAY]
    assert replay.extra.keys() >= {"ratio_vs_online", "ratio_vs_timm_task", "mfu"}
    assert replay.extra["gflop_per_image"] < rows[TRAINER].extra["gflop_per_image"]  # no teacher forward
    assert "teacher/student step FLOP ratio" in replay.case


def test_the_teacher_sweep_refuses_replayed_losses_that_differ_from_the_online_ones():
    from benchmarks.teacher_sweep import check_same_losses

    online = {"Ti": [2.3, 2.2], "S": [2.3, 2.1, 2.0]}
    check_same_losses(online, {"Ti": [2.3, 2.2], "S": [2.3, 2.1, 2.0]})
    with pytest.raises(RuntimeError, match=r"The S student's replayed losses differ from its online run's \(first at "
                                           r"step 1: 3 replayed, 3 online\)"):
        check_same_losses(online, {"Ti": [2.3, 2.2], "S": [2.3, 2.15, 2.0]})
    with pytest.raises(RuntimeError, match=r"The Ti student's .* \(first at step 2: 3 replayed, 2 online\)"):
        check_same_losses(online, {"Ti": [2.3, 2.2, 2.1], "S": [2.3, 2.1, 2.0]})


@pytest.mark.slow
def test_distillation_study_smoke_run_reports_every_row_with_its_heads_and_token_cosines(
    tmp_path, capsys, recorded_figures_untouched
):
    from benchmarks.distillation_study import END_MARKER as STUDY_END
    from benchmarks.distillation_study import ROWS
    from benchmarks.distillation_study import START_MARKER as STUDY_START
    from benchmarks.distillation_study import main as study_main

    output, figure = tmp_path / "BENCHMARKS.md", tmp_path / "study.png"
    output.write_text(f"# Benchmarks\n\n{STUDY_START}\nstale results\n{STUDY_END}\n\nafter\n")
    summary = study_main(["--quick", "--jobs", "2", "--workdir", str(tmp_path / "work"), "--output", str(output),
                          "--figure", str(figure)])

    assert list(summary) == list(ROWS)
    depth = 4  # benchmarks.convergence.Settings.depth
    for name, entry in summary.items():
        two_tokens = ROWS[name].distillation_token
        heads = {"top1", "cls_top1", "dist_top1"} if two_tokens else {"cls_top1"}  # one head: no fake dist numbers
        assert {key for key in entry if key.endswith("top1")} == heads, name
        for head in heads:
            mean, std = entry[head]
            assert 0 <= mean <= 1 and std == 0, (name, head)  # one seed
        if two_tokens:
            cosines = entry["cosine_per_layer"]
            # the encoder's input, after each layer, and the output after the final norm (where the heads read)
            assert len(cosines) == depth + 2 and all(-1 <= value <= 1 for value in cosines), (name, cosines)
        else:
            assert "cosine_per_layer" not in entry, name
    teachers = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"teacher"' in line]
    assert [teacher["teacher"] for teacher in teachers] == ["resnet18", "deit_tiny_patch4_32_digits"]
    text = output.read_text()
    assert "stale results" not in text and text.endswith("\n\nafter\n")
    table = text.split(STUDY_START)[1].split(STUDY_END)[0]
    for name in ROWS:
        assert f"| {name} |" in table
    cells = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in table.splitlines() if line.startswith("| ")}
    assert cells["no distillation"][:2] == ["1", "labels"]
    assert cells["no distillation"][3:6] == ["—", "—", "—"]  # one head: no distillation head, fusion or cosine
    assert "—" not in cells["token hard"][2:6]
    assert figure.stat().st_size > 0


@pytest.mark.slow
def test_no_teacher_quick_run_reports_both_sides_and_records_nothing(tmp_path, monkeypatch, capsys,
                                                                    recorded_figures_untouched):
    from benchmarks import no_teacher

    monkeypatch.chdir(tmp_path)  # where the default BENCHMARKS.md and data cache would be
    summary = no_teacher.main(["--quick"])

    for side in ("deit_hf", "reference"):
        entry = summary[side]
        assert entry["seeds"] == 1 and entry["std"] == 0 and entry["mean"] == entry["median"] == entry["lowest"]
        assert 0 <= entry["mean"] <= 1 and entry["near_chance"] == int(entry["mean"] < 0.2)
    output = capsys.readouterr()
    assert "--quick: nothing recorded" in output.err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["outputs"]  # no BENCHMARKS.md, no docs/
    runs = [record for record in map(json.loads, output.out.splitlines()) if "side" in record]
    table = no_teacher.markdown(runs, summary, no_teacher.Settings(), 60.0)  # what a recorded run would write
    assert "| deit_hf |" in table and "| reference |" in table and "- seed 0: " in table


def _one_run(seed: int) -> list[dict]:  # a study's job, run in a spawned process
    return [{"seed": seed, "top1": 0.5}]


@pytest.mark.slow
def test_a_study_records_after_every_run_labelled_partial_until_all_are_in(tmp_path, capsys):
    from benchmarks.study import Study

    study = Study("A study", ("<!-- a: start -->", "<!-- a: end -->"), seeds=(0, 1), epochs=1, workdir="unused")
    output, records, figures = tmp_path / "BENCHMARKS.md", [], []

    def table(runs, summary, wall):  # called before each record is written: the file holds the previous one
        records.append(output.read_text() if output.exists() else None)
        return f"| {summary['seeds']} |"

    args = study.parse(study.parser("", ""), ["--workdir", str(tmp_path / "work"), "--output", str(output)])
    jobs = [(seed,) for seed in args.seeds]
    summary = study.run(args, _one_run, jobs, lambda runs: {"seeds": len(runs)}, table, on_record=figures.append)

    assert summary == {"seeds": 2} and figures == [{"seeds": 1}, {"seeds": 2}]
    assert "**Partial: 1 of 2 runs finished so far**" in records[1] and "| 1 |" in records[1]
    text = output.read_text()
    assert "Partial" not in text and "| 2 |" in text and text.count("Machine: ") == 1
    assert [json.loads(line)["seed"] for line in capsys.readouterr().out.splitlines()[:2]] == [0, 1]


@pytest.mark.slow
def test_mnist5k_loads_ten_stratified_classes_of_real_32px_digits():
    import numpy as np

    from benchmarks.mnist5k import load_mnist5k_dataset

    data = load_mnist5k_dataset()

    assert {name: len(split) for name, split in data.items()} == {"train": 4000, "validation": 1000}
    assert data["train"].features["label"].num_classes == 10
    for split, per_class in (("train", 400), ("validation", 100)):
        assert np.bincount(data[split]["label"]).tolist() == [per_class] * 10
    pixels = np.stack([np.asarray(example["image"]) for example in data["validation"].select(range(50))])
    assert pixels.shape == (50, 32, 32, 3)
    assert (pixels[..., 0] == pixels[..., 2]).all()  # gray, as RGB
    # white strokes on black: a dark background, bright ink, and no two images alike
    assert np.median(pixels) == 0 and pixels.max() == 255 and len({image.tobytes() for image in pixels}) == 50


def test_each_dataset_has_its_own_cache_and_record_section(tmp_path, monkeypatch):
    from benchmarks.study import Study

    monkeypatch.chdir(tmp_path)
    study = Study("A study", ("<!-- a: start -->", "<!-- a: end -->"), seeds=(0,), epochs=1, workdir="outputs/a")
    parser = study.parser("", "")
    digits, mnist = study.parse(parser, []), study.parse(parser, ["--dataset", "mnist5k"])

    assert (digits.workdir, mnist.workdir) == (Path("outputs/a"), Path("outputs/a-mnist5k"))
    assert study.section("digits") == ("A study", ("<!-- a: start -->", "<!-- a: end -->"))
    assert study.section("mnist5k") == ("A study on MNIST-5k", ("<!-- a (mnist5k): start -->",
                                                                "<!-- a (mnist5k): end -->"))
    with pytest.raises(SystemExit):
        study.parse(parser, ["--dataset", "cifar10"])


def test_the_tail_test_is_fishers_on_the_near_chance_counts():
    from benchmarks.no_teacher import tail_test

    p = tail_test({"near_chance": 2, "seeds": 12}, {"near_chance": 0, "seeds": 12})
    assert p["two-sided"] == pytest.approx(11 / 23)  # the 12-seed table's 0.478
    assert p["deit_hf higher"] == pytest.approx(11 / 46)
    assert tail_test({"near_chance": 6, "seeds": 24}, {"near_chance": 0, "seeds": 24})["two-sided"] < 0.05


def _runs_of_seed(seed: int) -> list[dict]:  # a study's job, run in a spawned process
    return [{"side": "a", "seed": seed, "top1": 0.9}]


@pytest.mark.slow
def test_merged_runs_are_recorded_with_the_new_ones_and_a_rerun_replaces_its_earlier_line(tmp_path):
    from benchmarks.study import Study

    earlier = tmp_path / "earlier.jsonl"
    lines = [json.dumps({"side": "a", "seed": seed, "top1": 0.1}) for seed in (0, 1)]
    earlier.write_text("\n".join(["a training log line", *lines, json.dumps({"summary": {}})]) + "\n")
    study = Study("A study", ("<!-- a: start -->", "<!-- a: end -->"), seeds=(0,), epochs=1, workdir="unused")
    output = tmp_path / "BENCHMARKS.md"
    args = study.parse(study.parser("", ""), ["--seeds", "1", "2", "--merge", str(earlier), "--workdir",
                                              str(tmp_path / "work"), "--output", str(output)])

    def table(runs, summary, wall):
        return "\n".join(f"| {run['seed']} | {run['top1']} |" for run in sorted(runs, key=lambda run: run["seed"]))

    study.run(args, _runs_of_seed, [(seed,) for seed in args.seeds], lambda runs: {}, table)

    text = output.read_text()
    assert "| 0 | 0.1 |\n| 1 | 0.9 |\n| 2 | 0.9 |" in text  # seed 1 rerun: its new line, not both
    assert f"1 of these 3 runs are earlier ones merged from `{earlier}`" in text and "Partial" not in text


def test_no_teacher_trains_only_the_sides_asked_for(tmp_path, monkeypatch):
    from benchmarks import no_teacher
    from benchmarks.study import Study

    monkeypatch.chdir(tmp_path)
    planned = []
    monkeypatch.setattr(Study, "run", lambda self, args, job, jobs, *rest, **kwargs: planned.extend(jobs))
    no_teacher.main(["--quick", "--seeds", "3", "4", "--sides", "reference"])

    assert [(side, seed) for side, seed, *_ in planned] == [("reference", 3), ("reference", 4)]


def test_seeds_alone_with_merge_records_the_merged_runs_without_training(tmp_path):
    from benchmarks.study import Study

    earlier = tmp_path / "earlier.jsonl"
    earlier.write_text(json.dumps({"side": "a", "seed": 7, "top1": 0.25}) + "\n")
    study = Study("A study", ("<!-- a: start -->", "<!-- a: end -->"), seeds=(0,), epochs=1, workdir="unused")
    parser, output = study.parser("", ""), tmp_path / "BENCHMARKS.md"
    args = study.parse(parser, ["--seeds", "--merge", str(earlier), "--workdir", str(tmp_path),
                                "--output", str(output)])

    def never(*args):
        raise AssertionError("nothing is to be trained")

    summary = study.run(args, never, [], lambda runs: {"runs": len(runs)}, lambda runs, summary, wall: "| table |")

    assert summary == {"runs": 1} and "1 of these 1 runs are earlier ones merged" in output.read_text()
    with pytest.raises(SystemExit):
        study.parse(parser, ["--seeds", "--workdir", str(tmp_path)])  # nothing to run, nothing to record
