"""Every decoding method on the task suite's test split: accuracy, NFE and speed in one table.

    python experiments/report.py                         # 512 test problems, ~minutes on a CPU
    python experiments/report.py --smoke                 # 8 problems per row, for CI
    python experiments/report.py --rows llada-32,fast-dllm-0.9 --examples 128

Decodes the test split of experiments/tasks.py with tiny-llada (every diffusion method) and
tiny-ar (greedy autoregressive decoding with a KV cache), and writes to --out-dir:

    report.md    the table, the notes and the machine
    report.json  the same numbers, unrounded, with each row's lm.generate arguments
    report.png   accuracy against mean NFE, one labelled point per row

and prints the table. Each row runs one untimed warm-up batch first, so its time excludes
compilation; each batch's `seconds` (compile excluded by lm.generate) is summed over the split.
A row whose method, rule, schedule or knob lm.generate does not have yet (build_method raises
a DlmjaxError, or lm.generate has no such argument), whose model is missing, or whose AR
decoding lm.generate refuses, appears as "not yet". A row that fails otherwise appears as
"error" (with its traceback on stderr), and the command exits with status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import pathlib
import platform
import sys
import traceback
from typing import Any

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import tasks  # noqa: E402
import train_tiny  # noqa: E402

import dlmjax  # noqa: E402
from dlmjax.decode import api  # noqa: E402
from dlmjax.errors import DlmjaxError  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
GEN_LENGTH = train_tiny.GEN_LENGTH  # the 32-token canvas the tiny models were trained to fill
HEADER = "| method | settings | accuracy | mean NFE | tokens/s | speedup | NFE ratio |"
SMOKE_EXAMPLES = 8


@dataclasses.dataclass(frozen=True)
class Row:
    name: str  # the id --rows selects
    label: str  # the table's method column
    method: str  # lm.generate's method
    knobs: dict[str, Any] = dataclasses.field(default_factory=dict)  # lm.generate's other arguments
    model: str = "llada"  # "llada" or "ar"


def _sched(schedule: str, tau_low: float) -> Row:
    return Row(f"sched-{schedule}-{tau_low:g}", f"SchED {schedule}", "sched",
               dict(steps=32, block_length=32, schedule=schedule, tau_high=7.5, tau_low=tau_low))


# The papers' 256-token canvases with blocks of 32 become a 32-token canvas here, so the
# block methods use blocks of 16 (two blocks) and LLaDA's semi-autoregressive row blocks of 8.
ROWS = [
    Row("llada-32", "LLaDA (baseline)", "llada", dict(steps=32, block_length=32)),
    Row("llada-16", "LLaDA, 2 tokens/step", "llada", dict(steps=16, block_length=32)),
    Row("llada-semi-ar", "LLaDA semi-AR blocks", "llada", dict(steps=32, block_length=8)),
    Row("fast-dllm-0.9", "Fast-dLLM", "fast-dllm", dict(threshold=0.9, block_length=16, cache="none")),
    Row("fast-dllm-0.9-prefix", "Fast-dLLM, prefix cache", "fast-dllm",
        dict(threshold=0.9, block_length=16, cache="prefix")),
    Row("fast-dllm-0.9-dual", "Fast-dLLM, dual cache", "fast-dllm", dict(threshold=0.9, block_length=16, cache="dual")),
    Row("fast-dllm-0.5", "Fast-dLLM, aggressive", "fast-dllm", dict(threshold=0.5, block_length=16, cache="none")),
    # factor 1.0: Fast-dLLM's evaluation setting (and the default of dlmjax's Factor rule).
    Row("fast-dllm-factor", "Fast-dLLM factor rule", "fast-dllm", dict(rule="factor", factor=1.0, block_length=16)),
    Row("dparallel-0.5", "dParallel entropy rule (undistilled)", "dparallel", dict(threshold=0.5, block_length=16)),
    *(_sched(schedule, tau_low) for schedule in ("linear", "cosine", "exp") for tau_low in (0.0, 2.5)),
    Row("prophet", "Prophet", "prophet", dict(steps=32, block_length=16)),
    Row("ar", "AR tiny-ar, KV cache", "ar", dict(temperature=0.0), model="ar"),
]
BASELINE = "llada-32"


def format_settings(settings: dict) -> str:
    """lm.generate arguments as one would type them."""
    return ", ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v:g}" for k, v in settings.items())


def settings_text(row: Row) -> str:
    """The lm.generate arguments of a row (gen_length aside), as one would type them."""
    return format_settings(dict(method=row.method, **row.knobs))


def missing_reason(row: Row) -> str | None:
    """Why lm.generate cannot run `row` yet, or None: an argument it lacks, or what
    build_method says about the method, rule or schedule."""
    accepted = inspect.signature(api.generate).parameters
    for knob in row.knobs:
        if knob not in accepted:
            return f"lm.generate has no argument '{knob}'"
    if row.model == "ar":
        return None  # AR decoding is checked by lm.generate itself (generate_ar)
    knobs = {k: v for k, v in row.knobs.items() if k not in ("steps", "block_length", "temperature", "seed")}
    try:
        api.build_method(row.method, gen_length=GEN_LENGTH, block_length=row.knobs.get("block_length"),
                         steps=row.knobs.get("steps"), **knobs)
    except DlmjaxError as e:
        return str(e)
    return None


def run_row(row: Row, lm, examples: list, *, batch_size: int) -> dict:
    """One row of the report: status "ok" with the metrics, "not yet" with a reason, or "error"."""
    result = dict(name=row.name, label=row.label, method=row.method, model=row.model, knobs=dict(row.knobs),
                  settings=settings_text(row))
    if isinstance(lm, str):  # the reason the model is missing
        return dict(result, status="not yet", reason=lm)
    reason = missing_reason(row)
    if reason is not None:
        return dict(result, status="not yet", reason=reason)
    kwargs = dict(method=row.method, gen_length=GEN_LENGTH, **row.knobs)
    tokenizer = lm.tokenizer
    try:
        warm = lm.generate([tasks.encode_prompt(tokenizer, e.prompt) for e in examples[:batch_size]], **kwargs)
    except DlmjaxError as e:
        if row.model != "ar":  # build_method accepted the row, so this is a real failure
            raise
        return dict(result, status="not yet", reason=f"{row.model} decoding: {e}")
    metrics = train_tiny.evaluate(lm, tokenizer, examples, batch_size=batch_size, **kwargs)
    return dict(result, status="ok", compile_seconds=warm.compile_seconds, **metrics)


def add_ratios(rows: list[dict]) -> None:
    """speedup = baseline seconds / row seconds on the same problems (compile excluded);
    NFE ratio = baseline mean NFE / row mean NFE. Both > 1 mean cheaper than the baseline."""
    base = next((r for r in rows if r["name"] == BASELINE and r["status"] == "ok"), None)
    for r in rows:
        if r["status"] != "ok" or base is None:
            continue
        r["speedup"] = base["seconds"] / max(r["seconds"], 1e-12)
        r["nfe_ratio"] = base["mean_nfe"] / max(r["mean_nfe"], 1e-12)


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = jax.devices()[0]
    info = dict(cpu=cpu, cores=os.cpu_count(), jax=jax.__version__, device=f"{device.platform} ({device.device_kind})",
                devices=jax.device_count(), python=platform.python_version())
    if hasattr(os, "getloadavg"):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]  # other processes distort the timings
    return info


def load_model(path: pathlib.Path, name: str):
    """The LM at `path`, or a one-line reason why there is none."""
    if not path.exists():
        return f"no model at {path}; train it with `python experiments/train_tiny.py {name}`"
    try:
        return dlmjax.load(path, dtype="float32", progress=False)
    except DlmjaxError as e:
        return f"{path} does not load yet: {e}"


def _shown(path) -> str:
    """A model path as the report shows it: relative to the repository when inside it."""
    path = pathlib.Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _fmt(row: dict, key: str, spec: str) -> str:
    value = row.get(key)
    return "-" if value is None else format(value, spec)


def markdown(report: dict) -> str:
    cfg, rows = report["config"], report["rows"]
    lines = [
        "# Decoding methods on the task suite",
        "",
        f"{cfg['examples']} problems of the test split (experiments/tasks.py, seed {cfg['seed']}: arith with chain of "
        f"thought, sort, reverse), batch {cfg['batch_size']}, greedy. Diffusion rows: `{cfg['llada']}`; "
        f"AR row: `{cfg['ar']}`.",
        "",
        HEADER,
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['label']} | {r['settings']} | {r['status']} | - | - | - | - |")
            continue
        lines.append(
            f"| {r['label']} | {r['settings']} | {r['accuracy']:.3f} | {r['mean_nfe']:.1f} | {r['tokens_per_s']:.0f} | "
            f"{_fmt(r, 'speedup', '.2f')} | {_fmt(r, 'nfe_ratio', '.2f')} |"
        )
    lines += [
        "",
        "Notes:",
        "",
        f"- The models fill a {GEN_LENGTH}-token canvas after a 32-token prompt, so the papers' blocks are scaled "
        "down: blocks of 16 (two blocks) where Fast-dLLM, dParallel and Prophet use 32 on 256 tokens, blocks of 8 "
        "for LLaDA's semi-autoregressive row; block_length=32 is one block.",
        "- speedup = the baseline's decode seconds / the row's, on the same problems (the tokens/s ratio for equal "
        "output); NFE ratio = the baseline's mean NFE / the row's. The baseline is LLaDA with steps = gen_length, "
        "one block.",
        "- Times exclude compilation: each row decodes one warm-up batch first, and lm.generate reports decode "
        "seconds without compile time. tokens/s counts each answer's tokens up to and including its EOS.",
        "- NFE is forward passes per row: for diffusion a pass over the canvas (a cached pass over the block, or the "
        "block and what follows it, for the prefix and dual caches), for AR one pass per generated token.",
        "- dParallel's rule runs on the undistilled model, so it shows the rule alone, not the paper's distillation.",
    ]
    missing = [r for r in rows if r["status"] != "ok"]
    if missing:
        lines += ["", "Not run:", ""] + [f"- {r['label']} ({r['status']}): {r['reason']}" for r in missing]
    m = report["machine"]
    lines += [
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, jax {m['jax']} on {m['device']} x{m['devices']}, "
        f"Python {m['python']}" + (f", load average {m['load_average']} at the start" if "load_average" in m else "")
        + ".",
        "",
        f"Command: `{report['command']}`",
        "",
    ]
    return "\n".join(lines)


def plot(rows: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(9, 6), dpi=120)
    at: dict[tuple, list[str]] = {}  # rows that land on the same point share one label
    for r in done:
        if r["model"] == "ar":
            style = dict(marker="*", s=200, color="tab:red", label="autoregressive (tiny-ar)")
        elif r["name"] == BASELINE:
            style = dict(marker="s", s=70, color="black", label="LLaDA baseline")
        else:
            style = dict(marker="o", s=45, color="tab:blue", label="diffusion (tiny-llada)")
        ax.scatter(r["mean_nfe"], r["accuracy"], zorder=3, **style)
        at.setdefault((round(r["mean_nfe"], 2), round(r["accuracy"], 3)), []).append(r["name"])
    for (nfe, accuracy), names in at.items():
        ax.annotate("\n".join(names), (nfe, accuracy), textcoords="offset points", xytext=(6, 3), fontsize=7,
                    va="bottom")
    nfes = [r["mean_nfe"] for r in done if r["mean_nfe"] > 0]
    if nfes and max(nfes) / min(nfes) >= 4:  # a log axis once the NFEs span more than a factor of a few
        ax.set_xscale("log")
        plain = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)
        ax.set_xlim(min(nfes) / 1.3, max(nfes) * 1.8)  # room for the labels right of the points
    elif nfes:
        ax.set_xlim(0, max(nfes) * 1.3)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    if unique:
        ax.legend(unique.values(), unique.keys(), fontsize=8, loc="best")
    ax.set_xlabel("mean NFE per problem (forward passes)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.03, 1.03)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(f"Accuracy against NFE on {done[0]['examples'] if done else 0} test problems")
    fig.subplots_adjust(left=0.08, right=0.97, bottom=0.09, top=0.94)  # fixed: long labels must not squeeze the axes
    fig.savefig(path)
    plt.close(fig)


def pick_by_name(names: str | None, items: list, what: str) -> list:
    """The items (each with a .name) that comma-separated `names` name, in that order; all for None."""
    if not names:
        return list(items)
    by_name = {item.name: item for item in items}
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise SystemExit(f"unknown {what}(s) {', '.join(unknown)}; pick from {', '.join(by_name)}")
    return [by_name[n] for n in wanted]


def select_rows(names: str | None) -> list[Row]:
    rows = pick_by_name(names, ROWS, "row")
    if names and all(r.name != BASELINE for r in rows):  # every speedup is relative to it
        rows.insert(0, next(r for r in ROWS if r.name == BASELINE))
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, help="test problems per row (default 512, or 8 with --smoke)")
    parser.add_argument("--smoke", action="store_true", help=f"every row on {SMOKE_EXAMPLES} problems, for CI")
    parser.add_argument("--out-dir", type=pathlib.Path, default=ROOT / "experiments" / "results")
    parser.add_argument("--llada", type=pathlib.Path, default=ROOT / "dlmjax" / "models" / "tiny-llada",
                        help="the diffusion model (HF or converted directory)")
    parser.add_argument("--ar", type=pathlib.Path, default=ROOT / "dlmjax" / "models" / "tiny-ar",
                        help="the autoregressive model (HF or converted directory)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="the test split's seed")
    parser.add_argument("--rows", help=f"comma-separated row names (default all): {', '.join(r.name for r in ROWS)}")
    args = parser.parse_args(argv)
    n = args.examples or (SMOKE_EXAMPLES if args.smoke else 512)
    rows = select_rows(args.rows)

    llada = load_model(args.llada, "tiny-llada")
    if isinstance(llada, str):
        raise SystemExit(llada)
    models = {"llada": llada}
    if any(r.model == "ar" for r in rows):
        models["ar"] = load_model(args.ar, "tiny-ar")
    examples = tasks.make_split("test", n, args.seed)
    report = dict(
        command="python experiments/report.py " + " ".join(sys.argv[1:] if argv is None else argv),
        machine=machine_info(),
        config=dict(examples=n, batch_size=args.batch_size, seed=args.seed, gen_length=GEN_LENGTH,
                    llada=_shown(args.llada), ar=_shown(args.ar), baseline=BASELINE),
        rows=[],
    )
    for row in rows:
        print(f"[{row.name}] {row.label}: {settings_text(row)}", file=sys.stderr, flush=True)
        try:
            result = run_row(row, models[row.model], examples, batch_size=args.batch_size)
        except Exception as e:  # keep the other rows of a long run; the command still fails
            traceback.print_exc()
            result = dict(name=row.name, label=row.label, method=row.method, model=row.model, knobs=dict(row.knobs),
                          settings=settings_text(row), status="error", reason=f"{type(e).__name__}: {e}")
        report["rows"].append(result)
    add_ratios(report["rows"])

    args.out_dir.mkdir(parents=True, exist_ok=True)
    text = markdown(report)
    (args.out_dir / "report.md").write_text(text)
    (args.out_dir / "report.json").write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    plot(report["rows"], args.out_dir / "report.png")
    print(text)
    return report


def _json_default(value):
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


if __name__ == "__main__":
    result = main()
    sys.exit(1 if any(r["status"] == "error" for r in result["rows"]) else 0)
