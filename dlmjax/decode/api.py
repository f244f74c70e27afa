"""`lm.generate`: method presets named after the papers, input checks, and the output.

Everything a user can get wrong is checked here, before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dlmjax.decode import rules, schedules
from dlmjax.decode.ar import ARKnobs, ARMethod, ARTokens, decode_ar
from dlmjax.decode import engine
from dlmjax.decode.engine import Batch, Tokens
from dlmjax.decode.method import Method
from dlmjax.decode.presets import PRESETS
from dlmjax.errors import DlmjaxError, PromptTooLong
from dlmjax.sharding import on_model_mesh
from dlmjax.tokenizer import check_vocabulary

@dataclasses.dataclass
class GenerateOutput:
    tokens: np.ndarray  # [B, gen_length] generated ids
    texts: list[str] | None
    nfe: np.ndarray  # [B] forward passes each row used
    steps: int  # forward passes of the batch
    trajectory: np.ndarray | None  # [B, gen_length] step (1-based) at which each position was committed
    seconds: float  # wall time of the decode, compilation excluded
    compile_seconds: float  # 0.0 when the program was already compiled
    method: Method | ARMethod | None = None
    lengths: np.ndarray | None = None  # [B] tokens each row produced, its stop token included (method "ar")
    edits: np.ndarray | None = None  # [B, gen_length] times each position's token was rewritten (LLaDA2.1's editing)


def _prepare_prompts(lm, prompts, attention_mask, chat: bool) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [B, P] left-padded with the pad id, and their mask."""
    cfg = lm.config
    if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], str)):
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        blank = [i for i, t in enumerate(texts) if not t.strip()]
        if blank:  # with chat=True the template alone would be decoded
            raise DlmjaxError(f"a prompt is empty (prompt {blank[0]} has no text); give every prompt some text to answer")
        check_vocabulary(lm.tokenizer, texts, lm.directory / "hf" if lm.directory is not None else None)
        if chat:
            rows = [lm.apply_chat_template([{"role": "user", "content": t}]) for t in texts]
        else:
            # verbose=False: a prompt longer than the model gets dlmjax's error (with gen_length), not transformers' warning
            rows = [lm.tokenizer.encode(t, add_special_tokens=False, verbose=False) for t in texts]
        attention_mask = None
    else:
        if chat:
            raise DlmjaxError("chat=True needs text prompts; apply lm.apply_chat_template yourself for token ids")
        array = np.asarray(prompts, dtype=object if _ragged(prompts) else None)
        if array.dtype == object:
            rows = [list(r) for r in prompts]
            attention_mask = None
        else:
            array = array.reshape(1, -1) if array.ndim == 1 else array
            if array.size == 0:
                raise DlmjaxError("a prompt is empty; give every row at least one token")
            if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
                raise DlmjaxError(f"prompt ids must be integers [batch, length], got {array.dtype} {list(array.shape)}")
            rows = None
    if rows is not None:
        if any(len(r) == 0 for r in rows) or not rows:
            raise DlmjaxError("a prompt is empty; give every row at least one token")
        width = max(len(r) for r in rows)
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id
        array = np.full((len(rows), width), pad, np.int32)
        mask = np.zeros((len(rows), width), np.int32)
        for i, r in enumerate(rows):
            array[i, width - len(r):] = r
            mask[i, width - len(r):] = 1
        attention_mask = mask
    ids, mask = lm.check_inputs(array, attention_mask)
    if not mask.any(axis=1).all():
        raise DlmjaxError("a prompt is empty; give every row at least one token")
    if cfg.mask_token_id is not None and np.any((ids == cfg.mask_token_id) & (mask > 0)):
        raise DlmjaxError(f"a prompt contains the mask token {cfg.mask_token_id}; remove it (masks are what gets generated)")
    return ids, mask


def _ragged(prompts) -> bool:
    return isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], (list, tuple)) and len({len(r) for r in prompts}) > 1


