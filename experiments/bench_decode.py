"""Benchmark: dlmjax's on-device decode against eager PyTorch loops, on the same weights.

    python experiments/bench_decode.py [--quick] [--torch-threads N] [--repeats N] [--json PATH]

A tiny random LLaDA checkpoint (default 4 layers, hidden 256, 4 heads, intermediate 512,
vocab 512, 1024 positions) is written with `dlmjax.testing.write_tiny_checkpoint`,
converted and loaded with dlmjax, and built again as a transformers Llama with
bidirectional attention by tests/torch_reference.py. For each method (llada, fast-dllm,
dparallel, sched, prophet) and batch size (1 and 4; prompt 32 random character ids,
gen_length 128, blocks of 32 except where a preset says otherwise, temperature 0):

- dlmjax: one warm-up `lm.generate` call (compiles; its compile_seconds is reported), then
  `--repeats` timed calls (default 1); decode seconds = the fastest `seconds` (compile excluded).
- PyTorch: experiments/torch_decoders.py, eager, one forward per step; `--repeats` timed calls,
  fastest kept (there is no compile; the bare-forward timing just before warms it up).
- tok/s = B * gen_length / decode seconds; speedup = dlmjax tok/s / torch tok/s.
- overhead = decode seconds / (batch forwards * one bare forward at [B, P + G]). The bare forward
  is timed next to every cell and the fastest over the run is used: for dlmjax, one forward inside
  a compiled loop of forwards (device time, no dispatch; the "vs jit call" column uses one jitted
  call from Python instead, with block_until_ready); for PyTorch, one eager model call.
  Near 1.0: the decode loop adds nothing to the forwards.
- agreement = fraction of generated positions where the two token arrays are equal.
- tokens/forward = gen_length / the rows' mean NFE.
- llada2 and llada2.1-s run on a tiny random LLaDA2 mixture of experts (4 layers, hidden 256, 16
  experts of width 128, top 4 of 2 of 4 groups, a shared expert), dlmjax with its exact block cache
  against experiments/torch_llada2.py's eager loops (upstream's: the window recomputed every step,
  batch 1, so a batch's rows run one after another).
- d2f runs on the LLaDA weights under the D2F block mask, fast-dllm-v2 on a block-diffusion Qwen2
  (family fast_dllm_v2) of the same size; their PyTorch loops are `generate_d2f` and
  `generate_fdv2` in experiments/torch_decoders.py (one full forward per step, the official
  algorithms' Python loops).

Timing notes: everything runs in one process, dlmjax and PyTorch one after the other, never
at once. JAX uses its default CPU thread pool; PyTorch runs with `--torch-threads` threads
(default: the CPU count). The machine's load average is printed: other processes on a
2-core machine distort every number here.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # torch_reference
sys.path.insert(0, str(ROOT / "experiments"))  # torch_decoders

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

import dlmjax  # noqa: E402
import torch_decoders  # noqa: E402
from dlmjax.attention import attention_mask  # noqa: E402
from dlmjax.convert import convert  # noqa: E402
from dlmjax.model import position_ids  # noqa: E402
from dlmjax.convert import safetensors_io  # noqa: E402
from dlmjax.testing import random_weights, tiny_hf_config, write_tiny_checkpoint, write_tokenizer  # noqa: E402
from torch_reference import load_reference, reference_logits  # noqa: E402

PROMPT_LENGTH = 32

# method -> the knobs passed to BOTH implementations (everything explicit, nothing left to a preset).
# llada uses blocks of 32 (LLaDA's own evaluations use semi-autoregressive blocks); sched keeps its
# preset's single block (SchED on LLaDA's schedule); the others use their presets' blocks of 32.
FULL = dict(gen_length=128, steps=128)
METHODS = {
    "llada": dict(block_length=32),
    "fast-dllm": dict(block_length=32, threshold=0.9),
    "dparallel": dict(block_length=32, threshold=0.5),
    "sched": dict(block_length=None, tau_high=7.5, tau_low=2.5, exit_k=4.0),
    "prophet": dict(block_length=32),
    # D2F (LLaDA weights, D2F block mask) and Fast-dLLM v2 (a block-diffusion Qwen2 of the same size):
    # the presets' settings; no `steps` (their blocks end by themselves)
    "d2f": dict(block_length=32, tau_add=0.1, tau_act=0.95, tau_conf=0.9, cache="none"),
    "fast-dllm-v2": dict(block_length=32, sub_block_length=8, threshold=0.9, cache="none"),
}
# their caches: "block" is exact (same tokens as the full recompute), "dual" is the sub-block DualCache
# (approximate; the PyTorch loop recomputes, so agreement may fall below 1)
METHODS["d2f/block"] = {**METHODS["d2f"], "cache": "block"}
METHODS["fast-dllm-v2/block"] = {**METHODS["fast-dllm-v2"], "cache": "block"}
METHODS["fast-dllm-v2/dual"] = {**METHODS["fast-dllm-v2"], "cache": "dual"}
FAMILY = {"fast-dllm-v2": "fast_dllm_v2"}  # the model each method runs on (default: llada)
# LLaDA2 (a tiny random mixture of experts, experiments/torch_llada2.py as the eager loop, batch 1 as
# upstream; a batch runs its rows one after another there): llada2 with threshold 1.0 commits exactly
# each step's quota (steps 8 a block of 32: 4 tokens a forward); llada2.1-s is the speed mode as is.
LLADA2_METHODS = {
    "llada2": dict(block_length=32, steps=8, threshold=1.0),
    "llada2.1-s": dict(block_length=32, threshold=0.5, editing_threshold=0.0, max_post_steps=16),
}
UNSTEPPED = ("d2f", "fast-dllm-v2")


def method_of(name: str) -> str:
    """The method a row runs ("d2f/block" is d2f with cache="block")."""
    return name.split("/")[0]


def build_model(workdir: pathlib.Path, quick: bool, family: str = "llada"):
    size = (dict(num_layers=2, hidden_size=128, num_heads=4, num_kv_heads=4, intermediate_size=256) if quick else
            dict(num_layers=4, hidden_size=256, num_heads=4, num_kv_heads=4, intermediate_size=512))
    hf = write_tiny_checkpoint(workdir / f"hf-{family}", family, seed=0, vocab_size=512, max_positions=1024, **size)
    convert(hf, workdir / f"converted-{family}", progress=False)
    lm = dlmjax.load(workdir / f"converted-{family}")
    model, family = load_reference(str(hf), torch.float32)
    return lm, model, family, size


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _jax_forward(state, ids, graphdef):
    """The model alone, as the decode loop calls it: logits [B, L, V], no host transfer."""
    model = nnx.merge(graphdef, state)
    mask = jnp.ones(ids.shape, jnp.int32)
    return model(ids, position_ids(model.config, mask), attention_mask("bidirectional", mask))[0]


@functools.partial(jax.jit, static_argnames=("graphdef", "n"))
def _jax_forward_loop(state, ids, graphdef, n):
    """n forwards inside one program (a fori_loop), each fed by the last one's argmax so none is hoisted."""

    def body(_, x):
        logits = _jax_forward(state, x, graphdef)
        return x.at[:, 0].set(jnp.argmax(logits[:, -1], axis=-1).astype(x.dtype))

    return jax.lax.fori_loop(0, n, body, ids)


