"""Tokenizers as a new user meets them: the files of the tiny models load alike in plain
transformers and in dlmjax (and an export too), transformers' generate on the exported tiny-ar
gives dlmjax's answers, no advisory about torch, the model's positions as model_max_length,
and prompts the vocabulary cannot represent are refused."""

import json
import logging
import os
import pathlib
import re
import subprocess
import sys

import pytest

import dlmjax
from dlmjax import models
from dlmjax.decode import api
from dlmjax.errors import DlmjaxError
from dlmjax.tokenizer import unknown_pieces

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))

import tasks  # noqa: E402

PROMPTS = [e.prompt for e in tasks.make_split("test", 12)]  # word problems, Sort: and Reverse:


@pytest.fixture(scope="module")
def tiny_llada():
    return dlmjax.load("tiny-llada", dtype="float32", progress=False)


@pytest.fixture(scope="module")
def tiny_ar():
    return dlmjax.load("tiny-ar", dtype="float32", progress=False)


def _piece_ids(text: str) -> list[int]:
    """Ids of task text from the task vocabulary and its piece pattern alone (no tokenizer library)."""
    vocab = {piece: i for i, piece in enumerate(tasks.build_vocab())}
    return [vocab[p] for p in re.findall(tasks.PIECE, text)]


def _task_ids(prompt: str) -> list[int]:
    """The chat-formatted prompt's ids (the template trims the prompt)."""
    special = tasks.token_ids()
    return [special[tasks.BOS], special[tasks.USER], *_piece_ids(prompt.strip()), special[tasks.ASSISTANT]]


class _Records(logging.Handler):
    """Collects what transformers logs (its library logger does not propagate to the root)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("name", models.EMBEDDED)
def test_plain_autotokenizer_reads_the_tiny_models_and_their_exports_as_dlmjax_does(name, tiny_llada, tiny_ar, tmp_path):
    from transformers import AutoTokenizer

    lm = {"tiny-llada": tiny_llada, "tiny-ar": tiny_ar}.get(name) or dlmjax.load(name, progress=False)
    exported = lm.save_pretrained(tmp_path / "export")
    config = json.loads((exported / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == lm.config.max_position_embeddings
    for directory in (models.path(name), exported):
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        reverse = "Reverse: 1 7 1 0 8"  # Qwen2Tokenizer made [':', '1', '7', '1', '0', '8'] of it
        assert tokenizer.encode(reverse, add_special_tokens=False) == _piece_ids(reverse), (directory, type(tokenizer))
        for prompt in PROMPTS:
            expected = _task_ids(prompt)
            assert tasks.encode_prompt(tokenizer, prompt) == expected, (directory, prompt)
            assert lm.apply_chat_template([{"role": "user", "content": prompt}]) == expected, prompt


def test_transformers_generate_on_the_exported_tiny_ar_gives_dlmjax_answers(tiny_ar, tmp_path):
    """Greedy decoding in PyTorch from nothing but the exported files (AutoTokenizer and
    AutoModelForCausalLM) answers 8 test problems exactly as dlmjax does."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    exported = tiny_ar.save_pretrained(tmp_path / "tiny-ar-hf")
    tokenizer = AutoTokenizer.from_pretrained(str(exported))
    model = AutoModelForCausalLM.from_pretrained(str(exported), dtype=torch.float32).eval()
    examples = tasks.make_split("test", 8)
    ours = tiny_ar.generate([e.prompt for e in examples], chat=True, gen_length=32).texts
    special = tasks.token_ids()
    theirs = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only spin on a shared machine (40x slower here)
    try:
        for example in examples:
            ids = torch.tensor([tasks.encode_prompt(tokenizer, example.prompt)])
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=32,
                                     eos_token_id=[special[tasks.EOS], special[tasks.EOT]], pad_token_id=special[tasks.PAD])
            theirs.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    finally:
        torch.set_num_threads(threads)
    assert theirs == ours
    assert sum(tasks.is_correct(e, t) for e, t in zip(examples, ours)) >= 6, ours  # real answers, not shared garbage


def test_transformers_without_torch_stays_quiet_and_the_shipped_tokenizer_class_loads(tmp_path):
    """In a process where torch cannot be imported, dlmjax's tokenizer loading prints no
    "PyTorch was not found" advisory while other transformers warnings still show; and
    AutoTokenizer with trust_remote_code=True (as LLaDA users pass it) loads the class that
    the tiny models' auto_map names, reading tokenizer.json as it is."""
    script = f"""
import logging, sys
sys.modules["torch"] = None  # as on a machine without torch
from dlmjax.tokenizer import load_tokenizer
tokenizer = load_tokenizer({str(models.path("tiny-ar"))!r})
import transformers
assert not transformers.utils.is_torch_available()
logging.getLogger("transformers").warning("a real warning still shows")
auto = transformers.AutoTokenizer.from_pretrained({str(models.path("tiny-ar"))!r}, trust_remote_code=True)
print(type(auto).__name__, auto.encode("Reverse: 1 7", add_special_tokens=False) == tokenizer.encode("Reverse: 1 7"))
"""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "PyTorch was not found" not in result.stderr, result.stderr
    assert "a real warning still shows" in result.stderr
    assert result.stdout.split() == ["TokenizerJsonAsIs", "True"], result.stdout


