"""Report v2: every decoding method swept along its knob, on task suites v1 and v2, as Pareto curves.

    python experiments/report_v2.py                      # both suites, 512 test problems a point
    python experiments/report_v2.py --suite v2 --examples 128
    python experiments/report_v2.py --smoke              # the first and last point of each sweep on 8 problems, for CI
    python experiments/report_v2.py --curves fast-dllm-dual,d2f

For each suite (experiments/tasks.py) and each model the suite has (the diffusion model, the
autoregressive one, and the distilled ones: dParallel, the D2F adapter, Fast-dLLM v2), each method
runs at every point of its sweep (LLaDA's steps, a rule's threshold, SchED's tau_low per schedule,
D2F's tau_add/tau_act/tau_conf, Fast-dLLM v2's threshold) on the same test problems. Written to
--out-dir:

    report-v2-<suite>.md       one table row per point, marking the points on the suite's Pareto fronts
    report-v2-<suite>.json     the same numbers, unrounded, with each point's lm.generate arguments
    pareto-<suite>-nfe.png     accuracy against mean NFE: one line per sweep, the suite's front dashed
    pareto-<suite>-speed.png   accuracy against tokens/s (compile excluded), the same way

(each suite's files on their own: `--suite v2` rewrites v2's and leaves v1's).

A point is on the NFE front when no other point of its suite is at least as accurate with fewer
forward passes (or more accurate with as few); likewise for tokens/s. Thresholds and the other
traced knobs share one compilation along a sweep (lm.generate recompiles only for a new shape or
method structure: LLaDA's and Prophet's steps), and the first batch of every point is decoded once
untimed. A model that is not there yet (trained by experiments/train_tiny.py, or by its recipe)
turns its sweeps into "not yet" rows with the command that makes it; a sweep that fails otherwise
is an "error" row (its traceback on stderr) and the command exits with status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import traceback
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import report  # noqa: E402  (the v1 report: machine facts, model loading, paths)
import tasks  # noqa: E402
import train_tiny  # noqa: E402

import dlmjax  # noqa: E402
from dlmjax.errors import DlmjaxError  # noqa: E402

ROOT = report.ROOT
SMOKE_EXAMPLES = 8
SUITES = ("v1", "v2")

# The models of each suite: role -> (checkpoint directory under --models-dir, LoRA adapter directory or
# None, and the command that makes it). The v1 suite has the first two tiny models only; the distilled
# models are trained on suite v2, the one that leaves room to speed up.
MODELS = {
    "v1": {
        "llada": ("tiny-llada", None, "python experiments/train_tiny.py tiny-llada"),
        "ar": ("tiny-ar", None, "python experiments/train_tiny.py tiny-ar"),
    },
    "v2": {
        "llada": ("tiny-llada-v2", None, "python experiments/train_tiny.py tiny-llada-v2"),
        "ar": ("tiny-ar-v2", None, "python experiments/train_tiny.py tiny-ar-v2"),
        "dparallel": ("tiny-llada-dparallel", None, "python experiments/train_tiny.py tiny-llada-dparallel"),
        "d2f": ("tiny-llada-v2", "tiny-d2f", "python experiments/train_tiny.py tiny-d2f"),
        "fdv2": ("tiny-fdv2", None, "python experiments/train_tiny.py tiny-fdv2"),
    },
}
ROLE_LABELS = {"llada": "diffusion", "ar": "AR", "dparallel": "dParallel-distilled", "d2f": "D2F adapter",
               "fdv2": "Fast-dLLM v2"}

THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)


@dataclasses.dataclass(frozen=True)
class Sweep:
    """One method on one model, along one knob: `points` are the knob settings, `fixed` the
    other lm.generate arguments. Integers in `fixed` or a point that are fractions of the
    canvas are written as callables of gen_length (see `resolve`)."""

    name: str  # the id --curves selects
    label: str
    model: str  # a role of MODELS
    method: str
    knob: str  # what the sweep varies, for the table and the legend
    points: tuple[dict, ...]
    fixed: dict = dataclasses.field(default_factory=dict)


def _steps(*divisors: int) -> tuple[dict, ...]:
    return tuple({"steps": lambda g, d=d: g // d} for d in divisors)


def _thresholds(values=THRESHOLDS) -> tuple[dict, ...]:
    return tuple({"threshold": v} for v in values)


# The papers' blocks of 32 on 256 tokens become blocks of 16 on the 32- and 64-token canvases (two and
# four blocks); Fast-dLLM v2's sub-blocks of 8 in blocks of 32 become 4 in 16.
BLOCK = 16
SWEEPS = [
    Sweep("llada", "LLaDA, one block", "llada", "llada", "steps", _steps(1, 2, 4, 8), dict(block_length=lambda g: g)),
    Sweep("fast-dllm", "Fast-dLLM, no cache", "llada", "fast-dllm", "threshold", _thresholds(),
          dict(block_length=BLOCK, cache="none")),
    Sweep("fast-dllm-prefix", "Fast-dLLM, prefix cache", "llada", "fast-dllm", "threshold", _thresholds(),
          dict(block_length=BLOCK, cache="prefix")),
    Sweep("fast-dllm-dual", "Fast-dLLM, dual cache", "llada", "fast-dllm", "threshold", _thresholds(),
          dict(block_length=BLOCK, cache="dual")),
    Sweep("fast-dllm-factor", "Fast-dLLM factor rule", "llada", "fast-dllm", "factor",
          tuple({"factor": f} for f in (0.25, 0.5, 1.0, 2.0, 4.0)), dict(rule="factor", block_length=BLOCK)),
    Sweep("dparallel-rule", "dParallel entropy rule", "llada", "dparallel", "threshold (nats)",
          _thresholds((0.05, 0.1, 0.25, 0.5, 1.0, 2.0)), dict(block_length=BLOCK)),
    *(Sweep(f"sched-{s}", f"SchED {s}", "llada", "sched", "tau_low", tuple({"tau_low": t} for t in (0.0, 1.0, 2.5, 5.0)),
            dict(schedule=s, tau_high=7.5, block_length=lambda g: g))
      for s in ("linear", "cosine", "exp")),
    Sweep("prophet", "Prophet", "llada", "prophet", "steps", _steps(1, 2, 4), dict(block_length=BLOCK)),
    Sweep("ar", "greedy AR, KV cache", "ar", "ar", "-", ({},), dict(temperature=0.0)),
    # the distilled models
    Sweep("dparallel", "dParallel entropy rule", "dparallel", "dparallel", "threshold (nats)",
          _thresholds((0.05, 0.1, 0.25, 0.5, 1.0, 2.0)), dict(block_length=BLOCK)),
    Sweep("dparallel-fast-dllm", "Fast-dLLM, dual cache", "dparallel", "fast-dllm", "threshold", _thresholds(),
          dict(block_length=BLOCK, cache="dual")),
    Sweep("dparallel-llada", "LLaDA, one block", "dparallel", "llada", "steps", _steps(1, 2, 4, 8),
          dict(block_length=lambda g: g)),
    Sweep("d2f", "D2F pipeline", "d2f", "d2f", "tau_add/tau_act/tau_conf",
          tuple(dict(tau_add=a, tau_act=b, tau_conf=c) for a, b, c in
                ((0.1, 0.95, 0.95), (0.1, 0.95, 0.9), (0.3, 0.9, 0.8), (0.5, 0.8, 0.7), (0.7, 0.7, 0.5))),
          dict(block_length=BLOCK)),
    Sweep("fdv2", "Fast-dLLM v2, block cache", "fdv2", "fast-dllm-v2", "threshold", _thresholds(),
          dict(block_length=BLOCK, sub_block_length=BLOCK // 4)),
]


def resolve(settings: dict, gen_length: int) -> dict:
    return {k: (v(gen_length) if callable(v) else v) for k, v in settings.items()}


settings_text = report.format_settings


def pareto(points: list[tuple[float, float]], *, lower_x_better: bool) -> list[bool]:
    """Which (x, accuracy) points no other point dominates: at least as accurate and at least
    as cheap (x lower for NFE, higher for tokens/s), better in one of the two."""
    sign = 1.0 if lower_x_better else -1.0
    flags = []
    for i, (x, a) in enumerate(points):
        dominated = any(
            a2 >= a and sign * x2 <= sign * x and (a2 > a or sign * x2 < sign * x)
            for j, (x2, a2) in enumerate(points) if j != i
        )
        flags.append(not dominated)
    return flags


def load_role(models_dir: pathlib.Path, suite: str, role: str):
    """The LM of a suite's role, or a one-line reason why there is none."""
    if role not in MODELS[suite]:
        return f"suite {suite} has no {ROLE_LABELS[role]} model"
    name, adapter, command = MODELS[suite][role]
    path = models_dir / name
    if not path.exists():
        return f"no model at {report._shown(path)}; make it with `{command}`"
    if adapter is None:
        return report.load_model(path, name)
    adapter_dir = models_dir / adapter
    if not adapter_dir.exists():
        return f"no adapter at {report._shown(adapter_dir)}; make it with `{command}`"
    try:
        return dlmjax.load(path, dtype="float32", adapter=adapter_dir, progress=False)
    except DlmjaxError as e:
        return f"{path} with {adapter_dir} does not load yet: {e}"