def jax_forward_seconds(lm, batch: int, length: int, reps: int, loop: int) -> tuple[float, float]:
    """Seconds of one forward (the model alone, logits left on the device) at [batch, length]:
    (fastest of `reps` jitted calls from Python, incl. dispatch; per forward of a `loop`-forward program,
    fastest of two runs)."""
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 96, (batch, length)), jnp.int32)
    jax.block_until_ready(_jax_forward(lm.state, ids, lm.graphdef))  # compiles once per shape
    jax.block_until_ready(_jax_forward(lm.state, ids, lm.graphdef))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(_jax_forward(lm.state, ids, lm.graphdef))
        times.append(time.perf_counter() - start)
    jax.block_until_ready(_jax_forward_loop(lm.state, ids, lm.graphdef, loop))  # compiles
    looped = []
    for _ in range(2):
        start = time.perf_counter()
        jax.block_until_ready(_jax_forward_loop(lm.state, ids, lm.graphdef, loop))
        looped.append((time.perf_counter() - start) / loop)
    return min(times), min(looped)


@torch.no_grad()
def torch_forward_seconds(forward, batch: int, length: int, reps: int) -> float:
    """Fastest of `reps` eager forwards (the model alone) at [batch, length], in seconds."""
    ids = torch.as_tensor(np.random.default_rng(1).integers(0, 96, (batch, length)), dtype=torch.long)
    forward(ids)
    forward(ids)
    times = []
    for _ in range(reps):
        torch_decoders.synchronize(forward.device)
        start = time.perf_counter()
        forward(ids)
        torch_decoders.synchronize(forward.device)
        times.append(time.perf_counter() - start)
    return min(times)


