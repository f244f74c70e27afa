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


def tpu():
    md, code = nbformat.v4.new_markdown_cell, nbformat.v4.new_code_cell
    return [
        md(badge("tpu.ipynb") + """

# LLaDA-8B and Dream-7B on a TPU (or several GPUs) with a mesh

On a Colab TPU or a TPU VM (`pip install -e ".[tpu]"`), the decode runs sharded over a mesh of the
chips: parameters by the sharding preset's rules (`single`, `dp`, `fsdp`, `tp`, `fsdp_tp`), the
batch over the data axes. First the memory each chip needs, from shapes alone, then the models.
Under SMOKE (CI) the mesh is 8 simulated CPU devices and the model is `tiny-llada`."""),
        code(INSTALL + """
if SMOKE:  # 8 simulated devices; must be set before jax starts
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + ' --xla_force_host_platform_device_count=8'"""),
        code("""import jax
import dlmjax
from dlmjax.sharding import ShardingRules, make_mesh
print(jax.devices())
n = jax.device_count()
mesh_text = {8: "data=2,tensor=4", 4: "tensor=4", 1: "data=1"}.get(n, f"data={n}")
if SMOKE:  # tiny-llada's 5 heads do not split over tensor=4: its embedding does over fsdp
    mesh_text = "data=2,fsdp=4"
print("mesh:", mesh_text)"""),
        md("""## Memory first

`dlmjax.memory.decode_memory` sizes a decode per device from the model's config, before any weight
is downloaded: parameters as the preset shards them, the KV cache, the loop state and the largest
activations of a step."""),
        code("""import json, pathlib
from dlmjax.config import from_hf_config
from dlmjax.memory import decode_memory

def hf_config(repo, local):
    for path in [pathlib.Path(f"../configs/{local}/config.json"), pathlib.Path(f"experiments/configs/{local}/config.json")]:
        if path.is_file():
            return json.loads(path.read_text())
    from huggingface_hub import hf_hub_download  # online: the config only (a few KB)
    return json.loads(pathlib.Path(hf_hub_download(repo, "config.json")).read_text())

mesh = make_mesh(mesh_text)
for repo, local in [("GSAI-ML/LLaDA-8B-Instruct", "llada-8b"), ("Dream-org/Dream-v0-Instruct-7B", "dream-7b")]:
    try:
        cfg = from_hf_config(hf_config(repo, local))
    except Exception as e:  # offline outside the repository
        print(f"{repo}: no config ({type(e).__name__}); skipped")
        continue
    for preset in ("fsdp", "tp", "fsdp_tp"):
        est = decode_memory(cfg, dtype="bfloat16", batch=8, prompt_length=256, gen_length=256, block_length=32,
                            cache="dual", mesh=mesh, rules=ShardingRules.preset(preset), platform="tpu")
        print(f"{repo:32s} {preset:8s} parameters {est.parameters / 2**30:5.2f} GiB  cache {est.cache / 2**30:5.2f} GiB  "
              f"peak {est.total / 2**30:5.2f} GiB per device")"""),
        md("""## Decode on the mesh

The same `lm.generate` as on one device: the model loads onto the mesh (each chip reads only its
shards), the whole decode is still one program, and the tokens equal one device's."""),
        code("""from dlmjax.errors import DlmjaxError
name = "tiny-llada" if SMOKE else "GSAI-ML/LLaDA-8B-Instruct"
try:
    lm = dlmjax.load(name, mesh=mesh, rules=ShardingRules.preset("fsdp_tp"))
except DlmjaxError as e:  # offline or too small a machine: what to download or change, no traceback
    raise SystemExit(f"{name}: {e}")
prompts = ["Sort: 7 3 9 1 4 2"] * 4 if SMOKE else ["What is the capital of France? Answer in one word."] * 4
kw = dict(chat=True, method="fast-dllm", threshold=0.9, cache="dual", block_length=16 if SMOKE else 32,
          gen_length=32 if SMOKE else 256)
out = lm.generate(prompts, **kw)
print(out.texts[0], "| nfe", out.nfe.tolist(), f"| {out.seconds:.2f} s")
if SMOKE:  # the sharded decode equals one device's
    one = dlmjax.load(name).generate(prompts, **kw)
    assert (one.tokens == out.tokens).all()"""),
        code("""if SMOKE:
    print("Dream-7B: skipped under SMOKE (CI is offline)")
else:
    try:
        dream = dlmjax.load("Dream-org/Dream-v0-Instruct-7B", mesh=mesh, rules=ShardingRules.preset("fsdp_tp"))
    except DlmjaxError as e:
        raise SystemExit(f"Dream-7B: {e}")
    out = dream.generate(["Write a haiku about TPUs."], chat=True, method="dream", gen_length=128, steps=128,
                         alg="entropy", temperature=0.2, top_p=0.95)
    print(out.texts[0])"""),
    ]


