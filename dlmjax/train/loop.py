"""A resumable training loop: optax for the update, orbax CheckpointManager for the state.

    result = train(model, arrays, "runs/tiny", TrainConfig(objective="mdm", steps=2000))

The run directory holds everything needed to continue:

    RUN/train_config.json   the TrainConfig (a resume with a different one is refused)
    RUN/checkpoints/N/      orbax: parameters, optimizer state, and the step, every save_every steps
    RUN/metrics.jsonl       one line per log_every steps: step, loss, grad norm, lr, tokens/s

Batch `s` and the noise of step `s` are pure functions of (seed, s), and the checkpoint
holds the full optimizer state, so a run killed at any point and restarted ends with the
same parameters as one that was never interrupted (bitwise on the same machine).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from dlmjax.errors import DlmjaxError
from dlmjax.model import REMAT_POLICIES, LoRAConfig, Transformer
from dlmjax.train.data import BatchStream
from dlmjax.train.objectives import OBJECTIVE_NAMES, T_SAMPLING, make_objective
from dlmjax.train.step import PRECISIONS, build_step, initial_state, streamed_batch

SCHEDULES = ("cosine", "constant")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    objective: str = "mdm"  # "mdm" (LLaDA masked diffusion), "ar" (next token), or a recipe: dparallel, d2f, fdv2
    objective_args: dict = dataclasses.field(default_factory=dict)  # a recipe's settings over its official ones
    steps: int = 1000
    epochs: float = 0.0  # > 0: run this many passes over the training rows (sets steps from the row count)
    batch_size: int = 64
    learning_rate: float = 1e-3
    warmup_steps: int = 100  # linear warm-up from 0
    warmup_ratio: float = 0.0  # > 0: warm up for ceil(warmup_ratio * steps) steps instead (Hugging Face's warmup_ratio)
    schedule: str = "cosine"  # after the warm-up: "cosine" (to learning_rate * end_lr_ratio) or "constant"
    end_lr_ratio: float = 0.1  # cosine decay to learning_rate * end_lr_ratio (Hugging Face's cosine: 0)
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.98
    adam_eps: float = 1e-8  # Adam's epsilon (a larger one damps the updates of parameters whose gradient is ~0)
    grad_clip: float = 1.0
    eps: float = 1e-3  # lowest masking rate of the diffusion loss
    t_sampling: str = "stratified"  # masking rates per batch: "stratified" (low-discrepancy) or "iid" (LLaDA's draw)
    seed: int = 0
    save_every: int = 500
    keep: int = 2
    log_every: int = 50
    grad_accum: int = 1  # micro-batches per step (batch_size / grad_accum rows each), accumulated in the jitted step
    remat: str = "none"  # rematerialisation per transformer block: none, full, dots_saveable, dots_with_no_batch_dims_saveable
    precision: str = "fp32"  # fp32; bf16_compute (fp32 master weights, bf16 forward); bf16 (bf16 weights, fp32 optimizer state)
    # rows of the input embedding that get no gradient (torch's padding_idx; Fast-dLLM v2 freezes <|im_end|>, 151645)
    frozen_embedding_rows: tuple = ()

    def validate(self) -> "TrainConfig":
        if self.objective not in OBJECTIVE_NAMES:
            raise DlmjaxError(f"objective must be one of {', '.join(OBJECTIVE_NAMES)}, not {self.objective!r}")
        if not isinstance(self.objective_args, dict):
            raise DlmjaxError(f"objective_args must be a mapping of the objective's settings, got {self.objective_args!r}")
        if self.remat not in REMAT_POLICIES:
            raise DlmjaxError(f"remat must be one of {', '.join(REMAT_POLICIES)}, not {self.remat!r}")
        if self.precision not in PRECISIONS:
            raise DlmjaxError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.grad_accum < 1 or self.batch_size % self.grad_accum:
            raise DlmjaxError(f"grad_accum {self.grad_accum} must be at least 1 and divide batch_size {self.batch_size}")
        for name in ("steps", "batch_size", "save_every", "keep", "log_every"):
            if getattr(self, name) < 1:
                raise DlmjaxError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.schedule not in SCHEDULES:
            raise DlmjaxError(f"schedule must be one of {', '.join(SCHEDULES)}, not {self.schedule!r}")
        if self.warmup_steps < 0:
            raise DlmjaxError(f"warmup_steps must be at least 0, got {self.warmup_steps}")
        if not 0 <= self.warmup_ratio < 1:
            raise DlmjaxError(f"warmup_ratio must lie in [0, 1), got {self.warmup_ratio}")
        if self.epochs < 0:
            raise DlmjaxError(f"epochs must be at least 0 (0: train.steps sets the length), got {self.epochs}")
        rows = self.frozen_embedding_rows
        if isinstance(rows, list):  # from a config file
            return dataclasses.replace(self, frozen_embedding_rows=tuple(rows)).validate()
        if not isinstance(rows, (list, tuple)) or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in rows):
            raise DlmjaxError(f"frozen_embedding_rows must be a list of token ids (e.g. [151645]), got {rows!r}")
        if self.t_sampling not in T_SAMPLING:
            raise DlmjaxError(f"t_sampling must be one of {T_SAMPLING}, not {self.t_sampling!r}")
        if not 0 < self.eps < 1:
            raise DlmjaxError(f"eps must lie in (0, 1), got {self.eps}")
        return self

    def for_rows(self, rows: int) -> "TrainConfig":
        """With `epochs` set: this config with steps = ceil(epochs * rows / batch_size) (and epochs
        0, so the run directory records the steps it ran); else itself."""
        if not self.epochs:
            return self
        return dataclasses.replace(self, steps=max(1, math.ceil(self.epochs * rows / self.batch_size)), epochs=0.0)

    @property
    def warmup(self) -> int:
        """Warm-up steps: warmup_ratio's share of the run, or warmup_steps."""
        return math.ceil(self.warmup_ratio * self.steps) if self.warmup_ratio else self.warmup_steps


