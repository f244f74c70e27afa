"""Tokenizers and chat templates (transformers is used for these only; never torch)."""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Any, Sequence

from dlmjax.errors import DlmjaxError

def default_chat_template(family: str) -> str:
    """The family's template (dlmjax/families.py), used only when a tokenizer has none of its own."""
    from dlmjax import families

    return families.get(family).chat_template


def load_tokenizer(directory: str | pathlib.Path, positions: int | None = None):
    """A transformers tokenizer from a directory of tokenizer files, as `AutoTokenizer` reads it.

    `positions` (the model's max_position_embeddings) becomes its model_max_length, so that
    transformers' own length warnings and truncation follow the model, not the tokenizer file."""
    directory = pathlib.Path(directory)
    import_transformers()
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    kwargs: dict[str, Any] = {} if positions is None else {"model_max_length": positions}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # AutoTokenizer complains about the unknown model_type in config.json
    try:
        return AutoTokenizer.from_pretrained(str(directory), **kwargs)
    except Exception as first_error:  # e.g. a remote-code tokenizer class; fall back to tokenizer.json
        tokenizer_file = directory / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise DlmjaxError(
                f"cannot load a tokenizer from {directory} ({type(first_error).__name__}: {first_error}); "
                "put the checkpoint's tokenizer.json and tokenizer_config.json there"
            ) from None
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


class _NoTorchAdvice(logging.Filter):
    """Drops transformers' "PyTorch was not found" advisory: dlmjax uses transformers for
    tokenizers only, where torch is never needed. Every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("PyTorch was not found")


_NO_TORCH_ADVICE = _NoTorchAdvice()


def import_transformers():
    """`import transformers`, without its advisory about a missing torch (printed on import)."""
    # transformers logs the advisory on the library's root logger "transformers" when the module
    # is first imported; a filter there (added once) catches that record and nothing else.
    logging.getLogger("transformers").addFilter(_NO_TORCH_ADVICE)
    import transformers

    return transformers


# -- tokenizer files that every loader reads alike ---------------------------------
# tokenizer_config.json classes that mean "tokenizer.json as it is" (transformers 4 and 5 names).
GENERIC_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")
# transformers 5's AutoTokenizer replaces a declared generic class by the class registered for
# config.json's model_type when that type is on its list of hub checkpoints with a wrong class
# (qwen2 is): Qwen2Tokenizer then rebuilds the pipeline from the vocabulary alone, dropping the
# pre-tokenizer of tokenizer.json. An `auto_map` entry skips that replacement: without
# trust_remote_code transformers then builds the declared class, with it the class below (the
# same class under another name). Both read tokenizer.json as it is.
AS_IS_MODULE = "tokenization_as_is"
AS_IS_CLASS = "TokenizerJsonAsIs"
AS_IS_AUTO_MAP = {"AutoTokenizer": [None, f"{AS_IS_MODULE}.{AS_IS_CLASS}"]}
AS_IS_SOURCE = f'''"""The tokenizer of this checkpoint: tokenizer.json as it is (written by dlmjax).

tokenizer_config.json names this class in auto_map so that AutoTokenizer reads tokenizer.json
as it is instead of rebuilding a pipeline for config.json's model_type."""

from transformers import PreTrainedTokenizerFast


class {AS_IS_CLASS}(PreTrainedTokenizerFast):
    """transformers' generic fast tokenizer: tokenizer.json's normalizer, pre-tokenizer, model and decoder."""
