"""python -m dlmjax.train CONFIG.yaml [section.key=value ...] [--dry-run [--device-memory 16GiB]]

One YAML file names the model, the data, the objective and optimizer (`train:`, the fields of
`TrainConfig`), LoRA, the mesh and sharding rules, the eval hook and the output directory;
`key=value` arguments override it (`train.steps=100 lora.rank=8 mesh=fsdp=8`). Example:

    model: {name: tiny-llada}
    data: {train: data/train.jsonl, eval: data/eval.jsonl, prompt_length: 32, gen_length: 32}
    train: {objective: mdm, steps: 2000, batch_size: 64, learning_rate: 1.0e-3, save_every: 500}
    lora: {rank: 16, alpha: 32, targets: [q_proj, k_proj, v_proj, attn_out]}
    eval: {method: fast-dllm, knobs: {threshold: 0.9, block_length: 8}}
    mesh: data=1
    output: runs/tiny

Data: JSONL (one object per line), Parquet (needs pyarrow) or a Hugging Face `datasets`
directory saved with `save_to_disk` (needs datasets), with a prompt and an answer field; prompts
go through the model's chat template (`data.chat`), rows are laid out by `sft_arrays` (for the
recipe objectives `train.objective: dparallel | d2f | fdv2`, by `recipe_arrays`). The run
directory gets the orbax checkpoints, metrics.jsonl (and TensorBoard events with
`tensorboard: true`, via tensorboardX), eval rows, and at the end `final/`: the model as Hugging
Face safetensors, or with LoRA the PEFT adapter. A rerun of the same command resumes. The eval
hook decodes the held-out rows with `eval.method` at every save, or every `eval.every` steps.

`--dry-run` compiles the train step from shapes alone (no weights, nothing run) and prints
per-device memory: parameters, optimizer state, gradients and activations, from
`memory_analysis()`, and whether it fits `--device-memory`. By default it compiles for as many
simulated CPU devices as the mesh has, which sizes parameters, optimizer state and gradients
exactly but not the activations (XLA's CPU backend upcasts bf16 matmuls and schedules without a
memory limit). `--target v5e:2x4` (a TPU topology: v4:2x2x1, v5e:4x8, v5p:2x2x2, v6e:2x4, ...)
compiles for that TPU slice instead, on this machine and without TPUs, through libtpu's
compile-only devices (`pip install 'jax[tpu]'` of your jax version brings libtpu); the mesh's
size must equal the slice's chip count, and its memory figures are the TPU compiler's own.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import pathlib
import re
import sys
from typing import Any

from dlmjax.errors import DlmjaxError


@dataclasses.dataclass
class ModelSection:
    name: str = ""  # a hub id, a local Hugging Face or converted directory, or an embedded model (tiny-llada)
    dtype: str | None = None  # float32 or bfloat16 (default: the checkpoint's)
    init: bool = False  # train from scratch: the checkpoint's config and tokenizer, random weights (N(0, init_std))
    init_std: float = 0.02


@dataclasses.dataclass
class DataSection:
    train: str = ""  # JSONL, Parquet or a `datasets` directory
    eval: str = ""  # held-out rows for the eval hook (optional)
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    chat: bool = True  # wrap prompts in the model's chat template
    prompt_length: int = 64  # rows: the prompt left-padded to this, then the answer and EOS up to gen_length
    gen_length: int = 64
    limit: int = 0  # use at most this many training rows (0: all)
    eval_limit: int = 64
    # recipe objectives (dparallel, d2f, fdv2): rows of prompt_length + gen_length tokens, the prompt
    # first, each answer ended by end_id (default EOS; D2F's LLaDA data uses <|eot_id|>), padded with EOS
    end_id: int | None = None
    pack: bool = False  # fdv2: pack the examples into rows (the official fine-tuning does)


@dataclasses.dataclass
class LoRASection:
    rank: int = 0  # 0: train every weight
    alpha: float = 16.0
    dropout: float = 0.0  # on the adapters' inputs during training (D2F: 0.1)
    targets: list = dataclasses.field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])  # HF module names


@dataclasses.dataclass
class EvalSection:
    method: str = "llada"  # any lm.generate method
    knobs: dict = dataclasses.field(default_factory=dict)  # its arguments (gen_length defaults to data.gen_length)
    batch_size: int = 32
    answer_pattern: str = ""  # a regex whose first group (or match) is compared; empty: the stripped texts
    every: int = 0  # decode the held-out rows every this many steps (and at the last); 0: at every save


@dataclasses.dataclass
class RunConfig:
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    train: Any = None  # TrainConfig
    lora: LoRASection = dataclasses.field(default_factory=LoRASection)
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)
    mesh: str = ""  # e.g. "fsdp=8" or "data=2,tensor=4"; empty: one device
    rules: str = "fsdp_tp"  # sharding preset
    output: str = "runs/train"
    tensorboard: bool = False
    export: bool = True  # write final/ at the end


def _sections():
    from dlmjax.train.loop import TrainConfig

    return {"model": ModelSection, "data": DataSection, "train": TrainConfig, "lora": LoRASection, "eval": EvalSection}


def _known_keys() -> list[str]:
    keys = [f.name for f in dataclasses.fields(RunConfig) if f.name not in _sections()]
    for name, cls in _sections().items():
        keys += [f"{name}.{f.name}" for f in dataclasses.fields(cls)]
    return keys


def _unknown(key: str) -> DlmjaxError:
    close = difflib.get_close_matches(key, _known_keys(), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; the keys are {', '.join(_known_keys())}"
    return DlmjaxError(f"unknown config key '{key}'{hint}")


def _numeric(cls, name: str, value):
    """A float field's value as a float: YAML 1.1 reads `5e-4` (no dot) as a string, and 1 as an int."""
    kind = {f.name: str(f.type) for f in dataclasses.fields(cls)}[name.split(".")[-1]]
    if kind.split(" |")[0] != "float" or value is None or isinstance(value, bool):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        raise DlmjaxError(f"{name} must be a number, got {value!r}") from None


