"""Streaming: the text each row has committed so far, while the decode runs on the device.

    for update in lm.stream(["Sort: 7 3 9 1"], method="fast-dllm", threshold=0.9, chat=True):
        print(update.deltas[0], end="", flush=True)
    out = update.output  # the last update carries lm.generate's GenerateOutput (same tokens)

The decode is the same single program as `lm.generate` (one `lax.while_loop` on the device) with
one addition: at the end of an iteration in which some row completed a block (`every="block"`:
a block of `block_length` positions with no mask left, or the row finished) or after every
iteration (`every="step"`), an `io_callback` hands the canvas, the trajectory, the NFE and the
done flags to the host. Nothing on the device waits for the host, so the tokens equal
`lm.generate`'s with the same arguments, and the cost is the transfers (experiments/bench_stream.py).
The program runs in a worker thread; the generator yields one `Update` per callback and a last
one (`final=True`) with the whole output.

What a row "has committed so far" is the contiguous run of committed positions from the start of
its canvas (a token after a still-masked position is not shown yet), cut after the first stop token.
An autoregressive model's "ar" decode streams too: a callback every AR_BLOCK (16) tokens with
every="block" (and when a row stops), every token with every="step". Under a mesh spanning
several processes streaming is refused (the callback would run on one process only): use
`lm.generate` there.
"""

from __future__ import annotations

import dataclasses
import itertools
import queue
import threading
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from dlmjax.errors import DlmjaxError

EVERY = ("block", "step")


@dataclasses.dataclass(frozen=True)
class Emit:
    """The static part of a streaming program: when to call back, and the hub that routes each
    call to its stream (the stream's id is a traced argument, so one compiled program serves every
    stream of a model)."""

    every: str
    hub: "Hub" = dataclasses.field(compare=False, hash=False)

    def __hash__(self):
        return hash((self.every, id(self.hub)))

    def __eq__(self, other):
        return isinstance(other, Emit) and self.every == other.every and self.hub is other.hub


class Hub:
    """Routes the device's callbacks to the host queues of the open streams (one per model)."""

    def __init__(self):
        self._queues: dict[int, queue.Queue] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def open(self) -> tuple[int, queue.Queue]:
        with self._lock:
            sid = next(self._ids) % (2**31 - 1)
            q: queue.Queue = queue.Queue()
            self._queues[sid] = q
            return sid, q

    def close(self, sid: int) -> None:
        with self._lock:
            self._queues.pop(sid, None)

    def deliver(self, sid, step, x_gen, trajectory, nfe, done) -> None:
        with self._lock:
            q = self._queues.get(int(sid))
        if q is not None:  # a stream closed early (the consumer stopped) drops the rest
            q.put((int(step), np.asarray(x_gen), np.asarray(trajectory), np.asarray(nfe), np.asarray(done)))


