"""Eager PyTorch baseline of LLaDA2.x (`llada2_moe`) and its two official decoders: the PyTorch side that
experiments/bench_decode.py times dlmjax's `llada2` / `llada2.1` against. Written as upstream's HF remote code
runs in eager PyTorch (spec /work/shared/reference/llada2.md, "§N"):

* `LLaDA2Torch` (§1-3): module tree = HF checkpoint names ([out, in]), loaded with load_state_dict(strict, assign).
  RMSNorm in float32 (weight applied after the cast back), fused query_key_value split [Q | K | V] heads, per-head
  q/k RMSNorm, partial NeoX RoPE on the first int(hd * partial_rotary_factor) channels, GQA by repeat_interleave,
  SDPA with a boolean mask (None = bidirectional, never causal), SwiGLU MLP for layers < first_k_dense_replace,
  else MoE: float32 sigmoid router, expert_bias-biased group-limited top-k (group score = sum of its top-2),
  unbiased weights / (sum + 1e-20) when k > 1, times routed_scaling_factor; experts run over their tokens in a
  loop over the experts that have some (moe_infer style, index_add of float32 weighted outputs) + shared expert.
  Top-k ties: torch.topk, whose tie order is unspecified (the NumPy references pick the lower index).
* `generate_llada2` (§6) / `generate_llada21` (§7.2): upstream's Python loops, batch size 1, no KV cache (the
  window x[:, :(b+1)B] is recomputed every step, as the HF generate does), greedy (x0 = argmax, conf = float32
  softmax at x0, mask-token logit -inf first), strict block-causal mask aligned to position 0 for both (Q2
  fixed), Q3 fixed, output x[P:P+gen_length] cut after the first EOS and filled with EOS: the conventions of
  tests/decode_reference_llada2.py, except top-k ties.
"""
from __future__ import annotations

import glob
import json
import os

import torch
import torch.nn.functional as F
from torch import nn


def synchronize(device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; a timer must not stop before it ends)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):  # M20:86-100
        dtype, x = x.dtype, x.float()
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)


