"""Block schedules: which windows of the canvas a step may commit, and when a row is finished.

A schedule is a part (`dlmjax.decode.parts`) that the engine's one loop asks, every iteration,
for a `View`: the positions the step may commit, cut into windows the commit rule handles one
by one, and which windows must commit at least one token. It carries its own state through the
loop (a pytree in `State.sched`) and updates it after the commit.

* `SemiAR`: LLaDA's semi-autoregressive loop. The generation region is cut into blocks decoded
  left to right, `steps` forward passes spread evenly over them; one block of `gen_length` is the
  single-canvas decode. One window: the current block. The batch moves to the next block once
  every row has finished this one (checked after each step, so every iteration runs a forward).
* `Hierarchy`: Fast-dLLM v2's block + sub-block decoding. Blocks are aligned to each row's
  position 0 (a prompt that ends mid-block shares its last block with the first generated
  tokens); a block's sub-blocks are decoded strictly left to right, one window (the first
  sub-block with masks) per step; a finished block takes one more forward, whose prediction after
  the block is the next block's first token (autoregressive, never re-decoded). A prompt of a
  block or more is prefilled first. A row stops once a stop token has no mask before it.
* `Pipeline`: D2F's pipelined multi-block decoding. Each row adds blocks while its newest block
  is decoded to at least `tau_add`; block j + 1 is fully activated (must commit a token every
  step) once block j is decoded to at least `tau_act`; every added block is a window, decoded in
  the same forward. A row stops adding blocks once it commits an EOS.
* `Aligned`: LLaDA2.0's blocks. Blocks are aligned to each row's position 0 as in `Hierarchy`,
  without sub-blocks: each step commits, in the row's current block, at least the step's quota
  (block_length spread over `steps`), and a block ends when it has no mask left.
* `Editing`: LLaDA2.1's blocks, the same geometry: a step may also rewrite the block's decoded
  tokens, and a block free of masks takes up to `max_post_steps` more forwards while they edit.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from dlmjax.attention import attention_mask, mask_spec, position_block_causal
from dlmjax.decode.caches import Window
from dlmjax.decode.parts import Part, part, static, traced
from dlmjax.errors import DlmjaxError


@dataclasses.dataclass(frozen=True)
class View:
    """What one iteration of the loop may do (arrays of the trace; not carried)."""

    run: jax.Array  # scalar bool: the view has work (SemiAR: else the batch moves to the next block)
    active: jax.Array  # [B] rows that take part in the forward (their NFE counts it)
    region: jax.Array  # [B, G] positions a commit may touch
    windows: int  # the rule sees [B * windows, G / windows]: one row per window
    force: jax.Array | None  # [B, windows] windows that must commit at least one candidate (None: every window)
    block: jax.Array  # scalar: the block a cache policy works on (SemiAR)
    i: jax.Array  # scalar: the step within that block (SemiAR)
    noise_start: jax.Array | int  # the positions [start, start + length) a step may sample (Gumbel noise)
    noise_length: int
    quota: jax.Array | None = None  # [B] tokens this step commits, for the quota rule (LLaDA's schedule)


def gen_length_field():
    return static(128, "tokens to generate (default: max_new_tokens of the model's generation_config.json, else 128)")


def block_length_field(default: int):
    return static(default, "tokens per block, decoded left to right (default: the method's)")


def first_stop(x_gen, tokens):
    """([B] rows whose first stop id has no mask before it, [B] that stop's index): where a row's
    answer ends (stop_at_eos, Fast-dLLM v2's stop rule)."""
    if not tokens.stops:
        return jnp.zeros(x_gen.shape[:1], bool), jnp.zeros(x_gen.shape[:1], jnp.int32)
    is_stop = jnp.isin(x_gen, jnp.asarray(tokens.stops, x_gen.dtype))
    first = jnp.argmax(is_stop, axis=-1)
    before = jnp.arange(x_gen.shape[1])[None, :] < first[:, None]
    return jnp.any(is_stop, axis=-1) & ~jnp.any((x_gen == tokens.mask) & before, axis=-1), first


class Schedule(Part):
    """What every schedule gives the engine's loop (`dlmjax/decode/engine.py:_iteration`):

    init(masked, prompt_lengths) -> state      its state before the first step
    begin(state, masked, done, rule, refresh_commits_one) -> (state, View)   the start of a step
    after(state, before, x_gen, tokens, commit) -> (state, finished [B], keep [B, G] | None)
        after the commits (`before`: the positions masked before them; `commit`: the positions
        the step wrote): rows the schedule ends, and the positions they keep (the rest reads as
        EOS; None: the schedule ends no row)
    settle(state, masked, done, rule) -> state  once the step's rows are done or not (SemiAR: the
        batch moves to the next block)
    running(state) -> scalar bool, max_steps    the loop's bounds
    mask(attention, positions, full_mask, prompt_length)   the canvas's attention mask
    window_mask(attention, positions, full_mask, prompt_length, query_index)   a window's mask
    check_model(cfg)                            a one-line error for a model it cannot decode

    and, for the cache policies (dlmjax.decode.caches):

    exact_window(state, masked, done, shifted, prompt_length) -> Window   where the exact block
        cache's queries go this step (a schedule without it takes no cache='block')
    sub_window(state, masked, done) -> (reuse [B], start [B], width)   the sub-block DualCache
        (schedules with sub-blocks)
    """

    title: ClassVar[str] = ""  # what messages call it
    prefills_prompt: ClassVar[bool] = False  # the exact cache writes the prompt before the loop (else the first step does)
    has_sub_blocks: ClassVar[bool] = False  # cache='dual' is the sub-block DualCache (Fast-dLLM v2)
    edits: ClassVar[bool] = False  # a row free of masks may still take steps that rewrite tokens (LLaDA2.1)
    block_refresh: ClassVar[bool] = False  # Fast-dLLM's approximate caches refresh at the first step of a block
    gen_length: int
    block_length: int

    def check_model(self, cfg) -> None:
        """Raise a one-line DlmjaxError if the model `cfg` cannot be decoded this way."""

    def mask(self, attention: str, positions, full_mask, prompt_length: int):
        """The canvas's attention mask [B, T, T] under the method's `attention` mode."""
        return attention_mask(attention, full_mask, block_size=self.block_length, prompt_length=prompt_length)

    def window_mask(self, attention: str, positions, full_mask, prompt_length: int, query_index):
        """The mask of queries at canvas indices `query_index` [W] against every slot."""
        return mask_spec(attention, full_mask, query_index=query_index, block_size=self.block_length,
                         prompt_length=prompt_length)

    def exact_window(self, st, masked, done, shifted: bool, prompt_length: int) -> Window:
        raise NotImplementedError(f"{self.title} has no exact cache window")

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def max_steps(self) -> int:
        """The most steps (forwards) a decode can take: the loop's hard bound, so that no state,
        however wrong, can keep it running."""
        raise NotImplementedError

    def _check_lengths(self) -> None:
        gen, block = self.gen_length, self.block_length
        if gen <= 0 or block <= 0:
            raise DlmjaxError(f"gen_length and block_length must be positive, got {gen} and {block}")
        if gen % block:
            raise DlmjaxError(f"gen_length {gen} is not divisible by block_length {block}; pick a block_length that divides it")


def _position_window_mask(positions, full_mask, query_index, block_length: int):
    """[B, W, P + G]: the queries at canvas indices `query_index` ([W] or [B, W]) against every
    slot, block-causal by position (blocks of `block_length` from each row's position 0)."""
    query_index = jnp.broadcast_to(query_index, (positions.shape[0],) + query_index.shape[-1:])
    query_block = jnp.take_along_axis(positions, query_index, axis=1) // block_length
    key_block = positions // block_length
    return full_mask.astype(bool)[:, None, :] & (key_block[:, None, :] <= query_block[:, :, None])


def block_span(block, gen_length: int, block_length: int) -> jax.Array:
    index = jnp.arange(gen_length)
    return (index >= block * block_length) & (index < (block + 1) * block_length)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SemiARState:
    block: jax.Array  # scalar: the block being decoded
    i: jax.Array  # scalar: steps taken in it
    quota_base: jax.Array  # [B] masks the quota rule spreads over the block's steps


@part
class SemiAR(Schedule):
    name: ClassVar[str] = "semi_ar"
    title: ClassVar[str] = "the semi-autoregressive blocks"
    prefills_prompt: ClassVar[bool] = True
    block_refresh: ClassVar[bool] = True
    gen_length: int = gen_length_field()
    block_length: int = block_length_field(128)
    steps: int = static(128, "forward passes of the quota schedule, spread evenly over the blocks (default: gen-length)")

    def check(self) -> None:
        self._check_lengths()
        if self.steps <= 0:
            raise DlmjaxError(f"steps must be positive, got {self.steps}")
        if self.steps % self.num_blocks:
            raise DlmjaxError(
                f"steps {self.steps} is not divisible by the {self.num_blocks} blocks; use a multiple of {self.num_blocks}"
            )

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks

    @property
    def max_steps(self) -> int:  # each block: its fixed steps, or one commit a step at least
        return self.num_blocks * max(self.steps_per_block, self.block_length)

    def masks_in_block(self, masked, block) -> jax.Array:
        return jnp.sum(masked & block_span(block, self.gen_length, self.block_length), axis=-1).astype(jnp.int32)

    def init(self, masked, prompt_lengths) -> SemiARState:
        return SemiARState(block=jnp.int32(0), i=jnp.int32(0), quota_base=self.masks_in_block(masked, 0))

    def running(self, st: SemiARState) -> jax.Array:
        return st.block < self.num_blocks

    def begin(self, st: SemiARState, masked, done, rule, refresh_commits_one: bool):
        view = self.view(st, masked, done, rule.fixed_steps)
        if rule.name != "quota":
            return st, view
        # LLaDA's schedule: the block's masks spread evenly over its steps, the first steps taking
        # the remainder. Under Fast-dLLM's approximate caches a shifted family's refresh step commits
        # the block's first token only, and the other steps share what it left.
        spb, i = self.steps_per_block, st.i
        if refresh_commits_one:
            st = dataclasses.replace(st, quota_base=jnp.where(i == 1, self.masks_in_block(masked, st.block), st.quota_base))
            quota = st.quota_base // (spb - 1) + ((i - 1) < st.quota_base % (spb - 1)).astype(jnp.int32)
        else:
            quota = st.quota_base // spb + (i < st.quota_base % spb).astype(jnp.int32)
        return st, dataclasses.replace(view, quota=quota)

    def view(self, st: SemiARState, masked, done, fixed_steps: bool) -> View:
        span = block_span(st.block, self.gen_length, self.block_length)
        if fixed_steps:  # quota and Dream: exactly steps_per_block steps a block
            active = ~done & (st.i < self.steps_per_block)
        else:  # until the block has no mask left
            active = ~done & jnp.any(masked & span, axis=-1)
        cap = self.steps_per_block if fixed_steps else self.block_length
        run = (st.i < cap) & jnp.any(active)
        return View(run=run, active=active, region=span[None, :] & active[:, None], windows=1, force=None, block=st.block,
                    i=st.i, noise_start=st.block * self.block_length, noise_length=self.block_length)

    def exact_window(self, st: SemiARState, masked, done, shifted: bool, prompt_length: int) -> Window:
        """The block's queries (a shifted family's from the slot before it, whose output predicts
        the block's first token); a block's first step starts one block early, rewriting the
        previous block's K/V from its final tokens. Predictions are kept for the block only."""
        k = self.block_length
        writes = jnp.broadcast_to(block_span(st.block, self.gen_length, k)[None, :], masked.shape)
        return Window(end=(st.block + 1) * k, widths=(k + int(shifted), 2 * k), which=(st.i == 0).astype(jnp.int32),
                      writes=writes)

    def after(self, st: SemiARState, before, x_gen, tokens, commit=None):
        """The state after a step; SemiAR finishes no row itself (the engine's EOS and mask rules do)."""
        return dataclasses.replace(st, i=st.i + 1), jnp.zeros(x_gen.shape[:1], bool), None

    def settle(self, st: SemiARState, masked, done, rule) -> SemiARState:
        """The block is over for every row: the next step starts the next block."""
        over = ~self.view(st, masked, done, rule.fixed_steps).run
        block = st.block + 1
        moved = SemiARState(block=block, i=jnp.int32(0), quota_base=self.masks_in_block(masked, block))
        return jax.tree_util.tree_map(lambda a, b: jnp.where(over, a, b), moved, st)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PipelineState:
    added: jax.Array  # [B] blocks added so far
    complete: jax.Array  # [B, num_blocks] fully activated (sticky)
    eos: jax.Array  # [B] a stop id (the EOS) was committed: no more blocks are added
    final: jax.Array  # [B] leading blocks whose K/V in the cache are final (-1: not even the prompt's yet)


@part
class Pipeline(Schedule):
    """D2F's pipeline (SPEC.md, D2F): the state is per row, so rows of a batch pipeline independently."""

    name: ClassVar[str] = "d2f"
    title: ClassVar[str] = "D2F's pipeline"
    gen_length: int = gen_length_field()
    block_length: int = block_length_field(32)
    tau_add: float = traced(0.5, "D2F: add a block once the newest one is decoded to at least this fraction")
    tau_act: float = traced(0.9, "D2F: fully activate a block once its predecessor is decoded to at least this fraction")

    def check(self) -> None:
        self._check_lengths()
        for knob in ("tau_add", "tau_act"):
            value = getattr(self, knob)
            if not 0 <= value <= 1:
                raise DlmjaxError(f"{knob} {value} is outside [0, 1]; it is a fraction of a block, e.g. 0.5")

    @property
    def max_steps(self) -> int:  # every step commits a token (the earliest block with masks is fully activated)
        return self.gen_length

    def init(self, masked, prompt_lengths) -> PipelineState:
        b = masked.shape[0]
        return PipelineState(added=jnp.zeros((b,), jnp.int32), complete=jnp.zeros((b, self.num_blocks), bool),
                             eos=jnp.zeros((b,), bool), final=jnp.full((b,), -1, jnp.int32))

    def running(self, st: PipelineState) -> jax.Array:
        return jnp.bool_(True)  # rows end by themselves (`finished`)

    def decoded(self, masked) -> jax.Array:
        """[B, num_blocks] fraction of every block that is decoded."""
        b = masked.shape[0]
        left = jnp.sum(masked.reshape(b, self.num_blocks, self.block_length), axis=-1)
        return 1.0 - left.astype(jnp.float32) / self.block_length

    def open(self, st: PipelineState, masked, done) -> PipelineState:
        """The start of an iteration: add at most one block (judged on the newest; the prompt counts as
        decoded), then fully activate every added block whose predecessor is decoded to tau_act."""
        ratio = self.decoded(masked)
        index = jnp.arange(self.num_blocks)
        newest = jnp.sum(jnp.where(index[None, :] == st.added[:, None] - 1, ratio, 0.0), axis=-1)
        newest = jnp.where(st.added == 0, 1.0, newest)
        add = ~done & ~st.eos & (st.added < self.num_blocks) & (newest >= self.tau_add)
        added = st.added + add.astype(jnp.int32)
        before = jnp.concatenate([jnp.ones_like(ratio[:, :1]), ratio[:, :-1]], axis=1)  # block j's predecessor
        complete = st.complete | ((index[None, :] < added[:, None]) & (before >= self.tau_act))
        return dataclasses.replace(st, added=added, complete=complete)

    def begin(self, st: PipelineState, masked, done, rule, refresh_commits_one: bool):
        st = self.open(st, masked, done)
        added = jnp.arange(self.gen_length)[None, :] // self.block_length < st.added[:, None]
        active = ~done
        return st, View(run=jnp.bool_(True), active=active, region=added & active[:, None], windows=self.num_blocks,
                        force=st.complete, block=jnp.int32(0), i=jnp.int32(0), noise_start=0, noise_length=self.gen_length)

    def settle(self, st: PipelineState, masked, done, rule) -> PipelineState:
        return st

    def exact_window(self, st: PipelineState, masked, done, shifted: bool, prompt_length: int) -> Window:
        """D2F's in-order block cache: the queries run from the first block whose K/V are not final
        (the batch's earliest; a shifted family's from the slot before it) to the end of the
        canvas; the first step feeds the whole canvas and writes the prompt's K/V. The width is
        the smallest of a few compiled ones (1, 2, 4, ... blocks, the region, the canvas) that
        covers it: re-feeding final tokens rewrites their K/V unchanged."""
        nb, k, g = self.num_blocks, self.block_length, self.gen_length
        length = prompt_length + g
        cached = jnp.min(jnp.where(done, nb, st.final))
        need = jnp.where(cached < 0, length, g - jnp.maximum(cached, 0) * k + int(shifted))
        blocks = [1 << e for e in range(nb.bit_length()) if (1 << e) < nb]
        widths = tuple(sorted({min(n * k + int(shifted), length) for n in blocks} | {min(g + int(shifted), length), length}))
        which = jnp.sum(jnp.asarray(widths) < need).astype(jnp.int32)
        return Window(end=jnp.int32(g), widths=widths, which=which)

    def after(self, st: PipelineState, before, x_gen, tokens, commit=None):
        """The state after a step (an EOS committed stops the adding of blocks), the rows with nothing
        left (every added block decoded and no block left to add), and the positions they keep (blocks
        never added read as EOS)."""
        masked = x_gen == tokens.mask
        # the step's forward fed every block not final before it: those it saw fully decoded are final now
        decoded = self.decoded(before) >= 1.0
        st = dataclasses.replace(st, final=jnp.sum(jnp.cumprod(decoded, axis=1), axis=1).astype(jnp.int32))
        if tokens.stops:  # a stop id committed (upstream: the EOS) ends the adding of blocks
            committed_stop = before & jnp.isin(x_gen, jnp.asarray(tokens.stops, x_gen.dtype))
            st = dataclasses.replace(st, eos=st.eos | jnp.any(committed_stop, axis=-1))
        added = jnp.arange(self.gen_length)[None, :] // self.block_length < st.added[:, None]
        can_add = ~st.eos & (st.added < self.num_blocks)
        return st, ~jnp.any(masked & added, axis=-1) & ~can_add, ~masked


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HierarchyState:
    block: jax.Array  # [B] -1: the prompt's prefill is next; 0 .. nb - 1: the block being decoded; nb: finished
    prompt_length: jax.Array  # [B] real prompt tokens (blocks are aligned to the row's position 0)
    fresh: jax.Array  # [B] the row's next forward is the first of its block (the sub-block DualCache runs it whole)
    cold: jax.Array  # scalar: no forward yet (a cache's first forward writes the whole canvas)


@part
class Hierarchy(Schedule):
    """Fast-dLLM v2 (SPEC.md, Fast-dLLM v2): per row, because each row's blocks start at its own position 0."""

    name: ClassVar[str] = "fdv2"
    title: ClassVar[str] = "Fast-dLLM v2's blocks"
    has_sub_blocks: ClassVar[bool] = True
    gen_length: int = gen_length_field()
    block_length: int = block_length_field(32)
    sub_block_length: int = static(8, "Fast-dLLM v2: tokens per sub-block, decoded left to right inside a block")

    def check(self) -> None:
        self._check_lengths()
        sub, block = self.sub_block_length, self.block_length
        if sub <= 0 or block % sub:
            raise DlmjaxError(f"sub_block_length {sub} does not divide block_length {block}; pick a divisor such as 8")

    def check_model(self, cfg) -> None:
        if cfg.bd_size is None:
            raise DlmjaxError(f"method 'fast-dllm-v2' needs a block-diffusion model trained block-causal (family "
                              f"fast_dllm_v2); this is {cfg.family}: use 'fast-dllm', 'd2f' or 'llada'")

    @property
    def max_steps(self) -> int:  # the prefill, a token a step, and a commit pass a block
        return 1 + self.gen_length + self.num_blocks

    def init(self, masked, prompt_lengths) -> HierarchyState:
        prefill = prompt_lengths >= self.block_length  # upstream: > (SPEC.md: a prompt of exactly one block is fed)
        return HierarchyState(block=jnp.where(prefill, -1, 0).astype(jnp.int32), prompt_length=prompt_lengths,
                              fresh=jnp.ones_like(prefill), cold=jnp.bool_(True))

    def running(self, st: HierarchyState) -> jax.Array:
        return jnp.bool_(True)

    def _geometry(self, st: HierarchyState):
        """Every generation position's block [B, G] (0 = the block the row's first generated token is
        in) and sub-block [B, G], counted from the row's position 0, and the end [B] of the row's
        current block (a generation index)."""
        bs, sbs = self.block_length, self.sub_block_length
        position = st.prompt_length[:, None] + jnp.arange(self.gen_length)[None, :]
        first = st.prompt_length // bs  # the block holding the prompt's end (or starting right after it)
        block = position // bs - first[:, None]
        hi = (first + jnp.maximum(st.block, 0) + 1) * bs - st.prompt_length  # the current block's end
        return block, position // sbs, hi

    def mask(self, attention: str, positions, full_mask, prompt_length: int):
        """Block-causal by position: blocks from each row's position 0, whatever its padding."""
        return position_block_causal(positions, full_mask, self.block_length)

    def window_mask(self, attention: str, positions, full_mask, prompt_length: int, query_index):
        return _position_window_mask(positions, full_mask, query_index, self.block_length)

    def exact_window(self, st: HierarchyState, masked, done, shifted: bool, prompt_length: int) -> Window:
        """The row's current block and the position after it (whose prediction, from the block's
        last token, is the next block's first token), per row; the first step feeds the whole
        canvas (the prompt's prefill, or a short prompt's first block)."""
        _, _, hi = self._geometry(st)
        return Window(end=hi + 1, widths=(self.block_length + 1, prompt_length + self.gen_length),
                      which=st.cold.astype(jnp.int32))

    def sub_window(self, st: HierarchyState, masked, done):
        """(rows that reuse their block's K/V this step, the generation index of their sub-block's
        start, its width): upstream runs the block whole on its first forward and while the current
        sub-block's first token is masked, and else the sub-block alone."""
        block, sub, _ = self._geometry(st)
        left = masked & (block == st.block[:, None])
        current = jnp.take_along_axis(sub, jnp.argmax(left, axis=-1)[:, None], axis=-1)[:, 0]
        start = current * self.sub_block_length - st.prompt_length  # may fall in the prompt (a block it ends in)
        first_masked = jnp.take_along_axis(masked, jnp.clip(start, 0, self.gen_length - 1)[:, None], axis=-1)[:, 0] & (start >= 0)
        reuse = jnp.any(left, axis=-1) & ~st.fresh & ~first_masked & ~st.cold & (st.block >= 0)
        return reuse, start, self.sub_block_length

    def begin(self, st: HierarchyState, masked, done, rule, refresh_commits_one: bool):
        return st, self.view(st, masked, done)

    def settle(self, st: HierarchyState, masked, done, rule) -> HierarchyState:
        return st

    def view(self, st: HierarchyState, masked, done) -> View:
        block, sub, hi = self._geometry(st)
        g = jnp.arange(self.gen_length)[None, :]
        in_block = block == st.block[:, None]
        left = masked & in_block
        decoding = jnp.any(left, axis=-1)
        first_mask = jnp.argmax(left, axis=-1)
        current = jnp.take_along_axis(sub, first_mask[:, None], axis=-1)
        window = in_block & (sub == current)  # the first sub-block with masks
        ar_first = (st.prompt_length % self.block_length) == 0
        prefill = jnp.where(ar_first[:, None], g == 0, False)  # a prompt that ends on a block boundary: its next token
        commit_pass = g == hi[:, None]  # the block is decoded: the forward that gives the next block's first token
        region = jnp.where((st.block == -1)[:, None], prefill, jnp.where(decoding[:, None], window, commit_pass))
        active = ~done
        return View(run=jnp.bool_(True), active=active, region=region & active[:, None], windows=1, force=None,
                    block=jnp.int32(0), i=jnp.int32(0), noise_start=0, noise_length=self.gen_length)

    def after(self, st: HierarchyState, before, x_gen, tokens, commit=None):
        """The state after a step, the rows that are finished, and the positions they keep."""
        block_before, _, _ = self._geometry(st)
        was_decoding = jnp.any(before & (block_before == st.block[:, None]), axis=-1)
        moves = (st.block == -1) | ~was_decoding
        st = dataclasses.replace(st, block=jnp.where(moves, st.block + 1, st.block), fresh=moves, cold=jnp.bool_(False))
        block, _, hi = self._geometry(st)
        masked = x_gen == tokens.mask
        # stop: a stop token after the prompt with no mask before it (upstream checks the current block's
        # masks and, at a block start, everything; earlier blocks have no mask left)
        stopped, stop_at = first_stop(x_gen, tokens)
        g = jnp.arange(self.gen_length)[None, :]
        current_left = jnp.any(masked & (block == st.block[:, None]), axis=-1)
        out_of_room = (st.block >= 0) & ~current_left & (hi >= self.gen_length)  # its next token would not fit
        finished = stopped | (st.block >= self.num_blocks) | out_of_room
        keep = ~masked & ~(stopped[:, None] & (g > stop_at[:, None]))  # upstream cuts after the first stop
        return st, finished, keep


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AlignedState:
    block: jax.Array  # [B] the block being decoded (0: the one holding the prompt's last token, or starting after it)
    i: jax.Array  # [B] steps taken in it
    prompt_length: jax.Array  # [B] real prompt tokens (blocks are aligned to the row's position 0)
    fresh: jax.Array  # [B] the row's next forward is the first of its block
    cold: jax.Array  # scalar: no forward yet (the exact cache's first forward writes the whole canvas)
    post: jax.Array  # [B] LLaDA2.1: steps begun with the block free of masks
    idle: jax.Array  # [B] LLaDA2.1: this step began with the block free of masks


class RowBlocks(Schedule):
    """LLaDA2's geometry, shared by its two decoders: per row, blocks of block_length from position
    0, the first holding the prompt's tail, the last decoded whole past gen_length (the canvas holds
    gen_length + block_length - 1 positions; the output keeps gen_length); attention block-causal by
    position, and the exact cache's window is the row's block."""

    title: ClassVar[str] = "LLaDA2's blocks"

    def check_model(self, cfg) -> None:
        if cfg.shifted_logits:
            raise DlmjaxError(f"method '{self.method}' reads each position's own prediction, but {cfg.family} predicts the "
                              "next token; use 'fast-dllm-v2', 'd2f' or 'fast-dllm'")

    def _check_lengths(self) -> None:
        gen, block = self.gen_length, self.block_length
        if gen <= 0 or block <= 0:
            raise DlmjaxError(f"gen_length and block_length must be positive, got {gen} and {block}")

    @property
    def canvas_length(self) -> int:
        """The generation region the decode carries: any row's blocks end within it."""
        return self.gen_length + self.block_length - 1

    @property
    def num_blocks(self) -> int:  # a row's blocks at most
        return -(-self.canvas_length // self.block_length)

    def init(self, masked, prompt_lengths) -> AlignedState:
        ones, zeros = jnp.ones_like(prompt_lengths, bool), jnp.zeros_like(prompt_lengths)
        return AlignedState(block=zeros, i=zeros, prompt_length=prompt_lengths, fresh=ones, cold=jnp.bool_(True), post=zeros,
                            idle=~ones)

    def running(self, st: AlignedState) -> jax.Array:
        return jnp.bool_(True)

    def settle(self, st: AlignedState, masked, done, rule) -> AlignedState:
        return st

    def _geometry(self, st: AlignedState):
        """Every canvas position's block [B, G'] counted from the row's first denoised block, the
        row's last block [B] (the one holding the answer's last position), and the end [B] of its
        current block (a generation index)."""
        bs = self.block_length
        position = st.prompt_length[:, None] + jnp.arange(self.canvas_length)[None, :]
        first = st.prompt_length // bs
        block = position // bs - first[:, None]
        last = (st.prompt_length + self.gen_length - 1) // bs - first
        hi = (first + st.block + 1) * bs - st.prompt_length
        return block, last, hi

    def mask(self, attention: str, positions, full_mask, prompt_length: int):
        return position_block_causal(positions, full_mask, self.block_length)

    def window_mask(self, attention: str, positions, full_mask, prompt_length: int, query_index):
        return _position_window_mask(positions, full_mask, query_index, self.block_length)

    def exact_window(self, st: AlignedState, masked, done, shifted: bool, prompt_length: int) -> Window:
        """The row's current block, with the block before it on the block's first forward (its K/V
        rewritten from its final tokens, once); the first forward feeds the whole canvas."""
        _, _, hi = self._geometry(st)
        k = self.block_length
        which = jnp.where(st.cold, 2, jnp.where(jnp.any(st.fresh & ~done), 1, 0)).astype(jnp.int32)
        return Window(end=hi, widths=(k, 2 * k, prompt_length + self.canvas_length), which=which)

    def _view(self, st, active, region, quota=None) -> View:
        return View(run=jnp.bool_(True), active=active, region=region & active[:, None], windows=1, force=None,
                    block=jnp.int32(0), i=jnp.int32(0), noise_start=0, noise_length=self.canvas_length, quota=quota)

    def _keep(self, x_gen, tokens):
        """The positions a finished row keeps: up to its first stop token, inside gen_length."""
        stopped, stop_at = first_stop(x_gen, tokens)
        g = jnp.arange(self.canvas_length)[None, :]
        return ~(x_gen == tokens.mask) & ~(stopped[:, None] & (g > stop_at[:, None])) & (g < self.gen_length)


@part
class Aligned(RowBlocks):
    """LLaDA2.0 (SPEC.md, LLaDA2): each block runs at most `steps` forwards (min(steps, gen_length //
    minimal_topk)), each committing at least the step's quota (block_length spread evenly over the
    steps), and ends once it has no mask. A row stops after a block that leaves a stop token with no
    mask before it, and, with eos_early_stop, at the step that commits one."""

    name: ClassVar[str] = "aligned"
    method: ClassVar[str] = "llada2"
    gen_length: int = gen_length_field()
    block_length: int = block_length_field(32)
    steps: int = static(32, "LLaDA2: forward passes per block at most (each commits at least block_length / steps tokens)")
    minimal_topk: int = static(1, "LLaDA2: caps steps per block at gen_length // minimal_topk (upstream's rule)")
    eos_early_stop: bool = static(False, "LLaDA2: stop a row at the step that commits a stop token with no mask before it "
                                  "(2.1: at the end of a block that holds one)")

    def check(self) -> None:
        self._check_lengths()
        if self.steps <= 0 or self.minimal_topk <= 0:
            raise DlmjaxError(f"steps and minimal_topk must be positive, got {self.steps} and {self.minimal_topk}")
        if self.gen_length // self.minimal_topk == 0:
            raise DlmjaxError(f"minimal_topk {self.minimal_topk} exceeds gen_length {self.gen_length}, which leaves no step; "
                              "lower it")

    @property
    def steps_per_block(self) -> int:
        return min(self.steps, self.gen_length // self.minimal_topk)

    @property
    def max_steps(self) -> int:  # every block: its steps, one commit a step at least
        return self.num_blocks * min(self.steps_per_block, self.block_length)

    def begin(self, st: AlignedState, masked, done, rule, refresh_commits_one: bool):
        block, _, _ = self._geometry(st)
        region = block == st.block[:, None]
        active = ~done & jnp.any(masked & region, axis=-1)
        spb = self.steps_per_block
        quota = self.block_length // spb + (st.i < self.block_length % spb).astype(jnp.int32)
        return st, self._view(st, active, region, quota)

    def after(self, st: AlignedState, before, x_gen, tokens, commit=None):
        """Move rows whose block has no mask left to their next block; the rows that are finished
        (past their last block, or stopped by a stop token) and the positions they keep."""
        block, last, _ = self._geometry(st)
        masked = x_gen == tokens.mask
        complete = ~jnp.any(masked & (block == st.block[:, None]), axis=-1)
        stopped, _ = first_stop(x_gen, tokens)
        # after a block, a stop token with no mask before it (all earlier blocks are complete); with
        # eos_early_stop also at the step that commits one (upstream looks at the whole window, SPEC.md)
        ends = stopped & complete
        if self.eos_early_stop and tokens.stops:
            committed = before & ~masked & jnp.isin(x_gen, jnp.asarray(tokens.stops, x_gen.dtype))
            ends = ends | (stopped & jnp.any(committed, axis=-1))
        finished = ends | (complete & (st.block >= last))
        st = dataclasses.replace(st, block=jnp.where(complete, st.block + 1, st.block), i=jnp.where(complete, 0, st.i + 1),
                                 fresh=complete, cold=jnp.bool_(False))
        return st, finished, self._keep(x_gen, tokens)


@part
class Editing(RowBlocks):
    """LLaDA2.1's token editing (SPEC.md, LLaDA2.1): a block's steps commit masks (the rule's
    mask-to-token part) and rewrite its decoded tokens (token-to-token); once the block has no
    mask, up to max_post_steps more forwards edit it, and the block ends at the first that edits
    nothing. With eos_early_stop a row stops after a block that leaves a stop token."""

    name: ClassVar[str] = "editing"
    method: ClassVar[str] = "llada2.1"
    edits: ClassVar[bool] = True
    gen_length: int = gen_length_field()
    block_length: int = block_length_field(32)
    max_post_steps: int = static(16, "LLaDA2.1: forwards that may still edit a block once it has no mask")
    eos_early_stop: bool = static(False, "LLaDA2: stop a row at the step that commits a stop token with no mask before it "
                                  "(2.1: at the end of a block that holds one)")

    def check(self) -> None:
        self._check_lengths()
        if self.max_post_steps < 0:
            raise DlmjaxError(f"max_post_steps {self.max_post_steps} is negative; use 0 or more (LLaDA2.1: 16)")

    @property
    def max_steps(self) -> int:  # every block: a mask a step at least, then its post steps
        return self.num_blocks * (self.block_length + self.max_post_steps)

    def begin(self, st: AlignedState, masked, done, rule, refresh_commits_one: bool):
        block, _, _ = self._geometry(st)
        region = block == st.block[:, None]
        idle = ~jnp.any(masked & region, axis=-1)
        st = dataclasses.replace(st, post=st.post + idle.astype(jnp.int32), idle=idle)
        return st, self._view(st, ~done, region)

    def after(self, st: AlignedState, before, x_gen, tokens, commit=None):
        """End the blocks that began the step free of masks and were not edited, and those whose
        next step would begin past max_post_steps (upstream ends them at that check, without its
        forward); the rows that are finished and the positions they keep."""
        block, last, _ = self._geometry(st)
        in_block = block == st.block[:, None]
        edited = jnp.any(commit & ~before & in_block, axis=-1)
        free = ~jnp.any((x_gen == tokens.mask) & in_block, axis=-1)
        ends = (st.idle & ~edited) | (free & (st.post + 1 > self.max_post_steps))
        stopped, _ = first_stop(x_gen, tokens)
        finished = ends & (st.block >= last)
        if self.eos_early_stop and tokens.stops:
            finished = finished | (ends & stopped)  # the block and every one before it are free of masks
        st = dataclasses.replace(st, block=jnp.where(ends, st.block + 1, st.block), post=jnp.where(ends, 0, st.post),
                                 fresh=ends, cold=jnp.bool_(False))
        return st, finished, self._keep(x_gen, tokens)


SCHEDULES: dict[str, type[Schedule]] = {cls.name: cls for cls in (SemiAR, Hierarchy, Pipeline, Aligned, Editing)}
