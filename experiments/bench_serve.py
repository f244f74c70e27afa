"""Benchmark: the OpenAI-compatible server's throughput at 1, 8 and 32 concurrent clients.

    pip install -e ".[serve]" openai
    python experiments/bench_serve.py [--model tiny-llada] [--requests 4] [--json PATH] [-- server flags ...]

Starts `python -m dlmjax.serve` on a free loopback port (default flags: --method fast-dllm
--threshold 0.9 --block-length 8 --batch-wait-ms 20), warms it up (each batch shape compiles once:
two untimed rounds at every concurrency), then for each concurrency C runs C client threads
(the official `openai` client, chat completions of task-suite prompts), each sending `--requests`
requests one after the other, half of the clients streaming. Reported per C: requests/s, answer
tokens/s (completion tokens, stop included, over the wall time of the round), mean and p90 latency,
mean time to the first streamed chunk, and the mean batch size the server decoded.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["Sort: " + " ".join(str(int(v)) for v in rng.integers(1, 10, size=int(rng.integers(3, 7)))) for _ in range(n)]


def round_of(client, model: str, clients: int, requests: int, seed: int) -> dict:
    latencies, firsts, tokens, batches, errors = [], [], [], [], []
    lock = threading.Lock()

    def worker(c: int):
        for i, text in enumerate(prompts(requests, seed * 1000 + c)):
            start = time.perf_counter()
            try:
                messages = [{"role": "user", "content": text}]
                if c % 2:
                    first = None
                    for chunk in client.chat.completions.create(model=model, messages=messages, stream=True):
                        if first is None and chunk.choices and chunk.choices[0].delta.content:
                            first = time.perf_counter() - start
                    usage, batch = chunk.usage.completion_tokens, chunk.model_extra["dlmjax"]["batch"]
                else:
                    first = None
                    r = client.chat.completions.create(model=model, messages=messages)
                    usage, batch = r.usage.completion_tokens, r.model_extra["dlmjax"]["batch"]
            except Exception as e:  # noqa: BLE001
                with lock:
                    errors.append(repr(e))
                continue
            with lock:
                latencies.append(time.perf_counter() - start)
                tokens.append(usage)
                batches.append(batch)
                if first is not None:
                    firsts.append(first)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return dict(clients=clients, requests=len(latencies), errors=len(errors), wall_s=wall,
                requests_per_s=len(latencies) / wall, tokens_per_s=sum(tokens) / wall,
                latency_mean_s=float(np.mean(latencies)) if latencies else None,
                latency_p90_s=float(np.percentile(latencies, 90)) if latencies else None,
                first_chunk_mean_s=float(np.mean(firsts)) if firsts else None,
                mean_batch=float(np.mean(batches)) if batches else None)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-llada")
    parser.add_argument("--requests", type=int, default=4, help="requests per client per round")
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 8, 32])
    parser.add_argument("--json", type=pathlib.Path)
    parser.add_argument("server_flags", nargs="*", help="flags for python -m dlmjax.serve (after --)")
    args = parser.parse_args(argv)
    from openai import OpenAI

    flags = args.server_flags or ["--method", "fast-dllm", "--threshold", "0.9", "--block-length", "8", "--batch-wait-ms", "20"]
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dlmjax.serve", "--model", args.model, "--port", str(port), *flags],
                            stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 300
        while True:
            try:
                urllib.request.urlopen(base + "/models", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"the server did not start: {proc.stderr.read()[-2000:]}")
                time.sleep(0.5)
        client = OpenAI(base_url=base, api_key="none", max_retries=0, timeout=600)
        rows = []
        for c in args.concurrency:
            for _ in range(2):  # warm-up: compiles the batch shapes (size, streaming or not) this concurrency makes
                round_of(client, args.model, c, args.requests, seed=99)
            row = round_of(client, args.model, c, args.requests, seed=c)
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, load {' '.join(f'{v:.2f}' for v in os.getloadavg())}"
    print(f"\n{machine}; model {args.model}; server flags {' '.join(flags)}\n")
    print("| clients | requests | requests/s | answer tokens/s | latency mean s | p90 s | first chunk s | mean batch | errors |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        first = f"{r['first_chunk_mean_s']:.3f}" if r["first_chunk_mean_s"] is not None else "-"
        print(f"| {r['clients']} | {r['requests']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
              f"{r['latency_mean_s']:.3f} | {r['latency_p90_s']:.3f} | {first} | {r['mean_batch']:.1f} | {r['errors']} |")
    if args.json:
        args.json.write_text(json.dumps(dict(machine=machine, flags=flags, rows=rows), indent=1))


if __name__ == "__main__":
    main()
