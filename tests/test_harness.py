"""dlmjax as an lm-evaluation-harness model, through the real lm-eval command line on local YAML
tasks built from the tiny task suite (no hub), and LLaDA's Monte Carlo likelihood against a NumPy
computation on full logits."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("lm_eval")

import dlmjax  # noqa: E402
from dlmjax import harness  # noqa: E402
from dlmjax.errors import DlmjaxError  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))
import tasks  # noqa: E402

KNOBS = dict(method="fast-dllm", threshold=0.9, block_length=16, gen_length=32)
GEN_TASK = """\
task: dlmjax_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{final}}}}"
generation_kwargs:
  until: ["<|eos|>"]
filter_list:
  - name: final
    filter:
      - function: regex
        regex_pattern: "####\\\\s*([^\\\\n]*\\\\S)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
MC_TASK = """\
task: dlmjax_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
target_delimiter: ""
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def _problems(n):
    examples = [e for e in tasks.make_split("test", 64, 0, "v1") if e.kind == "sort"][:n]
    rows = []
    for i, e in enumerate(examples):
        values = e.final.split()
        wrong = [" ".join(reversed(values)), " ".join(values[1:] + values[:1])]
        choices = [f"#### {e.final}", *(f"#### {w}" for w in wrong if w != e.final)]
        rows.append(dict(prompt=e.prompt, final=e.final, choices=choices, label=0))
    return examples, rows


@pytest.fixture(scope="module")
def lm():
    return dlmjax.load("tiny-llada", progress=False)


def test_lm_eval_cli_matches_our_accuracy(lm, tmp_path):
    """`dlmjax-lm-eval` (lm-eval's own CLI) with --apply_chat_template on a generation task and a
    multiple-choice task: the generation accuracy equals ours with lm.generate on the same
    problems, and the multiple-choice accuracy equals the argmax of our model's likelihoods."""
    examples, rows = _problems(12)
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "gen.yaml").write_text(GEN_TASK.format(data=data))
    (tmp_path / "tasks" / "mc.yaml").write_text(MC_TASK.format(data=data))
    args = ",".join(f"{k}={v}" for k, v in dict(model="tiny-llada", **KNOBS, mc_num=8, mc_batch_size=4).items())
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "-m", "dlmjax.harness", "run", "--model", "dlmjax", "--model_args", args,
                          "--tasks", "dlmjax_tiny_gen", "dlmjax_tiny_mc", "--include_path", str(tmp_path / "tasks"),
                          "--apply_chat_template", "--batch_size", "4", "--output_path", str(tmp_path / "out")],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]
    got_gen = result["dlmjax_tiny_gen"]["exact_match,final"]
    got_mc = result["dlmjax_tiny_mc"]["acc,none"]

    out = lm.generate([e.prompt for e in examples], chat=True, **KNOBS)
    ours = np.mean([tasks.is_correct(e, t) for e, t in zip(examples, out.texts)])
    assert got_gen == pytest.approx(ours) and ours > 0.5

    model = harness.DlmjaxLM(model="tiny-llada", **KNOBS, mc_num=8, mc_batch_size=4)
    picks = []
    for r in rows:
        context = model.apply_chat_template([{"role": "user", "content": r["prompt"]}])
        lls = [ll for ll, _ in model.loglikelihood([_Request(context, c) for c in r["choices"]])]
        picks.append(int(np.argmax(lls)) == r["label"])
    assert got_mc == pytest.approx(np.mean(picks)) and np.mean(picks) > 0.5


class _Request:
    def __init__(self, *args):
        self.args = args


