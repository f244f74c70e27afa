"""python -m dlmjax.generate: decode a prompt on the device and report NFE and speed.

    python -m dlmjax.generate --model DIR_OR_HUB_ID --prompt "What is 2+3?" --chat --method fast-dllm
    python -m dlmjax.generate --prompt "Mia has 7 apples. She buys 5 more. How many now?" --chat

Without --model it runs the embedded tiny-llada (trained on experiments/tasks.py; works offline).

Prints the answer and one summary line (NFE, tokens/s, decode seconds, compile seconds);
--json prints tokens, nfe, steps and seconds for tooling instead.

Multi-host: run the same command on every host with --distributed (TPU pods, SLURM) or with
DLMJAX_COORDINATOR, DLMJAX_NUM_PROCESSES and DLMJAX_PROCESS_ID set, and a --mesh over all
hosts' devices; process 0 prints the results.
"""

from __future__ import annotations

import argparse
import json
import sys

from dlmjax.errors import DlmjaxError


def knob_flags() -> dict[str, tuple[type, tuple | None, str]]:
    """knob -> (type, choices, help) for every knob of every method part (dlmjax.decode.method),
    in the order the parts define them: the CLI's decode flags, generated, so none can be missing."""
    from dlmjax.decode.method import SELECTORS, knob_table

    flags: dict[str, tuple[type, tuple | None, str]] = {
        name: (str, choices, f"override the method's {what}") for name, (what, choices) in SELECTORS.items()
    }
    for name, (field, help) in knob_table().items():
        kind = str(field.type)
        kind = bool if kind.startswith("bool") else int if kind.startswith("int") else float if kind.startswith("float") else str
        flags[name] = (kind, field.metadata.get("choices"), help)
    return flags