def test_model_max_length_is_the_models_positions_and_long_prompts_get_dlmjax_error(tiny_llada, monkeypatch):
    monkeypatch.setattr(api, "engine", None)  # any attempt to compile would raise AttributeError
    tokenizer = tiny_llada.tokenizer
    assert tokenizer.model_max_length == tiny_llada.config.max_position_embeddings == 256
    long_prompt = "Sort:" + " 1" * 1500
    records = _Records()
    logging.getLogger("transformers").addHandler(records)
    try:
        for chat in (True, False):
            with pytest.raises(DlmjaxError, match="length 300[25] exceeds the model's 256 positions"):
                tiny_llada.generate(long_prompt, chat=chat, gen_length=32)
        assert records.messages == []
        tokenizer.encode(long_prompt)  # the control: transformers does warn, against the model's positions
        assert any("(3002 > 256)" in m for m in records.messages), records.messages
    finally:
        logging.getLogger("transformers").removeHandler(records)


def test_prompts_the_vocabulary_lacks_are_refused_before_compiling(tiny_llada, loaded, monkeypatch):
    monkeypatch.setattr(api, "engine", None)
    for chat in (True, False):
        with pytest.raises(DlmjaxError, match=r"lacks \('What', 'is'\).*task suite's prompts.*Tiny models and training"):
            tiny_llada.generate("What is 2+3?", chat=chat, gen_length=32)
    with pytest.raises(DlmjaxError, match=r"prompt 1 has words this model's vocabulary lacks \('Hello', 'how', 'are', 'you'\)"):
        tiny_llada.generate(["Sort: 3 1 2", "Hello, how are you?"], chat=True, gen_length=32)
    for example in tasks.make_split("test", 200):  # the task suite itself passes
        assert unknown_pieces(tiny_llada.tokenizer, example.prompt) == [], example.prompt
        assert unknown_pieces(tiny_llada.tokenizer, example.answer) == [], example.answer
    # A character-level test checkpoint knows printable ASCII only: the hint is its vocabulary.
    ascii_only = loaded("llada")
    assert unknown_pieces(ascii_only.tokenizer, "What is 2+3? {ok} ~") == []
    with pytest.raises(DlmjaxError, match=r"lacks \('é'\).*get_vocab"):
        ascii_only.generate("café", gen_length=16)


def test_unknown_pieces_only_for_tokenizers_that_can_have_them():
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    text = "Größe 2+3? naïve café 🙂 ok"
    # Byte-level BPE (LLaDA, Dream, Qwen): every string is representable, even without merges.
    byte_level = Tokenizer(tok_models.BPE({c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}, []))
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    assert unknown_pieces(PreTrainedTokenizerFast(tokenizer_object=byte_level), text) == []
    ascii_letters = {c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyzG23+?")}
    # A BPE without an unknown token drops what it lacks; with one, maps it there.
    dropping = Tokenizer(tok_models.BPE(ascii_letters, []))
    dropping.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    assert unknown_pieces(PreTrainedTokenizerFast(tokenizer_object=dropping), text) == ["öß", "ï", "é", "🙂"]
    with_unk = Tokenizer(tok_models.BPE({**ascii_letters, "<unk>": len(ascii_letters)}, [], unk_token="<unk>"))
    with_unk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    mapping = PreTrainedTokenizerFast(tokenizer_object=with_unk, unk_token="<unk>")
    assert unknown_pieces(mapping, text) == ["öß", "ï", "é", "🙂"]
    assert unknown_pieces(mapping, "<unk> ok") == []  # the unknown token itself, typed, is known
    # What plain transformers made of the tiny models' files before they pinned their class:
    # Qwen2Tokenizer over the task vocabulary drops "Reverse" (and the spaces).
    from transformers import Qwen2Tokenizer

    vocab = json.loads((models.path("tiny-ar") / "tokenizer.json").read_text())["model"]["vocab"]
    assert unknown_pieces(Qwen2Tokenizer(vocab=vocab, merges=[]), "Reverse: 1 7") == ["Reverse"]


def test_empty_prompts_and_zero_gen_length_are_refused_before_compiling(tiny_llada, tiny_ar, monkeypatch):
    monkeypatch.setattr(api, "engine", None)
    monkeypatch.setattr(api, "decode_ar", None)
    for lm in (tiny_llada, tiny_ar):
        for prompt in ("", "  \n", ["Sort: 3 1 2", ""]):
            with pytest.raises(DlmjaxError, match="a prompt is empty"):
                lm.generate(prompt, chat=True, gen_length=32)
        with pytest.raises(DlmjaxError, match="gen_length.* must be positive, got 0"):
            lm.generate("Sort: 3 1 2", chat=True, gen_length=0)
