"""Eager PyTorch decoders for the benchmarks (experiments/bench_decode.py, device_check.py): the PyTorch side.

Each method is written the way the official repositories write it: a Python loop over
blocks, an inner Python loop over denoising steps, ONE eager forward of the whole batch
per step, and the step's rule applied with torch ops on the host (LLaDA's per-row
`topk` loop included). The rules themselves follow dlmjax/decode/SPEC.md exactly, so
that at temperature 0 the tokens can be compared with dlmjax's:

- the logits of the generation region only, the mask token's column at -inf;
- x0 = argmax (first index on ties), confidence = softmax(logits)[x0] in float32
  (upstream LLaDA takes the softmax of the whole canvas in float64; SPEC.md uses float32);
- quota (LLaDA, SchED, Prophet): per block n masks spread over spb = steps / blocks steps,
  the quota best candidates by confidence (ties: lower position first), spb forwards per block;
- threshold (Fast-dLLM v1): candidates with confidence >= tau plus the best one;
- entropy (dParallel): candidates with entropy <= tau nats plus the lowest-entropy one;
- exits (SchED / Prophet): signal = mean over the whole generation region of top1 - top2 logit,
  progress = the row's forwards so far / steps; on exit every mask of the generation region
  takes x0 and the row is done. Checked before committing.

- cache="dual" (Fast-dLLM's dual cache, SPEC.md "Fast-dLLM KV caches"): a block's first step
  is a refresh (one forward of the whole canvas that keeps every layer's post-RoPE K/V), its
  later steps forward only the block's K tokens, whose fresh K/V overwrite their slots, against
  the cached K/V of every other slot (`DualCache`).

Temperature 0 only (greedy); no CFG, no EOS handling. Rows of a batch share each forward;
a row that is done (exited, or no masks left) is not active and its NFE stops growing.
Everything runs on the model's device (CPU or CUDA); the returned tokens and NFE are on the CPU.
"""

from __future__ import annotations

import math
import time

import torch

METHODS = {
    # name -> (rule, exit schedule)
    "llada": ("quota", None),
    "fast-dllm": ("threshold", None),
    "dparallel": ("entropy", None),
    "sched": ("quota", "exp"),
    "prophet": ("quota", "prophet"),
}