def add_knob_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per decode knob (`knob_flags`), unset by default: the CLI's and the server's."""
    for name, (kind, choices, help) in knob_flags().items():
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, action="store_true", default=None, help=help)
        else:
            parser.add_argument(flag, type=kind, choices=choices, help=help)


def _ids(text: str) -> list[int]:
    """'151643,151645' -> [151643, 151645] (argparse type: a bad list is a one-line usage error)."""
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of integers, e.g. 151643,151645") from None


def _parser() -> argparse.ArgumentParser:
    from dlmjax.decode.api import PRESETS

    p = argparse.ArgumentParser(prog="python -m dlmjax.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-llada",
                   help="Hugging Face directory, converted dlmjax directory, hub id, or an embedded model: "
                        "tiny-llada (default) or tiny-ar")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-ids", help="comma-separated prompt token ids, e.g. 1,2,3")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--method", help=f"preset: {', '.join(PRESETS)} (default llada), or ar for autoregressive models (their default)")
    add_knob_flags(p)
    p.add_argument("--stop-token-ids", type=_ids, metavar="IDS",
                   help="comma-separated ids that end the answer (default: the model's EOS and end-of-turn)")
    p.add_argument("--kernel", choices=("auto", "xla", "pallas"),
                   help="attention implementation of cached steps (default: DLMJAX_ATTENTION, else auto)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), help="default: the checkpoint's")
    p.add_argument("--mesh", help="shard over devices, e.g. data=2,tensor=4 (axes data, fsdp, tensor, expert)")
    p.add_argument("--sharding", default="fsdp_tp", help="sharding preset: single, dp, fsdp, tp, fsdp_tp (default); ep, ep_fsdp "
                   "(mixture-of-experts models: experts over the expert mesh axis)")
    p.add_argument(
        "--distributed", action="store_true",
        help="join a multi-host run first (TPU pod or SLURM detected by JAX); automatic when DLMJAX_COORDINATOR, "
        "DLMJAX_NUM_PROCESSES and DLMJAX_PROCESS_ID are set",
    )
    p.add_argument("--json", action="store_true", help="print tokens, nfe, steps, seconds and the trajectory as JSON")
    p.add_argument("--stream", action="store_true",
                   help="print the answer as it decodes, a block at a time (diffusion methods)")
    p.add_argument("--show-trajectory", action="store_true",
                   help="after the answer, print which forward pass committed each token (one line per pass)")
    return p


def _print_memory_estimate(lm, args, prompt) -> None:
    """The decode's peak bytes per device (dlmjax.memory), for one prompt row bucketed to 32 tokens."""
    from dlmjax.decode.api import build_method
    from dlmjax.memory import lm_decode_memory

    gen = args.gen_length
    if isinstance(prompt, str):
        try:
            tokens = len(lm.tokenizer(prompt)["input_ids"])
        except Exception:  # no tokenizer: lm.generate says so; estimate for one bucket
            tokens = 1
    else:
        tokens = len(prompt[0])
    try:  # the method's block length; a method lm.generate refuses gets no estimate (it says why)
        block = build_method(args.method or "llada", gen_length=gen, block_length=args.block_length).block_length
    except DlmjaxError:
        return
    est = lm_decode_memory(lm, batch=1, prompt_length=32 * max(1, -(-tokens // 32)), gen_length=gen, block_length=block,
                           cache=args.cache or "none")
    mib = 2**20
    print(
        f"per-device memory estimate: parameters {est.parameters / mib:.1f} MiB, cache {est.cache / mib:.1f} MiB, "
        f"activations {est.activations / mib:.1f} MiB"
        + (f", CPU weight copies {est.relayout / mib:.1f} MiB" if est.relayout else "")
        + f"; decode peak {est.total / mib:.1f} MiB",
        file=sys.stderr,
    )


def _stream(lm, prompt, kwargs: dict, lead: bool):
    """Print row 0's answer as blocks of it are committed (its ids without a tokenizer); return
    the whole output."""
    update, shown = None, 0
    for update in lm.stream(prompt, **kwargs):
        if not lead:
            continue
        if update.deltas is not None:
            print(update.deltas[0], end="", flush=True)
        else:
            ids = update.tokens[0]
            print("".join(f" {t}" if i or shown else str(t) for i, t in enumerate(ids[shown:])), end="", flush=True)
            shown = max(shown, len(ids))
    if lead:
        print(flush=True)
    return update.output


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.stream and args.json:
            raise DlmjaxError("--stream prints the answer as it decodes and --json prints it once as JSON; drop one of them")
        # Checked before the model loads: nothing is compiled for an input that cannot work.
        if args.gen_length is not None and args.gen_length <= 0:
            raise DlmjaxError(
                f"--gen-length {args.gen_length} is not a positive number of tokens; pass e.g. --gen-length 32, "
                "or leave it out for the model's default"
            )
        if args.prompt_ids is not None:
            try:
                prompt = [[int(t) for t in args.prompt_ids.split(",") if t.strip()]]
            except ValueError:
                raise DlmjaxError(f"--prompt-ids '{args.prompt_ids}' is not a comma-separated list of integers, e.g. 1,2,3") from None
            if not prompt[0]:
                raise DlmjaxError("--prompt-ids is empty; give at least one token id, e.g. 1,2,3")
        else:
            prompt = args.prompt
            if not prompt.strip():
                raise DlmjaxError("--prompt is empty; give some text to answer, e.g. --prompt \"Sort: 7 3 9 1\"")
        from dlmjax import distributed

        lead = True  # the process that prints
        if args.distributed or distributed.configured():
            import jax

            processes = distributed.initialize()
            lead = jax.process_index() == 0
            print(
                f"process {jax.process_index()} of {processes}: {jax.local_device_count()} local devices "
                f"of {jax.device_count()}",
                file=sys.stderr,
            )
            if processes > 1 and not args.mesh:
                raise DlmjaxError(
                    f"a run over {processes} processes needs --mesh covering all {jax.device_count()} devices, "
                    f"e.g. --mesh fsdp={processes},tensor={jax.local_device_count()}"
                )
        import dlmjax

        mesh = rules = None
        if args.mesh:
            from dlmjax.sharding import ShardingRules, make_mesh

            mesh, rules = make_mesh(args.mesh), ShardingRules.preset(args.sharding)
        lm = dlmjax.load(args.model, dtype=args.dtype, mesh=mesh, rules=rules)
        if args.gen_length is None:
            args.gen_length = lm.default_gen_length
        if mesh is not None and lead:
            _print_memory_estimate(lm, args, prompt)
        knobs = {name: getattr(args, name) for name in knob_flags() if getattr(args, name) is not None}
        kwargs = dict(method=args.method, chat=args.chat, seed=args.seed, stop_token_ids=args.stop_token_ids, kernel=args.kernel,
                      **knobs)
        if args.stream:
            out = _stream(lm, prompt, kwargs, lead)
        else:
            out = lm.generate(prompt, **kwargs)
    except DlmjaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not lead:  # every host computed the same answer; process 0 prints it
        return 0
    cfg = lm.config
    produced = int(out.lengths[0])  # the answer's tokens, its stop token included: what follows is filler
    if args.json:
        print(json.dumps({
            "text": out.texts[0] if out.texts is not None else None,
            "tokens": out.tokens[0].tolist(), "length": int(out.lengths[0]), "nfe": int(out.nfe[0]), "steps": out.steps,
            "seconds": out.seconds, "compile_seconds": out.compile_seconds,
            "trajectory": out.trajectory[0].tolist() if out.trajectory is not None else None,
        }))
        return 0
    if args.stream:
        pass  # printed as it came
    elif out.texts is not None:
        print(out.texts[0])
    else:
        print(" ".join(map(str, out.tokens[0].tolist())))
    if args.show_trajectory:
        from dlmjax import viz

        print(viz.terminal(out, 0, lm.tokenizer if out.texts is not None else None))
    method = args.method or ("ar" if cfg.is_autoregressive else "llada")
    print(
        f"[{method}] nfe {int(out.nfe[0])} | {produced / max(out.seconds, 1e-9):.1f} tokens/s "
        f"({produced} answer tokens, stop included) | {out.seconds:.3f} s decode | compile {out.compile_seconds:.2f} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
