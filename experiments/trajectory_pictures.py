"""The trajectory pictures in experiments/results: tiny-llada answering a word problem with LLaDA
(one token per pass) and with Fast-dLLM (threshold 0.9, dual cache), as PNG and replaying HTML.

    python experiments/trajectory_pictures.py [--out experiments/results]
"""

import argparse
import pathlib

import dlmjax
from dlmjax import viz

PROMPT = "Mia has 7 apples. She buys 5 more. She gives away 3. How many now?"
RUNS = {
    "llada": dict(method="llada", steps=32, block_length=32),
    "fast-dllm": dict(method="fast-dllm", threshold=0.9, block_length=16, cache="dual"),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    lm = dlmjax.load("tiny-llada", progress=False)
    for name, knobs in RUNS.items():
        out = lm.generate([PROMPT], chat=True, **knobs)
        title = f"tiny-llada, {name}: {PROMPT!r} -> {out.texts[0]!r}"
        viz.trajectory(out, tokenizer=lm.tokenizer, path=args.out / f"trajectory-{name}.png", title=title)
        viz.trajectory(out, tokenizer=lm.tokenizer, path=args.out / f"trajectory-{name}.html", title=title)
        print(f"{name}: {out.texts[0]!r}, nfe {int(out.nfe[0])}")
        print(viz.terminal(out, tokenizer=lm.tokenizer))


if __name__ == "__main__":
    main()