def completed_blocks(masked: jax.Array, block_length: int) -> jax.Array:
    """[B] blocks of `block_length` positions without a mask (the last block may be shorter)."""
    b, g = masked.shape
    nb = -(-g // block_length)
    padded = jnp.pad(masked, ((0, 0), (0, nb * block_length - g)))
    return jnp.sum(~jnp.any(padded.reshape(b, nb, block_length), axis=-1), axis=-1)


def send(emit: Emit, stream_id, block_length: int, masked_before, done_before, s, prompt_length: int, mask_id: int,
         gen_length: int) -> None:
    """In the loop body: call back to the host when `emit.every` says so (no result; the device
    does not wait on it). The host sees the first gen_length positions (the answer's)."""
    x_gen = s.x[:, prompt_length:prompt_length + gen_length]
    masked = x_gen == mask_id
    masked_before = masked_before[:, :gen_length]
    if emit.every == "step":
        now = jnp.bool_(True)
    else:
        grew = completed_blocks(masked, block_length) > completed_blocks(masked_before, block_length)
        now = jnp.any(grew | (s.done & ~done_before))

    def call():
        io_callback(emit.hub.deliver, None, stream_id, s.steps, x_gen, s.trajectory[:, :gen_length], s.nfe, s.done,
                                     ordered=False)

    jax.lax.cond(now, call, lambda: None)


def send_ar(emit: Emit, stream_id, s, done_before, block: int) -> None:
    """In an AR decode's loop body: call back every `block` tokens (or when a row stops), or every
    token; the tokens not produced yet read as -1 (the host's mask)."""
    g = s.tokens.shape[1]
    now = jnp.bool_(True) if emit.every == "step" else (s.step % block == 0) | jnp.any(s.done & ~done_before)
    position = jnp.arange(g)[None]
    x_gen = jnp.where(position < s.lengths[:, None], s.tokens, -1)
    trajectory = jnp.where(position < s.lengths[:, None], position + 1, 0).astype(jnp.int32)

    def call():
        io_callback(emit.hub.deliver, None, stream_id, s.step, x_gen, trajectory, s.lengths, s.done, ordered=False)

    jax.lax.cond(now, call, lambda: None)


@dataclasses.dataclass
class Update:
    """One streamed update of a batch.

    texts: per row, the text committed so far (None without a tokenizer); deltas: what each text
    gained since the row's previous update ("" if nothing; the whole text if the decoded prefix
    changed, which a multi-byte character split over tokens can do); tokens: per row, the
    committed ids so far (stop token included); step: the batch's forward passes so far; nfe [B];
    done [B]; canvas [B, gen_length]: the whole generation region, still-masked positions holding
    the mask id; trajectory [B, gen_length]: the pass that committed each position so far (0: not
    yet); final: the last update, whose `output` is lm.generate's `GenerateOutput`. With
    every="block", an update in which no row's text or done flag changed (a block of filler after
    the answer completed) is not yielded."""

    texts: list[str] | None
    deltas: list[str] | None
    tokens: list[list[int]]
    step: int
    nfe: np.ndarray
    done: np.ndarray
    canvas: np.ndarray | None = None
    trajectory: np.ndarray | None = None
    final: bool = False
    output: object = None


def committed_prefix(x_gen: np.ndarray, mask_id: int, stops: tuple[int, ...]) -> list[list[int]]:
    """Per row, the ids from the start of the canvas up to the first masked position, cut after
    the first stop token (kept)."""
    rows = []
    for row in np.asarray(x_gen):
        masked = np.flatnonzero(row == mask_id)
        row = row[: masked[0]] if masked.size else row
        if stops:
            hit = np.flatnonzero(np.isin(row, stops))
            if hit.size:
                row = row[: hit[0] + 1]
        rows.append([int(t) for t in row])
    return rows


def _hub(lm) -> Hub:
    hub = getattr(lm, "_stream_hub", None)
    if hub is None:
        hub = Hub()
        lm._stream_hub = hub
    return hub


def stream(lm, prompts_or_ids, attention_mask=None, *, every: str = "block", **kwargs) -> Iterator[Update]:
    """Decode like `lm.generate(prompts_or_ids, attention_mask, **kwargs)`, yielding an `Update`
    whenever a row completes a block (every="block") or after every forward pass (every="step"),
    and a last one with the whole output. Errors in the arguments are raised at the first
    `next()`, before anything compiles."""
    if every not in EVERY:
        raise DlmjaxError(f"every='{every}' is not a streaming cadence; use 'block' (as blocks finish) or 'step' (every forward pass)")
    if jax.process_count() > 1 and lm.mesh is not None:
        raise DlmjaxError("streaming runs on one process; under a multi-host mesh use lm.generate")
    from dlmjax.decode.api import decode_text, generate

    meta = _meta(lm, kwargs)  # a bad stop_token_ids raises here, before anything runs
    hub = _hub(lm)
    sid, q = hub.open()
    done_marker = object()
    result: dict = {}

    def work():
        try:
            result["out"] = generate(lm, prompts_or_ids, attention_mask, _emit=(Emit(every, hub), sid), **kwargs)
        except BaseException as e:  # handed to the consumer
            result["error"] = e
        finally:
            q.put(done_marker)

    worker = threading.Thread(target=work, name="dlmjax-stream", daemon=True)
    worker.start()
    previous: list[str] | None = None
    previous_tokens, previous_done = None, None
    last_step = -1
    try:
        while True:
            item = q.get()
            if item is done_marker:
                break
            step, x_gen, trajectory, nfe, done = item
            if step <= last_step:  # callbacks are unordered: an older one arriving late is skipped
                continue
            last_step = step
            tokens = committed_prefix(x_gen, meta["mask"], meta["stops"])
            texts = [decode_text(lm, row) for row in tokens] if meta["text"] else None
            if every == "block" and tokens == previous_tokens and np.array_equal(done, previous_done):
                continue  # a block of filler completed: nothing to show
            deltas = _deltas(previous, texts)
            previous, previous_tokens, previous_done = texts, tokens, done
            yield Update(texts=texts, deltas=deltas, tokens=tokens, step=step, nfe=nfe, done=done, canvas=x_gen,
                         trajectory=trajectory)
        worker.join()
        if "error" in result:
            raise result["error"]
        out = result["out"]
        tokens = [[int(t) for t in row[: int(n)]] for row, n in zip(out.tokens, out.lengths)]
        texts = out.texts
        yield Update(texts=texts, deltas=_deltas(previous, texts), tokens=tokens, step=out.steps, nfe=out.nfe,
                     done=np.ones(len(tokens), bool), canvas=out.tokens, trajectory=out.trajectory, final=True, output=out)
    finally:
        hub.close(sid)


def _meta(lm, kwargs) -> dict:
    from dlmjax.decode.api import resolve_stops

    mask = -1 if lm.config.is_autoregressive else lm.config.mask_token_id  # AR: tokens not produced yet read -1
    return dict(mask=mask, stops=resolve_stops(lm.config, kwargs.get("stop_token_ids")),
                text=lm.directory is not None and (lm.directory / "hf").is_dir())


def _deltas(previous: list[str] | None, texts: list[str] | None) -> list[str] | None:
    if texts is None:
        return None
    if previous is None:
        return list(texts)
    return [t[len(p):] if t.startswith(p) else t for p, t in zip(previous, texts)]
