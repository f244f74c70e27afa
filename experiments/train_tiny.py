"""Train the tiny models on the task suite (experiments/tasks.py) and export them.

    python experiments/train_tiny.py tiny-llada            # LLaDA architecture, masked diffusion
    python experiments/train_tiny.py tiny-ar               # Qwen2 architecture, next-token loss

Each run trains from scratch with `dlmjax.train` (optax AdamW, orbax checkpoints in
--run-dir, so a killed run continues where it stopped when restarted with the same
command), evaluates on the test split with the model's baseline decoder, and writes a
Hugging Face directory (bf16 safetensors, config.json, tokenizer) to --out, by default the
package's embedded copy in dlmjax/models/NAME, plus train_log.json with the command, the
steps, the time and the accuracy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import shutil
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import tasks  # noqa: E402

from dlmjax.config import from_hf_config  # noqa: E402
from dlmjax.testing import tiny_hf_config  # noqa: E402
from dlmjax.tokenizer import load_tokenizer  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROMPT_LENGTH = 32  # = lm.generate's prompt bucket, so training and decoding place prompts alike
GEN_LENGTH = 32  # the canvas the diffusion model fills: answer (<= 31 tokens), then EOS
POSITIONS = 256  # max_position_embeddings of both tiny models (and their tokenizer's model_max_length)

# name -> architecture and training recipe
RECIPES = {
    # Masked diffusion learns this task far more slowly than next-token training (about ten
    # times the steps for the same accuracy). The run first completed a 9000-step cosine
    # schedule (87.1% on the test split), then continued to 11000 steps under an 11000-step
    # schedule (its learning rate at step 9000 is 3.5e-4, decaying to 2e-4). `stages` lists
    # the schedules run to completion before the last, so the command replays exactly that.
    "tiny-llada": dict(
        family="llada", objective="mdm", hidden=160, layers=4, heads=5, mlp=480, steps=11000, batch=64, lr=2e-3,
        warmup=100, stages=[9000],
    ),
    "tiny-ar": dict(
        family="qwen2", objective="ar", hidden=160, layers=4, heads=5, mlp=480, steps=800, batch=64, lr=2e-3,
        warmup=100,
    ),
}


def hf_config(recipe: dict) -> dict:
    """config.json of the real family's format, with the task tokenizer's special ids."""
    ids = tasks.token_ids()
    special = dict(
        mask_token_id=ids[tasks.MASK], eos_token_id=ids[tasks.EOS], pad_token_id=ids[tasks.PAD],
        eot_token_id=ids[tasks.EOT], bos_token_id=ids[tasks.BOS],
    )
    common = dict(vocab_size=tasks.VOCAB_SIZE, hidden_size=recipe["hidden"], num_layers=recipe["layers"],
                  num_heads=recipe["heads"], intermediate_size=recipe["mlp"], max_positions=POSITIONS)
    if recipe["family"] == "llada":
        config = tiny_hf_config("llada", **common)
    else:
        config = tiny_hf_config(recipe["family"], tie_word_embeddings=True, **common)
    config.update(special)
    return config


def write_template(directory: pathlib.Path, recipe: dict) -> pathlib.Path:
    """config.json + tokenizer files: everything of the HF directory but the weights."""
    tasks.write_tokenizer(directory, POSITIONS)
    config = hf_config(recipe)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    # max_new_tokens: the canvas the model was trained to fill; `python -m dlmjax.generate` defaults to it.
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    (directory / "generation_config.json").write_text(json.dumps({**generation, "max_new_tokens": GEN_LENGTH}, indent=2) + "\n")
    return directory


def training_arrays(tokenizer, n: int, objective: str, seed: int = 0) -> dict[str, np.ndarray]:
    from dlmjax.train import sft_arrays

    examples = tasks.make_split("train", n, seed)
    prompts = [tasks.encode_prompt(tokenizer, e.prompt) for e in examples]
    answers = tokenizer([e.answer for e in examples], add_special_tokens=False)["input_ids"]
    ids = tasks.token_ids()
    return sft_arrays(prompts, answers, prompt_length=PROMPT_LENGTH, gen_length=GEN_LENGTH, pad_id=ids[tasks.PAD],
                      eos_id=ids[tasks.EOS], objective=objective)


def baseline_kwargs(family: str) -> dict:
    """The decoder each model is judged with: LLaDA with one token per step, or greedy AR."""
    if family == "qwen2":
        return dict(method="ar", gen_length=GEN_LENGTH)
    return dict(method="llada", gen_length=GEN_LENGTH, steps=GEN_LENGTH)


def evaluate(lm, tokenizer, examples, *, batch_size: int = 64, per_example: bool = False, **generate_kwargs) -> dict:
    """Accuracy, mean NFE per row and tokens/s of `lm.generate` on `examples` (and with
    per_example, whether each was answered right: "correct", in order)."""
    correct, nfe, seconds, generated, right = 0, 0.0, 0.0, 0, []
    eos = tasks.token_ids()[tasks.EOS]
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        prompts = [tasks.encode_prompt(tokenizer, e.prompt) for e in chunk]
        out = lm.generate(prompts, **generate_kwargs)
        for example, row in zip(chunk, out.tokens):
            row = list(row)
            answer = row[: row.index(eos)] if eos in row else row
            generated += len(answer) + (1 if eos in row else 0)
            right.append(bool(tasks.is_correct(example, tokenizer.decode(answer))))
            correct += right[-1]
        nfe += float(np.sum(out.nfe))
        seconds += out.seconds
    metrics = {"accuracy": correct / len(examples), "mean_nfe": nfe / len(examples), "seconds": seconds,
               "tokens_per_s": generated / max(seconds, 1e-9), "examples": len(examples)}
    return {**metrics, "correct": right} if per_example else metrics


def in_memory_lm(model):
    from dlmjax.lm import LM

    return LM(model)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=sorted(RECIPES))
    parser.add_argument("--out", type=pathlib.Path, help="HF output directory (default dlmjax/models/NAME)")
    parser.add_argument("--run-dir", type=pathlib.Path, help="checkpoints and metrics (default runs/NAME)")
    parser.add_argument("--steps", type=int, help="override the recipe's step count")
    parser.add_argument("--train-examples", type=int, default=300_000)
    parser.add_argument("--test-examples", type=int, default=512)
    parser.add_argument("--eval-every", type=int, default=400, help="checkpoint, and evaluate on 64 test problems, every N steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from dlmjax.train import TrainConfig, init_model, train

    recipe = dict(RECIPES[args.name])
    if args.steps:
        recipe["steps"] = args.steps
    out = args.out or ROOT / "dlmjax" / "models" / args.name
    run_dir = args.run_dir or ROOT / "runs" / args.name
    template = write_template(pathlib.Path(tempfile.mkdtemp(prefix="dlmjax-template-")), recipe)
    tokenizer = load_tokenizer(template)
    cfg = from_hf_config(json.loads((template / "config.json").read_text()))
    arrays = training_arrays(tokenizer, args.train_examples, recipe["objective"], args.seed)
    test = tasks.make_split("test", args.test_examples, args.seed)
    tc = TrainConfig(
        objective=recipe["objective"], steps=recipe["steps"], batch_size=recipe["batch"], learning_rate=recipe["lr"],
        warmup_steps=recipe["warmup"], seed=args.seed, save_every=args.eval_every, keep=2, log_every=50,
    )

    def on_save(step, model):
        metrics = evaluate(in_memory_lm(model), tokenizer, test[:64], **baseline_kwargs(cfg.family))
        print(f"step {step}: accuracy {metrics['accuracy']:.3f} on 64 test problems, mean NFE {metrics['mean_nfe']:.1f}",
              flush=True)

    start = time.perf_counter()
    if not args.steps:
        for schedule_steps in recipe.get("stages", []):  # earlier schedules, each run to its end in run_dir
            train(init_model(cfg, args.seed), arrays, run_dir, dataclasses.replace(tc, steps=schedule_steps),
                  on_save=on_save, log=print)
    result = train(init_model(cfg, args.seed), arrays, run_dir, tc, on_save=on_save, log=print)
    train_seconds = time.perf_counter() - start
    lm = in_memory_lm(result.model)
    from dlmjax.convert.hf_export import export_lm

    export_lm(lm, out, dtype="bfloat16", hf_dir=template, overwrite=True)
    shutil.rmtree(template, ignore_errors=True)

    import dlmjax

    exported = dlmjax.load(out, dtype="float32", progress=False)
    metrics = evaluate(exported, tokenizer, test, **baseline_kwargs(cfg.family))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(exported.state))
    log = {
        "command": " ".join(["python", "experiments/train_tiny.py", *(argv if argv is not None else sys.argv[1:])]),
        "architecture": {k: recipe[k] for k in ("family", "hidden", "layers", "heads", "mlp")},
        "parameters": n_params,
        "train": {**dataclasses.asdict(tc), "stages": [] if args.steps else recipe.get("stages", []),
                  "train_examples": args.train_examples,
                  "prompt_length": PROMPT_LENGTH, "gen_length": GEN_LENGTH},
        "final_loss": result.history[-1]["loss"] if result.history else None,
        "train_seconds_this_call": round(train_seconds, 1),
        "resumed_from": result.resumed_from,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores ({jax.devices()[0].platform}), jax {jax.__version__}",
        "eval": {"decoder": baseline_kwargs(cfg.family), "weights": "bfloat16 checkpoint, run in float32", **metrics},
    }
    (out / "train_log.json").write_text(json.dumps(log, indent=2) + "\n")
    print(json.dumps(log["eval"], indent=2))


if __name__ == "__main__":
    main()