def run_sweep(sweep: Sweep, lm, examples: list, *, suite: str, gen_length: int, batch_size: int, smoke: bool) -> list[dict]:
    """One result per point of the sweep ("ok" with the metrics, or "not yet" / "error" with a reason)."""
    points = sweep.points if not smoke or len(sweep.points) <= 2 else (sweep.points[0], sweep.points[-1])
    out = []
    from tqdm.auto import tqdm

    for point in tqdm(points, desc=f"{suite} {sweep.name}", unit="point", leave=False, disable=isinstance(lm, str)):
        knobs = resolve({**sweep.fixed, **point}, gen_length)
        result = dict(suite=suite, sweep=sweep.name, label=sweep.label, model=sweep.model, method=sweep.method,
                      knob=sweep.knob, point=resolve(point, gen_length), knobs=knobs,
                      settings=settings_text(dict(method=sweep.method, **knobs)))
        if isinstance(lm, str):
            out.append(dict(result, status="not yet", reason=lm))
            continue
        kwargs = dict(method=sweep.method, gen_length=gen_length, **knobs)
        try:
            warm = lm.generate([tasks.encode_prompt(lm.tokenizer, e.prompt) for e in examples[:batch_size]], **kwargs)
            metrics = train_tiny.evaluate(lm, lm.tokenizer, examples, batch_size=batch_size, **kwargs)
        except Exception as e:  # keep the other points of a long run; the command still fails
            traceback.print_exc()
            out.append(dict(result, status="error", reason=f"{type(e).__name__}: {e}"))
            continue
        out.append(dict(result, status="ok", compile_seconds=warm.compile_seconds, **metrics))
    return out


def mark_fronts(rows: list[dict]) -> None:
    for suite in {r["suite"] for r in rows}:
        done = [r for r in rows if r["suite"] == suite and r["status"] == "ok"]
        for key, lower in (("mean_nfe", True), ("tokens_per_s", False)):
            flags = pareto([(r[key], r["accuracy"]) for r in done], lower_x_better=lower)
            for r, flag in zip(done, flags):
                r[f"front_{'nfe' if key == 'mean_nfe' else 'speed'}"] = flag


def _point_text(r: dict) -> str:
    return settings_text(r["point"]) if r["point"] else "-"


def markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [
        "# Report v2: decoding methods swept along their knobs",
        "",
        f"{cfg['examples']} test problems of each suite (experiments/tasks.py, seed {cfg['seed']}), batch "
        f"{cfg['batch_size']}, greedy; models from `{cfg['models_dir']}`. Front: N = on the accuracy-vs-NFE "
        "Pareto front of its suite, S = on the accuracy-vs-tokens/s front.",
    ]
    for suite in cfg["suites"]:
        rows = [r for r in result["rows"] if r["suite"] == suite]
        prompt_length, gen_length = train_tiny.CANVAS[suite]
        models = ", ".join(f"{ROLE_LABELS[role]} `{name}`" + (f" + adapter `{adapter}`" if adapter else "")
                           for role, (name, adapter, _) in MODELS[suite].items())
        lines += [
            "",
            f"## Suite {suite}: {prompt_length}-token prompts, {gen_length}-token canvas",
            "",
            f"Models: {models}. Plots: `pareto-{suite}-nfe.png`, `pareto-{suite}-speed.png`.",
            "",
            "| model | method | point | accuracy | mean NFE | tokens/s | front | settings |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            if r["status"] != "ok":
                lines.append(f"| {ROLE_LABELS[r['model']]} | {r['label']} | {_point_text(r)} | {r['status']} | - | - | - | "
                             f"{r['settings']} |")
                continue
            front = ("N" if r.get("front_nfe") else "") + ("S" if r.get("front_speed") else "")
            lines.append(f"| {ROLE_LABELS[r['model']]} | {r['label']} | {_point_text(r)} | {r['accuracy']:.3f} | "
                         f"{r['mean_nfe']:.1f} | {r['tokens_per_s']:.0f} | {front} | {r['settings']} |")
        missing = {}
        for r in rows:
            if r["status"] != "ok":
                missing.setdefault((r["label"], r["model"], r["status"]), r["reason"])
        if missing:
            lines += ["", "Not run:", ""]
            lines += [f"- {label} on the {ROLE_LABELS[model]} model ({status}): {reason}"
                      for (label, model, status), reason in missing.items()]
    m = result["machine"]
    lines += [
        "",
        "Notes:",
        "",
        "- The papers' blocks of 32 on a 256-token canvas are blocks of 16 here (two on suite v1, four on v2); "
        "Fast-dLLM v2's sub-blocks of 8 in blocks of 32 are 4 in 16. LLaDA and SchED run one block.",
        "- NFE is forward passes per problem (a cached pass over a block, or block and suffix, counts as one; AR: one "
        "per generated token). tokens/s counts each answer up to and including its EOS, compile excluded.",
        "- The dParallel entropy rule on the diffusion model shows the rule alone; on the dParallel-distilled "
        "model it shows the paper's method.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, jax {m['jax']} on {m['device']} x{m['devices']}, Python {m['python']}"
        + (f", load average {m['load_average']} at the start" if "load_average" in m else "") + ".",
        "",
        f"Command: `{result['command']}`",
        "",
    ]
    return "\n".join(lines)


MARKERS = {"llada": "o", "dparallel": "s", "d2f": "D", "fdv2": "^", "ar": "*"}  # the model; the colour tells the sweep


def plot(rows: list[dict], suite: str, key: str, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["suite"] == suite and r["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(10, 6.5), dpi=110)
    sweeps = list(dict.fromkeys((r["model"], r["sweep"]) for r in done))
    for i, (model, name) in enumerate(sweeps):
        points = sorted((r for r in done if r["sweep"] == name), key=lambda r: r[key])
        first = points[0]
        style = dict(marker=MARKERS[model], markersize=14 if model == "ar" else 6, alpha=0.9, linewidth=1.2,
                     color="tab:red" if model == "ar" else plt.get_cmap("tab20")(i % 20))
        ax.plot([r[key] for r in points], [r["accuracy"] for r in points],
                label=f"{first['label']} ({ROLE_LABELS[model]}; {first['knob']})", **style)
    flag = "front_nfe" if key == "mean_nfe" else "front_speed"
    front = sorted((r for r in done if r.get(flag)), key=lambda r: r[key])
    if front:
        ax.plot([r[key] for r in front], [r["accuracy"] for r in front], linestyle="--", color="black", linewidth=1,
                alpha=0.6, label="Pareto front")
    xs = [r[key] for r in done if r[key] > 0]
    if xs and max(xs) / min(xs) >= 4:
        ax.set_xscale("log")
        plain = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("mean NFE per problem (forward passes; lower is cheaper)" if key == "mean_nfe"
                  else "tokens/s (compile excluded; higher is faster)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.03, 1.03)
    ax.grid(True, which="both", alpha=0.3)
    n = done[0]["examples"] if done else 0
    ax.set_title(f"Suite {suite}: accuracy against {'NFE' if key == 'mean_nfe' else 'tokens/s'}, {n} test problems")
    if sweeps:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.subplots_adjust(left=0.07, right=0.66, bottom=0.09, top=0.94)
    fig.savefig(path)
    plt.close(fig)


def select(names: str | None) -> list[Sweep]:
    return report.pick_by_name(names, SWEEPS, "sweep")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="v1,v2", help="comma-separated task suites (default v1,v2)")
    parser.add_argument("--examples", type=int, help=f"test problems per point (default 512, or {SMOKE_EXAMPLES} with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="the first and last point of each sweep on few problems")
    parser.add_argument("--models-dir", type=pathlib.Path, default=ROOT / "dlmjax" / "models",
                        help="where the tiny models are (the names in MODELS)")
    parser.add_argument("--out-dir", type=pathlib.Path, default=ROOT / "experiments" / "results")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="the test split's seed")
    parser.add_argument("--curves", help=f"comma-separated sweeps (default all): {', '.join(s.name for s in SWEEPS)}")
    args = parser.parse_args(argv)
    suites = [s.strip() for s in args.suite.split(",") if s.strip()]
    bad = [s for s in suites if s not in SUITES]
    if bad or not suites:
        raise SystemExit(f"unknown suite(s) {', '.join(bad) or '(none)'}; pick from {', '.join(SUITES)}")
    if args.examples is not None and args.examples < 1 or args.batch_size < 1:
        raise SystemExit("--examples and --batch-size must be at least 1")
    sweeps = select(args.curves)
    n = args.examples or (SMOKE_EXAMPLES if args.smoke else 512)

    result = dict(
        command="python experiments/report_v2.py " + " ".join(sys.argv[1:] if argv is None else argv),
        machine=report.machine_info(),
        config=dict(suites=suites, examples=n, batch_size=args.batch_size, seed=args.seed, smoke=args.smoke,
                    models_dir=report._shown(args.models_dir)),
        rows=[],
    )
    for suite in suites:
        gen_length = train_tiny.CANVAS[suite][1]
        examples = tasks.make_split("test", n, args.seed, suite)
        models: dict[str, Any] = {}
        for sweep in sweeps:
            if sweep.model not in MODELS[suite]:
                continue  # the suite has no such model at all (the distilled ones are v2's)
            if sweep.model not in models:
                models[sweep.model] = load_role(args.models_dir, suite, sweep.model)
            print(f"[{suite}] {sweep.name}: {sweep.label} on the {ROLE_LABELS[sweep.model]} model", file=sys.stderr, flush=True)
            result["rows"] += run_sweep(sweep, models[sweep.model], examples, suite=suite, gen_length=gen_length,
                                        batch_size=args.batch_size, smoke=args.smoke)
    mark_fronts(result["rows"])

    args.out_dir.mkdir(parents=True, exist_ok=True)
    for suite in suites:  # each suite's files on their own, so that a run of one suite leaves the other's
        one = dict(result, config=dict(result["config"], suites=[suite]), rows=[r for r in result["rows"] if r["suite"] == suite])
        text = markdown(one)
        (args.out_dir / f"report-v2-{suite}.md").write_text(text)
        (args.out_dir / f"report-v2-{suite}.json").write_text(json.dumps(one, indent=2, default=report._json_default) + "\n")
        plot(result["rows"], suite, "mean_nfe", args.out_dir / f"pareto-{suite}-nfe.png")
        plot(result["rows"], suite, "tokens_per_s", args.out_dir / f"pareto-{suite}-speed.png")
        print(text)
    return result


if __name__ == "__main__":
    out = main()
    sys.exit(1 if any(r["status"] == "error" for r in out["rows"]) else 0)
