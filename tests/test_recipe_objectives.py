"""The seeds' training objectives (training-recipes.md section 5) against NumPy rewrites of their
definitions, written here from the reference text row by row and token by token: the loss and
aux values on a tiny LLaDA and a tiny Dream, the gradient (a directional derivative of the NumPy
loss, by central differences in float64), and the noise samplers' distributions."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from dlmjax.config import from_hf_config
from dlmjax.testing import tiny_hf_config
from dlmjax.train import init_model
from dlmjax.train.dparallel import dparallel_loss, dparallel_sample_noise
from dlmjax.train.objectives import bind

MASK = 124  # tiny_hf_config's mask id (an explicit argument of every loss)


def _model(family, dtype=jnp.float32):
    cfg = from_hf_config(tiny_hf_config(family, vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                        intermediate_size=64))
    return init_model(cfg, 0, std=0.3, dtype=dtype)


# --- NumPy rewrite of dParallel (training-recipes.md 1.3-1.5, 5.1), per row and per token -----------


def np_dparallel(logits_fn, ids, prompt_lengths, block_index, mask, *, block_size, shift, temperature, entropy_weight):
    ids = np.asarray(ids)
    b, length = ids.shape
    x, xc = ids.copy(), ids.copy()
    targets1, targets2 = np.zeros((b, length), bool), np.zeros((b, length), bool)
    for i in range(b):
        p = int(prompt_lengths[i])
        r = length - p
        if r <= 0:
            continue
        if block_size is None:
            s, e = p, length
        else:
            nb = r // block_size
            u = int(block_index[i])
            assert 0 <= u <= nb
            s = p + u * block_size
            e = length if u == nb else s + block_size
        for j in range(length):
            if s <= j < e:
                if mask[i, j]:
                    x[i, j] = MASK
                    targets1[i, j] = True
                else:
                    xc[i, j] = MASK
                    targets2[i, j] = True
            elif j >= e:
                x[i, j] = xc[i, j] = MASK
    total, aux = 0.0, {}
    for name, noisy, targets in (("", x, targets1), ("_c", xc, targets2)):
        z = np.asarray(logits_fn(noisy), np.float64)
        labels = ids
        if shift:
            z, labels, targets = z[:, :-1], ids[:, 1:], targets[:, 1:]
        ce_sum, n, ent_sum, n_correct = 0.0, 0, 0.0, 0
        for i in range(z.shape[0]):
            for j in range(z.shape[1]):
                if not targets[i, j]:
                    continue
                row = z[i, j]
                log_norm = np.log(np.sum(np.exp(row - row.max()))) + row.max()
                ce_sum += log_norm - row[labels[i, j]]
                n += 1
                if int(np.argmax(row)) == labels[i, j]:
                    q = np.exp((row - row.max()) / temperature)
                    q /= q.sum()
                    ent_sum += -np.sum(q * np.log(q + 1e-12))
                    n_correct += 1
        ce = ce_sum / n if n else 0.0
        ent = ent_sum / n_correct if n_correct else 0.0
        total += ce + entropy_weight * ent
        aux.update({f"ce{name}": ce, f"ent{name}": ent, f"n_masked{name}": n, f"n_correct{name}": n_correct})
    return total, aux


DPARALLEL = {
    # family: (block_size, shift, entropy_weight) as the official recipes set them (block 32 -> 4 at L=20)
    "llada": (4, False, 2.0),
    "dream": (None, True, 1.0),
}


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_dparallel_loss_matches_numpy(family):
    block_size, shift, weight = DPARALLEL[family]
    model = _model(family)
    f = bind(model)
    length = 20
    ids = jax.random.randint(jax.random.key(2), (5, length), 4, 100).astype(jnp.int32)
    # rows: ordinary, response a multiple of the block (the last choice is empty), no response, long prompt
    prompt_lengths = jnp.array([6, 8, 20, 3, 17], jnp.int32)
    batch = {"input_ids": ids, "prompt_lengths": prompt_lengths}
    noise = dparallel_sample_noise(jax.random.key(5), batch, block_size=block_size)
    if block_size is not None:  # pin row 1 to its empty remainder segment: (20 - 8) // 4 = 3 = nb
        noise["block_index"] = noise["block_index"].at[1].set(3)
    kwargs = dict(block_size=block_size, shift=shift, temperature=0.5, entropy_weight=weight)
    loss, aux = jax.jit(lambda b, n: dparallel_loss(f, b, n, mask_id=MASK, **kwargs))(batch, noise)
    want, want_aux = np_dparallel(lambda x: f(jnp.asarray(x)), ids, prompt_lengths, np.asarray(noise["block_index"]),
                                  np.asarray(noise["mask"]), **kwargs)
    assert want_aux["n_masked"] > 0 and want_aux["n_masked_c"] > 0
    np.testing.assert_allclose(float(loss), want, rtol=2e-5)
    for k, v in want_aux.items():
        np.testing.assert_allclose(float(aux[k]), v, rtol=2e-5, atol=1e-6, err_msg=k)


def _toy_model(params):
    """An interface `model` in float64 (the tiny transformer's head computes in float32, too coarse
    for central differences): each position's logits from its own embedding and the row's mean."""
    def call(input_ids, *, attn_mask=None, positions=None, adapter=True):
        e = params["embed"][input_ids]
        return e @ params["out"] + jnp.mean(e, axis=1, keepdims=True) @ params["mix"]

    return call


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_dparallel_gradient_matches_numpy_by_central_differences(family):
    """d/dh of the NumPy loss at params + h * direction == the JAX gradient . direction (float64)."""
    block_size, shift, weight = DPARALLEL[family]
    with jax.enable_x64(True):
        keys = jax.random.split(jax.random.key(3), 6)
        params = {"embed": jax.random.normal(keys[0], (128, 16), jnp.float64),
                  "out": 0.5 * jax.random.normal(keys[1], (16, 128), jnp.float64),
                  "mix": 0.5 * jax.random.normal(keys[2], (16, 128), jnp.float64)}
        params["mix"] = params["mix"] + 0.5 * params["embed"].T  # the row's mean embedding points at its common token
        # rows mostly of one token, so that some masked tokens are predicted right (the entropy term)
        ids = jnp.where(jax.random.uniform(keys[3], (3, 16)) < 0.7, 50,
                        jax.random.randint(keys[3], (3, 16), 4, 100)).astype(jnp.int32)
        batch = {"input_ids": ids, "prompt_lengths": jnp.array([4, 6, 9], jnp.int32)}
        noise = dparallel_sample_noise(keys[4], batch, block_size=block_size)
        kwargs = dict(block_size=block_size, shift=shift, temperature=0.5, entropy_weight=weight)
        loss, aux = dparallel_loss(_toy_model(params), batch, noise, mask_id=MASK, **kwargs)
        assert int(aux["n_correct"]) + int(aux["n_correct_c"]) > 0 and float(aux["ent"] + aux["ent_c"]) > 0.1, aux  # entropy in the gradient
        grad = jax.grad(lambda p: dparallel_loss(_toy_model(p), batch, noise, mask_id=MASK, **kwargs)[0])(params)
        direction = {k: jax.random.normal(jax.random.fold_in(keys[5], i), v.shape, v.dtype) for i, (k, v) in enumerate(params.items())}
        analytic = sum(float(jnp.vdot(grad[k], direction[k])) for k in params)

        def np_loss(h):
            f = _toy_model({k: params[k] + h * direction[k] for k in params})
            return np_dparallel(lambda x: f(jnp.asarray(x)), ids, batch["prompt_lengths"], np.asarray(noise["block_index"]),
                                np.asarray(noise["mask"]), **kwargs)[0]

        h = 1e-6
        numeric = (np_loss(h) - np_loss(-h)) / (2 * h)
    assert abs(analytic) > 1e-3
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6)


def test_dparallel_noise_distribution():
    length, block_size = 40, 8
    prompt_lengths = jnp.array([8, 8, 40, 15] * 500, jnp.int32)
    batch = {"input_ids": jnp.zeros((len(prompt_lengths), length), jnp.int32), "prompt_lengths": prompt_lengths}
    noise = dparallel_sample_noise(jax.random.key(0), batch, block_size=block_size)
    u = np.asarray(noise["block_index"]).reshape(500, 4)
    # (40 - 8) // 8 = 4: five choices, inclusive; no response -> 0; (40 - 15) // 8 = 3: four choices
    assert set(u[:, 0]) == {0, 1, 2, 3, 4} and set(u[:, 2]) == {0} and set(u[:, 3]) == {0, 1, 2, 3}
    assert abs(np.mean(u[:, 0] == 4) - 0.2) < 0.05
    mask = np.asarray(noise["mask"]).reshape(500, 4, length)
    assert not mask[:, 2].any() and not mask[:, :, :8].any()  # nothing outside a segment
    in_segment = np.concatenate([mask[r, 0, 8 + 8 * u[r, 0]: 8 + 8 * u[r, 0] + 8] for r in range(500) if u[r, 0] < 4])
    assert abs(in_segment.mean() - 0.5005) < 0.02
    dream = dparallel_sample_noise(jax.random.key(1), batch, block_size=None)
    assert not np.asarray(dream["block_index"]).any()
    assert abs(np.asarray(dream["mask"])[0::4, 8:].mean() - 0.5005) < 0.02


# --- NumPy rewrite of D2F (training-recipes.md 2.3-2.5, 5.2) ---------------------------------------


def np_block_causal(prompt_lengths, length, block_size):
    allow = np.zeros((len(prompt_lengths), 1, length, length), bool)
    for i, p in enumerate(np.asarray(prompt_lengths)):
        for q in range(length):
            for k in range(length):
                allow[i, 0, q, k] = k < p or (q >= p and k >= p and (k - p) // block_size <= (q - p) // block_size)
    return allow


def np_d2f(model_fn, ids, prompt_lengths, mask, ratio, *, block_size, shift, self_align):
    ids = np.asarray(ids)
    b, length = ids.shape
    m = np.asarray(mask).copy()
    for i, p in enumerate(np.asarray(prompt_lengths)):
        m[i, :p] = False
    x = np.where(m, MASK, ids)
    s = np.asarray(model_fn(x, np_block_causal(prompt_lengths, length, block_size), True), np.float64)
    t = np.asarray(model_fn(x, None, False), np.float64)
    if shift:
        s = np.concatenate([np.ones_like(s[:, :1]), s[:, :-1]], 1)
        t = np.concatenate([np.ones_like(t[:, :1]), t[:, :-1]], 1)
    total, n = 0.0, 0
    for i in range(b):
        for j in range(length):
            if not m[i, j]:
                continue
            log_q = s[i, j] - (np.log(np.sum(np.exp(s[i, j] - s[i, j].max()))) + s[i, j].max())
            if self_align:
                target = np.exp(t[i, j] - t[i, j].max())
                target /= target.sum()
                token = -np.sum(target * log_q)
            else:
                token = -log_q[ids[i, j]]
            total += token / ratio[i, j]
            n += 1
    return total / n, n


def _adapted(family):
    """The tiny model with LoRA on q, v and down, its B factors not zero (so the adapter matters)."""
    from dlmjax.model import LoRAConfig
    from dlmjax.train.step import with_lora

    from flax import nnx

    targets = ("q_proj", "v_proj", "down_proj")
    model = with_lora(_model(family), LoRAConfig(rank=4, alpha=8.0, targets=targets), 0)
    state = nnx.state(model)
    pure = nnx.to_pure_dict(state)
    for i, layer in pure["layers"].items():
        for role in targets:
            layer[role]["lora_b"] = 0.2 * jax.random.normal(jax.random.key(i), layer[role]["lora_b"].shape)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    return model


@pytest.mark.parametrize("family, shift, self_align", [("llada", False, True), ("dream", True, True), ("llada", False, False)])
def test_d2f_loss_matches_numpy(family, shift, self_align):
    from dlmjax.train.d2f import d2f_loss, d2f_sample_noise

    f = bind(_adapted(family))
    length, block_size = 20, 4
    ids = jax.random.randint(jax.random.key(2), (3, length), 4, 100).astype(jnp.int32)
    prompt_lengths = jnp.array([5, 8, 13], jnp.int32)  # last blocks partial, block counts 4, 3, 2
    batch = {"input_ids": ids, "prompt_lengths": prompt_lengths}
    noise = d2f_sample_noise(jax.random.key(4), batch, block_size=block_size)
    loss, aux = jax.jit(lambda b, n: d2f_loss(f, b, n, mask_id=MASK, block_size=block_size, shift=shift,
                                              self_align=self_align))(batch, noise)
    want, n = np_d2f(lambda x, mask, adapter: f(jnp.asarray(x), attn_mask=None if mask is None else jnp.asarray(mask),
                                                 adapter=adapter),
                     ids, prompt_lengths, noise["mask"], np.asarray(noise["ratio"], np.float64), block_size=block_size,
                     shift=shift, self_align=self_align)
    assert n > 5 and int(aux["n_masked"]) == n
    np.testing.assert_allclose(float(loss), want, rtol=2e-5)


def _toy_attending_model(params):
    """A float64 interface `model` that honours attn_mask (each query mixes the embeddings it may
    attend to) and adapter (a delta on the output weights)."""
    def call(input_ids, *, attn_mask=None, positions=None, adapter=True):
        e = params["embed"][input_ids]
        b, length = input_ids.shape
        allow = jnp.ones((b, length, length), bool) if attn_mask is None else jnp.broadcast_to(attn_mask[:, 0], (b, length, length))
        mixed = jnp.einsum("bqk,bkd->bqd", allow.astype(e.dtype), e) / jnp.sum(allow, -1, keepdims=True)
        out = params["out"] + (params["delta"] if adapter else 0.0)
        return e @ out + mixed @ params["mix"]

    return call


@pytest.mark.parametrize("shift", [False, True])
def test_d2f_gradient_matches_numpy_by_central_differences(shift):
    """Only the student carries gradient: the teacher (adapter off) is a constant target."""
    from dlmjax.train.d2f import d2f_loss, d2f_sample_noise

    block_size = 4
    with jax.enable_x64(True):
        keys = jax.random.split(jax.random.key(8), 7)
        params = {"embed": jax.random.normal(keys[0], (128, 16), jnp.float64),
                  "out": 0.5 * jax.random.normal(keys[1], (16, 128), jnp.float64),
                  "delta": 0.5 * jax.random.normal(keys[2], (16, 128), jnp.float64),
                  "mix": 0.5 * jax.random.normal(keys[3], (16, 128), jnp.float64)}
        ids = jax.random.randint(keys[4], (3, 16), 4, 100).astype(jnp.int32)
        batch = {"input_ids": ids, "prompt_lengths": jnp.array([3, 6, 9], jnp.int32)}
        noise = d2f_sample_noise(keys[5], batch, block_size=block_size)
        kwargs = dict(block_size=block_size, shift=shift)
        grad = jax.grad(lambda p: d2f_loss(_toy_attending_model(p), batch, noise, mask_id=MASK, **kwargs)[0])(params)
        direction = {k: jax.random.normal(jax.random.fold_in(keys[6], i), v.shape, v.dtype) for i, (k, v) in enumerate(params.items())}
        analytic = sum(float(jnp.vdot(grad[k], direction[k])) for k in params)

        def np_loss(h):
            moved = {k: params[k] + h * direction[k] for k in params}
            student = _toy_attending_model(moved)
            teacher = _toy_attending_model(params)  # the teacher's target does not move: no gradient through it

            def f(x, mask, adapter):
                net = student if adapter else teacher
                return net(jnp.asarray(x), attn_mask=None if mask is None else jnp.asarray(mask), adapter=adapter)

            return np_d2f(f, ids, batch["prompt_lengths"], noise["mask"], np.asarray(noise["ratio"]), self_align=True,
                          **kwargs)[0]

        h = 1e-6
        numeric = (np_loss(h) - np_loss(-h)) / (2 * h)
    assert abs(analytic) > 1e-3
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6)


def test_d2f_noise_distribution():
    from dlmjax.train.d2f import d2f_loss, d2f_sample_noise

    length, block_size = 36, 4
    prompt_lengths = jnp.array([4, 12, 30] * 400, jnp.int32)  # 8, 6 and 2 blocks (the last partial): Mb = 8
    batch = {"input_ids": jnp.zeros((len(prompt_lengths), length), jnp.int32), "prompt_lengths": prompt_lengths}
    noise = d2f_sample_noise(jax.random.key(0), batch, block_size=block_size)
    ratio, mask = np.asarray(noise["ratio"]).reshape(400, 3, length), np.asarray(noise["mask"]).reshape(400, 3, length)
    for r, p in enumerate((4, 12, 30)):
        assert not ratio[:, r, :p].any() and not mask[:, r, :p].any()  # the prompt is never masked
        blocks = ratio[:, r, p::block_size]
        assert np.all(np.diff(blocks, axis=1) >= 0) and np.all(blocks[:, 0] >= 0.2) and np.all(blocks < 0.7 + 1e-6)
        inside = ratio[:, r, p:].reshape(400, -1)
        assert np.all(inside == np.repeat(blocks, block_size, axis=1)[:, :inside.shape[1]])  # one ratio per block
    first = ratio[:, 0, 4]
    assert abs(first.mean() - 0.45) < 0.02 and first.min() < 0.22 and first.max() > 0.68  # p0 ~ U[0.2, 0.7)
    # the row with Mb blocks: its last ratio is p0 + (Mb - 1) increments of mean (0.7 - p0) / (2 (Mb - 1))
    last = ratio[:, 0, 4 + 7 * block_size]
    assert abs(last.mean() - (0.45 + 0.25 / 2)) < 0.02 and last.max() < 0.7
    assert abs(mask[:, 0, 4:].mean() - ratio[:, 0, 4:].mean()) < 0.01
    # the 2-block row: its second ratio is p0 + one increment scaled by the batch's Mb - 1 = 7, or with
    # per_row (the official batch of 1) by its own 2 - 1
    short = ratio[:, 2, 30 + block_size]
    assert abs(short.mean() - (0.45 + 0.25 / 2 / 7)) < 0.02
    own = np.asarray(d2f_sample_noise(jax.random.key(0), batch, block_size=block_size, per_row=True)["ratio"])
    assert abs(own.reshape(400, 3, length)[:, 2, 30 + block_size].mean() - (0.45 + 0.25 / 2)) < 0.02
    # a batch with nothing masked: loss 0 (the official code gives NaN)
    none = {"mask": np.zeros((1, 8), bool), "ratio": np.zeros((1, 8), np.float32)}
    one = {"input_ids": jnp.zeros((1, 8), jnp.int32), "prompt_lengths": jnp.array([4])}
    loss, aux = d2f_loss(lambda x, **k: jnp.zeros((*x.shape, 128)), one, none, mask_id=MASK, block_size=4, shift=False)
    assert float(loss) == 0.0 and int(aux["n_masked"]) == 0


# --- NumPy rewrite of Fast-dLLM v2 (training-recipes.md 3.3-3.5, 5.3) ------------------------------


def np_block_diff(length, bd):
    n = 2 * length
    allow = np.zeros((1, 1, n, n), bool)
    for q in range(n):
        for k in range(n):
            qc, kc = q >= length, k >= length
            qb = (q - length) // bd if qc else q // bd
            kb = (k - length) // bd if kc else k // bd
            allow[0, 0, q, k] = (qb == kb and qc == kc) or (qb > kb and kc and not qc) or (qb >= kb and kc and qc)
    return allow


def np_fdv2(model_fn, ids, labels, mask, *, bd_size, normalize):
    ids, labels, mask = np.asarray(ids), np.asarray(labels), np.asarray(mask)
    b, length = ids.shape
    copies = []
    for keep in (mask, ~mask):
        x = ids.copy()
        lab = np.full_like(labels, -100)
        for i in range(b):
            for j in range(length):
                if labels[i, j] != -100 and keep[i, j]:
                    x[i, j] = MASK
                if x[i, j] == MASK:
                    lab[i, j] = labels[i, j]
        copies.append((x, lab))
    rows = np.concatenate([np.concatenate([x, ids], 1) for x, _ in copies], 0)
    positions = np.concatenate([np.arange(length), np.arange(length)])[None]
    z = np.asarray(model_fn(rows, np_block_diff(length, bd_size), positions), np.float64)[:, :length]
    sums, counts = [0.0, 0.0], [0, 0]
    for c, (_, lab) in enumerate(copies):
        for i in range(b):
            for j in range(length - 1):
                target = lab[i, j + 1]
                if target == -100:
                    continue
                row = z[c * b + i, j]
                sums[c] += np.log(np.sum(np.exp(row - row.max()))) + row.max() - row[target]
                counts[c] += 1
    n_labels = int(np.sum(labels != -100))
    denominator = n_labels if normalize == "labels" else sum(counts)
    return sum(sums) / denominator, {"ce_sum_noisy": sums[0], "ce_sum_comp": sums[1], "n_targets_noisy": counts[0],
                                     "n_targets_comp": counts[1], "n_labels": n_labels}


def _fdv2_batch(length=16):
    ids = np.asarray(jax.random.randint(jax.random.key(2), (3, length), 4, 100)).astype(np.int32)
    labels = np.full_like(ids, -100)
    labels[0, 5:] = ids[0, 5:]  # a prompt then a response
    labels[1, :7] = ids[1, :7]  # a packed row that starts inside a response: the label at 0 is never a target
    labels[1, 11:] = ids[1, 11:]
    labels[2, 3:9] = ids[2, 3:9]
    ids[2, 4] = MASK  # an input that already is the mask id: a target in both copies (kept quirk)
    labels[2, 4] = 7
    return {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(labels)}


@pytest.mark.parametrize("normalize", ["labels", "targets"])
def test_fdv2_loss_matches_numpy(normalize):
    from dlmjax.train.fdv2 import fdv2_loss, fdv2_sample_noise

    model = _model("fast_dllm_v2")
    f = bind(model)
    bd = 4
    batch = _fdv2_batch()
    noise = fdv2_sample_noise(jax.random.key(3), batch, bd_size=bd)
    loss, aux = jax.jit(lambda b, n: fdv2_loss(f, b, n, mask_id=MASK, bd_size=bd, normalize=normalize))(batch, noise)
    want, want_aux = np_fdv2(lambda x, m, p: f(jnp.asarray(x), attn_mask=jnp.asarray(m), positions=jnp.asarray(p)),
                             batch["input_ids"], batch["labels"], noise["mask"], bd_size=bd, normalize=normalize)
    np.testing.assert_allclose(float(loss), want, rtol=2e-5)
    for k, v in want_aux.items():
        np.testing.assert_allclose(float(aux[k]), v, rtol=2e-5, err_msg=k)
    # every label but the one at row 1's position 0 is a target in exactly one copy, the pre-masked one in both
    assert want_aux["n_targets_noisy"] + want_aux["n_targets_comp"] == want_aux["n_labels"] - 1 + 1


def test_fdv2_gradient_matches_numpy_by_central_differences():
    from dlmjax.train.fdv2 import fdv2_loss, fdv2_sample_noise

    bd = 4
    batch = _fdv2_batch()
    with jax.enable_x64(True):
        keys = jax.random.split(jax.random.key(9), 5)
        params = {"embed": jax.random.normal(keys[0], (128, 16), jnp.float64),
                  "out": 0.5 * jax.random.normal(keys[1], (16, 128), jnp.float64),
                  "delta": jnp.zeros((16, 128), jnp.float64),
                  "mix": 0.5 * jax.random.normal(keys[2], (16, 128), jnp.float64)}
        noise = fdv2_sample_noise(keys[3], batch, bd_size=bd)
        grad = jax.grad(lambda p: fdv2_loss(_toy_attending_model(p), batch, noise, mask_id=MASK, bd_size=bd)[0])(params)
        direction = {k: jax.random.normal(jax.random.fold_in(keys[4], i), v.shape, v.dtype) for i, (k, v) in enumerate(params.items())}
        analytic = sum(float(jnp.vdot(grad[k], direction[k])) for k in params)

        def np_loss(h):
            f = _toy_attending_model({k: params[k] + h * direction[k] for k in params})
            return np_fdv2(lambda x, m, p: f(jnp.asarray(x), attn_mask=jnp.asarray(m)), batch["input_ids"], batch["labels"],
                           noise["mask"], bd_size=bd, normalize="labels")[0]

        h = 1e-6
        numeric = (np_loss(h) - np_loss(-h)) / (2 * h)
    assert abs(analytic) > 1e-3
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6)


def test_fdv2_noise_and_mask():
    from dlmjax.errors import DlmjaxError
    from dlmjax.train.fdv2 import block_diff_mask, fdv2_sample_noise

    np.testing.assert_array_equal(np.asarray(block_diff_mask(12, 4)), np_block_diff(12, 4))
    batch = {"input_ids": jnp.zeros((2000, 32), jnp.int32)}
    mask = np.asarray(fdv2_sample_noise(jax.random.key(0), batch, bd_size=8)["mask"]).reshape(2000, 4, 8)
    per_block = mask.mean(-1)  # one ratio per block: ~U(0, 1), independent across blocks
    assert abs(per_block.mean() - 0.5) < 0.02 and abs(np.corrcoef(per_block[:, 0], per_block[:, 1])[0, 1]) < 0.1
    assert abs(np.var(per_block) - (1 / 12 + 1 / 6 / 8)) < 0.01  # Var = Var(t) + E[t(1-t)] / bd
    with pytest.raises(DlmjaxError, match="multiple of bd_size 8"):
        fdv2_sample_noise(jax.random.key(0), {"input_ids": jnp.zeros((1, 30), jnp.int32)}, bd_size=8)


@pytest.mark.parametrize("recipe", ["dparallel", "d2f", "fdv2"])
def test_per_row_reduction_is_the_mean_of_batch_of_one_losses(recipe):
    """reduce="rows" (what the trainer uses: the official per-device batch of 1, averaged) equals
    the interface's loss on each row alone, averaged; D2F's per-row noise uses each row's blocks."""
    from dlmjax.train.d2f import d2f_loss, d2f_sample_noise
    from dlmjax.train.fdv2 import fdv2_loss, fdv2_sample_noise

    if recipe == "fdv2":
        f, batch = bind(_model("fast_dllm_v2")), _fdv2_batch()
        noise = fdv2_sample_noise(jax.random.key(1), batch, bd_size=4)
        loss = lambda b, n, r: fdv2_loss(f, b, n, mask_id=MASK, bd_size=4, reduce=r)  # noqa: E731
    else:
        ids = jax.random.randint(jax.random.key(2), (3, 20), 4, 100).astype(jnp.int32)
        batch = {"input_ids": ids, "prompt_lengths": jnp.array([5, 9, 14], jnp.int32)}
        if recipe == "dparallel":
            f = bind(_model("llada"))
            noise = dparallel_sample_noise(jax.random.key(1), batch, block_size=4)
            loss = lambda b, n, r: dparallel_loss(f, b, n, mask_id=MASK, block_size=4, shift=False,  # noqa: E731
                                                  entropy_weight=2.0, reduce=r)
        else:
            f = bind(_adapted("dream"))
            noise = d2f_sample_noise(jax.random.key(1), batch, block_size=4, per_row=True)
            loss = lambda b, n, r: d2f_loss(f, b, n, mask_id=MASK, block_size=4, shift=True, reduce=r)  # noqa: E731
    mean, aux = loss(batch, noise, "rows")
    singles = [float(loss({k: v[i:i + 1] for k, v in batch.items()}, {k: v[i:i + 1] for k, v in noise.items()}, "batch")[0])
               for i in range(3)]
    np.testing.assert_allclose(np.asarray(aux["row_losses"]), singles, rtol=2e-5)
    np.testing.assert_allclose(float(mean), np.mean(singles), rtol=2e-5)
    whole = float(loss(batch, noise, "batch")[0])
    assert abs(whole - float(mean)) > 1e-6  # the batch's token mean is another number


