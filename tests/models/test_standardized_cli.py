"""`interlace check-model` and `interlace demo --plot` on a tiny model saved to a folder."""

import pytest

from interlace import cli

from helpers import tiny, tiny_tokenizer


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def test_check_model_prints_the_table_and_passes(folder, capsys):
    assert cli.main(["check-model", folder, "--prompt", "w5 w6 w7", "--prompt", "w8"]) == 0
    out = capsys.readouterr().out
    assert "layers_output" in out and "trace == plain forward" in out and "FAIL" not in out
    assert "0 failed, 1 not applicable" in out  # routers_output: llama has no router


def test_demo_writes_the_figures(folder, tmp_path, capsys):
    page = tmp_path / "lens.html"
    assert cli.main(["demo", "--model", folder, "--prompt", "w5 w6 w7", "--plot", str(page)]) == 0
    html = page.read_text()
    assert html.count('class="plotly-graph-div"') == 2 and "Logit lens: 'w5 w6 w7'" in html
    assert f"figures written to {page}" in capsys.readouterr().out


def test_demo_streams_a_plain_and_a_steered_completion_side_by_side(folder, capsys):
    assert cli.main(["demo", "--model", folder, "--prompt", "w5 w6 w7", "--stream"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("plain"))
    assert "| steered (layer 0, x1)" in header  # two layers: a third of the way up is layer 0
    assert sum(line.count("w5 w6 w7") for line in out.splitlines()) == 2  # each column starts with the prompt