class MLP(nn.Module):
    def __init__(self, d, width):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, width, bias=False), nn.Linear(d, width, bias=False)
        self.down_proj = nn.Linear(width, d, bias=False)

    def forward(self, x):  # SwiGLU, no biases
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        D, E, Im = cfg["hidden_size"], cfg["num_experts"], cfg["moe_intermediate_size"]
        self.k, self.groups, self.top_groups = cfg["num_experts_per_tok"], cfg["n_group"], cfg["topk_group"]
        self.scale = cfg["routed_scaling_factor"]
        self.gate = nn.Module()
        self.gate.weight = nn.Parameter(torch.empty(E, D))
        self.gate.register_buffer("expert_bias", torch.zeros(E))  # persistent: a checkpoint tensor
        self.experts = nn.ModuleList(MLP(D, Im) for _ in range(E))
        S = cfg.get("num_shared_experts") or 0
        self.shared_experts = MLP(D, Im * S) if S else None

    def route(self, h):
        """h [N, D] -> (expert ids [N, k], weights [N, k] float32). Ties: torch.topk (order unspecified)."""
        N, E = h.shape[0], self.gate.weight.shape[0]
        s = torch.sigmoid(F.linear(h.float(), self.gate.weight.float()))  # float32 router, unbiased scores
        sb = s + self.gate.expert_bias.float()                             # biased: selection only
        gscore = sb.view(N, self.groups, -1).topk(2, dim=-1).values.sum(-1)  # group = sum of its top-2
        keep = torch.zeros_like(gscore, dtype=torch.bool)
        keep.scatter_(1, gscore.topk(self.top_groups, dim=-1).indices, True)
        sb = sb.masked_fill(~keep.repeat_interleave(E // self.groups, dim=1), float("-inf"))
        idx = sb.topk(self.k, dim=-1).indices
        w = s.gather(1, idx)
        if self.k > 1:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return idx, w * self.scale

    def forward(self, x):
        shape, h = x.shape, x.reshape(-1, x.shape[-1])
        idx, w = self.route(h)
        flat = idx.flatten()
        order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert
        tok, w_sorted = order // self.k, w.flatten()[order]
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()  # one host sync (moe_infer's .cpu())
        out = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
        start = 0
        for e, n in enumerate(counts):
            if n:
                t = tok[start:start + n]
                out.index_add_(0, t, self.experts[e](h[t]).float() * w_sorted[start:start + n, None])
                start += n
        out = out.to(x.dtype)  # weighted sum in the float32 weight dtype, cast back (M20:344-371)
        if self.shared_experts is not None:
            out = out + self.shared_experts(h)  # unweighted, always on
        return out.view(shape)


def _rope(x, cos, sin):
    """Partial NeoX RoPE: rotate channels [0, rd) (pairs j, j + rd/2), pass [rd, hd) through."""
    rd = cos.shape[-1]
    xr, xp = x[..., :rd], x[..., rd:]
    x1, x2 = xr.chunk(2, dim=-1)
    return torch.cat((xr * cos + torch.cat((-x2, x1), dim=-1) * sin, xp), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        D, self.H, self.Hkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
        self.hd = cfg.get("head_dim") or D // self.H
        self.query_key_value = nn.Linear(D, (self.H + 2 * self.Hkv) * self.hd, bias=False)
        self.dense = nn.Linear(self.H * self.hd, D, bias=False)
        self.qk_norm = cfg.get("use_qk_norm", True)
        if self.qk_norm:
            self.query_layernorm = RMSNorm(self.hd, cfg["rms_norm_eps"])
            self.key_layernorm = RMSNorm(self.hd, cfg["rms_norm_eps"])

    def forward(self, x, cos, sin, mask):
        B, L, _ = x.shape
        qkv = self.query_key_value(x).view(B, L, self.H + 2 * self.Hkv, self.hd)
        q, k, v = (t.transpose(1, 2) for t in qkv.split([self.H, self.Hkv, self.Hkv], dim=2))
        if self.qk_norm:
            q, k = self.query_layernorm(q), self.key_layernorm(k)
        if cos is not None:
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        rep = self.H // self.Hkv  # GQA: kv head j serves q heads j*rep .. j*rep+rep-1
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.hd ** -0.5)
        return self.dense(a.transpose(1, 2).reshape(B, L, self.H * self.hd))


class Layer(nn.Module):
    def __init__(self, cfg, i):
        super().__init__()
        D, eps = cfg["hidden_size"], cfg["rms_norm_eps"]
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(D, eps), RMSNorm(D, eps)
        self.attention = Attention(cfg)
        self.mlp = MLP(D, cfg["intermediate_size"]) if i < cfg["first_k_dense_replace"] else MoE(cfg)

    def forward(self, x, cos, sin, mask):
        x = x + self.attention(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LLaDA2Torch(nn.Module):
    """LLaDA2MoeModelLM from an HF config dict and the checkpoint's tensors (name -> torch tensor,
    used as given: same dtype and device for all of them)."""

    def __init__(self, config: dict, weights: dict):
        super().__init__()
        for f in ("use_qkv_bias", "use_bias"):
            if config.get(f):
                raise NotImplementedError(f"{f}=true is not supported (the released models have no biases)")
        self.config = cfg = dict(config)
        with torch.device("meta"):  # no allocation / init: the checkpoint tensors are assigned below
            self.model = nn.Module()
            self.model.word_embeddings = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
            self.model.layers = nn.ModuleList(Layer(cfg, i) for i in range(cfg["num_hidden_layers"]))
            self.model.norm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
            self.lm_head = nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)
        weights = dict(weights)
        if cfg.get("tie_word_embeddings") and "lm_head.weight" not in weights:
            weights["lm_head.weight"] = weights["model.word_embeddings.weight"]
        self.load_state_dict(weights, strict=True, assign=True)
        self.requires_grad_(False).eval()
        hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        self.rd = int(hd * cfg.get("partial_rotary_factor", 1.0))  # rotary_dim in the config is ignored (Q11)

    @classmethod
    def from_pretrained(cls, directory, dtype=torch.float32, device="cpu"):
        from safetensors.torch import load_file
        with open(os.path.join(directory, "config.json")) as f:
            config = json.load(f)
        weights = {}
        for path in sorted(glob.glob(os.path.join(directory, "model*.safetensors"))):
            for k, v in load_file(path).items():
                weights[k] = v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
        return cls(config, weights)

    @property
    def device(self):
        return self.lm_head.weight.device

    def forward(self, ids, positions=None, allowed=None):
        """ids [B, L] long, positions [B, L] long (default arange(L)), allowed [B, L, L] bool
        (allowed[b, q, k]: query q may attend key k; None = bidirectional) -> logits [B, L, V] float32."""
        B, L = ids.shape
        x = self.model.word_embeddings(ids)
        if positions is None:
            positions = torch.arange(L, device=ids.device).expand(B, L)
        cos = sin = None
        if self.rd:
            expo = torch.arange(0, self.rd, 2, device=ids.device).float() / self.rd
            freqs = positions[..., None].float() * (1.0 / float(self.config["rope_theta"]) ** expo)  # float32
            emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, L, rd], cast to the model dtype below
            cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        mask = None if allowed is None else allowed[:, None].to(torch.bool)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask)
        return self.lm_head(self.model.norm(x)).float()