# --- the recipes in the trainer ----------------------------------------------------------------------


def test_recipe_arrays_layouts_and_packing():
    from dlmjax.errors import DlmjaxError
    from dlmjax.train import recipe_arrays

    prompts, answers = [[1, 2, 3], [4, 5]], [[6, 7], [8, 9, 10]]
    rows = recipe_arrays(prompts, answers, length=8, pad_id=0, end_id=99)
    np.testing.assert_array_equal(rows["input_ids"], [[1, 2, 3, 6, 7, 99, 0, 0], [4, 5, 8, 9, 10, 99, 0, 0]])
    np.testing.assert_array_equal(rows["prompt_lengths"], [3, 2])
    lab = recipe_arrays(prompts, answers, length=8, pad_id=0, end_id=99, labels=True)["labels"]
    np.testing.assert_array_equal(lab, [[-100, -100, -100, 6, 7, 99, -100, -100], [-100, -100, 8, 9, 10, 99, -100, -100]])
    packed = recipe_arrays(prompts * 3, answers * 3, length=4, pad_id=0, end_id=99, labels=True, pack=True, pack_group=4)
    # groups of 4 examples (24 tokens: 6 rows) and of 2 (12 tokens: 3 rows), no separator between documents
    assert packed["input_ids"].shape == (9, 4)
    np.testing.assert_array_equal(packed["input_ids"][:2], [[1, 2, 3, 6], [7, 99, 4, 5]])
    np.testing.assert_array_equal(packed["labels"][:2], [[-100, -100, -100, 6], [7, 99, -100, -100]])
    with pytest.raises(DlmjaxError, match="example 0 has 6 tokens, more than the row length 5"):
        recipe_arrays(prompts, answers, length=5, pad_id=0, end_id=99)


def _recipe_setup(recipe):
    from dlmjax.model import LoRAConfig
    from dlmjax.train import recipe_arrays

    family = {"dparallel": "llada", "d2f": "dream", "fdv2": "fast_dllm_v2"}[recipe]
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(4, 100, rng.integers(2, 9))) for _ in range(16)]
    answers = [list(rng.integers(4, 100, rng.integers(3, 12))) for _ in range(16)]
    arrays = recipe_arrays(prompts, answers, length=24, pad_id=123, end_id=123, labels=recipe == "fdv2",
                           pack=recipe == "fdv2", pack_group=8)
    lora = LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj")) if recipe == "d2f" else None
    return family, arrays, lora


@pytest.mark.parametrize("recipe", ["dparallel", "d2f", "fdv2"])
def test_recipe_gradient_accumulation_equals_the_whole_batch(recipe):
    from dlmjax.train import TrainConfig
    from dlmjax.train.loop import make_optimizer
    from dlmjax.train.objectives import make_objective
    from dlmjax.train.step import build_gradients, initial_state

    family, arrays, lora = _recipe_setup(recipe)
    n = 8 if recipe != "fdv2" else 4
    batch = {k: jnp.asarray(v[:n]) for k, v in arrays.items()}
    found = {}
    for name, knobs in {"whole": {}, "accum": dict(grad_accum=n // 2 if recipe != "fdv2" else 2)}.items():
        tc = TrainConfig(objective=recipe, batch_size=n, objective_args={"block_size" if recipe != "fdv2" else "bd_size": 4}, **knobs)
        model = init_model(_model(family).config, seed=1, std=0.5)
        state, _ = initial_state(model, make_optimizer(tc)[0], tc, lora=lora)
        objective = make_objective(recipe, cfg=model.config, args=tc.objective_args)
        loss, sums, grads = jax.jit(build_gradients(state, objective, tc, None))(state.params, state.frozen, batch, jax.random.key(3))
        found[name] = (float(loss), {jax.tree_util.keystr(p): np.asarray(g) for p, g in jax.tree_util.tree_leaves_with_path(grads)})
    loss, grads = found["whole"]
    scale = max(float(np.abs(g).max()) for g in grads.values())
    assert np.isfinite(loss) and loss > 0 and scale > 1e-4
    assert found["accum"][0] == pytest.approx(loss, rel=1e-5)
    for k, g in grads.items():
        np.testing.assert_allclose(found["accum"][1][k], g, rtol=1e-5, atol=1e-5 * scale, err_msg=k)


@pytest.mark.parametrize("recipe", ["dparallel", "d2f", "fdv2"])
def test_recipes_train(recipe, tmp_path):
    """Steps of each recipe through `train` on one batch seen every step: its loss under fixed noise
    draws goes down."""
    from dlmjax.train.objectives import make_objective
    from dlmjax.train import TrainConfig, train

    family, arrays, lora = _recipe_setup(recipe)
    rows = 4
    arrays = {k: v[:rows] for k, v in arrays.items()}  # one batch, seen every step
    tc = TrainConfig(objective=recipe, batch_size=rows, steps=12, learning_rate=1e-2, warmup_steps=1, save_every=12,
                     log_every=1, objective_args={"block_size" if recipe != "fdv2" else "bd_size": 4})
    model = init_model(_model(family).config, seed=1, std=0.5)
    objective = make_objective(recipe, cfg=model.config, args=tc.objective_args)
    batch = {k: jnp.asarray(v) for k, v in arrays.items()}

    def fixed_loss(m):  # the same four noise draws before and after
        return np.mean([float(objective(m, batch, jax.random.key(100 + i))[0]) for i in range(4)])

    before = fixed_loss(model)  # (with LoRA: fresh adapters add nothing, so this is the start too)
    result = train(model, arrays, tmp_path / recipe, tc, lora=lora, progress=False)
    losses = [row["loss"] for row in result.history]
    assert len(losses) == 12 and all(np.isfinite(losses))
    after = fixed_loss(result.model)
    # D2F's loss is the student's cross entropy against the teacher: the teacher's entropy (here,
    # of a random model, most of it) is a floor that no training lowers; the rest is the KL
    assert after < (before - 0.03 if recipe == "d2f" else 0.9 * before), (before, after)


@pytest.mark.parametrize("recipe, family, lora, words", [
    ("d2f", "llada", False, "objective d2f distils into LoRA adapters"),
    ("d2f", "qwen2", True, "objective d2f trains a llada or dream model, not qwen2"),
    ("fdv2", "llada", False, "objective fdv2 trains a qwen2 or fast_dllm_v2 model, not llada"),
    ("fdv2", "qwen2", False, "needs a mask token, and this qwen2 checkpoint has none; write it as a block-diffusion checkpoint"),
    ("dparallel", "qwen2", False, "objective dparallel trains a llada or dream model"),
])
def test_a_recipe_on_the_wrong_model_is_one_line(recipe, family, lora, words, tmp_path):
    from dlmjax.errors import DlmjaxError
    from dlmjax.model import LoRAConfig
    from dlmjax.train import TrainConfig, recipe_arrays, train

    arrays = recipe_arrays([[5, 6]] * 4, [[7, 8]] * 4, length=8, pad_id=0, end_id=9, labels=recipe == "fdv2")
    with pytest.raises(DlmjaxError, match=words):
        train(_model(family), arrays, tmp_path / "run", TrainConfig(objective=recipe, batch_size=4, steps=1),
              lora=LoRAConfig(rank=2, alpha=4.0, targets=("q_proj",)) if lora else None, progress=False)
    assert not (tmp_path / "run").exists()  # nothing written


def test_bind_gives_the_explicit_noise_interface_model():
    """objectives.bind(model): raw float32 logits; attn_mask [B|1, 1, L, L] (True = may attend) and
    positions [B|1, L] broadcast; adapter=False is exactly the model without LoRA and takes no gradient
    into the adapters; adapter=True is the adapted model."""
    from flax import nnx

    from dlmjax.errors import DlmjaxError

    base, adapted = _model("llada"), _adapted("llada")  # the same base weights, the adapter's B not zero
    cfg, targets = base.config, ("q_proj", "v_proj", "down_proj")

    b, length = 2, 12
    ids = jax.random.randint(jax.random.key(1), (b, length), 0, cfg.vocab_size)
    block_causal = (jnp.arange(length)[None] // 4 <= jnp.arange(length)[:, None] // 4)[None, None]  # [1, 1, L, L]
    positions = jnp.arange(length)[None] + 3
    plain = bind(base)(ids, attn_mask=block_causal, positions=positions)
    assert plain.dtype == jnp.float32 and plain.shape == (b, length, cfg.vocab_size)
    direct, _ = base(ids, jnp.broadcast_to(positions, (b, length)), jnp.broadcast_to(block_causal[:, 0], (b, length, length)))
    np.testing.assert_array_equal(plain, direct)
    np.testing.assert_array_equal(plain, bind(base)(ids, attn_mask=jnp.repeat(block_causal, b, 0), positions=positions))
    assert np.abs(np.asarray(bind(base)(ids)) - np.asarray(plain)).max() > 1e-3  # None = full attention, 0..L-1
    np.testing.assert_array_equal(bind(adapted)(ids, attn_mask=block_causal, positions=positions, adapter=False), plain)
    assert np.abs(np.asarray(bind(adapted)(ids, attn_mask=block_causal, positions=positions)) - np.asarray(plain)).max() > 1e-2

    graphdef, adapters, rest = nnx.split(adapted, nnx.LoRAParam, ...)

    def loss(adapters, adapter):
        return jnp.sum(bind(nnx.merge(graphdef, adapters, rest))(ids, adapter=adapter) ** 2)

    off = jax.tree.leaves(jax.grad(loss)(adapters, False))
    on = jax.tree.leaves(jax.grad(loss)(adapters, True))
    assert len(off) == 2 * len(targets) * cfg.num_layers
    assert all(float(jnp.abs(g).max()) == 0.0 for g in off) and all(float(jnp.abs(g).max()) > 0.0 for g in on)
    with pytest.raises(DlmjaxError, match="attn_mask must be bool"):
        bind(base)(ids, attn_mask=block_causal[0])


def test_arrays_for_another_objective_are_one_line(tmp_path):
    from dlmjax.errors import DlmjaxError
    from dlmjax.train import TrainConfig, sft_arrays, train

    arrays = sft_arrays([[5, 6]] * 4, [[7, 8]] * 4, prompt_length=4, gen_length=4, pad_id=0, eos_id=9, objective="mdm")
    with pytest.raises(DlmjaxError, match=r"training arrays lack \['prompt_lengths'\]; objective dparallel reads "
                                          r"input_ids, prompt_lengths \(build them with dlmjax.train.recipe_arrays\)"):
        train(_model("llada"), arrays, tmp_path / "run", TrainConfig(objective="dparallel", batch_size=4, steps=1), progress=False)


def test_dream_summed_accumulation_is_our_mean_with_scaled_clip_and_eps():
    """dParallel's Dream step sums its 8 micro-batch gradients and clips the sum to norm 1 (eps
    1e-8); our step averages them: with grad_clip 1/8 and adam_eps 1e-8/8 (the Dream recipe's
    settings) the parameters follow the official ones, including steps where the clip bites."""
    import optax

    from dlmjax.train.loop import TrainConfig, make_optimizer

    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), "b": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}
    base = dict(learning_rate=2e-5, steps=20, warmup_steps=2, end_lr_ratio=0.0, weight_decay=0.01, b1=0.9, b2=0.999)
    ours, schedule = make_optimizer(TrainConfig(**base, grad_clip=0.125, adam_eps=1.25e-9))
    decay = jax.tree.map(lambda p: p.ndim >= 2, params)
    official = optax.chain(optax.clip_by_global_norm(1.0),
                           optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, mask=decay))
    plain = make_optimizer(TrainConfig(**base))[0]  # the mean with clip 1, eps 1e-8: not the official update
    p_ours, p_off, p_plain = params, params, params
    s_ours, s_off, s_plain = ours.init(params), official.init(params), plain.init(params)
    clipped = 0
    for step in range(12):
        micro = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * (0.01 if step % 2 else 0.5), jnp.float32), params)
                 for _ in range(8)]
        mean = jax.tree.map(lambda *g: sum(g) / 8, *micro)
        total = jax.tree.map(lambda *g: sum(g), *micro)
        clipped += float(optax.global_norm(total)) > 1.0
        u, s_ours = ours.update(mean, s_ours, p_ours)
        p_ours = optax.apply_updates(p_ours, u)
        u, s_off = official.update(total, s_off, p_off)
        p_off = optax.apply_updates(p_off, u)
        u, s_plain = plain.update(mean, s_plain, p_plain)
        p_plain = optax.apply_updates(p_plain, u)
    assert 0 < clipped < 12  # both regimes occurred
    for a, b in zip(jax.tree.leaves(p_ours), jax.tree.leaves(p_off)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)
    moved = np.asarray(p_off["w"] - params["w"])
    assert not np.allclose(np.asarray(p_plain["w"] - params["w"]), moved, rtol=1e-2)


