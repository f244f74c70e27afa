"""Pictures of a decode: which forward pass committed each token.

Every `lm.generate` output carries `trajectory` [B, gen_length], the (1-based) forward pass of the
row that committed each position (0: never committed, e.g. a row that stopped first). From it:

    from dlmjax import viz
    out = lm.generate("Sort: 7 3 9 1", method="fast-dllm", threshold=0.9)
    viz.trajectory(out, row=0, tokenizer=lm.tokenizer, path="decode.png")   # PNG (matplotlib)
    viz.trajectory(out, row=0, tokenizer=lm.tokenizer, path="decode.html")  # a page that replays it
    print(viz.terminal(out, row=0, tokenizer=lm.tokenizer))                 # what --show-trajectory prints

The PNG is the canvas as a grid of cells (the token, and the pass that committed it, on the
pass's colour), above a bar chart of tokens committed per pass; filler after the answer's stop
token is hatched and pale. The HTML file is self-contained (no script or font from elsewhere):
a slider and a play button step through the passes, masked positions shown as a grey box.
matplotlib is needed only for the PNG (`pip install -e ".[report]"`).
"""

from __future__ import annotations

import html
import json
import pathlib

import numpy as np

from dlmjax.errors import DlmjaxError

__all__ = ["Trajectory", "trajectory", "terminal", "from_output"]


class Trajectory:
    """One row of a decode, ready to draw: per position the token id, its text, the pass that
    committed it (0: never), and whether it is answer (up to and including the stop token) or
    filler after it."""

    def __init__(self, ids, steps, texts, answer_length: int, method: str = "", nfe: int | None = None):
        self.ids = np.asarray(ids, np.int64)
        self.steps = np.asarray(steps, np.int64)
        self.texts = list(texts)
        self.answer_length = int(answer_length)
        self.method = method
        self.nfe = int(nfe) if nfe is not None else int(self.steps.max(initial=0))

    @property
    def passes(self) -> int:
        """Forward passes that committed at least one token of the row's canvas."""
        return int(self.steps.max(initial=0))

    def per_pass(self) -> np.ndarray:
        """[passes] tokens committed at each pass (1..passes), answer and filler together."""
        return np.bincount(self.steps[self.steps > 0], minlength=self.passes + 1)[1:]


def _token_texts(ids, tokenizer) -> list[str]:
    if tokenizer is None:
        return [str(int(t)) for t in ids]
    texts = []
    for t in ids:
        s = tokenizer.decode([int(t)], skip_special_tokens=False)
        texts.append(s if s != "" else f"<{int(t)}>")
    return texts


def from_output(out, row: int = 0, tokenizer=None) -> Trajectory:
    """The `Trajectory` of `row` of a `GenerateOutput` (`lm.generate`'s result)."""
    if not hasattr(out, "trajectory") or not hasattr(out, "tokens"):
        raise DlmjaxError(f"viz needs lm.generate's output (a GenerateOutput), not {type(out).__name__}")
    if out.trajectory is None:
        raise DlmjaxError("this output has no trajectory; decode with lm.generate, which records it for every method")
    rows = out.tokens.shape[0]
    if not -rows <= row < rows:
        raise DlmjaxError(f"row {row} is outside the batch of {rows}; pass row=0..{rows - 1}")
    ids = np.asarray(out.tokens[row])
    steps = np.asarray(out.trajectory[row])
    length = int(out.lengths[row]) if getattr(out, "lengths", None) is not None else len(ids)
    method = _label(getattr(out, "method", None))
    nfe = int(out.nfe[row]) if getattr(out, "nfe", None) is not None else None
    return Trajectory(ids, steps, _token_texts(ids, tokenizer), length, method=method, nfe=nfe)


def _label(method) -> str:
    """A short name of the decode's parts: 'ar', or the rule and cache (e.g. 'threshold rule, dual cache')."""
    if method is None:
        return ""
    rule = getattr(getattr(method, "rule", None), "name", None)
    if rule is None:
        return "ar"
    cache = getattr(getattr(method, "cache", None), "name", "none")
    return f"{rule} rule" + (f", {cache} cache" if cache != "none" else "")


def _show(text: str) -> str:
    """A token's text as one visible cell: newlines and tabs as escapes, spaces as '·' at the ends."""
    text = text.replace("\n", "\\n").replace("\t", "\\t")
    stripped = text.strip(" ")
    if not stripped:
        return "·" * len(text) or "∅"
    if stripped != text:
        lead = len(text) - len(text.lstrip(" "))
        trail = len(text) - len(text.rstrip(" "))
        text = "·" * lead + stripped + "·" * trail
    return text


