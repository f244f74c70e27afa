"""Per-chip memory of the seed recipes' 8B runs (experiments/recipes/*.yaml) on a TPU slice, from
the TPU compiler's own memory_analysis() on this machine (libtpu's compile-only devices).

    PYTHONPATH=/opt/libtpu python experiments/recipe_memory.py --target v5e:2x4 [--layers 4 8 16] [--full] [--set key=value]

Compiling a whole 28- or 32-layer step for TPU needs more host memory than a 24 GB machine has
(the model's layers are unrolled in the program). So by default each recipe is compiled with 4, 8
and 16 of its layers, everything else as the recipe says, and the per-chip figures are fitted
with a line in the layer count (each layer adds the same weights, optimizer state, gradients and
rematerialised activations) and read off at the model's own depth; the table gives the fit's
largest residual on the measured points, so a reader sees how straight the line is. --full
compiles the whole model instead, where the host has the memory. Each compile runs in its own
process (the host memory of one is freed before the next). Writes the table as markdown to
stdout and the raw figures as JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
RECIPES = {  # recipe -> the directory holding its model's config.json
    "dparallel-llada-8b": "llada-8b",
    "dparallel-dream-7b": "dream-7b",
    "d2f-llada-8b": "llada-8b",
    "d2f-dream-7b": "dream-7b",
    "fast-dllm-v2-qwen2.5-7b": "fast-dllm-v2-7b",
}
FIELDS = ("parameters", "optimizer", "gradients", "activations", "peak")
LAYER_KEYS = ("n_layers", "num_hidden_layers")


def compile_once(recipe: str, layers: int | None, target: str, overrides: list[str]) -> dict:
    """The dry run's GiB figures for `recipe` with its model cut to `layers` (None: whole)."""
    config = json.loads((ROOT / "experiments" / "configs" / RECIPES[recipe] / "config.json").read_text())
    key = next(k for k in LAYER_KEYS if k in config)
    with tempfile.TemporaryDirectory() as tmp:
        if layers is not None:
            config[key] = layers
        (pathlib.Path(tmp) / "config.json").write_text(json.dumps(config))
        cmd = [sys.executable, "-m", "dlmjax.train", str(ROOT / "experiments" / "recipes" / f"{recipe}.yaml"),
               f"model.name={tmp}", "--dry-run", "--target", target, *overrides]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    figures = {m.group(1): float(m.group(2)) for m in re.finditer(r"^\s+(\w+)\s+([0-9.]+)$", proc.stdout, re.M)}
    if proc.returncode or set(figures) != set(FIELDS):
        tail = (proc.stderr.strip().splitlines() or ["killed (host memory?)"])[-1]
        raise SystemExit(f"{recipe} with {layers} layers: the dry run failed (exit {proc.returncode}): {tail}")
    return {"layers": config[key], **figures}


def fit(points: list[dict], depth: int) -> tuple[dict, float]:
    """Each field's least-squares line in the layer count, read at `depth`; and the largest
    residual (GiB) on the measured points."""
    import numpy as np

    x = np.array([p["layers"] for p in points], float)
    out, worst = {}, 0.0
    for f in FIELDS:
        y = np.array([p[f] for p in points])
        slope, intercept = np.polyfit(x, y, 1)
        worst = max(worst, float(np.max(np.abs(slope * x + intercept - y))))
        out[f] = float(slope * depth + intercept)
    return out, worst


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="v5e:2x4")
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--layers", nargs="*", type=int, default=[4, 8, 16])
    parser.add_argument("--full", action="store_true", help="compile the whole model (needs the host memory)")
    parser.add_argument("--device-memory", type=float, default=16.0, help="GiB per chip")
    parser.add_argument("--out", type=pathlib.Path, help="write the raw figures here (JSON)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="a key=value override for every recipe (repeatable), e.g. --set train.precision=bf16")
    args = parser.parse_args(argv)
    rows, raw = [], {}
    for recipe in args.recipes:
        config = json.loads((ROOT / "experiments" / "configs" / RECIPES[recipe] / "config.json").read_text())
        depth = next(config[k] for k in LAYER_KEYS if k in config)
        if args.full:
            points = [compile_once(recipe, None, args.target, args.overrides)]
            figures, worst, how = {f: points[0][f] for f in FIELDS}, 0.0, "compiled whole"
        else:
            points = [compile_once(recipe, n, args.target, args.overrides) for n in args.layers]
            figures, worst = fit(points, depth)
            how = f"fit of {'/'.join(map(str, args.layers))} layers (max residual {worst:.3f})"
        raw[recipe] = {"depth": depth, "points": points, "figures": figures, "max_residual": worst}
        fits = "fits" if figures["peak"] <= args.device_memory else "does NOT fit"
        rows.append(f"| {recipe} | {depth} | " + " | ".join(f"{figures[f]:.2f}" for f in FIELDS) + f" | {fits} | {how} |")
        print(rows[-1], file=sys.stderr, flush=True)
    print(f"| recipe | layers | {' | '.join(FIELDS)} | {args.device_memory:g} GiB | how |")
    print("|---|---|" + "---|" * len(FIELDS) + "---|---|")
    print("\n".join(rows))
    if args.out:
        args.out.write_text(json.dumps({"target": args.target, "overrides": args.overrides, "recipes": raw}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
