"""The autoregressive baseline (family qwen2): config, logits and greedy decoding against
transformers' Qwen2ForCausalLM, the cached loop against a plain no-cache loop, sampling
warpers against transformers', the export round trip and the input checks."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dlmjax.attention import attention_mask, mask_spec
from dlmjax.config import ModelConfig, from_hf_config, to_hf_config
from dlmjax.decode import api
from dlmjax.decode.ar import ARKnobs, ARMethod, ARTokens, decode_ar, filter_logits
from dlmjax.errors import DlmjaxError
from dlmjax.testing import tiny_hf_config

GEN = 12
PROMPTS = ["What is 2+3?", "Name a colour, please."]


@pytest.fixture(scope="module")
def lm(loaded):
    return loaded("qwen2")


@pytest.fixture(scope="module")
def reference(hf_checkpoint):
    """transformers' own Qwen2ForCausalLM from the same HF directory."""
    from transformers import Qwen2ForCausalLM

    return Qwen2ForCausalLM.from_pretrained(hf_checkpoint("qwen2"), dtype=torch.float32, attn_implementation="eager").eval()


def _chat_batch(lm):
    """The PROMPTS under the chat template, left-padded with the pad id."""
    rows = [lm.apply_chat_template([{"role": "user", "content": t}]) for t in PROMPTS]
    width = max(map(len, rows))
    ids = np.array([[lm.config.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _hf_generate(model, ids, mask, stops, pad, n=GEN):
    with torch.no_grad():
        out = model.generate(
            torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), do_sample=False, max_new_tokens=n,
            eos_token_id=list(stops), pad_token_id=pad,
        ).numpy()[:, ids.shape[1]:]
    return np.pad(out, ((0, 0), (0, n - out.shape[1])), constant_values=pad)  # generate stops once every row did


def test_config():
    hf = tiny_hf_config("qwen2")
    cfg = from_hf_config(hf)
    assert cfg.family == "qwen2" and cfg.is_autoregressive and cfg.shifted_logits and cfg.qkv_bias
    assert cfg.mask_token_id is None and cfg.pad_token_id == cfg.eos_token_id == hf["eos_token_id"]
    assert cfg.eot_token_id == hf["eot_token_id"]
    assert to_hf_config(cfg, hf) == hf  # nothing added, nothing lost
    assert from_hf_config({**hf, "mask_token_id": -1}).mask_token_id is None
    assert from_hf_config({**hf, "eos_token_id": [7, 9]}).eos_token_id == 7
    assert from_hf_config({k: v for k, v in hf.items() if k != "eot_token_id"} | {"eos_token_id": [7, 9]}).eot_token_id == 9
    assert not from_hf_config(tiny_hf_config("dream")).is_autoregressive
    with pytest.raises(DlmjaxError, match="has no mask_token_id"):
        ModelConfig(**{**from_hf_config(tiny_hf_config("dream")).__dict__, "mask_token_id": None}).validate()
    with pytest.raises(DlmjaxError, match="sliding-window"):
        from_hf_config({**hf, "use_sliding_window": True})


def test_causal_mask():
    valid = jnp.array([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], bool)
    dense = np.asarray(attention_mask("causal", valid))
    np.testing.assert_array_equal(dense, np.asarray(valid)[:, None, :] & np.tril(np.ones((6, 6), bool)))
    spec = mask_spec("causal", valid, query_index=jnp.array([4]))  # one decode query against the cache
    np.testing.assert_array_equal(np.asarray(spec.dense()), dense[:, 4:5])


@pytest.mark.parametrize("name", ["qwen2", "qwen2-tied"])
def test_logits_match_transformers(name, hf_checkpoint, loaded):
    from transformers import Qwen2ForCausalLM

    lm = loaded(name)
    model = Qwen2ForCausalLM.from_pretrained(hf_checkpoint(name), dtype=torch.float32, attn_implementation="eager").eval()
    ids = np.random.default_rng(0).integers(0, 96, (2, 24))
    mask = np.ones_like(ids)
    mask[0, :7] = 0
    ids[0, :7] = lm.config.pad_token_id
    with torch.no_grad():
        ref = model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.float().numpy()
    out = lm.logits(ids, mask)  # causal by default for an AR model
    real = mask.astype(bool)
    assert np.abs(out[real] - ref[real]).max() <= 1e-4
    # the padded row's real positions equal its unpadded run
    np.testing.assert_allclose(out[0, 7:], lm.logits(ids[:1, 7:])[0], atol=2e-5, rtol=0)


def test_greedy_matches_transformers_generate(lm, reference):
    ids, mask = _chat_batch(lm)
    cfg = lm.config
    out = lm.generate(PROMPTS, chat=True, gen_length=GEN)
    expected = _hf_generate(reference, ids, mask, (cfg.eos_token_id, cfg.eot_token_id), cfg.pad_token_id)
    np.testing.assert_array_equal(out.tokens, expected)
    assert isinstance(out, api.GenerateOutput) and out.method == ARMethod(GEN)
    assert out.tokens.shape == (2, GEN) and len(out.texts) == 2 and out.seconds > 0
    np.testing.assert_array_equal(out.nfe, out.lengths)
    assert out.steps == out.lengths.max() and (out.trajectory <= out.lengths[:, None]).all() and out.trajectory[:, 0].min() == 1


def _first(row, tokens):
    hits = [i for i, t in enumerate(row) if t in tokens]
    return hits[0] if hits else None


def test_rows_stop_at_their_own_eos(lm, reference):
    """Stop tokens picked from the greedy output: each row stops at its first one (pad after
    it), the other row goes on, and the loop ends once both stopped, as in transformers."""
    ids, mask = _chat_batch(lm)
    cfg = lm.config
    free = lm.generate(PROMPTS, chat=True, gen_length=GEN).tokens  # greedy up to the real stop tokens, pad after
    real = (cfg.eos_token_id, cfg.eot_token_id)
    chosen = None
    for a in dict.fromkeys(free[0, 1:GEN - 2].tolist()):
        for b in dict.fromkeys(free[1, 1:GEN - 2].tolist()):
            ends = [_first(row.tolist(), {a, b, *real}) for row in free]
            if None not in ends and ends[0] != ends[1] and max(ends) < GEN - 2:
                chosen, lengths = (a, b, *real), np.array(ends) + 1
                break
        if chosen:
            break
    assert chosen, "no pair of tokens stops the two rows at different steps"
    pad = cfg.pad_token_id
    knobs = ARKnobs.make(vocab_size=cfg.vocab_size)
    batch_ids, batch_mask = api._bucket(ids.astype(np.int32), mask.astype(np.int32), 32, 400)
    out, steps, got_lengths = decode_ar(
        lm.graphdef, lm.state, jnp.asarray(batch_ids), jnp.asarray(batch_mask), knobs, jax.random.key(0),
        method=ARMethod(GEN), tokens=ARTokens(stops=chosen, pad=pad),
    )
    out = np.asarray(out)
    np.testing.assert_array_equal(np.asarray(got_lengths), lengths)
    assert int(steps) == lengths.max() < GEN  # the loop ended once both rows stopped
    for r in range(2):
        np.testing.assert_array_equal(out[r, :lengths[r]], free[r, :lengths[r]])
        assert (out[r, lengths[r]:] == pad).all()
    np.testing.assert_array_equal(out, _hf_generate(reference, ids, mask, chosen, pad))


def test_cached_decode_equals_no_cache_loop(lm):
    """The while_loop with its KV cache against full causal recomputes in plain Python."""
    ids, mask = _chat_batch(lm)
    out = lm.generate(ids, mask, gen_length=GEN)
    stops = {lm.config.eos_token_id, lm.config.eot_token_id}
    width = ids.shape[1]
    canvas = np.concatenate([ids, np.full((2, GEN), lm.config.pad_token_id)], axis=1)
    canvas_mask = np.concatenate([mask, np.zeros((2, GEN), int)], axis=1)  # later slots stay masked keys
    done = np.zeros(2, bool)
    for j in range(GEN):
        logits = lm.logits(canvas, canvas_mask)  # fixed width: one compile; causal, so later slots do not matter
        token = np.where(done, lm.config.pad_token_id, logits[:, width + j - 1].argmax(-1))
        canvas[:, width + j], canvas_mask[:, width + j] = token, 1
        done |= np.isin(token, list(stops))
        if done.all():
            break
    np.testing.assert_array_equal(out.tokens, canvas[:, width:])


def test_causal_steps_through_the_pallas_kernel(lm, monkeypatch):
    """The causal MaskSpec (query/key indices as block ids) in the Pallas cached-block kernel
    (interpret mode on CPU), for the prefill and every step, gives the XLA path's tokens."""
    monkeypatch.setenv("DLMJAX_ATTENTION", "xla")
    xla = lm.generate(PROMPTS, chat=True, gen_length=GEN)
    from dlmjax.kernels import attention as kernels

    built = []
    kernel_fn = kernels._kernel_fn
    monkeypatch.setattr(kernels, "_kernel_fn", lambda *a: built.append(a[0]) or kernel_fn(*a))
    monkeypatch.setenv("DLMJAX_ATTENTION", "pallas")
    kernel = lm.generate(PROMPTS, chat=True, gen_length=GEN)
    assert built, "the Pallas kernel was not traced (a cached XLA trace was reused)"
    np.testing.assert_array_equal(kernel.tokens, xla.tokens)


SHARDED = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, numpy as np, dlmjax
jax.config.update("jax_default_matmul_precision", "highest")
import cpu_compile; cpu_compile.unrolled_threefry_on_cpu()  # tests/ is on PYTHONPATH
prompts = ["What is 2+3?", "hi", "Name a colour", "x", "abc", "hello there", "1+1", "ok"]
want = dlmjax.load(sys.argv[1]).generate(prompts, chat=True, gen_length=8)
mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))  # Explicit axes, as JAX builds them by default
got = dlmjax.load(sys.argv[1], mesh=mesh).generate(prompts, chat=True, gen_length=8)
assert (got.tokens == want.tokens).all() and (got.lengths == want.lengths).all(), (got.tokens, want.tokens)
"""


@pytest.mark.slow
def test_sharded_decode_matches_one_device(converted):
    """Rows over data x fsdp, heads over tensor (8 CPU devices, fresh interpreter): the same tokens."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(__file__), env.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", SHARDED, str(converted("qwen2"))], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]