def distill():
    md, code = nbformat.v4.new_markdown_cell, nbformat.v4.new_code_cell
    return [
        md(badge("distill.ipynb") + """

# Distil a tiny dLLM with D2F, on a CPU, in minutes

D2F (discrete diffusion forcing) trains a LoRA adapter so that a bidirectional dLLM decodes
block-causally, with later blocks started before earlier ones finish. Here: `tiny-llada`, the
trainer (`python -m dlmjax.train`'s `run`, the same as a TPU pod's run, on one CPU), the adapter
saved as a PEFT adapter, then the speed-up measured against the undistilled model. A few hundred
steps take minutes; the recipe at full length is `experiments/configs/tiny-d2f.yaml`. SMOKE (CI):
two steps, eight problems."""),
        code(INSTALL + """
import pathlib, subprocess
# the task suite lives in the repository: a checkout named by DLMJAX_REPO_DIR, the one this notebook
# sits in, or (Colab) a fresh clone
roots = [os.environ.get("DLMJAX_REPO_DIR", ""), ".", "../.."]
root = next((pathlib.Path(r) for r in roots if r and (pathlib.Path(r) / "experiments" / "tasks.py").is_file()), None)
if root is None:
    repo = os.environ.get("DLMJAX_REPO", "dlmjax/dlmjax")
    clone = subprocess.run(["git", "clone", "-q", "--depth", "1", f"https://github.com/{repo}.git", "dlmjax-repo"],
                           capture_output=True, text=True)
    if clone.returncode:  # offline: say what to fetch, no traceback
        raise SystemExit(f"this notebook needs the dlmjax repository's task suite: clone https://github.com/{repo} "
                         "and set DLMJAX_REPO_DIR to it (git said: " + clone.stderr.strip().splitlines()[-1] + ")")
    root = pathlib.Path("dlmjax-repo")
os.chdir(root)"""),
        code("""import json, sys, tempfile
sys.path.insert(0, "experiments")
import tasks  # the task suite the tiny models were trained on

work = pathlib.Path(tempfile.mkdtemp(prefix="distill-"))
train_rows = tasks.make_split("train", 64 if SMOKE else 20000, 0, "v1")
test = tasks.make_split("test", 8 if SMOKE else 128, 0, "v1")
(work / "train.jsonl").write_text("".join(json.dumps({"prompt": e.prompt, "answer": e.answer}) + "\\n" for e in train_rows))
print(len(train_rows), "training rows in", work)"""),
        md("""## Train the adapter

D2F's objective (`dlmjax/train/d2f.py`): the student (adapter on, block-causal attention with the
prompt as one block) learns the teacher's (adapter off, full attention) predictions on monotone
per-block mask ratios; the teacher is the same weights, not a second copy."""),
        code("""from dlmjax.train.cli import parse_config, run
config = f'''
model: {{name: tiny-llada, dtype: float32}}
data: {{train: {work / 'train.jsonl'}, prompt_length: 32, gen_length: 32}}
train: {{objective: d2f, steps: {2 if SMOKE else 300}, batch_size: 16, learning_rate: 1.0e-3, schedule: constant,
        warmup_steps: 0, save_every: 100, log_every: 25}}
lora: {{rank: 16, alpha: 16, dropout: 0.1, targets: [q_proj, k_proj, v_proj, attn_out]}}
output: {work / 'run'}
'''
summary = run(parse_config(config, []))
adapter = summary["final"]
print(summary)"""),
        md("""## The speed-up

The same test problems decoded by the undistilled model (LLaDA one token per pass; Fast-dLLM with
the dual cache) and by the distilled one (D2F's pipelined decoding); accuracy, forward passes and
tokens/s (measured after a warm-up call, so compilation is excluded)."""),
        code("""import numpy as np
import dlmjax

base = dlmjax.load("tiny-llada", progress=False)
student = dlmjax.load("tiny-llada", adapter=adapter, progress=False)
prompts = [e.prompt for e in test]

def measure(lm, **knobs):
    lm.generate(prompts, chat=True, **knobs)  # compiles
    out = lm.generate(prompts, chat=True, **knobs)
    accuracy = np.mean([tasks.is_correct(e, t) for e, t in zip(test, out.texts)])
    return accuracy, float(np.mean(out.nfe)), float(np.sum(out.lengths)) / out.seconds

rows = {
    "base, LLaDA (1 token/pass)": measure(base, method="llada", steps=32, block_length=32),
    "base, Fast-dLLM dual 0.9": measure(base, method="fast-dllm", threshold=0.9, block_length=16, cache="dual"),
    "base, D2F": measure(base, method="d2f", block_length=16),
    "distilled, D2F": measure(student, method="d2f", block_length=16),
}
for name, (acc, nfe, tps) in rows.items():
    print(f"{name:28s} accuracy {acc:6.1%}  passes {nfe:5.1f}  {tps:7.1f} tokens/s")"""),
    ]


NOTEBOOKS = {"quickstart.ipynb": quickstart, "tpu.ipynb": tpu, "distill.ipynb": distill}


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
