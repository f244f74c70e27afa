"""Independent PyTorch reference for LLaDA / Dream / Fast-dLLM v2 logits.

The real LLaDA and Dream checkpoints ship ``trust_remote_code`` modelling files that are not
available offline, so parity tests compare our JAX logits against transformers' own
``LlamaForCausalLM`` (LLaDA) and ``Qwen2ForCausalLM`` (Dream, Fast-dLLM v2), loaded from a
Hugging Face-layout checkpoint directory and switched to bidirectional attention.

API::

    model, family = load_reference(hf_dir, dtype=torch.float32)
    logits = reference_logits(model, family, input_ids, attention_mask=None)  # float32 [B, L, V]

transformers 5.x notes (checked against 5.23):

* ``rope_theta`` is not a config attribute any more: it lives in ``config.rope_parameters``
  (``{"rope_type": "default", "rope_theta": ...}``).  We pass ``rope_parameters`` explicitly
  and ``load_reference`` checks that the rotary ``inv_freq`` matches the checkpoint's theta.
* Bidirectional attention: ``LlamaModel.forward`` / ``Qwen2Model.forward`` are wrapped by
  ``merge_with_config_defaults``, which reads ``is_causal`` from the forward kwargs (else from
  ``config.is_causal``), temporarily writes it into ``config.is_causal`` (so ``create_causal_mask``
  returns a bidirectional padding mask, or ``None`` when there is no padding) and forwards
  ``is_causal`` to the attention function (SDPA otherwise falls back to the hard-coded
  ``self_attn.is_causal = True`` when the mask is ``None``).  Checked empirically: either the
  kwarg or the config flag alone gives bidirectional attention for eager and sdpa, with and
  without padding.  We set all of ``config.is_causal``, every ``self_attn.is_causal`` and the
  ``is_causal=False`` kwarg so it does not hinge on that wrapper.
"""

from __future__ import annotations

import glob
import json
import math
import os

import numpy as np
import torch
from safetensors.torch import load_file

__all__ = ["load_reference", "reference_logits", "reference_position_ids", "FAMILIES"]

FAMILIES = ("llada", "dream", "fast_dllm_v2")

_MODEL_TYPES = {
    "llada": "llada",
    "dream": "dream",
    "fast_dllm_qwen": "fast_dllm_v2",
}


# --------------------------------------------------------------------------------------------
# checkpoint reading
# --------------------------------------------------------------------------------------------


def _read_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in {hf_dir!r}")
    with open(path) as f:
        return json.load(f)


def _family(cfg: dict) -> str:
    mt = str(cfg.get("model_type", "")).lower()
    if mt not in _MODEL_TYPES:
        raise ValueError(f"unsupported model_type {cfg.get('model_type')!r}; expected llada, Dream or Fast_dLLM_Qwen")
    return _MODEL_TYPES[mt]


def _load_tensors(hf_dir: str) -> dict[str, torch.Tensor]:
    """All tensors of a single-file or sharded safetensors checkpoint."""
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    single = os.path.join(hf_dir, "model.safetensors")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    elif os.path.isfile(single):
        files = ["model.safetensors"]
        weight_map = None
    else:
        files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(hf_dir, "model-*.safetensors")))
        weight_map = None
        if not files:
            raise FileNotFoundError(f"no model.safetensors, index or model-*.safetensors shards in {hf_dir!r}")
    sd: dict[str, torch.Tensor] = {}
    for name in files:
        part = load_file(os.path.join(hf_dir, name))
        dup = set(sd) & set(part)
        if dup:
            raise ValueError(f"tensor(s) {sorted(dup)[:3]} appear in more than one shard")
        sd.update(part)
    if weight_map is not None:
        missing = set(weight_map) - set(sd)
        if missing:
            raise ValueError(f"index lists tensors not found in the shards: {sorted(missing)[:5]}")
    return sd


def _check_rope_scaling(cfg: dict) -> None:
    rs = cfg.get("rope_scaling")
    if rs:
        kind = rs.get("rope_type", rs.get("type", "default"))
        if kind != "default":
            raise NotImplementedError(f"rope_scaling {rs!r} is not supported by the reference")


# --------------------------------------------------------------------------------------------
# config mapping + renaming
# --------------------------------------------------------------------------------------------


