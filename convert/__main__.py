"""python -m dlmjax.convert: Hugging Face <-> dlmjax checkpoints."""

from __future__ import annotations

import argparse
import sys
import time

from dlmjax.errors import DlmjaxError


def _size(text: str) -> int:
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30, "B": 1}
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dlmjax.convert",
        description="Convert a Hugging Face checkpoint (directory or hub id) into a dlmjax checkpoint, "
        "or with --export a dlmjax checkpoint back into Hugging Face safetensors.",
    )
    parser.add_argument("src", help="Hugging Face directory or hub id (with --export: a dlmjax checkpoint)")
    parser.add_argument("dst", help="output directory (written atomically)")
    parser.add_argument("--export", action="store_true", help="dlmjax checkpoint -> Hugging Face directory")
    parser.add_argument("--adapter", help="PEFT LoRA adapter directory or hub id to apply")
    parser.add_argument("--lora", choices=("merge", "keep"), default="merge", help="merge the adapter or keep it as LoRA parameters")
    parser.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), help="weight dtype (default: as stored)")
    parser.add_argument("--allow-pickle", action="store_true", help="accept pickled .bin weights (loaded with weights_only)")
    parser.add_argument("--max-shard-size", default="5GB", help="export shard size, e.g. 5GB (default)")
    parser.add_argument("--to-block-diffusion", type=int, metavar="BD_SIZE",
                        help="write an autoregressive Qwen2 checkpoint as a Fast-dLLM v2 one with blocks of BD_SIZE "
                             "(Hugging Face layout, weights unchanged, the mask token added), the start of its fine-tuning")
    parser.add_argument("--to-dream", action="store_true",
                        help="write an autoregressive Qwen2 checkpoint as a Dream (masked diffusion) one (weights unchanged, "
                             "<|mask|> added), the start of Dream's adaptation")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        if args.to_dream:
            from .block_diffusion import to_dream

            if args.export or args.adapter or args.to_block_diffusion is not None:
                raise DlmjaxError("--to-dream rewrites a Hugging Face checkpoint; drop --export / --adapter / --to-block-diffusion")
            out = to_dream(args.src, args.dst, overwrite=args.overwrite)
        elif args.to_block_diffusion is not None:
            from .block_diffusion import to_block_diffusion

            if args.export or args.adapter:
                raise DlmjaxError("--to-block-diffusion rewrites a Hugging Face checkpoint; drop --export / --adapter")
            out = to_block_diffusion(args.src, args.dst, bd_size=args.to_block_diffusion, overwrite=args.overwrite)
        elif args.export:
            from .hf_export import export

            if args.adapter:
                raise DlmjaxError("--adapter applies to import only; adapters kept at conversion are merged on export")
            out = export(args.src, args.dst, dtype=args.dtype, max_shard_bytes=_size(args.max_shard_size), overwrite=args.overwrite)
        else:
            from .hf_import import convert

            out = convert(
                args.src, args.dst, adapter=args.adapter, lora=args.lora, dtype=args.dtype,
                allow_pickle=args.allow_pickle, overwrite=args.overwrite, progress=not args.no_progress,
            )
    except DlmjaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
