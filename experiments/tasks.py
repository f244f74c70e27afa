"""A synthetic task suite whose answers can be checked, and its tokenizer.

Three kinds of problem, each with a final `#### answer` line as in GSM8K:

    arith    a word problem of 2 or 3 steps with a short chain of thought:
             "Mia has 7 apples. She buys 5 more. She gives away 3. How many now?"
             -> "7+5=12. 12-3=9. #### 9"
    sort     "Sort: 7 3 9 1 4"        -> "#### 1 3 4 7 9"
    reverse  "Reverse: 5 2 8 1 6"     -> "#### 6 1 8 2 5"

The chain of thought makes tokens depend on each other (each step's result feeds the
next), so committing many tokens at once costs accuracy; sort and reverse are the easy,
parallel-friendly part. Splits come from a fixed seed and the test prompts never occur in
the train split.

Suite v2 (`suite="v2"`, for a 64-token canvas) leaves room to speed up: answers are longer
chains of dependent steps next to parts that can be written in parallel:

    arith2   two people's word problems of 2 or 3 steps each, 5 at most (independent chains, which can be
             written side by side), then their sum, which needs both:
             "Mia has 7 apples. She buys 5 more. She gives away 3. Tom has 4 apples. He doubles
             them. How many now?" -> "7+5=12. 12-3=9. 4*2=8. 9+8=17. #### 17"
    add      a running sum of 4 to 7 digits, each partial sum feeding the next:
             "Add: 3 5 2 8" -> "3+5=8. 8+2=10. 10+8=18. #### 18"
    sort, reverse   as in v1, of 6 to 10 digits.

Kinds come in proportion 2:2:1:1. v2 adds 13 words ("Add", and each name after a space) in
slots v1 leaves unused, so every v1 text has the same ids under both tokenizers.

The tokenizer is word level (a `tokenizers` JSON, loaded through transformers like any
checkpoint's): words carry their leading space, every digit is its own token (spaces
before numbers are tokens of their own, so a digit is the same token everywhere), and special
tokens mark mask, end of text (EOS, also the padding of answers), end of turn and pad.

    python experiments/tasks.py --show 5      # print a few examples
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import random
import re

NAMES = ["Mia", "Tom", "Ann", "Leo", "Sara", "Ben", "Nina", "Omar", "Lucy", "Ivan", "Zoe", "Sam"]
PRONOUNS = {"Mia": "She", "Tom": "He", "Ann": "She", "Leo": "He", "Sara": "She", "Ben": "He", "Nina": "She",
            "Omar": "He", "Lucy": "She", "Ivan": "He", "Zoe": "She", "Sam": "He"}
ITEMS = ["apples", "books", "coins", "cards", "pens", "eggs", "shells", "stamps", "marbles", "cookies"]
KINDS = ("arith", "sort", "reverse")
SUITES = {"v1": (KINDS, (2, 1, 1)), "v2": (("arith2", "add", "sort", "reverse"), (2, 2, 1, 1))}
V2_WORDS = ["Add"] + [f" {name}" for name in NAMES]  # v2's pieces beyond v1's (a second name follows a space), in v1's unused slots

# Special tokens: id order is fixed (they follow the words in the vocabulary).
BOS, EOS, EOT, PAD, MASK, USER, ASSISTANT = (
    "<|bos|>", "<|eos|>", "<|eot|>", "<|pad|>", "<|mask|>", "<|user|>", "<|assistant|>",
)
SPECIALS = [BOS, EOS, EOT, PAD, MASK, USER, ASSISTANT]
VOCAB_SIZE = 128
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ ('<|user|>' if message['role'] == 'user' else '<|assistant|>') + (message['content'] | trim) }}"
    "{% if message['role'] != 'user' %}{{ '<|eot|>' }}{% endif %}{% endfor %}{{ '<|assistant|>' }}"
)
# One piece per word (with its leading space), per "####" (with its leading space), per digit and per other
# character. A digit never carries a space, so each digit is one token wherever it stands.
PIECE = r" ?[A-Za-z]+| ?####|[0-9]|[\s\S]"
MAX_VALUE = 99  # arithmetic values stay below 100


@dataclasses.dataclass(frozen=True)
class Example:
    kind: str
    prompt: str  # the user turn
    answer: str  # the full target, chain of thought and "#### final"
    final: str  # what must follow "####"


def _arith(rng: random.Random, name: str | None = None, item: str | None = None, n_steps: int | None = None) -> Example:
    name, item = name or rng.choice(NAMES), item or rng.choice(ITEMS)
    he = PRONOUNS[name]
    value = rng.randint(2, 20)
    sentences = [f"{name} has {value} {item}."]
    steps = []
    for _ in range(n_steps or rng.choice((2, 3))):
        # Every intermediate value stays within 1..MAX_VALUE, so numbers have at most two digits.
        options = ["sub"] if value > 1 else []
        options += ["add"] if value < MAX_VALUE else []
        options += ["mul"] if 2 * value <= MAX_VALUE else []
        op = rng.choice(options)
        if op == "add":
            n = rng.randint(1, min(9, MAX_VALUE - value))
            sentences.append(rng.choice([f"{he} buys {n} more.", f"{he} finds {n} more."]))
            steps.append(f"{value}+{n}={value + n}.")
            value += n
        elif op == "sub":
            n = rng.randint(1, min(9, value - 1))
            sentences.append(rng.choice([f"{he} gives away {n}.", f"{he} loses {n}."]))
            steps.append(f"{value}-{n}={value - n}.")
            value -= n
        else:
            n = 2 if 3 * value > MAX_VALUE else rng.choice((2, 3))
            sentences.append(f"{he} {'doubles' if n == 2 else 'triples'} them.")
            steps.append(f"{value}*{n}={value * n}.")
            value *= n
    sentences.append("How many now?")
    return Example("arith", " ".join(sentences), " ".join(steps) + f" #### {value}", str(value))


def _arith2(rng: random.Random, anchored: bool = False) -> Example:
    """With `anchored`, each chain opens with its person's name ("Ben:17+4=21. ... Ann:8*3=24. ..."),
    from the same draws (experiments/v2_diagnosis.py's variant; suite v2 has no names)."""
    first, second = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    a = _arith(rng, name=first, item=item)
    b = _arith(rng, name=second, item=item, n_steps=2 if a.answer.count("=") == 3 else rng.choice((2, 3)))  # 5 steps at most
    va, vb = int(a.final), int(b.final)
    prompt = a.prompt.removesuffix(" How many now?") + " " + b.prompt
    names = (f"{first}:", f" {second}:") if anchored else ("", " ")
    steps = names[0] + a.answer.split(" ####")[0] + names[1] + b.answer.split(" ####")[0] + f" {va}+{vb}={va + vb}."
    return Example("arith2", prompt, f"{steps} #### {va + vb}", str(va + vb))


def _add(rng: random.Random) -> Example:
    digits = [rng.randint(1, 9) for _ in range(rng.randint(4, 7))]
    total, steps = digits[0], []
    for d in digits[1:]:
        steps.append(f"{total}+{d}={total + d}.")
        total += d
    return Example("add", f"Add: {' '.join(map(str, digits))}", " ".join(steps) + f" #### {total}", str(total))


def _digits(rng: random.Random, lo: int = 4, hi: int = 7) -> list[int]:
    return [rng.randint(0, 9) for _ in range(rng.randint(lo, hi))]


def make_example(kind: str, rng: random.Random, suite: str = "v1") -> Example:
    if kind == "arith":
        return _arith(rng)
    if kind == "arith2":
        return _arith2(rng)
    if kind == "add":
        return _add(rng)
    digits = _digits(rng) if suite == "v1" else _digits(rng, 6, 10)
    result = sorted(digits) if kind == "sort" else digits[::-1]
    final = " ".join(map(str, result))
    return Example(kind, f"{kind.capitalize()}: {' '.join(map(str, digits))}", f"#### {final}", final)


def make_split(split: str, n: int, seed: int = 0, suite: str = "v1") -> list[Example]:
    """`n` examples of the split, kinds in the suite's proportions (v1 arith:sort:reverse 2:1:1,
    v2 arith2:add:sort:reverse 2:2:1:1).

    The test split is drawn first from its own stream; the train split skips any prompt
    that the first 10,000 test examples contain, so the two never share a problem.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    if suite not in SUITES:
        raise ValueError(f"suite must be one of {', '.join(SUITES)}, not {suite!r}")
    kinds, weights = SUITES[suite]
    tag = "" if suite == "v1" else f"{suite}-"  # v1's streams are unchanged
    if split == "test":
        rng = random.Random(f"dlmjax-tasks-{tag}test-{seed}")
        return [make_example(rng.choices(kinds, weights)[0], rng, suite) for _ in range(n)]
    held_out = {e.prompt for e in make_split("test", 10_000, seed, suite)}
    rng = random.Random(f"dlmjax-tasks-{tag}train-{seed}")
    out = []
    while len(out) < n:
        example = make_example(rng.choices(kinds, weights)[0], rng, suite)
        if example.prompt not in held_out:
            out.append(example)
    return out


ANSWER_PATTERN = r"####([^\n]*)"  # the final answer: after the first '####', to the end of the line


def extract_final(text: str) -> str | None:
    """The text after the first '####', up to the end of the line, or None."""
    match = re.search(ANSWER_PATTERN, text)
    return match.group(1).strip() if match else None


def is_correct(example: Example, text: str) -> bool:
    return extract_final(text) == example.final


# -- tokenizer -----------------------------------------------------------------------

def _pieces(text: str) -> list[str]:
    return re.findall(PIECE, text)


def build_vocab(suite: str = "v1") -> list[str]:
    """Every piece the task can produce, in a fixed order (v2's extra words after v1's)."""
    words = set()
    for sentence in ["Sort:", "Reverse:", "#### + - * = . :", " How many now?"]:
        words.update(_pieces(sentence))
    for name in NAMES:
        words.update(_pieces(f"{name} has {PRONOUNS[name]}"))
    for item in ITEMS:
        words.update(_pieces(f" {item}"))
    for phrase in ["buys more", "finds more", "gives away", "loses", "doubles them", "triples them"]:
        words.update(_pieces(" " + phrase))
    words.update(str(d) for d in range(10))
    words.update(["####", " ####"])
    words.update([" ", "\n", "#", "?", ","])
    pieces = sorted(words) + (V2_WORDS if suite == "v2" else [])
    if len(pieces) + len(SPECIALS) > VOCAB_SIZE:
        raise ValueError(f"{len(pieces)} pieces do not fit a vocabulary of {VOCAB_SIZE}")
    return pieces


def token_ids() -> dict[str, int]:
    """Special token name -> id (the specials sit at the top of the vocabulary)."""
    first = VOCAB_SIZE - len(SPECIALS)
    return {name: first + i for i, name in enumerate(SPECIALS)}


def write_tokenizer(directory: str | pathlib.Path, positions: int, suite: str = "v1") -> pathlib.Path:
    """tokenizer.json + tokenizer_config.json for the task vocabulary, for a model of `positions`
    positions (its model_max_length), read alike by dlmjax and plain transformers."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    from dlmjax.tokenizer import pin_tokenizer_json

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pieces = build_vocab(suite)
    vocab = {piece: i for i, piece in enumerate(pieces)}
    for i in range(len(pieces), VOCAB_SIZE - len(SPECIALS)):
        vocab[f"<|unused_{i}|>"] = i
    vocab.update(token_ids())
    tok = Tokenizer(models.WordLevel(vocab, unk_token=" "))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PIECE), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
        "mask_token": MASK, "unk_token": None, "additional_special_tokens": [EOT, USER, ASSISTANT],
        "add_bos_token": False, "add_eos_token": False, "padding_side": "left", "model_max_length": positions,
        "chat_template": CHAT_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    # The generic class alone is not enough: transformers 5 swaps in Qwen2Tokenizer for tiny-ar's
    # model_type, which ignores the pre-tokenizer above ("Reverse: 1 7" loses "Reverse" and the spaces).
    pin_tokenizer_json(directory)
    return directory


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """The chat-formatted prompt ids, exactly as `lm.generate(..., chat=True)` builds them."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], chat_template=CHAT_TEMPLATE,
                                         tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", default="test")
    parser.add_argument("--show", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--suite", default="v1", choices=sorted(SUITES))
    parser.add_argument("--jsonl", help="write --show examples of --split to this JSONL file (prompt, answer) instead")
    args = parser.parse_args(argv)
    if args.jsonl:
        import json

        with open(args.jsonl, "w") as f:
            for example in make_split(args.split, args.show, args.seed, args.suite):
                f.write(json.dumps({"prompt": example.prompt, "answer": example.answer}) + "\n")
        return
    for example in make_split(args.split, args.show, args.seed, args.suite):
        print(f"[{example.kind}] {example.prompt}\n    -> {example.answer}")


if __name__ == "__main__":
    main()
