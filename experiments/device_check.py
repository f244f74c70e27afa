"""One command for a GPU machine: everything of dlmjax that needs a device, measured and written up.

    python experiments/device_check.py --out DIR [--hbm-gbps GBPS] [--peak-tflops TFLOPS]
                                       [--budget SECONDS] [--sections NAME ...] [--dry-run]

Writes DIR/device_report.md and DIR/device_report.json (rewritten after every finished row,
so a run cut short still leaves a report), DIR/sections/NAME.json (one per section) and
DIR/worker-N.log (the raw output). Needs no network: every model is random and built here.

Sections (in this order; each one independent of the others):
- machine:  python, jax, jaxlib, the jax CUDA plugin, CUDA / cuDNN, torch, transformers versions,
            the device, its peak HBM bandwidth and bf16 FLOP/s (from the device kind, see
            bench_kernel.DEVICE_PEAKS; --hbm-gbps / --peak-tflops override), nvidia-smi.
- parity:   tiny random checkpoints (dlmjax.testing) converted and loaded by dlmjax on the device,
            against transformers (tests/torch_reference.py) on the same GPU: bf16 logits vs torch
            fp32 and bf16, fp32 logits with left padding (JAX default and "highest" matmul
            precision); the bounds of tests/test_gpu_parity.py.
- kernels:  cached block attention at LLaDA-8B decode shapes (32 heads x 128, cache S 512-2048,
            Tq 32 and 128 queries, batch 1 and 8): the platform's Pallas kernel (Mosaic GPU on a GPU,
            the TPU kernel on a TPU), compiled on the device, checked against the XLA reference
            (also with key padding and block-causal ids), timed against XLA and cuDNN attention,
            with the fraction of the HBM roofline; and what implementation="auto" picks.
- forward:  one LLaDA-8B-shaped forward (random bf16 weights; all 32 layers when the device holds
            2.5x the weights, else 4 and 8 layers extrapolated to 32) against the HBM roofline
            (weight bytes / peak bandwidth) and the compute roofline (FLOPs / peak bf16 FLOP/s).
- decode:   tokens/s and NFE of llada, fast-dllm (dual cache) and sched at LLaDA-8B shapes, dlmjax
            against an eager PyTorch loop of the same method (experiments/torch_decoders.py) on the
            same GPU and the same weights (shared through DLPack), batch 1 and 8, and the overhead
            wall time / (forwards x one bare forward).
- moe:      LLaDA2.0-mini's mixture-of-experts layer (bf16, random weights): its output against a dense
            float32 gather of the same experts, and ms per layer call at 160 and 1280 tokens against the HBM
            roofline (the experts the tokens use, read once) and the compute roofline.

Fixed NFE with random weights: a random model's confidences decide how many tokens a threshold
rule commits and when an early exit fires, so the methods are pinned to a known NFE that both
implementations must reach: llada's quota rule runs exactly `steps` forwards (steps = gen_length:
one token per step); fast-dllm runs with threshold 1.0, which a softmax probability never reaches
over a 126k vocabulary, so each step commits exactly the one best token (the rule's "plus the
best one"): gen_length forwards, each block a refresh and block_length - 1 cached steps; sched
runs with tau_high = tau_low = 1e9, so it computes its exit signal every step but never exits:
`steps` forwards. The table shows both implementations' NFE next to the expected one. Real
weights commit more tokens per step: the cost per step is what is measured here.

Time boxes: each section has a budget (BUDGETS, scaled to --budget, default 400 s in all) and
runs in a worker process; section i must end by start + the sum of the budgets up to i, so
time a section leaves unused goes to the next ones. Inside a section, cells that no longer fit
are recorded as skipped; a section past its deadline is killed (its finished rows are kept,
the section is marked "timeout") and a new worker runs the remaining sections. A crash (e.g. a
CUDA fault in a kernel) is recorded the same way with the log's tail. The report is written
whatever happens.

--dry-run: every section on tiny shapes on the CPU (JAX CPU, torch CPU, the TPU kernel in
interpret mode, no cuDNN), to check the wiring (tests/test_device_check.py); its numbers say
nothing about speed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import pathlib
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"

SECTIONS = ("machine", "parity", "kernels", "forward", "decode", "moe")
# Seconds per section at the default --budget (400 s); a dry run gets DRY_BUDGET in the same proportions.
BUDGETS = {"machine": 20, "parity": 40, "kernels": 60, "forward": 60, "decode": 190, "moe": 30}
DEFAULT_BUDGET = 400.0
DRY_BUDGET = 400.0  # an upper bound: on an idle 2-core machine the dry run takes well under a minute
KILL_GRACE = 5.0  # seconds past a section's deadline before its worker is killed
KERNEL_TOL = 1e-2  # max |a - ref| / max |ref| for bf16 attention outputs (tests/test_kernels.py)

# LLaDA2.0-mini's mixture-of-experts layer (llada2.md section 1), and the dry run's stand-in.
MOE_MINI = dict(hidden_size=2048, num_experts=256, moe_intermediate_size=512, num_experts_per_tok=8, n_group=8, topk_group=4,
                num_shared_experts=1, dtype="bfloat16", tokens=(160, 1280))
MOE_TINY = dict(hidden_size=64, num_experts=8, moe_intermediate_size=16, num_experts_per_tok=2, n_group=4, topk_group=2,
                num_shared_experts=1, dtype="float32", tokens=(16,))
# LLaDA-8B (GSAI-ML/LLaDA-8B-Instruct config.json), and the dry run's stand-in of the same family.
LLADA_8B = dict(vocab_size=126464, hidden_size=4096, num_heads=32, num_kv_heads=32, intermediate_size=12288,
                max_positions=4096, dtype="bfloat16")
TINY = dict(vocab_size=128, hidden_size=64, num_heads=4, num_kv_heads=4, intermediate_size=128, max_positions=512,
            dtype="float32")


@dataclasses.dataclass(frozen=True)
class Shapes:
    """What a section runs: the GPU run's shapes, or the dry run's tiny ones."""

    model: dict  # tiny_hf_config kwargs without num_layers
    layers: int
    kernel_cells: tuple  # (B, Tq, S), most important first
    kernel_heads: int
    kernel_head_dim: int
    kernel_iters: int
    kernel_chain: int
    check_s: int  # cache length of the masked kernel checks
    batches: tuple
    prompt: int
    gen: int
    block: int
    forward_reps: int
    forward_loop: int
    parity_models: tuple


def _kernel_cells() -> tuple:
    first = [(b, 32, s) for s in (2048, 512) for b in (1, 8)]
    rest = [(b, tq, s) for tq, s in ((128, 2048), (32, 1024), (128, 512), (128, 1024)) for b in (1, 8)]
    return tuple(first + rest)


GPU_SHAPES = Shapes(model=LLADA_8B, layers=32, kernel_cells=_kernel_cells(), kernel_heads=32, kernel_head_dim=128,
                    kernel_iters=10, kernel_chain=20, check_s=1024, batches=(1, 8), prompt=32, gen=128, block=32,
                    forward_reps=5, forward_loop=4, parity_models=("llada-bf16", "dream-bf16", "llada", "dream"))
DRY_SHAPES = Shapes(model=TINY, layers=2, kernel_cells=((1, 8, 256),), kernel_heads=4, kernel_head_dim=64,
                    kernel_iters=2, kernel_chain=1, check_s=384, batches=(1,), prompt=8, gen=16, block=8,
                    forward_reps=2, forward_loop=2, parity_models=("llada-bf16", "llada"))

# name -> (family, tiny_hf_config kwargs, seed): tests/conftest.py's checkpoints of tests/test_gpu_parity.py
PARITY_MODELS = {
    "llada-bf16": ("llada", dict(dtype="bfloat16"), 2),
    "dream-bf16": ("dream", dict(num_heads=4, num_kv_heads=2, dtype="bfloat16"), 6),
    "llada": ("llada", dict(), 1),
    "dream": ("dream", dict(num_heads=4, num_kv_heads=2), 4),
}


def fixed_nfe_methods(block: int) -> dict:
    """method -> the knobs given to BOTH implementations so that random weights cannot change NFE
    (see the module docstring); block_length None = one block (SchED on LLaDA's schedule)."""
    return {
        "llada": dict(block_length=block),
        "fast-dllm": dict(block_length=block, threshold=1.0, cache="dual"),
        "sched": dict(block_length=None, tau_high=1e9, tau_low=1e9, exit_k=4.0),
    }


# ----------------------------------------------------------------------------------------------
# Section records: one JSON file per section, rewritten after every change
# ----------------------------------------------------------------------------------------------


def _write_json(path: pathlib.Path, doc) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=_jsonable) + "\n")
    os.replace(tmp, path)


