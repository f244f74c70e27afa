"""lm.generate and the CLI: the output contract, input checks, one compile per shape, no host trips."""

import json
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dlmjax
from dlmjax.decode import api
from dlmjax.decode.engine import Batch, Tokens, run
from dlmjax.errors import DlmjaxError


@pytest.fixture(scope="module")
def lm(converted):
    return dlmjax.load(converted("llada"))


def test_output_contract(lm):
    out = lm.generate(["What is 2+3?", "hi"], method="fast-dllm", gen_length=16, block_length=8, chat=True)
    assert out.tokens.shape == (2, 16) and out.tokens.dtype.kind == "i"
    assert out.nfe.shape == (2,) and (out.nfe >= 2).all() and (out.nfe <= 16).all()
    assert out.steps == out.nfe.max()
    assert out.trajectory.shape == (2, 16) and (out.trajectory >= 1).all() and (out.trajectory <= out.nfe[:, None]).all()
    assert not (out.tokens == lm.config.mask_token_id).any()
    assert len(out.texts) == 2 and all(isinstance(t, str) for t in out.texts)
    assert out.seconds > 0 and out.compile_seconds >= 0


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(gen_length=30, block_length=8), "gen_length 30 is not divisible by block_length 8"),
        (dict(gen_length=32, block_length=8, steps=30), "steps 30 is not divisible by the 4 blocks"),
        (dict(method="fast-dllm", threshold=0.0), r"confidence threshold 0.0 is outside \(0, 1\]"),
        (dict(method="fast-dllm", threshold=1.5), r"confidence threshold 1.5 is outside \(0, 1\]"),
        (dict(method="dparallel", threshold=-0.1), "entropy bound -0.1 is negative"),
        (dict(method="nope"), "unknown method 'nope'"),
        (dict(gen_length=510), "plus gen_length 510 exceeds the model's 512 positions"),
        (dict(method="dream", alg="fastest"), "unknown Dream alg 'fastest'"),
        (dict(method="dream", top_p=1.5), r"top_p 1.5 is outside \(0, 1\]"),
        (dict(temperature=-1.0), "temperature -1.0 is negative"),
        (dict(method="fast-dllm", remasking="random"), r"remasking does not apply to method 'fast-dllm' \(rule 'threshold'\); "
                                                       r"it belongs to rule 'quota'"),
        (dict(method="llada", threshold=2.0), "threshold does not apply to method 'llada'"),
        (dict(method="prophet", tau_high=9.0), r"tau_high does not apply to method 'prophet' \(rule 'quota', schedule 'prophet'\)"),
        (dict(stop_token_ids=[128]), r"stop token id 128 is outside the vocabulary \(0 .. 127\)"),
        (dict(stop_token_ids=[-1]), "stop token id -1 is outside the vocabulary"),
        (dict(stop_token_ids=["eos"]), "stop token id 'eos' is not an integer"),
        (dict(stop_token_ids=[124]), "stop token id 124 is the mask token"),
        (dict(method="d2f", tau_act=1.5), r"tau_act 1.5 is outside \[0, 1\]"),
        (dict(method="d2f", gen_length=24, block_length=16), "gen_length 24 is not divisible by block_length 16"),
        (dict(method="fast-dllm-v2", block_length=8), "needs a block-diffusion model"),
    ],
)
def test_bad_arguments_fail_before_compiling(lm, kwargs, message, monkeypatch):
    monkeypatch.setattr(api, "engine", None)  # any attempt to compile would raise AttributeError
    with pytest.raises(DlmjaxError, match=message):
        lm.generate([[5, 6, 7]], **{"gen_length": 16, **kwargs})


def test_bad_prompts_fail_before_compiling(lm, monkeypatch):
    monkeypatch.setattr(api, "engine", None)
    mask = lm.config.mask_token_id
    with pytest.raises(DlmjaxError, match=f"contains the mask token {mask}"):
        lm.generate([[5, mask, 7]], gen_length=16)
    with pytest.raises(DlmjaxError, match="a prompt is empty"):
        lm.generate([[]], gen_length=16)
    with pytest.raises(DlmjaxError, match="a prompt is empty"):
        lm.generate([""], gen_length=16)
    with pytest.raises(DlmjaxError, match="all zeros"):
        lm.generate(np.array([[5, 6]]), np.array([[0, 0]]), gen_length=16)


def test_compiles_once_per_shape_bucket(lm):
    first = lm.generate([[5, 6, 7]], method="fast-dllm", gen_length=16, threshold=0.9)
    compiled = len(lm.compiled)
    again = lm.generate([[9, 10, 11, 12, 13]], method="fast-dllm", gen_length=16, threshold=0.3)  # same 32-token bucket
    assert again.compile_seconds == 0.0 and len(lm.compiled) == compiled
    sched = lm.generate([[5, 6, 7]], method="sched", gen_length=16, tau_high=9.0, tau_low=0.0)
    sched_again = lm.generate([[8, 6, 7]], method="sched", gen_length=16, tau_high=5.0, tau_low=1.0, exit_k=8.0, temperature=0.7)
    assert sched.compile_seconds > 0 and sched_again.compile_seconds == 0.0
    assert first.compile_seconds >= 0