class TorchForward:
    """One bidirectional forward of the torch reference model, as tests/torch_reference.py's
    `reference_logits` calls it (absolute positions and an all-ones key mask unless given),
    on the model's device, returning a float32 torch tensor there instead of a numpy copy."""

    def __init__(self, model):
        self.model = model
        self.device = next(model.parameters()).device
        self._cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def __call__(self, x, attention_mask=None, position_ids=None) -> torch.Tensor:
        x = torch.as_tensor(x, dtype=torch.long).to(self.device)
        shape = tuple(x.shape)
        if shape not in self._cache:
            b, length = shape
            pos = torch.arange(length, dtype=torch.long, device=self.device).expand(b, length).contiguous()
            self._cache[shape] = (pos, torch.ones(b, length, dtype=torch.long, device=self.device))
        pos, mask = self._cache[shape]
        if attention_mask is not None:
            mask = torch.as_tensor(attention_mask, dtype=torch.long).to(self.device)
        if position_ids is not None:
            pos = torch.as_tensor(position_ids, dtype=torch.long).to(self.device)
        out = self.model(input_ids=x, position_ids=pos, attention_mask=mask, use_cache=False, is_causal=False)
        return out.logits.float()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; a timer must not stop before it ends)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class DualCache:
    """Fast-dLLM's dual cache on a transformers Llama / Qwen2 model, written out layer by layer
    with the model's own modules (transformers' caches append keys; this one overwrites a window
    of slots). No padding: every slot is a valid key.

    refresh(x [B, L]): the whole canvas; keeps every layer's post-RoPE K/V [B, Hkv, L, D].
    window(x [B, T], start): the tokens of slots [start, start + T); their fresh K/V overwrite
    those slots and the queries attend to all L slots. Both return float32 logits [B, T, V]."""

    def __init__(self, model):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        self.model = model
        self.device = next(model.parameters()).device
        self.rope = apply_rotary_pos_emb
        cfg = model.config
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []

    @torch.no_grad()
    def refresh(self, x: torch.Tensor) -> torch.Tensor:
        self.k, self.v = [], []
        return self._run(x, 0, refresh=True)

    @torch.no_grad()
    def window(self, x: torch.Tensor, start: int) -> torch.Tensor:
        return self._run(x, start, refresh=False)

    def _run(self, x: torch.Tensor, start: int, refresh: bool) -> torch.Tensor:
        inner = self.model.model
        b, t = x.shape
        pos = torch.arange(start, start + t, device=self.device).expand(b, t)
        h = inner.embed_tokens(x)
        cos, sin = inner.rotary_emb(h, pos)
        for i, layer in enumerate(inner.layers):
            attn = layer.self_attn
            a = layer.input_layernorm(h)
            q, k, v = (proj(a).view(b, t, -1, self.head_dim).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
            q, k = self.rope(q, k, cos, sin)
            if refresh:
                self.k.append(k)
                self.v.append(v)
            else:
                self.k[i][:, :, start:start + t] = k
                self.v[i][:, :, start:start + t] = v
            o = torch.nn.functional.scaled_dot_product_attention(q, self.k[i], self.v[i], enable_gqa=True)
            h = h + attn.o_proj(o.transpose(1, 2).reshape(b, t, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.model.lm_head(inner.norm(h)).float()


def get_num_transfer_tokens(block_mask: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's schedule: [B, steps] tokens to commit per step, remainder on the first steps."""
    n = block_mask.sum(dim=1, keepdim=True)
    base = n // steps
    remainder = n % steps
    out = base.expand(-1, steps).clone()
    out += (torch.arange(steps, device=n.device)[None, :] < remainder).long()
    return out


def exit_tau(schedule: str, progress: torch.Tensor, tau_high: float, tau_low: float, k: float) -> torch.Tensor:
    p = progress.clamp(0.0, 1.0)
    if schedule == "linear":
        return tau_high + (tau_low - tau_high) * p
    if schedule == "cosine":
        return tau_low + 0.5 * (tau_high - tau_low) * (1.0 + torch.cos(math.pi * p))
    if schedule == "exp":
        return tau_low + (tau_high - tau_low) * torch.exp(-k * p)
    if schedule == "prophet":
        return torch.where(p < 1.0 / 3.0, 7.5, torch.where(p < 2.0 / 3.0, 5.0, 2.5))
    raise ValueError(f"unknown exit schedule {schedule!r}")


def _canvas(forward: TorchForward, prompt, mask_id: int, gen_length: int):
    """The start of a timed decode: (canvas [B, P + G] on the model's device, the prompt and then
    `gen_length` masks; P; the start time)."""
    synchronize(forward.device)
    start = time.perf_counter()
    prompt = torch.as_tensor(prompt, dtype=torch.long).to(forward.device)
    b, p = prompt.shape
    x = torch.full((b, p + gen_length), mask_id, dtype=torch.long, device=forward.device)
    x[:, :p] = prompt
    return x, p, start


def _result(forward: TorchForward, x, p: int, nfe, forwards: int, start: float, fill: int | None = None,
            mask_id: int | None = None) -> dict:
    """The end of a timed decode: tokens [B, G] (masks left read as `fill`, when given), nfe [B],
    forwards and seconds, on the CPU."""
    if fill is not None:
        x[:, p:] = torch.where(x[:, p:] == mask_id, fill, x[:, p:])
    synchronize(forward.device)
    return dict(tokens=x[:, p:].cpu(), nfe=nfe.cpu(), forwards=forwards, seconds=time.perf_counter() - start)


@torch.no_grad()
def generate(
    forward: TorchForward,
    prompt: torch.Tensor,
    *,
    mask_id: int,
    method: str,
    gen_length: int = 128,
    block_length: int = 32,
    steps: int = 128,
    threshold: float | None = None,
    tau_high: float = 7.5,
    tau_low: float = 2.5,
    exit_k: float = 4.0,
    cache: str = "none",
) -> dict:
    """Decode `prompt` [B, P] (no padding) with `method`; returns tokens [B, G], nfe [B],
    forwards (batch forward passes) and seconds (wall time of the whole call)."""
    rule, schedule = METHODS[method]
    if rule in ("threshold", "entropy") and threshold is None:
        raise ValueError(f"method {method!r} needs threshold")
    if cache not in ("none", "dual"):
        raise ValueError(f"cache must be 'none' or 'dual', not {cache!r}")
    if cache == "dual" and schedule is not None:
        raise ValueError("the early exits read the whole generation region; run them with cache='none'")
    device = forward.device
    dual = DualCache(forward.model) if cache == "dual" else None
    g, k = gen_length, block_length
    nb = g // k
    assert g % k == 0 and steps % nb == 0
    spb = steps // nb
    x, p, start = _canvas(forward, prompt, mask_id, g)
    b = x.shape[0]
    nfe = torch.zeros(b, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    rows = torch.arange(b, device=device)
    gen_index = torch.arange(g, device=device)
    forwards = 0

    for num_block in range(nb):
        s, e = num_block * k, (num_block + 1) * k  # relative to the generation region
        block_mask = x[:, p + s:p + e] == mask_id
        num_transfer_tokens = get_num_transfer_tokens(block_mask, spb)
        i = 0
        while True:
            if rule == "quota":
                active = ~done & (i < spb)
            else:
                active = ~done & (x[:, p + s:p + e] == mask_id).any(dim=1)
            if not bool(active.any()):
                break

            # ONE forward of the whole batch; the logits of the window [lo, hi) of the generation region
            if dual is None or i == 0:
                lo, hi = 0, g
                logits = (forward(x) if dual is None else dual.refresh(x))[:, p:]
            else:
                lo, hi = s, e
                logits = dual.window(x[:, p + s:p + e], p + s)
            forwards += 1
            logits[..., mask_id] = -torch.inf
            x0 = torch.argmax(logits, dim=-1)
            probs = torch.softmax(logits, dim=-1)
            x0_p = torch.gather(probs, -1, x0[..., None])[..., 0]
            gen = x[:, p + lo:p + hi]
            mask_index = gen == mask_id
            in_block = (gen_index[lo:hi] >= s) & (gen_index[lo:hi] < e)
            candidates = mask_index & in_block[None, :] & active[:, None]
            confidence = torch.where(candidates, x0_p, -torch.inf)

            if rule == "quota":
                transfer_index = torch.zeros_like(candidates)
                for j in range(b):  # LLaDA's per-row topk (stable: ties go to the lower position)
                    n = int(num_transfer_tokens[j, i]) if bool(active[j]) else 0
                    if n > 0:
                        order = torch.sort(confidence[j], descending=True, stable=True).indices[:n]
                        transfer_index[j, order] = True
            else:
                if rule == "threshold":
                    transfer_index = candidates & (x0_p >= threshold)
                    score = confidence
                else:  # entropy (dParallel)
                    entropy = torch.special.entr(probs).sum(dim=-1)
                    transfer_index = candidates & (entropy <= threshold)
                    score = torch.where(candidates, -entropy, -torch.inf)
                best = torch.argmax(score, dim=-1)
                transfer_index[rows, best] |= candidates[rows, best]

            if schedule is not None:  # SchED / Prophet, checked before the commit takes effect
                top2 = torch.topk(logits, 2, dim=-1).values
                signal = (top2[..., 0] - top2[..., 1]).mean(dim=-1)
                tau = exit_tau(schedule, nfe.float() / steps, tau_high, tau_low, exit_k)
                exited = active & (signal >= tau)
                transfer_index = torch.where(exited[:, None], mask_index, transfer_index)
                done |= exited

            nfe += active.long()
            x[:, p + lo:p + hi] = torch.where(transfer_index, x0, gen)
            done |= ~(x[:, p:] == mask_id).any(dim=1)
            i += 1

    return _result(forward, x, p, nfe, forwards, start)


@torch.no_grad()
def masked_forward(forward: TorchForward, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """One eager forward of the canvas x [B, L] under the [L, L] boolean mask `allowed` (True = the
    query may see the key; positions 0 .. L-1), as float32 logits [B, L, V]."""
    model = forward.model
    dtype = next(model.parameters()).dtype
    b, length = x.shape
    additive = torch.zeros((1, 1, length, length), dtype=dtype, device=forward.device).masked_fill(
        ~allowed.to(forward.device), torch.finfo(dtype).min).expand(b, 1, length, length)
    pos = torch.arange(length, dtype=torch.long, device=forward.device).expand(b, length)
    out = model(input_ids=x, position_ids=pos, attention_mask=additive, use_cache=False, is_causal=False)
    return out.logits.float()


def _fallback_rank(probs: torch.Tensor, alg: str) -> torch.Tensor:
    if alg == "maskgit_plus":
        return probs.max(dim=-1).values
    if alg == "topk_margin":
        top = torch.topk(probs, 2, dim=-1).values
        return top[..., 0] - top[..., 1]
    return (probs * torch.log(probs + 1e-10)).sum(dim=-1)


@torch.no_grad()
def generate_d2f(forward: TorchForward, prompt: torch.Tensor, *, mask_id: int, stops: tuple[int, ...], shifted: bool,
                 gen_length: int, block_length: int, tau_add: float, tau_act: float, tau_conf: float,
                 alg: str = "maskgit_plus") -> dict:
    """D2F's pipelined decoding (dlmjax/decode/SPEC.md, D2F) the way the official loop runs it:
    Python block records per row, ONE eager forward of the whole batch's canvas per iteration under
    the D2F block mask (the official KV cache is exact, so a full forward gives its logits), every
    active block decoded in turn with torch ops. Prompts [B, P] without padding; temperature 0.
    Returns tokens [B, G] (blocks never added read as the first stop id), nfe [B], forwards, seconds."""
    device = forward.device
    g, k = gen_length, block_length
    nb = g // k
    x, p, start = _canvas(forward, prompt, mask_id, g)
    b = x.shape[0]
    index = torch.arange(p + g, device=device)
    block_of = torch.where(index < p, 0, 1 + (index - p) // k)
    allowed = block_of[None, :] <= block_of[:, None]
    stop_ids = torch.as_tensor(stops or (-1,), device=device)
    added = [0] * b
    complete = [[False] * nb for _ in range(b)]
    stopped = [False] * b
    done = [False] * b
    nfe = torch.zeros(b, dtype=torch.long)
    forwards = 0

    def decoded(r, j):  # fraction of row r's generated block j (0-based) that is decoded
        return 1.0 - float((x[r, p + j * k:p + (j + 1) * k] == mask_id).sum()) / k

    while True:
        for r in range(b):
            if done[r]:
                continue
            newest = 1.0 if added[r] == 0 else decoded(r, added[r] - 1)
            if added[r] < nb and not stopped[r] and newest >= tau_add:
                added[r] += 1
            for j in range(added[r]):
                before = 1.0 if j == 0 else decoded(r, j - 1)
                if before >= tau_act:
                    complete[r][j] = True
        active = [r for r in range(b) if not done[r]]
        if not active:
            break
        logits = masked_forward(forward, x, allowed)
        if shifted:
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        logits[..., mask_id] = -torch.inf
        forwards += 1
        for r in active:
            nfe[r] += 1
            for j in range(added[r]):
                lo, hi = p + j * k, p + (j + 1) * k
                locs = (x[r, lo:hi] == mask_id).nonzero()[:, 0] + lo
                if len(locs) == 0:
                    continue
                probs = torch.softmax(logits[r, locs], dim=-1)
                conf, x0 = probs.max(dim=-1)
                chosen = conf > tau_conf
                if complete[r][j] and not bool(chosen.any()):
                    chosen[torch.argmax(_fallback_rank(probs, alg))] = True
                x[r, locs[chosen]] = x0[chosen]
                if bool(torch.isin(x0[chosen], stop_ids).any()):
                    stopped[r] = True
            left = bool((x[r, p:p + added[r] * k] == mask_id).any())
            if not left and (added[r] == nb or stopped[r]):
                done[r] = True
    return _result(forward, x, p, nfe, forwards, start, fill=stops[0] if stops else mask_id, mask_id=mask_id)


@torch.no_grad()
def generate_fdv2(forward: TorchForward, prompt: torch.Tensor, *, mask_id: int, stops: tuple[int, ...], gen_length: int,
                  block_length: int = 32, sub_block_length: int = 8, threshold: float = 0.9) -> dict:
    """Fast-dLLM v2's hierarchical decoding (dlmjax/decode/SPEC.md, Fast-dLLM v2) the way the hub's
    `generate` runs it, on a batch of equal-length prompts [B, P]: a prefill of the prompt's whole
    blocks, then per block its sub-blocks left to right, ONE eager forward of the canvas per step
    under the block-causal mask (the official block cache is exact, so a full forward gives its
    logits), confidence > threshold plus the best, and one more forward per finished block whose
    prediction after the block is the next block's first token. A row stops once a stop id has no
    mask before it. Temperature 0. Returns tokens [B, G] (the rest of a stopped row reads as the
    first stop id), nfe [B], forwards, seconds."""
    device = forward.device
    g, bs, sbs = gen_length, block_length, sub_block_length
    x, p, start = _canvas(forward, prompt, mask_id, g)
    b, length = x.shape
    index = torch.arange(length, device=device)
    allowed = (index[None, :] // bs) <= (index[:, None] // bs)
    stop_ids = torch.as_tensor(stops or (-1,), device=device)
    nfe = torch.zeros(b, dtype=torch.long)
    done = torch.zeros(b, dtype=torch.bool)
    forwards = 0

    def predict():
        nonlocal forwards
        forwards += 1
        logits = masked_forward(forward, x, allowed)
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)  # position q reads the output at q - 1
        logits[..., mask_id] = -torch.inf
        return logits

    def check_stops():
        gen = x[:, p:].cpu()
        is_stop = torch.isin(gen, stop_ids.cpu())
        first = torch.argmax(is_stop.long(), dim=1)
        for r in range(b):
            if not done[r] and bool(is_stop[r].any()) and not bool((gen[r, :first[r]] == mask_id).any()):
                done[r] = True
                x[r, p + first[r] + 1:] = stops[0]

    c = p // bs
    if p >= bs:  # the prefill (upstream: p > bs; SPEC.md)
        logits = predict()
        nfe += 1
        if p % bs == 0:
            x[:, p] = torch.argmax(logits[:, p], dim=-1)
            check_stops()
    for j in range(g // bs):
        block_lo, hi = (c + j) * bs, (c + j + 1) * bs
        for s in range(bs // sbs):
            a, e = max(block_lo + s * sbs, p), block_lo + (s + 1) * sbs
            if a >= e:
                continue
            while True:
                active = ~done & (x[:, a:e] == mask_id).any(dim=1).cpu()
                if not bool(active.any()):
                    break
                logits = predict()
                nfe += active.long()
                for r in active.nonzero()[:, 0].tolist():
                    probs = torch.softmax(logits[r, a:e], dim=-1)
                    conf, x1 = probs.max(dim=-1)
                    masked = x[r, a:e] == mask_id
                    conf = torch.where(masked, conf, -torch.inf)
                    commit = conf > threshold
                    commit[torch.argmax(conf)] = True
                    commit &= masked
                    x[r, a:e] = torch.where(commit, x1, x[r, a:e])
                check_stops()
        if hi - p >= g or bool(done.all()):  # the next block's first token would not fit (SPEC.md)
            break
        logits = predict()
        live = ~done
        nfe += live.long()
        x[:, hi] = torch.where(live.to(device), torch.argmax(logits[:, hi], dim=-1), x[:, hi])
        check_stops()
    return _result(forward, x, p, nfe, forwards, start, fill=stops[0] if stops else mask_id, mask_id=mask_id)
