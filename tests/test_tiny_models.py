"""The embedded tiny models: they load by name offline, solve the task suite, and drive the CLI."""

import json
import pathlib
import sys

import numpy as np
import pytest

import dlmjax
from dlmjax import models

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))

import tasks  # noqa: E402
import train_tiny  # noqa: E402


@pytest.fixture(scope="module")
def tiny_llada():
    return dlmjax.load("tiny-llada", dtype="float32", progress=False)


def test_embedded_models_ship_in_the_package():
    for name in models.EMBEDDED:
        directory = models.path(name)
        assert directory is not None and directory.parent == pathlib.Path(models.__file__).parent
        files = {p.name for p in directory.iterdir()}
        assert {"config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "train_log.json"} <= files
        # one file, or (exported since the export writes a shard per conversion group) an index and its shards
        if "model.safetensors" not in files:
            index = json.loads((directory / "model.safetensors.index.json").read_text())
            assert set(index["weight_map"].values()) <= files
        size = sum(p.stat().st_size for p in directory.iterdir())
        assert size < 8 * 2**20, f"{name} is {size / 2**20:.1f} MiB; the embedded models must stay small"
        log = json.loads((directory / "train_log.json").read_text())
        assert log["command"].startswith(f"python experiments/train_tiny.py {name}")


def test_tiny_llada_is_a_llada_checkpoint_with_the_task_tokenizer(tiny_llada):
    cfg = tiny_llada.config
    assert cfg.family == "llada" and tiny_llada.dtype == np.float32
    ids = tasks.token_ids()
    assert (cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id, cfg.eot_token_id) == (
        ids[tasks.MASK], ids[tasks.EOS], ids[tasks.PAD], ids[tasks.EOT])
    assert tiny_llada.default_gen_length == train_tiny.GEN_LENGTH
    example = tasks.make_split("test", 1)[0]
    assert tiny_llada.apply_chat_template([{"role": "user", "content": example.prompt}]) == tasks.encode_prompt(
        tiny_llada.tokenizer, example.prompt)


def test_tiny_llada_accuracy_on_the_test_split(tiny_llada):
    """The LLaDA baseline (one token per step, one block) on the first 256 problems of the test split.

    The bar is >= 90% overall; the embedded model measures 93.0% here (arithmetic 86.3%, sort and
    reverse 100%) and 92.8% on the whole 512-problem split (experiments/report.py). A broken
    loader, tokenizer or decoder drops far below this.
    """
    test = tasks.make_split("test", 512)[:256]
    # one pass in batches of 64 (one compiled program), then the accuracy per kind
    result = train_tiny.evaluate(tiny_llada, tiny_llada.tokenizer, test, per_example=True,
                                 **train_tiny.baseline_kwargs("llada"))
    accuracy = {kind: float(np.mean([ok for e, ok in zip(test, result["correct"]) if e.kind == kind])) for kind in tasks.KINDS}
    overall = result["accuracy"]
    assert overall >= 0.90, (overall, accuracy)
    assert accuracy["sort"] >= 0.95 and accuracy["reverse"] >= 0.95 and accuracy["arith"] >= 0.80, accuracy


def test_tiny_ar_decodes_autoregressively():
    lm = dlmjax.load("tiny-ar", dtype="float32", progress=False)
    assert lm.config.family == "qwen2"
    test = tasks.make_split("test", 64)
    metrics = train_tiny.evaluate(lm, lm.tokenizer, test, **train_tiny.baseline_kwargs("qwen2"))
    assert metrics["accuracy"] >= 0.8, metrics
    assert metrics["mean_nfe"] < train_tiny.GEN_LENGTH  # stops at EOS
    # stop_token_ids: a row ends at the first of the given ids (here the answer's first token)
    prompt = lm.apply_chat_template([{"role": "user", "content": test[0].prompt}])
    free = lm.generate([prompt])
    first = int(free.tokens[0][0])
    cut = lm.generate([prompt], stop_token_ids=[first])
    assert int(cut.lengths[0]) == 1 and int(cut.nfe[0]) == 1 and int(free.lengths[0]) > 1


def test_tiny_ar_v2_solves_suite_v2():
    """tiny-ar-v2 (98.6% on the 512-problem v2 test split, its train_log) on the first 64 v2 problems."""
    lm = dlmjax.load("tiny-ar-v2", dtype="float32", progress=False)
    test = tasks.make_split("test", 64, suite="v2")
    metrics = train_tiny.evaluate(lm, lm.tokenizer, test, **train_tiny.baseline_kwargs("qwen2", gen_length=64))
    assert metrics["accuracy"] >= 0.9, metrics
    assert json.loads((models.path("tiny-ar-v2") / "train_log.json").read_text())["eval"]["suite"] == "v2"


def test_cli_defaults_to_tiny_llada(capsys):
    from dlmjax.generate import main

    example = tasks.make_split("test", 3)[2]
    assert main(["--prompt", example.prompt, "--chat", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert tasks.is_correct(example, out["text"]), out


def test_the_tiny_recipes_run_on_the_training_cli(tmp_path):
    """experiments/train_tiny.py is the CLI's config plus data and export: a 2-step tiny-ar run ends
    in an exported bf16 model and a train_log naming the config; the CLI's rows equal the arrays the
    recipe trained on before it moved onto the CLI (chat-formatted prompts, answers, EOS, padding)."""
    from dlmjax.lm import LM
    from dlmjax.train.cli import DataSection, read_rows, training_arrays
    from dlmjax.tokenizer import load_tokenizer

    recipe = train_tiny.recipe_config("tiny-llada")
    assert (recipe.train.objective, recipe.train.steps, recipe.train.batch_size) == ("mdm", 11000, 64)
    assert train_tiny.recipe_config("tiny-ar").train.objective == "ar"

    out, run_dir = tmp_path / "out", tmp_path / "run"
    train_tiny.main(["tiny-ar", "--steps", "2", "--train-examples", "256", "--test-examples", "8", "--eval-every", "2",
                     "--out", str(out), "--run-dir", str(run_dir)])
    log = json.loads((out / "train_log.json").read_text())
    assert log["trainer"].startswith("python -m dlmjax.train experiments/configs/tiny-ar.yaml")
    assert log["train"]["steps"] == 2 and log["train"]["objective"] == "ar" and log["eval"]["examples"] == 8
    assert [json.loads(line)["step"] for line in (run_dir / "eval.jsonl").read_text().splitlines()] == [2]
    exported = dlmjax.load(out, progress=False)
    assert exported.dtype == np.dtype("bfloat16") and exported.config.family == "qwen2"

    # the rows the CLI builds from the run's JSONL == the recipe's arrays built directly from the task suite
    lm = LM(exported.model, directory=dlmjax.load(run_dir / "init", progress=False).directory)
    rows = read_rows(str(run_dir / "data" / "train.jsonl"), "prompt", "answer", limit=64)
    cli = training_arrays(lm, rows, DataSection(prompt_length=train_tiny.PROMPT_LENGTH, gen_length=train_tiny.GEN_LENGTH), "mdm")
    direct = train_tiny.training_arrays(load_tokenizer(run_dir / "init"), 64, "mdm")
    assert set(cli) == set(direct) and all(np.array_equal(cli[k], direct[k]) for k in direct)


def test_recipes_that_start_from_an_embedded_model(tmp_path):
    """tiny-llada-v2 starts from tiny-llada's weights under the v2 tokenizer (init_from), tiny-fdv2
    from tiny-ar-v2 written as block diffusion (base), tiny-dream-v2 from tiny-ar-v2 written as Dream:
    two steps of each, on one-layer stand-ins."""
    from test_report import stand_in

    from dlmjax.tokenizer import load_tokenizer

    models = tmp_path / "models"
    models.mkdir()
    for name in ("tiny-llada", "tiny-ar-v2"):
        (models / name).symlink_to(stand_in(tmp_path, name))
    common = ["--steps", "2", "--train-examples", "64", "--test-examples", "4", "--eval-every", "2", "--models-dir", str(models)]

    with pytest.raises(SystemExit, match="train it first with `python experiments/train_tiny.py tiny-ar-v2`"):
        train_tiny.main(["tiny-fdv2", *common[:-1], str(tmp_path / "empty"), "--run-dir", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()

    train_tiny.main(["tiny-fdv2", *common, "--out", str(tmp_path / "fdv2"), "--run-dir", str(tmp_path / "fdv2-run")])
    init = dlmjax.load(tmp_path / "fdv2-run" / "init", dtype="float32", progress=False)
    base = dlmjax.load(models / "tiny-ar-v2", dtype="float32", progress=False)
    assert init.config.family == "fast_dllm_v2" and init.config.bd_size == 16
    assert init.config.mask_token_id == base.config.mask_token_id == tasks.token_ids()[tasks.MASK]
    for a, b in zip(jax_leaves(init), jax_leaves(base)):  # the conversion keeps every weight
        np.testing.assert_array_equal(a, b)
    exported = dlmjax.load(tmp_path / "fdv2", progress=False)
    assert exported.config.family == "fast_dllm_v2"
    log = json.loads((tmp_path / "fdv2" / "train_log.json").read_text())
    assert log["base"] == "dlmjax/models/tiny-ar-v2" and log["train"]["objective"] == "fdv2"
    assert log["eval"]["decoder"]["method"] == "fast-dllm-v2" and log["eval"]["suite"] == "v2"

    train_tiny.main(["tiny-dream-v2", *common, "--out", str(tmp_path / "dream"), "--run-dir", str(tmp_path / "dream-run")])
    init = dlmjax.load(tmp_path / "dream-run" / "init", dtype="float32", progress=False)
    assert (init.config.family, init.config.shifted_logits) == ("dream", True)
    for a, b in zip(jax_leaves(init), jax_leaves(base)):  # Dream's start: the AR weights as they are
        np.testing.assert_array_equal(a, b)
    log = json.loads((tmp_path / "dream" / "train_log.json").read_text())
    assert log["converted_to"] == "dream" and log["train"]["objective"] == "mdm" and log["eval"]["decoder"]["method"] == "llada"
    assert dlmjax.load(tmp_path / "dream", progress=False).config.family == "dream"

    train_tiny.main(["tiny-llada-v2", *common, "--out", str(tmp_path / "v2"), "--run-dir", str(tmp_path / "v2-run")])
    start = dlmjax.load(tmp_path / "v2-run" / "init", dtype="float32", progress=False)
    v1 = dlmjax.load(models / "tiny-llada", dtype="float32", progress=False)
    for a, b in zip(jax_leaves(start), jax_leaves(v1)):
        np.testing.assert_array_equal(a, b)
    assert "Add" in load_tokenizer(tmp_path / "v2-run" / "init").get_vocab()  # the v2 tokenizer, v1's weights
    log = json.loads((tmp_path / "v2" / "train_log.json").read_text())
    assert log["init_from"] == "dlmjax/models/tiny-llada" and log["eval"]["suite"] == "v2"


def jax_leaves(lm):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(lm.state)]


def test_the_distillation_recipes_on_stand_ins(tmp_path, monkeypatch):
    """tiny-d2f ships its LoRA adapter (naming the embedded base) and loads back onto tiny-llada-v2;
    tiny-llada-dparallel decodes teacher trajectories with its base, trains on them and ships merged
    weights. Two steps each on a one-layer stand-in of tiny-llada-v2 (whose answers are never
    correct, so the dParallel run keeps every trajectory here, where the recipe keeps the correct)."""
    from test_report import stand_in

    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny-llada-v2").symlink_to(stand_in(tmp_path, "tiny-llada-v2"))
    common = ["--steps", "2", "--train-examples", "64", "--test-examples", "4", "--eval-every", "2", "--models-dir", str(models)]

    train_tiny.main(["tiny-d2f", *common, "--out", str(tmp_path / "d2f"), "--run-dir", str(tmp_path / "d2f-run")])
    config = json.loads((tmp_path / "d2f" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-llada-v2" and config["r"] == 16
    assert sorted(config["target_modules"]) == ["attn_out", "k_proj", "q_proj", "v_proj"]
    log = json.loads((tmp_path / "d2f" / "train_log.json").read_text())
    assert log["eval"]["decoder"] == {"method": "d2f", "block_length": 16, "gen_length": 64} and log["export"] == "adapter"
    with_adapter = dlmjax.load(models / "tiny-llada-v2", adapter=tmp_path / "d2f", dtype="float32", progress=False)
    base = dlmjax.load(models / "tiny-llada-v2", dtype="float32", progress=False)
    ids = np.arange(1, 9)[None]
    assert np.abs(with_adapter.logits(ids) - base.logits(ids)).max() > 0  # two steps moved the adapter

    monkeypatch.setitem(train_tiny.RECIPES["tiny-llada-dparallel"], "trajectories",
                        dict(train_tiny.RECIPES["tiny-llada-dparallel"]["trajectories"], keep="all"))
    dp = ["tiny-llada-dparallel", *common, "--out", str(tmp_path / "dp"), "--run-dir", str(tmp_path / "dp-run")]
    with pytest.raises(dlmjax.DlmjaxError, match="no row fits"):  # the stand-in's answers: 64 random tokens, unfinished
        train_tiny.main(dp)
    path = tmp_path / "dp-run" / "data" / "trajectories.jsonl"
    lines = path.read_text().splitlines()
    header, rows = json.loads(lines[0])["trajectories"], [json.loads(line) for line in lines[1:]]
    assert header["method"] == "llada" and len(rows) == 64 and all(r["nfe"] == 64 for r in rows)
    # a base that answers: the references in place of the stand-in's answers; the rerun resumes the
    # complete file (no decoding), trains on it and merges the adapter
    answers = [json.loads(line)["answer"] for line in (tmp_path / "dp-run" / "data" / "train.jsonl").read_text().splitlines()]
    path.write_text("\n".join([lines[0], *(json.dumps(dict(r, llm_response=answers[r["index"]])) for r in rows)]) + "\n")
    train_tiny.main(dp)
    assert path.read_text().splitlines()[1:] == [json.dumps(dict(r, llm_response=answers[r["index"]])) for r in rows]
    log = json.loads((tmp_path / "dp" / "train_log.json").read_text())
    assert log["train"]["objective"] == "dparallel" and log["export"] == "merged"
    distilled = dlmjax.load(tmp_path / "dp", dtype="float32", progress=False)
    assert distilled.lora is None and distilled.config.family == "llada"
