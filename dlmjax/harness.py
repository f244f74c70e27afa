"""dlmjax as an lm-evaluation-harness model ("dlmjax").

    pip install lm-eval
    dlmjax-lm-eval --model dlmjax --model_args model=tiny-llada,method=fast-dllm,gen_length=32,block_length=16 \\
        --tasks gsm8k --apply_chat_template --batch_size 16

`dlmjax-lm-eval` (also `python -m dlmjax.harness`) is lm-eval's own command line (`lm_eval`, same
flags and subcommands) with this model registered first: lm-eval 0.4.13 finds models only in its
registry, with no plugin entry point, so the stock `lm_eval` command cannot see a third-party model.
From Python, `import dlmjax.harness` registers it for `lm_eval.simple_evaluate(model="dlmjax", ...)`.

model_args: `model` (embedded name, directory or hub id), `adapter`, `dtype`, any `lm.generate`
knob (`method`, `gen_length`, `block_length`, `steps`, `threshold`, `cache`, ...), and for the
likelihood: `mc_num` (default 128), `mc_batch_size` (default 16), `cfg_scale` (default 0), `seed`
(default 1234).

- generate_until: the contexts (chat-templated by lm-eval with --apply_chat_template) decoded in
  batches of `--batch_size` with the method and knobs, the answer cut at the task's `until`
  strings; the canvas is `gen_length` (as LLaDA's and Fast-dLLM's evaluation scripts do, not the
  task's max_gen_toks). Mean NFE and tokens/s are logged at the end.
- loglikelihood (multiple choice): LLaDA's Monte Carlo estimate (its `get_log_likelihood.py` /
  `eval_llada.py`): `mc_num` copies of prefix + continuation in rounds of `mc_batch_size`; per
  round k ~ U{1..L} and the masked counts round(linspace(k, k + (b-1) L / b, b)) wrapped into
  [1, L], masked at random positions of the continuation; the estimate is minus the mean over
  rows of sum CE / (count / L); with `cfg_scale` > 0 the logits are un + (cfg + 1)(cond - un),
  the unconditional row having the prompt masked. Requests are batched: `--batch_size` of them
  (shortest first) share each forward pass, batch_size x mc_batch_size rows; a request's noise
  comes from its own generator (seed, its index), so its estimate does not depend on the batch.
  is_greedy is LLaDA's too: the continuation
  decoded one token per step, the most confident first (`method="llada"`, one block), equal to it.
  Shifted models (Dream) read position i's logits at i - 1. Autoregressive models (qwen2) get the
  exact causal log-probability and greedy check, `--batch_size` requests a forward pass.
- loglikelihood_rolling is not supported (perplexity tasks): refused with a one-line error.
"""

import collections
import functools
import logging
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from dlmjax.errors import DlmjaxError

try:
    from lm_eval.api.model import LM as _HarnessLM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - the module is imported only with lm-eval installed
    raise DlmjaxError('dlmjax.harness needs lm-evaluation-harness: pip install lm-eval') from e

log = logging.getLogger(__name__)
LIKELIHOOD_ARGS = ("mc_num", "mc_batch_size", "cfg_scale", "seed")


def llada_noise(rng: np.random.Generator, seq_len: int, prompt_len: int, b: int, mask_id: int, seq: np.ndarray):
    """One round of LLaDA's `_forward_process`: b noisy copies of `seq` [L] and each row's masked
    fraction of the continuation [b]."""
    target = seq_len - prompt_len
    k = int(rng.integers(1, target + 1))
    x = np.round(np.linspace(float(k), k + (b - 1) * (target / b), b)).astype(np.int64)
    x = ((x - 1) % target) + 1
    is_mask = np.arange(target)[None, :] < x[:, None]
    for i in range(b):
        is_mask[i] = is_mask[i][rng.permutation(target)]
    is_mask = np.concatenate([np.zeros((b, prompt_len), bool), is_mask], axis=1)
    noisy = np.where(is_mask, mask_id, np.broadcast_to(seq, (b, seq_len)))
    return noisy, x / target


@functools.partial(jax.jit, static_argnames=("graphdef", "mask_id", "shifted", "guided"))
def _mc_rows(graphdef, state, seq, noisy, mask, p, prompt_len, cfg_scale, *, mask_id: int, shifted: bool, guided: bool):
    """Per row, sum over masked positions of CE / p (LLaDA's estimator), on the device; `prompt_len`
    is per row (rows of several requests share a batch)."""
    from dlmjax.lm import _forward_logits

    logits = _forward_logits(graphdef, state, noisy, mask, 0, "bidirectional", None)
    if guided:
        in_prompt = jnp.arange(noisy.shape[1])[None] < prompt_len[:, None]
        un_logits = _forward_logits(graphdef, state, jnp.where(in_prompt, mask_id, noisy), mask, 0, "bidirectional", None)
        logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
    if shifted:
        logits = jnp.concatenate([logits[:, :1], logits[:, :-1]], axis=1)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    ce = -jnp.take_along_axis(logp, seq[..., None], axis=-1)[..., 0]
    masked = (noisy == mask_id) & (mask > 0)
    return jnp.sum(jnp.where(masked, ce / p[:, None], 0.0), axis=1)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _ar_rows(graphdef, state, seq, mask, cont):
    """Per row, the causal log-probability of the continuation (cont marks its positions) and
    whether greedy decoding would produce it."""
    from dlmjax.lm import _forward_logits

    logits = _forward_logits(graphdef, state, seq, mask, 0, "causal", None)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    target = seq[:, 1:]
    lp = jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
    greedy = jnp.argmax(logp, axis=-1) == target
    c = cont[:, 1:]
    return jnp.sum(jnp.where(c, lp, 0.0), axis=1), jnp.all(greedy | ~c, axis=1)


def _bucket(n: int, unit: int = 32) -> int:
    return -(-n // unit) * unit


@register_model("dlmjax")
class DlmjaxLM(_HarnessLM):
    """lm-eval's LM interface over a dlmjax model (module docstring)."""

    def __init__(self, model: str = "tiny-llada", adapter: str | None = None, dtype: str | None = None, batch_size=1,
                 mc_num: int = 128, mc_batch_size: int = 16, cfg_scale: float = 0.0, seed: int = 1234, **knobs):
        super().__init__()
        import dlmjax
        from dlmjax.decode.api import build_method
        from dlmjax.generate import knob_flags

        for ignored in ("device", "max_batch_size", "trust_remote_code", "pretrained"):
            knobs.pop(ignored, None)
        known = set(knob_flags()) | {"method"}
        unknown = sorted(set(knobs) - known)
        if unknown:
            raise DlmjaxError(f"unknown model_args {', '.join(unknown)}; dlmjax takes model, adapter, dtype, "
                              f"{', '.join(LIKELIHOOD_ARGS)} and the decode knobs {', '.join(sorted(known))}")
        if mc_num < 1 or mc_batch_size < 1 or mc_num % mc_batch_size:
            raise DlmjaxError(f"mc_num {mc_num} must be a positive multiple of mc_batch_size {mc_batch_size} (LLaDA: 128 and 16)")
        self.lm = dlmjax.load(model, adapter=adapter, dtype=dtype)
        self.name = model
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 1
        self.mc_num, self.mc_batch_size, self.cfg_scale, self.seed = int(mc_num), int(mc_batch_size), float(cfg_scale), int(seed)
        self.knobs = {k: v for k, v in knobs.items() if v is not None}
        self.knobs.setdefault("gen_length", self.lm.default_gen_length)
        cfg = self.lm.config
        if not cfg.is_autoregressive:  # the knobs must make a method: one line now, not after loading the data
            method = self.knobs.get("method", "llada")
            build_method(method, **{k: v for k, v in self.knobs.items() if k != "method"}).check()
        self.stats = collections.Counter()

    # -- what lm-eval reads ---------------------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return self.name.replace("/", "__")

    def chat_template(self, chat_template=False) -> str:
        return getattr(self.lm.tokenizer, "chat_template", None) or ""

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        return self.lm.apply_chat_template(chat_history, tokenize=False)

    def _encode(self, text: str, special: bool = False) -> list[int]:
        return list(self.lm.tokenizer.encode(text, add_special_tokens=special))

    # -- generation -----------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from dlmjax.tokenizer import check_vocabulary

        from tqdm.auto import tqdm

        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="dlmjax generate_until", disable=disable_tqdm)
        groups: dict[str, list[int]] = collections.defaultdict(list)
        for i, r in enumerate(requests):
            groups[repr(sorted((r.args[1] or {}).items(), key=str))].append(i)
        for indices in groups.values():
            until = requests[indices[0]].args[1].get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            for start in range(0, len(indices), max(self.batch_size, 1)):
                chunk = indices[start : start + self.batch_size]
                contexts = [requests[i].args[0] for i in chunk]
                check_vocabulary(self.lm.tokenizer, contexts, None)
                ids = [self._encode(c) for c in contexts]
                result = self.lm.generate(ids, **self.knobs)
                self.stats.update(rows=len(chunk), nfe=int(np.sum(result.nfe)), tokens=int(np.sum(result.lengths)))
                self.stats["seconds"] += result.seconds
                for i, text in zip(chunk, result.texts or [""] * len(chunk)):
                    cut = min((text.find(u) for u in until if u and u in text), default=-1)
                    out[i] = text[:cut] if cut >= 0 else text
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
                bar.update(len(chunk))
        bar.close()
        if self.stats["rows"]:
            log.info("dlmjax: %d rows, mean NFE %.2f, %.1f tokens/s", self.stats["rows"], self.stats["nfe"] / self.stats["rows"],
                     self.stats["tokens"] / max(self.stats["seconds"], 1e-9))
        return out

    # -- likelihood -----------------------------------------------------------------------
    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's split: trailing spaces of the context move to the continuation; the
        continuation's ids are those of the whole string after the context's."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self._encode(context + continuation)
        ctx = self._encode(context)
        return ctx, whole[len(ctx):]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        from dlmjax.tokenizer import check_vocabulary

        check_vocabulary(self.lm.tokenizer, [r.args[0] + r.args[1] for r in requests], None)
        pairs = [self._pair(*r.args) for r in requests]
        for (ctx, cont), r in zip(pairs, requests):
            if not cont:
                raise DlmjaxError(f"the continuation {r.args[1]!r} encodes to no tokens; a likelihood needs at least one")
        from tqdm.auto import tqdm

        if self.lm.config.is_autoregressive:
            results = self._ar_likelihood(pairs)
        else:
            greedy = self._greedy(pairs)
            lls = [0.0] * len(pairs)
            bar = tqdm(total=len(pairs), desc="dlmjax loglikelihood", disable=disable_tqdm)
            for chunk in self._chunks(pairs):
                for i, ll in zip(chunk, self._mc_batch([(i, *pairs[i]) for i in chunk])):
                    lls[i] = ll
                bar.update(len(chunk))
            bar.close()
            results = list(zip(lls, greedy))
        for r, res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", r.args, res)
        return results

    def mc_likelihood(self, context_ids, continuation_ids, index: int = 0) -> float:
        """LLaDA's Monte Carlo log-likelihood of the continuation ids after the context ids."""
        return self._mc_batch([(index, list(context_ids), list(continuation_ids))])[0]

    def _chunks(self, pairs) -> list[list[int]]:
        """The requests' indices in batches of `batch_size`, shortest first (so a batch's width,
        its longest rounded up to 32, wastes little)."""
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
        step = max(self.batch_size, 1)
        return [order[k : k + step] for k in range(0, len(order), step)]

    def _mc_batch(self, items) -> list[float]:
        """LLaDA's estimate for each (index, ctx, cont) of `items`, all in one batch: each round runs
        mc_batch_size noisy copies of every item in one forward pass. An item's noise comes from its
        own generator (seed, index), so its estimate is the same in any batch or alone."""
        lm, cfg = self.lm, self.lm.config
        b, mask_id = self.mc_batch_size, cfg.mask_token_id
        seqs = [np.asarray(ctx + cont, np.int32) for _, ctx, cont in items]
        width = _bucket(max(len(s) for s in seqs))
        rngs = [np.random.default_rng([self.seed, index]) for index, _, _ in items]
        # a batch's row count is fixed at batch_size x b (a short last batch repeats its first item,
        # whose extra results are dropped), so every batch of a width shares one compilation
        slots = list(range(len(items))) + [0] * (max(self.batch_size, len(items)) - len(items))

        def rows(arrays):  # [item][b, n] -> [slots x b, width], right padding outside attention
            return np.concatenate([np.pad(arrays[j], ((0, 0), (0, width - arrays[j].shape[1]))) for j in slots]).astype(np.int32)

        ids = lm.place_batch(rows([np.broadcast_to(s, (b, len(s))) for s in seqs]))
        mask = lm.place_batch(rows([np.ones((b, len(s)), np.int32) for s in seqs]))
        prompt_len = lm.place_batch(np.repeat([len(items[j][1]) for j in slots], b).astype(np.int32))
        totals = [[] for _ in items]
        for _ in range(self.mc_num // b):
            noise = [llada_noise(rng, len(s), len(ctx), b, mask_id, s) for rng, s, (_, ctx, _) in zip(rngs, seqs, items)]
            p = np.concatenate([noise[j][1] for j in slots]).astype(np.float32)
            got = _mc_rows(lm.graphdef, lm.state, ids, lm.place_batch(rows([n for n, _ in noise])), mask, lm.place_batch(p),
                           prompt_len, self.cfg_scale, mask_id=mask_id, shifted=bool(cfg.shifted_logits), guided=self.cfg_scale > 0)
            got = np.asarray(jax.device_get(got)).reshape(len(slots), b)
            for j in range(len(items)):
                totals[j].append(got[j])
        return [-float(np.mean(np.concatenate(t))) for t in totals]

    def _greedy(self, pairs) -> list[bool]:
        """LLaDA's suffix_greedy_prediction per pair, batched by continuation length."""
        by_length: dict[int, list[int]] = collections.defaultdict(list)
        for i, (_, cont) in enumerate(pairs):
            by_length[len(cont)].append(i)
        greedy = [False] * len(pairs)
        knobs = {"cfg_scale": self.cfg_scale} if self.cfg_scale > 0 else {}
        for length, indices in by_length.items():
            for start in range(0, len(indices), max(self.batch_size, 1)):
                chunk = indices[start : start + self.batch_size]
                out = self.lm.generate([pairs[i][0] for i in chunk], method="llada", gen_length=length, steps=length,
                                       block_length=length, stop_token_ids=[], **knobs)
                for i, row in zip(chunk, out.tokens):
                    greedy[i] = [int(t) for t in row] == pairs[i][1]
        return greedy

    def _ar_likelihood(self, pairs) -> list[tuple[float, bool]]:
        """The exact causal log-probability and greedy check, in batches of `batch_size`."""
        lm = self.lm
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        for chunk in self._chunks(pairs):
            width = _bucket(max(len(pairs[i][0]) + len(pairs[i][1]) for i in chunk))
            seq = np.zeros((max(self.batch_size, len(chunk)), width), np.int32)  # a short batch's spare rows: one token
            where = np.zeros(seq.shape, bool)
            lengths = np.ones(len(seq), np.int32)
            for r, i in enumerate(chunk):
                ctx, cont = pairs[i]
                lengths[r] = len(ctx) + len(cont)
                seq[r, : lengths[r]] = ctx + cont
                where[r, len(ctx) : lengths[r]] = True
            mask = np.arange(width)[None] < lengths[:, None]
            lp, greedy = _ar_rows(lm.graphdef, lm.state, lm.place_batch(seq), lm.place_batch(mask.astype(np.int32)), lm.place_batch(where))
            lp, greedy = np.asarray(lp), np.asarray(greedy)
            for r, i in enumerate(chunk):
                results[i] = (float(lp[r]), bool(greedy[r]))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise DlmjaxError("loglikelihood_rolling (perplexity tasks) is not supported by dlmjax's lm-eval model; "
                          "use generation or multiple-choice tasks")


def main(argv=None) -> None:
    """lm-eval's command line with the "dlmjax" model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    start = time.perf_counter()
    cli_evaluate()
    log.info("dlmjax-lm-eval: %.1f s", time.perf_counter() - start)


if __name__ == "__main__":
    main()
