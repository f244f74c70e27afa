"""One record per model family: everything that differs between LLaDA, Dream, Fast-dLLM v2 and Qwen2.

The rest of dlmjax never compares family names; it asks the record (`cfg.family_spec`, or
`families.get(name)`). Adding a family means adding one `Family` to `FAMILIES` and its
tests (tests/test_families.py checks every record). A family whose architecture differs
beyond these fields, such as LLaDA2's mixture of experts (model_type "llada2_moe": fused
`attention.query_key_value`, per-head q/k norms, partial RoPE, routed experts), also needs
its modules in model.py and its extra config fields in ModelConfig; its names, ids,
template and config keys still go here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dlmjax.errors import DlmjaxError

# Used only when a checkpoint's tokenizer has no chat template of its own.
# LLaDA (dllm-algorithms.md 1.4): Llama-3-like turns, bos before the first message, and the
# assistant header ALWAYS appended, whatever add_generation_prompt says.
# Newlines sit inside {{ '...' }} expressions: jinja drops a template's trailing newline.
LLADA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + (message['content'] | trim) + '<|eot_id|>' }}"
    "{% endfor %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
)
# Dream, Fast-dLLM v2 and Qwen2 use Qwen2.5's ChatML turns (the exact upstream text, with its
# default system prompt, is unverified; real checkpoints ship their own template).
CHATML_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclasses.dataclass(frozen=True)
class TensorNames:
    """Hugging Face tensor names of one family (parameters keep PyTorch's [out, in] layout)."""

    embed: str
    block_prefix: str  # str.format'ed with layer=i
    block: tuple[tuple[str, str], ...]  # (our module, HF module) per block, in export order
    final_norm: str
    lm_head: str  # tied checkpoints may still carry it, as a copy of the embedding
    # mixture-of-experts layers (LLaDA2): their modules replace the block's gate/up/down_proj
    router: str | None = None  # the router's module: "<router>.weight" [E, D] and "<router>.expert_bias" [E]
    expert: str | None = None  # one routed expert's module, str.format'ed with expert=e
    shared_expert: str | None = None  # the shared experts' module


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """Ids the family's configs do not always carry (dllm-algorithms.md, section 9); None: none."""

    mask_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None  # None: padding is the EOS id
    eot_token_id: int | None


@dataclasses.dataclass(frozen=True)
class ConfigKeys:
    """Where each ModelConfig field lives in the family's config.json.

    The first name of `vocab_size` is read first and written back; the others are read
    as fallbacks and written only when absent. None: the format has no such key, and the
    value comes from the family's default (head_dim: hidden_size // num_heads).
    """

    vocab_size: tuple[str, ...]
    hidden_size: str
    num_layers: str
    num_heads: str
    num_kv_heads: str
    intermediate_size: str
    max_position_embeddings: str
    tie_word_embeddings: str
    rms_norm_eps: str = "rms_norm_eps"
    rope_theta: str = "rope_theta"  # rope_parameters.rope_theta is read too
    head_dim: str | None = None
    qkv_bias: str | None = None
    bd_size: str | None = None  # block-diffusion block size
    moe: bool = False  # the config carries LLaDA2's MoE and attention-variant keys (dlmjax.config.MOE_KEYS)


@dataclasses.dataclass(frozen=True)
class RejectedFlags:
    """config.json switches dlmjax does not implement: any of `keys` true gives `message`."""

    keys: tuple[str, ...]
    message: str


@dataclasses.dataclass(frozen=True)
class TinyCheckpoint:
    """What dlmjax.testing needs to write a tiny random checkpoint of the family."""

    special_tokens: tuple[str, ...]  # placed at the end of the tiny vocabulary, in this order
    config_ids: tuple[tuple[str, str], ...]  # (config.json id key, special token it names)
    bos_token: str | None
    mask_token: str | None
    eos_token: str
    rope_theta: float  # the released checkpoints' value, not the default when the key is absent
    extra_config: tuple[tuple[str, Any], ...]  # format keys dlmjax does not read, as upstream writes them


@dataclasses.dataclass(frozen=True)
class Family:
    name: str  # ModelConfig.family
    display_name: str
    model_types: tuple[str, ...]  # config.json model_type, matched lower-cased; the first is written on export
    architectures: tuple[str, ...]  # config.json architectures
    autoregressive: bool  # a causal next-token model, decoded token by token, never with masks
    shifted_logits: bool  # Qwen's next-token head: position i is predicted by output i-1
    positions_from_mask: bool  # real tokens numbered from 0 under left padding (else absolute positions)
    chat_template: str
    tensor_names: TensorNames
    special_ids: SpecialIds
    config_keys: ConfigKeys
    # Values when config.json lacks the key.
    tie_word_embeddings: bool
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    qkv_bias: bool  # fixed when config_keys.qkv_bias is None
    bd_size: int | None  # None: not a block-diffusion model
    rejected: tuple[RejectedFlags, ...]
    tiny: TinyCheckpoint

    def block_names(self) -> dict[str, str]:
        return dict(self.tensor_names.block)

    @property
    def fused_qkv(self) -> bool:
        """Queries, keys and values in one projection (LLaDA2's query_key_value)."""
        return "qkv_proj" in self.block_names()


_QWEN_BLOCK = (
    ("attn_norm", "input_layernorm"),
    ("q_proj", "self_attn.q_proj"),
    ("k_proj", "self_attn.k_proj"),
    ("v_proj", "self_attn.v_proj"),
    ("o_proj", "self_attn.o_proj"),
    ("mlp_norm", "post_attention_layernorm"),
    ("gate_proj", "mlp.gate_proj"),
    ("up_proj", "mlp.up_proj"),
    ("down_proj", "mlp.down_proj"),
)
_QWEN_NAMES = TensorNames(
    embed="model.embed_tokens.weight",
    block_prefix="model.layers.{layer}.",
    block=_QWEN_BLOCK,
    final_norm="model.norm.weight",
    lm_head="lm_head.weight",
)
_QWEN_KEYS = ConfigKeys(
    vocab_size=("vocab_size",),
    hidden_size="hidden_size",
    num_layers="num_hidden_layers",
    num_heads="num_attention_heads",
    num_kv_heads="num_key_value_heads",
    intermediate_size="intermediate_size",
    max_position_embeddings="max_position_embeddings",
    tie_word_embeddings="tie_word_embeddings",
    head_dim="head_dim",
)

LLADA = Family(
    name="llada",
    display_name="LLaDA",
    model_types=("llada",),
    architectures=("LLaDAModelLM",),
    autoregressive=False,
    shifted_logits=False,
    positions_from_mask=False,
    chat_template=LLADA_CHAT_TEMPLATE,
    tensor_names=TensorNames(
        embed="model.transformer.wte.weight",
        block_prefix="model.transformer.blocks.{layer}.",
        block=(
            ("attn_norm", "attn_norm"),
            ("q_proj", "q_proj"),
            ("k_proj", "k_proj"),
            ("v_proj", "v_proj"),
            ("o_proj", "attn_out"),
            ("mlp_norm", "ff_norm"),
            ("gate_proj", "ff_proj"),  # LLaDA's ff_proj is the gated (silu) branch
            ("up_proj", "up_proj"),
            ("down_proj", "ff_out"),
        ),
        final_norm="model.transformer.ln_f.weight",
        lm_head="model.transformer.ff_out.weight",
    ),
    special_ids=SpecialIds(mask_token_id=126336, eos_token_id=126081, pad_token_id=126081, eot_token_id=126348),
    config_keys=ConfigKeys(
        vocab_size=("embedding_size", "vocab_size"),  # embedding_size is the padded row count
        hidden_size="d_model",
        num_layers="n_layers",
        num_heads="n_heads",
        num_kv_heads="n_kv_heads",
        intermediate_size="mlp_hidden_size",
        max_position_embeddings="max_sequence_length",
        tie_word_embeddings="weight_tying",
        qkv_bias="include_qkv_bias",
    ),
    tie_word_embeddings=False,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=4096,
    qkv_bias=False,
    bd_size=None,
    rejected=(
        RejectedFlags(
            ("include_bias", "alibi", "attention_layer_norm"),
            "this LLaDA config uses biases, ALiBi or QK-norm, which LLaDA-8B does not; "
            "dlmjax supports the released LLaDA architecture only",
        ),
    ),
    tiny=TinyCheckpoint(
        special_tokens=("<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>", "<|eot_id|>", "<|start_header_id|>",
                        "<|end_header_id|>"),
        config_ids=(("mask_token_id", "<|mdm_mask|>"), ("eos_token_id", "<|endoftext|>"),
                    ("pad_token_id", "<|endoftext|>")),
        bos_token="<|startoftext|>",
        mask_token="<|mdm_mask|>",
        eos_token="<|endoftext|>",
        rope_theta=500000.0,
        extra_config=(("mlp_ratio", 4), ("rope", True), ("rope_full_precision", True), ("layer_norm_type", "rms"),
                      ("block_type", "llama"), ("activation_type", "silu"), ("include_bias", False), ("alibi", False),
                      ("attention_layer_norm", False)),
    ),
)

DREAM = Family(
    name="dream",
    display_name="Dream",
    model_types=("Dream",),
    architectures=("DreamModel",),
    autoregressive=False,
    shifted_logits=True,
    positions_from_mask=True,
    chat_template=CHATML_CHAT_TEMPLATE,
    tensor_names=_QWEN_NAMES,
    special_ids=SpecialIds(mask_token_id=151666, eos_token_id=151643, pad_token_id=151643, eot_token_id=151645),
    config_keys=_QWEN_KEYS,
    tie_word_embeddings=False,
    rope_theta=1e6,
    rms_norm_eps=1e-6,
    max_position_embeddings=32768,
    qkv_bias=True,
    bd_size=None,
    rejected=(),
    tiny=TinyCheckpoint(
        special_tokens=("<|beginoftext|>", "<|endoftext|>", "<|mask|>", "<|im_end|>", "<|im_start|>"),
        config_ids=(("mask_token_id", "<|mask|>"), ("pad_token_id", "<|endoftext|>"),
                    ("eos_token_id", "<|endoftext|>"), ("bos_token_id", "<|beginoftext|>")),
        bos_token="<|beginoftext|>",
        mask_token="<|mask|>",
        eos_token="<|endoftext|>",
        rope_theta=1e6,
        extra_config=(("hidden_act", "silu"),),
    ),
)

FAST_DLLM_V2 = Family(
    name="fast_dllm_v2",
    display_name="Fast-dLLM v2",
    model_types=("Fast_dLLM_Qwen",),
    architectures=("Fast_dLLM_QwenForCausalLM",),
    autoregressive=False,
    shifted_logits=True,
    positions_from_mask=True,
    chat_template=CHATML_CHAT_TEMPLATE,
    tensor_names=_QWEN_NAMES,
    special_ids=SpecialIds(mask_token_id=151665, eos_token_id=151643, pad_token_id=151643, eot_token_id=151645),
    config_keys=dataclasses.replace(_QWEN_KEYS, bd_size="bd_size"),
    tie_word_embeddings=False,
    rope_theta=1e6,
    rms_norm_eps=1e-6,
    max_position_embeddings=32768,
    qkv_bias=True,
    bd_size=32,
    rejected=(),
    tiny=TinyCheckpoint(
        special_tokens=("<|beginoftext|>", "<|endoftext|>", "|<MASK>|", "<|im_end|>", "<|im_start|>"),
        config_ids=(("mask_token_id", "|<MASK>|"), ("pad_token_id", "<|endoftext|>"),
                    ("eos_token_id", "<|endoftext|>"), ("bos_token_id", "<|beginoftext|>")),
        bos_token="<|beginoftext|>",
        mask_token="|<MASK>|",
        eos_token="<|endoftext|>",
        rope_theta=1e6,
        extra_config=(("hidden_act", "silu"),),
    ),
)

QWEN2 = Family(
    name="qwen2",
    display_name="Qwen2",
    model_types=("qwen2",),
    architectures=("Qwen2ForCausalLM",),
    autoregressive=True,
    shifted_logits=True,
    positions_from_mask=True,
    chat_template=CHATML_CHAT_TEMPLATE,
    tensor_names=_QWEN_NAMES,
    # No mask token; Qwen2.5's configs carry no pad id, so padding is the EOS.
    special_ids=SpecialIds(mask_token_id=None, eos_token_id=151643, pad_token_id=None, eot_token_id=151645),
    config_keys=_QWEN_KEYS,
    tie_word_embeddings=False,
    rope_theta=1e4,  # Qwen2Config's default
    rms_norm_eps=1e-6,
    max_position_embeddings=32768,
    qkv_bias=True,
    bd_size=None,
    rejected=(
        RejectedFlags(
            ("use_sliding_window",),
            "this Qwen2 config uses sliding-window attention, which dlmjax does not implement; "
            "set use_sliding_window to false (Qwen2/2.5 checkpoints ship it off)",
        ),
    ),
    tiny=TinyCheckpoint(
        special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        # eot_token_id is ours (Qwen ships <|im_end|> in generation_config.json)
        config_ids=(("bos_token_id", "<|endoftext|>"), ("eos_token_id", "<|endoftext|>"),
                    ("eot_token_id", "<|im_end|>")),
        bos_token=None,
        mask_token=None,
        eos_token="<|endoftext|>",
        rope_theta=1e6,
        extra_config=(("hidden_act", "silu"), ("use_sliding_window", False)),
    ),
)

# LLaDA2.0/2.1 (llada2.md): dInfer's chat format, with its "detailed thinking off" system turn
# when the messages bring none (real checkpoints ship their own template).
LLADA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}{{ '<role>SYSTEM</role>detailed thinking off<|role_end|>' }}{% endif %}"
    "{% for message in messages %}{{ '<role>' + message['role'] | upper | replace('USER', 'HUMAN') + '</role>'"
    " + message['content'] + '<|role_end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<role>ASSISTANT</role>' }}{% endif %}"
)

