"""dlmjax.load, the conversion cache, the tokenizer and chat templates, and input checks."""

import numpy as np
import pytest

import dlmjax
from dlmjax.errors import DlmjaxError


def test_load_converts_once_and_reuses_the_cache(hf_checkpoint, monkeypatch):
    import dlmjax.convert.hf_import as hf_import

    first = dlmjax.load(hf_checkpoint("dream"), progress=False)
    assert first.directory is not None and first.directory.parent.name == "dlmjax-cache"

    def refuse(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr(hf_import, "convert", refuse)
    second = dlmjax.load(hf_checkpoint("dream"), progress=False)
    assert second.directory == first.directory
    ids = np.arange(10)[None]
    np.testing.assert_array_equal(first.logits(ids), second.logits(ids))


def test_dtype_override(converted):
    lm = dlmjax.load(converted("llada"), dtype="bfloat16")
    assert lm.dtype == np.dtype("bfloat16") and lm.config.dtype == "float32"
    assert lm.logits(np.arange(8)[None]).dtype == np.float32
    with pytest.raises(DlmjaxError, match="dtype 'int8' is not supported"):
        dlmjax.load(converted("llada"), dtype="int8")


def test_missing_model_errors(tmp_path):
    with pytest.raises(DlmjaxError, match="no checkpoint directory"):
        dlmjax.load(tmp_path / "absent")
    with pytest.raises(DlmjaxError, match="cannot download 'some-org/some-model'.*hf download"):
        dlmjax.load("some-org/some-model")


def test_logits_input_checks(converted):
    lm = dlmjax.load(converted("llada"))
    too_long = np.zeros((1, lm.config.max_position_embeddings + 1), np.int32)
    with pytest.raises(DlmjaxError, match="exceeds the model's 512 positions"):
        lm.logits(too_long)
    with pytest.raises(DlmjaxError, match="attention_mask shape"):
        lm.logits(np.zeros((2, 5), np.int32), np.ones((2, 4)))
    with pytest.raises(DlmjaxError, match="non-empty integer array"):
        lm.logits(np.zeros((1, 0), np.int32))
    with pytest.raises(DlmjaxError, match=r"token ids must lie in \[0, 128\)"):
        lm.logits(np.array([[1, 200]]))
    with pytest.raises(DlmjaxError, match="unknown attention mode"):
        lm.logits(np.zeros((1, 4), np.int32), mode="sliding_window")
    with pytest.raises(DlmjaxError, match="all zeros"):
        lm.logits(np.zeros((1, 4), np.int32), np.zeros((1, 4)))


def test_llada_chat_template_always_appends_the_assistant_header(converted):
    lm = dlmjax.load(converted("llada"))
    messages = [{"role": "user", "content": "  2+2?  "}]
    text = lm.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    ids = lm.apply_chat_template(messages)
    assert ids[0] == lm.tokenizer.convert_tokens_to_ids("<|startoftext|>")
    assert lm.tokenizer.decode(ids) == text
    with pytest.raises(DlmjaxError, match="messages must be"):
        lm.apply_chat_template([])


def test_dream_chat_template(converted):
    lm = dlmjax.load(converted("dream"))
    text = lm.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert lm.tokenizer.convert_tokens_to_ids("<|mask|>") == lm.config.mask_token_id
