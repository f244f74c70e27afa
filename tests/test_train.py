"""The training loop: rows, batches, objectives, checkpoints and exact resumption after a kill."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dlmjax.config import from_hf_config
from dlmjax.errors import DlmjaxError
from dlmjax.testing import tiny_hf_config
from dlmjax.train import BatchStream, TrainConfig, init_model, masked_diffusion_loss, autoregressive_loss, sft_arrays, train

PAD, EOS = 120, 121


def _cfg(family="llada", **kw):
    hf = tiny_hf_config(family, vocab_size=128, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, **kw)
    return from_hf_config(hf)


def _arrays(objective="mdm", n=24, seed=0):
    rng = np.random.default_rng(seed)
    prompts = [list(rng.integers(0, 90, rng.integers(2, 8))) for _ in range(n)]
    answers = [list(rng.integers(0, 90, rng.integers(1, 6))) for _ in range(n)]
    return sft_arrays(prompts, answers, prompt_length=8, gen_length=8, pad_id=PAD, eos_id=EOS, objective=objective)


def test_sft_rows_layout():
    arrays = sft_arrays([[5, 6]], [[7, 8, 9]], prompt_length=4, gen_length=6, pad_id=PAD, eos_id=EOS, objective="mdm")
    np.testing.assert_array_equal(arrays["input_ids"][0], [PAD, PAD, 5, 6, 7, 8, 9, EOS, EOS, EOS])
    np.testing.assert_array_equal(arrays["attention_mask"][0], [0, 0, 1, 1, 1, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(arrays["loss_mask"][0], [0, 0, 0, 0, 1, 1, 1, 1, 1, 1])  # EOS padding is scored
    ar = sft_arrays([[5, 6]], [[7, 8, 9]], prompt_length=4, gen_length=6, pad_id=PAD, eos_id=EOS, objective="ar")
    np.testing.assert_array_equal(ar["loss_mask"][0], [0, 0, 0, 0, 1, 1, 1, 1, 0, 0])  # answer and its first EOS


@pytest.mark.parametrize(
    "prompts, answers, match",
    [
        ([[1] * 5], [[2]], "prompt_length 4 must hold"),
        ([[1]], [[2] * 6], "gen_length 6 must hold"),
        ([[1], [2]], [[3]], "as many prompts as answers"),
    ],
)
def test_sft_rows_errors(prompts, answers, match):
    with pytest.raises(DlmjaxError, match=match):
        sft_arrays(prompts, answers, prompt_length=4, gen_length=6, pad_id=PAD, eos_id=EOS, objective="mdm")


def test_batch_stream_is_a_function_of_the_step():
    arrays = _arrays(n=10)
    a, b = BatchStream(arrays, 4, seed=3), BatchStream(arrays, 4, seed=3)
    seen = np.concatenate([a.indices(s) for s in range(5)])  # two epochs of 10 rows
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    np.testing.assert_array_equal(b.batch(4)["input_ids"], a.batch(4)["input_ids"])  # b never saw steps 0..3
    assert not np.array_equal(BatchStream(arrays, 4, seed=4).indices(0), a.indices(0))
    with pytest.raises(DlmjaxError, match="batch_size 11 exceeds"):
        BatchStream(arrays, 11)


@pytest.mark.parametrize("t_sampling", ["iid", "stratified"])
def test_masked_diffusion_loss_matches_its_definition(t_sampling):
    cfg = _cfg()
    model = init_model(cfg, seed=1, std=0.5)
    batch = {k: jnp.asarray(v) for k, v in _arrays(n=6).items()}
    key = jax.random.key(7)
    loss, metrics = masked_diffusion_loss(model, batch, key, eps=1e-3, t_sampling=t_sampling)

    # The same draws, written out in numpy: t ~ U(eps, 1) per row, scored tokens masked w.p. t.
    ids, attn, scored = (np.asarray(batch[k]) for k in ("input_ids", "attention_mask", "loss_mask"))
    t_key, m_key = jax.random.split(key)
    if t_sampling == "iid":
        u = np.asarray(jax.random.uniform(t_key, (ids.shape[0], 1)))
    else:  # one draw, shifted by i/B
        u = (float(jax.random.uniform(t_key, ())) + np.arange(ids.shape[0])[:, None] / ids.shape[0]) % 1.0
    t = 1e-3 + (1 - 1e-3) * u
    masked = (np.asarray(jax.random.uniform(m_key, ids.shape)) < t) & (scored > 0)
    assert masked.any() and not masked[:, :8].any()  # the prompt is never masked
    noisy = np.where(masked, cfg.mask_token_id, ids)
    from dlmjax.attention import attention_mask
    from dlmjax.model import position_ids

    logits = np.asarray(model(jnp.asarray(noisy), position_ids(cfg, jnp.asarray(attn)), attention_mask("bidirectional", jnp.asarray(attn)))[0])
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    ce = -np.take_along_axis(logp, ids[..., None], -1)[..., 0]
    expected = np.mean((ce * masked / t).sum(1) / scored.sum(1))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["masked_ce"]), (ce * masked).sum() / masked.sum(), rtol=1e-5)


def test_stratified_t_is_uniform_per_row_and_covers_every_stratum():
    from dlmjax.train.objectives import sample_t

    eps, batch = 1e-3, 8
    draws = np.stack([np.asarray(sample_t(jax.random.key(i), batch, eps))[:, 0] for i in range(400)])
    assert draws.min() >= eps and draws.max() < 1.0
    strata = np.floor((draws - eps) / (1 - eps) * batch).astype(int)
    assert all(sorted(row) == list(range(batch)) for row in strata)  # one t in each 1/B of the range
    # Each row's t is U(eps, 1): its mean and its spread over many keys match the uniform's.
    np.testing.assert_allclose(draws.mean(0), (1 + eps) / 2, atol=0.05)
    np.testing.assert_allclose(draws.std(0), (1 - eps) / np.sqrt(12), atol=0.03)
    with pytest.raises(ValueError, match="t_sampling must be one of"):
        sample_t(jax.random.key(0), batch, eps, "sobol")


def test_autoregressive_loss_is_causal_next_token_ce():
    cfg = _cfg("dream")
    model = init_model(cfg, seed=2, std=0.5)
    arrays = _arrays("ar", n=4)
    batch = {k: jnp.asarray(v) for k, v in arrays.items()}
    loss, _ = autoregressive_loss(model, batch)
    # Changing the last (unscored) tokens must not change the loss: attention is causal.
    changed = dict(batch, input_ids=batch["input_ids"].at[:, -1].set(3))
    assert float(autoregressive_loss(model, changed)[0]) == pytest.approx(float(loss), abs=0)
    # ...while changing a scored answer token does.
    first_answer = 8
    changed = dict(batch, input_ids=batch["input_ids"].at[:, first_answer].set(4))
    assert float(autoregressive_loss(model, changed)[0]) != pytest.approx(float(loss), abs=1e-6)


def test_training_reduces_the_loss_and_checkpoints(tmp_path):
    cfg = _cfg()
    tc = TrainConfig(steps=30, batch_size=8, learning_rate=3e-3, warmup_steps=3, save_every=10, keep=2, log_every=10)
    result = train(init_model(cfg), _arrays(n=8), tmp_path / "run", tc, progress=False)
    assert len(result.history) == 3
    # The logged loss is one noisy batch; compare the loss on the training rows over fixed draws instead.
    batch = {k: jnp.asarray(v) for k, v in _arrays(n=8).items()}

    def mean_loss(model):
        return np.mean([float(masked_diffusion_loss(model, batch, jax.random.key(i))[0]) for i in range(16)])

    assert mean_loss(result.model) < 0.7 * mean_loss(init_model(cfg))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["20", "30"]  # keep=2
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [10, 20, 30]
    # A finished run resumed again does nothing and returns the final parameters.
    again = train(init_model(cfg, seed=9), _arrays(n=8), tmp_path / "run", tc, progress=False)
    assert again.resumed_from == 30 and again.history == []
    _assert_same_params(again.model, result.model)


def test_resume_with_other_settings_is_refused(tmp_path):
    cfg = _cfg()
    tc = TrainConfig(steps=2, batch_size=4, save_every=1, log_every=1)
    train(init_model(cfg), _arrays(), tmp_path, tc, progress=False)
    with pytest.raises(DlmjaxError, match="learning_rate: 0.001 -> 0.01"):
        train(init_model(cfg), _arrays(), tmp_path, TrainConfig(steps=4, batch_size=4, learning_rate=1e-2), progress=False)


def test_bad_train_config():
    with pytest.raises(DlmjaxError, match="objective must be one of"):
        TrainConfig(objective="mlm").validate()
    with pytest.raises(DlmjaxError, match="steps must be at least 1"):
        TrainConfig(steps=0).validate()
    with pytest.raises(DlmjaxError, match="t_sampling must be one of"):
        TrainConfig(t_sampling="sobol").validate()
    with pytest.raises(DlmjaxError, match="schedule must be one of"):
        TrainConfig(schedule="linear").validate()


def test_learning_rate_schedules():
    """Cosine: warm-up from 0, then down to lr * end_lr_ratio at the last step; constant: warm-up,
    then flat (Hugging Face's constant_with_warmup; with no warm-up its "constant")."""
    from dlmjax.train.loop import make_optimizer

    lr = 2e-5
    cosine = make_optimizer(TrainConfig(learning_rate=lr, steps=100, warmup_steps=10, end_lr_ratio=0.0))[1]
    np.testing.assert_allclose([float(cosine(s)) for s in (0, 5, 10, 55, 100)], [0, lr / 2, lr, lr / 2, 0], atol=1e-9)
    flat = make_optimizer(TrainConfig(learning_rate=lr, steps=100, warmup_steps=4, schedule="constant"))[1]
    np.testing.assert_allclose([float(flat(s)) for s in (0, 2, 4, 50, 99)], [0, lr / 2, lr, lr, lr], rtol=1e-6)
    none = make_optimizer(TrainConfig(learning_rate=lr, steps=100, warmup_steps=0, schedule="constant"))[1]
    np.testing.assert_allclose([float(none(s)) for s in (0, 99)], [lr, lr], rtol=1e-6)
    # Hugging Face's epochs and warmup_ratio: 3 passes over 1000 rows in batches of 64 are 47 steps,
    # 5% of which (rounded up) warm up
    tc = TrainConfig(epochs=3, batch_size=64, warmup_ratio=0.05, learning_rate=lr).validate().for_rows(1000)
    assert (tc.steps, tc.epochs, tc.warmup) == (47, 0.0, 3)
    ramp = make_optimizer(tc)[1]
    np.testing.assert_allclose([float(ramp(s)) for s in (0, 3)], [0, lr], rtol=1e-6)
    assert TrainConfig(steps=10).for_rows(1000).steps == 10
    with pytest.raises(DlmjaxError, match="warmup_ratio must lie in"):
        TrainConfig(warmup_ratio=1.5).validate()


def _assert_same_params(a, b):
    pa, pb = nnx.to_pure_dict(nnx.state(a)), nnx.to_pure_dict(nnx.state(b))
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(pa), jax.tree.leaves(pb)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def test_stopped_and_resumed_run_equals_uninterrupted_run(tmp_path):
    cfg = _cfg()
    tc = TrainConfig(steps=12, batch_size=4, warmup_steps=2, save_every=4, log_every=4)
    whole = train(init_model(cfg), _arrays(), tmp_path / "whole", tc, progress=False)
    # Stop after step 7 (the last checkpoint is step 4), then resume with a differently seeded
    # fresh model: everything must come from the checkpoint.
    part = train(init_model(cfg), _arrays(), tmp_path / "part", tc, progress=False, stop_after=7)
    assert part.step == 7
    resumed = train(init_model(cfg, seed=5), _arrays(), tmp_path / "part", tc, progress=False)
    assert resumed.resumed_from == 4
    _assert_same_params(resumed.model, whole.model)


_DRIVER = textwrap.dedent(
    """
    import sys, numpy as np, jax
    jax.config.update("jax_default_matmul_precision", "highest")
    from flax import nnx
    from dlmjax.config import from_hf_config
    from dlmjax.testing import tiny_hf_config
    from dlmjax.train import TrainConfig, init_model, sft_arrays, train
    hf = tiny_hf_config("llada", vocab_size=128, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, 90, 5)) for _ in range(16)]
    answers = [list(rng.integers(0, 90, 4)) for _ in range(16)]
    arrays = sft_arrays(prompts, answers, prompt_length=8, gen_length=8, pad_id=120, eos_id=121, objective="mdm")
    tc = TrainConfig(steps=int(sys.argv[2]), batch_size=4, warmup_steps=2, save_every=2, keep=2, log_every=1)
    slow = float(sys.argv[3])
    def on_save(step, model):
        import time; time.sleep(slow)
    result = train(init_model(from_hf_config(hf)), arrays, sys.argv[1], tc, progress=False, on_save=on_save, log=print)
    if result.preempted:
        print("preempted", result.step, flush=True)
        sys.exit(0)
    flat = jax.tree.leaves(nnx.to_pure_dict(nnx.state(result.model)))
    np.savez(sys.argv[1] + "/final.npz", *[np.asarray(x) for x in flat])
    print("finished", result.step, flush=True)
    """
)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_parameters(tmp_path):
    """SIGKILL a training process after its second checkpoint, restart the same command,
    and compare with a run that was never interrupted: bitwise equal on the CPU."""
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    steps = "16"

    def run(run_dir, slow="0"):
        return subprocess.run([sys.executable, str(driver), str(run_dir), steps, slow], env=env, capture_output=True,
                              text=True, timeout=300)

    whole = run(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-2000:]

    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(driver), str(killed_dir), steps, "0.5"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoints = killed_dir / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and not (checkpoints / "4").is_dir():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (checkpoints / "4").is_dir(), "the training process never reached its second checkpoint"
    assert not (killed_dir / "final.npz").exists()  # it really died before the end
    steps_saved = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    assert max(steps_saved) < 16

    resumed = run(killed_dir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from step {max(steps_saved)}" in resumed.stdout
    a, b = np.load(tmp_path / "whole" / "final.npz"), np.load(killed_dir / "final.npz")
    assert a.files == b.files
    for name in a.files:
        np.testing.assert_array_equal(a[name], b[name])


def _params(model):
    return {jax.tree_util.keystr(p): np.asarray(x, np.float32)
            for p, x in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(model)))}


