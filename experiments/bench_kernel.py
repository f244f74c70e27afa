"""Benchmark: cached block attention (dlmjax.kernels) against XLA and cuDNN attention.

    python experiments/bench_kernel.py [--quick] [--hbm-gbps GBPS] [--seqs 512 1024 2048 4096]
                                       [--batch 1] [--tq 32] [--iters 20] [--chain 20] [--json PATH]

Shapes (default, LLaDA-8B decode step): B=1, H=Hkv=32, D=128, Tq=32 (one block of
queries), bfloat16, cache length S in 512..4096, every key valid (so every K/V byte must
be read). experiments/device_check.py runs the same cells over B in {1, 8} and Tq in {32, 128}.

Timing: each implementation runs `--chain` times inside ONE jitted program, every call's
output being the next call's queries (so nothing is hoisted and no host dispatch sits
between the calls; a decode step also runs its attention inside one program). The program
is compiled once (not timed), then run `--iters` times; time per call = median program
time / chain. The first call's output is checked against xla_ref.

Rows:
- kernel:   cached_block_attention(implementation="pallas"): the platform's Pallas kernel
            (TPU: pallas_tpu; GPU: pallas_gpu, Mosaic GPU; CPU: pallas_tpu in interpret
            mode, which says nothing about speed);
- auto:     cached_block_attention() (the default): the kernel, or XLA after a fallback;
- xla_ref:  dlmjax.kernels.reference_attention (plain jnp, the fallback of "auto");
- nn_xla:   jax.nn.dot_product_attention(implementation="xla"), inputs pre-transposed to
            its BTNH layout, the same key mask;
- nn_cudnn: jax.nn.dot_product_attention(implementation="cudnn") on GPU only (bf16; no
            mask, which is equivalent here because every key is valid).

Roofline: bytes moved = itemsize * (2 * B * Hkv * S * D + 2 * B * H * Tq * D) + B * S
(K and V read once, q read and the output written once, the boolean key mask);
achieved GB/s = bytes / time per call; fraction = achieved / peak HBM bandwidth, detected
from the device kind (`peak_hbm_gbps`; H100 SXM 3350, H200 4800, ...) or --hbm-gbps.

On CPU only --quick sizes run (B=1, H=Hkv=4, D=64, Tq=8, S in 128, 256, 512): it shows
that the XLA path and the interpret-mode kernel work, nothing about speed. The max
relative error (max |a - ref| / max |ref|) of every row against xla_ref is printed too.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from dlmjax.kernels import cached_block_attention, reference_attention

# (substring of the lower-cased device kind, peak HBM GB/s, peak dense bf16 TFLOP/s), first match wins.
# Vendor datasheet figures (SXM parts unless named); "gh200" must come before "h200".
DEVICE_PEAKS = (
    ("gh200", 4000.0, 989.0),  # GH200 96 GB HBM3 (the 144 GB HBM3e part: 4900 GB/s)
    ("h200", 4800.0, 989.0),
    ("h100 pcie", 2000.0, 756.0),
    ("h100 nvl", 3900.0, 835.0),
    ("h100", 3350.0, 989.0),
    ("h800", 3350.0, 989.0),
    ("b200", 8000.0, 2250.0),
    ("a100-sxm4-80gb", 2039.0, 312.0),
    ("a100", 1555.0, 312.0),
    ("l40s", 864.0, 362.0),
    ("tpu v5 lite", 819.0, 197.0),
    ("tpu v5e", 819.0, 197.0),
    ("tpu v5p", 2765.0, 459.0),
    ("tpu v5", 2765.0, 459.0),
    ("tpu v6 lite", 1640.0, 918.0),
    ("tpu v6e", 1640.0, 918.0),
    ("tpu v4", 1200.0, 275.0),
)


def device_peaks(device_kind: str) -> tuple[float | None, float | None]:
    """(peak HBM GB/s, peak dense bf16 TFLOP/s) of a device kind, or (None, None) if unknown."""
    kind = device_kind.lower()
    for needle, gbps, tflops in DEVICE_PEAKS:
        if needle in kind:
            return gbps, tflops
    return None, None


def bytes_moved(b: int, h: int, hkv: int, tq: int, s: int, d: int, itemsize: int) -> int:
    """HBM bytes one call must move at least: K, V and q read once, the output written, the key mask."""
    return itemsize * (2 * b * hkv * s * d + 2 * b * h * tq * d) + b * s


def implementations(platform: str, key_valid, names=None) -> dict:
    """name -> (fn(q, k, v) -> out, takes BTNH inputs), the rows of the benchmark on `platform`."""
    interpret = platform not in ("tpu", "gpu")
    nn_mask = key_valid[:, None, None, :]
    impls = {
        "kernel": (
            lambda q, k, v: cached_block_attention(
                q, k, v, key_valid=key_valid, implementation="pallas", interpret=interpret or None
            ),
            False,
        ),
        "auto": (lambda q, k, v: cached_block_attention(q, k, v, key_valid=key_valid), False),
        "xla_ref": (lambda q, k, v: reference_attention(q, k, v, key_valid=key_valid), False),
        "nn_xla": (
            lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=nn_mask, implementation="xla"),
            True,
        ),
    }
    if platform == "gpu":
        impls["nn_cudnn"] = (lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"), True)
    return {name: impl for name, impl in impls.items() if names is None or name in names}


def to_btnh(x):
    return x.transpose(0, 2, 1, 3)  # [B, H, T, D] <-> [B, T, H, D]


def chain(fn, n: int):
    """A jitted program calling fn n times, each output the next call's queries: (first output, last)."""

    def run(q, k, v):
        first = out = fn(q, k, v)
        for _ in range(n - 1):
            out = fn(out, k, v)
        return first, out

    return jax.jit(run)


