"""Benchmark: host memory and time of `dlmjax.convert`, `dlmjax.load` and the export back.

    python experiments/convert_memory.py [--sizes 0.25 0.5 1] [--dtypes bfloat16 float32] [--workdir DIR]

For each size (GB) and dtype this writes a synthetic LLaDA-layout checkpoint (4 shards,
~24 blocks, tensors generated one at a time), then in a fresh subprocess per step measures
the conversion, `dlmjax.load` of the result and its export back to Hugging Face
safetensors: wall time and peak RSS over the post-import baseline (VmHWM after resetting
it through /proc/self/clear_refs, or a 2 ms /proc/self/statm sampler where that is not
allowed). The claim under test: conversion and export peak at about one group (the
embedding+head, or one block), not the whole checkpoint; loading necessarily holds the
whole model (JAX CPU arrays live in host memory), so its ratio should be about 1.0, not 2.0.

It also times converting and loading the default tiny test checkpoints
(`write_tiny_checkpoint(dir, "llada")` and `"dream"`, 2 layers). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from dlmjax.config import from_hf_config
from dlmjax.convert import layouts, safetensors_io
from dlmjax.testing import _DTYPES, tiny_hf_config, write_tiny_checkpoint, write_tokenizer

VOCAB = 8192
LAYERS = 24  # aim; the hidden size is solved for, then the layer count adjusted to hit the size
SHARDS = 4

# The measured child. argv: mode ("convert", "load" or "export"), src, dst. Everything it needs is
# imported before the high-water mark is reset, so only the operation itself is counted.
_CHILD = r"""
import json, os, sys, threading, time

import flax, jax, numpy, orbax.checkpoint  # noqa: F401
import dlmjax
from dlmjax.convert.hf_export import export
from dlmjax.convert.hf_import import convert

mode, src, dst = sys.argv[1:4]
PAGE = os.sysconf("SC_PAGE_SIZE")

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE

def hwm():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    method = "clear_refs"
except OSError:
    method = "sampling"
baseline = rss()
peak = [baseline]
stop = threading.Event()
if method == "sampling":
    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
start = time.perf_counter()
if mode == "convert":
    convert(src, dst, progress=False)
elif mode == "export":
    export(src, dst)
else:
    lm = dlmjax.load(dst, progress=False)
    jax.block_until_ready(jax.tree.leaves(lm.state))
seconds = time.perf_counter() - start
after = rss()
if method == "sampling":
    stop.set()
    sampler.join()
    top = max(peak[0], after)
else:
    top = hwm()