def _max_rel(a, b):
    return max(float(np.max(np.abs(a[k] - b[k])) / max(np.max(np.abs(b[k])), 1e-12)) for k in b)


@pytest.mark.parametrize("objective", ["mdm", "ar"])
def test_gradient_accumulation_equals_the_whole_batch(objective):
    """grad_accum=4 splits a batch of 8 (and the noise drawn for it) into 4 micro-batches of 2: the
    same loss and gradients as the whole batch at once, within fp32 tolerance; remat (recomputing
    each block in the backward pass) changes nothing either."""
    from dlmjax.train.loop import make_optimizer
    from dlmjax.train.objectives import make_objective
    from dlmjax.train.step import build_gradients, initial_state

    cfg = _cfg("llada" if objective == "mdm" else "dream")
    batch = {k: jnp.asarray(v[:8]) for k, v in _arrays(objective, n=16).items()}
    key = jax.random.key(3)
    found = {}
    for name, knobs in {"whole": {}, "accum": dict(grad_accum=4), "remat": dict(remat="full"),
                        "dots": dict(remat="dots_saveable", grad_accum=2)}.items():
        tc = TrainConfig(objective=objective, batch_size=8, **knobs)
        state, _ = initial_state(init_model(cfg, seed=1, std=0.5), make_optimizer(tc)[0], tc)
        gradients = jax.jit(build_gradients(state, make_objective(objective), tc, None))
        loss, sums, grads = gradients(state.params, state.frozen, batch, key)
        found[name] = (float(loss), {k: float(s) for k, (s, _) in sums.items()},
                       {jax.tree_util.keystr(p): np.asarray(g) for p, g in jax.tree_util.tree_leaves_with_path(grads)})
    loss, sums, grads = found["whole"]
    scale = max(float(np.abs(g).max()) for g in grads.values())
    assert scale > 1e-3
    for name in ("accum", "remat", "dots"):
        other_loss, other_sums, other_grads = found[name]
        assert other_loss == pytest.approx(loss, rel=1e-6), name
        assert other_sums == pytest.approx(sums, rel=1e-6), name
        for k, g in grads.items():
            np.testing.assert_allclose(other_grads[k], g, rtol=1e-5, atol=1e-5 * scale, err_msg=f"{name} {k}")


