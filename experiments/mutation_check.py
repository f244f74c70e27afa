"""Do the tests notice small, plausible bugs in the decode engine? A mutation smoke check.

    python experiments/mutation_check.py [--only NAME ...] [--tests-from REV] [--out report.md]

Each mutation below is one textual edit to one library file (a comparison flipped, a preset
value changed, an offset moved). For each, the script copies the checkout to a scratch
directory, applies the edit there, and runs the tests that should catch it against the scratch
copy (PYTHONPATH points at a package tree built from the copy, so the installed dlmjax is never
touched). A mutation is CAUGHT when those tests fail. A run of the same tests on the unmutated
copy comes first: if it fails, nothing else is meaningful and the script stops.

`--tests-from REV` takes tests/ from another git revision (e.g. the commit before new tests
landed), to report what an older suite caught. Not part of CI: a full run takes about half an hour
on two cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

ENGINE_TESTS = ["tests/test_engine_boundaries.py", "tests/test_decode_confident.py", "tests/test_decode_parity.py"]
CACHE_TESTS = ["tests/test_cache_slots.py", "tests/test_decode_cache.py", "tests/test_attention.py", "tests/test_decode_confident.py"]


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # in the checkout (convert/ and kernels/ become dlmjax/convert and dlmjax/kernels)
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]


def _m(name, path, old, new, tests):
    return Mutation(name, path, old, new, tuple(tests))


RULES, EXITS, ENGINE, API = "dlmjax/decode/rules.py", "dlmjax/decode/exits.py", "dlmjax/decode/engine.py", "dlmjax/decode/presets.py"
SCHEDULES = "dlmjax/decode/schedules.py"
D2F_TESTS = ["tests/test_decode_d2f.py"]
FDV2_TESTS = ["tests/test_decode_fdv2.py"]
MUTATIONS = [
    # every comparison of the commit rules
    _m("threshold >= becomes >", RULES, "(confidence >= threshold)", "(confidence > threshold)", ENGINE_TESTS),
    _m("factor bound >= becomes >", RULES, "passes = ordered >= 1.0 - factor", "passes = ordered > 1.0 - factor", ENGINE_TESTS),
    _m("factor bound n + 1 becomes n", RULES, "factor / (n + 1.0)", "factor / n", ENGINE_TESTS),
    _m("entropy <= becomes <", RULES, "(entropy <= threshold)", "(entropy < threshold)", ENGINE_TESTS),
    _m("quota rank < becomes <=", RULES, "(ranks(score) < quota[:, None])", "(ranks(score) <= quota[:, None])", ENGINE_TESTS),
    _m("threshold without its best-one fallback", RULES, "return (candidates & sure) | best(score, candidates)",
       "return candidates & sure", ENGINE_TESTS),
    # the exit rules
    _m("exit signal >= becomes >", ENGINE, "(jnp.mean(s.margin, axis=-1) >= tau)", "(jnp.mean(s.margin, axis=-1) > tau)", ENGINE_TESTS),
    _m("prophet first bound < becomes <=", EXITS, "jnp.where(p < 1.0 / 3.0, 7.5", "jnp.where(p <= 1.0 / 3.0, 7.5", ENGINE_TESTS),
    _m("prophet second bound < becomes <=", EXITS, "jnp.where(p < 2.0 / 3.0, 5.0", "jnp.where(p <= 2.0 / 3.0, 5.0", ENGINE_TESTS),
    _m("prophet stage 1 7.5 becomes 7.0", EXITS, "1.0 / 3.0, 7.5,", "1.0 / 3.0, 7.0,", ENGINE_TESTS),
    _m("prophet stage 2 5.0 becomes 4.0", EXITS, "2.0 / 3.0, 5.0,", "2.0 / 3.0, 4.0,", ENGINE_TESTS),
    _m("prophet stage 3 2.5 becomes 1.0", EXITS, "5.0, 2.5))", "5.0, 1.0))", ENGINE_TESTS),
    _m("linear schedule reversed", EXITS, "return tau_high + (tau_low - tau_high) * p", "return tau_low + (tau_high - tau_low) * p",
       ENGINE_TESTS),
    _m("cosine schedule half-period", EXITS, "(1.0 + jnp.cos(jnp.pi * p))", "(1.0 + jnp.cos(0.5 * jnp.pi * p))", ENGINE_TESTS),
    _m("exp schedule rate halved", EXITS, "jnp.exp(-k * p)", "jnp.exp(-0.5 * k * p)", ENGINE_TESTS),
    # every preset value
    _m("fast-dllm threshold 0.9 becomes 0.7", API, 'rule="threshold", threshold=0.9', 'rule="threshold", threshold=0.7', ["tests/test_presets.py"]),
    _m("fast-dllm blocks 32 become 16", API, 'threshold=0.9, block_length=32', 'threshold=0.9, block_length=16', ["tests/test_presets.py"]),
    _m("dparallel bound 0.5 becomes 0.45", API, 'rule="entropy", threshold=0.5', 'rule="entropy", threshold=0.45', ["tests/test_presets.py"]),
    _m("dparallel blocks 32 become 64", API, 'threshold=0.5, block_length=32', 'threshold=0.5, block_length=64', ["tests/test_presets.py"]),
    _m("sched tau_high 7.5 becomes 7.0", API, 'schedule="exp", tau_high=7.5', 'schedule="exp", tau_high=7.0', ["tests/test_presets.py"]),
    _m("sched tau_low 2.5 becomes 0.0", API, 'tau_high=7.5, tau_low=2.5, exit_k=4.0', 'tau_high=7.5, tau_low=0.0, exit_k=4.0', ["tests/test_presets.py"]),
    _m("sched exit_k 4 becomes 8", API, 'tau_low=2.5, exit_k=4.0', 'tau_low=2.5, exit_k=8.0', ["tests/test_presets.py"]),
    _m("sched schedule exp becomes linear", API, 'rule="quota", schedule="exp"', 'rule="quota", schedule="linear"', ["tests/test_presets.py"]),
    _m("prophet blocks 32 become 16", API, 'schedule="prophet", block_length=32', 'schedule="prophet", block_length=16', ["tests/test_presets.py"]),
    _m("dream alg origin becomes entropy", API, 'rule="dream", alg="origin"', 'rule="dream", alg="entropy"', ["tests/test_presets.py"]),
    _m("dream eps 1e-3 becomes 1e-2", API, 'alg="origin", eps=1e-3', 'alg="origin", eps=1e-2', ["tests/test_presets.py"]),
    _m("llada remasking becomes random", API, 'rule="quota", remasking="low_confidence")',
       'rule="quota", remasking="random")', ["tests/test_presets.py"]),
    # the KV cache: write position and the keep mask
    _m("cache write one slot late", "dlmjax/cache.py", "new_k, new_v = put(self.k[layer], k, index), put(",
       "new_k, new_v = put(self.k[layer], k, index + 1), put(", CACHE_TESTS),
    _m("cache write ignores keep", "dlmjax/cache.py", "k = jnp.where(kept, read(self.k[layer], index), k)",
       "k = jnp.where(kept, k, k)", CACHE_TESTS),
    _m("per-row cache write one slot late", "dlmjax/cache.py",
       "put = jax.vmap(lambda c, u, i: jax.lax.dynamic_update_slice_in_dim(c, u, i, axis=1))",
       "put = jax.vmap(lambda c, u, i: jax.lax.dynamic_update_slice_in_dim(c, u, i + 1, axis=1))", FDV2_TESTS),
    _m("written slots ignore keep", "dlmjax/cache.py", "fresh = jnp.ones((count,), bool) if keep is None else ~keep",
       "fresh = jnp.ones((count,), bool)", CACHE_TESTS),
    # the block mask offsets
    _m("prompt-block-causal blocks one late", "dlmjax/attention.py", "1 + (index - prompt_length) // block_size",
       "1 + (index - prompt_length + 1) // block_size", CACHE_TESTS),
    _m("block-causal blocks from 1", "dlmjax/attention.py", "return index // block_size", "return (index + 1) // block_size", CACHE_TESTS),
    _m("block mask q >= k becomes >", "dlmjax/attention.py", "(self.q_block[:, None] >= self.k_block[None, :])",
       "(self.q_block[:, None] > self.k_block[None, :])", CACHE_TESTS),
    # D2F's pipeline and rule, Fast-dLLM v2's blocks
    _m("d2f tau_conf > becomes >=", RULES, "sure = candidates & (step.confidence > self.tau_conf)",
       "sure = candidates & (step.confidence >= self.tau_conf)", D2F_TESTS),
    _m("d2f fallback in every window", RULES, "stuck = ~jnp.any(sure, axis=-1) if step.force is None else step.force & ~jnp.any(sure, axis=-1)",
       "stuck = ~jnp.any(sure, axis=-1)", D2F_TESTS),
    _m("d2f topk_margin ranks by probability", RULES, "            return margins(probs)\n        return jnp.sum(probs",
       "            return jnp.max(probs, axis=-1)\n        return jnp.sum(probs", D2F_TESTS),
    _m("d2f tau_add >= becomes >", SCHEDULES, "(newest >= self.tau_add)", "(newest > self.tau_add)", D2F_TESTS),
    _m("d2f tau_act >= becomes >", SCHEDULES, "(before >= self.tau_act)", "(before > self.tau_act)", D2F_TESTS),
    _m("d2f activation skips the prompt", SCHEDULES, "before = jnp.concatenate([jnp.ones_like(ratio[:, :1]), ratio[:, :-1]], axis=1)",
       "before = jnp.concatenate([jnp.zeros_like(ratio[:, :1]), ratio[:, :-1]], axis=1)", D2F_TESTS),
    _m("fdv2 threshold > becomes >=", API, 'rule="threshold", strict=True,', 'rule="threshold", strict=False,',
       FDV2_TESTS + ["tests/test_presets.py"]),
    _m("fdv2 prefill only past one block", SCHEDULES, "prefill = prompt_lengths >= self.block_length",
       "prefill = prompt_lengths > self.block_length", FDV2_TESTS),
    _m("fdv2 sub-blocks ignored", SCHEDULES, "window = in_block & (sub == current)", "window = in_block", FDV2_TESTS),
    _m("fdv2 stop with a mask before it", SCHEDULES, "stopped = jnp.any(is_stop, axis=-1) & ~jnp.any(masked & (g < first_stop[:, None]), axis=-1)",
       "stopped = jnp.any(is_stop, axis=-1)", FDV2_TESTS),
    # D2F's and Fast-dLLM v2's caches
    _m("d2f cache: a block final from the step's own commits", SCHEDULES,
       "decoded = self.decoded(before) >= 1.0", "decoded = self.decoded(masked) >= 1.0", D2F_TESTS),
    _m("d2f cache window one block short", SCHEDULES, "g - jnp.maximum(cached, 0) * k + int(shifted))",
       "g - (jnp.maximum(cached, 0) + 1) * k + int(shifted))", D2F_TESTS),
    _m("fdv2 block window misses the next token", SCHEDULES, "return Window(end=hi + 1,", "return Window(end=hi,", FDV2_TESTS),
    _m("fdv2 dual reuses on the block's first forward", SCHEDULES, "reuse = jnp.any(left, axis=-1) & ~st.fresh & ",
       "reuse = jnp.any(left, axis=-1) & ", FDV2_TESTS),
    _m("fdv2 dual: reusing rows keep nothing", "dlmjax/decode/caches.py", "return reuse[:, None] & ~in_sub(",
       "return reuse[:, None] & False & ~in_sub(", FDV2_TESTS),
    # RoPE
    _m("rope theta / 10", "dlmjax/attention.py", "inv_freq = 1.0 / (theta ** (", "inv_freq = 1.0 / ((theta / 10) ** (",
       ["tests/test_model_parity.py", "tests/test_attention.py"]),
]


def _git_files(rev: str | None, prefix: str) -> list[str]:
    args = ["git", "ls-files", prefix] if rev is None else ["git", "ls-tree", "-r", "--name-only", rev, prefix]
    return [line for line in subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=True).stdout.splitlines() if line]


def scratch_copy(tests_from: str | None) -> pathlib.Path:
    """The checkout's tracked files in a temp dir, plus pkg/dlmjax laid out as the installed package."""
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="dlmjax-mutation-"))
    for name in _git_files(None, "."):
        if tests_from is not None and name.startswith("tests/"):
            continue
        src = ROOT / name
        if src.is_file():
            (scratch / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, scratch / name)
    if tests_from is not None:
        for name in _git_files(tests_from, "tests"):
            out = subprocess.run(["git", "show", f"{tests_from}:{name}"], cwd=ROOT, capture_output=True, check=True).stdout
            (scratch / name).parent.mkdir(parents=True, exist_ok=True)
            (scratch / name).write_bytes(out)
    return scratch


