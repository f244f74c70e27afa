"""Writes the notebooks of this folder from the cells below (the .ipynb files are committed without
outputs; edit here and rerun, so that reviews read Python, not JSON):

    python experiments/notebooks/make_notebooks.py

tests/test_notebooks.py executes every notebook here with SMOKE=1 (short and offline) and checks
that the committed files are what this script writes.
"""

from __future__ import annotations

import pathlib
import sys

import nbformat

HERE = pathlib.Path(__file__).resolve().parent
REPO = "dlmjax/dlmjax"  # the GitHub repository the badge and the install cell point at

INSTALL = f"""\
# Installs dlmjax from the repository when it is not installed yet (Colab); set DLMJAX_REPO for a fork.
import importlib.util, os
if importlib.util.find_spec("dlmjax") is None:
    repo = os.environ.get("DLMJAX_REPO", "{REPO}")
    %pip install -q "dlmjax[report] @ git+https://github.com/{{repo}}.git"
SMOKE = bool(os.environ.get("SMOKE"))  # CI runs every notebook with SMOKE=1: short, and offline"""


def badge(name: str) -> str:
    url = f"https://colab.research.google.com/github/{REPO}/blob/main/experiments/notebooks/{name}"
    return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"


def quickstart():
    md, code = nbformat.v4.new_markdown_cell, nbformat.v4.new_code_cell
    return [
        md(badge("quickstart.ipynb") + """

# dlmjax quickstart

Load the embedded `tiny-llada` (a 1.4M-parameter LLaDA trained here on a toy task suite), decode with every
method, look at which forward pass committed each token, stream an answer, and read the
quality-vs-speed report. The same cells run on LLaDA-8B-Instruct at the end (a GPU or TPU, and the
Hugging Face hub)."""),
        code(INSTALL),
        code("""\
import dlmjax
from dlmjax import viz

lm = dlmjax.load("tiny-llada")
prompts = ["Sort: 7 3 9 1 4 2", "Mia has 7 apples. She buys 5 more. She gives away 3. How many now?"]
out = lm.generate(prompts, chat=True, method="fast-dllm", threshold=0.9, block_length=16)
for text, nfe in zip(out.texts, out.nfe):
    print(f"{nfe:3d} passes  {text}")"""),
        md("""## Every method

Each preset is a composition of a commit rule, a block schedule, an exit rule and a cache policy
(`dlmjax/decode/SPEC.md`); thresholds and the like are traced, so changing them does not
recompile."""),
        code("""\
methods = {
    "llada": dict(method="llada", steps=32, block_length=16),
    "fast-dllm (dual cache)": dict(method="fast-dllm", threshold=0.9, block_length=16, cache="dual"),
    "dparallel": dict(method="dparallel", threshold=0.5, block_length=16),
    "sched": dict(method="sched", steps=32, block_length=16),
    "prophet": dict(method="prophet", steps=32, block_length=16),
    "d2f": dict(method="d2f", block_length=16),
}
if SMOKE:  # CI: three of them
    methods = dict(list(methods.items())[:3])
results = {}
for name, knobs in methods.items():
    results[name] = lm.generate(prompts, chat=True, **knobs)
    o = results[name]
    print(f"{name:24s} nfe {list(map(int, o.nfe))}  {o.texts}")"""),
        md("""## Which pass committed each token

`viz.trajectory` draws the canvas coloured by the forward pass that committed each token (filler
after the answer's stop token hatched), above the tokens committed per pass; with a `.html` path
it writes a page that replays the decode. `viz.terminal` is the text view the CLI prints with
`--show-trajectory`."""),
        code("""\
llada = results["llada"]
print(viz.terminal(llada, row=1, tokenizer=lm.tokenizer))
viz.trajectory(llada, row=1, tokenizer=lm.tokenizer);"""),
        code("""\
from IPython.display import HTML
HTML(viz.trajectory(results["fast-dllm (dual cache)"], row=1, tokenizer=lm.tokenizer, path="trajectory.html"))"""),
        md("## Streaming: the answer as its blocks complete"),
        code("""\
for update in lm.stream(prompts[1:], chat=True, method="llada", steps=32, block_length=8):
    print(f"pass {update.step:2d}: {update.texts[0]!r}")
assert update.output.texts == lm.generate(prompts[1:], chat=True, method="llada", steps=32, block_length=8).texts"""),
        md("""## The quality-vs-speed report

`python experiments/report_v2.py --suite v1` sweeps every method along its knob on the task suite
and draws accuracy against forward passes and against tokens/s (the committed figure below)."""),
        code("""\
import pathlib
from IPython.display import Image, display
figure = next((p for p in [pathlib.Path("../results/pareto-v1-nfe.png"), pathlib.Path("experiments/results/pareto-v1-nfe.png")]
               if p.is_file()), None)
if figure is not None:
    display(Image(filename=str(figure)))
else:
    print("the report's figure is in the repository: experiments/results/pareto-v1-nfe.png")"""),
        md("""## The same on LLaDA-8B-Instruct

Needs the Hugging Face hub (about 16 GB of weights, converted once) and an accelerator; skipped
offline and under SMOKE."""),
        code("""\
if SMOKE:
    print("skipped under SMOKE (CI is offline)")
else:
    from dlmjax.errors import DlmjaxError
    try:
        big = dlmjax.load("GSAI-ML/LLaDA-8B-Instruct")
    except DlmjaxError as e:  # offline, or not enough memory: the reason in one line
        print(f"skipped: {e}")
    else:
        out = big.generate(["What is 2+3? Answer briefly."], chat=True, method="fast-dllm", gen_length=128,
                           block_length=32, threshold=0.9, cache="dual")
        print(out.texts[0], out.nfe)
        viz.trajectory(out, tokenizer=big.tokenizer);"""),
    ]


NOTEBOOKS = {"quickstart.ipynb": quickstart}


def build(name: str) -> str:
    nb = nbformat.v4.new_notebook()
    nb.cells = NOTEBOOKS[name]()
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"{pathlib.Path(name).stem}-{i}"
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                   "language_info": {"name": "python"}, "accelerator": "GPU", "colab": {"provenance": []}}
    return nbformat.writes(nb) + "\n"


def main() -> int:
    for name in NOTEBOOKS:
        (HERE / name).write_text(build(name), encoding="utf-8")
        print(f"wrote {HERE / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