def _jsonable(x):
    if hasattr(x, "item"):  # numpy / jax scalars
        return x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)


def _read_json(path: pathlib.Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class Record:
    """The section being run: its data, rows, notes and log lines, saved on every change."""

    def __init__(self, path: pathlib.Path, name: str, deadline: float):
        self.path, self.deadline = path, deadline
        self.doc = dict(name=name, status="running", started=time.time(), seconds=None, data={}, rows=[], notes=[],
                        log=[], error=None)
        self.save()

    def save(self) -> None:
        _write_json(self.path, self.doc)

    def set(self, **items) -> None:
        self.doc["data"].update(items)
        self.save()

    def row(self, **row) -> dict:
        self.doc["rows"].append(row)
        self.save()
        return row

    def note(self, text: str) -> None:
        print(f"  note: {text}", flush=True)
        self.doc["notes"].append(text)
        self.save()

    def remaining(self) -> float:
        return self.deadline - time.time()

    def fits(self, seconds: float, what: str) -> bool:
        """Whether `seconds` more fit before the deadline; if not, say what is skipped."""
        if self.remaining() >= seconds:
            return True
        self.note(f"skipped {what}: about {seconds:.0f}s needed, {max(self.remaining(), 0):.0f}s of the budget left")
        return False


class LogCapture:
    """The 'dlmjax.kernels' log lines (kernel fallbacks) while a section runs."""

    def __init__(self, record: Record):
        import logging

        self.record = record
        self.handler = logging.Handler()
        self.handler.emit = lambda r: self._add(f"[{r.name}] {r.getMessage()}")
        self.logger = logging.getLogger("dlmjax.kernels")

    def _add(self, line: str) -> None:
        print(f"  {line}", flush=True)
        self.record.doc["log"].append(line)
        self.record.save()

    def __enter__(self):
        import logging

        self.saved = self.logger.level, self.logger.propagate
        self.logger.addHandler(self.handler)
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False  # printed once, by _add
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)
        self.logger.level, self.logger.propagate = self.saved


class Skip(Exception):
    """A section that does not apply on this machine (e.g. no CUDA for torch on a TPU host)."""


def error_text(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"


# ----------------------------------------------------------------------------------------------
# Shared helpers of the sections (run in the worker)
# ----------------------------------------------------------------------------------------------


def _import_paths() -> None:
    for path in (EXPERIMENTS, ROOT / "tests"):  # bench_*, torch_decoders; torch_reference (not a package)
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))


def device_peaks(args, device) -> dict:
    """Peak HBM GB/s and bf16 TFLOP/s of the device, and where they come from."""
    from bench_kernel import device_peaks as table

    hbm, tflops = table(device.device_kind) if device.platform in ("gpu", "tpu") else (None, None)
    return dict(
        device_kind=device.device_kind, hbm_gbps=args.hbm_gbps or hbm, peak_tflops=args.peak_tflops or tflops,
        hbm_source="--hbm-gbps" if args.hbm_gbps else (f"device kind {device.device_kind!r}" if hbm else "unknown"),
        tflops_source="--peak-tflops" if args.peak_tflops else (f"device kind {device.device_kind!r}" if tflops else "unknown"),
    )


def torch_device(ctx):
    """CUDA when JAX runs on a GPU and torch sees one; the CPU in a dry run; None otherwise."""
    import jax
    import torch

    if ctx.dry:
        torch.set_num_threads(1)  # tiny matmuls: one thread beats waking a pool on a busy CPU
        return torch.device("cpu")
    if jax.devices()[0].platform == "gpu" and torch.cuda.is_available():
        return torch.device("cuda")
    return None


def device_memory_bytes(device) -> int | None:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if device.platform == "cpu" and hasattr(os, "sysconf"):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return None


def model_config(shapes: Shapes, layers: int) -> dict:
    from dlmjax.testing import tiny_hf_config

    return tiny_hf_config("llada", num_layers=layers, **shapes.model)


def weight_bytes(cfg) -> int:
    """Bytes of every parameter of a model config (the HBM a forward must read at least once)."""
    from dlmjax.convert.layouts import tensor_specs

    itemsize = 2 if cfg.dtype in ("bfloat16", "float16") else 4
    return sum(spec.numel for spec in tensor_specs(cfg)) * itemsize


def forward_flops(cfg, batch: int, length: int) -> float:
    """Matmul FLOPs of one forward at [batch, length]: 2 per weight per token (the embedding
    lookup excluded), plus QK^T and PV (4 * L^2 * heads * head_dim per layer and row)."""
    from dlmjax.convert.layouts import tensor_specs

    matmul = sum(spec.numel for spec in tensor_specs(cfg) if len(spec.shape) == 2 and spec.path != ("embed",))
    attention = 4 * length * length * cfg.num_heads * cfg.head_dim * cfg.num_layers
    return 2.0 * matmul * batch * length + attention * batch


_MODELS: dict = {}  # (layers, dtype) -> LM, kept so the decode section reuses the forward section's model
_FORWARD_TIMES: dict = {}  # (layers, batch, length) -> (jit call seconds, in-program seconds)


def random_lm(shapes: Shapes, layers: int):
    """A LLaDA-shaped dlmjax LM with random weights (dlmjax.train.init_model), built on the device."""
    key = (layers, shapes.model["dtype"])
    if key not in _MODELS:
        import jax.numpy as jnp

        from dlmjax.config import from_hf_config
        from dlmjax.lm import LM
        from dlmjax.train.init import init_model

        _MODELS.clear()  # at most one model on the device at a time
        cfg = from_hf_config(model_config(shapes, layers))
        _MODELS[key] = LM(init_model(cfg, seed=0, std=0.02, dtype=jnp.dtype(shapes.model["dtype"])))
    return _MODELS[key]


def jax_forward_times(lm, batch: int, length: int, shapes: Shapes) -> tuple[float, float]:
    key = (lm.config.num_layers, batch, length)
    if key not in _FORWARD_TIMES:
        from bench_decode import jax_forward_seconds

        _FORWARD_TIMES[key] = jax_forward_seconds(lm, batch, length, shapes.forward_reps, shapes.forward_loop)
    return _FORWARD_TIMES[key]


def _diff(ours, ref, where=None) -> dict:
    import numpy as np

    a, r = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if where is not None:
        a, r = a[where], r[where]
    return dict(max_abs=float(np.max(np.abs(a - r))), rel_l2=float(np.linalg.norm(a - r) / np.linalg.norm(r)))


@contextlib.contextmanager
def matmul_precision(value):
    import jax

    previous = jax.config.jax_default_matmul_precision
    jax.config.update("jax_default_matmul_precision", value)
    try:
        yield
    finally:
        jax.config.update("jax_default_matmul_precision", previous)


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------


