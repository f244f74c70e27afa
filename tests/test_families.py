"""The family table: every record is complete and agrees with the model, the converter and the tiny checkpoints."""

import dataclasses
import json
import re

import pytest
import torch
import transformers
from flax import nnx
from tokenizers import Tokenizer

from dlmjax import families
from dlmjax.config import ModelConfig, from_hf_config, to_hf_config
from dlmjax.convert import layouts
from dlmjax.errors import DlmjaxError
from dlmjax.model import Transformer
from dlmjax.testing import tiny_hf_config, write_tokenizer
from dlmjax.tokenizer import default_chat_template

NAMES = sorted(families.FAMILIES)
RECORDS = [families.FAMILIES[name] for name in NAMES]


def _tiny(name, **kwargs):
    return tiny_hf_config(name, num_layers=2, num_heads=4, num_kv_heads=2, **kwargs)


def test_registry_keys_and_model_types_are_unique():
    assert all(key == record.name for key, record in families.FAMILIES.items())
    model_types = [t.lower() for record in RECORDS for t in record.model_types]
    assert len(model_types) == len(set(model_types))
    for record in RECORDS:
        assert families.get(record.name) is record
        for model_type in record.model_types:
            assert families.for_model_type(model_type) is record
            assert families.for_model_type(model_type.upper()) is record  # configs spell them freely


@pytest.mark.parametrize("record", RECORDS, ids=NAMES)
def test_record_is_complete_and_consistent(record):
    for field in dataclasses.fields(record):
        value = getattr(record, field.name)
        if field.name not in ("bd_size", "rejected") and not isinstance(value, bool):
            assert value not in (None, "", ()), f"{record.name}.{field.name} is empty"
    # A causal model has no mask token and predicts the next token.
    assert record.autoregressive == (record.special_ids.mask_token_id is None)
    if record.autoregressive:
        assert record.shifted_logits
    # A block size is read exactly when the format has a key for it.
    assert (record.bd_size is None) == (record.config_keys.bd_size is None)
    names = record.tensor_names
    assert "{layer}" in names.block_prefix
    hf_names = [theirs for _, theirs in names.block]
    assert len(set(hf_names)) == len(hf_names)
    assert len({names.embed, names.final_norm, names.lm_head}) == 3
    tiny = record.tiny
    assert len(set(tiny.special_tokens)) == len(tiny.special_tokens)
    assert {tiny.eos_token, tiny.bos_token, tiny.mask_token} - {None} <= set(tiny.special_tokens)
    assert (tiny.mask_token is None) == record.autoregressive
    assert {token for _, token in tiny.config_ids} <= set(tiny.special_tokens)


@pytest.mark.parametrize("record", RECORDS, ids=NAMES)
@pytest.mark.parametrize("tied", [False, True])
def test_tensor_names_cover_every_parameter_of_the_model(record, tied):
    cfg = from_hf_config(_tiny(record.name, tie_word_embeddings=tied))
    model = nnx.eval_shape(lambda: Transformer(cfg))
    params = {path: tuple(leaf.shape) for path, leaf in nnx.state(model, nnx.Param).flat_state()}
    specs = layouts.tensor_specs(cfg)
    assert layouts.parameter_shapes(cfg, specs) == params
    # a stacked weight (experts) is read from exactly one tensor per slice
    slices: dict = {}
    for s in specs:
        if s.index is not None:
            slices.setdefault(s.path, []).append(s.index)
    assert all(sorted(indices) == list(range(cfg.num_experts)) for indices in slices.values())
    assert bool(slices) == bool(cfg.num_experts)
    hf_names = [s.hf_name for s in specs]
    assert len(set(hf_names)) == len(hf_names)
    assert (layouts.head_name(cfg) in hf_names) == (not tied)
    assert all(s.is_norm == (len(s.shape) == 1 and s.path[-1] == "weight") for s in specs)  # 1-D weights: norm scales
    # LoRA targets: every projection is reachable from the last part of its HF module name.
    roles = layouts.hf_module_to_role(cfg)
    assert sorted(roles.values()) == sorted(ours for ours, _ in record.tensor_names.block if not ours.endswith("norm"))


@pytest.mark.parametrize("record", RECORDS, ids=NAMES)
def test_config_round_trips_through_export(record):
    hf = _tiny(record.name, tie_word_embeddings=not record.tie_word_embeddings, rope_theta=4321.0)
    cfg = from_hf_config(hf)
    assert cfg.family == record.name and cfg.family_spec is record
    assert (cfg.is_autoregressive, cfg.shifted_logits, cfg.positions_from_mask) == (
        record.autoregressive, record.shifted_logits, record.positions_from_mask)
    assert to_hf_config(cfg, hf) == hf  # nothing added, nothing lost
    fresh = to_hf_config(cfg)  # an export without the original config.json
    assert fresh["model_type"] == record.model_types[0] and fresh["architectures"] == list(record.architectures)
    assert from_hf_config(fresh) == cfg
    # Every key the format names is one the tiny checkpoint writes, so the tests read them all.
    keys = record.config_keys
    for key in (*keys.vocab_size, keys.hidden_size, keys.num_layers, keys.num_heads, keys.num_kv_heads,
                keys.intermediate_size, keys.max_position_embeddings, keys.tie_word_embeddings, keys.rms_norm_eps,
                keys.rope_theta, keys.qkv_bias, keys.bd_size):
        assert key is None or key in hf, key


