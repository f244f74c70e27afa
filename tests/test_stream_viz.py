"""Streaming (`lm.stream`, `--stream`) and trajectory pictures (`dlmjax.viz`, `--show-trajectory`)
on the embedded tiny-llada."""

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import dlmjax
from dlmjax import viz
from dlmjax.errors import DlmjaxError

PROMPTS = ["Sort: 7 3 9 1 4 2", "Reverse: 5 2 8 1 6"]


@pytest.fixture(scope="module")
def lm():
    return dlmjax.load("tiny-llada", progress=False)


# The streaming callback is the same for every schedule and cache; these two cover semi-AR blocks
# and D2F's pipeline (blocks added and finished out of step). The other tests reuse LLADA's programs.
LLADA = dict(method="llada", steps=16, block_length=8)
METHODS = {"llada semi-AR": LLADA, "d2f": dict(method="d2f", block_length=8)}


@pytest.mark.parametrize("name", list(METHODS))
def test_stream_gives_generates_tokens_block_by_block(lm, name):
    """The streamed decode is lm.generate's (tokens, NFE, trajectory equal); each update's text
    extends the previous one, the deltas add up to the final text, each update's tokens are a
    prefix of the final answer, and updates come only when a row's text or done flag changes."""
    kwargs = dict(METHODS[name], chat=True)
    want = lm.generate(PROMPTS, **kwargs)
    updates = list(lm.stream(PROMPTS, **kwargs))
    last = updates[-1]
    assert last.final and all(not u.final for u in updates[:-1])
    out = last.output
    np.testing.assert_array_equal(out.tokens, want.tokens)
    np.testing.assert_array_equal(out.nfe, want.nfe)
    np.testing.assert_array_equal(out.trajectory, want.trajectory)
    assert out.texts == want.texts and last.texts == want.texts
    assert len(updates) >= 2  # at least one block arrived before the end
    for row in range(len(PROMPTS)):
        final = [int(t) for t in want.tokens[row][: want.lengths[row]]]
        texts = [u.texts[row] for u in updates]
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:])), texts
        assert "".join(u.deltas[row] for u in updates) == want.texts[row]
        for u in updates:
            assert u.tokens[row] == final[: len(u.tokens[row])]
    steps = [u.step for u in updates[:-1]]
    assert steps == sorted(set(steps)) and steps[-1] <= want.steps
    for a, b in zip(updates[:-1], updates[1:-1]):
        assert a.tokens != b.tokens or not np.array_equal(a.done, b.done)


def test_stream_every_step_shows_the_canvas_filling(lm):
    """every="step": one update per forward pass; the canvas's masks only go, each committed
    position keeps its token and its pass from then on, and the last canvas is the answer."""
    kwargs = dict(LLADA, chat=True)
    want = lm.generate(PROMPTS, **kwargs)
    updates = list(lm.stream(PROMPTS, every="step", **kwargs))
    assert [u.step for u in updates[:-1]] == list(range(1, want.steps + 1))
    mask = lm.config.mask_token_id
    masked = [int(np.sum(u.canvas == mask)) for u in updates]
    assert masked == sorted(masked, reverse=True) and masked[-1] == 0 and masked[0] < want.tokens.size
    for u in updates:
        committed = u.canvas != mask
        np.testing.assert_array_equal(u.canvas[committed], want.tokens[committed])
        np.testing.assert_array_equal(u.trajectory[committed], want.trajectory[committed])
        assert (u.trajectory[~committed] == 0).all()


def test_stream_stopped_early_and_bad_input(lm):
    """A consumer that stops after the first update leaves nothing behind (the next stream and
    generate work); bad arguments raise one line at the first next(), before compiling."""
    kwargs = dict(LLADA, chat=True)
    first = next(iter(lm.stream(PROMPTS, **kwargs)))
    assert not first.final
    assert list(lm.stream(PROMPTS, **kwargs))[-1].texts == lm.generate(PROMPTS, **kwargs).texts
    assert not lm._stream_hub._queues  # every stream closed
    with pytest.raises(DlmjaxError, match="every='blocks' is not a streaming cadence"):
        next(iter(lm.stream(PROMPTS, every="blocks")))
    with pytest.raises(DlmjaxError, match="threshold"):
        next(iter(lm.stream(PROMPTS, method="fast-dllm", threshold=1.5)))