def terminal(out, row: int = 0, tokenizer=None, *, filler: bool = False, width: int = 100) -> str:
    """A compact text view: one line per forward pass that committed tokens, listing them as
    `position:token` in canvas order, then the answer and a summary. Filler after the stop token
    is left out unless `filler`."""
    t = out if isinstance(out, Trajectory) else from_output(out, row, tokenizer)
    keep = np.arange(len(t.ids)) < (len(t.ids) if filler else t.answer_length)
    lines = []
    digits = len(str(max(t.passes, 1)))
    for s in range(1, t.passes + 1):
        where = np.flatnonzero((t.steps == s) & keep)
        if where.size == 0:
            continue
        head = f"pass {s:>{digits}} +{where.size:<3}"
        body, used = [], len(head)
        for i in where:
            piece = f"{i}:{_show(t.texts[i])}"
            if used + len(piece) + 1 > width and body:
                body.append("…")
                break
            body.append(piece)
            used += len(piece) + 1
        lines.append(head + " " + " ".join(body))
    answer = "".join(t.texts[: t.answer_length])
    counts = t.per_pass()
    committed = int(np.sum(t.steps[keep] > 0))
    lines.append(f"answer: {answer!r}")
    lines.append(
        f"{committed} tokens ({t.answer_length} answer, stop included; {len(t.ids) - t.answer_length} filler) in "
        f"{t.passes} pass{'' if t.passes == 1 else 'es'} (nfe {t.nfe}); tokens per pass: mean {counts.mean() if counts.size else 0:.2f}, "
        f"max {counts.max(initial=0)}" + (f" [{t.method}]" if t.method else "")
    )
    return "\n".join(lines)


def _png(t: Trajectory, path: pathlib.Path | None, columns: int, title: str | None):
    try:
        import matplotlib

        if path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        from matplotlib import colors
    except ImportError:
        raise DlmjaxError('the PNG needs matplotlib: pip install -e ".[report]" (or write path="....html")') from None
    n = len(t.ids)
    rows = -(-n // columns)
    passes = max(t.passes, 1)
    cmap = plt.get_cmap("viridis")
    norm = colors.Normalize(vmin=1, vmax=max(passes, 2))
    fig = plt.figure(figsize=(min(2 + 0.62 * columns, 22), 1.6 + 0.5 * rows + 1.8))
    grid = fig.add_gridspec(2, 1, height_ratios=[max(rows, 1) * 0.5, 1.6], hspace=0.35)
    ax = fig.add_subplot(grid[0])
    for i in range(n):
        r, c = divmod(i, columns)
        s = int(t.steps[i])
        filler = i >= t.answer_length
        face = cmap(norm(s)) if s > 0 else (0.85, 0.85, 0.85, 1.0)
        ax.add_patch(plt.Rectangle((c, -r - 1), 1, 1, facecolor=face, edgecolor="white", linewidth=1.0,
                                   alpha=0.35 if filler else 1.0, hatch="//" if filler else None))
        light = s > 0 and norm(s) < 0.55 and not filler
        label = _show(t.texts[i])
        label = label if len(label) <= 6 else label[:5] + "…"
        ax.text(c + 0.5, -r - 0.42, label, ha="center", va="center", fontsize=8, color="white" if light else "black")
        ax.text(c + 0.5, -r - 0.85, str(s) if s else "–", ha="center", va="center", fontsize=5.5,
                color="white" if light else "dimgray")
    ax.set_xlim(0, columns)
    ax.set_ylim(-rows, 0)
    ax.set_aspect("auto")
    ax.axis("off")
    method = f"{t.method}: " if t.method else ""
    ax.set_title(title or f"{method}{t.answer_length} answer tokens (stop included) in {t.passes} pass{'' if t.passes == 1 else 'es'}, nfe {t.nfe}",
                 fontsize=10)
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, fraction=0.02, pad=0.01, label="pass")
    bars = fig.add_subplot(grid[1])
    counts = t.per_pass()
    answer = np.bincount(t.steps[: t.answer_length][t.steps[: t.answer_length] > 0], minlength=passes + 1)[1:]
    xs = np.arange(1, len(counts) + 1)
    bars.bar(xs, answer[: len(counts)], color=[cmap(norm(x)) for x in xs], label="answer")
    bars.bar(xs, counts - answer[: len(counts)], bottom=answer[: len(counts)], color="lightgray", hatch="//",
             label="filler")
    from matplotlib.ticker import MaxNLocator

    bars.yaxis.set_major_locator(MaxNLocator(integer=True))
    bars.xaxis.set_major_locator(MaxNLocator(integer=True))
    bars.set_xlabel("forward pass")
    bars.set_ylabel("tokens committed")
    bars.set_xlim(0.4, passes + 0.6)
    bars.legend(fontsize=7, loc="upper right")
    if path is not None:
        fig.savefig(path, dpi=130, bbox_inches="tight")
        plt.close(fig)
    return fig