def time_program(program, args, iters: int) -> tuple[float, float, tuple]:
    """(compile + first run seconds, median seconds of a run, the outputs)."""
    start = time.perf_counter()
    out = jax.block_until_ready(program(*args))
    first = time.perf_counter() - start
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(program(*args))
        times.append(time.perf_counter() - start)
    return first, statistics.median(times), out


def error_text(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"


def rel_err(out, ref) -> float:
    a, r = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    return float(np.max(np.abs(a - r)) / np.max(np.abs(r)))


def bench_cell(platform: str, *, b: int, h: int, hkv: int, d: int, tq: int, s: int, dtype, iters: int,
               chain_length: int, hbm_gbps: float | None, names=None, seed: int = 0) -> list[dict]:
    """One row per implementation at one shape (every key valid); a failing implementation
    gives a row with `error` instead of timings."""
    keys = jax.random.split(jax.random.key(seed), 3)  # drawn on the device: no host copy of a large cache
    q, k, v = (jax.random.normal(key, shape, jnp.float32).astype(dtype)
               for key, shape in zip(keys, ((b, h, tq, d), (b, hkv, s, d), (b, hkv, s, d))))
    key_valid = jnp.ones((b, s), bool)
    nbytes = bytes_moved(b, h, hkv, tq, s, d, jnp.dtype(dtype).itemsize)
    shape = dict(B=b, H=h, Hkv=hkv, D=d, Tq=tq, S=s, dtype=jnp.dtype(dtype).name)
    rows, outputs = [], {}
    for name, (fn, btnh) in implementations(platform, key_valid, names).items():
        args = (to_btnh(q), to_btnh(k), to_btnh(v)) if btnh else (q, k, v)
        try:
            compile_s, program_s, (first, _) = time_program(chain(fn, chain_length), args, iters)
        except Exception as e:  # noqa: BLE001 - report and go on (e.g. cuDNN missing)
            rows.append(dict(shape, impl=name, error=error_text(e)))
            continue
        outputs[name] = to_btnh(first) if btnh else first
        sec = program_s / chain_length
        gbps = nbytes / sec / 1e9
        rows.append(dict(shape, impl=name, compile_s=compile_s, seconds=sec, program_seconds=program_s,
                         chain=chain_length, bytes=nbytes, gbps=gbps,
                         roofline=gbps / hbm_gbps if hbm_gbps else None))
    ref = outputs.get("xla_ref")
    for row in rows:
        if ref is not None and row["impl"] in outputs:
            row["rel_err"] = rel_err(outputs[row["impl"]], ref)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (the only mode on CPU)")
    ap.add_argument("--hbm-gbps", type=float, default=None, help="peak HBM bandwidth in GB/s (default: from the device kind)")
    ap.add_argument("--seqs", type=int, nargs="*", help="cache lengths S")
    ap.add_argument("--batch", type=int, default=1, help="batch size B")
    ap.add_argument("--tq", type=int, default=None, help="queries per call (default 32, quick 8)")
    ap.add_argument("--iters", type=int, default=None, help="timed runs per cell (default 20, quick 3)")
    ap.add_argument("--chain", type=int, default=None, help="calls per program (default 20, quick 2)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    handler = logging.StreamHandler(sys.stdout)  # show auto's fallbacks (logged once per reason)
    handler.setFormatter(logging.Formatter("  [%(name)s] %(message)s"))
    kernel_logger = logging.getLogger("dlmjax.kernels")
    kernel_logger.addHandler(handler)
    kernel_logger.setLevel(logging.INFO)
    kernel_logger.propagate = False

    device = jax.devices()[0]
    platform = device.platform
    if platform not in ("tpu", "gpu") and not args.quick:
        print(f"platform {platform!r}: running --quick sizes only (no Pallas kernel runs natively here)")
        args.quick = True
    if args.quick:
        h, hkv, d, tq, dtype = 4, 4, 64, args.tq or 8, jnp.bfloat16
        seqs = args.seqs or [128, 256, 512]
        iters, chain_length = args.iters or 3, args.chain or 2
    else:
        h, hkv, d, tq, dtype = 32, 32, 128, args.tq or 32, jnp.bfloat16
        seqs = args.seqs or [512, 1024, 2048, 4096]
        iters, chain_length = args.iters or 20, args.chain or 20
    hbm = args.hbm_gbps or device_peaks(device.device_kind)[0]
    b = args.batch
    print(f"device: {device.device_kind} ({platform}), jax {jax.__version__}, peak HBM "
          f"{'unknown (pass --hbm-gbps)' if hbm is None else f'{hbm:g} GB/s'}")
    print(f"shapes: B={b} H={h} Hkv={hkv} D={d} Tq={tq} {jnp.dtype(dtype).name}; {chain_length} chained calls "
          f"per program, median of {iters} runs")
    if platform not in ("tpu", "gpu"):
        print("CPU: the roofline column is meaningless here; this run only shows that every path works")
    if hasattr(os, "getloadavg"):
        print(f"load average: {os.getloadavg()[0]:.2f}")
    hdr = f"{'S':>6} {'impl':>9} {'compile s':>10} {'time us':>10} {'MB':>8} {'GB/s':>9} {'roofline':>9} {'rel err':>9}"
    print(hdr)
    print("-" * len(hdr))
    rows = []
    for s in seqs:
        cell = bench_cell(platform, b=b, h=h, hkv=hkv, d=d, tq=tq, s=s, dtype=dtype, iters=iters,
                          chain_length=chain_length, hbm_gbps=hbm)
        rows += cell
        for r in cell:
            if "error" in r:
                print(f"{s:>6} {r['impl']:>9}  error: {r['error']}")
                continue
            roof = "n/a" if r["roofline"] is None else f"{r['roofline']:.1%}"
            err = f"{r['rel_err']:.1e}" if "rel_err" in r else "n/a"
            print(f"{s:>6} {r['impl']:>9} {r['compile_s']:>10.2f} {r['seconds'] * 1e6:>10.1f} {r['bytes'] / 1e6:>8.2f} "
                  f"{r['gbps']:>9.1f} {roof:>9} {err:>9}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=str(device.device_kind), platform=platform, hbm_gbps=hbm, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