def section_machine(ctx, rec: Record) -> None:
    import importlib.metadata

    import jax
    import jaxlib

    device = jax.devices()[0]
    rec.set(
        python=platform.python_version(), os=platform.platform(), cpu=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(), jax=jax.__version__, jaxlib=getattr(jaxlib, "__version__", None) or jaxlib.version.__version__,
        backend=device.platform, platform_version=getattr(device.client, "platform_version", None),
        device_count=jax.device_count(), compute_capability=getattr(device, "compute_capability", None),
        device_memory_bytes=device_memory_bytes(device), **device_peaks(ctx.args, device),
    )
    wanted = ("jax-cuda", "jax_cuda", "jax-rocm", "libtpu", "nvidia-cudnn", "nvidia-cuda-runtime", "nvidia-cublas",
              "nvidia-nccl")
    packages = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith(wanted) or name in ("flax", "optax", "orbax-checkpoint", "transformers", "torch",
                                                "safetensors", "numpy", "ml-dtypes", "tokenizers"):
            packages[name] = dist.version
    rec.set(packages=dict(sorted(packages.items())))
    try:
        from jax._src.lib import cuda_versions  # private; absent without the CUDA plugin

        if cuda_versions is not None:
            rec.set(cuda_runtime=cuda_versions.cuda_runtime_get_version(), cudnn=cuda_versions.cudnn_get_version())
    except Exception as e:  # noqa: BLE001 - informational only
        rec.set(cuda_versions=error_text(e))
    import torch

    rec.set(torch=torch.__version__, torch_cuda=torch.version.cuda, torch_cudnn=torch.backends.cudnn.version(),
            torch_cuda_available=torch.cuda.is_available(),
            torch_device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.memory,power.limit",
                              "--format=csv"], capture_output=True, text=True, timeout=20)
        rec.set(nvidia_smi=(smi.stdout or smi.stderr).strip())
    except (OSError, subprocess.TimeoutExpired) as e:
        rec.set(nvidia_smi=error_text(e))
    rec.set(environment=jax.print_environment_info(return_string=True))