def package_tree(scratch: pathlib.Path) -> pathlib.Path:
    """pkg/dlmjax = dlmjax/ + convert/ as dlmjax/convert + kernels/ as dlmjax/kernels (pyproject's mapping)."""
    pkg = scratch / "pkg"
    if pkg.exists():
        shutil.rmtree(pkg)
    shutil.copytree(scratch / "dlmjax", pkg / "dlmjax")
    shutil.copytree(scratch / "convert", pkg / "dlmjax" / "convert")
    shutil.copytree(scratch / "kernels", pkg / "dlmjax" / "kernels")
    return pkg


def run_tests(scratch: pathlib.Path, tests, timeout: int) -> tuple[str, float, str]:
    """("pass" | "fail" | "error", seconds, pytest's last line). Only failing tests count as a catch:
    a collection error or a missing file is an "error"."""
    tests = [t for t in tests if (scratch / t.split("::")[0]).exists()]
    if not tests:
        return "error", 0.0, "none of its test files exist in this revision"
    pkg = package_tree(scratch)
    # PYTHONSAFEPATH: no process (pytest, the tests' subprocesses) puts the working directory, which
    # holds the unmapped dlmjax/ folder, on sys.path; the package comes from pkg/ only
    env = {**os.environ, "PYTHONPATH": str(pkg), "PYTHONSAFEPATH": "1"}
    check = subprocess.run([sys.executable, "-c", "import dlmjax, dlmjax.kernels; print(dlmjax.__file__)"], env=env,
                           capture_output=True, text=True, cwd=scratch)
    if not check.stdout.strip().startswith(str(pkg)):
        raise SystemExit(f"the scratch package is not the one imported: {check.stdout.strip() or check.stderr[-500:]}")
    start = time.time()
    try:
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests], cwd=scratch,
                             env=env, capture_output=True, text=True, timeout=timeout)
        status = {0: "pass", 1: "fail"}.get(run.returncode, "error")
        tail = (run.stdout + run.stderr).strip().splitlines()[-1:]
    except subprocess.TimeoutExpired:
        status, tail = "error", ["timed out"]
    return status, time.time() - start, tail[0] if tail else ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="run only the mutations whose name contains one of these")
    parser.add_argument("--tests-from", help="git revision to take tests/ from (default: the working tree)")
    parser.add_argument("--tests", nargs="*", help="run these test files for every mutation instead of each one's own")
    parser.add_argument("--out", type=pathlib.Path, help="write the report (markdown) here too")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per test run")
    args = parser.parse_args(argv)

    mutations = [m for m in MUTATIONS if not args.only or any(o in m.name for o in args.only)]
    if args.tests:
        mutations = [dataclasses.replace(m, tests=tuple(args.tests)) for m in mutations]
    scratch = scratch_copy(args.tests_from)
    try:
        for m in mutations:  # every edit must still apply: a stale mutation would be silently "survived"
            text = (scratch / m.path).read_text()
            if text.count(m.old) != 1:
                raise SystemExit(f"mutation {m.name!r}: {m.path} holds {m.old!r} {text.count(m.old)} times, not once")
        union = sorted({t for m in mutations for t in m.tests})
        status, seconds, tail = run_tests(scratch, union, args.timeout)
        print(f"baseline (no mutation): {status} in {seconds:.0f} s: {tail}", flush=True)
        if status != "pass":
            return 1
        rows = []
        for m in mutations:
            original = (scratch / m.path).read_text()
            (scratch / m.path).write_text(original.replace(m.old, m.new))
            try:
                status, seconds, tail = run_tests(scratch, m.tests, args.timeout)
            finally:
                (scratch / m.path).write_text(original)
            rows.append((m, status, seconds, tail))
            print(f"{ {'fail': 'caught', 'pass': 'MISSED', 'error': 'ERROR'}[status]:7} {m.name} ({seconds:.0f} s): {tail}", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    caught = sum(r[1] == "fail" for r in rows)
    lines = [f"tests from: {args.tests_from or 'working tree'}; {caught} of {len(rows)} mutations caught", "",
             "| mutation | file | caught | seconds | tests |", "|---|---|---|---|---|"]
    for m, status, seconds, tail in rows:
        verdict = {"fail": "yes", "pass": "**no**", "error": f"error: {tail}"}[status]
        lines.append(f"| {m.name} | {m.path} | {verdict} | {seconds:.0f} | {' '.join(t.split('/')[-1] for t in m.tests)} |")
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.write_text(report + "\n")
    return 0 if caught == len(rows) else 2


if __name__ == "__main__":
    sys.exit(main())