@dataclasses.dataclass
class TrainResult:
    model: Transformer
    step: int  # the last completed step
    resumed_from: int | None  # the checkpoint step the run started from, if any
    history: list[dict[str, float]]  # the metrics logged by this call
    preempted: bool = False  # a SIGTERM ended the call early, after saving the step it stopped at


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    warmup = min(tc.warmup, tc.steps - 1)
    if tc.schedule == "constant":  # Hugging Face's "constant" (no warm-up) and "constant_with_warmup"
        schedule = optax.join_schedules([optax.linear_schedule(0.0, tc.learning_rate, warmup),
                                         optax.constant_schedule(tc.learning_rate)], [warmup])
    else:
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, tc.learning_rate, warmup, max(tc.steps, warmup + 1), end_value=tc.learning_rate * tc.end_lr_ratio
        )
    # Weight decay on matrices only (not on norm weights or biases).
    decay = lambda params: jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(tc.grad_clip),
        optax.adamw(schedule, b1=tc.b1, b2=tc.b2, eps=tc.adam_eps, weight_decay=tc.weight_decay, mask=decay),
    ), schedule


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


MODEL_KEYS = ("family", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size")


def _check_run_config(run_dir: pathlib.Path, tc: TrainConfig, lora: LoRAConfig | None = None, cfg=None) -> None:
    path = run_dir / "train_config.json"
    mine = dataclasses.asdict(tc)
    mine["model"] = None if cfg is None else {k: getattr(cfg, k) for k in MODEL_KEYS}
    mine["lora"] = None if lora is None else {"rank": lora.rank, "alpha": lora.alpha, "targets": list(lora.targets),
                                               "dropout": lora.dropout}
    mine = json.loads(json.dumps(mine))  # as the file holds it (tuples as lists)
    if path.is_file():
        saved = json.loads(path.read_text())
        # keys an older run did not record hold their defaults
        defaults = json.loads(json.dumps({**dataclasses.asdict(TrainConfig()), "lora": None, "model": mine["model"]}))
        free = ("steps", "log_every", "grad_accum", "remat")  # the length of the run and memory settings may change
        changed = {k: (saved.get(k, defaults.get(k)), v) for k, v in mine.items()
                   if k not in free and saved.get(k, defaults.get(k)) != v}
        if changed:
            details = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise DlmjaxError(
                f"{run_dir} holds a run with a different training config ({details}); "
                "resume with the same settings or use a new run directory"
            )
    elif jax.process_index() == 0:  # one writer on a pod
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(mine, indent=2) + "\n")
        tmp.replace(path)