'''


def pin_tokenizer_json(directory: str | pathlib.Path) -> bool:
    """Make `AutoTokenizer.from_pretrained(directory)` read tokenizer.json as it is, as
    tokenizer_config.json declares (see AS_IS_AUTO_MAP); True if the directory is pinned.

    Leaves alone a directory without tokenizer.json, one that declares a model-specific class,
    and one whose auto_map is its own (remote-code tokenizers)."""
    directory = pathlib.Path(directory)
    path = directory / "tokenizer_config.json"
    if not (path.is_file() and (directory / "tokenizer.json").is_file()):
        return False
    config = json.loads(path.read_text())
    if config.get("tokenizer_class") not in GENERIC_CLASSES or config.get("auto_map", AS_IS_AUTO_MAP) != AS_IS_AUTO_MAP:
        return False
    (directory / f"{AS_IS_MODULE}.py").write_text(AS_IS_SOURCE)
    if config.get("auto_map") != AS_IS_AUTO_MAP:
        config["auto_map"] = AS_IS_AUTO_MAP
        path.write_text(json.dumps(config, indent=2) + "\n")
    return True


# -- prompts the vocabulary cannot represent ------------------------------------------
def unknown_pieces(tokenizer, text: str) -> list[str]:
    """The pieces of `text` the tokenizer cannot represent, in order: those it maps to its
    unknown token or, for a model without one (a BPE), characters it drops.

    Byte-level BPE tokenizers (LLaDA, Dream, Qwen) represent every string, so for them this is
    always empty; word-level vocabularies (the tiny models') lack most words."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not text:
        return []
    # BPE, WordPiece and WordLevel models name their unknown token (a BPE may have none);
    # a Unigram model's is the tokenizer's.
    model = backend.model
    unk_token = model.unk_token if hasattr(model, "unk_token") else getattr(tokenizer, "unk_token", None)
    unk_id = backend.token_to_id(unk_token) if unk_token else None
    if unk_id is not None:
        bad = [False] * len(text)
        encoding = backend.encode(text, add_special_tokens=False)
        for token_id, (start, end) in zip(encoding.ids, encoding.offsets):
            # A word-level vocabulary's unknown token can be a real piece (the tiny models map
            # unknowns to " "): only text other than the piece itself is unknown.
            if token_id == unk_id and text[start:end] != unk_token:
                bad[start:end] = [True] * (end - start)
    else:
        # Without an unknown token a BPE drops what it lacks (and misplaces the offsets of the
        # rest of the word), so each character is tried on its own.
        dropped = {c for c in set(text) if not c.isspace() and not backend.encode(c, add_special_tokens=False).ids}
        bad = [c in dropped for c in text]
    runs = "".join(c if b and not c.isspace() else " " for c, b in zip(text, bad))
    return list(dict.fromkeys(runs.split()))


def check_vocabulary(tokenizer, texts: Sequence[str], directory: pathlib.Path | None = None) -> None:
    """Refuse prompts with pieces the vocabulary lacks: the model would read something else and
    answer garbage. `directory` (the checkpoint's Hugging Face files) only picks the hint."""
    for i, text in enumerate(texts):
        pieces = unknown_pieces(tokenizer, text)
        if pieces:
            which = "the prompt" if len(texts) == 1 else f"prompt {i}"
            shown = ", ".join(repr(p) for p in pieces[:8]) + (f" and {len(pieces) - 8} more" if len(pieces) > 8 else "")
            raise DlmjaxError(
                f"{which} has words this model's vocabulary lacks ({shown}), which it would misread and answer with "
                f"garbage; {_vocabulary_hint(directory)}"
            )


def _vocabulary_hint(directory: pathlib.Path | None) -> str:
    """What the model understands: the task suite for the tiny models, else its vocabulary."""
    log = directory / "train_log.json" if directory is not None else None
    if log is not None and log.is_file() and "experiments/train_tiny.py" in log.read_text():
        return (
            "the tiny models understand only the task suite's prompts, such as 'Sort: 7 3 9 1 4 2', "
            "'Reverse: 5 2 8 1 6' or 'Mia has 7 apples. She buys 5 more. How many now?' (README: Tiny models and training)"
        )
    return "write the prompt with pieces of its vocabulary only (lm.tokenizer.get_vocab() lists them)"


def apply_chat_template(tokenizer, family: str, messages: Sequence[dict], tokenize: bool = True):
    """Prompt text (or its ids) for a conversation, ending with the assistant header."""
    if not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise DlmjaxError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    template = tokenizer.chat_template or default_chat_template(family)
    text = tokenizer.apply_chat_template(list(messages), chat_template=template, tokenize=False, add_generation_prompt=True)
    if not tokenize:
        return text
    # verbose=False: a prompt longer than the model goes on to dlmjax's own error, which also
    # counts gen_length, instead of transformers' warning first.
    return tokenizer.encode(text, add_special_tokens=False, verbose=False)