def parse_config(text: str | None, overrides: list[str]) -> RunConfig:
    """The RunConfig of a YAML document and `section.key=value` overrides (values parsed as YAML)."""
    import yaml

    raw = yaml.safe_load(text) if text else {}
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise DlmjaxError("the config file must be a YAML mapping of sections (model:, data:, train:, ...)")
    for item in overrides:
        if "=" not in item:
            raise DlmjaxError(f"override {item!r} is not key=value; e.g. train.steps=100")
        key, value = item.split("=", 1)
        parsed = yaml.safe_load(value) if value else ""
        if key in ("mesh", "output", "rules"):  # strings that YAML could misread ("data=2" stays text anyway)
            parsed = value
        parts = key.split(".")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] not in _sections()):
            raise _unknown(key)
        if len(parts) == 2:
            raw.setdefault(parts[0], {})
            if not isinstance(raw[parts[0]], dict):
                raise DlmjaxError(f"config section '{parts[0]}' must be a mapping")
            raw[parts[0]][parts[1]] = parsed
        else:
            raw[key] = parsed
    sections, values = _sections(), {}
    for key, value in raw.items():
        if key in sections:
            if not isinstance(value, dict):
                raise DlmjaxError(f"config section '{key}' must be a mapping, got {value!r}")
            fields = {f.name for f in dataclasses.fields(sections[key])}
            for inner in value:
                if inner not in fields:
                    raise _unknown(f"{key}.{inner}")
            value = {inner: _numeric(sections[key], f"{key}.{inner}", v) for inner, v in value.items()}
            values[key] = sections[key](**value)
        elif key in {f.name for f in dataclasses.fields(RunConfig)}:
            values[key] = value
        else:
            raise _unknown(key)
    config = RunConfig(**values)
    if config.train is None:
        config.train = sections["train"]()
    config.train.validate()
    if not isinstance(config.eval.every, int) or config.eval.every < 0:
        raise DlmjaxError(f"eval.every must be a whole number of steps (0: evaluate at every save), got {config.eval.every!r}")
    if not config.model.name:
        raise DlmjaxError("the config names no model; set model.name (a hub id, a directory, or tiny-llada)")
    return config


# --- data ----------------------------------------------------------------------------------------


