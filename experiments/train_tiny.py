"""Train the tiny models on the task suite (experiments/tasks.py) and export them.

    python experiments/train_tiny.py tiny-llada            # LLaDA architecture, masked diffusion
    python experiments/train_tiny.py tiny-ar               # Qwen2 architecture, next-token loss
    python experiments/train_tiny.py tiny-llada-v2         # task suite v2, from tiny-llada's weights
    python experiments/train_tiny.py tiny-ar-v2            # task suite v2, from scratch
    python experiments/train_tiny.py tiny-fdv2             # tiny-ar-v2 as block diffusion, Fast-dLLM v2's fine-tuning
    python experiments/train_tiny.py tiny-dream-v2         # tiny-ar-v2 as Dream (masked diffusion from AR weights)

Each recipe is a config of the training CLI (experiments/configs/NAME.yaml: objective, steps,
batch, learning rate, eval hook), and this script runs it through `python -m dlmjax.train`'s own
entry point: it writes the architecture's config.json and the task tokenizer as a randomly
initialised checkpoint (the run trains from scratch, `model.init`; a recipe with `init_from` starts
from an embedded model's weights instead, and one with `base` from an embedded model converted, as
tiny-fdv2 from tiny-ar-v2 written as block diffusion), the training and held-out
rows as JSONL, then runs the CLI into --run-dir (orbax checkpoints, metrics.jsonl, eval.jsonl
with the baseline decoder's accuracy on 64 test problems at every save; a killed run continues
where it stopped when restarted with the same command). It then exports the CLI's `final/`
as a bf16 Hugging Face directory to --out, by default the package's embedded copy in
dlmjax/models/NAME, evaluates it on the test split with the model's baseline decoder, and
writes train_log.json with the command, the config, the steps, the time and the accuracy.
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

CONFIGS = ROOT / "experiments" / "configs"

# name -> architecture, and the training CLI config that holds the recipe
RECIPES = {
    # Masked diffusion learns this task far more slowly than next-token training (about ten
    # times the steps for the same accuracy). The run first completes a 9000-step cosine
    # schedule (87.1% on the test split), then continues to the config's 11000 steps under an
    # 11000-step schedule (its learning rate at step 9000 is 3.5e-4, decaying to 2e-4).
    # `stages` lists the schedules run to completion before the config's own.
    "tiny-llada": dict(family="llada", hidden=160, layers=4, heads=5, mlp=480, config="tiny-llada.yaml", stages=[9000]),
    "tiny-ar": dict(family="qwen2", hidden=160, layers=4, heads=5, mlp=480, config="tiny-ar.yaml"),
    # Task suite v2 (64-token canvas, longer dependent chains): the same architectures. tiny-llada-v2
    # starts from tiny-llada's weights (`init_from`; v2's tokenizer keeps v1's ids): masked diffusion
    # from scratch needed 11000 steps on v1, and a first v2 run from scratch was still at 0% after 750.
    "tiny-llada-v2": dict(family="llada", hidden=160, layers=4, heads=5, mlp=480, config="tiny-llada-v2.yaml", suite="v2",
                          init_from="tiny-llada"),
    "tiny-ar-v2": dict(family="qwen2", hidden=160, layers=4, heads=5, mlp=480, config="tiny-ar-v2.yaml", suite="v2"),
    # The seeds' recipes in tiny (issue 14's proofs), each from an embedded model (`base`) rather than
    # from scratch. tiny-fdv2: tiny-ar-v2 written as block diffusion with blocks of `bd_size`, then
    # Fast-dLLM v2's fine-tuning.
    "tiny-fdv2": dict(family="fast_dllm_v2", hidden=160, layers=4, heads=5, mlp=480, config="tiny-fdv2.yaml", suite="v2",
                      base="tiny-ar-v2", bd_size=16),
    # tiny-dream-v2: tiny-ar-v2 written as a Dream model (bidirectional attention, shifted logits; Dream 7B's
    # start from Qwen2.5), then masked diffusion on suite v2. The LLaDA architecture trained as masked diffusion
    # (tiny-llada-v2) could not learn v2's two-person problems in 5000 steps: it never copied the second
    # person's numbers from the prompt, which the AR-initialised model does from its first hundreds of steps
    # (but 1200 steps leave it at 4.7% on them: see its config).
    "tiny-dream-v2": dict(family="dream", hidden=160, layers=4, heads=5, mlp=480, config="tiny-dream-v2.yaml", suite="v2",
                          base="tiny-ar-v2", to="dream"),
    # tiny-d2f: a LoRA adapter on tiny-llada-v2 (shipped as the adapter), judged with D2F's pipelined decoder.
    "tiny-d2f": dict(family="llada", hidden=160, layers=4, heads=5, mlp=480, config="tiny-d2f.yaml", suite="v2",
                     base="tiny-llada-v2", export="adapter", decoder=dict(method="d2f", block_length=16)),
    # tiny-llada-dparallel: tiny-llada-v2 distilled on its own correct answers to the first 8192 training
    # prompts (LLaDA, one token per step), its adapter merged; judged with dParallel's entropy rule.
    "tiny-llada-dparallel": dict(family="llada", hidden=160, layers=4, heads=5, mlp=480, config="tiny-llada-dparallel.yaml",
                                 suite="v2", base="tiny-llada-v2", decoder=dict(method="dparallel", threshold=0.5, block_length=16),
                                 trajectories=dict(method="llada", knobs={"steps": 64, "block_length": 64}, prompts=8192,
                                                   keep="correct")),
}
CANVAS = {"v1": (32, 32), "v2": (64, 64)}  # (prompt_length, gen_length) of each task suite


def suite(recipe: dict) -> str:
    return recipe.get("suite", "v1")


def recipe_config(name: str, overrides=()):
    """The training CLI's RunConfig of a recipe (its `train` section is the TrainConfig)."""
    from dlmjax.train.cli import parse_config

    return parse_config((CONFIGS / RECIPES[name]["config"]).read_text(), list(overrides))


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
    tasks.write_tokenizer(directory, POSITIONS, suite(recipe))
    config = hf_config(recipe)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    # max_new_tokens: the canvas the model was trained to fill; `python -m dlmjax.generate` defaults to it.
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    (directory / "generation_config.json").write_text(json.dumps({**generation, "max_new_tokens": CANVAS[suite(recipe)][1]}, indent=2) + "\n")
    return directory


