"""Tokenizers and chat templates (transformers is used for these only; never torch)."""

from __future__ import annotations

import json
import pathlib
from typing import Any, Sequence

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
# Dream and Fast-dLLM v2 use Qwen2.5's ChatML turns (the exact upstream text, with its
# default system prompt, is unverified; real checkpoints ship their own template).
QWEN_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def default_chat_template(family: str) -> str:
    return LLADA_CHAT_TEMPLATE if family == "llada" else QWEN_CHAT_TEMPLATE


def load_tokenizer(directory: str | pathlib.Path):
    """A transformers tokenizer from a directory of tokenizer files."""
    directory = pathlib.Path(directory)
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # AutoTokenizer complains about the unknown model_type in config.json
    try:
        if _declares_generic_class(directory):
            # AutoTokenizer would swap in the class registered for config.json's model_type
            # (Qwen2Tokenizer for qwen2), which rebuilds the pipeline instead of using tokenizer.json.
            return PreTrainedTokenizerFast.from_pretrained(str(directory))
        return AutoTokenizer.from_pretrained(str(directory))
    except Exception as first_error:  # e.g. a remote-code tokenizer class; fall back to tokenizer.json
        tokenizer_file = directory / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise DlmjaxError(
                f"cannot load a tokenizer from {directory} ({type(first_error).__name__}: {first_error}); "
                "put the checkpoint's tokenizer.json and tokenizer_config.json there"
            ) from None
        kwargs: dict[str, Any] = {}
        config_file = directory / "tokenizer_config.json"
        if config_file.is_file():
            config = json.loads(config_file.read_text())
            for key in ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token", "chat_template"):
                value = config.get(key)
                if isinstance(value, dict):
                    value = value.get("content")
                if value is not None:
                    kwargs[key] = value
        return PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)


def _declares_generic_class(directory: pathlib.Path) -> bool:
    """tokenizer_config.json names the generic fast class and tokenizer.json is there."""
    path = directory / "tokenizer_config.json"
    if not (path.is_file() and (directory / "tokenizer.json").is_file()):
        return False
    try:
        return json.loads(path.read_text()).get("tokenizer_class") in ("PreTrainedTokenizerFast", "TokenizersBackend")
    except ValueError:
        return False


def apply_chat_template(tokenizer, family: str, messages: Sequence[dict], tokenize: bool = True):
    """Prompt text (or its ids) for a conversation, ending with the assistant header."""
    if not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise DlmjaxError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    template = tokenizer.chat_template or default_chat_template(family)
    text = tokenizer.apply_chat_template(list(messages), chat_template=template, tokenize=False, add_generation_prompt=True)
    if not tokenize:
        return text
    return tokenizer.encode(text, add_special_tokens=False)