def run_dlmjax(lm, prompt: np.ndarray, name: str, knobs: dict, common: dict, repeats: int) -> dict:
    name = method_of(name)
    kwargs = dict(method=name, temperature=0.0, prompt_bucket=prompt.shape[1], **common)  # no padding
    kwargs.update({k: v for k, v in knobs.items() if v is not None})
    if knobs.get("block_length", 0) is None:
        kwargs["block_length"] = common["gen_length"]
    if name == "sched":
        kwargs["schedule"] = "exp"
    if name in UNSTEPPED:
        kwargs.pop("steps")
    warm = lm.generate(prompt, **kwargs)
    runs = [lm.generate(prompt, **kwargs) for _ in range(repeats)]
    best = min(runs, key=lambda r: r.seconds)
    # the program is deterministic on the CPU: every call should give the same result
    repeatable = all(np.array_equal(r.tokens, warm.tokens) and np.array_equal(r.nfe, warm.nfe) for r in runs)
    return dict(tokens=best.tokens, nfe=best.nfe, forwards=best.steps, seconds=best.seconds,
                compile_seconds=warm.compile_seconds, first_seconds=warm.seconds, repeatable=repeatable)


def run_torch(forward, prompt: np.ndarray, name: str, knobs: dict, common: dict, mask_id: int, repeats: int,
              lm=None) -> dict:
    name = method_of(name)
    if name in UNSTEPPED:
        from dlmjax.decode.api import resolve_stops

        kwargs = dict(mask_id=mask_id, stops=resolve_stops(lm.config, None), gen_length=common["gen_length"],
                      **{k: v for k, v in knobs.items() if v is not None and k != "cache"})  # one full forward a step
        x = torch.as_tensor(prompt, dtype=torch.long)
        if name == "d2f":
            run = functools.partial(torch_decoders.generate_d2f, shifted=bool(lm.config.shifted_logits), **kwargs)
        else:
            run = functools.partial(torch_decoders.generate_fdv2, **kwargs)
        runs = [run(forward, x) for _ in range(repeats)]
        best = min(runs, key=lambda r: r["seconds"])
        return dict(tokens=best["tokens"].numpy(), nfe=best["nfe"].numpy(), forwards=best["forwards"], seconds=best["seconds"])
    kwargs = dict(common)
    kwargs["block_length"] = knobs["block_length"] or common["gen_length"]
    for key in ("threshold", "tau_high", "tau_low", "exit_k", "cache"):
        if knobs.get(key) is not None:
            kwargs[key] = knobs[key]
    x = torch.as_tensor(prompt, dtype=torch.long)
    runs = [torch_decoders.generate(forward, x, mask_id=mask_id, method=name, **kwargs) for _ in range(repeats)]
    best = min(runs, key=lambda r: r["seconds"])
    return dict(tokens=best["tokens"].numpy(), nfe=best["nfe"].numpy(), forwards=best["forwards"], seconds=best["seconds"])


def _ms(values: list[float]) -> str:
    v = [x * 1e3 for x in values]
    return f"{min(v):.1f} ({statistics.median(v):.1f})"