def test_viz_terminal_png_and_html(lm, tmp_path):
    """The terminal view lists every committed answer token once, at its pass; the PNG and the
    HTML page are written whole (the page's data is the trajectory); bad input is one line."""
    out = lm.generate(PROMPTS, **LLADA, chat=True)
    text = viz.terminal(out, row=1, tokenizer=lm.tokenizer)
    listed = {}
    for line in text.splitlines():
        m = re.match(r"pass\s+(\d+) \+(\d+)\s+(.*)", line)
        if m:
            cells = m[3].split(" ")
            assert len(cells) == int(m[2])
            for cell in cells:
                position = int(cell.split(":")[0])
                assert position not in listed
                listed[position] = int(m[1])
    length = int(out.lengths[1])
    assert listed == {i: int(out.trajectory[1][i]) for i in range(length)}
    assert f"{length} answer, stop included" in text.splitlines()[-1]
    answer = "".join(lm.tokenizer.decode([int(t)], skip_special_tokens=False) for t in out.tokens[1][:length])
    assert text.splitlines()[-2] == f"answer: {answer!r}"

    png = viz.trajectory(out, row=0, tokenizer=lm.tokenizer, path=tmp_path / "t.png")
    assert png is not None and (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = viz.trajectory(out, row=0, tokenizer=lm.tokenizer, path=tmp_path / "t.html")
    assert (tmp_path / "t.html").read_text(encoding="utf-8") == page
    data = json.loads(re.search(r"const T = (.*);\n", page)[1].replace("<\\/", "</"))
    assert data["steps"] == out.trajectory[0].tolist() and data["passes"] == int(out.trajectory[0].max())
    assert data["texts"] == [lm.tokenizer.decode([int(t)], skip_special_tokens=False) for t in out.tokens[0]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.html", "t.png"]  # no partial files

    with pytest.raises(DlmjaxError, match="name a .png or .html path"):
        viz.trajectory(out, path=tmp_path / "t.svg")
    with pytest.raises(DlmjaxError, match="row 5 is outside the batch of 2"):
        viz.terminal(out, row=5)
    with pytest.raises(DlmjaxError, match="GenerateOutput"):
        viz.terminal(np.zeros((2, 3)))
    assert not (tmp_path / "t.svg").exists()


@pytest.mark.skipif(shutil.which("node") is None, reason="node runs the page's script")
def test_html_page_replays_the_decode(lm, tmp_path):
    """The page's script, run by node against a minimal DOM: at pass p it shows exactly the tokens
    committed by then, marks those of pass p, and masks the rest."""
    out = lm.generate(PROMPTS, **LLADA, chat=True)
    page = viz.trajectory(out, tokenizer=lm.tokenizer, path=tmp_path / "t.html")
    script = re.search(r"<script>\n(.*)</script>", page, re.S)[1]
    dom = """
class El { constructor(id) { this.id = id; this.children = []; this.textContent = ""; this.className = "";
  this.style = {}; this.title = ""; this.value = "0"; this.handlers = {};
  const self = this; this.classList = { set: new Set(), toggle(c, on) { on ? this.set.add(c) : this.set.delete(c); } }; }
  appendChild(c) { this.children.push(c); } addEventListener(k, f) { this.handlers[k] = f; } }
const els = {}; const document = { getElementById(id) { return els[id] || (els[id] = new El(id)); },
  createElement() { return new El(); } };
"""
    probe = """
const report = [];
for (let p = 0; p <= T.passes; p++) { els["pass"].value = String(p); els["pass"].handlers.input();
  report.push(els["canvas"].children.map(c => [c.textContent, c.classList.set.has("mask"), c.classList.set.has("new")])); }
console.log(JSON.stringify({report, at: els["at"].textContent}));
"""
    (tmp_path / "run.js").write_text(dom + script + probe, encoding="utf-8")
    run = subprocess.run(["node", str(tmp_path / "run.js")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    steps = out.trajectory[0]
    texts = [lm.tokenizer.decode([int(t)], skip_special_tokens=False) for t in out.tokens[0]]
    for p, cells in enumerate(got["report"]):
        for i, (shown, masked, new) in enumerate(cells):
            on = 0 < steps[i] <= p
            assert masked == (not on) and new == (on and steps[i] == p)
            if on:
                assert shown == texts[i]
    assert got["at"].startswith(f"{int(steps.max())} / {int(steps.max())}")


def test_cli_stream_and_show_trajectory(lm):
    """--stream prints what lm.generate answers and --show-trajectory the pass view after it;
    --stream with --json is refused in one line, before the model loads."""
    flags = ["--method", "llada", "--steps", "16", "--block-length", "8"]
    base = [sys.executable, "-m", "dlmjax.generate", "--prompt", PROMPTS[0], "--chat", *flags]
    want = lm.generate(PROMPTS[:1], **LLADA, chat=True)
    streamed = subprocess.run(base + ["--stream", "--show-trajectory"], capture_output=True, text=True)
    assert streamed.returncode == 0, streamed.stderr
    lines = streamed.stdout.splitlines()
    assert lines[0] == want.texts[0]
    assert lines[1:] == viz.terminal(want, tokenizer=lm.tokenizer).splitlines()
    bad = subprocess.run(base + ["--stream", "--json"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --stream") and "Traceback" not in bad.stderr


def test_stream_autoregressive_model():
    """tiny-ar streams too: a callback every 16 tokens (or when a row stops), or every token; the
    tokens equal lm.generate's and the texts grow by their deltas."""
    ar = dlmjax.load("tiny-ar", progress=False)
    want = ar.generate(PROMPTS, chat=True)
    updates = list(ar.stream(PROMPTS, chat=True))
    np.testing.assert_array_equal(updates[-1].output.tokens, want.tokens)
    for row in range(len(PROMPTS)):
        assert "".join(u.deltas[row] for u in updates) == want.texts[row]
        for u in updates:
            assert u.tokens[row] == [int(t) for t in want.tokens[row][: len(u.tokens[row])]]
    steps = list(ar.stream(PROMPTS, chat=True, every="step"))
    assert [u.step for u in steps[:-1]] == list(range(2, want.steps + 1))  # after each model call past the prefill
    assert [len(u.tokens[0]) for u in steps[:-1]] == sorted(len(u.tokens[0]) for u in steps[:-1])