def _llada_config(cfg: dict):
    from transformers import LlamaConfig

    d = int(cfg["d_model"])
    n_heads = int(cfg["n_heads"])
    n_kv = cfg.get("n_kv_heads") or n_heads
    vocab = int(cfg["vocab_size"])
    emb = cfg.get("embedding_size") or vocab
    if cfg.get("include_bias"):
        raise NotImplementedError("LLaDA checkpoints with include_bias=true are not supported")
    _check_rope_scaling(cfg)
    theta = float(cfg.get("rope_theta", 10000.0))
    return LlamaConfig(
        hidden_size=d,
        num_attention_heads=n_heads,
        num_key_value_heads=int(n_kv),
        num_hidden_layers=int(cfg["n_layers"]),
        intermediate_size=int(cfg["mlp_hidden_size"]),
        vocab_size=int(emb),
        rope_parameters={"rope_type": "default", "rope_theta": theta},
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        max_position_embeddings=int(cfg.get("max_sequence_length", 4096)),
        tie_word_embeddings=bool(cfg.get("weight_tying", False)),
        attention_bias=False,
        mlp_bias=False,
        head_dim=d // n_heads,
        hidden_act="silu",
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
    ), theta


_LLADA_BLOCK = {
    "attn_norm": "input_layernorm",
    "ff_norm": "post_attention_layernorm",
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "attn_out": "self_attn.o_proj",
    "ff_proj": "mlp.gate_proj",  # silu is applied to ff_proj: the gate branch
    "up_proj": "mlp.up_proj",
    "ff_out": "mlp.down_proj",
}


