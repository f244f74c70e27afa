"""`python -m dlmjax.generate` refuses inputs that cannot work with one line, before it loads
(let alone compiles) a model."""

import pytest

import dlmjax
from dlmjax.generate import main


@pytest.fixture
def no_model(monkeypatch):
    """Any attempt to load a model fails the test: the refusal must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the CLI loaded a model for an input it should refuse")

    monkeypatch.setattr(dlmjax, "load", refuse)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--prompt", "Sort: 7 3 9 1", "--gen-length", "0"], "error: --gen-length 0 is not a positive number of tokens"),
        (["--prompt", "Sort: 7 3 9 1", "--chat", "--gen-length", "-4"], "error: --gen-length -4 is not a positive number"),
        (["--prompt", "", "--chat"], "error: --prompt is empty; give some text to answer"),
        (["--prompt", "   ", "--method", "fast-dllm"], "error: --prompt is empty"),
        (["--prompt-ids", ""], "error: --prompt-ids is empty; give at least one token id"),
        (["--prompt-ids", " , "], "error: --prompt-ids is empty"),
    ],
)
def test_refused_with_one_line_before_loading(argv, message, no_model, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(message) and captured.err.count("\n") == 1, captured.err