@pytest.mark.parametrize("record", RECORDS, ids=NAMES)
def test_absent_keys_take_the_family_defaults(record):
    keys = record.config_keys
    optional = [keys.max_position_embeddings, keys.tie_word_embeddings, keys.rms_norm_eps, keys.rope_theta,
                keys.qkv_bias, keys.bd_size, "mask_token_id", "eos_token_id", "pad_token_id", "eot_token_id"]
    # The default ids are the released checkpoints', so the vocabulary must be real-sized to hold them.
    hf = {k: v for k, v in _tiny(record.name, vocab_size=160_000).items() if k not in optional}
    cfg = from_hf_config(hf)
    assert cfg.max_position_embeddings == record.max_position_embeddings
    assert cfg.tie_word_embeddings == record.tie_word_embeddings
    assert (cfg.rms_norm_eps, cfg.rope_theta, cfg.qkv_bias, cfg.bd_size) == (
        record.rms_norm_eps, record.rope_theta, record.qkv_bias, record.bd_size)
    ids = record.special_ids
    assert (cfg.mask_token_id, cfg.eos_token_id, cfg.eot_token_id) == (
        ids.mask_token_id, ids.eos_token_id, ids.eot_token_id)
    assert cfg.pad_token_id == (ids.eos_token_id if ids.pad_token_id is None else ids.pad_token_id)


@pytest.mark.parametrize("record", RECORDS, ids=NAMES)
def test_tiny_ids_name_their_tokens_in_the_tiny_vocab(record, tmp_path):
    hf = _tiny(record.name)
    cfg = from_hf_config(hf)
    write_tokenizer(tmp_path, hf)
    vocab = Tokenizer.from_file(str(tmp_path / "tokenizer.json")).get_vocab()
    assert len(vocab) == cfg.vocab_size
    for key, token in record.tiny.config_ids:
        assert vocab[token] == hf[key] < cfg.vocab_size
    for key in ("mask_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(cfg, key)
        assert value is None or 0 <= value < cfg.vocab_size, key
    # The tokenizer's named special tokens are the config's ids.
    named = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert vocab[named["eos_token"]] == cfg.eos_token_id
    assert (named["mask_token"] and vocab[named["mask_token"]]) == cfg.mask_token_id
    if named["bos_token"] and "bos_token_id" in hf:  # Qwen2's tokenizer names none, though its config has an id
        assert vocab[named["bos_token"]] == hf["bos_token_id"]


@pytest.mark.parametrize("record", RECORDS, ids=NAMES)
def test_default_chat_template_uses_the_tiny_special_tokens(record):
    assert default_chat_template(record.name) == record.chat_template
    tokens = set(re.findall(r"<\|[a-z_]+\|>", record.chat_template))
    assert tokens and tokens <= set(record.tiny.special_tokens)


IN_TRANSFORMERS = [r for r in RECORDS if hasattr(transformers, r.architectures[0])]


@pytest.mark.parametrize("record", IN_TRANSFORMERS, ids=lambda r: r.name)
def test_records_agree_with_the_transformers_class(record):
    """Where transformers ships the architecture, it is the independent reference for keys, defaults and names."""
    hf = _tiny(record.name, tie_word_embeddings=False)
    theirs, ours = transformers.AutoConfig.for_model(**hf), from_hf_config(hf)
    for field in ("vocab_size", "hidden_size", "num_key_value_heads", "num_hidden_layers", "num_attention_heads",
                  "intermediate_size", "max_position_embeddings", "tie_word_embeddings", "rms_norm_eps"):
        mine = {"num_key_value_heads": "num_kv_heads", "num_hidden_layers": "num_layers",
                "num_attention_heads": "num_heads"}.get(field, field)
        assert getattr(theirs, field) == getattr(ours, mine), field
    default = transformers.AutoConfig.for_model(record.model_types[0])
    theta = (getattr(default, "rope_parameters", None) or {}).get("rope_theta") or default.rope_theta
    assert (default.rms_norm_eps, theta, default.max_position_embeddings, default.tie_word_embeddings) == (
        record.rms_norm_eps, record.rope_theta, record.max_position_embeddings, record.tie_word_embeddings)
    with torch.device("meta"):
        model = getattr(transformers, record.architectures[0])(theirs)
    assert set(model.state_dict()) == {s.hf_name for s in layouts.tensor_specs(ours)}


@pytest.mark.parametrize("record", [r for r in RECORDS if r.rejected], ids=lambda r: r.name)
def test_rejected_switches_give_their_message(record):
    hf = _tiny(record.name)
    for rejected in record.rejected:
        for key in rejected.keys:
            with pytest.raises(DlmjaxError) as err:
                from_hf_config({**hf, key: True})
            assert str(err.value) == rejected.message


def test_unknown_model_type_and_family_get_one_line():
    with pytest.raises(DlmjaxError) as err:
        from_hf_config({**_tiny("dream"), "model_type": "gpt2"})
    message = str(err.value)
    assert message.startswith("model_type 'gpt2' is not supported; dlmjax loads ") and "\n" not in message
    assert all(f"{r.display_name} ('{r.model_types[0]}')" in message for r in RECORDS)
    with pytest.raises(DlmjaxError, match="model_type 'None' is not supported"):
        from_hf_config({k: v for k, v in _tiny("dream").items() if k != "model_type"})
    # A dlmjax.json written by a newer dlmjax may name a family this one lacks.
    cfg = from_hf_config(_tiny("llada"))
    with pytest.raises(DlmjaxError, match="model family 'llada9' is unknown") as err:
        ModelConfig(**{**cfg.__dict__, "family": "llada9"}).validate()
    assert "\n" not in str(err.value)
