"""Every entry point answers `--help` (argparse formats help strings with %: a stray one used to crash it)."""

import importlib

import pytest


@pytest.mark.parametrize("module", ["training.train", "training.train_teacher", "training.record_teacher",
                                    "training.demo", "deit_hf.convert", "deit_hf.modelcard", "benchmarks.run",
                                    "benchmarks.convergence", "benchmarks.distillation_study", "benchmarks.no_teacher"])
def test_help_works(module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(module).main(["--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out