def parity_rows(name: str, hf_dir, lm, device) -> list[dict]:
    """The parity checks of one tiny checkpoint (tests/test_gpu_parity.py asserts them too): dlmjax's
    logits (`lm`, on its device) against transformers' (tests/torch_reference.py) on the torch `device`.

    bfloat16 checkpoints, ids [2, 48]: dlmjax bf16 and torch bf16 against torch fp32; dlmjax must be
    within 1.25x torch bf16's relative L2 error and 0.04. float32 ones, ids [2, 24] with row 0 left-padded
    by 5: max |diff| over the real positions <= 1e-4 at precision "highest" (and, on an accelerator,
    the figure at JAX's default precision, unchecked), and the padded row equals the unpadded one
    within 2e-5. Rows: model, compare, max_abs, rel_l2, and bound/ok for the checked ones."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    import torch_decoders
    from torch_reference import load_reference, reference_position_ids

    torch.backends.cuda.matmul.allow_tf32 = False  # torch float32 stays float32 on the GPU
    torch.backends.cudnn.allow_tf32 = False
    rows = []
    if jnp.dtype(lm.dtype) == jnp.bfloat16:
        ids = np.random.default_rng(0).integers(0, 96, (2, 48))
        refs = {}
        for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            model = load_reference(str(hf_dir), dtype)[0].to(device)
            refs[label] = torch_decoders.TorchForward(model)(ids).cpu().numpy()
        ours = lm.logits(ids)
        mine, theirs = _diff(ours, refs["fp32"]), _diff(refs["bf16"], refs["fp32"])
        ok = mine["rel_l2"] <= 1.25 * theirs["rel_l2"] and mine["rel_l2"] <= 0.04
        return [dict(model=name, compare="dlmjax bf16 vs torch fp32", **mine,
                     bound="rel L2 <= 1.25 x torch bf16's and <= 0.04", ok=bool(ok)),
                dict(model=name, compare="torch bf16 vs torch fp32", **theirs),
                dict(model=name, compare="dlmjax bf16 vs torch bf16", **_diff(ours, refs["bf16"]))]
    ids = np.random.default_rng(1).integers(0, 96, (2, 24))
    mask = np.ones_like(ids)
    mask[0, :5] = 0
    model, family = load_reference(str(hf_dir), torch.float32)
    forward = torch_decoders.TorchForward(model.to(device))
    ref = forward(ids, mask, reference_position_ids(family, ids, mask)).cpu().numpy()
    real = mask.astype(bool)  # padded query rows carry no meaning
    if jax.devices()[0].platform != "cpu":  # on the CPU the default precision is float32 already
        with matmul_precision(None):
            rows.append(dict(model=name, compare="dlmjax fp32 vs torch fp32, padded (JAX default precision)",
                             **_diff(lm.logits(ids, mask), ref, real)))
    with matmul_precision("highest"):
        out = lm.logits(ids, mask)
        d = _diff(out, ref, real)
        rows.append(dict(model=name, compare="dlmjax fp32 vs torch fp32, padded (precision highest)", **d,
                         bound="max abs <= 1e-4", ok=bool(d["max_abs"] <= 1e-4)))
        shift = float(np.abs(out[0, 5:] - lm.logits(ids[:1, 5:])[0]).max())
    rows.append(dict(model=name, compare="dlmjax padded row vs the same row unpadded (highest)", max_abs=shift,
                     bound="max abs <= 2e-5", ok=bool(shift <= 2e-5)))
    return rows


def section_parity(ctx, rec: Record) -> None:
    import jax

    import dlmjax
    from dlmjax.convert import convert
    from dlmjax.testing import write_tiny_checkpoint

    device = torch_device(ctx)
    if device is None:
        raise Skip(f"torch has no CUDA device here (jax runs on {jax.devices()[0].platform}): nothing to compare with")
    rec.set(jax_device=str(jax.devices()[0]), torch_device=str(device))
    for name in ctx.shapes.parity_models:
        family, kwargs, seed = PARITY_MODELS[name]
        with tempfile.TemporaryDirectory(prefix="device-check-") as tmp:
            hf = write_tiny_checkpoint(pathlib.Path(tmp) / "hf", family, seed=seed, shards=2, **kwargs)
            lm = dlmjax.load(convert(hf, pathlib.Path(tmp) / "jax", progress=False))
            for row in parity_rows(name, hf, lm, device):
                rec.row(**row)


def section_kernels(ctx, rec: Record) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import bench_kernel
    from dlmjax.kernels import cached_block_attention, reference_attention

    device = jax.devices()[0]
    plat = device.platform
    peaks = device_peaks(ctx.args, device)
    sh = ctx.shapes
    h = hkv = sh.kernel_heads
    d = sh.kernel_head_dim
    names = ["kernel", "xla_ref", "nn_xla"] + (["nn_cudnn"] if plat == "gpu" else [])
    kernel_impl = {"gpu": "pallas_gpu (Mosaic GPU)", "tpu": "pallas_tpu (Mosaic TPU)"}.get(plat, "pallas_tpu in interpret mode")
    rec.set(platform=plat, kernel=kernel_impl, heads=h, kv_heads=hkv, head_dim=d, dtype="bfloat16",
            iters=sh.kernel_iters, chain=sh.kernel_chain, hbm_gbps=peaks["hbm_gbps"], hbm_source=peaks["hbm_source"],
            tolerance=KERNEL_TOL)
    if plat != "gpu":
        rec.note("nn_cudnn (jax.nn.dot_product_attention implementation='cudnn') runs on GPU only: not run here")
    last = 0.0
    for b, tq, s in sh.kernel_cells:
        if not rec.fits(last, f"cell B={b} Tq={tq} S={s}"):
            continue
        start = time.perf_counter()
        rows = bench_kernel.bench_cell(plat, b=b, h=h, hkv=hkv, d=d, tq=tq, s=s, dtype=jnp.bfloat16,
                                       iters=sh.kernel_iters, chain_length=sh.kernel_chain,
                                       hbm_gbps=peaks["hbm_gbps"], names=names)
        for row in rows:
            if "rel_err" in row:
                row["ok"] = bool(row["rel_err"] <= KERNEL_TOL)
            rec.row(kind="timing", **row)
        last = time.perf_counter() - start

    # The kernel under the masks a decode gives it, against the XLA reference: key padding (left
    # padding, unused cache slots) alone, then with block-causal ids (Fast-dLLM v2's block cache).
    s = sh.check_s
    pos = np.arange(s)
    key_valid = np.stack([pos < s - s // 3, pos >= s // 4])
    interpret = plat not in ("gpu", "tpu")
    for tq in sorted({tq for _, tq, _ in sh.kernel_cells}):
        rng = np.random.default_rng(tq)
        q, k, v = (jnp.asarray(rng.standard_normal(shape, np.float32), jnp.bfloat16)
                   for shape in ((2, h, tq, d), (2, hkv, s, d), (2, hkv, s, d)))
        q_block = np.full(tq, (s // 2) // 32, np.int32)
        q_block[0] = 0
        masks = {"key padding": dict(key_valid=key_valid),
                 "key padding + block-causal ids": dict(key_valid=key_valid, q_block=q_block, k_block=(pos // 32).astype(np.int32))}
        for label, m in masks.items():
            ref = jax.jit(lambda q, k, v, m=m: reference_attention(q, k, v, **m))(q, k, v)
            out = None
            try:
                out = jax.jit(lambda q, k, v, m=m: cached_block_attention(
                    q, k, v, **m, implementation="pallas", interpret=interpret or None))(q, k, v)
                err = bench_kernel.rel_err(out, ref)
                finite = bool(np.isfinite(np.asarray(out, np.float32)).all())
                rec.row(kind="check", mask=label, B=2, Tq=tq, S=s, rel_err=err, ok=bool(finite and err <= KERNEL_TOL))
            except Exception as e:  # noqa: BLE001 - a kernel that fails to build is a result
                rec.row(kind="check", mask=label, B=2, Tq=tq, S=s, error=error_text(e))
            if label != "key padding":
                continue
            # What implementation="auto" (the library's default) runs here: its output equals the
            # kernel's or XLA's bit for bit (a fallback is also logged, with its reason, below).
            try:
                auto = np.asarray(jax.jit(lambda q, k, v, m=m: cached_block_attention(q, k, v, **m))(q, k, v))
                uses = [name for name, x in (("kernel", out), ("xla", ref)) if x is not None and np.array_equal(auto, np.asarray(x))]
                rec.row(kind="auto", mask=label, B=2, Tq=tq, S=s, uses=" and ".join(uses) or "neither (differs from both)")
            except Exception as e:  # noqa: BLE001
                rec.row(kind="auto", mask=label, B=2, Tq=tq, S=s, error=error_text(e))


def section_forward(ctx, rec: Record) -> None:
    import jax

    device = jax.devices()[0]
    peaks = device_peaks(ctx.args, device)
    sh = ctx.shapes
    from dlmjax.config import from_hf_config

    full_cfg = from_hf_config(model_config(sh, sh.layers))
    full_bytes = weight_bytes(full_cfg)
    memory = device_memory_bytes(device)
    full = memory is None or 2.5 * full_bytes <= memory
    layer_sets = (sh.layers,) if full else (4, 8)
    length = sh.prompt + sh.gen
    rec.set(model="LLaDA-8B shapes" if sh.model is LLADA_8B else "tiny LLaDA (dry run)", layers=sh.layers,
            hidden=full_cfg.hidden_size, heads=full_cfg.num_heads, intermediate=full_cfg.intermediate_size,
            vocab=full_cfg.vocab_size, dtype=sh.model["dtype"], weight_bytes=full_bytes, device_memory_bytes=memory,
            measured_layers=list(layer_sets), length=length, **peaks)
    if not full:
        rec.note(f"{2.5 * full_bytes / 1e9:.0f} GB needed for all {sh.layers} layers, {memory / 1e9:.0f} GB on the device: "
                 f"timing 4 and 8 layers, extrapolated linearly to {sh.layers}")
    measured = {}
    for layers in layer_sets:  # one model at a time on the device
        lm = random_lm(sh, layers)
        for b in sh.batches:
            if rec.fits(1.0, f"{layers} layers at batch {b}"):
                measured[layers, b] = jax_forward_times(lm, b, length, sh)
    for b in sh.batches:
        times = {layers: measured[layers, b] for layers in layer_sets if (layers, b) in measured}
        if len(times) < len(layer_sets):
            continue
        if full:
            call, loop = times[sh.layers]
        else:
            (c4, l4), (c8, l8) = times[4], times[8]
            scale = (sh.layers - 4) / 4
            call, loop = c4 + (c8 - c4) * scale, l4 + (l8 - l4) * scale
        flops = forward_flops(full_cfg, b, length)
        hbm_floor = full_bytes / (peaks["hbm_gbps"] * 1e9) if peaks["hbm_gbps"] else None
        compute_floor = flops / (peaks["peak_tflops"] * 1e12) if peaks["peak_tflops"] else None
        floors = [f for f in (hbm_floor, compute_floor) if f is not None]
        rec.row(layers=sh.layers, batch=b, length=length, tokens=b * length, extrapolated=not full,
                measured={str(k): dict(call_seconds=v[0], seconds=v[1]) for k, v in times.items()},
                seconds=loop, call_seconds=call, tokens_per_s=b * length / loop, weight_bytes=full_bytes,
                hbm_floor_s=hbm_floor, hbm_fraction=hbm_floor / loop if hbm_floor else None, flops=flops,
                compute_floor_s=compute_floor, roofline_fraction=max(floors) / loop if floors else None,
                bound=None if len(floors) < 2 else ("memory" if hbm_floor >= compute_floor else "compute"))


def moe_layer(spec: dict, seed: int = 0):
    """A dlmjax.model.MoE of LLaDA2's layout at `spec`'s shapes, random weights (std 0.02), and its config."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dlmjax.config import from_hf_config
    from dlmjax.model import MoE

    hf = dict(model_type="llada2_moe", vocab_size=1024, hidden_size=spec["hidden_size"], num_hidden_layers=1,
              num_attention_heads=16, num_key_value_heads=4, head_dim=128, intermediate_size=4 * spec["hidden_size"],
              first_k_dense_replace=0, routed_scaling_factor=2.5, partial_rotary_factor=0.5, mask_token_id=1000,
              eos_token_id=999, torch_dtype=spec["dtype"], **{k: spec[k] for k in ("num_experts", "moe_intermediate_size",
              "num_experts_per_tok", "n_group", "topk_group", "num_shared_experts")})
    cfg = from_hf_config(hf)
    dtype = jnp.dtype(spec["dtype"])
    layer = MoE(cfg, dtype, nnx.Rngs(0))
    key = jax.random.key(seed)
    for i, (path, variable) in enumerate(nnx.state(layer, nnx.Param).flat_state()):
        scale = 0.1 if path[-1] == "expert_bias" else 0.02
        shape, kind = variable[...].shape, variable[...].dtype
        variable[...] = (scale * jax.random.normal(jax.random.fold_in(key, i), shape)).astype(kind)
    return layer, cfg


