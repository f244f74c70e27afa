"""The task suites (experiments/tasks.py): v1 as the embedded models were trained on it, and v2
(64-token canvas, dependent chains next to parallel parts): every answer is right by
construction, fits its canvas, the splits are disjoint, and v2's tokenizer gives v1 texts the
same ids."""

import hashlib
import json
import pathlib
import re
import sys

import pytest

from dlmjax.tokenizer import load_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import tasks  # noqa: E402


def test_v1_is_unchanged():
    """The embedded tiny models were trained and scored on these exact splits."""
    digest = hashlib.md5(repr(tasks.make_split("test", 2000)).encode()).hexdigest()
    assert digest == "95d70aaf9399aa2d1c341f69400a472e"
    assert hashlib.md5(repr(tasks.make_split("train", 3000)).encode()).hexdigest() == "097a4dcf159693ab911f6ce9cb387523"
    embedded = load_tokenizer(ROOT / "dlmjax" / "models" / "tiny-llada")
    assert tasks.build_vocab("v1") == [p for p, _ in sorted(embedded.get_vocab().items(), key=lambda kv: kv[1])][: len(tasks.build_vocab())]


def _check_equations(answer: str) -> list[int]:
    """Each 'a+b=c.' step's arithmetic is right; returns the results in order."""
    results = []
    for a, op, b, c in re.findall(r"(\d+)([+\-*])(\d+)=(\d+)\.", answer):
        a, b, c = int(a), int(b), int(c)
        assert c == {"+": a + b, "-": a - b, "*": a * b}[op], answer
        results.append(c)
    return results


@pytest.fixture(scope="module")
def v2_tokenizer(tmp_path_factory):
    return load_tokenizer(tasks.write_tokenizer(tmp_path_factory.mktemp("v2"), 256, "v2"))


def test_v2_answers_are_right_and_fit_the_canvas(v2_tokenizer):
    test = tasks.make_split("test", 3000, suite="v2")
    kinds = {e.kind for e in test}
    assert kinds == {"arith2", "add", "sort", "reverse"}
    for e in test:
        assert tasks.is_correct(e, e.answer) and e.answer.endswith(f"#### {e.final}")
        prompt = tasks.encode_prompt(v2_tokenizer, e.prompt)
        answer = v2_tokenizer.encode(e.answer, add_special_tokens=False)
        assert len(prompt) <= 64 and len(answer) + 1 <= 64, e  # the answer and its EOS fill the 64-token canvas
        assert v2_tokenizer.decode(answer) == e.answer and v2_tokenizer.decode(v2_tokenizer.encode(e.prompt, add_special_tokens=False)) == e.prompt  # no unknown word
        if e.kind == "add":
            digits = [int(d) for d in e.prompt.split(":")[1].split()]
            results = _check_equations(e.answer)
            assert 4 <= len(digits) <= 7 and results[-1] == sum(digits) == int(e.final) and len(results) == len(digits) - 1
            # a chain: each step starts from the previous result
            assert [int(s.split("+")[0]) for s in e.answer.split(" ####")[0].split(". ")[1:]] == results[:-1]
        elif e.kind == "arith2":
            results = _check_equations(e.answer)
            assert 5 <= len(results) <= 6 and e.prompt.count(" has ") == 2
            last = re.findall(r"(\d+)\+(\d+)=(\d+)\.", e.answer)[-1]
            assert int(last[2]) == int(e.final) and int(last[0]) in results[:-1] and int(last[1]) in results[:-1]
        else:
            digits = e.prompt.split(":")[1].split()
            assert 6 <= len(digits) <= 10
            assert e.final.split() == (sorted(digits) if e.kind == "sort" else digits[::-1])
    # train and test never share a prompt; both are deterministic
    train = tasks.make_split("train", 3000, suite="v2")
    assert not {e.prompt for e in train} & {e.prompt for e in tasks.make_split("test", 10_000, suite="v2")}
    assert train[:50] == tasks.make_split("train", 50, suite="v2")


def test_v2_tokenizer_keeps_v1_ids(v2_tokenizer, tmp_path):
    v1 = load_tokenizer(tasks.write_tokenizer(tmp_path / "v1", 256))
    for e in tasks.make_split("test", 200):
        assert v2_tokenizer.encode(e.prompt + " " + e.answer) == v1.encode(e.prompt + " " + e.answer)
    assert v2_tokenizer.convert_ids_to_tokens(v2_tokenizer.encode("Add: 3 4")) == ["Add", ":", " ", "3", " ", "4"]
    assert v1.encode("Add") != v2_tokenizer.encode("Add")  # v1 has no such word
    with pytest.raises(ValueError, match="suite must be one of"):
        tasks.make_split("test", 1, suite="v3")


def test_the_diagnosis_variants(v2_tokenizer, tmp_path):
    """experiments/v2_diagnosis.py's continuation data: "anchored" is v2's problems with each chain
    opened by its person's name, "long-arith" one person's problems of 4 to 6 steps; both fit the
    canvas, are right by construction, keep the eval problems out of training, and leave tasks as it was."""
    import v2_diagnosis

    v2 = tasks.make_split("test", 300, suite="v2")
    with v2_diagnosis.variant("v2") as suite:
        assert tasks.make_split("test", 300, suite=suite) == v2
    with v2_diagnosis.variant("anchored") as suite:
        anchored = tasks.make_split("test", 300, suite=suite)
    assert [e.prompt for e in anchored] == [e.prompt for e in v2]
    for a, e in zip(anchored, v2):
        if e.kind == "arith2":
            first, second = e.prompt.split(" ")[0], re.search(r"\. (\w+) has ", e.prompt).group(1)
            assert a.answer.startswith(f"{first}:") and f" {second}:" in a.answer and a.final == e.final
            assert re.sub(r"\w+:", "", a.answer) == e.answer  # the names are all that is added
        else:
            assert a == e
    with v2_diagnosis.variant("long-arith") as suite:
        long = tasks.make_split("test", 300, suite=suite)
    assert tasks.make_split("test", 300, suite="v2") == v2 and "x" not in tasks.SUITES  # restored
    arith = [e for e in long if e.kind == "arith"]
    assert {e.kind for e in long} == {"arith", "add", "sort", "reverse"} and arith
    for e in anchored + long:
        answer = v2_tokenizer.encode(e.answer, add_special_tokens=False)
        assert tasks.is_correct(e, e.answer) and len(answer) + 1 <= 64 and v2_tokenizer.decode(answer) == e.answer
    assert all(4 <= len(_check_equations(e.answer)) <= 6 for e in arith)

    v2_diagnosis.main(["data", "long-arith", str(tmp_path / "long"), "--train-examples", "500"])
    rows = [json.loads(line) for line in (tmp_path / "long" / "train.jsonl").read_text().splitlines()]
    held = [json.loads(line) for line in (tmp_path / "long" / "eval.jsonl").read_text().splitlines()]
    assert len(rows) == 500 and len(held) == 64 and not {r["prompt"] for r in rows} & {r["prompt"] for r in held}