def training_arrays(tokenizer, n: int, objective: str, seed: int = 0) -> dict[str, np.ndarray]:
    from dlmjax.train import sft_arrays

    examples = tasks.make_split("train", n, seed)
    prompts = [tasks.encode_prompt(tokenizer, e.prompt) for e in examples]
    answers = tokenizer([e.answer for e in examples], add_special_tokens=False)["input_ids"]
    ids = tasks.token_ids()
    return sft_arrays(prompts, answers, prompt_length=PROMPT_LENGTH, gen_length=GEN_LENGTH, pad_id=ids[tasks.PAD],
                      eos_id=ids[tasks.EOS], objective=objective)


def baseline_kwargs(family: str, gen_length: int = GEN_LENGTH) -> dict:
    """The decoder each model is judged with: LLaDA with one token per step, greedy AR, or Fast-dLLM v2's
    own decoder (threshold 0.9) on the tiny blocks of 16 and sub-blocks of 4."""
    if family == "qwen2":
        return dict(method="ar", gen_length=gen_length)
    if family == "fast_dllm_v2":
        return dict(method="fast-dllm-v2", gen_length=gen_length, block_length=16, sub_block_length=4)
    return dict(method="llada", gen_length=gen_length, steps=gen_length)


def evaluate(lm, tokenizer, examples, *, batch_size: int = 64, per_example: bool = False, **generate_kwargs) -> dict:
    """Accuracy, mean NFE per row and tokens/s of `lm.generate` on `examples` (and with
    per_example, whether each was answered right: "correct", in order)."""
    correct, nfe, seconds, generated, right, row_nfe = 0, 0.0, 0.0, 0, [], []
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
        row_nfe += [float(x) for x in np.asarray(out.nfe).reshape(-1)[: len(chunk)]]
        seconds += out.seconds
    kinds: dict[str, list[bool]] = {}
    kind_nfe: dict[str, list[float]] = {}
    for example, r, n in zip(examples, right, row_nfe):
        kinds.setdefault(example.kind, []).append(r)
        kind_nfe.setdefault(example.kind, []).append(n)
    metrics = {"accuracy": correct / len(examples), "mean_nfe": nfe / len(examples), "seconds": seconds,
               "tokens_per_s": generated / max(seconds, 1e-9), "examples": len(examples),
               "accuracy_by_kind": {kind: round(sum(r) / len(r), 4) for kind, r in sorted(kinds.items())},
               "mean_nfe_by_kind": {kind: round(sum(n) / len(n), 2) for kind, n in sorted(kind_nfe.items())}}
    return {**metrics, "correct": right} if per_example else metrics


def in_memory_lm(model):
    from dlmjax.lm import LM

    return LM(model)