def read_records(path: str) -> list[dict]:
    """The records of a JSONL file, a Parquet file or a saved `datasets` directory."""
    p = pathlib.Path(path)
    if not p.exists():
        raise DlmjaxError(f"no dataset at {path}; check the path (data.train / data.eval)")
    if p.is_dir():
        try:
            import datasets
        except ImportError:
            raise DlmjaxError(f"{path} is a directory (a saved `datasets` dataset?); pip install datasets to read it") from None
        return list(datasets.load_from_disk(str(p)))
    if p.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DlmjaxError(f"{path} is Parquet; pip install pyarrow to read it") from None
        return pq.read_table(p).to_pylist()
    records = []
    for number, line in enumerate(p.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError as e:
                raise DlmjaxError(f"{path} line {number} is not JSON ({e}); the file must hold one object per line") from None
    return records


def read_rows(path: str, prompt_field: str, answer_field: str, limit: int = 0, records: list[dict] | None = None) -> list[tuple[str, str]]:
    """(prompt, answer) pairs of a JSONL file, a Parquet file or a saved `datasets` directory (or of
    its `records`, already read); records marked "usable": false (trajectories that failed their
    --keep test) are skipped."""
    rows = [(str(r[prompt_field]), str(r[answer_field])) for r in (read_records(path) if records is None else records)
            if isinstance(r, dict) and r.get(prompt_field) is not None and r.get(answer_field) is not None
            and r.get("usable", True) is not False]
    if not rows:
        raise DlmjaxError(f"{path} has no usable rows: none has both '{prompt_field}' and '{answer_field}' "
                          "(set data.prompt_field / data.answer_field)")
    return rows[:limit] if limit else rows


def encode_prompt(lm, text: str, chat: bool) -> list[int]:
    if chat:
        return list(lm.apply_chat_template([{"role": "user", "content": text}]))
    return list(lm.tokenizer(text)["input_ids"])


def training_arrays(lm, rows, data: DataSection, objective: str, log=print):
    """sft_arrays of the rows that fit the prompt and gen lengths (the rest are counted and dropped);
    for a recipe objective, recipe_arrays of the same rows."""
    from dlmjax.train import recipe_arrays, sft_arrays
    from dlmjax.train.objectives import RECIPES

    cfg = lm.config
    eos = cfg.eos_token_id if cfg.eos_token_id is not None else cfg.pad_token_id
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else eos
    prompts, answers, dropped = [], [], 0
    for prompt, answer in rows:
        p = encode_prompt(lm, prompt, data.chat)
        a = list(lm.tokenizer(answer, add_special_tokens=False)["input_ids"])
        if not 0 < len(p) <= data.prompt_length or len(a) >= data.gen_length:
            dropped += 1
            continue
        prompts.append(p)
        answers.append(a)
    if not prompts:
        raise DlmjaxError(f"no row fits prompt_length {data.prompt_length} and gen_length {data.gen_length} "
                          f"({dropped} rows too long); raise data.prompt_length / data.gen_length")
    if dropped:
        log(f"dropped {dropped} of {len(rows)} rows longer than prompt_length {data.prompt_length} / gen_length {data.gen_length}")
    if objective in RECIPES:
        return recipe_arrays(prompts, answers, length=data.prompt_length + data.gen_length, pad_id=eos,
                             end_id=eos if data.end_id is None else data.end_id, labels=objective == "fdv2", pack=data.pack)
    return sft_arrays(prompts, answers, prompt_length=data.prompt_length, gen_length=data.gen_length, pad_id=pad, eos_id=eos,
                      objective=objective)


def _shown_axes(mesh) -> dict:
    """The mesh's axis sizes as printed: the expert axis only where it is used (> 1)."""
    return {name: size for name, size in dict(mesh.shape).items() if name != "expert" or size > 1}


def lora_config(section: LoRASection, cfg):
    """Our LoRAConfig from HF module names (attn_out, ff_proj, ...) or ours (o_proj, gate_proj, ...)."""
    from dlmjax.convert import layouts
    from dlmjax.model import ROLES, LoRAConfig, model_roles

    if section.rank <= 0:
        return None
    names = layouts.hf_module_to_role(cfg)
    roles = []
    for target in section.targets:
        role = names.get(target, target if target in model_roles(cfg) else None)
        if role is None:
            raise DlmjaxError(f"unknown LoRA target {target!r}; this {cfg.family} model's linear layers are "
                              f"{', '.join(sorted(names))}")
        roles.append(role)
    if not 0 <= section.dropout < 1:
        raise DlmjaxError(f"lora.dropout {section.dropout} is outside [0, 1)")
    return LoRAConfig(rank=section.rank, alpha=float(section.alpha), targets=tuple(sorted(set(roles), key=ROLES.index)),
                      dropout=float(section.dropout))


def answer_key(text: str, pattern: str) -> str | None:
    """What an answer is judged by: the first group (or the match) of `pattern`, stripped (None
    without a match), or with no pattern the stripped text."""
    if pattern:
        m = re.search(pattern, text)
        return None if m is None else (m.group(1) if m.groups() else m.group(0)).strip()
    return text.strip()


def answer_matches(text: str, reference: str, pattern: str) -> bool:
    got = answer_key(text, pattern)
    return got is not None and got == answer_key(reference, pattern)


def _accuracy(texts, answers, pattern: str) -> float:
    return sum(answer_matches(t, a, pattern) for t, a in zip(texts, answers)) / max(len(answers), 1)


# --- dry run ---------------------------------------------------------------------------------------


def parse_bytes(text: str) -> float:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]i?B?|B)?\s*", text, re.I)
    if not m:
        raise DlmjaxError(f"--device-memory {text!r} is not a size; e.g. 16GiB or 80GB")
    unit = (m.group(2) or "B").upper().rstrip("B").replace("I", "")
    return float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit]


