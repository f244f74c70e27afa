"""Independent NumPy reference for the LLaDA2.x ``llada2_moe`` architecture.

Written from ``/work/shared/reference/llada2.md`` alone (sections 1, 2, 3 and 5; cited as "spec §N").
Plain NumPy, float64 internally, with loops over tokens and experts where that is clearer.
It is a test oracle, built for clarity, not speed.
"""
import numpy as np


def _head_dim(cfg):
    """spec §1: ``head_dim or hidden_size // num_attention_heads`` (C20:71)."""
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def _check_unsupported(cfg):
    """spec §1 lists use_qkv_bias / use_bias as used, but §2 gives no bias keys and says the fused
    qkv has "No bias", and §3 has no bias terms. Those paths are left undefined here."""
    for f in ("use_qkv_bias", "use_bias"):
        if cfg.get(f):
            raise NotImplementedError(f"{f}=true: no tensor name/shape in spec §2/§3")


def _n_shared(cfg):
    """spec §1/§3.4: shared width = moe_intermediate_size * num_shared_experts. 0 or None = none (cf. Q10)."""
    return cfg.get("num_shared_experts") or 0


def hf_tensor_shapes(config: dict) -> dict:
    """Every checkpoint key and its PyTorch [out, in] shape (spec §2). No lm_head when tied (§1)."""
    _check_unsupported(config)
    V, D, hd = config["vocab_size"], config["hidden_size"], _head_dim(config)
    H, Hkv = config["num_attention_heads"], config["num_key_value_heads"]
    I, Im, E = config["intermediate_size"], config["moe_intermediate_size"], config["num_experts"]
    S = _n_shared(config)
    out = {"model.word_embeddings.weight": (V, D)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (D,)
        out[p + "attention.query_key_value.weight"] = ((H + 2 * Hkv) * hd, D)
        if config.get("use_qk_norm", True):  # C20:19 default true (spec §1)
            out[p + "attention.query_layernorm.weight"] = (hd,)
            out[p + "attention.key_layernorm.weight"] = (hd,)
        out[p + "attention.dense.weight"] = (D, H * hd)
        out[p + "post_attention_layernorm.weight"] = (D,)
        if i < config["first_k_dense_replace"]:
            mlps = [(p + "mlp.", I)]
        else:
            out[p + "mlp.gate.weight"] = (E, D)
            out[p + "mlp.gate.expert_bias"] = (E,)
            mlps = [(p + f"mlp.experts.{e}.", Im) for e in range(E)]
            if S:
                mlps.append((p + "mlp.shared_experts.", Im * S))
        for q, w in mlps:
            out[q + "gate_proj.weight"] = (w, D)
            out[q + "up_proj.weight"] = (w, D)
            out[q + "down_proj.weight"] = (D, w)
    out["model.norm.weight"] = (D,)
    if not config.get("tie_word_embeddings", False):
        out["lm_head.weight"] = (V, D)
    return out


def random_weights(config: dict, seed: int = 0) -> dict:
    """float32 random tensors for the keys of ``hf_tensor_shapes`` (spec §2), deterministic in seed:
    matrices 0.02*N(0,1), norm weights 1 + 0.1*N(0,1), expert_bias 0.1*N(0,1)."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in hf_tensor_shapes(config).items():
        z = rng.standard_normal(shape)
        if key.endswith("expert_bias"):
            w = 0.1 * z
        elif len(shape) == 1:
            w = 1.0 + 0.1 * z
        else:
            w = 0.02 * z
        out[key] = w.astype(np.float32)
    return out


def _rms(x, w, eps):
    """spec §3 RMSNorm: normalise over the last axis, then multiply by the weight."""
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _swiglu(W, p, x):
    """spec §3: down(silu(gate(x)) * up(x)), no biases."""
    return (_silu(x @ W[p + "gate_proj.weight"].T) * (x @ W[p + "up_proj.weight"].T)) @ W[p + "down_proj.weight"].T


def _topk(scores, k):
    """Indices of the k largest scores, ties broken by the LOWER index first (stable sort on
    (-score, index)). torch.topk's tie order on CPU is unspecified; this is our convention."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:k]


def _rotate_half(x):
    """NeoX rotate_half: pairs (j, j + n/2) (spec §3 RoPE)."""
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def _rope(x, pos, cfg):
    """Partial NeoX RoPE (spec §3). x [B, L, nh, hd], pos [B, L]. Rotates channels [0, rd) with
    rd = int(hd * partial_rotary_factor); channels [rd, hd) pass through. attention_scaling = 1."""
    hd = x.shape[-1]
    rd = int(hd * cfg.get("partial_rotary_factor", 1.0))
    if rd == 0:
        return x
    inv_freq = float(cfg["rope_theta"]) ** (-np.arange(0, rd, 2, dtype=np.float64) / rd)
    f = pos[..., None].astype(np.float64) * inv_freq             # [B, L, rd/2]
    emb = np.concatenate([f, f], axis=-1)[:, :, None, :]        # [B, L, 1, rd]
    xr = x[..., :rd]
    xr = xr * np.cos(emb) + _rotate_half(xr) * np.sin(emb)
    return np.concatenate([xr, x[..., rd:]], axis=-1)


def route(cfg, s_logits, expert_bias):
    """MoE routing for one token (spec §3 MoE steps 1-3). Returns (expert indices [k], weights [k])."""
    E, k = cfg["num_experts"], cfg["num_experts_per_tok"]
    G, kg = cfg["n_group"], cfg["topk_group"]
    assert E % G == 0, "experts must split into n_group contiguous groups"
    s = 1.0 / (1.0 + np.exp(-s_logits))                         # sigmoid, unbiased
    sb = s + expert_bias                                         # biased selection scores
    groups = sb.reshape(G, E // G)
    gscore = np.array([np.sum(g[_topk(g, 2)]) for g in groups])  # sum of top-2 per group
    keep = np.zeros(G, dtype=bool)
    keep[_topk(gscore, kg)] = True
    masked = np.where(np.repeat(keep, E // G), sb, -np.inf)
    idx = _topk(masked, k)
    w = s[idx]
    if k > 1:
        w = w / (w.sum() + 1e-20)
    return idx, w * cfg["routed_scaling_factor"]


def _moe(cfg, W, p, h):
    """spec §3 MoE: per token, sum_k w_k * expert_k(x) + shared_expert(x). h [N, D] -> [N, D]."""
    gate, bias = W[p + "gate.weight"].astype(np.float64), W[p + "gate.expert_bias"].astype(np.float64)
    y = np.zeros_like(h)
    for t in range(h.shape[0]):
        x = h[t:t + 1]
        idx, w = route(cfg, (x @ gate.T)[0], bias)
        for e, we in zip(idx, w):
            y[t] += we * _swiglu(W, p + f"experts.{e}.", x)[0]
    if _n_shared(cfg):
        y += _swiglu(W, p + "shared_experts.", h)
    return y


def forward(config: dict, weights: dict, ids: np.ndarray, positions: np.ndarray = None,
            mask: np.ndarray = None) -> np.ndarray:
    """Logits [B, L, V] in float64 (spec §3). mask[b, q, k] True = query q may attend key k;
    None = full bidirectional (never causal, spec §3/§5). positions default arange(L).
    A query row with no allowed key yields NaN (softmax over all -inf)."""
    _check_unsupported(config)
    W = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
    ids = np.asarray(ids)
    B, L = ids.shape
    D, hd, eps = config["hidden_size"], _head_dim(config), config["rms_norm_eps"]
    H, Hkv = config["num_attention_heads"], config["num_key_value_heads"]
    pos = np.broadcast_to(np.arange(L), (B, L)) if positions is None else np.asarray(positions)
    bias = 0.0 if mask is None else np.where(np.asarray(mask, bool), 0.0, -np.inf)[:, None]  # [B,1,L,L]
    x = W["model.word_embeddings.weight"][ids]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = _rms(x, W[p + "input_layernorm.weight"], eps)
        qkv = (h @ W[p + "attention.query_key_value.weight"].T).reshape(B, L, H + 2 * Hkv, hd)
        q, k, v = qkv[:, :, :H], qkv[:, :, H:H + Hkv], qkv[:, :, H + Hkv:]
        if config.get("use_qk_norm", True):
            q = _rms(q, W[p + "attention.query_layernorm.weight"], eps)
            k = _rms(k, W[p + "attention.key_layernorm.weight"], eps)
        q, k = _rope(q, pos, config), _rope(k, pos, config)
        rep = H // Hkv                                           # GQA: kv head j serves q heads j*rep..
        k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
        sc = np.einsum("bqhd,bkhd->bhqk", q, k) * hd ** -0.5 + bias
        sc = np.exp(sc - sc.max(-1, keepdims=True))
        a = np.einsum("bhqk,bkhd->bqhd", sc / sc.sum(-1, keepdims=True), v)
        x = x + a.reshape(B, L, H * hd) @ W[p + "attention.dense.weight"].T
        h = _rms(x, W[p + "post_attention_layernorm.weight"], eps)
        if i < config["first_k_dense_replace"]:
            x = x + _swiglu(W, p + "mlp.", h)
        else:
            x = x + _moe(config, W, p + "mlp.", h.reshape(B * L, D)).reshape(B, L, D)
    head = W["model.word_embeddings.weight" if config.get("tie_word_embeddings") else "lm_head.weight"]
    return _rms(x, W["model.norm.weight"], eps) @ head.T


def block_causal_mask(length: int, block: int, offset: int = 0) -> np.ndarray:
    """[L, L] bool, spec §5: blocks aligned to absolute position 0 (absolute = offset + index);
    query in block i sees key in block j iff j <= i (bidirectional inside a block)."""
    b = (offset + np.arange(length)) // block
    return b[None, :] <= b[:, None]


def tiny_config(**overrides) -> dict:
    """A tiny HF config dict with the fields of spec §1."""
    cfg = dict(model_type="llada2_moe", architectures=["LLaDA2MoeModelLM"], vocab_size=64,
               hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
               head_dim=16, intermediate_size=48, first_k_dense_replace=1, moe_intermediate_size=8,
               num_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, num_shared_experts=1,
               routed_scaling_factor=2.5, rope_theta=600000.0, partial_rotary_factor=0.5,
               rms_norm_eps=1e-6, use_qk_norm=True, use_qkv_bias=False, use_bias=False,
               tie_word_embeddings=False, pad_token_id=60, torch_dtype="float32")
    cfg.update(overrides)
    return cfg


if __name__ == "__main__":
    cfg = tiny_config()
    W = random_weights(cfg, seed=1)
    assert {k: v.shape for k, v in W.items()} == hf_tensor_shapes(cfg)
    assert W["model.layers.0.attention.query_key_value.weight"].shape == (128, 32)
    assert "lm_head.weight" not in hf_tensor_shapes(tiny_config(tie_word_embeddings=True))
    ids = np.random.default_rng(0).integers(0, 64, (2, 7))
    out = forward(cfg, W, ids)
    assert out.shape == (2, 7, 64) and np.isfinite(out).all()
    full = np.ones((2, 7, 7), bool)
    assert np.allclose(forward(cfg, W, ids, mask=full), out)
    m = block_causal_mask(7, 3, offset=2)
    assert m[0, 0] and not m[0, 1] and m[1, 0] and m[1, 3] and not m[1, 4] and m[6, 6]  # abs 2 | 3-5 | 6-8
    # block-causal: a prefix is unaffected by later tokens
    ob = forward(cfg, W, ids, mask=np.broadcast_to(block_causal_mask(7, 3), (2, 7, 7)))
    ids2 = ids.copy(); ids2[:, 6] = (ids2[:, 6] + 1) % 64
    ob2 = forward(cfg, W, ids2, mask=np.broadcast_to(block_causal_mask(7, 3), (2, 7, 7)))
    assert np.allclose(ob[:, :6], ob2[:, :6]) and not np.allclose(ob[:, 6], ob2[:, 6])
    rng = np.random.default_rng(3)
    for _ in range(200):
        idx, w = route(cfg, rng.standard_normal(8), 0.1 * rng.standard_normal(8))
        assert len(set(idx.tolist())) == 2 and len(set((idx // 2).tolist())) <= 2
        assert np.isclose(w.sum(), 2.5)
    assert list(_topk([1.0, 3.0, 3.0, 0.0], 2)) == [1, 2] and list(_topk([2.0, 2.0, 2.0], 1)) == [0]
    # partial_rotary_factor 1.0 rotates all channels; 0.5 leaves the last half untouched
    x = rng.standard_normal((1, 1, 1, 16)); pos = np.array([[5]])
    r1, r5 = _rope(x, pos, tiny_config(partial_rotary_factor=1.0)), _rope(x, pos, cfg)
    assert not np.isclose(r1[..., 15], x[..., 15]) and np.allclose(r5[..., 8:], x[..., 8:])
    assert not np.isclose(r5[..., 7], x[..., 7])
    try:
        hf_tensor_shapes(tiny_config(use_bias=True)); raise AssertionError
    except NotImplementedError:
        pass
    assert "model.layers.1.mlp.shared_experts.up_proj.weight" not in hf_tensor_shapes(
        tiny_config(num_shared_experts=0))
    forward(tiny_config(num_shared_experts=0, head_dim=None), random_weights(
        tiny_config(num_shared_experts=0, head_dim=None)), ids)
    print("ok")