# ------------------------------------------------------------------------------------------------ decoders
def _canvas(model, prompt, gen_length, B, mask_id, eos_id):
    if prompt.dim() != 2 or prompt.shape[0] != 1:
        raise ValueError("batch size 1 only (upstream's generate indexes [0], Q12)")
    if gen_length < 1 or B < 1 or mask_id == eos_id:
        raise ValueError("need gen_length >= 1, block_length >= 1, mask_id != eos_id")
    P = prompt.shape[1]
    nb = -(-(P + gen_length) // B)  # canvas rounded up to whole blocks, aligned to position 0 (§5)
    x = torch.full((1, nb * B), mask_id, dtype=torch.long, device=model.device)
    x[:, :P] = prompt.to(model.device)
    return x, P, nb


def _window(model, b, B):
    """Positions and strict block-causal mask of the window x[:, :(b+1)B] (built once per block)."""
    pos = torch.arange((b + 1) * B, device=model.device)
    return (b + 1) * B, pos[None], (pos[None, :] // B <= pos[:, None] // B)[None]


def _greedy(model, x, W, pos, allowed, B, mask_id):
    """One NFE on the window; x0 = argmax, conf = softmax[x0] (float32) of its last B rows, mask at -inf."""
    logits = model(x[:, :W], pos, allowed)[0, -B:]
    logits[:, mask_id] = float("-inf")
    x0 = logits.argmax(-1)
    return x0, torch.softmax(logits, dim=-1).gather(-1, x0[:, None])[:, 0]


def _tokens(x, P, gen_length, eos_id):
    t = x[0, P:P + gen_length].clone()
    hit = (t == eos_id).nonzero()
    if len(hit):
        t[int(hit[0, 0]) + 1:] = eos_id
    return t[None].cpu()


@torch.no_grad()
def generate_llada2(model, prompt, *, gen_length, block_length=32, steps=32, threshold=0.95, minimal_topk=1,
                    eos_early_stop=False, mask_id, eos_id):
    """LLaDA2.0 generate (§6, M20:1262-1433), greedy. prompt [1, P] -> (tokens [1, gen_length] cpu, nfe)."""
    B = block_length
    x, P, nb = _canvas(model, prompt, gen_length, B, mask_id, eos_id)
    steps = min(steps, gen_length // minimal_topk)  # steps per block
    if steps < 1:
        raise ValueError("steps = min(steps, gen_length // minimal_topk) must be >= 1")
    quota = [B // steps + (s < B % steps) for s in range(steps)]  # from block_length (Q7)
    nfe = 0
    for b in range(P // B, nb):
        W, pos, allowed = _window(model, b, B)
        stop = False
        for s in range(steps):
            active = x[0, W - B:W] == mask_id
            n_active = int(active.sum())
            if n_active == 0:
                break  # no forward spent
            x0, conf = _greedy(model, x, W, pos, allowed, B, mask_id)
            nfe += 1
            conf = torch.where(active, conf, float("-inf"))
            sel = conf > threshold  # strict
            if int(sel.sum()) < quota[s]:
                sel = torch.zeros_like(active)
                sel[torch.topk(conf, min(quota[s], n_active)).indices] = True  # tie order unspecified
            x[0, W - B:W] = torch.where(sel, x0, x[0, W - B:W])
            if eos_early_stop and bool((x0[sel] == eos_id).any()):  # Q3 fixed: generated part only
                gen = x[0, P:W]
                e = (gen == eos_id).nonzero()
                if stop := len(e) > 0 and not bool((gen[:int(e[0, 0])] == mask_id).any()):
                    break
        if stop or bool((x[0, P:W] == eos_id).any()):  # Q4: always stop after a block holding an EOS
            break
    return _tokens(x, P, gen_length, eos_id), nfe


@torch.no_grad()
def generate_llada21(model, prompt, *, gen_length, block_length=32, threshold=0.7, editing_threshold=0.5,
                     max_post_steps=16, num_to_transfer=1, eos_early_stop=False, mask_id, eos_id):
    """LLaDA2.1 generate with token editing (§7.2, M21:1335-1421), greedy, strict block-causal mask.
    -> (tokens [1, gen_length] cpu, nfe, edits = total token-to-token rewrites, Q6 overflow included)."""
    if num_to_transfer < 1:
        raise ValueError("num_to_transfer must be >= 1")
    B = block_length
    x, P, nb = _canvas(model, prompt, gen_length, B, mask_id, eos_id)
    nfe = edits = 0
    for b in range(P // B, nb):
        W, pos, allowed = _window(model, b, B)
        prompt_in_block = torch.arange(W - B, W, device=x.device) < P  # prompt tail: never edited
        post = 0
        while True:
            old = x[0, W - B:W].clone()  # taken before this step's commit
            active = old == mask_id
            n_active = int(active.sum())
            if n_active == 0:
                post += 1
            if post > max_post_steps:  # checked before the forward
                break
            x0, conf = _greedy(model, x, W, pos, allowed, B, mask_id)
            nfe += 1
            m2t = active & (conf > threshold)  # all False when there is no mask
            if n_active and int(m2t.sum()) < num_to_transfer:
                m2t = torch.zeros_like(active)
                m2t[torch.topk(torch.where(active, conf, float("-inf")), min(num_to_transfer, n_active)).indices] = True
            t2t = ~active & ~prompt_in_block & (conf > editing_threshold) & (x0 != old)
            n_t2t = int(t2t.sum())
            x[0, W - B:W] = torch.where(m2t | t2t, x0, old)
            edits += n_t2t
            if n_active == 0 and n_t2t == 0:  # the step that fills the last masks never ends the block
                break
        gen = x[0, P:W]
        if eos_early_stop and not bool((gen == mask_id).any()) and bool((gen == eos_id).any()):
            break
    return _tokens(x, P, gen_length, eos_id), nfe, edits


if __name__ == "__main__":  # quick self-check against the NumPy references in tests/ (tiny model, CPU)
    import sys
    import tempfile

    import numpy as np
    from safetensors.torch import save_file

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    import decode_reference_llada2 as dref
    import llada2_reference as ref

    torch.set_num_threads(1)  # tiny model: more threads only contend
    cfg, L = ref.tiny_config(), 13
    Wnp = ref.random_weights(cfg, seed=1)
    model = LLaDA2Torch(cfg, {k: torch.from_numpy(v) for k, v in Wnp.items()})
    ids = np.random.default_rng(0).integers(0, cfg["vocab_size"], (2, L))
    tens = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    for name, m, pos in (("bidirectional", None, None),
                         ("block-causal B=4", np.broadcast_to(ref.block_causal_mask(L, 4), (2, L, L)), None),
                         ("block-causal B=3, positions 5..17",
                          np.broadcast_to(ref.block_causal_mask(L, 3, 5), (2, L, L)), np.arange(5, L + 5) + 0 * ids)):
        want, got = ref.forward(cfg, Wnp, ids, positions=pos, mask=m), model(tens(ids), tens(pos), tens(m))
        diff = float(np.abs(got.double().numpy() - want).max())
        print(f"forward {name}: max |diff| = {diff:.2e} (max |logit| {np.abs(want).max():.2f})")
        assert got.dtype == torch.float32 and diff < 1e-4
    with tempfile.TemporaryDirectory() as d:  # from_pretrained round trip
        json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
        save_file({k: torch.from_numpy(v) for k, v in Wnp.items()}, os.path.join(d, "model.safetensors"))
        assert torch.equal(LLaDA2Torch.from_pretrained(d)(tens(ids)), model(tens(ids)))
    # decoders: a sharper lm_head so that confidences cross the thresholds and edits happen
    dmodel = LLaDA2Torch(cfg, {k: torch.from_numpy(v * (60 if k == "lm_head.weight" else 1)) for k, v in Wnp.items()})
    fn = lambda x, p, a: dmodel(tens(x)[None], tens(p)[None], tens(a)[None])[0].double().numpy()  # noqa: E731
    MASK, runs = 63, 0
    g2, r2, g21, r21 = generate_llada2, dref.llada2_generate, generate_llada21, dref.llada21_generate
    # EOS = a token these weights generate, so the EOS paths (Q4 block stop, early stop, EOS fill) run
    for prompt, EOS in (([5, 17, 3, 40, 22], 35), ([9, 1, 30, 12, 7, 44, 2, 19, 25, 33, 11], 2)):
        common = dict(gen_length=14, mask_id=MASK, eos_id=EOS)
        for ours, theirs, kw in (
                (g2, r2, dict(block_length=4, steps=4, threshold=0.9)),
                (g2, r2, dict(block_length=4, steps=2, threshold=0.5)),
                (g2, r2, dict(block_length=8, steps=8, threshold=0.95, eos_early_stop=True)),
                (g21, r21, dict(block_length=4, editing_threshold=0.5, max_post_steps=3)),
                (g21, r21, dict(block_length=4, threshold=0.5, editing_threshold=0.0, max_post_steps=2,
                                eos_early_stop=True)),
                (g21, r21, dict(block_length=8, threshold=0.9, editing_threshold=0.3, max_post_steps=4,
                                num_to_transfer=2))):
            want = theirs(fn, prompt, **common, **kw)
            tok, nfe, *edits = ours(dmodel, torch.tensor([prompt]), **common, **kw)
            print(f"{ours.__name__} P={len(prompt)} {kw}: nfe {nfe} (ref {want['nfe']}) edits {edits} "
                  f"(ref {sum(want['edits'])}) tokens {tok[0].tolist()}")
            assert tok[0].tolist() == want["tokens"] and nfe == want["nfe"] and sum(edits) == sum(want["edits"])
            runs += 1
    print(f"torch_llada2 self-check OK ({runs} decoder runs match the NumPy references)")
