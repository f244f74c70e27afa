"""`python -m dlmjax.train CONFIG.yaml key=value ...`: a tiny LoRA run on the embedded tiny-llada
with the eval hook, TensorBoard and the final adapter; resuming; one-line errors for bad configs
and data before anything compiles; the dry run's memory table."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

import dlmjax
from dlmjax.train.cli import main, parse_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import tasks  # noqa: E402  (the tiny models' task suite)


def _jsonl(path, split, n, seed=0):
    with path.open("w") as f:
        for e in tasks.make_split(split, n, seed):
            f.write(json.dumps({"prompt": e.prompt, "answer": e.answer}) + "\n")
    return path


CONFIG = """
model: {name: tiny-llada}
data: {train: TRAIN, eval: EVAL, prompt_length: 32, gen_length: 32}
train: {objective: mdm, steps: 4, batch_size: 8, learning_rate: 1.0e-4, warmup_steps: 1, save_every: 2, log_every: 2}
lora: {rank: 4, alpha: 8, targets: [q_proj, attn_out, ff_out]}
eval: {method: fast-dllm, knobs: {threshold: 0.9, block_length: 8}, answer_pattern: "####\\\\s*(.*)"}
tensorboard: true
"""


def test_a_tiny_lora_run_end_to_end(tmp_path, capsys):
    train_file, eval_file = _jsonl(tmp_path / "train.jsonl", "train", 32), _jsonl(tmp_path / "eval.jsonl", "test", 8)
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG.replace("TRAIN", str(train_file)).replace("EVAL", str(eval_file)))
    out = tmp_path / "out"
    assert main([str(config), f"output={out}", "train.steps=4"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 4 and summary["final"] == str(out / "final")
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [2, 4] and all(0 <= e["eval_accuracy"] <= 1 and e["eval_rows"] == 8 for e in evals)
    assert evals[-1]["eval_accuracy"] > 0.5  # tiny-llada already solves most of its tasks; a few LoRA steps keep it so
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [2, 4]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    adapter = json.loads((out / "final" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and sorted(adapter["target_modules"]) == ["attn_out", "ff_out", "q_proj"]
    back = dlmjax.load("tiny-llada", adapter=out / "final", lora="keep", progress=False)
    assert back.lora is not None and back.lora.targets == ("q_proj", "o_proj", "down_proj")
    # the same command again: the run is complete, nothing trains
    assert main([str(config), f"output={out}"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["resumed_from"] == 4


def test_the_eval_hook_runs_at_its_own_cadence(tmp_path, capsys):
    train_file, eval_file = _jsonl(tmp_path / "train.jsonl", "train", 16), _jsonl(tmp_path / "eval.jsonl", "test", 4)
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG.replace("TRAIN", str(train_file)).replace("EVAL", str(eval_file)))
    out = tmp_path / "out"
    assert main([str(config), f"output={out}", "train.steps=5", "train.save_every=5", "eval.every=2", "tensorboard=false",
                 "export=false"]) == 0
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [2, 4, 5]  # every 2 steps and the last, not at the save


def test_a_recipe_objective_on_the_cli(tmp_path, capsys):
    """train.objective: d2f with LoRA on tiny-llada from JSONL rows: the recipe's rows (prompt first,
    answer, EOS padding) and its objective, ending in a PEFT adapter."""
    train_file = _jsonl(tmp_path / "train.jsonl", "train", 16)
    out = tmp_path / "out"
    assert main(["model.name=tiny-llada", f"data.train={train_file}", "data.prompt_length=32", "data.gen_length=32",
                 "train.objective=d2f", "train.objective_args={block_size: 8}", "train.steps=2", "train.batch_size=4",
                 "train.save_every=2", "lora.rank=4", f"output={out}"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 2 and (out / "final" / "adapter_config.json").is_file()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["masked_per_row"] > 0 and metrics[-1]["loss"] > 0


@pytest.mark.parametrize("overrides, words", [
    (["train.step=3"], "unknown config key 'train.step'; did you mean 'train.steps'?"),
    (["lora.rnak=3"], "did you mean 'lora.rank'?"),
    (["mdoel.name=x"], "unknown config key 'mdoel.name'"),
    (["data.train=MISSING"], "no dataset at MISSING"),
    (["data.train=EMPTY"], "has no usable rows: none has both 'prompt' and 'answer'"),
    (["lora.targets=[qkv]"], "unknown LoRA target 'qkv'; this llada model's linear layers are attn_out, ff_out, ff_proj"),
    (["train.grad_accum=3"], "grad_accum 3 must be at least 1 and divide batch_size 8"),
    (["data.prompt_length=2"], "no row fits prompt_length 2"),
    (["steps"], "override 'steps' is not key=value"),
    (["eval.every=-1"], "eval.every must be a whole number of steps"),
    (["train.learning_rate=fast"], "train.learning_rate must be a number, got 'fast'"),
])
def test_bad_configs_are_one_line_errors(tmp_path, capsys, overrides, words):
    train_file = _jsonl(tmp_path / "train.jsonl", "train", 8)
    (tmp_path / "empty.jsonl").write_text(json.dumps({"question": "x", "answer": "y"}) + "\n")
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {{name: tiny-llada}}\ndata: {{train: {train_file}}}\ntrain: {{steps: 2, batch_size: 8}}\n"
                      f"lora: {{rank: 2}}\noutput: {tmp_path / 'out'}\n")
    overrides = [o.replace("EMPTY", str(tmp_path / "empty.jsonl")) for o in overrides]
    assert main([str(config), *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and words in err, err
    assert not (tmp_path / "out" / "checkpoints").exists()  # nothing ran


def test_config_values_and_overrides():
    config = parse_config("train: {steps: 5}\nmesh: data=2\n", ["train.learning_rate=0.01", "lora.targets=[q_proj, v_proj]",
                                                               "model.name=tiny-llada"])
    assert config.train.steps == 5 and config.train.learning_rate == 0.01 and config.mesh == "data=2"
    assert config.lora.targets == ["q_proj", "v_proj"] and config.model.name == "tiny-llada"
    # YAML 1.1 reads 5e-4 (no dot) as a string and 1 as an int; float fields take both as floats
    config = parse_config("train: {learning_rate: 5e-4, weight_decay: 1}\n", ["train.b2=99e-2", "model.name=x"])
    assert (config.train.learning_rate, config.train.weight_decay, config.train.b2) == (5e-4, 1.0, 0.99)
    assert all(isinstance(v, float) for v in (config.train.learning_rate, config.train.weight_decay, config.train.b2))


def test_dry_run_prints_per_device_memory(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    run = subprocess.run([sys.executable, "-m", "dlmjax.train", "model.name=tiny-llada", "mesh=data=2,fsdp=2", "rules=fsdp",
                          "train.batch_size=8", "train.grad_accum=2", "train.remat=full", "data.prompt_length=32",
                          "data.gen_length=32", "lora.rank=8", "--dry-run", "--device-memory", "1GiB"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 1} (4 devices)" in lines[0] and "LoRA r=8" in lines[0]
    figures = {line.split()[0]: float(line.split()[1]) for line in lines[2:7]}
    assert set(figures) == {"parameters", "optimizer", "gradients", "activations", "peak"}
    assert 0 < figures["parameters"] < figures["peak"]
    assert lines[-1] == "fits in 1.0 GiB per device"


def test_dry_run_for_a_tpu_target(tmp_path):
    """--target compiles for a TPU slice through libtpu's compile-only devices: with libtpu installed
    the table names the TPU chips; without it, one line says what to install. A bad topology and a
    mesh of the wrong size are one line each."""
    import importlib.util

    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    base = [sys.executable, "-m", "dlmjax.train", "model.name=tiny-llada", "rules=fsdp", "train.batch_size=8",
            "lora.rank=8", "data.prompt_length=32", "data.gen_length=32", "--dry-run"]

    def dry(*args):
        return subprocess.run([*base, *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)

    bad = dry("mesh=fsdp=8", "--target", "v5e-8")
    assert bad.returncode == 2 and "--target 'v5e-8' is not a TPU topology" in bad.stderr.strip().splitlines()[-1]
    run = dry("mesh=fsdp=8", "--target", "v5e:2x4", "--device-memory", "16GiB")
    if importlib.util.find_spec("libtpu") is None:
        assert run.returncode == 2, run.stdout
        assert "--target v5e:2x4 needs libtpu" in run.stderr.strip().splitlines()[-1]
        return
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert "TPU v5 lite chips of a v5e:2x4 slice (compile-only)" in lines[1], lines[1]
    figures = {line.split()[0]: float(line.split()[1]) for line in lines[2:7]}
    assert 0 < figures["parameters"] < figures["peak"] and lines[-1] == "fits in 16.0 GiB per device"
    wrong = dry("mesh=fsdp=4", "--target", "v5e:2x4")
    assert wrong.returncode == 2 and "the v5e:2x4 slice has 8 chips" in wrong.stderr.strip().splitlines()[-1]


def test_rows_from_jsonl_parquet_and_saved_datasets(tmp_path):
    """The same rows from a JSONL file, a Parquet file and a `datasets` directory; a line that is not JSON is named."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dlmjax.errors import DlmjaxError
    from dlmjax.train.cli import read_rows

    rows = [{"question": f"q{i}", "reply": f"a{i}", "extra": i} for i in range(5)] + [{"question": "no reply"}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = pa.Table.from_pylist([{**r, "reply": r.get("reply")} for r in rows])
    pq.write_table(table, tmp_path / "rows.parquet")
    want = [(f"q{i}", f"a{i}") for i in range(5)]  # the row without a reply is not usable
    assert read_rows(str(tmp_path / "rows.jsonl"), "question", "reply") == want
    assert read_rows(str(tmp_path / "rows.parquet"), "question", "reply") == want
    assert read_rows(str(tmp_path / "rows.parquet"), "question", "reply", limit=2) == want[:2]
    datasets = pytest.importorskip("datasets")  # in the test extra
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    assert read_rows(str(tmp_path / "saved"), "question", "reply") == want
    (tmp_path / "bad.jsonl").write_text('{"question": "q", "reply": "a"}\n{oops\n')
    with pytest.raises(DlmjaxError, match="bad.jsonl line 2 is not JSON"):
        read_rows(str(tmp_path / "bad.jsonl"), "question", "reply")


@pytest.mark.parametrize("recipe", sorted(p.stem for p in (ROOT / "experiments" / "recipes").glob("*.yaml")))
def test_the_8b_recipes_are_valid_configs(recipe):
    """Every recipe in experiments/recipes parses (no unknown key), its TrainConfig validates, its
    LoRA targets exist in its model, and its objective accepts the model, on the shipped config.json
    of its architecture (what the dry run and recipe_memory.py compile)."""
    import recipe_memory

    from dlmjax.config import from_hf_config
    from dlmjax.train.cli import lora_config
    from dlmjax.train.objectives import make_objective

    config = parse_config((ROOT / "experiments" / "recipes" / f"{recipe}.yaml").read_text(), [])
    cfg = from_hf_config(json.loads((ROOT / "experiments" / "configs" / recipe_memory.RECIPES[recipe] / "config.json").read_text()))
    tc = config.train.validate()
    lora = lora_config(config.lora, cfg)
    objective = make_objective(tc.objective, cfg=cfg, args=tc.objective_args)
    objective.check(cfg, lora)
    assert tc.batch_size % tc.grad_accum == 0 and config.mesh == "fsdp=8"
    assert tc.learning_rate <= 2e-5 and tc.precision == "bf16_compute" and tc.remat == "full"
    if recipe == "dparallel-llada-8b":  # the official adapter: only 4 of the 7 names exist in LLaDA
        assert lora.targets == ("q_proj", "k_proj", "v_proj", "up_proj") and lora.rank == 128 and not config.data.chat
    if recipe == "dparallel-dream-7b":  # the official summed accumulation, as our mean (see its comments)
        assert (tc.grad_clip, tc.adam_eps, objective.block_size, objective.entropy_weight) == (0.125, 1.25e-9, None, 1.0)
    if recipe.startswith("d2f"):
        assert lora.dropout == 0.1 and lora.rank == 32 and config.data.prompt_length + config.data.gen_length == 1024


def test_recipe_memory_fits_a_line():
    import recipe_memory

    points = [{"layers": n, **{f: 0.5 + 0.25 * n + (0.01 if f == "peak" and n == 8 else 0) for f in recipe_memory.FIELDS}}
              for n in (4, 8, 16)]
    figures, worst = recipe_memory.fit(points, 32)
    assert abs(figures["parameters"] - 8.5) < 1e-9 and 0.005 < worst < 0.01
    assert set(recipe_memory.RECIPES) == {p.stem for p in (ROOT / "experiments" / "recipes").glob("*.yaml")}