def test_lora_training_moves_only_the_adapters(tmp_path):
    from dlmjax.model import LoRAConfig

    cfg = _cfg()
    base = init_model(cfg, seed=1, std=0.5)
    before = _params(base)
    lora = LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))
    tc = TrainConfig(steps=20, batch_size=8, learning_rate=2e-2, warmup_steps=2, save_every=10, log_every=10)
    result = train(base, _arrays(n=8), tmp_path / "lora", tc, lora=lora, progress=False)
    after = _params(result.model)
    adapters = {k for k in after if "lora" in k}
    assert adapters and len(adapters) == 2 * 3 * cfg.num_layers
    for k, v in before.items():  # the base weights are bitwise unchanged
        np.testing.assert_array_equal(after[k], v, err_msg=k)
    assert any(np.abs(after[k]).max() > 0 for k in adapters if "lora_b" in k)  # B starts at zero and moved
    batch = {k: jnp.asarray(v) for k, v in _arrays(n=8).items()}

    def mean_loss(model):
        return np.mean([float(masked_diffusion_loss(model, batch, jax.random.key(i))[0]) for i in range(8)])

    assert mean_loss(result.model) < 0.9 * mean_loss(base)
    resumed = train(init_model(cfg, seed=1, std=0.5), _arrays(n=8), tmp_path / "lora", tc, lora=lora, progress=False)
    assert resumed.resumed_from == 20
    with pytest.raises(DlmjaxError, match=r"lora: \{.*\} -> None"):  # a resume without the adapters is another run
        train(init_model(cfg, seed=1, std=0.5), _arrays(n=8), tmp_path / "lora", tc, progress=False)