def moe_bytes_and_flops(cfg, experts, tokens: int) -> tuple[int, int, float]:
    """(distinct experts the tokens use, bytes of weights a layer call must read: those experts,
    the shared expert and the router; matmul FLOPs: 3 projections per routed pair and per token
    for the shared expert, plus the router)."""
    import numpy as np

    touched = len(np.unique(np.asarray(experts)))
    d, m = cfg.hidden_size, cfg.moe_intermediate_size
    itemsize = 2 if cfg.dtype == "bfloat16" else 4
    per_expert = 3 * m * d
    shared = per_expert * cfg.num_shared_experts
    nbytes = (touched * per_expert + shared + cfg.num_experts * d) * itemsize
    flops = 2.0 * tokens * (cfg.num_experts_per_tok * per_expert + shared + cfg.num_experts * d)
    return touched, nbytes, flops


def section_moe(ctx, rec: Record) -> None:
    """LLaDA2.0-mini's MoE layer (bf16, random weights): its output against a dense float32
    gather of the same experts, and its time per call against the HBM and compute rooflines."""
    import time as _time

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    spec = MOE_TINY if ctx.args.dry_run else MOE_MINI
    device = jax.devices()[0]
    peaks = device_peaks(ctx.args, device)
    layer, cfg = moe_layer(spec)
    rec.set(layer="LLaDA2.0-mini MoE" if spec is MOE_MINI else "tiny MoE (dry run)", hidden=cfg.hidden_size,
            experts=cfg.num_experts, expert_width=cfg.moe_intermediate_size, top_k=cfg.num_experts_per_tok,
            groups=f"{cfg.topk_group} of {cfg.n_group}", dtype=spec["dtype"], **peaks)
    graphdef, state = nnx.split(layer)

    @jax.jit
    def call(state, x):
        return nnx.merge(graphdef, state)(x)

    @functools.partial(jax.jit, static_argnames=("n",))
    def loop(state, x, n):
        layer = nnx.merge(graphdef, state)
        return jax.lax.fori_loop(0, n, lambda _, h: layer(h).astype(h.dtype), x)

    # the check: 64 tokens, the grouped matmuls against a dense gather in float32
    x = (jax.random.normal(jax.random.key(1), (1, 64, cfg.hidden_size)) * 1.0).astype(jnp.dtype(spec["dtype"]))
    ours = np.asarray(call(state, x), np.float32)
    flat = np.asarray(x, np.float32)[0]
    experts, weights = (np.asarray(a) for a in layer.router(jnp.asarray(x[0])))
    w = {name: np.asarray(getattr(layer.experts, name)[...], np.float32) for name in ("gate_proj", "up_proj", "down_proj")}
    dense = np.zeros_like(flat)
    for t in range(flat.shape[0]):
        for e, g in zip(experts[t], weights[t]):
            h = flat[t] @ w["gate_proj"][e].T
            h = h / (1 + np.exp(-h)) * (flat[t] @ w["up_proj"][e].T)
            dense[t] += g * (h @ w["down_proj"][e].T)
    dense += np.asarray(layer.shared(jnp.asarray(flat, x.dtype)), np.float32)
    err = float(np.abs(ours[0] - dense).max() / max(np.abs(dense).max(), 1e-9))
    rec.row(kind="check", tokens=64, rel_err=err, ok=err < (3e-2 if spec["dtype"] == "bfloat16" else 1e-4))

    for tokens in spec["tokens"]:
        if not rec.fits(2.0, f"{tokens} tokens"):
            continue
        x = jax.random.normal(jax.random.key(2), (1, tokens, cfg.hidden_size)).astype(jnp.dtype(spec["dtype"]))
        jax.block_until_ready(call(state, x))
        n = 4
        jax.block_until_ready(loop(state, x, n))
        times = []
        for _ in range(3):
            start = _time.perf_counter()
            jax.block_until_ready(loop(state, x, n))
            times.append((_time.perf_counter() - start) / n)
        seconds = min(times)
        touched, nbytes, flops = moe_bytes_and_flops(cfg, layer.router(x[0])[0], tokens)
        hbm = nbytes / (peaks["hbm_gbps"] * 1e9) if peaks["hbm_gbps"] else None
        compute = flops / (peaks["peak_tflops"] * 1e12) if peaks["peak_tflops"] else None
        floors = [f for f in (hbm, compute) if f is not None]
        rec.row(kind="timing", tokens=tokens, seconds=seconds, experts_touched=touched, weight_bytes=nbytes, flops=flops,
                hbm_floor_s=hbm, compute_floor_s=compute, roofline_fraction=max(floors) / seconds if floors else None,
                tokens_per_s=tokens / seconds)


def _torch_llada(lm, hf_config: dict, device, dtype):
    """transformers' Llama on the same weights as `lm` (shared through DLPack, not copied)."""
    import torch
    from flax import nnx

    from dlmjax.convert.layouts import tensor_specs
    from torch_reference import load_reference

    pure = nnx.to_pure_dict(lm.state)
    tensors = {}
    for spec in tensor_specs(lm.config):
        leaf = pure
        for part in spec.path:
            leaf = leaf[part]
        tensors[spec.hf_name] = torch.from_dlpack(leaf)
    with tempfile.TemporaryDirectory(prefix="device-check-") as tmp:
        (pathlib.Path(tmp) / "config.json").write_text(json.dumps(hf_config))
        model, _ = load_reference(tmp, dtype, attn_implementation="sdpa", tensors=tensors)
    return model.to(device)  # the rotary tables are built on the CPU


def section_decode(ctx, rec: Record) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    import bench_decode
    import torch_decoders

    sh = ctx.shapes
    device = torch_device(ctx)
    if device is None:
        raise Skip(f"torch has no CUDA device here (jax runs on {jax.devices()[0].platform}): no eager loop to compare with")
    layers = sh.layers
    memory = device_memory_bytes(jax.devices()[0])
    from dlmjax.config import from_hf_config

    if memory is not None and 2.5 * weight_bytes(from_hf_config(model_config(sh, layers))) > memory:
        layers = 8
        rec.note(f"the device holds {memory / 1e9:.0f} GB, too little for all {sh.layers} layers: decoding with {layers}")
    lm = random_lm(sh, layers)
    dtype = torch.bfloat16 if sh.model["dtype"] == "bfloat16" else torch.float32
    model = _torch_llada(lm, model_config(sh, layers), device, dtype)
    forward = torch_decoders.TorchForward(model)
    methods = fixed_nfe_methods(sh.block)
    common = dict(gen_length=sh.gen, steps=sh.gen)
    length = sh.prompt + sh.gen
    mask_id = lm.config.mask_token_id
    rec.set(layers=layers, dtype=sh.model["dtype"], prompt=sh.prompt, gen_length=sh.gen, steps=sh.gen,
            block_length=sh.block, methods=methods, jax_device=str(jax.devices()[0]), torch_device=str(device),
            torch_attention="sdpa", temperature=0.0, expected_nfe=sh.gen)

    # The two stacks on one canvas: transformers' forward, our eager dual-cache forward, dlmjax.
    prompts = np.random.default_rng(0).integers(0, 96, (max(sh.batches), sh.prompt))
    canvas = np.concatenate([prompts[:1], np.full((1, sh.gen), mask_id)], axis=1)
    theirs = forward(canvas)
    refresh = torch_decoders.DualCache(model).refresh(torch.as_tensor(canvas).to(device))
    theirs, refresh = theirs.cpu().numpy(), refresh.cpu().numpy()
    # the bare forward program jax_forward_times compiled for [1, prompt + gen]: no extra compile
    ours = np.asarray(bench_decode._jax_forward(lm.state, jnp.asarray(canvas, jnp.int32), lm.graphdef))
    rec.set(canvas_logits=dict(
        dlmjax_vs_torch=_diff(ours, theirs), torch_dual_cache_vs_torch=_diff(refresh, theirs),
        argmax_agreement=float(np.mean(ours.argmax(-1) == theirs.argmax(-1))), max_abs_logit=float(np.abs(theirs).max())))

    last = 0.0
    for b in sh.batches:
        prompt = prompts[:b]
        jax_call, jax_fwd = jax_forward_times(lm, b, length, sh)
        torch_fwd = bench_decode.torch_forward_seconds(forward, b, length, sh.forward_reps)
        for name, knobs in methods.items():
            if not rec.fits(last, f"{name} at batch {b}"):
                continue
            start = time.perf_counter()
            jx = bench_decode.run_dlmjax(lm, prompt, name, knobs, common, 1)
            th = bench_decode.run_torch(forward, prompt, name, knobs, common, mask_id, 1)
            tok = b * sh.gen
            rec.row(
                method=name, cache=knobs.get("cache", "none"), batch=b, block_length=knobs["block_length"] or sh.gen,
                jax_tok_s=tok / jx["seconds"], torch_tok_s=tok / th["seconds"], speedup=th["seconds"] / jx["seconds"],
                jax_seconds=jx["seconds"], torch_seconds=th["seconds"], compile_seconds=jx["compile_seconds"],
                jax_first_seconds=jx["first_seconds"], jax_nfe=float(np.mean(jx["nfe"])), torch_nfe=float(np.mean(th["nfe"])),
                nfe_equal=bool(np.array_equal(jx["nfe"], th["nfe"])), jax_forwards=int(jx["forwards"]),
                torch_forwards=int(th["forwards"]), jax_forward_seconds=jax_fwd, jax_forward_call_seconds=jax_call,
                torch_forward_seconds=torch_fwd, jax_overhead=jx["seconds"] / (jx["forwards"] * jax_fwd),
                torch_overhead=th["seconds"] / (th["forwards"] * torch_fwd),
                agreement=float(np.mean(jx["tokens"] == th["tokens"])), repeatable=bool(jx["repeatable"]),
            )
            last = time.perf_counter() - start


