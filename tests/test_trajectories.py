"""Teacher trajectories (`dlmjax.train.trajectories`): the embedded tiny-llada's own answers in
fixed batches; a run killed between batches (and mid-line) resumes to the uninterrupted file; other
settings are refused; the training CLI takes only usable rows and refuses another tokenizer's
trajectories or a file without usable answers, before anything compiles."""

import json
import pathlib
import sys

import numpy as np
import pytest

import dlmjax
from dlmjax.errors import DlmjaxError
from dlmjax.train.cli import main as train_main
from dlmjax.train.cli import read_rows
from dlmjax.train.trajectories import check_for_training, generate_trajectories, main, read_header, tokenizer_fingerprint

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import tasks  # noqa: E402

PATTERN = "####([^\\n]*)"


@pytest.fixture(scope="module")
def lm():
    return dlmjax.load("tiny-llada", progress=False)


@pytest.fixture(scope="module")
def examples():
    return tasks.make_split("test", 10, seed=3)


def _run(lm, examples, out, **kw):
    settings = dict(method="llada", knobs={"steps": 16, "block_length": 16}, gen_length=32, batch_size=4, keep="correct",
                    answers=[e.answer for e in examples], answer_pattern=PATTERN, log=lambda s: None)
    return generate_trajectories(lm, [e.prompt for e in examples], out, **{**settings, **kw})


def test_trajectories_resume_to_the_uninterrupted_file(lm, examples, tmp_path):
    whole = tmp_path / "whole.jsonl"
    summary = _run(lm, examples, whole)
    assert summary["rows"] == 10 and summary["complete"]
    lines = whole.read_text().splitlines()
    header = read_header(whole)
    assert header["tokenizer"] == tokenizer_fingerprint(lm.tokenizer) and header["knobs"] == {"steps": 16, "block_length": 16}
    rows = [json.loads(line) for line in lines[1:]]
    assert [r["index"] for r in rows] == list(range(10))
    # the rows are the model's answers, checked against the references as the eval does
    direct = lm.generate([e.prompt for e in examples[:4]], method="llada", steps=16, block_length=16, gen_length=32, chat=True)
    assert [r["llm_response"] for r in rows[:4]] == list(direct.texts)
    for r, e in zip(rows, examples):
        assert r["correct"] == tasks.is_correct(e, r["llm_response"]) and r["usable"] == r["correct"]
        assert r["question"] == e.prompt and (r["finished"] or r["tokens"] == 32)
    assert 0 < sum(r["usable"] for r in rows) <= 10

    # killed after the first batch, in the middle of writing the second
    cut = tmp_path / "cut.jsonl"
    assert _run(lm, examples, cut, stop_after=1)["rows"] == 4
    with cut.open("a") as f:
        f.write(lines[5] + "\n" + lines[6][:20])  # one row of batch 2 and half a line
    resumed = _run(lm, examples, cut)
    assert resumed["complete"] and cut.read_text() == whole.read_text()
    assert _run(lm, examples, cut)["rows"] == 10  # complete: nothing is decoded again

    with pytest.raises(DlmjaxError, match="other settings \\(gen_length: 32 -> 48\\)"):
        _run(lm, examples, cut, gen_length=48)

    # training reads the usable rows only, with the official field names
    kept = read_rows(str(whole), "question", "llm_response")
    assert len(kept) == sum(r["usable"] for r in rows) and all(a for _, a in kept)
    assert check_for_training(whole, lm.tokenizer)["method"] == "llada"


def test_bad_trajectories_are_refused(lm, examples, tmp_path, capsys):
    with pytest.raises(DlmjaxError, match="keep='correct' needs the reference answers"):
        _run(lm, examples, tmp_path / "x.jsonl", answers=None)
    with pytest.raises(DlmjaxError, match="keep must be one of"):
        _run(lm, examples, tmp_path / "x.jsonl", keep="best")
    not_ours = tmp_path / "plain.jsonl"
    not_ours.write_text('{"prompt": "a", "answer": "b"}\n')
    with pytest.raises(DlmjaxError, match="is not a trajectory file"):
        _run(lm, examples, not_ours)
    assert check_for_training(not_ours, lm.tokenizer) is None  # plain data passes untouched

    # a file of another tokenizer, and one without usable answers: one line each from the training CLI
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"trajectories": {"model": "m", "tokenizer": tokenizer_fingerprint(lm.tokenizer), "keep": "finished"}}) + "\n"
                    + json.dumps({"index": 0, "question": "Sort: 3 1 2", "llm_response": "#### 1 2 3", "finished": False,
                                  "usable": False}) + "\n")
    other = tmp_path / "other.jsonl"
    other.write_text(good.read_text().replace(tokenizer_fingerprint(lm.tokenizer), "0123456789abcdef"))
    for path, message in [(other, "whose tokenizer differs from this model's"), (good, "has no usable answers: 1 trajectories, 0 finished")]:
        code = train_main(["model.name=tiny-llada", f"data.train={path}", "data.prompt_field=question",
                           "data.answer_field=llm_response", f"output={tmp_path / 'run'}", "train.objective=dparallel"])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_command_line(examples, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"question": e.prompt, "answer": e.answer}) + "\n" for e in examples[:3]))
    out = tmp_path / "t.jsonl"
    assert main(["--model", "tiny-llada", "--prompts", str(prompts), "--prompt-field", "question", "--out", str(out),
                 "--gen-length", "32", "--batch-size", "2", "--knob", "steps=16", "--knob", "block_length=16", "--keep", "all"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary == {"out": str(out), "rows": 3, "usable": 3, "finished": summary["finished"], "complete": True}
    assert read_header(out)["knobs"] == {"steps": 16, "block_length": 16}
    assert main(["--model", "tiny-llada", "--prompts", str(prompts), "--out", str(tmp_path / "u.jsonl"), "--keep", "correct"]) == 2
    assert "--keep correct needs --answer-field" in capsys.readouterr().err
    assert main(["--model", "tiny-llada", "--prompts", str(prompts), "--out", str(tmp_path / "u.jsonl")]) == 2
    assert "has no rows with 'prompt'" in capsys.readouterr().err
    assert not (tmp_path / "u.jsonl").exists()
    np.testing.assert_equal(len(out.read_text().splitlines()), 4)