def machine_line(torch_threads: int) -> str:
    import transformers

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{platform.processor() or platform.machine()}, os.cpu_count()={os.cpu_count()} (usable {affinity}), "
            f"python {platform.python_version()}, jax {jax.__version__} ({jax.default_backend()}, default threads), "
            f"torch {torch.__version__} (set_num_threads({torch_threads}) -> {torch.get_num_threads()}), "
            f"transformers {transformers.__version__}")


class OtherLoad:
    """The share of the machine's CPU time that OTHER processes used since `start()`: (busy jiffies
    of /proc/stat - this process's CPU time) / all jiffies. 0.0 = nobody else ran; on 2 cores, 0.5 =
    another process held a whole core."""

    def start(self):
        self.stat, self.own = self._stat(), time.process_time()
        return self

    @staticmethod
    def _stat():
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:9]]
        except OSError:
            return None
        return sum(v), v[3] + v[4]  # all, idle + iowait

    def share(self) -> float | None:
        now, own = self._stat(), time.process_time()
        if now is None or self.stat is None or now[0] == self.stat[0]:
            return None
        hz = os.sysconf("SC_CLK_TCK")
        total = now[0] - self.stat[0]
        busy = total - (now[1] - self.stat[1])
        return max(0.0, (busy - (own - self.own) * hz) / total)


