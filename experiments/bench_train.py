"""Benchmark: train step time and tokens/s of the tiny-llada recipe (experiments/train_tiny.py).

    python experiments/bench_train.py [--steps 60] [--variants base accum remat bf16 lora]

The recipe's model (LLaDA, 4 layers, hidden 160, 5 heads, MLP 480, vocab 128) and rows (prompt 32
+ gen 32 tokens, batch 64) on the task suite, trained with `dlmjax.train.train` for `--steps`
steps; the first `--warmup` steps (compilation) are left out. tokens/s counts every token of a
row (prompt and answer), as `metrics.jsonl` does. Variants: base (the recipe), accum
(grad_accum=4), remat (remat="full"), bf16 (precision="bf16_compute"), lora (LoRA r=16 on q, k,
v, o). Run it against an older checkout with PYTHONPATH=that checkout (variants other than base
need the new trainer). One process, nothing else should run on the machine.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import train_tiny  # noqa: E402

from dlmjax.config import from_hf_config  # noqa: E402
from dlmjax.tokenizer import load_tokenizer  # noqa: E402

VARIANTS = {
    "base": {},
    "accum": dict(grad_accum=4),
    "remat": dict(remat="full"),
    "bf16": dict(precision="bf16_compute"),
    "lora": {},
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    from dlmjax.train import TrainConfig, init_model, train

    recipe = train_tiny.RECIPES["tiny-llada"]
    recipe_tc = train_tiny.recipe_config("tiny-llada").train  # experiments/configs/tiny-llada.yaml
    template = train_tiny.write_template(pathlib.Path(tempfile.mkdtemp()), recipe)
    cfg = from_hf_config(json.loads((template / "config.json").read_text()))
    arrays = train_tiny.training_arrays(load_tokenizer(template), 8192, "mdm")
    rows = []
    for name in args.variants:
        knobs = dict(VARIANTS[name])
        extra = {}
        if name == "lora":
            from dlmjax.model import LoRAConfig

            extra["lora"] = LoRAConfig(rank=16, alpha=32.0, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
        tc = TrainConfig(objective="mdm", steps=args.steps, batch_size=recipe_tc.batch_size, learning_rate=recipe_tc.learning_rate,
                         warmup_steps=recipe_tc.warmup_steps, save_every=10**9, log_every=1, **knobs)
        times = []
        last = [time.perf_counter()]

        def on_log(row, times=times, last=last):
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now

        kwargs = dict(progress=False, **extra)
        try:
            train(init_model(cfg, 0), arrays, tempfile.mkdtemp(), tc, on_log=on_log, **kwargs)
        except TypeError:  # an older trainer without on_log: time from its metrics
            result = train(init_model(cfg, 0), arrays, tempfile.mkdtemp(), tc, **kwargs)
            times = [1.0 / (r["tokens_per_s"] / (recipe_tc.batch_size * 64)) for r in result.history]
        steady = times[args.warmup:]
        step = statistics.median(steady)
        tokens = recipe_tc.batch_size * (train_tiny.PROMPT_LENGTH + train_tiny.GEN_LENGTH)
        rows.append(dict(variant=name, step_ms=round(step * 1e3, 1), tokens_per_s=round(tokens / step),
                         first_step_s=round(times[0], 2)))
        print(f"{name:>6}: {step * 1e3:7.1f} ms/step (median of {len(steady)}), {tokens / step:8.0f} tokens/s, "
              f"first step (compile) {times[0]:.1f}s", flush=True)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
