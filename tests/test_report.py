"""experiments/report.py: the smoke report on random stand-ins for tiny-llada and tiny-ar.

The stand-ins have the trained models' configs and tokenizer but random weights and a
single narrow layer (compilation dominates the run), so the test does not depend on the
trained files; accuracy is near zero and only the report's plumbing is checked.
"""

import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))

import report  # noqa: E402
import train_tiny  # noqa: E402

SMALL = dict(hidden=64, layers=1, heads=2, mlp=128)


def stand_in(directory: pathlib.Path, name: str) -> pathlib.Path:
    """An HF directory like dlmjax/models/NAME, with random weights."""
    from dlmjax.config import from_hf_config
    from dlmjax.convert.hf_export import export_lm
    from dlmjax.lm import LM
    from dlmjax.train import init_model

    template = train_tiny.write_template(directory / f"{name}-template", dict(train_tiny.RECIPES[name], **SMALL))
    cfg = from_hf_config(json.loads((template / "config.json").read_text()))
    return export_lm(LM(init_model(cfg, seed=0)), directory / name, dtype="bfloat16", hf_dir=template, overwrite=True)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    out = tmp / "out"
    result = report.main([
        "--smoke", "--examples", "4", "--batch-size", "4", "--out-dir", str(out),
        "--llada", str(stand_in(tmp, "tiny-llada")), "--ar", str(stand_in(tmp, "tiny-ar")),
    ])
    return result, out


def test_smoke_report_has_every_row(smoke):
    result, out = smoke
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == [r.name for r in report.ROWS]
    errors = [f"{r['name']}: {r['reason']}" for r in rows.values() if r["status"] == "error"]
    assert not errors, errors
    for r in rows.values():
        if r["status"] == "ok":
            assert 0.0 <= r["accuracy"] <= 1.0
            assert r["examples"] == 4 and r["mean_nfe"] > 0 and r["seconds"] > 0
        else:
            assert r["status"] == "not yet" and r["reason"]
    # Every preset lm.generate has runs; only rows for methods still to come may be "not yet".
    assert all(r["status"] == "ok" for r in rows.values() if r["method"] in report.api.PRESETS)
    base = rows[report.BASELINE]
    assert base["status"] == "ok"
    assert base["mean_nfe"] == 32.0
    assert base["speedup"] == 1.0 and base["nfe_ratio"] == 1.0
    assert rows["llada-16"]["mean_nfe"] == 16.0
    assert json.loads((out / "report.json").read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    assert {"cpu", "cores", "jax", "device"} <= set(result["machine"])


def test_smoke_report_files(smoke):
    _, out = smoke
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = (out / "report.md").read_text().splitlines()
    assert report.HEADER in lines
    table = lines[lines.index(report.HEADER) + 2 :]
    table = table[: next(i for i, line in enumerate(table) if not line.startswith("|"))]
    assert len(table) == len(report.ROWS)
    assert table[0].startswith("| LLaDA (baseline) |") and "| 1.00 | 1.00 |" in table[0]


def test_missing_method_is_not_yet(smoke, tmp_path):
    """A preset lm.generate does not know, or an argument it lacks, becomes a "not yet" row."""
    result, _ = smoke
    lm = report.load_model(pathlib.Path(result["config"]["llada"]), "tiny-llada")
    examples = report.tasks.make_split("test", 2)
    unknown = report.Row("nope", "No such method", "no-such-method", dict(steps=32))
    row = report.run_row(unknown, lm, examples, batch_size=2)
    assert row["status"] == "not yet" and "no-such-method" in row["reason"]
    knob = report.Row("nope-knob", "No such knob", "llada", dict(no_such_knob=1.0))
    row = report.run_row(knob, lm, examples, batch_size=2)
    assert row["status"] == "not yet" and "no_such_knob" in row["reason"]
    missing = report.run_row(report.ROWS[-1], report.load_model(tmp_path / "absent", "tiny-ar"), examples, batch_size=2)
    assert missing["status"] == "not yet" and "train_tiny.py tiny-ar" in missing["reason"]
    rows = [dict(result["rows"][0]), row]
    report.add_ratios(rows)
    assert "| No such knob | method='llada', no_such_knob=1 | not yet | - |" in report.markdown(dict(result, rows=rows))
