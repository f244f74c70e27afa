"""PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors), as D2F and
dParallel publish them: validated against the base model, then merged or kept."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

from dlmjax.config import ModelConfig
from dlmjax.errors import DlmjaxError
from dlmjax.hub import looks_like_hub_id
from dlmjax.model import ROLES, LoRAConfig, layer_roles

from . import layouts, safetensors_io


@dataclasses.dataclass
class Adapter:
    path: pathlib.Path
    config: LoRAConfig
    factors: dict[tuple[int, str], tuple[safetensors_io.TensorInfo, safetensors_io.TensorInfo]]  # (layer, role) -> (A, B)
    roles: tuple[tuple[str, ...], ...] = ()  # per layer, the projections the base model has there

    def merge_into(self, layer: int | None, role: str | None, weight: np.ndarray) -> np.ndarray:
        """W + scale * B @ A, computed in float32 and cast back to W's dtype."""
        if (layer, role) not in self.factors:
            return weight
        a, b = (safetensors_io.load_tensor(i).astype(np.float32) for i in self.factors[layer, role])
        return (weight.astype(np.float32) + self.config.scale * (b @ a)).astype(weight.dtype)

    def layer_factors(self, layer: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """A [r, in] and B [out, r] for every target role of one layer (zeros where the
        adapter skips the layer, which leaves it unchanged)."""
        out = {}
        for role in self.config.targets:
            if role not in self.roles[layer]:
                continue  # (a mixture-of-experts layer has no dense MLP)
            if (layer, role) in self.factors:
                out[role] = tuple(safetensors_io.load_tensor(i) for i in self.factors[layer, role])
            else:
                a_info, b_info = next(v for (_, r), v in self.factors.items() if r == role)
                out[role] = (np.zeros(a_info.shape, a_info.dtype), np.zeros(b_info.shape, b_info.dtype))
        return out


def _unsupported(path, what) -> DlmjaxError:
    return DlmjaxError(f"the LoRA adapter in {path} uses {what}, which dlmjax does not support; use a plain LoRA adapter")


def read_adapter(path: pathlib.Path, cfg: ModelConfig, base_name: str) -> Adapter:
    """Read and validate an adapter against the base model's config."""
    config_path = path / "adapter_config.json"
    if not config_path.is_file():
        raise DlmjaxError(f"{path} has no adapter_config.json; pass a PEFT LoRA adapter directory as --adapter")
    try:
        acfg = json.loads(config_path.read_text())
    except ValueError as e:
        raise DlmjaxError(f"{config_path} is not valid JSON ({e}); re-download the adapter") from None
    if str(acfg.get("peft_type", "LORA")).upper() != "LORA":
        raise _unsupported(path, f"peft_type {acfg.get('peft_type')}")
    for key, what in (("use_dora", "DoRA"), ("rank_pattern", "per-module ranks"), ("alpha_pattern", "per-module alphas"),
                      ("modules_to_save", "modules_to_save"), ("fan_in_fan_out", "fan_in_fan_out")):
        if acfg.get(key):
            raise _unsupported(path, what)
    if acfg.get("bias", "none") != "none":
        raise _unsupported(path, f"bias='{acfg['bias']}'")
    named_base = acfg.get("base_model_name_or_path")
    if named_base and looks_like_hub_id(named_base) and looks_like_hub_id(base_name) and named_base.lower() != base_name.lower():
        raise DlmjaxError(
            f"the LoRA adapter in {path} was trained on {named_base}, not {base_name}; pass {named_base} as the base model"
        )
    rank, alpha = int(acfg["r"]), float(acfg.get("lora_alpha", acfg["r"]))
    if acfg.get("use_rslora"):
        alpha = alpha / rank**0.5 * rank  # rsLoRA scales by alpha / sqrt(r); store the equivalent alpha

    modules = {}  # Hugging Face module name -> (layer, role)
    for layer in range(cfg.num_layers):
        for ours, theirs in layouts.block_names(cfg).items():
            if ours in layer_roles(cfg, layer):
                modules[layouts.block_prefix(cfg, layer) + theirs] = (layer, ours)
    infos = safetensors_io.index_checkpoint(_adapter_file(path))
    pairs: dict[tuple[int, str], dict[str, safetensors_io.TensorInfo]] = {}
    problems = []
    for name, info in infos.items():
        module, _, kind = name.removeprefix("base_model.model.").replace(".default", "").rpartition(".lora_")
        if kind in ("A.weight", "B.weight") and cfg.num_experts and ".mlp." in module and module not in modules:
            raise DlmjaxError(f"the LoRA adapter in {path} adapts the mixture of experts ({module}), which dlmjax does not "
                              "support; use adapters on attention (query_key_value, dense) and the dense layers' MLP")
        if kind not in ("A.weight", "B.weight") or module not in modules:
            problems.append(f"{name} matches no projection of the base model")
            continue
        layer, role = modules[module]
        d_out, d_in = layouts.projection_shape(cfg, role)
        want = (rank, d_in) if kind == "A.weight" else (d_out, rank)
        if tuple(info.shape) != want:
            problems.append(f"{name} is {list(info.shape)}, the base model needs {list(want)}")
        pairs.setdefault((layer, role), {})[kind[0]] = info
    incomplete = [f"layer {l} {r}" for (l, r), p in pairs.items() if set(p) != {"A", "B"}]
    if incomplete:
        problems.append("A or B missing for " + ", ".join(incomplete[:4]))
    if problems or not pairs:
        detail = "; ".join(problems[:4]) + (f"; ... ({len(problems)} problems)" if len(problems) > 4 else "")
        raise DlmjaxError(
            f"the LoRA adapter in {path} does not fit this {cfg.family} base model ({detail or 'it holds no LoRA tensors'}); "
            f"pass the base model it was trained on{f' ({named_base})' if named_base else ''}"
        )
    targets = tuple(sorted({role for _, role in pairs}, key=ROLES.index))
    factors = {key: (p["A"], p["B"]) for key, p in pairs.items()}
    roles = tuple(layer_roles(cfg, layer) for layer in range(cfg.num_layers))
    return Adapter(path=path, config=LoRAConfig(rank=rank, alpha=alpha, targets=targets), factors=factors, roles=roles)


def _adapter_file(path: pathlib.Path) -> pathlib.Path:
    file = path / "adapter_model.safetensors"
    if file.is_file():
        return file
    if (path / "adapter_model.bin").is_file():
        raise DlmjaxError(f"{path} holds a pickled adapter_model.bin; convert it to adapter_model.safetensors first")
    raise DlmjaxError(f"{path} has no adapter_model.safetensors; pass a complete PEFT adapter directory")


def write_adapter(model, directory, *, base_name: str = "", overwrite: bool = False) -> pathlib.Path:
    """Write `model`'s LoRA adapters as a PEFT adapter directory (adapter_config.json and
    adapter_model.safetensors, PEFT's tensor names base_model.model.<HF module>.lora_{A,B}.weight)
    that `peft.PeftModel.from_pretrained` loads onto the Hugging Face model and `dlmjax.load(base,
    adapter=...)` loads back. Written to a temporary directory first, then renamed."""
    import jax
    from flax import nnx

    from .hf_import import atomic_directory  # hf_import imports this module

    cfg, lora = model.config, model.lora
    if lora is None:
        raise DlmjaxError("the model has no LoRA adapters to save; train with lora=LoRAConfig(...) or load with lora='keep'")
    directory = pathlib.Path(directory)
    if directory.exists() and not overwrite:
        raise DlmjaxError(f"{directory} exists; pass overwrite=True or another directory")
    state = nnx.to_pure_dict(nnx.state(model))
    names = layouts.block_names(cfg)
    tensors = {}
    for layer in range(cfg.num_layers):
        for role in lora.targets:
            if role not in layer_roles(cfg, layer):
                continue  # (a mixture-of-experts layer has no dense MLP)
            module = layouts.block_prefix(cfg, layer) + names[role]
            linear = state["layers"][layer][role]
            tensors[f"base_model.model.{module}.lora_A.weight"] = np.asarray(jax.device_get(linear["lora_a"]))
            tensors[f"base_model.model.{module}.lora_B.weight"] = np.asarray(jax.device_get(linear["lora_b"]))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
        "target_modules": sorted({names[role].split(".")[-1] for role in lora.targets}), "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "base_model_name_or_path": base_name,
    }
    with atomic_directory(directory, overwrite) as staging:
        safetensors_io.save_file(tensors, staging / "adapter_model.safetensors", metadata={"format": "pt"})
        (staging / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory
