"""Training objectives, as pure functions of (model, batch, key).

masked_diffusion_loss (LLaDA SFT, dllm-algorithms.md 1.5): t ~ U(eps, 1) per row; every
  scored token is replaced by the mask id with probability t; the loss is the cross
  entropy on the masked tokens divided by t, summed per row, divided by the row's number
  of scored tokens, averaged over rows. The prompt is never masked.
  With t_sampling="stratified" (the default) the batch's t values are one uniform draw
  shifted by i/B (the low-discrepancy sampler of MDLM, Sahoo et al. 2024): each t is
  still U(eps, 1), so the loss has the same expectation as LLaDA's i.i.d. draw, with lower
  variance, which matters for the 1/t weight. t_sampling="iid" is LLaDA's draw exactly.
autoregressive_loss: next-token cross entropy on the scored tokens under causal attention.

Each is an `Objective` with its randomness explicit (`noise(key, batch)`, then the deterministic
`terms(model, batch, noise)`), so that gradient accumulation splits the noise with the batch and
equals the whole batch; `masked_diffusion_loss` and `autoregressive_loss` are the plain
(loss, metrics) functions. Families with shifted logits (Dream, Qwen) read the prediction for
position i from output i-1.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from dlmjax.attention import attention_mask
from dlmjax.errors import DlmjaxError
from dlmjax.model import position_ids, shift_right


def _causal_mask(attn: jax.Array) -> jax.Array:
    t = attn.shape[1]
    return jnp.tril(jnp.ones((t, t), bool))[None] & (attn[:, None, :] > 0)


T_SAMPLING = ("stratified", "iid")


def sample_t(key, batch_size: int, eps: float, t_sampling: str = "stratified") -> jax.Array:
    """[batch_size, 1] masking rates, each distributed U(eps, 1)."""
    if t_sampling == "iid":
        u = jax.random.uniform(key, (batch_size, 1))
    elif t_sampling == "stratified":
        u = (jax.random.uniform(key, ()) + jnp.arange(batch_size)[:, None] / batch_size) % 1.0
    else:
        raise DlmjaxError(f"t_sampling must be one of {T_SAMPLING}, not {t_sampling!r}")
    return eps + (1.0 - eps) * u


def _row_keys(key, rows: int):
    """One key per row for LoRA dropout (a row's mask does not depend on how the batch is split)."""
    return jax.random.split(jax.random.fold_in(key, 7), rows)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Terms:
    """What a (micro-)batch contributes: the loss's numerator, and for each metric a (sum, count)
    pair. The loss of a batch is sum(loss_sum) / weight, where `Objective.weight` depends only on
    the whole batch, so micro-batches add up to the whole batch exactly (gradient accumulation)."""

    loss_sum: jax.Array
    metrics: dict


class Objective:
    """A training objective with its randomness explicit (../shared/reference/training-recipes.md
    section 5): `noise(key, batch)` draws every random input of the loss as [B, ...] arrays (they
    are split with the batch), `weight(batch)` is the loss's denominator over the whole batch, and
    `terms(model, batch, noise, layout, remat)` is a deterministic function of its inputs."""

    name = ""
    arrays = ("input_ids", "attention_mask", "loss_mask")  # the training arrays it reads (sft_arrays builds these)
    builder = "sft_arrays"

    def check(self, cfg, lora) -> None:
        """One line before anything compiles when the model cannot train with this objective."""

    def noise(self, key, batch) -> dict:
        return {}

    def weight(self, batch) -> jax.Array:
        raise NotImplementedError

    def terms(self, model, batch, noise, layout=None, remat=None) -> Terms:
        raise NotImplementedError

    def __call__(self, model, batch, key=None):
        """(loss, metrics) of one batch: the objective as a plain function."""
        noise = self.noise(key, batch) if key is not None else {}
        out = self.terms(model, batch, noise)
        metrics = {k: total / jnp.maximum(count, 1) for k, (total, count) in out.metrics.items()}
        return out.loss_sum / self.weight(batch), metrics


@dataclasses.dataclass(frozen=True)
class MaskedDiffusion(Objective):
    """LLaDA's masked-diffusion loss (module docstring)."""

    eps: float = 1e-3
    t_sampling: str = "stratified"
    name = "mdm"

    def noise(self, key, batch) -> dict:
        ids, scored = batch["input_ids"], batch["loss_mask"] > 0
        t_key, m_key = jax.random.split(key)
        t = sample_t(t_key, ids.shape[0], self.eps, self.t_sampling)
        return {"t": t, "masked": (jax.random.uniform(m_key, ids.shape) < t) & scored, "dropout": _row_keys(key, ids.shape[0])}

    def weight(self, batch) -> jax.Array:
        return jnp.float32(batch["input_ids"].shape[0])  # the mean over rows

    def terms(self, model, batch, noise, layout=None, remat=None) -> Terms:
        cfg = model.config
        ids, attn, scored = batch["input_ids"], batch["attention_mask"], batch["loss_mask"] > 0
        t, masked = noise["t"], noise["masked"]
        noisy = jnp.where(masked, cfg.mask_token_id, ids)
        logits, _ = model(noisy, position_ids(cfg, attn), attention_mask("bidirectional", attn), layout=layout, remat=remat,
                          dropout=noise.get("dropout"))
        if cfg.shifted_logits:
            logits = shift_right(logits)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, ids)
        per_row = jnp.sum(jnp.where(masked, ce / t, 0.0), axis=1) / jnp.maximum(jnp.sum(scored, axis=1), 1)
        n_masked = jnp.sum(masked)
        correct = jnp.sum((jnp.argmax(logits, -1) == ids) & masked)
        return Terms(jnp.sum(per_row), {"masked_ce": (jnp.sum(jnp.where(masked, ce, 0.0)), n_masked),
                                         "masked_acc": (correct.astype(jnp.float32), n_masked)})


@dataclasses.dataclass(frozen=True)
class NextToken(Objective):
    """Next-token cross entropy on the scored tokens under causal attention (no noise)."""

    name = "ar"

    def noise(self, key, batch) -> dict:
        return {"dropout": _row_keys(key, batch["input_ids"].shape[0])}

    def weight(self, batch) -> jax.Array:
        return jnp.maximum(jnp.sum(batch["loss_mask"][:, 1:] > 0), 1).astype(jnp.float32)

    def terms(self, model, batch, noise, layout=None, remat=None) -> Terms:
        cfg = model.config
        ids, attn, scored = batch["input_ids"], batch["attention_mask"], batch["loss_mask"] > 0
        logits, _ = model(ids, position_ids(cfg, attn), _causal_mask(attn), layout=layout, remat=remat,
                          dropout=noise.get("dropout"))
        logits, targets, weights = logits[:, :-1], ids[:, 1:], scored[:, 1:]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        count = jnp.sum(weights)
        correct = jnp.sum((jnp.argmax(logits, -1) == targets) & weights)
        return Terms(jnp.sum(jnp.where(weights, ce, 0.0)), {"token_acc": (correct.astype(jnp.float32), count)})


def bind(model, *, layout=None, remat: str | None = None, dropout=None):
    """The explicit-noise interface's `model` callable (training-recipes.md section 5) of an NNX
    `Transformer`, with or without LoRA adapters:

        f(input_ids [B, L], *, attn_mask=None, positions=None, adapter=True) -> float32 [B, L, V]

    raw per-position logits (no shift). attn_mask: bool [B or 1, 1, L, L], True = may attend
    (None: full bidirectional attention); positions: int [B or 1, L] (None: 0..L-1); adapter=False
    runs the base weights with the adapters off (D2F's teacher): B factors at zero and no gradient
    into any adapter, which adds exactly 0 to every projection, so it equals the model without LoRA.
    `layout`, `remat` and `dropout` (LoRA dropout row keys [B], the adapter on only) pass through to
    the model."""
    def call(input_ids, *, attn_mask=None, positions=None, adapter: bool = True):
        b, length = input_ids.shape
        if positions is None:
            positions = jnp.arange(length, dtype=jnp.int32)[None]
        positions = jnp.broadcast_to(jnp.asarray(positions, jnp.int32), (b, length))
        if attn_mask is None:
            mask = jnp.ones((b, length, length), bool)
        else:
            if attn_mask.ndim != 4 or attn_mask.shape[1] != 1 or attn_mask.shape[2:] != (length, length):
                raise DlmjaxError(f"attn_mask must be bool [B or 1, 1, {length}, {length}], got shape {attn_mask.shape}")
            mask = jnp.broadcast_to(attn_mask[:, 0].astype(bool), (b, length, length))
        net = model if adapter or model.lora is None else _adapter_off(model)
        keys = dropout if adapter else None
        if keys is not None and keys.shape[0] != b:  # a forward of several copies of the batch: one key per copy's row
            keys = jnp.concatenate([jax.vmap(lambda k, c=c: jax.random.fold_in(k, c))(keys) for c in range(b // keys.shape[0])])
        logits, _ = net(input_ids, positions, mask, layout=layout, remat=remat, dropout=keys)
        return logits.astype(jnp.float32)

    return call


def _adapter_off(model):
    """`model` with every LoRA B factor at zero and no gradient into its adapters."""
    from flax import nnx

    graphdef, adapters, rest = nnx.split(model, nnx.LoRAParam, ...)
    pure = nnx.to_pure_dict(adapters)
    off = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if str(getattr(path[-1], "key", path[-1])) == "lora_b" else jax.lax.stop_gradient(x),
        pure)
    nnx.replace_by_pure_dict(adapters, off)
    # The base weights pass through a barrier so that the teacher's uses of them are not merged
    # (CSE) with the student's: under fsdp both all-gather the same frozen weights, and one shared
    # gather is kept alive from the teacher's layer to the student's, every layer at once.
    rest = jax.lax.optimization_barrier(rest)
    return nnx.merge(graphdef, adapters, rest)


class Recipe(Objective):
    """A seed paper's objective (`dparallel`, `d2f`, `fdv2` modules) in the trainer: the loss of
    each row on its own, averaged over the batch (reduce="rows": the official trainings run one
    row per device and average), so accumulation and sharding split it exactly. `arrays` names the
    training arrays it reads (`recipe_arrays` builds them)."""

    arrays = ("input_ids", "prompt_lengths")
    builder = "recipe_arrays"
    families = ("llada", "dream")
    hint = "load LLaDA or Dream"

    def weight(self, batch) -> jax.Array:
        return jnp.float32(batch["input_ids"].shape[0])

    def _bind(self, model, noise, layout, remat):
        return bind(model, layout=layout, remat=remat, dropout=noise.get("dropout"))

    def check(self, cfg, lora) -> None:
        if cfg.family not in self.families:
            raise DlmjaxError(f"objective {self.name} trains a {' or '.join(self.families)} model, not {cfg.family}; "
                              f"{self.hint}")


@dataclasses.dataclass(frozen=True)
class DParallel(Recipe):
    """dParallel's certainty forcing; official: LLaDA block_size 32 and entropy_weight 2, Dream the
    whole response (block_size None) and entropy_weight 1; temperature 0.5."""

    block_size: int | None = 32
    entropy_weight: float = 2.0
    temperature: float = 0.5
    name = "dparallel"

    def noise(self, key, batch) -> dict:
        from dlmjax.train.dparallel import dparallel_sample_noise

        return {**dparallel_sample_noise(key, batch, block_size=self.block_size), "dropout": _row_keys(key, batch["input_ids"].shape[0])}

    def terms(self, model, batch, noise, layout=None, remat=None) -> Terms:
        from dlmjax.train.dparallel import dparallel_loss

        cfg, rows = model.config, batch["input_ids"].shape[0]
        _, aux = dparallel_loss(self._bind(model, noise, layout, remat), batch, noise, mask_id=cfg.mask_token_id,
                                block_size=self.block_size, shift=cfg.shifted_logits, temperature=self.temperature,
                                entropy_weight=self.entropy_weight, reduce="rows")
        n = jnp.float32(rows)
        return Terms(jnp.sum(aux["row_losses"]), {
            "masked_ce": ((aux["ce"] + aux["ce_c"]) * n, n), "certain_entropy": ((aux["ent"] + aux["ent_c"]) * n, n),
            "masked_acc": ((aux["n_correct"] + aux["n_correct_c"]).astype(jnp.float32), aux["n_masked"] + aux["n_masked_c"])})


@dataclasses.dataclass(frozen=True)
class D2F(Recipe):
    """D2F's asymmetric distillation (train LoRA adapters: the teacher is the adapter-off model);
    official block_size 16, self_align True."""

    block_size: int = 16
    self_align: bool = True
    name = "d2f"

    def check(self, cfg, lora) -> None:
        super().check(cfg, lora)
        if lora is None:
            raise DlmjaxError("objective d2f distils into LoRA adapters (the teacher is the model with them off); "
                              "pass lora=LoRAConfig(...) (D2F: rank 32, alpha 32, dropout 0.1 on q, k, v, o)")

    def noise(self, key, batch) -> dict:
        from dlmjax.train.d2f import d2f_sample_noise

        return {**d2f_sample_noise(key, batch, block_size=self.block_size, per_row=True),
                "dropout": _row_keys(key, batch["input_ids"].shape[0])}

    def terms(self, model, batch, noise, layout=None, remat=None) -> Terms:
        from dlmjax.train.d2f import d2f_loss

        cfg = model.config
        _, aux = d2f_loss(self._bind(model, noise, layout, remat), batch, noise, mask_id=cfg.mask_token_id,
                          block_size=self.block_size, shift=cfg.shifted_logits, self_align=self.self_align, reduce="rows")
        return Terms(jnp.sum(aux["row_losses"]), {"masked_per_row": (aux["n_masked"].astype(jnp.float32),
                                                                     jnp.float32(batch["input_ids"].shape[0]))})


@dataclasses.dataclass(frozen=True)
class FDv2(Recipe):
    """Fast-dLLM v2's block-diffusion fine-tuning; bd_size: the model config's by default."""

    bd_size: int | None = None
    normalize: str = "labels"
    name = "fdv2"
    arrays = ("input_ids", "labels")
    families = ("qwen2", "fast_dllm_v2")
    hint = "Fast-dLLM v2 turns an autoregressive model (Qwen2.5) into a block-diffusion one"

    def check(self, cfg, lora) -> None:
        super().check(cfg, lora)
        if cfg.mask_token_id is None:
            raise DlmjaxError(f"objective fdv2 needs a mask token, and this {cfg.family} checkpoint has none; write it as a "
                              "block-diffusion checkpoint first: python -m dlmjax.convert SRC DST --to-block-diffusion 32")
        if not self.bd_size:
            raise DlmjaxError(f"objective fdv2 needs a block size and this {cfg.family} config has none; "
                              "set objective_args.bd_size (Fast-dLLM v2: 32)")

    def noise(self, key, batch) -> dict:
        from dlmjax.train.fdv2 import fdv2_sample_noise

        if not self.bd_size:
            raise DlmjaxError("fdv2 needs a block size: set objective_args.bd_size (a Fast-dLLM v2 config has bd_size)")
        return {**fdv2_sample_noise(key, batch, bd_size=self.bd_size), "dropout": _row_keys(key, batch["input_ids"].shape[0])}

    def terms(self, model, batch, noise, layout=None, remat=None) -> Terms:
        from dlmjax.train.fdv2 import fdv2_loss

        _, aux = fdv2_loss(self._bind(model, noise, layout, remat), batch, noise, mask_id=model.config.mask_token_id,
                           bd_size=self.bd_size, normalize=self.normalize, reduce="rows")
        return Terms(jnp.sum(aux["row_losses"]), {"ce_per_label": (aux["ce_sum_noisy"] + aux["ce_sum_comp"],
                                                                   aux["n_labels"].astype(jnp.float32))})


RECIPES = {"dparallel": DParallel, "d2f": D2F, "fdv2": FDv2}


def recipe_defaults(name: str, cfg) -> dict:
    """The official hyper-parameters of a recipe for a model family (training-recipes.md)."""
    if name == "dparallel" and cfg is not None and cfg.family == "dream":
        return {"block_size": None, "entropy_weight": 1.0}
    if name == "fdv2" and cfg is not None and getattr(cfg, "bd_size", None):
        return {"bd_size": int(cfg.bd_size)}
    return {}


def masked_diffusion_loss(model, batch, key, *, eps: float = 1e-3, t_sampling: str = "stratified"):
    """(loss, metrics) of LLaDA's masked-diffusion objective on one batch."""
    return MaskedDiffusion(eps=eps, t_sampling=t_sampling)(model, batch, key)


def autoregressive_loss(model, batch, key=None):
    """(loss, metrics) of the next-token objective on one batch."""
    return NextToken()(model, batch)


def make_objective(name: str, *, eps: float = 1e-3, t_sampling: str = "stratified", cfg=None, args: dict | None = None) -> Objective:
    """The objective `name`: "mdm" or "ar" (eps and t_sampling set the masked-diffusion noise), or a
    recipe ("dparallel", "d2f", "fdv2") with the official hyper-parameters for `cfg`'s family,
    overridden by `args` (e.g. {"entropy_weight": 1.0})."""
    if name == "mdm":
        return MaskedDiffusion(eps=eps, t_sampling=t_sampling)
    if name == "ar":
        return NextToken()
    if name in RECIPES:
        cls = RECIPES[name]
        settings = {**recipe_defaults(name, cfg), **(args or {})}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise DlmjaxError(f"objective {name} has no setting {unknown[0]!r}; its settings are {', '.join(sorted(known))}")
        return cls(**settings)
    raise DlmjaxError(f"objective must be one of {', '.join(OBJECTIVE_NAMES)}, not {name!r}")


OBJECTIVES = {"mdm": masked_diffusion_loss, "ar": autoregressive_loss}
OBJECTIVE_NAMES = (*OBJECTIVES, *RECIPES)