SECTION_FUNCTIONS = {
    "machine": section_machine,
    "parity": section_parity,
    "kernels": section_kernels,
    "forward": section_forward,
    "decode": section_decode,
    "moe": section_moe,
}


# ----------------------------------------------------------------------------------------------
# The worker: runs sections one after the other, recording each
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Context:
    args: argparse.Namespace
    dry: bool
    shapes: Shapes


FAULT_VAR = "DEVICE_CHECK_FAULT"  # e.g. "machine=hang,parity=crash": tests of the time boxes (tests/test_device_check.py)


def _inject_fault(section: str) -> None:
    faults = dict(item.split("=", 1) for item in os.environ.get(FAULT_VAR, "").split(",") if "=" in item)
    fault = faults.get(section)
    if fault == "hang":
        time.sleep(3600)
    elif fault == "crash":
        os._exit(3)
    elif fault == "raise":
        raise RuntimeError(f"fault injected into {section} by {FAULT_VAR}")


def _watchdog(last_deadline: float) -> None:
    """End this worker when its parent is gone (killed from outside) or the whole budget is spent,
    even in the middle of a compile: no orphan keeps the device busy."""
    import threading

    parent = os.getppid()

    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent or time.time() > last_deadline + 2 * KILL_GRACE:
                os._exit(4)

    threading.Thread(target=watch, daemon=True).start()


def run_worker(args) -> int:
    plan = json.loads(args.worker_plan)
    _watchdog(max(plan["deadlines"].values()))
    _import_paths()
    try:  # JAX loads its CUDA libraries (cuDNN) before torch can load other builds of them
        import jax

        print(f"jax {jax.__version__} on {jax.devices()[0]}", flush=True)
    except Exception:  # noqa: BLE001 - each section records its own failure
        print(traceback.format_exc(), flush=True)
    ctx = Context(args=args, dry=args.dry_run, shapes=DRY_SHAPES if args.dry_run else GPU_SHAPES)
    sections_dir = pathlib.Path(args.out) / "sections"
    for name in plan["sections"]:
        rec = Record(sections_dir / f"{name}.json", name, plan["deadlines"][name])
        if rec.remaining() <= 0:
            rec.doc.update(status="skipped", error="no time left in the budget", seconds=0.0)
            rec.save()
            continue
        print(f"== {name} (budget: {rec.remaining():.0f}s)", flush=True)
        start = time.perf_counter()
        try:
            _inject_fault(name)
            with LogCapture(rec):
                SECTION_FUNCTIONS[name](ctx, rec)
            rec.doc["status"] = "ok"
        except Skip as e:
            rec.doc.update(status="skipped", error=str(e))
        except Exception as e:  # noqa: BLE001 - a failing section is a result; the next one runs
            rec.doc.update(status="error", error=error_text(e), traceback=traceback.format_exc()[-4000:])
            print(traceback.format_exc(), flush=True)
        rec.doc["seconds"] = time.perf_counter() - start
        rec.save()
        print(f"== {name}: {rec.doc['status']} in {rec.doc['seconds']:.1f}s", flush=True)
    return 0


# ----------------------------------------------------------------------------------------------
# The parent: deadlines, workers, and the report (no jax, no torch: it never touches the device)
# ----------------------------------------------------------------------------------------------


def _deadlines(sections, total: float, start: float) -> dict:
    scale = total / sum(BUDGETS[name] for name in sections)
    out, t = {}, start
    for name in sections:
        t += BUDGETS[name] * scale
        out[name] = t
    return out