@pytest.mark.parametrize("preset", ["sched", "d2f"])
def test_no_host_round_trips_in_the_compiled_loop(lm, preset):
    knobs = dict(steps=16) if preset == "sched" else {}
    method = api.build_method(preset, gen_length=16, block_length=8, **knobs)
    tokens = Tokens(mask=lm.config.mask_token_id, eos=lm.config.eos_token_id, eot=lm.config.eot_token_id)
    prompt, mask = jnp.full((2, 8), 5, jnp.int32), jnp.ones((2, 8), jnp.int32)
    args = (lm.state, Batch(prompt, mask, tokens), method.traced(), jax.random.key(0))
    lowered = run.lower(lm.graphdef, *args)
    text = lowered.as_text()
    assert text.count("stablehlo.while") == 1  # one loop: blocks and steps are iterations of it
    for forbidden in ("callback", "infeed", "outfeed", "send", "recv", "host"):
        assert not re.search(forbidden, text, re.IGNORECASE), forbidden
    compiled = lowered.compile()
    args = jax.device_put(args)
    with jax.transfer_guard("disallow"):
        out = compiled(*args)
        jax.block_until_ready(out)


def test_cli(converted, tmp_path):
    run = [sys.executable, "-m", "dlmjax.generate", "--model", str(converted("llada"))]
    result = subprocess.run(run + ["--prompt", "2+3?", "--chat", "--method", "fast-dllm", "--gen-length", "16"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert re.search(r"\[fast-dllm\] nfe \d+ \| [\d.]+ tokens/s .* s decode \| compile [\d.]+ s", result.stderr)
    result = subprocess.run(run + ["--prompt-ids", "5,6,7", "--json", "--gen-length", "8"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert len(data["tokens"]) == 8 and data["nfe"] == 8 and data["steps"] == 8 and data["seconds"] > 0
    assert sorted(data["trajectory"]) == list(range(1, 9))  # one token per pass, each pass once
    stop = data["tokens"][2]
    result = subprocess.run(run + ["--prompt-ids", "5,6,7", "--json", "--gen-length", "8", "--stop-token-ids", f"{stop}"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["length"] == data["tokens"].index(stop) + 1  # tokens/s counts these only
    bad = subprocess.run(run + ["--prompt-ids", "5,x"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --prompt-ids") and "Traceback" not in bad.stderr


def test_stop_token_ids_cut_the_answer_and_end_rows_that_stop(lm):
    """`lengths` counts each row's tokens up to and including its first stop id; with stop_at_eos a
    row ends there (the rest of its canvas is EOS, its NFE no larger), and before the stop it holds
    the tokens of the decode without stops."""
    plain = lm.generate([[5, 6, 7], [9, 10, 11, 12]], gen_length=16, block_length=8, steps=16, stop_token_ids=[])
    assert (plain.lengths == 16).all()
    stop = int(plain.tokens[0][5])
    first = [list(row).index(stop) if stop in row else None for row in plain.tokens]
    stopped = lm.generate([[5, 6, 7], [9, 10, 11, 12]], gen_length=16, block_length=8, steps=16, stop_token_ids=[stop],
                          stop_at_eos=True)
    for row, f in enumerate(first):
        if f is None:
            continue
        assert stopped.lengths[row] == f + 1
        np.testing.assert_array_equal(stopped.tokens[row][: f + 1], plain.tokens[row][: f + 1])
        assert stopped.nfe[row] <= plain.nfe[row]
    assert stopped.nfe[0] < plain.nfe[0] or first[0] == 15  # the first row stops before its last step
    default = lm.generate([[5, 6, 7]], gen_length=16, block_length=8, steps=16)
    eos = lm.config.eos_token_id
    expected = list(default.tokens[0]).index(eos) + 1 if eos in default.tokens[0] else 16
    assert default.lengths[0] == expected  # the default stops: the model's EOS and end-of-turn


def test_float64_gumbel_is_scoped(lm):
    """gumbel_x64 traces the noise in float64 and leaves jax_enable_x64 off afterwards."""
    greedy = lm.generate([[5, 6, 7]], gen_length=8, temperature=0.0)
    exact = lm.generate([[5, 6, 7]], gen_length=8, temperature=0.0, gumbel_x64=True)
    np.testing.assert_array_equal(greedy.tokens, exact.tokens)  # T = 0 is argmax either way
    sampled = lm.generate([[5, 6, 7]], gen_length=8, temperature=5.0, gumbel_x64=True, seed=1)
    assert not (sampled.tokens == lm.config.mask_token_id).any()
    assert not (sampled.tokens == greedy.tokens).all()  # high-temperature sampling departs from greedy
    assert not jax.config.jax_enable_x64 and jnp.zeros(1).dtype == jnp.float32


def test_compiled_programs_belong_to_the_model(converted):
    """Programs are kept on the LM, bounded least-recently-used, cleared on request and freed with it."""
    import gc
    import weakref

    from dlmjax.lm import CompiledPrograms

    lm = dlmjax.load(converted("llada"))
    lm.compiled.capacity = 2
    lm.generate([[5, 6, 7]], gen_length=8, steps=8)
    first = weakref.ref(lm.compiled.last())
    lm.generate([[5, 6, 7]], method="fast-dllm", gen_length=8)
    lm.generate([[5, 6, 7]], gen_length=8, steps=8)  # reused: now the most recent
    assert len(lm.compiled) == 2 and lm.compiled.last() is first()
    lm.generate([[5, 6, 7]], method="dparallel", gen_length=8)  # evicts fast-dllm, the least recently used
    assert len(lm.compiled) == 2
    again = lm.generate([[5, 6, 7]], method="fast-dllm", gen_length=8)
    assert again.compile_seconds > 0  # it had been evicted
    other = dlmjax.load(converted("llada"))
    assert len(other.compiled) == 0  # another model shares none of them
    lm.compiled.clear()
    assert len(lm.compiled) == 0 and lm.compiled.last() is None
    kept = lm.generate([[5, 6, 7]], gen_length=8, steps=8)
    assert kept.compile_seconds > 0
    program = weakref.ref(lm.compiled.last())
    del lm
    gc.collect()
    assert program() is None and first() is None  # dropping the model freed its programs
    with pytest.raises(DlmjaxError, match="capacity 0 must be at least 1"):
        CompiledPrograms(0)