def target_devices(target: str) -> list:
    """The compile-only devices of a TPU topology ("v5e:2x4"), through libtpu; no TPU needed."""
    import jax

    name = target.split(":", 1)[1] if target.lower().startswith("tpu:") else target
    if not re.fullmatch(r"v\d+[a-z]*:\d+(x\d+)+", name):
        raise DlmjaxError(f"--target {target!r} is not a TPU topology; write generation:shape, e.g. v5e:2x4 or v5p:2x2x2")
    # libtpu reads these at start-up; on a machine that is not a TPU VM they are absent, and it logs errors without them
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(topology_name=name, platform="tpu").devices)
    except Exception as e:  # no libtpu, or a topology libtpu does not know
        if "not installed" in str(e) or "libtpu" in str(e).lower():
            raise DlmjaxError(f"--target {target} needs libtpu to compile for a TPU (no TPU is needed); "
                              f"pip install 'jax[tpu]=={jax.__version__}' ({str(e).splitlines()[0][:120]})") from None
        raise DlmjaxError(f"--target {target}: libtpu does not know this topology ({str(e).splitlines()[0][:160]}); "
                          "e.g. v5e:2x4, v5e:4x8, v4:2x2x1, v5p:2x2x2") from None


def dry_run(config: RunConfig, cfg, device_memory: float | None = None, out=print, target: str | None = None) -> dict:
    """Per-device memory of the train step, compiled from abstract shapes on the mesh: simulated
    CPU devices, or with `target` a TPU topology's compile-only devices. Returns the figures
    (bytes) it printed."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from dlmjax import sharding
    from dlmjax.memory import compiled_bytes, sharded_bytes
    from dlmjax.model import Transformer
    from dlmjax.train.loop import make_optimizer
    from dlmjax.train.objectives import make_objective
    from dlmjax.train.step import _floats, build_step, placed, split_state, train_layout

    tc, data = config.train, config.data
    lora = lora_config(config.lora, cfg)
    dtype = jnp.dtype(config.model.dtype or cfg.dtype)
    mesh = config.mesh or "data=1"
    if target:
        devices = target_devices(target)
        if _mesh_devices(mesh) != len(devices):
            raise DlmjaxError(f"the mesh {mesh} has {_mesh_devices(mesh)} devices but the {target} slice has {len(devices)} chips; "
                              f"make the mesh sizes multiply to {len(devices)}, e.g. mesh=fsdp={len(devices)}")
        mesh = sharding.make_mesh(mesh, devices=devices)
    layout = train_layout(cfg, tc, mesh, sharding.ShardingRules.preset(config.rules))
    mesh, rules = layout.mesh, layout.rules
    tx, schedule = make_optimizer(tc)
    state = split_state(placed(nnx.eval_shape(lambda: Transformer(cfg, dtype=dtype, lora=lora)), layout), tx, tc, layout)
    params, frozen, opt_state = state.params, state.frozen, state.opt_state
    objective = make_objective(tc.objective, eps=tc.eps, t_sampling=tc.t_sampling, cfg=cfg, args=tc.objective_args)
    step = build_step(state, tx, schedule, objective, tc, layout)
    width = data.prompt_length + data.gen_length

    def array(name):  # [B, width] rows, or [B] per-row values (prompt_lengths)
        shape = (tc.batch_size,) if name == "prompt_lengths" else (tc.batch_size, width)
        return jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding.batch_sharding(mesh, rules, shape))

    batch = {k: array(k) for k in objective.arrays}
    replicated = NamedSharding(mesh, PartitionSpec())
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
    compiled = step.lower(params, opt_state, frozen, batch, key, jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)).compile()
    gradients = sharded_bytes(_floats(params, jnp.float32))  # the update runs on float32 gradients
    figures = {
        "parameters": sharded_bytes(params) + sharded_bytes(frozen),
        "optimizer": sharded_bytes(opt_state),
        "gradients": gradients,
        "temporaries": float(compiled.memory_analysis().temp_size_in_bytes),
    }
    figures["activations"] = max(figures["temporaries"] - figures["gradients"], 0.0)
    figures["peak"] = compiled_bytes(compiled)
    gib = 2**30
    what = f"LoRA r={lora.rank} on {', '.join(lora.targets)}" if lora else "full fine-tuning"
    out(f"dry run: {cfg.family}, {cfg.num_layers} layers, hidden {cfg.hidden_size}, {dtype.name} weights, {what}; "
        f"mesh {_shown_axes(mesh)} ({mesh.size} devices), rules {config.rules}; batch {tc.batch_size} x {width} tokens, "
        f"grad_accum {tc.grad_accum}, remat {tc.remat}, precision {tc.precision}")
    where = f"{devices[0].device_kind} chips of a {target} slice (compile-only)" if target else "simulated CPU devices"
    out(f"GiB per device (XLA memory_analysis of the compiled step on {where}):")
    for name in ("parameters", "optimizer", "gradients", "activations", "peak"):
        out(f"  {name:<12} {figures[name] / gib:10.4f}")
    if device_memory is not None:
        fits = figures["peak"] <= device_memory
        out(f"{'fits' if fits else 'does NOT fit'} in {device_memory / gib:.1f} GiB per device")
        figures["fits"] = fits
    return figures


# --- the run ---------------------------------------------------------------------------------------


def run(config: RunConfig, log=print) -> dict:
    import dlmjax
    from dlmjax.lm import LM
    from dlmjax.train import train

    output = pathlib.Path(config.output)
    lm = dlmjax.load(config.model.name, config.model.dtype, mesh=config.mesh or None,
                     rules=None if not config.mesh else _rules(config.rules), progress=False)
    cfg = lm.config
    lora = lora_config(config.lora, cfg)
    from dlmjax.train.trajectories import check_for_training

    records = read_records(config.data.train)
    check_for_training(config.data.train, lm.tokenizer, records)  # trajectories: this tokenizer's, and some usable
    rows = read_rows(config.data.train, config.data.prompt_field, config.data.answer_field, config.data.limit, records)
    arrays = training_arrays(lm, rows, config.data, config.train.objective, log)
    log(f"{len(arrays['input_ids'])} training rows of {arrays['input_ids'].shape[1]} tokens")
    held_out = (read_rows(config.data.eval, config.data.prompt_field, config.data.answer_field, config.data.eval_limit)
                if config.data.eval else [])
    writer = None
    if config.tensorboard:
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise DlmjaxError("tensorboard: true needs tensorboardX; pip install tensorboardX") from None
        writer = SummaryWriter(str(output / "tensorboard")) if is_primary() else None

    def on_log(row):
        if writer is not None:
            for k, v in row.items():
                if k != "step":
                    writer.add_scalar(f"train/{k}", v, row["step"])
            writer.flush()

    def evaluate(step, model):
        trained = LM(model, directory=lm.directory, source=lm.source, mesh=lm.mesh, rules=lm.rules)
        knobs = {"gen_length": config.data.gen_length, **config.eval.knobs}
        texts = []
        for start in range(0, len(held_out), config.eval.batch_size):
            chunk = held_out[start:start + config.eval.batch_size]
            ids = [encode_prompt(lm, p, config.data.chat) for p, _ in chunk]
            texts += list(trained.generate(ids, method=config.eval.method, **knobs).texts)
        accuracy = _accuracy(texts, [a for _, a in held_out], config.eval.answer_pattern)
        row = {"step": step, "eval_accuracy": accuracy, "eval_rows": len(held_out), "eval_method": config.eval.method}
        if is_primary():
            with (output / "eval.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
            if writer is not None:
                writer.add_scalar("eval/accuracy", accuracy, step)
                writer.flush()
        log(f"step {step}: eval accuracy {accuracy:.3f} on {len(held_out)} rows ({config.eval.method})")

    every, last = config.eval.every, config.train.for_rows(len(arrays["input_ids"])).steps

    def on_save(step, model):
        if held_out and not every:
            evaluate(step, model)

    def on_step(step, model_fn):
        if held_out and every and (step % every == 0 or step == last):
            evaluate(step, model_fn())

    model = lm.model
    if config.model.init:
        from dlmjax.train import init_model

        model = init_model(cfg, config.train.seed, std=config.model.init_std)
    result = train(model, arrays, output, config.train, mesh=lm.mesh, rules=lm.rules, lora=lora, log=log,
                   on_save=on_save, on_log=on_log, on_step=on_step)
    if writer is not None:
        writer.close()
    summary = {"step": result.step, "preempted": result.preempted, "resumed_from": result.resumed_from}
    if config.export and not result.preempted and result.step >= last:
        trained = LM(result.model, directory=lm.directory, source=lm.source, mesh=lm.mesh, rules=lm.rules)
        final = output / "final"
        if lora is not None:
            trained.save_adapter(final, overwrite=True)
        elif is_primary():
            trained.save_pretrained(final, overwrite=True)
        summary["final"] = str(final)
        log(f"wrote {final} ({'PEFT adapter' if lora is not None else 'Hugging Face safetensors'})")
    return summary


def _rules(name: str):
    from dlmjax.sharding import ShardingRules

    return ShardingRules.preset(name)


def is_primary() -> bool:
    """Whether this is the process that prints and writes files (process 0 on a pod)."""
    import jax

    return jax.process_index() == 0


def _mesh_devices(mesh: str) -> int:
    from dlmjax.sharding import parse_mesh

    return math.prod(parse_mesh(mesh).values()) if mesh else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dlmjax.train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("config", nargs="?", help="the YAML config (optional: everything may come as key=value)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.steps=100 lora.rank=8")
    parser.add_argument("--dry-run", action="store_true", help="print per-device memory of the train step and exit")
    parser.add_argument("--device-memory", help="with --dry-run: say whether the step fits this much per device (16GiB)")
    parser.add_argument("--target", help="with --dry-run: compile for this TPU slice (v5e:2x4, v5p:2x2x2, ...) through libtpu, "
                                         "without TPUs; default: simulated CPU devices")
    args = parser.parse_intermixed_args(argv)  # flags may come between the overrides
    try:
        overrides = list(args.overrides)
        text = None
        if args.config is not None and "=" in args.config and not pathlib.Path(args.config).exists():
            overrides.insert(0, args.config)
        elif args.config is not None:
            path = pathlib.Path(args.config)
            if not path.is_file():
                raise DlmjaxError(f"no config file at {args.config}")
            text = path.read_text()
        config = parse_config(text, overrides)
        limit = parse_bytes(args.device_memory) if args.device_memory else None
        if args.target and not args.dry_run:
            raise DlmjaxError("--target sizes a run for a TPU slice; use it with --dry-run")
        if args.dry_run:
            devices = _mesh_devices(config.mesh)
            os.environ["JAX_PLATFORMS"] = "cpu"  # compile only; the mesh's devices are simulated or the target's
            if not args.target:
                os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}").strip()
            from dlmjax.config import from_hf_config
            from dlmjax.hub import resolve

            hf_config = resolve(config.model.name) / "config.json"
            if not hf_config.is_file():
                converted = resolve(config.model.name) / "hf" / "config.json"
                hf_config = converted if converted.is_file() else hf_config
            if not hf_config.is_file():
                raise DlmjaxError(f"{config.model.name} has no config.json; --dry-run needs only that file")
            dry_run(config, from_hf_config(json.loads(hf_config.read_text())), limit, target=args.target)
            return 0
        summary = run(config)
        if is_primary():
            print(json.dumps(summary))
        return 0
    except DlmjaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
