"""Why tiny-llada-v2 stalls on task suite v2: accuracy by kind, by block length, and two variants of
the data to continue training on (the experiments behind experiments/configs/tiny-llada-v2.yaml's notes).

    # accuracy by kind (LLaDA one token per step, semi-AR blocks of each length) and Fast-dLLM's passes
    python experiments/v2_diagnosis.py eval runs/tiny-llada-v2/final --n 256 --blocks 64,32,16,8
    python experiments/v2_diagnosis.py eval DIR --kinds arith2 --n 64 --blocks 64,4,1

    # data for a continuation: "v2" (as it is), "anchored" (each person's chain opens with their name) or "long-arith"
    # (v2 with one person's problems of 4 to 6 steps in place of the two-person ones); eval rows of the
    # changed kind only. It prints the training command that continues a checkpoint on it.
    python experiments/v2_diagnosis.py data long-arith runs/v2-long-arith --start runs/tiny-llada-v2/final

`eval` takes a Hugging Face directory (a run's final/, or an embedded model). A training run's
checkpoint at step S is exported by running its command again with train.steps=S in a copy of the
run directory that holds only that checkpoint (the CLI then writes final/ without training).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import tasks  # noqa: E402

VARIANTS = ("v2", "anchored", "long-arith")


@contextlib.contextmanager
def variant(name: str):
    """tasks.make_split yields the variant's rows inside this context: "anchored" under v2's streams,
    "long-arith" as suite "x" (kinds arithlong:add:sort:reverse 2:2:1:1, arithlong = tasks._arith with
    4 to 6 steps, its examples' kind "arith")."""
    make_example, arith2 = tasks.make_example, tasks._arith2
    if name == "anchored":  # ("v2" changes nothing: the rows tiny-llada-v2 trains on)
        tasks._arith2 = functools.partial(arith2, anchored=True)
    elif name == "long-arith":
        tasks.SUITES["x"] = (("arithlong", "add", "sort", "reverse"), (2, 2, 1, 1))
        tasks.make_example = lambda kind, rng, suite="v1": (tasks._arith(rng, n_steps=rng.randint(4, 6)) if kind == "arithlong"
                                                            else make_example(kind, rng, suite))
    try:
        yield "x" if name == "long-arith" else "v2"
    finally:
        tasks.make_example, tasks._arith2 = make_example, arith2
        tasks.SUITES.pop("x", None)


def cmd_eval(args) -> None:
    import dlmjax
    import train_tiny

    lm = dlmjax.load(args.model, dtype="float32", progress=False)
    with variant(args.variant) as suite:
        test = [e for e in tasks.make_split("test", 4 * args.n, 0, suite) if not args.kinds or e.kind in args.kinds.split(",")][: args.n]
    decoders = {f"llada, blocks of {b}": dict(method="llada", steps=64, block_length=b) for b in map(int, filter(None, args.blocks.split(",")))}
    for b in map(int, args.fast_blocks.split(",")):
        decoders[f"fast-dllm 0.9, blocks of {b}"] = dict(method="fast-dllm", threshold=0.9, block_length=b)
    for name, kwargs in decoders.items():
        m = train_tiny.evaluate(lm, lm.tokenizer, test, gen_length=64, **kwargs)
        print(json.dumps(dict(decoder=name, accuracy=m["accuracy"], mean_nfe=m["mean_nfe"], by_kind=m["accuracy_by_kind"],
                         nfe_by_kind=m["mean_nfe_by_kind"])), flush=True)


def cmd_data(args) -> None:
    import train_tiny

    out = pathlib.Path(args.out)
    changed = "arith" if args.variant == "long-arith" else "arith2"
    with variant(args.variant) as suite:  # make_split keeps the test problems out of the train split
        train = tasks.make_split("train", args.train_examples, 0, suite)
        held = [e for e in tasks.make_split("test", 2000, 0, suite) if e.kind == changed]
    train_tiny.write_rows(out / "train.jsonl", train)
    train_tiny.write_rows(out / "eval.jsonl", held[:64])
    print(f"wrote {len(train)} training rows and {min(64, len(held))} eval rows ({changed} only) to {out}")
    print("continue a checkpoint on them (constant learning rate, evaluated every 200 steps):")
    print(f"  python -m dlmjax.train experiments/configs/tiny-llada-v2.yaml train.steps=1200 output={out}/run "
          f"model.name={args.start} model.init=false data.train={out}/train.jsonl data.eval={out}/eval.jsonl "
          "train.save_every=200 train.seed=1 train.schedule=constant train.learning_rate=5e-4 train.warmup_steps=50")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    e = sub.add_parser("eval", help="accuracy by kind and block length")
    e.add_argument("model")
    e.add_argument("--n", type=int, default=256)
    e.add_argument("--kinds", default="", help="comma-separated kinds (default: all)")
    e.add_argument("--blocks", default="64", help="LLaDA's semi-AR block lengths (comma-separated; empty: none)")
    e.add_argument("--fast-blocks", default="64,16", help="Fast-dLLM's block lengths (16: report v2's)")
    e.add_argument("--variant", choices=VARIANTS, default="v2", help="the test problems' variant (default: suite v2 as it is)")
    d = sub.add_parser("data", help="a variant's training and eval rows")
    d.add_argument("variant", choices=VARIANTS)
    d.add_argument("out")
    d.add_argument("--start", default="runs/tiny-llada-v2/final", help="the checkpoint the printed command continues")
    d.add_argument("--train-examples", type=int, default=300_000)
    args = parser.parse_args(argv)
    (cmd_eval if args.command == "eval" else cmd_data)(args)


if __name__ == "__main__":
    main()
