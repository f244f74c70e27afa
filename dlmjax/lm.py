"""`dlmjax.load` and the `LM` handle: the stable surface for notebooks, CLIs and outside checks."""

from __future__ import annotations

import collections
import functools
import os
import pathlib
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dlmjax import checkpoint, hub
from dlmjax.attention import MASK_MODES, attention_mask
from dlmjax.config import ModelConfig
from dlmjax.errors import DlmjaxError, PromptTooLong
from dlmjax.model import LoRAConfig, Transformer, position_ids
from dlmjax.sharding import on_model_mesh

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _dtype_name(dtype) -> str:
    if dtype is None:
        return None
    name = jnp.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in _DTYPES:
        raise DlmjaxError(f"dtype {dtype!r} is not supported; use 'bfloat16' or 'float32'")
    return name


@functools.partial(jax.jit, static_argnames=("graphdef", "mode", "block_size", "layout"))
def _forward_logits(graphdef, state, input_ids, mask, prompt_length, mode, block_size, layout=None):
    model = nnx.merge(graphdef, state)
    positions = position_ids(model.config, mask)
    attn = attention_mask(mode, mask, block_size=block_size, prompt_length=prompt_length)
    logits, _ = model(input_ids, positions, attn, layout=layout)
    return logits


class CompiledPrograms:
    """The decode programs one model compiled, keyed by their static structure (method, special
    tokens, input shape, dtype, attention kernel), least recently used first.

    They belong to the `LM` that compiled them, so dropping the model frees them. At most
    `capacity` are kept (each holds device code and buffers); `clear()` drops them all."""

    def __init__(self, capacity: int = 32):
        if capacity < 1:
            raise DlmjaxError(f"capacity {capacity} must be at least 1; it bounds how many compiled programs a model keeps")
        self.capacity = capacity
        self._programs: collections.OrderedDict = collections.OrderedDict()

    def get(self, key, build) -> tuple[Any, float]:
        """The program for `key`, compiling it with `build()` if it is not kept: (program, compile seconds)."""
        if key in self._programs:
            self._programs.move_to_end(key)
            return self._programs[key], 0.0
        start = time.perf_counter()
        program = build()
        seconds = time.perf_counter() - start
        self._programs[key] = program
        while len(self._programs) > self.capacity:
            self._programs.popitem(last=False)
        return program, seconds

    def last(self):
        """The most recently used program (e.g. to read its HLO), or None."""
        return next(reversed(self._programs.values()), None)

    def clear(self) -> None:
        self._programs.clear()

    def __len__(self) -> int:
        return len(self._programs)

    def __contains__(self, key) -> bool:
        return key in self._programs


class LM:
    """A loaded model: config, tokenizer, parameters, and the pure functions that use them."""

    def __init__(self, model: Transformer, *, directory: pathlib.Path | None = None, source: str = "", mesh=None, rules=None):
        self.config: ModelConfig = model.config
        self.mesh = mesh  # a jax Mesh (data, fsdp, tensor) the parameters are sharded over, or None
        self.rules = rules
        self.lora: LoRAConfig | None = model.lora
        self.graphdef, self.state = nnx.split(model)
        self.directory = directory  # the converted checkpoint, if any
        self.source = source
        self.dtype = model.embed[...].dtype
        self._tokenizer = None
        self.compiled = CompiledPrograms()  # the decode programs of this model (lm.compiled.clear() frees them)

    @property
    def layout(self):
        """The `dlmjax.sharding.Layout` the activations follow under the mesh; None on one device."""
        if self.mesh is None:
            return None
        from dlmjax.sharding import Layout

        return Layout(self.mesh, self.rules)

    @property
    def model(self) -> Transformer:
        return nnx.merge(self.graphdef, self.state)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"LM({c.family}, layers={c.num_layers}, hidden={c.hidden_size}, heads={c.num_heads}/{c.num_kv_heads}, "
            f"vocab={c.vocab_size}, dtype={jnp.dtype(self.dtype).name}, source={self.source!r})"
        )

    # -- tokenizer ----------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from dlmjax.tokenizer import load_tokenizer

            if self.directory is None or not (self.directory / "hf").is_dir():
                raise DlmjaxError("this model was built in memory and has no tokenizer; load it from a checkpoint directory")
            # model_max_length = the model's positions, not whatever the tokenizer file says
            self._tokenizer = load_tokenizer(self.directory / "hf", positions=self.config.max_position_embeddings)
        return self._tokenizer

    def apply_chat_template(self, messages: Sequence[dict], tokenize: bool = True):
        """Token ids (or text, with tokenize=False) of a conversation plus the assistant header."""
        from dlmjax.tokenizer import apply_chat_template

        return apply_chat_template(self.tokenizer, self.config.family, messages, tokenize=tokenize)

    @property
    def default_gen_length(self) -> int:
        """max_new_tokens of the checkpoint's generation_config.json (the canvas a small model was
        trained to fill), else 128."""
        import json

        if self.directory is not None:
            path = self.directory / "hf" / "generation_config.json"
            if path.is_file():
                value = json.loads(path.read_text()).get("max_new_tokens")
                if isinstance(value, int) and value > 0:
                    return value
        return 128

    # -- forward ------------------------------------------------------------------
    def check_inputs(self, input_ids, attention_mask=None) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise DlmjaxError(f"input_ids must be a non-empty integer array [batch, length], got {ids.dtype} {list(ids.shape)}")
        if ids.shape[1] > self.config.max_position_embeddings:
            raise PromptTooLong(
                f"input length {ids.shape[1]} exceeds the model's {self.config.max_position_embeddings} positions; "
                "shorten the input"
            )
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise DlmjaxError(f"token ids must lie in [0, {self.config.vocab_size}); got {ids.min()}..{ids.max()}")
        mask = np.ones_like(ids, dtype=np.int32) if attention_mask is None else np.asarray(attention_mask)
        if mask.ndim == 1:
            mask = mask[None]
        if mask.shape != ids.shape:
            raise DlmjaxError(f"attention_mask shape {list(mask.shape)} differs from input_ids shape {list(ids.shape)}")
        if not mask.any(axis=1).all():
            raise DlmjaxError("a row of attention_mask is all zeros; every row needs at least one real token")
        return ids.astype(np.int32), mask.astype(np.int32)

    @on_model_mesh
    def logits(
        self,
        input_ids,
        attention_mask=None,
        *,
        mode: str | None = None,
        block_size: int | None = None,
        prompt_length: int | None = None,
    ) -> np.ndarray:
        """Raw per-position outputs, float32 [B, L, V], before Dream's shift.

        input_ids is an int array [B, L], left-padded where rows differ; attention_mask marks
        real tokens with 1. `mode` picks the attention: "bidirectional" (the default of
        diffusion models), "causal" (the default of autoregressive ones, whose output i
        predicts token i + 1), "block_causal" (blocks of `block_size` from position 0,
        Fast-dLLM v2) or "prompt_block_causal" (the first `prompt_length` tokens as one block,
        then blocks of `block_size`, D2F).
        """
        if mode is None:
            mode = "causal" if self.config.is_autoregressive else "bidirectional"
        if mode not in MASK_MODES:
            raise DlmjaxError(f"unknown attention mode {mode!r}; use one of {', '.join(MASK_MODES)}")
        if mode in ("block_causal", "prompt_block_causal") and not block_size:
            raise DlmjaxError(f"mode {mode!r} needs block_size")
        if mode == "prompt_block_causal" and prompt_length is None:
            raise DlmjaxError("mode 'prompt_block_causal' needs prompt_length")
        ids, mask = self.check_inputs(input_ids, attention_mask)
        ids, mask = self.place_batch(ids), self.place_batch(mask)
        out = _forward_logits(self.graphdef, self.state, ids, mask, prompt_length or 0, mode, block_size, self.layout)
        if self.mesh is not None:
            from dlmjax.sharding import to_host

            out = to_host(out)  # every process gets the whole batch
        return np.array(out, dtype=np.float32)  # a writable host copy

    def place_batch(self, array):
        """Put a [B, ...] input on the device(s): split over the mesh's batch axes when B divides.
        Under a multi-host mesh every process passes the same whole array and keeps its shards."""
        if self.mesh is None:
            return jnp.asarray(array)
        from dlmjax.sharding import batch_sharding, put_global

        return put_global(array, batch_sharding(self.mesh, self.rules, np.shape(array)))

    # -- decoding -----------------------------------------------------------------
    def generate(self, prompts_or_ids, attention_mask=None, **kwargs):
        """Decode on the device; see `dlmjax.decode.generate` for the methods and knobs.

        Returns tokens [B, gen_length], texts, per-row nfe, steps, trajectory and seconds."""
        from dlmjax.decode import generate

        return generate(self, prompts_or_ids, attention_mask, **kwargs)

    def stream(self, prompts_or_ids, attention_mask=None, *, every: str = "block", **kwargs):
        """Decode as `generate` does, yielding each row's text committed so far as blocks finish
        (every="block") or after every forward pass (every="step"); the last update (`final`)
        carries generate's output, with the same tokens. See `dlmjax.decode.stream`."""
        from dlmjax.decode.stream import stream

        return stream(self, prompts_or_ids, attention_mask, every=every, **kwargs)

    # -- export -------------------------------------------------------------------
    def save_pretrained(self, dst: str | os.PathLike, *, max_shard_bytes: int = 5 * 2**30, overwrite: bool = False) -> pathlib.Path:
        """Export to a Hugging Face directory (safetensors + config + tokenizer) that PyTorch loads."""
        from dlmjax.convert.hf_export import export_lm

        return export_lm(self, dst, max_shard_bytes=max_shard_bytes, overwrite=overwrite)


    def save_adapter(self, dst: str | os.PathLike, *, overwrite: bool = False) -> pathlib.Path:
        """Write the LoRA adapters (trained with `dlmjax.train.train(..., lora=...)` or loaded with
        lora="keep") as a PEFT adapter directory: `peft.PeftModel.from_pretrained` loads it onto the
        PyTorch model, and `dlmjax.load(base, adapter=dst)` loads it back."""
        from dlmjax.convert.lora import write_adapter

        return write_adapter(self.model, dst, base_name=self.source, overwrite=overwrite)