def _rename_llada(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if k.endswith("rotary_emb.inv_freq"):
            continue
        if not k.startswith("model.transformer."):
            raise ValueError(f"unexpected LLaDA tensor {k!r}")
        rest = k[len("model.transformer.") :]
        if rest == "wte.weight":
            out["model.embed_tokens.weight"] = v
        elif rest == "ln_f.weight":
            out["model.norm.weight"] = v
        elif rest == "ff_out.weight":
            out["lm_head.weight"] = v
        elif rest.startswith("blocks."):
            _, idx, name, param = rest.split(".")
            if name not in _LLADA_BLOCK or param != "weight":
                raise ValueError(f"unexpected LLaDA tensor {k!r}")
            out[f"model.layers.{int(idx)}.{_LLADA_BLOCK[name]}.weight"] = v
        else:
            raise ValueError(f"unexpected LLaDA tensor {k!r}")
    return out


def _qwen2_config(cfg: dict):
    from transformers import Qwen2Config

    n_heads = int(cfg["num_attention_heads"])
    _check_rope_scaling(cfg)
    theta = float(cfg.get("rope_theta", 10000.0))
    c = Qwen2Config(
        hidden_size=int(cfg["hidden_size"]),
        num_attention_heads=n_heads,
        num_key_value_heads=int(cfg.get("num_key_value_heads") or n_heads),
        num_hidden_layers=int(cfg["num_hidden_layers"]),
        intermediate_size=int(cfg["intermediate_size"]),
        vocab_size=int(cfg["vocab_size"]),
        rope_parameters={"rope_type": "default", "rope_theta": theta},
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        use_sliding_window=False,
        hidden_act="silu",
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
    )
    hd = cfg.get("head_dim")
    if hd is not None and int(hd) != c.hidden_size // n_heads:
        raise NotImplementedError("Qwen2 reference assumes head_dim == hidden_size // num_attention_heads")
    return c, theta


def _rename_qwen2(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def load_reference(
    hf_dir: str, dtype: torch.dtype = torch.float32, attn_implementation: str = "eager",
    tensors: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.nn.Module, str]:
    """Build transformers' Llama (LLaDA) / Qwen2 (Dream, Fast-dLLM v2) from ``hf_dir``.

    Returns ``(model, family)`` with the model in eval mode, bidirectional, weights in ``dtype``.
    ``tensors`` (checkpoint names -> tensors, e.g. another framework's weights shared through
    DLPack) replaces reading ``hf_dir``'s safetensors; the model's parameters are those tensors.
    """
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    cfg = _read_config(hf_dir)
    family = _family(cfg)
    if family == "llada":
        config, theta = _llada_config(cfg)
        cls = LlamaForCausalLM
        sd = _rename_llada(_load_tensors(hf_dir) if tensors is None else dict(tensors))
    else:
        config, theta = _qwen2_config(cfg)
        cls = Qwen2ForCausalLM
        sd = _rename_qwen2(_load_tensors(hf_dir) if tensors is None else dict(tensors))
    config.is_causal = False
    config.use_cache = False
    config._attn_implementation = attn_implementation

    tied = bool(config.tie_word_embeddings)
    if tied:
        if "lm_head.weight" in sd:
            raise ValueError("checkpoint ties embeddings but also has a separate LM head tensor")
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    sd = {k: v.to(dtype) for k, v in sd.items()}

    # Build on the meta device (no random init of billions of weights), then assign tensors.
    with torch.device("meta"):
        model = cls(config)
    model.load_state_dict(sd, strict=True, assign=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    # Non-persistent rotary buffers are not in the state dict: rebuild them on the CPU.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)

    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.device.type == "meta":
            raise RuntimeError(f"{name} was not loaded")
    for layer in model.model.layers:
        layer.self_attn.is_causal = False

    # Check the theta we asked for really reached the rotary embedding.
    hd = config.hidden_size // config.num_attention_heads
    want = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    got = model.model.rotary_emb.inv_freq
    if not torch.allclose(got.float(), want, rtol=1e-6, atol=0):
        raise RuntimeError(f"rotary inv_freq does not match rope_theta={theta}")
    if not math.isclose(float(model.config.rope_parameters["rope_theta"]), theta):
        raise RuntimeError("rope_theta did not reach model.config.rope_parameters")

    model.eval()
    return model, family


def reference_position_ids(family: str, input_ids: np.ndarray, attention_mask: np.ndarray | None) -> np.ndarray:
    """Position ids [B, L] the reference uses.

    llada: absolute 0..L-1 always (also under left padding).
    dream / fast_dllm_v2: cumsum(mask) - 1 with padded positions set to 1 (Dream's quirk);
    0..L-1 when there is no mask.
    """
    b, length = np.asarray(input_ids).shape
    ar = np.broadcast_to(np.arange(length, dtype=np.int64), (b, length)).copy()
    if family == "llada" or attention_mask is None:
        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r}")
        return ar
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}")
    m = np.asarray(attention_mask).astype(np.int64)
    pos = np.cumsum(m, axis=-1) - 1
    pos[m == 0] = 1
    return pos


@torch.no_grad()
def reference_logits(
    model: torch.nn.Module,
    family: str,
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None = None,
    position_ids: np.ndarray | None = None,
) -> np.ndarray:
    """Raw per-position logits, float32 numpy [B, L, V], bidirectional attention.

    ``attention_mask`` (1 = real token) masks padded *keys*; padded query rows still get
    (meaningless) logits.  ``position_ids`` overrides the family's default positions
    (see ``reference_position_ids``); normally leave it None.
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, L], got shape {ids.shape}")
    if position_ids is None:
        flat_mask = None if attention_mask is None or np.asarray(attention_mask).ndim == 4 else attention_mask
        position_ids = reference_position_ids(family, ids, flat_mask)
    kwargs = dict(
        input_ids=torch.as_tensor(ids, dtype=torch.long),
        position_ids=torch.as_tensor(np.asarray(position_ids), dtype=torch.long),
        use_cache=False,
        is_causal=False,
    )
    if attention_mask is not None and np.asarray(attention_mask).ndim == 4:
        # A custom [B, 1, Lq, Lk] boolean mask (True = attend), e.g. block-causal; handed to
        # the attention as an additive float mask, which transformers passes through as is.
        m = torch.as_tensor(np.array(attention_mask), dtype=torch.bool)
        dtype = next(model.parameters()).dtype
        kwargs["attention_mask"] = torch.zeros(m.shape, dtype=dtype).masked_fill(~m, torch.finfo(dtype).min)
        return model(**kwargs).logits.float().cpu().numpy()
    if attention_mask is not None:
        m = np.asarray(attention_mask)
        if m.shape != ids.shape:
            raise ValueError(f"attention_mask shape {m.shape} != input_ids shape {ids.shape}")
        kwargs["attention_mask"] = torch.as_tensor(m, dtype=torch.long)
    out = model(**kwargs)
    return out.logits.float().cpu().numpy()
