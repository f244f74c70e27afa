"""Benchmark: cached block attention (dlmjax.kernels) against jax.nn.dot_product_attention.

    python experiments/bench_kernel.py [--quick] [--hbm-gbps 3350] [--seqs 512 1024 2048 4096]
                                       [--iters 20] [--json PATH]

Shapes (default, LLaDA-8B decode step): B=1, H=Hkv=32, D=128, Tq=32 (one block of
queries), bfloat16, cache length S in 512..4096, every key valid (so every K/V byte must
be read). Each implementation is jitted, compiled once (not timed), then run `--iters`
times; the median time is reported.

Rows:
- kernel:   cached_block_attention(implementation="pallas"): the platform's Pallas kernel
            (TPU: pallas_tpu; GPU: pallas_gpu, Mosaic GPU, UNVERIFIED; CPU: pallas_tpu in
            interpret mode, which says nothing about speed);
- auto:     cached_block_attention() (the default): the kernel, or XLA after a fallback;
- xla_ref:  dlmjax.kernels.reference_attention (plain jnp);
- nn_xla:   jax.nn.dot_product_attention(implementation="xla"), inputs pre-transposed to
            its BTNH layout, the same key mask;
- nn_cudnn: jax.nn.dot_product_attention(implementation="cudnn") on GPU only (bf16; no
            mask, which is equivalent here because every key is valid).

Roofline: KV bytes = 2 * B * Hkv * S * D * itemsize (K and V read once; q and the output
are < 1% at these shapes). achieved GB/s = KV bytes / time, fraction = achieved /
--hbm-gbps (default 3350, H100 SXM HBM3; H200: 4800, TPU v5e: 819, v5p: 2765, v6e: 1640).

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

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dlmjax.kernels import cached_block_attention, reference_attention  # noqa: E402


def timed(fn, args, iters: int) -> tuple[float, float, jax.Array]:
    """(compile + first run seconds, median seconds per call, output)."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times), out


def implementations(platform: str, key_valid):
    interpret = platform not in ("tpu", "gpu")
    bt = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731 - [B, H, T, D] <-> BTNH
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
    return impls, bt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (the only mode on CPU)")
    ap.add_argument("--hbm-gbps", type=float, default=3350.0, help="peak HBM bandwidth in GB/s (default: H100)")
    ap.add_argument("--seqs", type=int, nargs="*", help="cache lengths S")
    ap.add_argument("--iters", type=int, default=None, help="timed calls per cell (default 20, quick 3)")
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
        b, h, hkv, d, tq, dtype = 1, 4, 4, 64, 8, jnp.bfloat16
        seqs = args.seqs or [128, 256, 512]
        iters = args.iters or 3
    else:
        b, h, hkv, d, tq, dtype = 1, 32, 32, 128, 32, jnp.bfloat16
        seqs = args.seqs or [512, 1024, 2048, 4096]
        iters = args.iters or 20
    itemsize = jnp.dtype(dtype).itemsize
    print(f"device: {device.device_kind} ({platform}), jax {jax.__version__}, peak HBM {args.hbm_gbps:g} GB/s")
    print(f"shapes: B={b} H={h} Hkv={hkv} D={d} Tq={tq} {jnp.dtype(dtype).name}; median of {iters} calls")
    if platform not in ("tpu", "gpu"):
        print("CPU: the roofline column is meaningless here; this run only shows that every path works")
    if hasattr(os, "getloadavg"):
        print(f"load average: {os.getloadavg()[0]:.2f}")
    hdr = f"{'S':>6} {'impl':>9} {'compile s':>10} {'time us':>10} {'KV MB':>8} {'GB/s':>9} {'roofline':>9}"
    print(hdr)
    print("-" * len(hdr))

    rows = []
    rng = np.random.default_rng(0)
    for s in seqs:
        q = jnp.asarray(rng.standard_normal((b, h, tq, d), np.float32), dtype)
        k = jnp.asarray(rng.standard_normal((b, hkv, s, d), np.float32), dtype)
        v = jnp.asarray(rng.standard_normal((b, hkv, s, d), np.float32), dtype)
        key_valid = jnp.ones((b, s), bool)
        kv_bytes = 2 * b * hkv * s * d * itemsize
        impls, bt = implementations(platform, key_valid)
        ref = None
        for name, (fn, btnh) in impls.items():
            call_args = (bt(q), bt(k), bt(v)) if btnh else (q, k, v)
            try:
                first, sec, out = timed(jax.jit(fn), call_args, iters)
            except Exception as e:  # noqa: BLE001 - report and go on (e.g. cuDNN missing)
                msg = f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
                print(f"{s:>6} {name:>9}  error: {msg}")
                rows.append(dict(S=s, impl=name, error=msg))
                continue
            out = bt(out) if btnh else out
            if name == "xla_ref":
                ref = out
            gbps = kv_bytes / sec / 1e9
            row = dict(S=s, impl=name, compile_s=first, seconds=sec, kv_bytes=kv_bytes, gbps=gbps,
                       roofline=gbps / args.hbm_gbps)
            rows.append(row)
            print(f"{s:>6} {name:>9} {first:>10.2f} {sec * 1e6:>10.1f} {kv_bytes / 1e6:>8.2f} {gbps:>9.1f} "
                  f"{row['roofline']:>9.1%}")
            row["_out"] = out
        for row in rows:
            if row.get("S") == s and "_out" in row:
                out = row.pop("_out")
                if ref is not None:
                    a, r = np.asarray(out, np.float32), np.asarray(ref, np.float32)
                    row["rel_err"] = float(np.max(np.abs(a - r)) / np.max(np.abs(r)))
        print("       rel err vs xla_ref: " + ", ".join(
            f"{r['impl']}={r['rel_err']:.1e}" for r in rows if r.get("S") == s and "rel_err" in r))
    if args.json:
        with open(args.json, "w") as f:
            shapes = dict(B=b, H=h, Hkv=hkv, D=d, Tq=tq, dtype=jnp.dtype(dtype).name)
            json.dump(dict(device=str(device.device_kind), platform=platform, hbm_gbps=args.hbm_gbps,
                           shapes=shapes, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