def _release_freed_memory() -> None:
    """Hand the restore buffers glibc keeps after each group back to the OS (Linux only):
    without it a loaded model holds ~1.25x its size on the host instead of ~1x."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def restore(directory: pathlib.Path, dtype: str | None = None, source: str = "", mesh=None, rules=None) -> LM:
    """Build an LM from a converted directory, one group at a time, straight onto the
    device, or onto each parameter's shardings over `mesh` (no full copy on one device)."""
    cfg, lora, manifest = checkpoint.read_manifest(directory)
    dtype = _dtype_name(dtype) or cfg.dtype
    abstract = nnx.eval_shape(lambda: Transformer(cfg, dtype=_DTYPES[dtype], lora=lora))
    graphdef, abs_state = nnx.split(abstract)
    shapes = nnx.to_pure_dict(abs_state)
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        pure = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), shapes)
    else:
        from dlmjax import sharding

        mesh = sharding.resolve_mesh(mesh)  # any user mesh -> the same devices, all axes Auto
        rules = sharding.fit_rules(rules or sharding.ShardingRules.preset("fsdp_tp"), mesh, cfg)
        shardings = sharding.param_shardings(abs_state, mesh, rules)
        pure = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
    for group in manifest["groups"]:
        restored = checkpoint.read_group(directory, group, checkpoint.group_subtree(pure, group))
        checkpoint.set_group_subtree(pure, group, restored)
        _release_freed_memory()
    nnx.replace_by_pure_dict(abs_state, pure)
    return LM(
        nnx.merge(graphdef, abs_state), directory=directory, source=source or manifest.get("source", ""), mesh=mesh, rules=rules
    )


def load(
    name_or_path: str | os.PathLike,
    dtype: Any = None,
    *,
    adapter: str | os.PathLike | None = None,
    lora: str = "merge",
    allow_pickle: bool = False,
    progress: bool = True,
    mesh=None,
    rules=None,
) -> LM:
    """Load a model from a local Hugging Face directory, a converted dlmjax directory, or a hub id.

    Hugging Face checkpoints are converted once into the cache ($DLMJAX_CACHE, default
    ~/.cache/dlmjax) and reused. `dtype` ("bfloat16" or "float32") defaults to the
    checkpoint's. `adapter` is a PEFT LoRA adapter (directory or hub id), merged into the
    weights or, with lora="keep", kept as LoRA parameters. `mesh` (a jax Mesh over data /
    fsdp / tensor, or a string such as "data=2,tensor=4") places every parameter straight
    onto its sharding under `rules` (a `dlmjax.sharding.ShardingRules`, default the fsdp_tp
    preset; axes of size 1 cost nothing).
    """
    dtype = _dtype_name(dtype)
    path = hub.resolve(name_or_path)
    if checkpoint.is_converted(path):
        if adapter is not None:
            raise DlmjaxError(f"{path} is already converted; pass the adapter when converting the Hugging Face model")
        return restore(path, dtype, source=str(name_or_path), mesh=mesh, rules=rules)
    from dlmjax.convert.hf_import import convert

    adapter_dir = hub.resolve(adapter) if adapter is not None else None
    extra = {"lora": lora, "adapter": hub.fingerprint(adapter_dir) if adapter_dir else None}
    converted = hub.cached_conversion_dir(path, extra)
    if not checkpoint.is_converted(converted):
        start = time.perf_counter()
        convert(name_or_path, converted, adapter=adapter_dir, lora=lora, allow_pickle=allow_pickle, overwrite=True, progress=progress)
        if progress:
            # stderr: stdout belongs to the caller (e.g. `python -m dlmjax.generate --json`)
            print(f"dlmjax: converted {name_or_path} into {converted} in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return restore(converted, dtype, source=str(name_or_path), mesh=mesh, rules=rules)