print(json.dumps({"method": method, "seconds": seconds, "baseline": baseline, "peak": top, "after": after}))
"""


def measure(mode: str, src: pathlib.Path, dst: pathlib.Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", _CHILD, mode, str(src), str(dst)], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    if proc.returncode != 0:
        raise SystemExit(f"{mode} of {src} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def shape_for(gigabytes: float, dtype: str) -> dict:
    """Model dimensions whose checkpoint is about `gigabytes` GB (1e9 bytes) in `dtype`."""
    params = gigabytes * 1e9 / np.dtype(_DTYPES[dtype]).itemsize
    # params ~= 2*V*d + L*(4*d^2 + 3*d*f) with f = 3d: solve for d, round to whole heads of 64.
    a, b = LAYERS * 13, 2 * VOCAB
    d = (-b + math.sqrt(b * b + 4 * a * params)) / (2 * a)
    d = max(128, int(round(d / 64)) * 64)
    f = 3 * d
    layers = max(1, round((params - 2 * VOCAB * d) / (4 * d * d + 3 * d * f)))
    return dict(num_layers=layers, hidden_size=d, num_heads=d // 64, intermediate_size=f, vocab_size=VOCAB, dtype=dtype)


def write_synthetic(directory: pathlib.Path, shape: dict, seed: int = 0) -> tuple[int, int]:
    """A random LLaDA checkpoint, generated and written one tensor at a time.

    Returns (bytes of the safetensors files, bytes of the largest conversion group)."""
    directory.mkdir(parents=True)
    hf_config = tiny_hf_config("llada", **shape)
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    cfg = from_hf_config(hf_config)
    dtype = np.dtype(_DTYPES[shape["dtype"]])
    specs = layouts.tensor_specs(cfg)
    rng = np.random.default_rng(seed)

    def get(name: str) -> np.ndarray:
        spec = by_name[name]
        if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
            return np.ones(spec.shape, dtype)
        return (0.02 * rng.standard_normal(spec.shape, dtype=np.float32)).astype(dtype)

    by_name = {s.hf_name: s for s in specs}
    total = sum(s.numel for s in specs) * dtype.itemsize
    safetensors_io.save_sharded([(s.hf_name, s.shape, dtype) for s in specs], get, directory,
                                max_shard_bytes=-(-total // SHARDS), metadata={"format": "pt"})
    write_tokenizer(directory, hf_config)
    groups: dict[str, int] = {}
    for s in specs:
        groups[s.group] = groups.get(s.group, 0) + s.numel * dtype.itemsize
    return sum(p.stat().st_size for p in directory.glob("*.safetensors")), max(groups.values())


def machine() -> str:
    mem = next(int(l.split()[1]) * 1024 for l in open("/proc/meminfo") if l.startswith("MemTotal:"))
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    import jax
    import orbax.checkpoint as ocp

    return (f"{os.cpu_count()} CPUs ({cpu}), {mem / 2**30:.1f} GiB RAM, Python {platform.python_version()}, "
            f"jax {jax.__version__} ({jax.default_backend()}), orbax {getattr(ocp, '__version__', '?')}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.25, 0.5, 1.0], help="checkpoint sizes in GB")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(_DTYPES), default=["bfloat16", "float32"])
    parser.add_argument("--workdir", help="where to write checkpoints (default: a temporary directory)")
    args = parser.parse_args(argv)
    if not os.path.exists("/proc/self/status"):
        raise SystemExit("this benchmark reads peak RSS from /proc; run it on Linux")

    work = pathlib.Path(tempfile.mkdtemp(prefix="dlmjax-convert-memory-", dir=args.workdir))
    rows, tiny = [], []
    methods = set()
    started = time.perf_counter()
    try:
        for size in args.sizes:
            for dtype in args.dtypes:
                shape = shape_for(size, dtype)
                src, dst, back = work / "hf", work / "converted", work / "exported"
                t0 = time.perf_counter()
                nbytes, group = write_synthetic(src, shape)
                write_s = time.perf_counter() - t0
                conv = measure("convert", src, dst)
                load = measure("load", src, dst)
                export = measure("export", dst, back)
                methods.update((conv["method"], load["method"], export["method"]))
                rows.append((size, dtype, shape, nbytes, group, write_s, conv, load, export))
                print(f"# {size:g} GB {dtype}: convert {conv['seconds']:.1f}s, load {load['seconds']:.1f}s, "
                      f"export {export['seconds']:.1f}s", file=sys.stderr, flush=True)
                for d in (src, dst, back):
                    shutil.rmtree(d)
        for family in ("llada", "dream"):
            src, dst = work / f"tiny-{family}", work / f"tiny-{family}-converted"
            write_tiny_checkpoint(src, family)
            conv = measure("convert", src, dst)
            load = measure("load", src, dst)
            tiny.append((family, conv, load))
            shutil.rmtree(src)
            shutil.rmtree(dst)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    mb = lambda x: f"{x / 1e6:,.0f}"  # noqa: E731
    print(f"Machine: {machine()}\n")
    print("| size | dtype | layers x hidden | groups | checkpoint MB | largest group MB | convert s | convert peak MB "
          "| convert peak / ckpt | load s | load peak MB | load peak / ckpt | load held / ckpt | export s "
          "| export peak MB | export peak / ckpt |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for size, dtype, shape, nbytes, group, _, conv, load, export in rows:
        c_peak, l_peak = conv["peak"] - conv["baseline"], load["peak"] - load["baseline"]
        e_peak = export["peak"] - export["baseline"]
        print(f"| {size:g} GB | {dtype} | {shape['num_layers']} x {shape['hidden_size']} | {shape['num_layers'] + 1} "
              f"| {mb(nbytes)} | {mb(group)} | {conv['seconds']:.1f} | {mb(c_peak)} | {c_peak / nbytes:.2f} "
              f"| {load['seconds']:.1f} | {mb(l_peak)} | {l_peak / nbytes:.2f} "
              f"| {(load['after'] - load['baseline']) / nbytes:.2f} | {export['seconds']:.1f} | {mb(e_peak)} "
              f"| {e_peak / nbytes:.2f} |")
    print()
    print(f"Peak MB is the high-water RSS over the post-import baseline of a fresh process "
          f"({', '.join(sorted(methods))}); checkpoint MB is the safetensors bytes ({SHARDS} shards). "
          "Loading keeps the whole model in host memory (JAX CPU arrays), so ~1.0 is its floor; "
          "'load held' is the RSS still in use once load returns.")
    notes = "; ".join(f"{family} {c['seconds']:.2f} s + {l['seconds']:.2f} s = {c['seconds'] + l['seconds']:.2f} s"
                      for family, c, l in tiny)
    print(f"\nTime to convert and load the tiny checkpoints (2 layers, hidden 64, vocab 128; convert + load, "
          f"in processes with dlmjax already imported): {notes}.")
    print(f"\nTotal benchmark time {time.perf_counter() - started:.0f} s.")


if __name__ == "__main__":
    main()