class Parent:
    def __init__(self, args):
        self.args = args
        self.out = pathlib.Path(args.out)
        self.sections_dir = self.out / "sections"
        self.sections = list(args.sections)
        self.started = time.time()
        self.total = args.budget or (DRY_BUDGET if args.dry_run else DEFAULT_BUDGET)
        self.deadlines = _deadlines(self.sections, self.total, self.started)
        self.proc = None
        self.log_handle = None
        self.log_pos = 0
        self.stamp = None

    def doc(self, name):
        return _read_json(self.sections_dir / f"{name}.json")

    def finish(self, name, status, error, log_path=None):
        doc = self.doc(name) or dict(name=name, started=None, data={}, rows=[], notes=[], log=[])
        tail = ""
        if log_path is not None and log_path.exists():
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        doc.update(status=status, error=error, worker_log_tail=tail or None)
        if doc.get("started"):
            doc["seconds"] = time.time() - doc["started"]
        _write_json(self.sections_dir / f"{name}.json", doc)

    def run(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        self.sections_dir.mkdir(exist_ok=True)
        for name in SECTIONS:  # a report describes this run only
            (self.sections_dir / f"{name}.json").unlink(missing_ok=True)
        signal.signal(signal.SIGTERM, self._terminate)
        remaining = list(self.sections)
        worker = 0
        try:
            while remaining:
                if time.time() >= self.deadlines[remaining[-1]]:
                    for name in remaining:
                        self.finish(name, "skipped", "no time left in the budget")
                    break
                worker += 1
                remaining = self._run_worker(remaining, worker)
                self.write_report()
        except KeyboardInterrupt:
            self._kill()
            for name in self.sections:
                doc = self.doc(name)
                if doc is None or doc.get("status") == "running":
                    self.finish(name, "interrupted", "the run was interrupted")
        self.write_report()
        print(f"report: {self.out / 'device_report.md'} ({time.time() - self.started:.0f}s)", flush=True)
        return 0

    def _terminate(self, *_):
        raise KeyboardInterrupt

    def _kill(self):
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def _run_worker(self, sections, number) -> list:
        """Run `sections` in one worker until it ends or overruns; the sections still to run."""
        log_path = self.out / f"worker-{number}.log"
        plan = dict(sections=sections, deadlines={name: self.deadlines[name] for name in sections})
        cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--out", str(self.out), "--worker-plan",
               json.dumps(plan)]
        for flag, value in (("--hbm-gbps", self.args.hbm_gbps), ("--peak-tflops", self.args.peak_tflops)):
            if value:
                cmd += [flag, str(value)]
        if self.args.dry_run:
            cmd.append("--dry-run")
        env = dict(os.environ)
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU with JAX
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        env["PYTHONUNBUFFERED"] = "1"
        if self.args.dry_run:
            env["JAX_PLATFORMS"] = "cpu"
            env["CUDA_VISIBLE_DEVICES"] = ""
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT),
                                         start_new_session=True)
        self.log_pos = 0
        killed = None
        while self.proc.poll() is None:
            time.sleep(0.5)
            self._stream(log_path)
            self.write_report(only_if_changed=True)
            current = next((n for n in sections if (self.doc(n) or {}).get("status") == "running"), None)
            if current is not None and time.time() > self.deadlines[current] + KILL_GRACE:
                self._kill()
                killed = current
        self._stream(log_path)
        rc = self.proc.returncode
        for name in sections:
            doc = self.doc(name)
            if name == killed:
                budget = self.deadlines[name] - (doc or {}).get("started", self.started)
                self.finish(name, "timeout", f"killed: past its deadline ({budget:.0f}s of budget); finished rows are kept",
                            log_path)
            elif doc is not None and doc.get("status") == "running":
                self.finish(name, "error", f"the worker died (exit code {rc}) in this section; see the log tail", log_path)
        todo = [name for name in sections if self.doc(name) is None]
        if todo == sections:  # the worker did not start a single section: starting another would fail the same way
            for name in todo:
                self.finish(name, "error", f"the worker exited (code {rc}) before starting", log_path)
            return []
        return todo

    def _stream(self, log_path):
        try:
            with open(log_path, "rb") as f:
                f.seek(self.log_pos)
                chunk = f.read()
        except OSError:
            return
        self.log_pos += len(chunk)
        if chunk:
            sys.stdout.write(chunk.decode(errors="replace"))
            sys.stdout.flush()

    def write_report(self, only_if_changed: bool = False) -> None:
        docs = {name: self.doc(name) for name in self.sections}
        stamp = json.dumps(docs, sort_keys=True, default=str)
        if only_if_changed and stamp == self.stamp:
            return
        self.stamp = stamp
        meta = dict(command=" ".join([os.path.basename(sys.executable)] + sys.argv), dry_run=self.args.dry_run,
                    started=time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(self.started)),
                    elapsed_seconds=time.time() - self.started, budget_seconds=self.total,
                    hbm_gbps_override=self.args.hbm_gbps, peak_tflops_override=self.args.peak_tflops)
        report = dict(meta=meta, sections={name: doc or dict(name=name, status="pending") for name, doc in docs.items()})
        _write_json(self.out / "device_report.json", report)
        tmp = self.out / "device_report.md.tmp"
        tmp.write_text(render_markdown(report))
        os.replace(tmp, self.out / "device_report.md")


# ----------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------


def _fmt(x, spec: str = ".3g") -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        return format(x, spec)
    return str(x)


def _ok(x) -> str:
    """A check's verdict; a failure stands out."""
    return "" if x is None else ("yes" if x else "**FAIL**")


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _table(headers, rows) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in row) + " |" for row in rows]
    return out + [""]


def _md_machine(doc) -> list[str]:
    d = dict(doc.get("data", {}))
    env = d.pop("environment", None)
    smi = d.pop("nvidia_smi", None)
    packages = d.pop("packages", {})
    lines = _table(["item", "value"], [(k, _fmt(v)) for k, v in d.items()])
    if packages:
        lines += _table(["package", "version"], sorted(packages.items()))
    for title, text in (("nvidia-smi", smi), ("jax.print_environment_info()", env)):
        if text:
            lines += [f"{title}:", "", "```", text.strip(), "```", ""]
    return lines


def _md_parity(doc) -> list[str]:
    d = doc.get("data", {})
    lines = [f"dlmjax on `{d.get('jax_device')}`, transformers on `{d.get('torch_device')}`; tiny random checkpoints "
             "(dlmjax.testing, converted); bf16: ids [2, 48]; fp32: ids [2, 24], row 0 left-padded by 5 (padded query "
             "rows excluded). Bounds from tests/test_gpu_parity.py.", ""]
    rows = [(r["model"], r["compare"], _fmt(r.get("max_abs"), ".2e"), _fmt(r.get("rel_l2"), ".2e"), r.get("bound", ""),
             _ok(r.get("ok"))) for r in doc.get("rows", [])]
    return lines + _table(["model", "comparison", "max abs diff", "rel L2", "bound", "pass"], rows)


def _md_kernels(doc) -> list[str]:
    d = doc.get("data", {})
    rows = doc.get("rows", [])
    lines = [f"Kernel: {d.get('kernel')}. H = Hkv = {d.get('heads')}, D = {d.get('head_dim')}, {d.get('dtype')}, every key "
             f"valid. Time per call = median of {d.get('iters')} runs of one program of {d.get('chain')} chained calls / "
             f"{d.get('chain')}. Bytes = K + V + q + out + key mask; roofline = GB/s / {_fmt(d.get('hbm_gbps'))} GB/s "
             f"({d.get('hbm_source')}). ok = max|a - xla_ref| / max|xla_ref| <= {d.get('tolerance')}.", ""]
    timing = []
    for r in rows:
        if r.get("kind") != "timing":
            continue
        head = (r["B"], r["Tq"], r["S"], r["impl"])
        if "error" in r:
            timing.append(head + (f"error: {r['error']}", "", "", "", "", ""))
        else:
            timing.append(head + (_fmt(r["seconds"] * 1e6, ".1f"), _fmt(r["gbps"], ".0f"), _pct(r.get("roofline")),
                                  _fmt(r.get("rel_err"), ".1e"), _ok(r.get("ok")),
                                  _fmt(r["compile_s"], ".2f")))
    lines += _table(["B", "Tq", "S", "impl", "us/call", "GB/s", "roofline", "rel err", "ok", "compile s"], timing)
    checks = [(r["mask"], r["B"], r["Tq"], r["S"], r.get("error") or _fmt(r["rel_err"], ".1e"), _ok(r.get("ok")))
              for r in rows if r.get("kind") == "check"]
    if checks:
        lines += ["The kernel against the XLA reference under decode masks:", ""]
        lines += _table(["mask", "B", "Tq", "S", "rel err", "ok"], checks)
    auto = [(r["B"], r["Tq"], r["S"], r.get("error") or r["uses"]) for r in rows if r.get("kind") == "auto"]
    if auto:
        lines += ["implementation='auto' (the default) runs:", ""] + _table(["B", "Tq", "S", "auto runs"], auto)
    return lines


def _md_forward(doc) -> list[str]:
    d = doc.get("data", {})
    lines = [f"{d.get('model')}: {d.get('layers')} layers, hidden {d.get('hidden')}, {d.get('heads')} heads, MLP "
             f"{d.get('intermediate')}, vocab {d.get('vocab')}, {d.get('dtype')}, random weights, "
             f"{_fmt((d.get('weight_bytes') or 0) / 1e9, '.2f')} GB of weights; measured with {d.get('measured_layers')} layers. "
             f"Peak HBM {_fmt(d.get('hbm_gbps'))} GB/s ({d.get('hbm_source')}), peak bf16 {_fmt(d.get('peak_tflops'))} "
             f"TFLOP/s ({d.get('tflops_source')}). ms = one forward inside a compiled loop of forwards (device time); "
             "'jit call' = one jitted call from Python.", ""]
    rows = [(r["batch"], r["length"], _fmt(r["seconds"] * 1e3, ".2f") + (" (extrapolated)" if r.get("extrapolated") else ""),
             _fmt(r["call_seconds"] * 1e3, ".2f"), _fmt(r["tokens_per_s"], ".0f"),
             _fmt(None if r.get("hbm_floor_s") is None else r["hbm_floor_s"] * 1e3, ".2f"), _pct(r.get("hbm_fraction")),
             _fmt(r["flops"] / 1e12, ".2f"),
             _fmt(None if r.get("compute_floor_s") is None else r["compute_floor_s"] * 1e3, ".2f"),
             _pct(r.get("roofline_fraction")), _fmt(r.get("bound")))
            for r in doc.get("rows", [])]
    return lines + _table(["batch", "length", "ms/forward", "ms (jit call)", "tokens/s", "HBM floor ms", "of HBM roofline",
                           "TFLOP", "compute floor ms", "of roofline", "bound"], rows)