def test_batch_rows_equal_single_rows(lm):
    batch = lm.generate(PROMPTS, chat=True, gen_length=GEN)
    for r, prompt in enumerate(PROMPTS):
        single = lm.generate([prompt], chat=True, gen_length=GEN)
        np.testing.assert_array_equal(single.tokens[0], batch.tokens[r])
        assert single.texts[0] == batch.texts[r]


def test_sampling(lm):
    greedy = lm.generate(PROMPTS, chat=True, gen_length=GEN).tokens
    top1 = lm.generate(PROMPTS, chat=True, gen_length=GEN, temperature=1.0, top_k=1, seed=3)
    assert top1.compile_seconds == 0.0  # knobs are traced: the greedy program serves sampling too
    np.testing.assert_array_equal(top1.tokens, greedy)
    np.testing.assert_array_equal(lm.generate(PROMPTS, chat=True, gen_length=GEN, temperature=1.0, top_p=1e-6).tokens, greedy)
    a = lm.generate(PROMPTS, chat=True, gen_length=GEN, temperature=5.0, seed=1).tokens
    np.testing.assert_array_equal(a, lm.generate(PROMPTS, chat=True, gen_length=GEN, temperature=5.0, seed=1).tokens)
    assert not np.array_equal(a, lm.generate(PROMPTS, chat=True, gen_length=GEN, temperature=5.0, seed=2).tokens)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 5, 1.0), (1.0, None, 0.8), (1.3, 20, 0.5), (0.5, 200, 0.95)])
