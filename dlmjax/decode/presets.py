"""The papers' methods as presets: each a small function that composes a `Method` from the
paper's settings, with any knob overridable (`lm.generate(method="fast-dllm", threshold=0.8)`).

Every default names its source in tests/test_presets.py (dllm-algorithms.md, with the upstream
file and line it was read from).
"""

from __future__ import annotations

from typing import Any, Callable

from dlmjax.decode.method import Method, compose


def _preset(name: str, defaults: dict[str, Any], gen_length: int, knobs: dict[str, Any]) -> Method:
    given = {k for k, v in knobs.items() if v is not None}
    settings = {**defaults, **{k: v for k, v in knobs.items() if v is not None}, "gen_length": gen_length}
    if "block_length" not in given and defaults.get("blocks") not in ("aligned", "editing"):  # the paper's block, never longer than the canvas
        settings["block_length"] = min(defaults.get("block_length") or gen_length, gen_length)
    # (LLaDA2's blocks are the model's, counted from position 0: a short answer still fills a whole one)
    settings.setdefault("steps", gen_length)  # LLaDA's and the papers' steps = gen_length
    return compose(settings, given, name)


def llada(gen_length: int, **knobs) -> Method:
    """LLaDA generate.py: fixed per-step quotas, low-confidence remasking, one block by default."""
    return _preset("llada", dict(rule="quota", remasking="low_confidence"), gen_length, knobs)


def fast_dllm(gen_length: int, **knobs) -> Method:
    """Fast-dLLM v1: commit every token with confidence >= 0.9 (and the best one), blocks of 32."""
    return _preset("fast-dllm", dict(rule="threshold", threshold=0.9, block_length=32), gen_length, knobs)


def dparallel(gen_length: int, **knobs) -> Method:
    """dParallel: commit every token with entropy <= 0.5 nats (and the lowest), blocks of 32."""
    return _preset("dparallel", dict(rule="entropy", threshold=0.5, block_length=32), gen_length, knobs)


def sched(gen_length: int, **knobs) -> Method:
    """SchED on LLaDA's schedule: exit on the exponential schedule from 7.5 to 2.5 (k = 4)."""
    return _preset("sched", dict(rule="quota", schedule="exp", tau_high=7.5, tau_low=2.5, exit_k=4.0), gen_length, knobs)


def prophet(gen_length: int, **knobs) -> Method:
    """Prophet: staged 7.5 / 5.0 / 2.5 by progress thirds, on LLaDA's schedule with blocks of 32."""
    return _preset("prophet", dict(rule="quota", schedule="prophet", block_length=32), gen_length, knobs)


def dream(gen_length: int, **knobs) -> Method:
    """Dream's diffusion_generate: DreamGenerationConfig defaults (alg 'origin', eps 1e-3, one block)."""
    return _preset("dream", dict(rule="dream", alg="origin", eps=1e-3), gen_length, knobs)


def fast_dllm_v2(gen_length: int, **knobs) -> Method:
    """Fast-dLLM v2: blocks of 32 from position 0, sub-blocks of 8 left to right, commit every token with
    confidence > 0.9 (and the best one), each block's first token from the previous block's last pass
    (eval.py's threshold; SPEC.md, Fast-dLLM v2), with upstream's exact block-level cache (cache="dual" adds
    its sub-block DualCache)."""
    defaults = dict(rule="threshold", strict=True, threshold=0.9, blocks="fdv2", attention="block_causal", block_length=32,
                    sub_block_length=8, cache="block")
    return _preset("fast-dllm-v2", defaults, gen_length, knobs)


def d2f(gen_length: int, **knobs) -> Method:
    """D2F: pipelined blocks of 32 under the D2F block mask; add a block at tau_add 0.1, fully activate
    at 0.95, commit above 0.9 (the official eval scripts' common setting; SPEC.md, D2F), with the exact
    in-order block cache."""
    defaults = dict(rule="d2f", blocks="d2f", attention="prompt_block_causal", block_length=32, tau_add=0.1, tau_act=0.95,
                    tau_conf=0.9, cache="block")
    return _preset("d2f", defaults, gen_length, knobs)


def llada2(gen_length: int, **knobs) -> Method:
    """LLaDA2.0's generate(): blocks of 32 from position 0 (the first holds the prompt's tail), at most 32
    steps a block, each committing every token with confidence > 0.95 when they fill the step's quota,
    else the quota's most confident (upstream's defaults; llada2.md section 6), with the exact block cache."""
    defaults = dict(rule="quota_threshold", threshold=0.95, blocks="aligned", attention="block_causal", block_length=32,
                    steps=32, minimal_topk=1, cache="block")
    return _preset("llada2", defaults, gen_length, knobs)


def llada2_1(gen_length: int, **knobs) -> Method:
    """LLaDA2.1's token editing (generate() with editing): blocks of 32 from position 0; each step commits every
    mask with confidence > 0.7 (at least num_to_transfer = 1, the most confident) and rewrites every decoded token
    of the block whose new prediction has confidence > 0.5; a block free of masks takes up to 16 more editing
    forwards (llada2.md section 7; thresholds of the quality mode Q, section 7.3; the speed mode S is
    threshold=0.5, editing_threshold=0.0), with the exact block cache."""
    defaults = dict(rule="editing", threshold=0.7, editing_threshold=0.5, num_to_transfer=1, blocks="editing",
                    attention="block_causal", block_length=32, max_post_steps=16, cache="block")
    return _preset("llada2.1", defaults, gen_length, knobs)


def llada2_1_speed(gen_length: int, **knobs) -> Method:
    """LLaDA2.1's speed mode S: commit masks above 0.5, rewrite any token whose prediction changed (editing
    threshold 0; llada2.md 7.3, SGLang JointThreshold's defaults)."""
    return llada2_1(gen_length, **{"threshold": 0.5, "editing_threshold": 0.0, **{k: v for k, v in knobs.items() if v is not None}})


PRESETS: dict[str, Callable[..., Method]] = {
    "llada": llada, "fast-dllm": fast_dllm, "dparallel": dparallel, "sched": sched, "prophet": prophet, "dream": dream, "d2f": d2f,
    "fast-dllm-v2": fast_dllm_v2, "llada2": llada2, "llada2.1": llada2_1,
    "llada2.1-q": llada2_1, "llada2.1-s": llada2_1_speed,
}
