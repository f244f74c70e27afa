"""Teacher trajectories: a model's own answers, decoded by our engine, as training data.

dParallel distils a model on its own answers (training-recipes.md 1.2: the official data holds
`question` and `llm_response`). This module writes such a file:

    python -m dlmjax.train.trajectories --model GSAI-ML/LLaDA-8B-Instruct --prompts prompts.jsonl \\
        --out runs/dparallel-llada-8b-data.jsonl --method llada --knob steps=256 --knob block_length=32 \\
        --gen-length 256 --batch-size 64 --mesh data=8 --no-chat

The output is JSONL. Its first line is a header, {"trajectories": {...}}, holding the decode
settings, the model and a fingerprint of its tokenizer. Every later line is one prompt:

    {"index": 7, "question": "...", "llm_response": "...", "tokens": 93, "finished": true,
     "nfe": 256, "correct": null, "usable": true}

`finished`: the answer ended with a stop token inside gen_length. `correct`: with --answer-field
(and --answer-pattern, a regex whose first group is compared), whether the answer matched the
reference, else null. `usable`: whether the row passes --keep (all, finished, correct). The
training CLI reads such a file as it reads any JSONL, with data.prompt_field question and
data.answer_field llm_response (the official field names), takes only the usable rows, and
refuses a file written with another tokenizer or one without usable rows.

Prompts go in fixed batches of --batch-size (batch b holds prompts b*B .. b*B+B-1, decoded with
seed + b), and each batch is appended in one write once decoded. A rerun of the same command
resumes: the batches already in the file are skipped, a batch cut short by a kill is dropped
and decoded again, and the result equals an uninterrupted run. A rerun with other settings is
refused. Only the primary process writes; on a pod every process runs the same command.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import sys
from typing import Callable, Sequence

import numpy as np

from dlmjax.errors import DlmjaxError
from dlmjax.train.cli import answer_matches, is_primary, read_records

KEEP = ("all", "finished", "correct")
HEADER = "trajectories"


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the tokenizer's vocabulary (token -> id): equal iff the ids mean the same."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def read_header(path: str | os.PathLike) -> dict | None:
    """The settings of a trajectory file (its first line's "trajectories"), or None for any
    other file (a directory, Parquet, or JSONL without the header)."""
    p = pathlib.Path(path)
    if not p.is_file() or p.suffix == ".parquet":
        return None
    with p.open() as f:
        for line in f:
            if line.strip():
                try:
                    first = json.loads(line)
                except ValueError:
                    return None
                return first.get(HEADER) if isinstance(first, dict) and isinstance(first.get(HEADER), dict) else None
    return None


def check_for_training(path: str | os.PathLike, tokenizer, records: list[dict] | None = None) -> dict | None:
    """Before training on `path` (whose `records` the caller may have read already): if it holds
    trajectories, that they were tokenized by this tokenizer and that some rows are usable.
    Returns the header (None for other data)."""
    if records is None:
        header = read_header(path)
    else:
        first = records[0] if records else None
        header = first.get(HEADER) if isinstance(first, dict) and isinstance(first.get(HEADER), dict) else None
    if header is None:
        return None
    mine = tokenizer_fingerprint(tokenizer)
    if header.get("tokenizer") != mine:
        raise DlmjaxError(f"{path} holds trajectories of {header.get('model')!r}, whose tokenizer differs from this model's "
                          f"({header.get('tokenizer')} vs {mine}); generate them with this model "
                          "(python -m dlmjax.train.trajectories --model ...)")
    rows = [r for r in (_records(pathlib.Path(path)) if records is None else records) if isinstance(r, dict) and "index" in r]
    usable = sum(1 for r in rows if r.get("usable"))
    if not usable:
        finished = sum(1 for r in rows if r.get("finished"))
        raise DlmjaxError(f"{path} has no usable answers: {len(rows)} trajectories, {finished} finished, keep={header.get('keep')!r}; "
                          "regenerate with a longer --gen-length or a looser --keep")
    return header


def _records(path: pathlib.Path) -> list[dict]:
    out = []
    with path.open() as f:
        for line in f:
            if line.endswith("\n") and line.strip():
                out.append(json.loads(line))
    return out


def _resume(out: pathlib.Path, header: dict, batch_size: int, total: int) -> set[int]:
    """The batches already complete in `out` (checked against `header`); rewrites the file
    without the rows of an incomplete batch or a half-written line."""
    if not out.exists():
        return set()
    old = read_header(out)
    if old is None:
        raise DlmjaxError(f"{out} exists and is not a trajectory file; choose another --out")
    changed = [k for k in sorted(set(header) | set(old)) if header.get(k) != old.get(k)]
    if changed:
        k = changed[0]
        raise DlmjaxError(f"{out} was written with other settings ({k}: {old.get(k)!r} -> {header.get(k)!r}); "
                          "rerun with the same settings to resume, or write to another --out")
    text = out.read_text()
    whole = text[: text.rfind("\n") + 1]  # a line cut short by a kill is dropped
    rows = [json.loads(line) for line in whole.splitlines()[1:] if line.strip()]
    seen: dict[int, int] = {}
    for r in rows:
        b = int(r["index"]) // batch_size
        seen[b] = seen.get(b, 0) + 1
    done = {b for b, n in seen.items() if n == min(batch_size, total - b * batch_size)}
    kept = [r for r in rows if int(r["index"]) // batch_size in done]
    if len(kept) != len(rows) or len(whole) != len(text):
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text("".join(json.dumps(x) + "\n" for x in [{HEADER: old}, *kept]))
        tmp.replace(out)
    return done


def generate_trajectories(
    lm,
    prompts: Sequence[str],
    out: str | os.PathLike,
    *,
    method: str = "llada",
    knobs: dict | None = None,
    gen_length: int = 256,
    batch_size: int = 32,
    chat: bool = True,
    keep: str = "finished",
    answers: Sequence[str] | None = None,
    answer_pattern: str = "",
    seed: int = 0,
    source: str = "",
    log: Callable[[str], None] = print,
    stop_after: int | None = None,
) -> dict:
    """Decode every prompt with `method` (and its `knobs`) in batches of `batch_size`, appending
    the rows to `out` (JSONL, see the module docstring); resumes a file the same call began.
    `stop_after` ends after that many new batches (as if killed; for tests). Returns counts."""
    if keep not in KEEP:
        raise DlmjaxError(f"keep must be one of {', '.join(KEEP)}, not {keep!r}")
    if keep == "correct" and answers is None:
        raise DlmjaxError("keep='correct' needs the reference answers; pass --answer-field")
    if answers is not None and len(answers) != len(prompts):
        raise DlmjaxError(f"need one reference answer per prompt: {len(prompts)} prompts, {len(answers)} answers")
    if not prompts:
        raise DlmjaxError("no prompts to decode; check --prompts and --prompt-field")
    if batch_size < 1 or gen_length < 1:
        raise DlmjaxError(f"batch_size and gen_length must be at least 1, got {batch_size} and {gen_length}")
    if lm.config.is_autoregressive:
        raise DlmjaxError(f"teacher trajectories come from a diffusion model; this is a {lm.config.family} model")
    from dlmjax.decode.api import resolve_stops

    knobs = dict(knobs or {})
    header = {"model": source or lm.source, "family": lm.config.family, "tokenizer": tokenizer_fingerprint(lm.tokenizer),
              "method": method, "knobs": knobs, "gen_length": gen_length, "batch_size": batch_size, "chat": chat,
              "seed": seed, "keep": keep, "answer_pattern": answer_pattern, "prompts": len(prompts)}
    out = pathlib.Path(out)
    primary = is_primary()
    done = _resume(out, header, batch_size, len(prompts)) if primary else set()
    if primary and not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps({HEADER: header}) + "\n")
        tmp.replace(out)
    stops = resolve_stops(lm.config, None)
    batches = -(-len(prompts) // batch_size)
    done = _agreed(done, batches)
    new = 0
    for b in range(batches):
        if b in done:
            continue
        if stop_after is not None and new >= stop_after:
            break
        lo, hi = b * batch_size, min((b + 1) * batch_size, len(prompts))
        result = lm.generate(list(prompts[lo:hi]), method=method, gen_length=gen_length, chat=chat, seed=seed + b, **knobs)
        finished = np.isin(result.tokens, stops).any(axis=1)
        rows = []
        for i, text in enumerate(result.texts):
            correct = None if answers is None else answer_matches(text, answers[lo + i], answer_pattern)
            usable = keep == "all" or (keep == "finished" and bool(finished[i])) or (keep == "correct" and bool(correct))
            rows.append({"index": lo + i, "question": prompts[lo + i], "llm_response": text, "tokens": int(result.lengths[i]),
                         "finished": bool(finished[i]), "nfe": int(result.nfe[i]), "correct": correct, "usable": bool(usable)})
        if primary:
            with out.open("a") as f:  # the whole batch in one write
                f.write("".join(json.dumps(r) + "\n" for r in rows))
                f.flush()
                os.fsync(f.fileno())
        new += 1
        log(f"batch {b + 1}/{batches}: {int(finished.sum())}/{hi - lo} finished, mean nfe {float(np.mean(result.nfe)):.1f}")
    rows = [r for r in _records(out) if "index" in r] if primary else []
    summary = {"out": str(out), "rows": len(rows), "usable": sum(1 for r in rows if r["usable"]),
               "finished": sum(1 for r in rows if r["finished"]), "complete": len(rows) == len(prompts)}
    if primary and summary["complete"] and not summary["usable"]:
        raise DlmjaxError(f"none of the {len(rows)} trajectories in {out} is usable (keep={keep!r}); "
                          "raise --gen-length or loosen --keep")
    return summary


def _agreed(done: set[int], batches: int) -> set[int]:
    """The primary's set of finished batches, on every process (they decode the same batches
    together: a process that skipped a batch the others decode would hang the collective)."""
    import jax

    if jax.process_count() == 1:
        return done
    from jax.experimental import multihost_utils

    mask = np.zeros(batches, np.int32)
    mask[sorted(done)] = 1
    mask = np.asarray(multihost_utils.broadcast_one_to_all(mask))
    return {int(b) for b in np.flatnonzero(mask)}


def _parse_knob(text: str):
    if "=" not in text:
        raise DlmjaxError(f"--knob {text!r} is not NAME=VALUE; e.g. --knob threshold=0.9")
    name, value = text.split("=", 1)
    try:
        return name.strip(), json.loads(value)
    except ValueError:
        return name.strip(), value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dlmjax.train.trajectories", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--model", required=True, help="a hub id, a local checkpoint or an embedded model (tiny-llada)")
    parser.add_argument("--adapter", help="a PEFT adapter directory to load onto the model")
    parser.add_argument("--dtype", help="float32 or bfloat16 (default: the checkpoint's)")
    parser.add_argument("--prompts", required=True, help="JSONL, Parquet or a saved `datasets` directory")
    parser.add_argument("--prompt-field", default="prompt")
    parser.add_argument("--answer-field", help="reference answers: mark each trajectory correct or not")
    parser.add_argument("--answer-pattern", default="", help="regex whose first group is compared (e.g. '####([^\\n]*)')")
    parser.add_argument("--out", required=True, help="the JSONL to write (a rerun resumes it)")
    parser.add_argument("--method", default="llada", help="any lm.generate method")
    parser.add_argument("--knob", action="append", default=[], help="a method knob, NAME=VALUE (repeatable)")
    parser.add_argument("--gen-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True, help="wrap prompts in the chat template")
    parser.add_argument("--keep", default="finished", choices=KEEP, help="which rows training uses")
    parser.add_argument("--limit", type=int, default=0, help="decode at most this many prompts (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mesh", default="", help="e.g. data=8 (default: one device)")
    parser.add_argument("--rules", default="fsdp_tp", help="sharding preset under --mesh")
    args = parser.parse_args(argv)
    try:
        import dlmjax
        from dlmjax import sharding

        knobs = dict(_parse_knob(k) for k in args.knob)
        if args.keep == "correct" and not args.answer_field:
            raise DlmjaxError("--keep correct needs --answer-field (the reference answers)")
        records = read_records(args.prompts)
        fields = [args.prompt_field] + ([args.answer_field] if args.answer_field else [])
        records = [r for r in records if all(r.get(k) is not None for k in fields)]
        if not records:
            raise DlmjaxError(f"{args.prompts} has no rows with {' and '.join(repr(k) for k in fields)}; set --prompt-field / --answer-field")
        if args.limit:
            records = records[: args.limit]
        lm = dlmjax.load(args.model, args.dtype, adapter=args.adapter, mesh=args.mesh or None,
                         rules=sharding.ShardingRules.preset(args.rules) if args.mesh else None, progress=False)
        summary = generate_trajectories(
            lm, [str(r[args.prompt_field]) for r in records], args.out, method=args.method, knobs=knobs,
            gen_length=args.gen_length, batch_size=args.batch_size, chat=args.chat, keep=args.keep,
            answers=[str(r[args.answer_field]) for r in records] if args.answer_field else None,
            answer_pattern=args.answer_pattern, seed=args.seed, source=args.model,
        )
        if is_primary():
            print(json.dumps(summary))
        return 0
    except DlmjaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