def _md_decode(doc) -> list[str]:
    d = doc.get("data", {})
    lines = [f"{d.get('layers')} layers, {d.get('dtype')}, random weights shared by both stacks; prompt {d.get('prompt')}, "
             f"gen_length {d.get('gen_length')}, steps {d.get('steps')}, temperature 0; dlmjax on `{d.get('jax_device')}`, "
             f"PyTorch eager ({d.get('torch_attention')}) on `{d.get('torch_device')}`. NFE is pinned to "
             f"{d.get('expected_nfe')} (llada: quota; fast-dllm: threshold 1.0 with the dual cache, one token per step; "
             "sched: tau 1e9, never exits). tok/s = batch x gen_length / decode seconds (compilation excluded; one "
             "warm-up call first). overhead = decode seconds / (batch forwards x one bare forward at [B, prompt + gen]); "
             "a dual-cache step forwards only the block, so its overhead can fall below 1."
             + (" Token agreement is no correctness check with random bf16 weights (near-uniform logits: rounding "
                "flips the argmax); the dry run's float32 decode and the parity section are." if d.get("dtype") == "bfloat16" else ""),
             ""]
    canvas = d.get("canvas_logits")
    if canvas:
        lines += [f"One canvas, logits: dlmjax vs transformers max|diff| {_fmt(canvas['dlmjax_vs_torch']['max_abs'], '.2e')} "
                  f"(argmax agreement {_fmt(canvas['argmax_agreement'], '.3f')}, max|logit| {_fmt(canvas['max_abs_logit'], '.2f')}); "
                  f"eager dual-cache refresh vs transformers max|diff| {_fmt(canvas['torch_dual_cache_vs_torch']['max_abs'], '.2e')}.",
                  ""]
    rows = []
    for r in doc.get("rows", []):
        nfe = _fmt(r["jax_nfe"], ".1f") if r["nfe_equal"] else f"{_fmt(r['jax_nfe'], '.1f')} / {_fmt(r['torch_nfe'], '.1f')}"
        fwd = str(r["jax_forwards"]) if r["jax_forwards"] == r["torch_forwards"] else f"{r['jax_forwards']} / {r['torch_forwards']}"
        rows.append((r["method"], r["cache"], r["batch"], _fmt(r["jax_tok_s"], ".1f"), _fmt(r["torch_tok_s"], ".1f"),
                     _fmt(r["speedup"], ".2f") + "x", nfe, fwd, _fmt(r["compile_seconds"], ".1f"),
                     _fmt(r["jax_forward_seconds"] * 1e3, ".2f"), _fmt(r["torch_forward_seconds"] * 1e3, ".2f"),
                     _fmt(r["jax_overhead"], ".2f"), _fmt(r["torch_overhead"], ".2f"), _fmt(r["agreement"], ".3f")))
    return lines + _table(["method", "cache", "batch", "dlmjax tok/s", "torch tok/s", "speedup", "NFE/row (dlmjax / torch)",
                           "forwards", "compile s", "dlmjax fwd ms", "torch fwd ms", "overhead dlmjax", "overhead torch",
                           "token agreement"], rows)


def _md_moe(doc) -> list[str]:
    d = doc.get("data", {})
    lines = [f"{d.get('layer')}: hidden {d.get('hidden')}, {d.get('experts')} experts of width {d.get('expert_width')}, top "
             f"{d.get('top_k')} within {d.get('groups')} groups, a shared expert, {d.get('dtype')}; grouped matmuls over the "
             "tokens sorted by expert (jax.lax.ragged_dot_general). The HBM floor reads the experts the tokens use, the "
             "shared expert and the router once.", ""]
    rows = []
    for r in doc.get("rows", []):
        if r.get("kind") == "check":
            lines.append(f"Output vs a dense float32 gather of the same experts ({r['tokens']} tokens): relative error "
                         f"{_fmt(r['rel_err'], '.2e')} ({'ok' if r['ok'] else 'NOT ok'}).")
            lines.append("")
            continue
        rows.append((r["tokens"], _fmt(r["seconds"] * 1e3, ".3f"), _fmt(r["tokens_per_s"], ".0f"), r["experts_touched"],
                     _fmt(r["weight_bytes"] / 1e6, ".1f"), _fmt(r["hbm_floor_s"] * 1e3 if r["hbm_floor_s"] else None, ".3f"),
                     _fmt(r["flops"] / 1e12, ".3f"), _fmt(r["compute_floor_s"] * 1e3 if r["compute_floor_s"] else None, ".3f"),
                     _pct(r.get("roofline_fraction"))))
    return lines + _table(["tokens", "ms/layer", "tokens/s", "experts used", "weight MB read", "HBM floor ms", "TFLOP",
                           "compute floor ms", "of roofline"], rows)


RENDERERS = {"machine": _md_machine, "parity": _md_parity, "kernels": _md_kernels, "forward": _md_forward,
             "decode": _md_decode, "moe": _md_moe}


def render_markdown(report: dict) -> str:
    meta = report["meta"]
    lines = ["# dlmjax device report" + (" (DRY RUN: tiny shapes on the CPU; no speed figure means anything)"
                                         if meta["dry_run"] else ""), "",
             f"`{meta['command']}`, started {meta['started']}, {meta['elapsed_seconds']:.0f}s of a "
             f"{meta['budget_seconds']:.0f}s budget.", ""]
    summary = []
    for name, doc in report["sections"].items():
        summary.append((name, doc.get("status"), _fmt(doc.get("seconds"), ".1f"), doc.get("error") or ""))
    lines += _table(["section", "status", "seconds", "error"], summary)
    for name, doc in report["sections"].items():
        lines += [f"## {name}: {doc.get('status')}", ""]
        if doc.get("error"):
            lines += [f"Error: `{doc['error']}`", ""]
        try:
            lines += RENDERERS[name](doc)
        except Exception as e:  # noqa: BLE001 - a partial record must not stop the report
            lines += [f"(could not render this section: {error_text(e)})", ""]
        for note in doc.get("notes") or []:
            lines.append(f"- {note}")
        if doc.get("log"):
            lines += ["", "Kernel log:", "", "```", *doc["log"], "```"]
        if doc.get("worker_log_tail"):
            lines += ["", "Worker log tail:", "", "```", doc["worker_log_tail"], "```"]
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="directory for device_report.md / .json")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: checks the wiring, measures nothing")
    ap.add_argument("--hbm-gbps", type=float, default=None, help="peak HBM bandwidth, GB/s (default: from the device kind)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s (default: from the device kind)")
    ap.add_argument("--budget", type=float, default=None,
                    help=f"total seconds (default {DEFAULT_BUDGET:.0f}, dry run {DRY_BUDGET:.0f}), shared by the sections "
                         "in proportion to " + ", ".join(f"{k} {v}" for k, v in BUDGETS.items()))
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS, help="run only these")
    ap.add_argument("--worker-plan", help=argparse.SUPPRESS)  # internal: the worker process
    args = ap.parse_args(argv)
    args.sections = [name for name in SECTIONS if name in args.sections]
    if args.worker_plan:
        return run_worker(args)
    return Parent(args).run()


if __name__ == "__main__":
    raise SystemExit(main())