LLADA2 = Family(
    name="llada2",
    display_name="LLaDA2",
    model_types=("llada2_moe",),
    architectures=("LLaDA2MoeModelLM",),
    autoregressive=False,
    shifted_logits=False,
    # upstream's generate() takes one unpadded row at positions 0..W-1; a left-padded row numbers its real
    # tokens from 0 so that it decodes as it would alone (its blocks are aligned to its own position 0)
    positions_from_mask=True,
    chat_template=LLADA2_CHAT_TEMPLATE,
    tensor_names=TensorNames(
        embed="model.word_embeddings.weight",
        block_prefix="model.layers.{layer}.",
        block=(
            ("attn_norm", "input_layernorm"),
            ("qkv_proj", "attention.query_key_value"),  # rows [Q heads | K heads | V heads]
            ("q_norm", "attention.query_layernorm"),
            ("k_norm", "attention.key_layernorm"),
            ("o_proj", "attention.dense"),
            ("mlp_norm", "post_attention_layernorm"),
            ("gate_proj", "mlp.gate_proj"),  # the dense layers [0, first_k_dense_replace)
            ("up_proj", "mlp.up_proj"),
            ("down_proj", "mlp.down_proj"),
        ),
        final_norm="model.norm.weight",
        lm_head="lm_head.weight",
        router="mlp.gate",
        expert="mlp.experts.{expert}",
        shared_expert="mlp.shared_experts",
    ),
    # <|role_end|> ends a turn, but its id is not pinned and generate() never checks it
    special_ids=SpecialIds(mask_token_id=156895, eos_token_id=156892, pad_token_id=156892, eot_token_id=None),
    config_keys=dataclasses.replace(_QWEN_KEYS, moe=True),  # Qwen's key names, and the MoE keys
    tie_word_embeddings=False,
    rope_theta=600000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=16384,
    qkv_bias=False,
    bd_size=None,
    rejected=(
        RejectedFlags(
            ("use_qkv_bias", "use_bias"),
            "this LLaDA2 config has attention biases (use_qkv_bias / use_bias), which the released LLaDA2 models do not; "
            "dlmjax supports the released architecture only",
        ),
    ),
    tiny=TinyCheckpoint(
        special_tokens=("<|endoftext|>", "<|mask|>", "<|role_end|>"),
        config_ids=(("pad_token_id", "<|endoftext|>"), ("eos_token_id", "<|endoftext|>"),
                    ("mask_token_id", "<|mask|>")),
        bos_token=None,
        mask_token="<|mask|>",
        eos_token="<|endoftext|>",
        rope_theta=600000.0,
        extra_config=(("hidden_act", "silu"), ("use_qkv_bias", False), ("use_bias", False), ("use_qk_norm", True),
                      ("partial_rotary_factor", 0.5), ("num_experts", 8), ("num_experts_per_tok", 2),
                      ("moe_intermediate_size", 16), ("num_shared_experts", 1), ("n_group", 4), ("topk_group", 2),
                      ("routed_scaling_factor", 2.5), ("first_k_dense_replace", 1)),
    ),
)

FAMILIES: dict[str, Family] = {f.name: f for f in (LLADA, DREAM, FAST_DLLM_V2, QWEN2, LLADA2)}
_BY_MODEL_TYPE = {model_type.lower(): f for f in FAMILIES.values() for model_type in f.model_types}


def _supported() -> str:
    names = [f"{f.display_name} ('{f.model_types[0]}')" for f in FAMILIES.values()]
    return ", ".join(names[:-1]) + " and " + names[-1]


def get(name: str) -> Family:
    """The record of a family name (ModelConfig.family)."""
    if name not in FAMILIES:
        raise DlmjaxError(
            f"model family '{name}' is unknown to this dlmjax, which knows {', '.join(FAMILIES)}; "
            "convert the original checkpoint again with this version"
        )
    return FAMILIES[name]


def for_model_type(model_type: Any) -> Family:
    """The record of a config.json model_type (case-insensitive)."""
    family = _BY_MODEL_TYPE.get(str(model_type or "").lower())
    if family is None:
        raise DlmjaxError(f"model_type '{model_type}' is not supported; dlmjax loads {_supported()} checkpoints")
    return family