@pytest.mark.parametrize("precision", ["bf16_compute", "bf16"])
def test_bf16_training(tmp_path, precision):
    """bf16_compute keeps fp32 weights and trains like fp32 (loosely); bf16 stores bf16 weights
    with an fp32 optimizer state."""
    cfg = _cfg()
    tc = TrainConfig(steps=20, batch_size=8, learning_rate=3e-3, warmup_steps=2, save_every=20, log_every=20, precision=precision)
    result = train(init_model(cfg, seed=1, std=0.5), _arrays(n=8), tmp_path / precision, tc, progress=False)
    dtypes = {x.dtype for x in jax.tree.leaves(nnx.state(result.model))}
    assert dtypes == ({jnp.dtype(jnp.bfloat16)} if precision == "bf16" else {jnp.dtype(jnp.float32)})
    fp32 = train(init_model(cfg, seed=1, std=0.5), _arrays(n=8), tmp_path / "fp32",
                 dataclasses.replace(tc, precision="fp32"), progress=False)
    np.testing.assert_allclose(result.history[-1]["loss"], fp32.history[-1]["loss"], rtol=0.1)


def test_bad_training_setups_are_refused_before_compiling(tmp_path):
    from dlmjax.model import LoRAConfig

    cfg = _cfg()
    with pytest.raises(DlmjaxError, match="unknown LoRA target 'attn_out'"):
        train(init_model(cfg), _arrays(), tmp_path / "a", TrainConfig(steps=1, batch_size=4),
              lora=LoRAConfig(rank=2, alpha=2.0, targets=("attn_out",)), progress=False)
    with pytest.raises(DlmjaxError, match="grad_accum 3 must be at least 1 and divide batch_size 4"):
        TrainConfig(batch_size=4, grad_accum=3).validate()
    with pytest.raises(DlmjaxError, match="remat must be one of"):
        TrainConfig(remat="some").validate()
    with pytest.raises(DlmjaxError, match="precision must be one of"):
        TrainConfig(precision="fp8").validate()


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path):
    """SIGTERM (a preemption notice) during training: the process saves the step it is at, exits 0,
    and the restarted run ends with the parameters of a run that was never interrupted."""
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    whole = subprocess.run([sys.executable, str(driver), str(tmp_path / "whole"), "16", "0"], env=env, capture_output=True,
                           text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    run_dir = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, str(driver), str(run_dir), "16", "0.3"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (run_dir / "checkpoints" / "2").is_dir():
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-2000:]
    stopped_at = int(re.search(r"^preempted (\d+)$", out, re.M)[1])
    assert 2 <= stopped_at < 16
    assert (run_dir / "checkpoints" / str(stopped_at)).is_dir()  # the step it stopped at is saved
    resumed = subprocess.run([sys.executable, str(driver), str(run_dir), "16", "0"], env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0 and f"resumed from step {stopped_at}" in resumed.stdout, resumed.stderr[-2000:]
    a, b = np.load(tmp_path / "whole" / "final.npz"), np.load(run_dir / "final.npz")
    for name in a.files:
        np.testing.assert_array_equal(a[name], b[name])


def test_resume_with_another_model_is_refused(tmp_path):
    tc = TrainConfig(steps=2, batch_size=4, save_every=1, log_every=1)
    train(init_model(_cfg()), _arrays(), tmp_path, tc, progress=False)
    wider = from_hf_config(tiny_hf_config("llada", vocab_size=128, hidden_size=48, num_layers=1, num_heads=2, intermediate_size=64))
    with pytest.raises(DlmjaxError, match="different training config \\(model: .*'hidden_size': 32.* -> .*'hidden_size': 48"):
        train(init_model(wider), _arrays(), tmp_path, dataclasses.replace(tc, steps=4), progress=False)


def test_lora_dropout_is_per_row_noise():
    """LoRA dropout draws one key per row with the objective's noise: the loss changes with it, and
    gradient accumulation still equals the whole batch (each row keeps its mask however the batch
    is split)."""
    from dlmjax.model import LoRAConfig
    from dlmjax.train.loop import make_optimizer
    from dlmjax.train.objectives import make_objective
    from dlmjax.train.step import build_gradients, initial_state, with_lora

    cfg = _cfg()
    batch = {k: jnp.asarray(v) for k, v in _arrays(n=8).items()}
    found = {}
    for name, dropout, accum in (("plain", 0.0, 1), ("dropout", 0.3, 1), ("accum", 0.3, 4)):
        lora = LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "up_proj"), dropout=dropout)
        tc = TrainConfig(batch_size=8, grad_accum=accum)
        model = with_lora(init_model(cfg, seed=1, std=0.5), lora, 0)
        state = nnx.state(model)  # B = 0 would hide the branch: give the adapters values
        pure = nnx.to_pure_dict(state)
        for layer in pure["layers"].values():
            for role in ("q_proj", "up_proj"):
                layer[role]["lora_b"] = 0.3 * jax.random.normal(jax.random.key(2), layer[role]["lora_b"].shape)
        nnx.replace_by_pure_dict(state, pure)
        nnx.update(model, state)
        st, _ = initial_state(model, make_optimizer(tc)[0], tc)
        loss, _, grads = jax.jit(build_gradients(st, make_objective("mdm"), tc, None))(st.params, st.frozen, batch, jax.random.key(5))
        found[name] = (float(loss), jax.tree.leaves(grads))
    assert abs(found["dropout"][0] - found["plain"][0]) > 1e-4
    assert found["accum"][0] == pytest.approx(found["dropout"][0], rel=1e-6)
    for a, b in zip(found["accum"][1], found["dropout"][1]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