def test_mc_likelihood_equals_numpy_on_full_logits():
    """The device estimator equals LLaDA's formula computed in NumPy from lm.logits on the same
    noisy rows (same generator): -mean over rows of sum CE / (count / L), also with CFG (float32,
    so that the device's right padding to 32 positions, outside attention, changes nothing)."""
    lm = dlmjax.load("tiny-llada", dtype="float32", progress=False)
    model = harness.DlmjaxLM.__new__(harness.DlmjaxLM)
    model.lm, model.mc_num, model.mc_batch_size, model.seed, model.batch_size = lm, 8, 4, 7, 1
    ctx = list(lm.apply_chat_template([{"role": "user", "content": "Sort: 4 2 6 9"}]))
    cont = list(lm.tokenizer.encode("#### 2 4 6 9", add_special_tokens=False)) + [lm.config.eos_token_id]
    seq = np.asarray(ctx + cont)
    mask_id = lm.config.mask_token_id
    for cfg_scale in (0.0, 1.5):
        model.cfg_scale = cfg_scale
        got = model.mc_likelihood(ctx, cont, index=3)
        rng = np.random.default_rng([7, 3])
        totals = []
        for _ in range(2):
            noisy, p = harness.llada_noise(rng, len(seq), len(ctx), 4, mask_id, seq)
            logits = lm.logits(noisy)
            if cfg_scale:
                un = noisy.copy()
                un[:, : len(ctx)] = mask_id
                un_logits = lm.logits(un)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            logp = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1, keepdims=True)) - logits.max(-1, keepdims=True)
            ce = -np.take_along_axis(logp, np.broadcast_to(seq, noisy.shape)[..., None], -1)[..., 0]
            totals += list(np.sum(np.where(noisy == mask_id, ce / p[:, None], 0.0), axis=1))
        assert got == pytest.approx(-np.mean(totals), rel=1e-5)
    # the counts: k..k+(b-1)L/b wrapped into [1, L], each row masking exactly its count of the continuation
    rng = np.random.default_rng(0)
    noisy, p = harness.llada_noise(rng, 20, 5, 4, mask_id, np.arange(20))
    counts = np.sum(noisy == mask_id, axis=1)
    assert (noisy[:, :5] != mask_id).all() and np.allclose(counts / 15, p) and (counts >= 1).all() and (counts <= 15).all()


@pytest.mark.parametrize("name", ["tiny-llada", "tiny-ar"])
def test_batched_likelihoods_equal_one_at_a_time(name):
    """loglikelihood in batches (requests of different lengths share a forward pass; the last
    batch is short) gives each request what it gets alone: LLaDA's Monte Carlo estimate with the
    same noise (its generator is the request's), with and without CFG, and the AR model's exact
    log-probability; the greedy flags too."""
    lm = dlmjax.load(name, dtype="float32", progress=False)
    model = harness.DlmjaxLM.__new__(harness.DlmjaxLM)
    model.lm, model.mc_num, model.mc_batch_size, model.seed, model.cfg_scale = lm, 8, 4, 7, 0.0
    model.cache_hook = type("Hook", (), {"add_partial": lambda *a: None})()
    examples = [e for e in tasks.make_split("test", 40, 0, "v1")][:5]
    requests = [_Request(lm.apply_chat_template([{"role": "user", "content": e.prompt}], tokenize=False), e.answer) for e in examples]
    assert len({len(e.prompt) for e in examples}) > 2  # lengths differ
    for cfg_scale in (0.0, 1.5) if name == "tiny-llada" else (0.0,):
        model.cfg_scale = cfg_scale
        model.batch_size = 3
        together = model.loglikelihood(requests, disable_tqdm=True)
        model.batch_size = 1
        alone = [model.loglikelihood([r], disable_tqdm=True)[0] for r in requests]
        if name == "tiny-llada":  # alone, request 0's generator: index 0 in a list of one
            alone = [(model.mc_likelihood(*model._pair(*r.args), index=i), g) for i, (r, (_, g)) in enumerate(zip(requests, alone))]
        assert [g for _, g in together] == [g for _, g in alone]
        np.testing.assert_allclose([ll for ll, _ in together], [ll for ll, _ in alone], rtol=2e-5, atol=2e-6)
        assert len({round(ll, 4) for ll, _ in together}) == len(requests)  # and they are not all one number


def test_bad_model_args_are_one_line():
    with pytest.raises(DlmjaxError, match="unknown model_args thresold"):
        harness.DlmjaxLM(model="tiny-llada", thresold=0.9)
    with pytest.raises(DlmjaxError, match="mc_num 10 must be a positive multiple of mc_batch_size 4"):
        harness.DlmjaxLM(model="tiny-llada", mc_num=10, mc_batch_size=4)
    with pytest.raises(DlmjaxError, match="threshold"):
        harness.DlmjaxLM(model="tiny-llada", method="llada", threshold=0.9)
    with pytest.raises(DlmjaxError, match="loglikelihood_rolling .* is not supported"):
        harness.DlmjaxLM.loglikelihood_rolling(object.__new__(harness.DlmjaxLM), [])
