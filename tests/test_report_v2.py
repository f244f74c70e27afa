"""experiments/report_v2.py: the swept report's smoke run (both suites, every model role) on random
stand-ins, its Pareto fronts, and its "not yet" rows.

The stand-ins have the tiny models' configs and tokenizers but one narrow layer and random weights
(compilation dominates); the D2F role gets a random LoRA adapter on the v2 diffusion stand-in, and
Fast-dLLM v2 the v2 AR stand-in converted to block diffusion. Accuracy is near zero: only the
report's plumbing, its fronts and its files are checked.
"""

import json
import pathlib
import shutil
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))

import report_v2  # noqa: E402
from test_report import SMALL, stand_in  # noqa: E402

import train_tiny  # noqa: E402


def _models(directory: pathlib.Path) -> pathlib.Path:
    from flax import nnx

    from dlmjax.config import from_hf_config
    from dlmjax.convert.block_diffusion import to_block_diffusion
    from dlmjax.lm import LM
    from dlmjax.model import PROJECTIONS, LoRAConfig, Transformer

    models = directory / "models"
    models.mkdir()
    for name in ("tiny-llada", "tiny-ar", "tiny-llada-v2", "tiny-ar-v2"):
        shutil.move(str(stand_in(directory, name)), models / name)
    shutil.copytree(models / "tiny-llada-v2", models / "tiny-llada-dparallel")
    to_block_diffusion(models / "tiny-ar-v2", models / "tiny-fdv2", bd_size=report_v2.BLOCK)
    template = train_tiny.write_template(directory / "lora-template", dict(train_tiny.RECIPES["tiny-llada-v2"], **SMALL))
    cfg = from_hf_config(json.loads((template / "config.json").read_text()))
    lora = Transformer(cfg, lora=LoRAConfig(rank=2, alpha=4.0, targets=PROJECTIONS), rngs=nnx.Rngs(1))
    LM(lora, source=str(models / "tiny-llada-v2")).save_adapter(models / "tiny-d2f")
    return models


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report-v2")
    models = _models(tmp)
    out = tmp / "out"
    result = report_v2.main(["--smoke", "--examples", "3", "--batch-size", "3", "--models-dir", str(models),
                             "--out-dir", str(out)])
    return result, out, models


def test_smoke_runs_the_ends_of_every_sweep_on_both_suites(smoke):
    result, _, _ = smoke
    rows = result["rows"]
    errors = [f"{r['suite']} {r['sweep']}: {r['reason']}" for r in rows if r["status"] != "ok"]
    assert not errors, errors
    for suite in report_v2.SUITES:
        gen_length = train_tiny.CANVAS[suite][1]
        for sweep in report_v2.SWEEPS:
            points = [r["point"] for r in rows if r["suite"] == suite and r["sweep"] == sweep.name]
            if sweep.model not in report_v2.MODELS[suite]:
                assert points == []
                continue
            ends = [sweep.points[0], sweep.points[-1]] if len(sweep.points) > 1 else [sweep.points[0]]
            assert points == [report_v2.resolve(p, gen_length) for p in ends], (suite, sweep.name)
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["examples"] == 3 and r["mean_nfe"] > 0 and r["tokens_per_s"] > 0
    llada = {r["point"]["steps"]: r["mean_nfe"] for r in rows if r["suite"] == "v2" and r["sweep"] == "llada"}
    assert llada == {64: 64.0, 8: 8.0}  # one forward pass per step, whatever the model says


def test_fronts_are_the_undominated_points(smoke):
    result, _, _ = smoke
    for suite in report_v2.SUITES:
        done = [r for r in result["rows"] if r["suite"] == suite]
        for key, flag, cheaper in (("mean_nfe", "front_nfe", lambda a, b: a < b), ("tokens_per_s", "front_speed", lambda a, b: a > b)):
            assert any(r[flag] for r in done)
            for r in done:
                dominated = any(o is not r and o["accuracy"] >= r["accuracy"] and (o[key] == r[key] or cheaper(o[key], r[key]))
                                and (o["accuracy"] > r["accuracy"] or cheaper(o[key], r[key])) for o in done)
                assert r[flag] == (not dominated), (suite, r["sweep"], r["point"])


def test_pareto():
    points = [(10.0, 0.9), (5.0, 0.9), (5.0, 0.8), (2.0, 0.5), (1.0, 0.1), (3.0, 0.4)]
    assert report_v2.pareto(points, lower_x_better=True) == [False, True, False, True, True, False]
    # tokens/s: higher is better
    assert report_v2.pareto(points, lower_x_better=False) == [True, False, False, False, False, False]
    assert report_v2.pareto([(1.0, 0.5), (1.0, 0.5)], lower_x_better=True) == [True, True]  # ties both stay


def test_files(smoke):
    result, out, _ = smoke
    for suite in report_v2.SUITES:
        for kind in ("nfe", "speed"):
            assert (out / f"pareto-{suite}-{kind}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for suite, canvas in (("v1", "32-token prompts, 32-token canvas"), ("v2", "64-token prompts, 64-token canvas")):
        rows = [r for r in result["rows"] if r["suite"] == suite]
        assert json.loads((out / f"report-v2-{suite}.json").read_text())["rows"] == json.loads(json.dumps(rows))
        text = (out / f"report-v2-{suite}.md").read_text()
        assert f"## Suite {suite}: {canvas}" in text and "## Suite" not in text.replace(f"## Suite {suite}", "")
        table = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| model")]
        assert len(table) == len(rows)


def test_a_missing_model_is_not_yet_with_its_command(smoke, tmp_path):
    _, _, models = smoke
    partial = tmp_path / "models"
    partial.mkdir()
    (partial / "tiny-llada-v2").symlink_to(models / "tiny-llada-v2")
    result = report_v2.main(["--smoke", "--suite", "v2", "--curves", "d2f,fdv2", "--examples", "2", "--batch-size", "2",
                             "--models-dir", str(partial), "--out-dir", str(tmp_path / "out")])
    reasons = {r["sweep"]: (r["status"], r["reason"]) for r in result["rows"]}
    assert reasons["d2f"][0] == "not yet" and "tiny-d2f" in reasons["d2f"][1]
    assert reasons["fdv2"][0] == "not yet" and "train_tiny.py tiny-fdv2" in reasons["fdv2"][1]
    assert "Not run:" in (tmp_path / "out" / "report-v2-v2.md").read_text()
    assert not (tmp_path / "out" / "report-v2-v1.md").exists()  # only the suite that ran


def test_bad_arguments_fail_in_one_line():
    with pytest.raises(SystemExit, match="unknown suite"):
        report_v2.main(["--suite", "v3"])
    with pytest.raises(SystemExit, match="unknown sweep"):
        report_v2.main(["--curves", "nope"])