def wait_quiet(limit: float, share: float = 0.1, window: float = 2.0) -> float:
    """Sleep until other processes use under `share` of the CPU over a `window`, at most `limit` seconds;
    returns the seconds waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < limit:
        probe = OtherLoad().start()
        time.sleep(window)
        got = probe.share()
        if got is None or got < share:
            break
    return time.perf_counter() - start


def loadavg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller model (2 layers, hidden 128), gen 64, batches 1 and 2")
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: CPU count)")
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per cell after the warm-up; the fastest is kept")
    parser.add_argument("--methods", nargs="+", default=list(METHODS) + list(LLADA2_METHODS),
                        choices=list(METHODS) + list(LLADA2_METHODS))
    parser.add_argument("--batches", nargs="+", type=int, default=None)
    parser.add_argument("--forward-reps", type=int, default=None, help="timed bare forward calls per cell (fastest kept)")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="before each cell, wait up to this long until other processes use < 10%% of the CPU")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.torch_threads)
    started = time.perf_counter()
    whole = OtherLoad().start()
    print(f"load average at start: {loadavg()}", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        _run(args, pathlib.Path(tmp), started, whole)


def _run(args, workdir: pathlib.Path, started: float, whole: "OtherLoad") -> None:
    llada2 = [name for name in args.methods if name in LLADA2_METHODS]
    args.methods = [name for name in args.methods if name in METHODS]
    if args.methods:
        _run_methods(args, workdir, started, whole)
    if llada2:
        _run_llada2(args, workdir, llada2)


def _run_llada2(args, workdir: pathlib.Path, methods: list[str]) -> None:
    """LLaDA2's decoders on a tiny random MoE: dlmjax (exact block cache) against the eager
    PyTorch loop that recomputes the window every step, as upstream's generate() does."""
    import torch_llada2

    size = (dict(num_layers=2, hidden_size=128, num_heads=4, num_kv_heads=2, intermediate_size=256) if args.quick else
            dict(num_layers=4, hidden_size=256, num_heads=4, num_kv_heads=2, intermediate_size=512))
    moe = (dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, n_group=4, topk_group=2) if args.quick else
           dict(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=128, n_group=4, topk_group=2))
    hf_config = {**tiny_hf_config("llada2", vocab_size=512, max_positions=1024, **size), **moe}
    hf = workdir / "hf-llada2"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(hf_config))
    weights = random_weights(hf_config, seed=0, std=0.05)
    safetensors_io.save_file(weights, hf / "model.safetensors", metadata={"format": "pt"})
    write_tokenizer(hf, hf_config)
    lm = dlmjax.load(hf, dtype="float32", progress=False)
    model = torch_llada2.LLaDA2Torch.from_pretrained(hf, dtype=torch.float32)
    cfg = lm.config
    g = 64 if args.quick else FULL["gen_length"]
    batches = args.batches or ([1, 2] if args.quick else [1, 4])
    prompts = np.random.default_rng(0).integers(0, 96, (max(batches), PROMPT_LENGTH))
    canvas = np.concatenate([prompts[:1], np.full((1, g), cfg.mask_token_id)], axis=1)
    lj = lm.logits(canvas, mode="block_causal", block_size=32)
    length = canvas.shape[1]
    allowed = torch.as_tensor((np.arange(length)[None] // 32) <= (np.arange(length)[:, None] // 32))[None]
    lt = model(torch.as_tensor(canvas), allowed=allowed).numpy()
    print(f"\nLLaDA2 model: {size}, {moe}, vocab 512; block-causal forward max |dlmjax - torch| = "
          f"{np.abs(lj - lt).max():.2e} (max |logit| {np.abs(lj).max():.1f})", flush=True)
    rows = []
    for name in methods:
        knobs = LLADA2_METHODS[name]
        loop = torch_llada2.generate_llada2 if name == "llada2" else torch_llada2.generate_llada21
        for b in batches:
            prompt = prompts[:b]
            kwargs = dict(method=name, gen_length=g, prompt_bucket=PROMPT_LENGTH, **knobs)
            warm = lm.generate(prompt, **kwargs)
            runs = [lm.generate(prompt, **kwargs) for _ in range(args.repeats)]
            best = min(runs, key=lambda r: r.seconds)
            torch_runs = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                outs = [loop(model, torch.as_tensor(prompt[i:i + 1]), gen_length=g, mask_id=cfg.mask_token_id,
                             eos_id=cfg.eos_token_id, **knobs) for i in range(b)]
                torch_llada2.synchronize(model.device)
                torch_runs.append((time.perf_counter() - start, outs))
            seconds, outs = min(torch_runs, key=lambda r: r[0])
            torch_tokens = np.concatenate([o[0].numpy() for o in outs])
            torch_nfe = [int(o[1]) for o in outs]
            tok = b * g
            row = dict(method=name, batch=b, block_length=32, jax_tok_s=tok / best.seconds, torch_tok_s=tok / seconds,
                       speedup=seconds / best.seconds, jax_nfe=best.nfe.tolist(), torch_nfe=torch_nfe,
                       compile_seconds=warm.compile_seconds, tokens_per_forward=g / float(np.mean(best.nfe)),
                       agreement=float(np.mean(best.tokens == torch_tokens)), edits=int(np.sum(best.edits)))
            rows.append(row)
            print(f"  {name} B={b}: dlmjax {best.seconds:.3f}s (compile {warm.compile_seconds:.1f}s), torch {seconds:.3f}s; "
                  f"NFE {row['jax_nfe']} / {torch_nfe}; agreement {row['agreement']:.3f}", flush=True)
    print()
    print(f"LLaDA2: prompt {PROMPT_LENGTH}, gen_length {g}, blocks of 32, temperature 0, float32; dlmjax with the exact block "
          "cache, torch eager recomputing the window every step (batch rows one after another)")
    print("| method | batch | dlmjax tok/s | torch tok/s | speedup | NFE/row (dlmjax / torch) | tokens/forward | edits | "
          "compile s | token agreement |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        nfe = f"{np.mean(r['jax_nfe']):.1f}" + ("" if r["jax_nfe"] == r["torch_nfe"] else f" / {np.mean(r['torch_nfe']):.1f}")
        print(f"| {r['method']} | {r['batch']} | {r['jax_tok_s']:.0f} | {r['torch_tok_s']:.0f} | {r['speedup']:.2f}x | {nfe} | "
              f"{r['tokens_per_forward']:.2f} | {r['edits']} | {r['compile_seconds']:.1f} | {r['agreement']:.3f} |")
    if args.json:
        path = args.json.with_name(args.json.stem + "-llada2.json")
        path.write_text(json.dumps(dict(size=size, moe=moe, gen_length=g, rows=rows), indent=2) + "\n")


def _run_methods(args, workdir: pathlib.Path, started: float, whole: "OtherLoad") -> None:
    lm, model, family, size = build_model(workdir, args.quick)
    models = {"llada": (lm, torch_decoders.TorchForward(model))}
    for name in args.methods:
        fam = FAMILY.get(method_of(name), "llada")
        if fam not in models:
            other_lm, other_model, _, _ = build_model(workdir, args.quick, fam)
            models[fam] = (other_lm, torch_decoders.TorchForward(other_model))
    common = dict(gen_length=64, steps=64) if args.quick else dict(FULL)
    batches = args.batches or ([1, 2] if args.quick else [1, 4])
    forward_reps = args.forward_reps or (5 if args.quick else 15)
    forward_loop = 8 if args.quick else 16
    mask_id = lm.config.mask_token_id
    forward = torch_decoders.TorchForward(model)
    g = common["gen_length"]
    length = PROMPT_LENGTH + g
    prompts = np.random.default_rng(0).integers(0, 96, (max(batches), PROMPT_LENGTH))

    # The two stacks see the same weights: compare one forward on a decode-shaped canvas.
    canvas = np.concatenate([prompts[:1], np.full((1, g), mask_id)], axis=1)
    lj = lm.logits(canvas)
    lt = forward(torch.as_tensor(canvas)).numpy()
    lr = reference_logits(model, family, canvas, np.ones_like(canvas))
    assert np.array_equal(lt, lr), "TorchForward differs from reference_logits"
    print(f"model: LLaDA {size}, vocab 512; forward max |dlmjax - torch| = {np.abs(lj - lt).max():.2e} "
          f"(max |logit| {np.abs(lj).max():.1f}); argmax equal on {np.mean(lj.argmax(-1) == lt.argmax(-1)):.3f} "
          "of positions", flush=True)

    fwd = {(f, b): ([], [], []) for f in models for b in batches}  # bare forward seconds, measured next to every cell

    rows = []
    for name in args.methods:
        knobs = METHODS[name]
        fam = FAMILY.get(method_of(name), "llada")
        lm, forward = models[fam]
        for b in batches:
            prompt = prompts[:b]
            if args.wait_quiet:
                waited = wait_quiet(args.wait_quiet)
                if waited > 3:
                    print(f"  (waited {waited:.0f}s for other processes to go quiet)", flush=True)
            other = OtherLoad().start()
            jax_call, jax_fwd = jax_forward_seconds(lm, b, length, forward_reps, forward_loop)
            jx = run_dlmjax(lm, prompt, name, knobs, common, args.repeats)
            assert jx["repeatable"], f"{name} B={b}: repeated dlmjax calls gave different tokens"
            torch_fwd = torch_forward_seconds(forward, b, length, forward_reps)
            th = run_torch(forward, prompt, name, knobs, common, lm.config.mask_token_id, args.repeats, lm=lm)
            fwd[fam, b][0].append(jax_fwd)
            fwd[fam, b][1].append(torch_fwd)
            fwd[fam, b][2].append(jax_call)
            load = loadavg().split()[0]
            others = other.share()
            tok = b * g
            row = dict(
                method=name, family=fam, batch=b, block_length=knobs["block_length"] or g,
                jax_tok_s=tok / jx["seconds"], torch_tok_s=tok / th["seconds"],
                speedup=(tok / jx["seconds"]) / (tok / th["seconds"]),
                jax_seconds=jx["seconds"], torch_seconds=th["seconds"], jax_first_seconds=jx["first_seconds"],
                compile_seconds=jx["compile_seconds"],
                jax_nfe=jx["nfe"].tolist(), torch_nfe=th["nfe"].tolist(),
                jax_forwards=int(jx["forwards"]), torch_forwards=int(th["forwards"]),
                load_1min=float(load), other_cpu_share=others,
                agreement=float(np.mean(jx["tokens"] == th["tokens"])),
                nfe_equal=bool(np.array_equal(jx["nfe"], th["nfe"])),
                tokens_per_forward=g / float(np.mean(jx["nfe"])),
            )
            rows.append(row)
            print(f"  {name} B={b}: dlmjax {row['jax_seconds']:.3f}s ({row['jax_forwards']} fwd, compile "
                  f"{row['compile_seconds']:.1f}s), torch {row['torch_seconds']:.3f}s ({row['torch_forwards']} fwd), "
                  f"agreement {row['agreement']:.3f}; bare forward ms: dlmjax {jax_fwd * 1e3:.1f} in-program / "
                  f"{jax_call * 1e3:.1f} jit call, torch {torch_fwd * 1e3:.1f}; load {load}, "
                  f"other processes' CPU share {'n/a' if others is None else f'{others:.0%}'}", flush=True)

    # Overheads against the fastest bare forward seen for that batch size over the whole run (the
    # least disturbed measurement): contention can only inflate a ratio, never push it below 1 by luck.
    best = {key: tuple(min(v) for v in values) for key, values in fwd.items() if values[0]}
    for r in rows:
        jax_fwd, torch_fwd, jax_call = best[r["family"], r["batch"]]
        r.update(
            jax_forward_seconds=jax_fwd, jax_forward_call_seconds=jax_call, torch_forward_seconds=torch_fwd,
            jax_overhead=r["jax_seconds"] / (r["jax_forwards"] * jax_fwd),
            jax_overhead_vs_call=r["jax_seconds"] / (r["jax_forwards"] * jax_call),
            torch_overhead=r["torch_seconds"] / (r["torch_forwards"] * torch_fwd),
        )

    def nfe_text(r):
        j, t = r["jax_nfe"], r["torch_nfe"]
        mean = lambda v: f"{np.mean(v):.1f}".rstrip("0").rstrip(".")  # noqa: E731
        return mean(j) if r["nfe_equal"] else f"{mean(j)} / {mean(t)}"

    print()
    print(f"gen_length {g}, steps {common['steps']}, prompt {PROMPT_LENGTH}, temperature 0, float32; "
          f"{args.repeats} timed call(s) after 1 warm-up (fastest kept)")
    print(f"machine: {machine_line(args.torch_threads)}")
    share = whole.share()
    print(f"load average at end: {loadavg()}; total run {time.perf_counter() - started:.0f}s; other processes used "
          f"{'n/a' if share is None else f'{share:.0%}'} of the machine's CPU time during the run "
          "(0% = quiet; per cell in the log above)")
    print()
    print("| method | batch | block | dlmjax tok/s | torch tok/s | speedup | NFE/row (dlmjax / torch) | tokens/forward | fwd | "
          "compile s | overhead dlmjax | (vs jit call) | overhead torch | token agreement |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        fw = str(r["jax_forwards"]) if r["jax_forwards"] == r["torch_forwards"] else f"{r['jax_forwards']} / {r['torch_forwards']}"
        print(f"| {r['method']} | {r['batch']} | {r['block_length']} | {r['jax_tok_s']:.0f} | {r['torch_tok_s']:.0f} | "
              f"{r['speedup']:.2f}x | {nfe_text(r)} | {r['tokens_per_forward']:.2f} | {fw} | {r['compile_seconds']:.1f} | {r['jax_overhead']:.2f} | {r['jax_overhead_vs_call']:.2f} | "
              f"{r['torch_overhead']:.2f} | {r['agreement']:.3f} |")
    print()
    print(f"bare forward ms at [B, {length}], fastest over the run (median of the per-cell fastest): " + "; ".join(
        f"{f} B={b}: dlmjax in-program {_ms(v[0])}, dlmjax jit call {_ms(v[2])}, torch eager {_ms(v[1])}"
        for (f, b), v in fwd.items() if v[0]))
    print("overhead = decode seconds / (batch forwards x fastest bare forward). dlmjax: vs one forward inside a compiled "
          f"{forward_loop}-forward loop (device time only); '(vs jit call)': vs one jitted forward called from Python "
          "(adds dispatch). torch: vs one eager model call.")
    if args.json:
        meta = dict(machine=machine_line(args.torch_threads), quick=args.quick, common=common, size=size)
        args.json.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")


if __name__ == "__main__":
    main()