def test_filter_matches_transformers_warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = np.random.default_rng(7).normal(0, 3, (4, 128)).astype(np.float32)
    ref = torch.as_tensor(logits)
    ref = TemperatureLogitsWarper(temperature)(None, ref)
    if top_k is not None:
        ref = TopKLogitsWarper(top_k)(None, ref)
    ref = TopPLogitsWarper(top_p)(None, ref).numpy()
    ours = np.asarray(filter_logits(jnp.asarray(logits), ARKnobs.make(temperature, top_k, top_p, 128)))
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref))
    np.testing.assert_allclose(ours[np.isfinite(ours)], ref[np.isfinite(ref)], rtol=1e-6)


def test_cli(lm, converted, capsys):
    from dlmjax.generate import main

    assert main(["--model", str(converted("qwen2")), "--prompt", PROMPTS[0], "--chat", "--method", "ar",
                 "--gen-length", str(GEN), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    single = lm.generate([PROMPTS[0]], chat=True, gen_length=GEN)
    assert printed["tokens"] == single.tokens[0].tolist() and printed["nfe"] == single.nfe[0]


def test_export_round_trip_is_bit_exact(hf_checkpoint, converted, tmp_path):
    from safetensors.numpy import load_file

    from dlmjax.convert.__main__ import main

    src = hf_checkpoint("qwen2")
    assert main([str(converted("qwen2")), str(tmp_path / "out"), "--export", "--no-progress"]) == 0

    def tensors(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    before, after = tensors(src), tensors(tmp_path / "out")
    assert before.keys() == after.keys()
    for name, value in before.items():
        assert after[name].dtype == value.dtype and after[name].tobytes() == value.tobytes(), name
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads((src / "config.json").read_text())


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(method="llada"), "qwen2 is an autoregressive model, which decodes with method='ar' only"),
        (dict(method="fast-dllm"), "decodes with method='ar' only; drop method='fast-dllm'"),
        (dict(method="d2f"), "decodes with method='ar' only; drop method='d2f'"),  # D2F needs diffusion training
        (dict(method="fast-dllm-v2"), "decodes with method='ar' only; drop method='fast-dllm-v2'"),
        (dict(stop_token_ids=[4096]), r"stop token id 4096 is outside the vocabulary"),
        (dict(block_length=8), "block_length is for diffusion decoding only; drop it"),
        (dict(steps=4, cache="dual"), "steps, cache are for diffusion decoding only; drop them"),
        (dict(top_p=0.0), r"top_p 0.0 is outside \(0, 1\]"),
        (dict(top_k=0), "top_k 0 must be a positive integer"),
        (dict(temperature=-1.0), "temperature -1.0 is negative"),
        (dict(gen_length=0), "gen_length must be positive"),
        (dict(gen_length=510), "plus gen_length 510 exceeds the model's 512 positions"),
    ],
)
def test_bad_arguments_fail_before_compiling(lm, kwargs, message, monkeypatch):
    monkeypatch.setattr(api, "decode_ar", None)  # any attempt to compile would raise AttributeError
    with pytest.raises(DlmjaxError, match=message):
        lm.generate([[5, 6, 7]], **{"gen_length": 8, **kwargs})
    with pytest.raises(DlmjaxError, match="a prompt is empty"):
        lm.generate([[]], gen_length=8)


def test_ar_on_a_diffusion_model_fails(loaded, monkeypatch):
    monkeypatch.setattr(api, "decode_ar", None)
    monkeypatch.setattr(api, "engine", None)
    with pytest.raises(DlmjaxError, match="method 'ar' decodes autoregressive models, but this is a llada diffusion model"):
        loaded("llada").generate([[5, 6, 7]], method="ar", gen_length=8)