def write_rows(path: pathlib.Path, examples, fields=("prompt", "answer")) -> pathlib.Path:
    """JSONL rows of the examples' prompts and reference answers, under `fields` (and under
    prompt/answer too when those differ)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        for e in examples:
            f.write(json.dumps({"prompt": e.prompt, "answer": e.answer, fields[0]: e.prompt, fields[1]: e.answer}) + "\n")
    tmp.replace(path)
    return path


def teacher_trajectories(spec: dict, model_dir: pathlib.Path, prompts: pathlib.Path, path: pathlib.Path, *,
                         gen_length: int, limit: int, seed: int) -> list[str]:
    """Decode the first `limit` training prompts with the starting model (`spec`: method, knobs, keep),
    into `path` (python -m dlmjax.train.trajectories; a rerun resumes it), and return the training
    CLI overrides that train on them."""
    from dlmjax.train import trajectories

    knobs = [arg for k, v in spec.get("knobs", {}).items() for arg in ("--knob", f"{k}={v}")]
    code = trajectories.main(["--model", str(model_dir), "--dtype", "float32", "--prompts", str(prompts), "--answer-field", "answer",
                              "--answer-pattern", tasks.ANSWER_PATTERN, "--out", str(path), "--method", spec["method"], *knobs,
                              "--gen-length", str(gen_length), "--batch-size", "64", "--keep", spec.get("keep", "correct"),
                              "--limit", str(limit), "--seed", str(seed)])
    if code:
        raise SystemExit(f"python -m dlmjax.train.trajectories failed with status {code}")
    return [f"data.train={path}", "data.prompt_field=question", "data.answer_field=llm_response"]


def write_adapter_copy(adapter: pathlib.Path, out: pathlib.Path, *, base_name: str) -> None:
    """Copy a PEFT adapter directory to `out` (replacing it whole), its base named as the embedded model."""
    from dlmjax.convert.hf_import import atomic_directory

    with atomic_directory(out, True) as tmp:
        for p in adapter.iterdir():
            shutil.copy2(p, tmp / p.name)
        config = json.loads((tmp / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = base_name
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=sorted(RECIPES))
    parser.add_argument("--out", type=pathlib.Path, help="HF output directory (default dlmjax/models/NAME)")
    parser.add_argument("--run-dir", type=pathlib.Path, help="checkpoints, metrics and the run's data (default runs/NAME)")
    parser.add_argument("--steps", type=int, help="override the recipe's step count (one stage)")
    parser.add_argument("--train-examples", type=int, default=300_000)
    parser.add_argument("--test-examples", type=int, default=512)
    parser.add_argument("--eval-every", type=int, default=400, help="checkpoint, and evaluate on 64 test problems, every N steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models-dir", type=pathlib.Path, default=ROOT / "dlmjax" / "models",
                        help="where a recipe's starting model (base, init_from) is")
    args = parser.parse_args(argv)

    import dlmjax
    from dlmjax.convert.hf_export import export_lm
    from dlmjax.lm import LM
    from dlmjax.train import init_model
    from dlmjax.train.cli import run

    recipe = RECIPES[args.name]
    out = args.out or ROOT / "dlmjax" / "models" / args.name
    run_dir = (args.run_dir or ROOT / "runs" / args.name).absolute()
    init = run_dir / "init"
    gen_length = CANVAS[suite(recipe)][1]
    if "base" in recipe:  # a recipe on an embedded model: it starts from that model (converted with bd_size)
        base = args.models_dir / recipe["base"]
        if not (base / "config.json").is_file():
            raise SystemExit(f"{args.name} starts from {recipe['base']}, which is not at {base}; train it first with "
                             f"`python experiments/train_tiny.py {recipe['base']}`")
        if "bd_size" in recipe or recipe.get("to") == "dream":
            if not (init / "config.json").is_file():
                from dlmjax.convert.block_diffusion import to_block_diffusion, to_dream

                if "bd_size" in recipe:
                    to_block_diffusion(base, init, bd_size=recipe["bd_size"], overwrite=True)
                else:
                    to_dream(base, init, overwrite=True)
            start_dir = init
        else:
            start_dir = base  # trained as it is (LoRA adapters on it)
        template = start_dir
    else:
        template = write_template(pathlib.Path(tempfile.mkdtemp(prefix="dlmjax-template-")), recipe)
        start_dir = init
    tokenizer = load_tokenizer(template)
    cfg = from_hf_config(json.loads((template / "config.json").read_text()))
    # the starting checkpoint: the architecture and tokenizer (the CLI re-initialises the weights, model.init),
    # or with `init_from`, an embedded model's weights under this recipe's tokenizer and config
    if start_dir == init and not (init / "config.json").is_file():
        if "init_from" in recipe:
            source = args.models_dir / recipe["init_from"]
            if not (source / "config.json").is_file():
                raise SystemExit(f"{args.name} starts from {recipe['init_from']}'s weights, which are not at {source}; "
                                 f"train it first with `python experiments/train_tiny.py {recipe['init_from']}`")
            export_lm(dlmjax.load(source, dtype="float32", progress=False), init, dtype="float32", hf_dir=template, overwrite=True)
        else:
            export_lm(LM(init_model(cfg, args.seed)), init, dtype="float32", hf_dir=template, overwrite=True)
    from_scratch = "base" not in recipe and "init_from" not in recipe
    train_rows = write_rows(run_dir / "data" / "train.jsonl", tasks.make_split("train", args.train_examples, args.seed, suite(recipe)))
    test = tasks.make_split("test", args.test_examples, args.seed, suite(recipe))
    # data.prompt_field / answer_field name the fields of both files: with trajectories, the eval rows carry
    # the trajectory names too (the reference answer under llm_response)
    eval_rows = write_rows(run_dir / "data" / "eval.jsonl", test[:64],
                           ("question", "llm_response") if "trajectories" in recipe else ("prompt", "answer"))
    overrides = [f"model.name={start_dir}", f"model.init={from_scratch}", f"data.train={train_rows}", f"data.eval={eval_rows}",
                 "data.eval_limit=64", f"output={run_dir}", f"train.seed={args.seed}", f"train.save_every={args.eval_every}"]
    start = time.perf_counter()
    if "trajectories" in recipe:  # dParallel's data: the starting model's own answers to the training prompts
        overrides += teacher_trajectories(recipe["trajectories"], start_dir, train_rows, run_dir / "data" / "trajectories.jsonl",
                                          gen_length=gen_length, limit=min(recipe["trajectories"]["prompts"], args.train_examples),
                                          seed=args.seed)
    stages = [] if args.steps else list(recipe.get("stages", []))
    last = [f"train.steps={args.steps}"] if args.steps else []

    for schedule_steps in stages:  # earlier schedules, each run to its end in run_dir (no export)
        run(recipe_config(args.name, [*overrides, f"train.steps={schedule_steps}", "export=false"]))
    config = recipe_config(args.name, [*overrides, *last])
    summary = run(config)
    train_seconds = time.perf_counter() - start
    if "final" not in summary:  # preempted (SIGTERM): the step is saved, the same command continues
        print(f"stopped at step {summary['step']} of {config.train.steps}; run the same command to continue", flush=True)
        return

    if recipe.get("export") == "adapter":  # the PEFT adapter itself, naming the embedded base
        write_adapter_copy(pathlib.Path(summary["final"]), out, base_name=recipe["base"])
        exported = dlmjax.load(start_dir, adapter=out, dtype="float32", progress=False)
    else:  # full weights (a LoRA run's adapter merged into them)
        adapter = pathlib.Path(summary["final"]) if config.lora.rank > 0 else None
        trained = dlmjax.load(start_dir if adapter else summary["final"], adapter=adapter, dtype="float32", progress=False)
        export_lm(trained, out, dtype="bfloat16", hf_dir=template, overwrite=True)
        exported = dlmjax.load(out, dtype="float32", progress=False)
    if template not in (init, start_dir):
        shutil.rmtree(template, ignore_errors=True)

    decoder = {**recipe["decoder"], "gen_length": gen_length} if "decoder" in recipe else baseline_kwargs(cfg.family, gen_length)
    metrics = evaluate(exported, tokenizer, test, **decoder)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(exported.state))
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    log = {
        "command": " ".join(["python", "experiments/train_tiny.py", *(argv if argv is not None else sys.argv[1:])]),
        "trainer": f"python -m dlmjax.train experiments/configs/{recipe['config']} (with this script's overrides)",
        "architecture": {k: recipe[k] for k in ("family", "hidden", "layers", "heads", "mlp")},
        **({"base": f"dlmjax/models/{recipe['base']}"} if "base" in recipe else {}),
        **({"bd_size": recipe["bd_size"]} if "bd_size" in recipe else {}),
        **({"converted_to": recipe["to"]} if "to" in recipe else {}),
        **({"trajectories": recipe["trajectories"]} if "trajectories" in recipe else {}),
        **({"lora": dataclasses.asdict(config.lora), "export": recipe.get("export", "merged")} if config.lora.rank > 0 else {}),
        **({"init_from": f"dlmjax/models/{recipe['init_from']}"} if "init_from" in recipe else {}),
        **({"models_dir": str(args.models_dir)} if args.models_dir != ROOT / "dlmjax" / "models" else {}),
        "parameters": n_params,
        "train": {**dataclasses.asdict(config.train), "stages": stages, "train_examples": args.train_examples,
                  "prompt_length": config.data.prompt_length, "gen_length": config.data.gen_length},
        "final_loss": history[-1]["loss"] if history else None,
        "train_seconds_this_call": round(train_seconds, 1),
        "resumed_from": summary["resumed_from"],
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores ({jax.devices()[0].platform}), jax {jax.__version__}",
        "eval": {"decoder": decoder, "suite": suite(recipe), "weights": "bfloat16 checkpoint, run in float32", **metrics},
    }
    (out / "train_log.json").write_text(json.dumps(log, indent=2) + "\n")
    print(json.dumps(log["eval"], indent=2))


if __name__ == "__main__":
    main()