def train(
    model: Transformer,
    arrays: dict[str, np.ndarray],
    run_dir: str | pathlib.Path,
    tc: TrainConfig,
    *,
    mesh=None,
    rules=None,
    lora: LoRAConfig | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    log: Callable[[str], None] | None = None,
    on_save: Callable[[int, Transformer], None] | None = None,
    on_log: Callable[[dict], None] | None = None,
    on_step: Callable[[int, Callable[[], Transformer]], None] | None = None,
) -> TrainResult:
    """Train `model` on `arrays` (see `sft_arrays`), resuming from the latest checkpoint in `run_dir`.

    `model` gives the architecture and the starting parameters of a fresh run; a resumed
    run takes its parameters from the checkpoint. `mesh` (any mesh, as `dlmjax.load` takes) and
    `rules` (`dlmjax.sharding.ShardingRules`, default fsdp_tp) shard the parameters, the
    optimizer state and the batch; `lora` trains fresh LoRA adapters on the frozen weights (a
    model loaded with lora="keep" trains its own). `stop_after` ends the call after that step (as
    if killed there) without a final save, for tests of resumption. `on_save(step, model)` runs
    after every checkpoint (e.g. an evaluation), `on_log(row)` after every logged step, and
    `on_step(step, model_fn)` after every step (`model_fn()` builds the model of that step).
    """
    tc = tc.validate()
    objective = make_objective(tc.objective, eps=tc.eps, t_sampling=tc.t_sampling, cfg=model.config, args=tc.objective_args)
    missing = set(objective.arrays) - set(arrays)
    if missing:
        raise DlmjaxError(f"training arrays lack {sorted(missing)}; objective {tc.objective} reads {', '.join(objective.arrays)} "
                          f"(build them with dlmjax.train.{objective.builder})")
    run_dir = pathlib.Path(run_dir)
    stream = BatchStream(arrays, tc.batch_size, tc.seed)
    tc = tc.for_rows(stream.size)
    tx, schedule = make_optimizer(tc)
    objective.check(model.config, lora or model.lora)
    outside = [r for r in tc.frozen_embedding_rows if r >= model.config.vocab_size]
    if outside:
        raise DlmjaxError(f"frozen_embedding_rows {outside} lie outside the embedding's {model.config.vocab_size} rows; "
                          "name token ids of this model's vocabulary")
    state, layout = initial_state(model, tx, tc, mesh=mesh, rules=rules, lora=lora)  # checks before anything compiles
    _check_run_config(run_dir, tc, lora=state.lora, cfg=model.config)
    step_fn = build_step(state, tx, schedule, objective, tc, layout)

    manager = ocp.CheckpointManager(
        (run_dir / "checkpoints").absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=tc.keep, create=True, enable_async_checkpointing=True),
    )
    resumed_from = manager.latest_step()
    start = 0
    if resumed_from is not None:
        restored = manager.restore(
            resumed_from,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(_abstract(state.params)),
                opt_state=ocp.args.StandardRestore(_abstract(state.opt_state)),
            ),
        )
        state = dataclasses.replace(state, params=restored.params, opt_state=restored.opt_state)
        start = resumed_from
        if log:
            log(f"resumed from step {resumed_from} in {run_dir}")

    base_key = jax.random.key(tc.seed)
    history: list[dict[str, float]] = []
    width = arrays["input_ids"].shape[1]
    tokens_per_step = (float(np.mean(np.sum(arrays["attention_mask"], 1))) if "attention_mask" in arrays else width) * tc.batch_size
    end = tc.steps if stop_after is None else min(tc.steps, stop_after)
    bar = None
    primary = jax.process_index() == 0  # the process that prints and writes the metrics
    if progress and primary:
        from tqdm.auto import tqdm

        bar = tqdm(total=tc.steps, initial=start, desc=f"train {tc.objective}", dynamic_ncols=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_file = (run_dir / "metrics.jsonl").open("a") if primary else None
    tick, tick_step = time.perf_counter(), start
    params, opt_state = state.params, state.opt_state
    preemption = _Preemption()
    done = start
    try:
        for step in range(start, end):
            batch = streamed_batch(stream, step, layout)
            params, opt_state, metrics = step_fn(params, opt_state, state.frozen, batch, jax.random.fold_in(base_key, step),
                                                 jnp.int32(step))
            done = step + 1
            if done % tc.log_every == 0 or done == tc.steps:
                now = time.perf_counter()
                row = {"step": done, **{k: float(v) for k, v in jax.device_get(metrics).items()}}
                row["tokens_per_s"] = tokens_per_step * (done - tick_step) / max(now - tick, 1e-9)
                tick, tick_step = now, done
                history.append(row)
                if on_log is not None:
                    on_log(row)
                if metrics_file is not None:
                    metrics_file.write(json.dumps(row) + "\n")
                    metrics_file.flush()
                if bar is not None:
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
            stop = preemption.requested(done)
            if done % tc.save_every == 0 or done == tc.steps or stop:
                manager.save(
                    done,
                    args=ocp.args.Composite(params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state)),
                )
                if on_save is not None:
                    on_save(done, state.model(params))
            if on_step is not None:
                on_step(done, lambda p=params: state.model(p))
            if bar is not None:
                bar.update(1)
            if stop:
                if log:
                    log(f"preempted: saved step {done} in {run_dir} and stopped; run again to continue")
                break
    finally:
        preemption.close()
        if metrics_file is not None:
            metrics_file.close()
        if bar is not None:
            bar.close()
        manager.wait_until_finished()
        manager.close()
    return TrainResult(state.model(params), done if preemption.seen else max(end, start), resumed_from, history,
                       preempted=preemption.seen)


class _Preemption:
    """SIGTERM (a TPU preemption notice) asks the loop to save the step it is at and stop. With
    several processes, JAX's preemption sync point makes every process stop at the same step (it
    needs jax.distributed.initialize); one process uses its own signal handler."""

    def __init__(self):
        import signal
        import threading

        self.seen = False
        self._flag = False
        self._previous = None
        self._multi = jax.process_count() > 1
        if not self._multi and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame):
        self._flag = True

    def requested(self, step: int) -> bool:
        if self._multi:
            from jax.experimental import multihost_utils

            self.seen = bool(multihost_utils.reached_preemption_sync_point(step))
        else:
            self.seen = self._flag
        return self.seen

    def close(self) -> None:
        if self._previous is not None:
            import signal

            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