def _bucket(ids, mask, bucket: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad the prompt to a multiple of `bucket` (so other lengths reuse the compiled program)."""
    width = ids.shape[1]
    target = min(-(-width // bucket) * bucket, max(limit, width))
    if target == width:
        return ids, mask
    extra = target - width
    return np.pad(ids, ((0, 0), (extra, 0))), np.pad(mask, ((0, 0), (extra, 0)))


def build_method(method: str, *, gen_length: int, **knobs) -> Method:
    """The Method of a preset with the given knobs (None = the preset's); a one-line DlmjaxError
    for an unknown preset, a knob the method does not use, or a value it cannot take."""
    if method not in PRESETS:
        raise DlmjaxError(f"unknown method '{method}'; use one of {', '.join(PRESETS)}")
    return PRESETS[method](gen_length, **knobs)


@on_model_mesh
def generate(
    lm,
    prompts_or_ids,
    attention_mask=None,
    *,
    method: str | Method | None = None,
    gen_length: int | None = None,
    block_length: int | None = None,
    steps: int | None = None,
    temperature: float | None = None,
    threshold: float | None = None,
    factor: float | None = None,
    rule: str | None = None,
    remasking: str | None = None,
    schedule: str | None = None,
    tau_high: float | None = None,
    tau_low: float | None = None,
    exit_k: float | None = None,
    stop_at_eos: bool | None = None,
    logits_eos_inf: bool | None = None,
    confidence_eos_eot_inf: bool | None = None,
    alg: str | None = None,
    alg_temp: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    eps: float | None = None,
    cfg_scale: float | None = None,
    gumbel_x64: bool | None = None,
    tau_add: float | None = None,
    tau_act: float | None = None,
    tau_conf: float | None = None,
    sub_block_length: int | None = None,
    strict: bool | None = None,
    minimal_topk: int | None = None,
    eos_early_stop: bool | None = None,
    editing_threshold: float | None = None,
    max_post_steps: int | None = None,
    num_to_transfer: int | None = None,
    blocks: str | None = None,
    cache: str | None = None,
    attention: str | None = None,
    chat: bool = False,
    seed: int = 0,
    prompt_bucket: int = 32,
    stop_token_ids: Sequence[int] | None = None,
    kernel: str | None = None,
    _emit=None,
) -> GenerateOutput:
    """Decode with a method preset ("llada", "dream", "fast-dllm", "dparallel", "sched", "prophet",
    "d2f", "fast-dllm-v2", "llada2", "llada2.1"; default "llada"); any knob overrides the preset. See dlmjax/decode/SPEC.md for the exact rules.
    `method` may also be a composed `dlmjax.decode.Method` (e.g. `presets.fast_dllm(256, threshold=0.8)`
    or `compose(...)`), which carries its own knobs.
    Autoregressive models (family qwen2) decode with method "ar" (their default and only method),
    which takes temperature, top_k, top_p and seed; see `dlmjax.decode.ar`.

    temperature: Gumbel-max sampling (0 = greedy). LLaDA's reference draws the noise in float64;
    by default dlmjax draws it in float32, where u is quantised to 2^-24 (the noise is capped near
    17 instead of unbounded) and scores round to float32, so rare near-ties can resolve differently.
    gumbel_x64=True reproduces the float64 form (jax_enable_x64 is switched on for that trace only).

    stop_token_ids: the ids that end an answer (default: the model's EOS and end-of-turn). The
    output's `lengths` and the texts stop at the first one (kept), and the methods with a stop rule
    use them: "ar" ends a row there, "fast-dllm-v2" stops a row once one has no mask before it,
    "d2f" adds no block after one is committed, and stop_at_eos=True ends a row like
    "fast-dllm-v2" does. Every id must be inside the vocabulary.

    _emit: streaming's callbacks (internal; use `lm.stream`).

    kernel: the cached-attention implementation of cached steps: "auto" (the platform's Pallas
    kernel where it runs, else XLA), "xla" or "pallas"; the default is DLMJAX_ATTENTION's value,
    else "auto". Part of the compiled program's identity.
    """
    stops = resolve_stops(lm.config, stop_token_ids)
    kernel = resolve_kernel(kernel)
    knobs = dict(
        block_length=block_length, steps=steps, threshold=threshold, factor=factor, rule=rule, remasking=remasking,
        schedule=schedule, tau_high=tau_high, tau_low=tau_low, exit_k=exit_k, stop_at_eos=stop_at_eos,
        logits_eos_inf=logits_eos_inf, confidence_eos_eot_inf=confidence_eos_eot_inf, alg=alg, alg_temp=alg_temp, top_p=top_p,
        top_k=top_k, eps=eps, cfg_scale=cfg_scale, gumbel_x64=gumbel_x64, cache=cache, attention=attention,
        temperature=temperature, tau_add=tau_add, tau_act=tau_act, tau_conf=tau_conf, blocks=blocks,
        sub_block_length=sub_block_length, strict=strict, minimal_topk=minimal_topk, eos_early_stop=eos_early_stop,
        editing_threshold=editing_threshold, max_post_steps=max_post_steps, num_to_transfer=num_to_transfer,
    )
    if isinstance(method, Method):
        given = [name for name, value in knobs.items() if value is not None]
        if given or (gen_length is not None and gen_length != method.gen_length):
            extra = given or ["gen_length"]
            raise DlmjaxError(f"a composed Method carries its own knobs; set {', '.join(extra)} in it "
                              "(dataclasses.replace or its preset function) instead of passing them here")
        if lm.config.is_autoregressive:
            raise DlmjaxError(f"{lm.config.family} is an autoregressive model, which decodes with method='ar' only")
        method.check()
        return _generate_diffusion(lm, prompts_or_ids, attention_mask, method, chat, seed, prompt_bucket, stops, kernel, _emit)
    if method is None:
        method = "ar" if lm.config.is_autoregressive else "llada"
    if gen_length is None:  # the canvas the checkpoint was made for (generation_config.json), else 128
        gen_length = lm.default_gen_length
    temperature = 0.0 if temperature is None else temperature
    if method == "ar" or lm.config.is_autoregressive:
        ar_knobs = ("temperature", "top_p", "top_k")
        return generate_ar(
            lm, prompts_or_ids, attention_mask, method=method, gen_length=gen_length, temperature=temperature,
            top_p=top_p, top_k=top_k, chat=chat, seed=seed, prompt_bucket=prompt_bucket, stops=stops, kernel=kernel,
            diffusion_only=[name for name, value in knobs.items() if value is not None and name not in ar_knobs], emit=_emit,
        )
    m = build_method(method, gen_length=gen_length, **knobs)
    return _generate_diffusion(lm, prompts_or_ids, attention_mask, m, chat, seed, prompt_bucket, stops, kernel, _emit)


KERNELS = ("auto", "xla", "pallas")


def resolve_kernel(kernel: str | None) -> str:
    """The cached-attention implementation: the given one, else DLMJAX_ATTENTION's value, else "auto"."""
    from dlmjax.kernels.attention import ENV_VAR

    source = "kernel"
    if kernel is None:
        kernel, source = os.environ.get(ENV_VAR, "").strip().lower() or "auto", ENV_VAR
    if kernel not in KERNELS:
        raise DlmjaxError(f"{source} '{kernel}' is not an attention implementation; use one of {', '.join(KERNELS)}")
    return kernel


def resolve_stops(cfg, stop_token_ids) -> tuple[int, ...]:
    """The stop ids: the given ones (checked against the vocabulary), else the model's EOS and
    end-of-turn that lie inside it."""
    if stop_token_ids is None:
        return tuple(dict.fromkeys(t for t in (cfg.eos_token_id, cfg.eot_token_id) if t is not None and 0 <= t < cfg.vocab_size))
    if isinstance(stop_token_ids, (int, np.integer)):
        stop_token_ids = [stop_token_ids]
    stops = []
    for t in stop_token_ids:
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
            raise DlmjaxError(f"stop token id {t!r} is not an integer; pass token ids, e.g. stop_token_ids=[{cfg.eos_token_id}]")
        if not 0 <= int(t) < cfg.vocab_size:
            raise DlmjaxError(f"stop token id {int(t)} is outside the vocabulary (0 .. {cfg.vocab_size - 1}); "
                              "pass ids the tokenizer produces")
        if cfg.mask_token_id is not None and int(t) == cfg.mask_token_id:
            raise DlmjaxError(f"stop token id {int(t)} is the mask token; pass the ids that end an answer (EOS, end-of-turn)")
        stops.append(int(t))
    return tuple(dict.fromkeys(stops))


def answer_lengths(tokens: np.ndarray, stops: tuple[int, ...]) -> np.ndarray:
    """[B] tokens of each row up to and including its first stop (all of them without one)."""
    is_stop = np.isin(tokens, stops) if stops else np.zeros(tokens.shape, bool)
    first = np.argmax(is_stop, axis=1)
    return np.where(is_stop.any(axis=1), first + 1, tokens.shape[1]).astype(np.int32)


def _generate_diffusion(lm, prompts_or_ids, attention_mask, m: Method, chat: bool, seed: int, prompt_bucket: int,
                        stops: tuple[int, ...], kernel: str = "auto", emit=None):
    """Checks that need the model, then tokenize -> pad -> bucket -> place -> run -> gather -> detokenize."""
    gen_length = m.gen_length
    if m.cache.stores and isinstance(m.rule, rules.Quota) and lm.config.shifted_logits and m.steps_per_block < 2:
        raise DlmjaxError(
            f"cache='{m.cache.name}' with {lm.config.family}'s shifted logits needs at least 2 steps per block "
            f"(the refresh commits only the first token); raise steps to {2 * m.num_blocks} or more"
        )
    cfg = lm.config
    m.blocks.check_model(cfg)
    if (m.stop_at_eos or m.logits_eos_inf or m.confidence_eos_eot_inf) and cfg.eos_token_id is None:
        raise DlmjaxError("this model's config has no eos_token_id; set it in config.json or drop the EOS options")
    ids, mask, limit = _prompts_that_fit(lm, prompts_or_ids, attention_mask, chat, m.canvas_length)
    if m.attention == "block_causal" and not isinstance(m.blocks, schedules.RowBlocks):  # blocks counted from position 0 must line up with the generation blocks
        prompt_bucket = m.block_length * max(1, prompt_bucket // m.block_length)
        if -(-ids.shape[1] // m.block_length) * m.block_length > limit:
            raise DlmjaxError(
                f"attention='block_causal' pads the prompt to a multiple of block_length {m.block_length}, which leaves no "
                f"room for gen_length {gen_length}; shorten the prompt or gen_length"
            )
    ids, mask = _bucket(ids, mask, max(1, prompt_bucket), limit)
    tokens = Tokens(mask=cfg.mask_token_id, eos=cfg.eos_token_id, eot=cfg.eot_token_id, stops=stops)
    args = (lm.state, Batch(lm.place_batch(ids), lm.place_batch(mask), tokens), m.traced(), jax.random.key(seed))
    args, streaming = _with_stream(args, emit)

    def lower():
        with jax.enable_x64(m.gumbel_x64):  # scoped: only LLaDA's exact Gumbel noise is float64
            return engine.run.lower(lm.graphdef, *args, layout=lm.layout, kernel=kernel, emit=streaming).compile()

    program = (m.structure(), tokens, ids.shape, kernel, streaming)
    result, seconds, compile_seconds = _compile_and_run(lm, program, lower, args)
    out, nfe, trajectory, edits = _gather(lm, result.tokens, result.nfe, result.trajectory, result.edits)
    steps_run = result.steps
    lengths = answer_lengths(out, stops)
    texts = _texts(lm, out, lengths)
    return GenerateOutput(
        tokens=out, texts=texts, nfe=nfe, steps=int(steps_run), trajectory=trajectory, seconds=seconds,
        compile_seconds=compile_seconds, method=m, lengths=lengths, edits=edits,
    )


def generate_ar(lm, prompts_or_ids, attention_mask, *, method: str, gen_length: int, temperature: float, top_p, top_k,
                chat: bool, seed: int, prompt_bucket: int, stops: tuple[int, ...] | None = None, kernel: str = "auto",
                diffusion_only: Sequence[str] = (), emit=None) -> GenerateOutput:
    """Token-by-token decoding of an autoregressive model (`dlmjax.decode.ar`); checks first, then one program."""
    cfg = lm.config
    if not cfg.is_autoregressive:
        raise DlmjaxError(
            f"method 'ar' decodes autoregressive models, but this is a {cfg.family} diffusion model; "
            f"use a diffusion method: one of {', '.join(PRESETS)}"
        )
    if method != "ar":
        raise DlmjaxError(f"{cfg.family} is an autoregressive model, which decodes with method='ar' only; drop method='{method}'")
    if diffusion_only:
        one = len(diffusion_only) == 1
        raise DlmjaxError(
            f"{', '.join(diffusion_only)} {'is' if one else 'are'} for diffusion decoding only; "
            f"drop {'it' if one else 'them'} for method='ar'"
        )
    if gen_length <= 0:
        raise DlmjaxError(f"gen_length must be positive, got {gen_length}")
    if temperature < 0:
        raise DlmjaxError(f"temperature {temperature} is negative; use 0 for greedy decoding or a positive value")
    if top_p is not None and not 0 < top_p <= 1:
        raise DlmjaxError(f"top_p {top_p} is outside (0, 1]; pass e.g. top_p=0.95")
    if top_k is not None and (int(top_k) != top_k or top_k < 1):
        raise DlmjaxError(f"top_k {top_k} must be a positive integer")
    ids, mask, limit = _prompts_that_fit(lm, prompts_or_ids, attention_mask, chat, gen_length)
    ids, mask = _bucket(ids, mask, max(1, prompt_bucket), limit)
    m = ARMethod(gen_length=gen_length)
    stops = resolve_stops(cfg, None) if stops is None else stops
    pad = next(t for t in (cfg.pad_token_id, cfg.eos_token_id, 0) if t is not None)
    tokens = ARTokens(stops=stops, pad=pad)
    knobs = ARKnobs.make(temperature, top_k, top_p, cfg.vocab_size)
    args = (lm.state, lm.place_batch(ids), lm.place_batch(mask), knobs, jax.random.key(seed))
    args, streaming = _with_stream(args, emit)

    def lower():
        return decode_ar.lower(lm.graphdef, *args, method=m, tokens=tokens, layout=lm.layout, kernel=kernel,
                               emit_spec=streaming).compile()

    (out, steps_run, lengths), seconds, compile_seconds = _compile_and_run(lm, (m, tokens, ids.shape, kernel, streaming),
                                                                           lower, args)
    out, lengths = _gather(lm, out, lengths)
    texts = _texts(lm, out, lengths)
    # A row takes part in one model call per token it produces (the prefill gives the first).
    trajectory = np.minimum(np.arange(1, gen_length + 1)[None, :], lengths[:, None]).astype(np.int32)
    return GenerateOutput(
        tokens=out, texts=texts, nfe=lengths.copy(), steps=int(steps_run), trajectory=trajectory, seconds=seconds,
        compile_seconds=compile_seconds, method=m, lengths=lengths,
    )


def _prompts_that_fit(lm, prompts_or_ids, attention_mask, chat: bool, gen_length: int):
    """Prompt ids and mask (see `_prepare_prompts`), and the longest prompt that leaves room for
    gen_length positions; a longer prompt raises."""
    cfg = lm.config
    ids, mask = _prepare_prompts(lm, prompts_or_ids, attention_mask, chat)
    limit = cfg.max_position_embeddings - gen_length
    if ids.shape[1] > limit:
        raise PromptTooLong(
            f"prompt length {ids.shape[1]} plus gen_length {gen_length} exceeds the model's {cfg.max_position_embeddings} "
            "positions; shorten the prompt or gen_length"
        )
    return ids, mask, limit


def _with_stream(args: tuple, emit) -> tuple[tuple, object]:
    """The program's arguments and its static Emit: `emit` is None, or (Emit, stream id) from
    `dlmjax.decode.stream`, whose id joins the arguments (traced)."""
    if emit is None:
        return args, None
    streaming, sid = emit
    return (*args, jnp.int32(sid)), streaming


def _compile_and_run(lm, program: tuple, lower, args: tuple):
    """Run a decode program, compiling it once per key: (outputs, seconds, compile_seconds).

    `program` holds the static structure (method, tokens, input shape, attention kernel);
    `lower()` builds and compiles it. The programs are kept on the model (`lm.compiled`)."""
    key = (lm.graphdef, *program, str(lm.dtype), lm.mesh, lm.rules)
    compiled, compile_seconds = lm.compiled.get(key, lower)
    start = time.perf_counter()
    outputs = jax.block_until_ready(compiled(*args))
    return outputs, time.perf_counter() - start, compile_seconds


def _gather(lm, *arrays) -> tuple[np.ndarray, ...]:
    """Host numpy copies of per-row outputs; under a mesh rows may sit on other hosts' devices."""
    if lm.mesh is not None:
        from dlmjax.sharding import to_host

        arrays = tuple(to_host(a) for a in arrays)
    return tuple(np.asarray(a) for a in arrays)


def _texts(lm, out, lengths) -> list[str] | None:
    """Each row's answer text (its tokens before the first stop), when the model has a tokenizer."""
    if lm.directory is None or not (lm.directory / "hf").is_dir():
        return None
    return [decode_text(lm, row[: int(n)]) for row, n in zip(out, lengths)]


def decode_text(lm, row: Sequence[int]) -> str:
    """The answer text: up to the first EOS or end-of-turn, without special tokens."""
    cfg = lm.config
    stops = {t for t in (cfg.eos_token_id, cfg.eot_token_id) if t is not None}
    cut = [int(t) for t in row]
    for i, t in enumerate(cut):
        if t in stops:
            cut = cut[:i]
            break
    cut = [t for t in cut if t != cfg.mask_token_id]
    return lm.tokenizer.decode(cut, skip_special_tokens=True)
