"""LoRA adapters trained by dlmjax leave as PEFT adapters: `lm.save_adapter` writes a directory that
PyTorch's `peft.PeftModel.from_pretrained` loads onto the transformers model (Qwen2 for Dream;
the LLaDA reference is a Llama, so its adapter's module names are mapped as the reference maps the
weights), giving dlmjax's logits, and that `dlmjax.load(base, adapter=...)` loads back."""

import json
import shutil

import numpy as np
import peft
import pytest
import torch

from torch_reference import _LLADA_BLOCK, load_reference, reference_logits

import dlmjax
from dlmjax.convert import safetensors_io
from dlmjax.errors import DlmjaxError
from dlmjax.model import PROJECTIONS, LoRAConfig
from dlmjax.testing import write_tiny_checkpoint
from dlmjax.train import TrainConfig, sft_arrays, train

IDS = np.random.default_rng(0).integers(0, 96, (2, 20))


def _llama_names(adapter, out):
    """The LLaDA adapter with the module names of the Llama the torch reference builds."""
    tensors = safetensors_io.read_header(adapter / "adapter_model.safetensors")
    renamed = {}
    for name, info in tensors.items():
        head, rest = name.split(".transformer.blocks.")
        layer, module, tail = rest.split(".", 2)
        renamed[f"{head}.layers.{layer}.{_LLADA_BLOCK[module]}.{tail}"] = safetensors_io.load_tensor(info)
    out.mkdir()
    safetensors_io.save_file(renamed, out / "adapter_model.safetensors", metadata={"format": "pt"})
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["target_modules"] = sorted({_LLADA_BLOCK[m].split(".")[-1] for m in config["target_modules"]})
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("family", ["dream", "llada"])
def test_a_trained_adapter_loads_in_peft_and_back(tmp_path, family):
    base = write_tiny_checkpoint(tmp_path / "base", family, seed=5, num_heads=4, num_kv_heads=2 if family == "dream" else 4)
    lm = dlmjax.load(base, progress=False)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, 90, 5)) for _ in range(8)]
    answers = [list(rng.integers(0, 90, 4)) for _ in range(8)]
    eos = lm.config.eos_token_id if lm.config.eos_token_id is not None else 1
    arrays = sft_arrays(prompts, answers, prompt_length=8, gen_length=8, pad_id=eos, eos_id=eos, objective="mdm")
    lora = LoRAConfig(rank=4, alpha=8.0, targets=PROJECTIONS)
    tc = TrainConfig(steps=10, batch_size=8, learning_rate=5e-2, warmup_steps=1, save_every=10, log_every=10)
    trained = dlmjax.LM(train(lm.model, arrays, tmp_path / "run", tc, lora=lora, progress=False).model, source=str(base))
    adapter = trained.save_adapter(tmp_path / "adapter")
    ours = trained.logits(IDS)
    assert np.abs(ours - lm.logits(IDS)).max() > 1e-3  # training moved the adapters

    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["base_model_name_or_path"] == str(base)
    back = dlmjax.load(base, adapter=adapter, lora="keep", progress=False)
    assert np.abs(back.logits(IDS) - ours).max() <= 1e-5

    reference, ref_family = load_reference(str(base), torch.float32)
    peft_dir = _llama_names(adapter, tmp_path / "llama-adapter") if family == "llada" else adapter
    with_adapter = peft.PeftModel.from_pretrained(reference, str(peft_dir))
    theirs = reference_logits(with_adapter.get_base_model(), ref_family, IDS)
    assert np.abs(theirs - ours).max() <= 1e-4

    with pytest.raises(DlmjaxError, match="exists; pass overwrite=True"):
        trained.save_adapter(adapter)
    with pytest.raises(DlmjaxError, match="has no LoRA adapters"):
        lm.save_adapter(tmp_path / "none")
    assert not (tmp_path / "none").exists()
    shutil.rmtree(tmp_path / "run")
