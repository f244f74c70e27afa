"""Tests for tests/torch_reference.py, on tiny random checkpoints written here.

The reference is checked against a hand-written torch forward that reads the raw checkpoint
tensors directly (LLaDA and Dream names), so renaming, which LLaDA tensor is the gate, GQA,
q/k/v biases and rope_theta are all pinned down independently of transformers.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

try:
    from torch_reference import load_reference, reference_logits, reference_position_ids
except ImportError:  # tests/ is a package
    from tests.torch_reference import load_reference, reference_logits, reference_position_ids

D, HEADS, LAYERS, FF, VOCAB = 64, 4, 2, 96, 97


# --------------------------------------------------------------------------------------------
# tiny checkpoints
# --------------------------------------------------------------------------------------------


def _rand(gen, *shape, scale=0.2):
    return (torch.randn(*shape, generator=gen) * scale).float()


def _norm_w(gen, n):
    return (1.0 + 0.3 * torch.randn(n, generator=gen)).float()


def _write(path, cfg, sd, shards=1):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    sd = {k: v.contiguous() for k, v in sd.items()}
    if shards == 1:
        save_file(sd, os.path.join(path, "model.safetensors"))
        return
    keys = sorted(sd)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k] for k in keys[i::shards]}
        save_file(part, os.path.join(path, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def make_llada(path, *, tied=False, n_kv_heads=None, embedding_size=104, theta=500000.0, seed=0, shards=1):
    gen = torch.Generator().manual_seed(seed)
    kv = n_kv_heads or HEADS
    hd = D // HEADS
    cfg = {
        "model_type": "llada",
        "d_model": D,
        "n_heads": HEADS,
        "n_kv_heads": n_kv_heads,
        "n_layers": LAYERS,
        "mlp_hidden_size": FF,
        "vocab_size": VOCAB,
        "embedding_size": embedding_size,
        "rope_theta": theta,
        "rms_norm_eps": 1e-5,
        "max_sequence_length": 128,
        "weight_tying": tied,
        "include_bias": False,
    }
    E = embedding_size or VOCAB
    p = "model.transformer."
    # a tied head reuses wte: keep it small so fp32 logits stay O(1) and 1e-5 is meaningful
    sd = {p + "wte.weight": _rand(gen, E, D, scale=0.2 if tied else 1.0), p + "ln_f.weight": _norm_w(gen, D)}
    if not tied:
        sd[p + "ff_out.weight"] = _rand(gen, E, D)
    for i in range(LAYERS):
        b = f"{p}blocks.{i}."
        sd[b + "attn_norm.weight"] = _norm_w(gen, D)
        sd[b + "ff_norm.weight"] = _norm_w(gen, D)
        sd[b + "q_proj.weight"] = _rand(gen, HEADS * hd, D)
        sd[b + "k_proj.weight"] = _rand(gen, kv * hd, D)
        sd[b + "v_proj.weight"] = _rand(gen, kv * hd, D)
        sd[b + "attn_out.weight"] = _rand(gen, D, HEADS * hd)
        sd[b + "ff_proj.weight"] = _rand(gen, FF, D)
        sd[b + "up_proj.weight"] = _rand(gen, FF, D)
        sd[b + "ff_out.weight"] = _rand(gen, D, FF)
    _write(path, cfg, sd, shards)
    return cfg, sd


def make_qwen2(path, *, model_type="Dream", tied=False, kv_heads=2, theta=1e6, seed=1, shards=1):
    gen = torch.Generator().manual_seed(seed)
    hd = D // HEADS
    cfg = {
        "model_type": model_type,
        "hidden_size": D,
        "num_attention_heads": HEADS,
        "num_key_value_heads": kv_heads,
        "num_hidden_layers": LAYERS,
        "intermediate_size": FF,
        "vocab_size": VOCAB,
        "rope_theta": theta,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 128,
        "tie_word_embeddings": tied,
        "rope_scaling": None,
        "use_sliding_window": False,
    }
    sd = {
        "model.embed_tokens.weight": _rand(gen, VOCAB, D, scale=0.2 if tied else 1.0),
        "model.norm.weight": _norm_w(gen, D),
    }
    if not tied:
        sd["lm_head.weight"] = _rand(gen, VOCAB, D)
    for i in range(LAYERS):
        b = f"model.layers.{i}."
        sd[b + "input_layernorm.weight"] = _norm_w(gen, D)
        sd[b + "post_attention_layernorm.weight"] = _norm_w(gen, D)
        for n, rows in (("q", HEADS * hd), ("k", kv_heads * hd), ("v", kv_heads * hd)):
            sd[b + f"self_attn.{n}_proj.weight"] = _rand(gen, rows, D)
            sd[b + f"self_attn.{n}_proj.bias"] = _rand(gen, rows, scale=0.5)
        sd[b + "self_attn.o_proj.weight"] = _rand(gen, D, HEADS * hd)
        sd[b + "mlp.gate_proj.weight"] = _rand(gen, FF, D)
        sd[b + "mlp.up_proj.weight"] = _rand(gen, FF, D)
        sd[b + "mlp.down_proj.weight"] = _rand(gen, D, FF)
    _write(path, cfg, sd, shards)
    return cfg, sd


# --------------------------------------------------------------------------------------------
# independent manual forward (plain torch, float64 for a tight oracle)
# --------------------------------------------------------------------------------------------


def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x, pos, theta):
    # x [B, H, L, hd]; rotate-half convention
    hd = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    ang = pos.to(torch.float64)[:, None, :, None] * inv  # [B,1,L,hd/2]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def manual_forward(layers, emb, final_norm, head, *, n_heads, n_kv, theta, eps, ids, pos, mask=None):
    """layers: list of dicts with keys an, fn, wq, wk, wv, bq, bk, bv, wo, gate, up, down."""
    f = lambda t: None if t is None else t.to(torch.float64)  # noqa: E731
    ids = torch.as_tensor(ids)
    pos = torch.as_tensor(np.array(pos))
    B, L = ids.shape
    hd = emb.shape[1] // n_heads
    x = f(emb)[ids]
    if mask is None:
        bias = torch.zeros(B, 1, 1, L, dtype=torch.float64)
    else:
        bias = torch.where(torch.as_tensor(mask)[:, None, None, :].bool(), 0.0, float("-inf")).to(torch.float64)
    for ly in layers:
        h = _rms(x, f(ly["an"]), eps)
        q = h @ f(ly["wq"]).T + (0 if ly["bq"] is None else f(ly["bq"]))
        k = h @ f(ly["wk"]).T + (0 if ly["bk"] is None else f(ly["bk"]))
        v = h @ f(ly["wv"]).T + (0 if ly["bv"] is None else f(ly["bv"]))
        q = q.view(B, L, n_heads, hd).transpose(1, 2)
        k = k.view(B, L, n_kv, hd).transpose(1, 2)
        v = v.view(B, L, n_kv, hd).transpose(1, 2)
        q, k = _rope(q, pos, theta), _rope(k, pos, theta)
        rep = n_heads // n_kv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        att = torch.softmax(q @ k.transpose(-1, -2) / hd**0.5 + bias, dim=-1)  # no causal mask
        o = (att @ v).transpose(1, 2).reshape(B, L, n_heads * hd)
        x = x + o @ f(ly["wo"]).T
        h = _rms(x, f(ly["fn"]), eps)
        x = x + (torch.nn.functional.silu(h @ f(ly["gate"]).T) * (h @ f(ly["up"]).T)) @ f(ly["down"]).T
    x = _rms(x, f(final_norm), eps)
    return (x @ f(head).T).numpy()


def manual_llada(cfg, sd, ids, pos, mask=None):
    p = "model.transformer."
    layers = []
    for i in range(cfg["n_layers"]):
        b = f"{p}blocks.{i}."
        layers.append(
            dict(
                an=sd[b + "attn_norm.weight"],
                fn=sd[b + "ff_norm.weight"],
                wq=sd[b + "q_proj.weight"],
                wk=sd[b + "k_proj.weight"],
                wv=sd[b + "v_proj.weight"],
                bq=None,
                bk=None,
                bv=None,
                wo=sd[b + "attn_out.weight"],
                gate=sd[b + "ff_proj.weight"],  # LLaDA: silu(ff_proj(x)) * up_proj(x)
                up=sd[b + "up_proj.weight"],
                down=sd[b + "ff_out.weight"],
            )
        )
    head = sd[p + "wte.weight"] if cfg["weight_tying"] else sd[p + "ff_out.weight"]
    return manual_forward(
        layers,
        sd[p + "wte.weight"],
        sd[p + "ln_f.weight"],
        head,
        n_heads=cfg["n_heads"],
        n_kv=cfg["n_kv_heads"] or cfg["n_heads"],
        theta=cfg["rope_theta"],
        eps=cfg["rms_norm_eps"],
        ids=ids,
        pos=pos,
        mask=mask,
    )


def manual_qwen2(cfg, sd, ids, pos, mask=None):
    layers = []
    for i in range(cfg["num_hidden_layers"]):
        b = f"model.layers.{i}."
        a = b + "self_attn."
        layers.append(
            dict(
                an=sd[b + "input_layernorm.weight"],
                fn=sd[b + "post_attention_layernorm.weight"],
                wq=sd[a + "q_proj.weight"],
                wk=sd[a + "k_proj.weight"],
                wv=sd[a + "v_proj.weight"],
                bq=sd[a + "q_proj.bias"],
                bk=sd[a + "k_proj.bias"],
                bv=sd[a + "v_proj.bias"],
                wo=sd[a + "o_proj.weight"],
                gate=sd[b + "mlp.gate_proj.weight"],
                up=sd[b + "mlp.up_proj.weight"],
                down=sd[b + "mlp.down_proj.weight"],
            )
        )
    head = sd["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else sd["lm_head.weight"]
    return manual_forward(
        layers,
        sd["model.embed_tokens.weight"],
        sd["model.norm.weight"],
        head,
        n_heads=cfg["num_attention_heads"],
        n_kv=cfg["num_key_value_heads"],
        theta=cfg["rope_theta"],
        eps=cfg["rms_norm_eps"],
        ids=ids,
        pos=pos,
        mask=mask,
    )


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llada(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llada"))
    cfg, sd = make_llada(path)
    model, fam = load_reference(path)
    return cfg, sd, model, fam, path


@pytest.fixture(scope="module")
def dream(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("dream"))
    cfg, sd = make_qwen2(path, shards=2)  # also exercises the sharded index
    model, fam = load_reference(path)
    return cfg, sd, model, fam, path


def _ids(seed, b, length):
    return np.random.default_rng(seed).integers(0, VOCAB, size=(b, length))


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------


def test_families_and_shapes(llada, dream):
    assert llada[3] == "llada" and dream[3] == "dream"
    ids = _ids(0, 2, 9)
    assert reference_logits(llada[2], "llada", ids).shape == (2, 9, 104)  # embedding_size rows
    out = reference_logits(dream[2], "dream", ids)
    assert out.shape == (2, 9, VOCAB) and out.dtype == np.float32
    assert not llada[2].training


def test_rope_theta_reaches_model(llada, dream):
    for (cfg, _, model, _, _), theta in ((llada, 500000.0), (dream, 1e6)):
        assert model.config.rope_parameters["rope_theta"] == theta
        hd = D // HEADS
        want = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        torch.testing.assert_close(model.model.rotary_emb.inv_freq, want)


@pytest.mark.parametrize("which", ["llada", "dream"])
@pytest.mark.parametrize("with_mask", [False, True])
def test_bidirectional(request, which, with_mask):
    _, _, model, fam, _ = request.getfixturevalue(which)
    ids = _ids(1, 1, 8)
    ids2 = ids.copy()
    ids2[0, -1] = (ids2[0, -1] + 1) % VOCAB
    mask = np.ones_like(ids) if with_mask else None
    a = reference_logits(model, fam, ids, mask)
    b = reference_logits(model, fam, ids2, mask)
    # position 0 sees the last token: it would not if attention were causal
    assert np.abs(a[0, 0] - b[0, 0]).max() > 1e-3


@pytest.mark.parametrize("which", ["llada", "dream"])
def test_eager_and_sdpa_agree(request, which):
    _, _, model, fam, path = request.getfixturevalue(which)
    sdpa, _ = load_reference(path, attn_implementation="sdpa")
    ids = _ids(2, 2, 10)
    mask = np.ones_like(ids)
    mask[0, :3] = 0
    for m in (None, mask):
        np.testing.assert_allclose(
            reference_logits(sdpa, fam, ids, m), reference_logits(model, fam, ids, m), atol=1e-5, rtol=0
        )


def test_llada_matches_manual(llada):
    cfg, sd, model, fam, _ = llada
    ids = _ids(3, 2, 11)
    pos = np.broadcast_to(np.arange(11), ids.shape)
    ref = reference_logits(model, fam, ids)
    np.testing.assert_allclose(ref, manual_llada(cfg, sd, ids, pos), atol=1e-5, rtol=0)


def test_llada_manual_is_sensitive(llada):
    """The manual oracle would catch a swapped gate/up or a wrong theta."""
    cfg, sd, model, fam, _ = llada
    ids = _ids(4, 1, 11)
    pos = np.arange(11)[None]
    ref = reference_logits(model, fam, ids)
    swapped = dict(sd)
    for i in range(LAYERS):
        b = f"model.transformer.blocks.{i}."
        swapped[b + "ff_proj.weight"] = sd[b + "up_proj.weight"]
        swapped[b + "up_proj.weight"] = sd[b + "ff_proj.weight"]
    assert np.abs(ref - manual_llada(cfg, swapped, ids, pos)).max() > 1e-3
    assert np.abs(ref - manual_llada({**cfg, "rope_theta": 10000.0}, sd, ids, pos)).max() > 1e-3


def test_llada_gqa_matches_manual(tmp_path):
    cfg, sd = make_llada(str(tmp_path), n_kv_heads=2, embedding_size=None, seed=5)
    model, fam = load_reference(str(tmp_path))
    ids = _ids(5, 2, 7)
    ref = reference_logits(model, fam, ids)
    assert ref.shape == (2, 7, VOCAB)
    pos = np.broadcast_to(np.arange(7), ids.shape)
    np.testing.assert_allclose(ref, manual_llada(cfg, sd, ids, pos), atol=1e-5, rtol=0)


def test_dream_matches_manual(dream):
    cfg, sd, model, fam, _ = dream
    ids = _ids(6, 2, 11)
    pos = np.broadcast_to(np.arange(11), ids.shape)
    ref = reference_logits(model, fam, ids)
    np.testing.assert_allclose(ref, manual_qwen2(cfg, sd, ids, pos), atol=1e-5, rtol=0)
    assert np.abs(ref - manual_qwen2({**cfg, "rope_theta": 10000.0}, sd, ids, pos)).max() > 1e-3


def test_dream_left_padding(dream):
    cfg, sd, model, fam, _ = dream
    L, P = 10, 3
    a = _ids(7, 1, L - P)[0]
    b = _ids(8, 1, L)[0]
    ids = np.stack([np.concatenate([np.zeros(P, np.int64), a]), b])
    mask = np.ones_like(ids)
    mask[0, :P] = 0
    pos = reference_position_ids(fam, ids, mask)
    assert pos[0].tolist() == [1, 1, 1, 0, 1, 2, 3, 4, 5, 6] and pos[1].tolist() == list(range(L))
    batch = reference_logits(model, fam, ids, mask)
    alone_a = reference_logits(model, fam, a[None])
    alone_b = reference_logits(model, fam, b[None])
    np.testing.assert_allclose(batch[0, P:], alone_a[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(batch[1], alone_b[0], atol=1e-5, rtol=0)
    # and the masked batch equals the manual oracle with the same positions and key mask
    np.testing.assert_allclose(batch, manual_qwen2(cfg, sd, ids, pos, mask), atol=1e-5, rtol=0)
    # without the mask the pad tokens are attended and A's logits change
    assert np.abs(reference_logits(model, fam, ids)[0, P:] - alone_a[0]).max() > 1e-3


def test_llada_left_padding(llada):
    """LLaDA keeps absolute positions 0..L-1 under left padding, so A's real tokens sit at 3..9
    instead of 0..6.  The padded batch row therefore equals a single run of the *same left-padded*
    sequence (batch independence) and the manual oracle at those absolute positions.

    Its real-token logits also equal A run alone -- but only because RoPE scores depend on
    position *differences* and the pad keys are masked, so a uniform shift of all real positions
    cancels (up to float rounding).  The shift is still visible: the (meaningless) logits at the
    padded query positions depend on whether pads sit at 0,1,2 (LLaDA) or 1,1,1 (Dream quirk).
    """
    cfg, sd, model, fam, _ = llada
    L, P = 10, 3
    a = _ids(9, 1, L - P)[0]
    b = _ids(10, 1, L)[0]
    ids = np.stack([np.concatenate([np.full(P, 5, np.int64), a]), b])
    mask = np.ones_like(ids)
    mask[0, :P] = 0
    pos = reference_position_ids(fam, ids, mask)
    assert (pos == np.arange(L)).all()
    batch = reference_logits(model, fam, ids, mask)
    single_padded = reference_logits(model, fam, ids[:1], mask[:1])
    np.testing.assert_allclose(batch[0], single_padded[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(batch[1], reference_logits(model, fam, b[None])[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(batch, manual_llada(cfg, sd, ids, pos, mask), atol=1e-5, rtol=0)
    # RoPE shift invariance: real tokens agree with A alone despite the shifted positions
    alone_a = reference_logits(model, fam, a[None])
    np.testing.assert_allclose(batch[0, P:], alone_a[0], atol=1e-4, rtol=0)
    # ...but the positions really are absolute: Dream-style positions change the pad rows
    dream_pos = reference_position_ids("dream", ids, mask)
    other = reference_logits(model, fam, ids, mask, position_ids=dream_pos)
    assert np.abs(other[0, :P] - batch[0, :P]).max() > 1e-3
    # and without the key mask, the pad tokens are attended and A's logits change
    assert np.abs(reference_logits(model, fam, ids)[0, P:] - alone_a[0]).max() > 1e-3


@pytest.mark.parametrize("which", ["llada", "dream", "fast"])
def test_tied_embeddings(tmp_path, which):
    if which == "llada":
        cfg, sd = make_llada(str(tmp_path), tied=True, seed=11)
        assert not any(k == "model.transformer.ff_out.weight" for k in sd)
        manual = manual_llada
    else:
        mt = "Dream" if which == "dream" else "Fast_dLLM_Qwen"
        cfg, sd = make_qwen2(str(tmp_path), model_type=mt, tied=True, seed=12)
        assert "lm_head.weight" not in sd
        manual = manual_qwen2
    model, fam = load_reference(str(tmp_path))
    assert fam == {"llada": "llada", "dream": "dream", "fast": "fast_dllm_v2"}[which]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = _ids(13, 2, 8)
    pos = np.broadcast_to(np.arange(8), ids.shape)
    np.testing.assert_allclose(reference_logits(model, fam, ids), manual(cfg, sd, ids, pos), atol=1e-5, rtol=0)


def test_bf16_load(llada):
    _, _, model32, fam, path = llada
    model16, _ = load_reference(path, dtype=torch.bfloat16)
    assert model16.model.embed_tokens.weight.dtype == torch.bfloat16
    ids = _ids(14, 1, 8)
    out = reference_logits(model16, fam, ids)
    assert out.dtype == np.float32
    ref = reference_logits(model32, fam, ids)
    assert np.abs(out - ref).max() < 0.1 * np.abs(ref).max()
