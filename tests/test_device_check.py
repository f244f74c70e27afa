"""experiments/device_check.py: the GPU report's wiring, run on tiny shapes on the CPU (--dry-run),
and its time boxes (a hanging section is killed, a crashing one recorded, the report still written)."""

import json
import math
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "device_check.py"


def run(out: pathlib.Path, *args: str, fault: str | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("DEVICE_CHECK_FAULT", None)
    if fault:
        env["DEVICE_CHECK_FAULT"] = fault
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), *args], capture_output=True,
                          text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_dry_run_reports_every_section_with_numbers(tmp_path):
    run(tmp_path)
    report = json.loads((tmp_path / "device_report.json").read_text())
    markdown = (tmp_path / "device_report.md").read_text()
    sections = report["sections"]
    assert list(sections) == ["machine", "parity", "kernels", "forward", "decode", "moe"]
    for name, doc in sections.items():
        assert doc["status"] == "ok", (name, doc.get("error"), doc.get("worker_log_tail"))
        assert number(doc["seconds"]), name

    machine = sections["machine"]["data"]
    assert machine["backend"] == "cpu" and machine["jax"] and machine["jaxlib"] and machine["torch"]
    assert {"transformers", "flax"} <= set(machine["packages"])

    parity = sections["parity"]["rows"]
    assert {r["model"] for r in parity} == {"llada-bf16", "llada"}
    assert all(number(r["max_abs"]) for r in parity)
    checked = [r for r in parity if "ok" in r]
    assert len(checked) == 3 and all(r["ok"] for r in checked), checked

    kernels = sections["kernels"]["rows"]
    timing = {r["impl"]: r for r in kernels if r["kind"] == "timing"}
    assert set(timing) == {"kernel", "xla_ref", "nn_xla"}  # no cuDNN on the CPU
    for r in timing.values():
        assert "error" not in r and number(r["seconds"]) and r["seconds"] > 0 and number(r["gbps"]), r
        assert r["roofline"] is None  # no peak bandwidth for a CPU
    assert timing["kernel"]["ok"] and timing["nn_xla"]["rel_err"] < 1e-2
    checks = [r for r in kernels if r["kind"] == "check"]
    assert len(checks) == 2 and all(r["ok"] for r in checks), checks
    assert [r["uses"] for r in kernels if r["kind"] == "auto"] == ["xla"]  # auto has no kernel for the CPU

    forward = sections["forward"]["rows"]
    assert [r["batch"] for r in forward] == [1]
    assert all(number(r["seconds"]) and r["seconds"] > 0 and number(r["flops"]) and not r["extrapolated"] for r in forward)

    decode = sections["decode"]
    assert decode["data"]["canvas_logits"]["torch_dual_cache_vs_torch"]["max_abs"] < 1e-5
    rows = {(r["method"], r["batch"]): r for r in decode["rows"]}
    assert set(rows) == {("llada", 1), ("fast-dllm", 1), ("sched", 1)}
    expected = decode["data"]["expected_nfe"]
    for r in rows.values():
        # the pinned NFE, reached by both implementations
        assert r["jax_nfe"] == r["torch_nfe"] == expected and r["jax_forwards"] == r["torch_forwards"] == expected, r
        assert all(number(r[k]) and r[k] > 0 for k in ("jax_tok_s", "torch_tok_s", "jax_overhead", "torch_overhead")), r
        # same float32 weights, greedy: the two stacks decode the same tokens (a near-tie may flip one)
        assert r["agreement"] >= 0.9, r
    assert rows[("fast-dllm", 1)]["cache"] == "dual"

    moe = sections["moe"]["rows"]
    check = [r for r in moe if r["kind"] == "check"]
    assert len(check) == 1 and check[0]["ok"] and check[0]["rel_err"] < 1e-4, check
    timing = [r for r in moe if r["kind"] == "timing"]
    assert timing and all(number(r["seconds"]) and r["seconds"] > 0 and 1 <= r["experts_touched"] <= 8 for r in timing)

    for heading in ("| section | status | seconds | error |", "## machine: ok", "| model | comparison |",
                    "| B | Tq | S | impl | us/call |", "| mask | B | Tq | S | rel err | ok |",
                    "| batch | length | ms/forward |", "| method | cache | batch | dlmjax tok/s |",
                    "| tokens | ms/layer | tokens/s | experts used |"):
        assert heading in markdown, heading
    assert "**FAIL**" not in markdown  # no failed check anywhere


def test_a_hanging_section_is_killed_and_a_crashing_one_recorded(tmp_path):
    # budget 12 s: machine's share is ~2.4 s, then 5 s of grace; the faults fire before any import
    proc = run(tmp_path, "--sections", "machine", "parity", "--budget", "12", fault="machine=hang,parity=crash",
               timeout=120)
    report = json.loads((tmp_path / "device_report.json").read_text())
    machine, parity = report["sections"]["machine"], report["sections"]["parity"]
    assert machine["status"] == "timeout" and "deadline" in machine["error"]
    assert parity["status"] == "error" and "exit code 3" in parity["error"]
    markdown = (tmp_path / "device_report.md").read_text()
    assert "| machine | timeout |" in markdown and "| parity | error |" in markdown
    assert "report:" in proc.stdout