_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
#canvas {{ display: flex; flex-wrap: wrap; gap: 3px; max-width: 64em; font-family: monospace; }}
.tok {{ padding: 2px 4px; border-radius: 3px; min-width: 1.2em; text-align: center; white-space: pre; }}
.mask {{ background: #ccc; color: #ccc; }}
.new {{ outline: 2px solid #d62728; }}
.filler {{ opacity: 0.45; }}
#info {{ margin: 0.8em 0; }}
</style></head><body>
<h3>{title}</h3>
<div><button id="play">play</button> pass <input id="pass" type="range" min="0" max="{passes}" value="{passes}">
<span id="at"></span></div>
<div id="info"></div>
<div id="canvas"></div>
<script>
const T = {data};
const canvas = document.getElementById("canvas"), slider = document.getElementById("pass");
const cells = T.texts.map((text, i) => {{
  const span = document.createElement("span");
  span.className = "tok" + (i >= T.answer_length ? " filler" : "");
  span.title = "position " + i + ", pass " + T.steps[i];
  canvas.appendChild(span);
  return span;
}});
function colour(s) {{
  const x = T.passes > 1 ? (s - 1) / (T.passes - 1) : 0;
  return "hsl(" + Math.round(260 - 200 * x) + ", 65%, " + Math.round(45 + 25 * x) + "%)";
}}
function show(p) {{
  let n = 0;
  cells.forEach((span, i) => {{
    const s = T.steps[i], on = s > 0 && s <= p;
    span.textContent = on ? T.texts[i] : "\\u2588";
    span.classList.toggle("mask", !on);
    span.classList.toggle("new", on && s === p);
    span.style.background = on ? colour(s) : "";
    span.style.color = on ? "#fff" : "";
    if (s === p) n += 1;
  }});
  document.getElementById("at").textContent = p + " / " + T.passes + (p ? " (" + n + " tokens this pass)" : "");
}}
slider.addEventListener("input", () => show(+slider.value));
let timer = null;
document.getElementById("play").addEventListener("click", () => {{
  if (timer) {{ clearInterval(timer); timer = null; return; }}
  let p = 0; show(0);
  timer = setInterval(() => {{ p += 1; slider.value = p; show(p); if (p >= T.passes) {{ clearInterval(timer); timer = null; }} }}, 350);
}});
document.getElementById("info").textContent = T.summary;
show(T.passes);
</script></body></html>
"""


def _html(t: Trajectory, title: str | None) -> str:
    summary = terminal(t).splitlines()[-1]
    data = {"texts": t.texts, "steps": t.steps.tolist(), "answer_length": t.answer_length, "passes": t.passes,
            "summary": summary}
    # </script> inside a token's text would end the script early: escape the slash
    payload = json.dumps(data).replace("</", "<\\/")
    name = title or (f"{t.method} decode" if t.method else "decode")
    return _PAGE.format(title=html.escape(name), passes=t.passes, data=payload)


def trajectory(out, row: int = 0, tokenizer=None, *, path=None, columns: int = 16, title: str | None = None):
    """Draw `row` of `out` (lm.generate's output). path ending .png (or None): a matplotlib figure,
    saved there if given, returned; .html: a self-contained page that replays the decode, written,
    its text returned. `tokenizer` (lm.tokenizer) shows tokens as text, else as ids; `columns`
    cells per line of the PNG."""
    suffix = pathlib.Path(path).suffix.lower() if path is not None else ".png"
    if suffix not in (".png", ".html", ".htm"):
        raise DlmjaxError(f"cannot draw a trajectory as {suffix or 'a file without a suffix'}; name a .png or .html path")
    if columns < 1:
        raise DlmjaxError(f"columns={columns} must be at least 1 cell per line")
    t = out if isinstance(out, Trajectory) else from_output(out, row, tokenizer)
    if suffix == ".png":
        target = pathlib.Path(path) if path is not None else None
        if target is None:
            return _png(t, None, columns, title)
        partial = target.with_name(target.name + ".partial.png")
        try:
            fig = _png(t, partial, columns, title)
            partial.replace(target)
        finally:
            partial.unlink(missing_ok=True)
        return fig
    page = _html(t, title)
    target = pathlib.Path(path)
    partial = target.with_name(target.name + ".partial")
    try:
        partial.write_text(page, encoding="utf-8")
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return page