def test_frozen_embedding_rows_get_no_gradient_and_stay(tmp_path):
    """Fast-dLLM v2's <|im_end|> row (torch's padding_idx): frozen_embedding_rows zeroes exactly those
    rows of the embedding's gradient, so with no weight decay the rows end training bitwise as they
    began, while the rows of other tokens move; ids outside the vocabulary fail in one line."""
    from dlmjax.errors import DlmjaxError
    from dlmjax.train import TrainConfig, train
    from dlmjax.train.loop import make_optimizer
    from dlmjax.train.objectives import make_objective
    from dlmjax.train.step import build_gradients, initial_state

    _, arrays, _ = _recipe_setup("fdv2")
    frozen_ids = [int(arrays["input_ids"][0, 0]), int(arrays["input_ids"][0, 1])]  # tokens the batch holds
    batch = {k: jnp.asarray(v[:4]) for k, v in arrays.items()}
    grads = {}
    for name, rows in {"plain": (), "frozen": tuple(frozen_ids)}.items():
        tc = TrainConfig(objective="fdv2", batch_size=4, objective_args={"bd_size": 4}, frozen_embedding_rows=rows)
        model = init_model(_model("fast_dllm_v2").config, seed=1, std=0.5)
        state, _ = initial_state(model, make_optimizer(tc)[0], tc)
        objective = make_objective("fdv2", cfg=model.config, args=tc.objective_args)
        _, _, g = jax.jit(build_gradients(state, objective, tc, None))(state.params, state.frozen, batch, jax.random.key(3))
        grads[name] = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(g)}
    embed = "['embed'].value"
    assert np.abs(grads["plain"][embed][frozen_ids]).min(axis=1).max() > 0  # both rows have a gradient ...
    np.testing.assert_array_equal(grads["frozen"][embed][frozen_ids], 0.0)  # ... that freezing removes
    others = np.setdiff1d(np.arange(grads["plain"][embed].shape[0]), frozen_ids)
    np.testing.assert_array_equal(grads["frozen"][embed][others], grads["plain"][embed][others])
    for k in grads["plain"]:
        if k != embed:
            np.testing.assert_array_equal(grads["frozen"][k], grads["plain"][k], err_msg=k)

    model = init_model(_model("fast_dllm_v2").config, seed=1, std=0.5)
    start = np.asarray(model.embed[...])
    tc = TrainConfig(objective="fdv2", batch_size=4, steps=3, learning_rate=1e-2, warmup_steps=1, weight_decay=0.0,
                     save_every=3, objective_args={"bd_size": 4}, frozen_embedding_rows=list(frozen_ids))
    trained = np.asarray(train(model, {k: v[:4] for k, v in arrays.items()}, tmp_path / "run", tc, progress=False).model.embed[...])
    np.testing.assert_array_equal(trained[frozen_ids], start[frozen_ids])
    assert np.abs(trained[others] - start[others]).max() > 0
    with pytest.raises(DlmjaxError, match="frozen_embedding_rows \\[4096\\] lie outside the embedding's"):
        train(init_model(_model("fast_dllm_v2").config, seed=1), arrays, tmp_path / "bad",
              TrainConfig(objective="fdv2", batch_size=4, objective_args={"bd_size": 4}, frozen_embedding_rows=(4096,)), progress=False)
    with pytest.raises(DlmjaxError, match="frozen_embedding_rows must be a list of token ids"):
        TrainConfig(frozen_embedding_rows=("x",)).validate()
