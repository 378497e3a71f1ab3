"""Load test of ``mmfuse-serve`` on loopback (bounded: a fixed number of requests).

    .venv/bin/python benchmarks/serve_load.py --ckpt runs/demo/model

Sends image+audio chat requests with the official ``openai`` client and prints requests/s,
generated tokens/s and time to first token (streamed) at concurrency 1 and 16, then the
throughput of dynamic batching over one-at-a-time generation at concurrency 16.

The server runs with ``batching.max_wait_ms=20``: a request waits up to 20 ms for others to be
prefilled with it (the encoders cost far less per request in a batch); the time to first
token at concurrency 1 shows what that costs.
"""

from __future__ import annotations

import argparse
import base64
import json
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai

QUESTIONS = ["Describe the image.", "Describe the sound.", "How many shapes are there?"]


def start(ckpt: str, max_batch_size: int, threads: int):
    """Runs ``mmfuse-serve`` in its own process (the load generator must not share its GIL)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        str(Path(sys.executable).with_name("mmfuse-serve")),
        f"ckpt={ckpt}",
        "model_name=bench",
        f"port={port}",
        f"threads={threads}",
        f"batching.max_batch_size={max_batch_size}",
        "batching.max_wait_ms=20",
        "log_level=warning",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"mmfuse-serve did not start: {' '.join(command)}")
        time.sleep(0.2)

    def stop() -> None:
        process.terminate()
        process.wait(timeout=30)

    return f"{url}/v1", stop


def messages(world: Path, i: int) -> list[dict]:
    record = json.loads((world / "test.jsonl").read_text().splitlines()[i])
    paths = {p["type"]: world / p["path"] for p in record["messages"][0]["content"] if "path" in p}
    content = []
    if "image" in paths:
        data = base64.b64encode(paths["image"].read_bytes()).decode()
        content.append({"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}})
    if "audio" in paths:
        data = base64.b64encode(paths["audio"].read_bytes()).decode()
        content.append({"type": "input_audio", "input_audio": {"data": data, "format": "wav"}})
    content.append({"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]})
    return [{"role": "user", "content": content}]


def load(url: str, requests: list, concurrency: int, max_tokens: int) -> dict:
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)

    def one(msgs: list[dict]) -> tuple[float, int]:
        start, first, tokens = time.perf_counter(), None, 0
        stream = client.chat.completions.create(
            model="bench",
            messages=msgs,
            temperature=0,
            max_tokens=max_tokens,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - start
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return (first if first is not None else time.perf_counter() - start), tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, requests))
    elapsed = time.perf_counter() - start
    return {
        "requests_per_s": len(requests) / elapsed,
        "tokens_per_s": sum(t for _, t in results) / elapsed,
        "ttft_median_s": statistics.median(f for f, _ in results),
        "errors": 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default="runs/demo/model")
    parser.add_argument("--world", default="data/world")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/bench/serve_load.json")
    args = parser.parse_args()
    requests = [messages(Path(args.world), i) for i in range(args.requests)]
    results = {}
    for name, batch_size, concurrency in (
        ("batched_c1", 16, 1),
        ("batched_c16", 16, 16),
        ("sequential_c16", 1, 16),
    ):
        url, stop = start(args.ckpt, batch_size, args.threads)
        try:
            load(url, requests[:4], concurrency, args.max_tokens)  # warm-up
            results[name] = load(url, requests, concurrency, args.max_tokens)
        finally:
            stop()
        r = results[name]
        print(
            f"{name:15s} max_batch={batch_size:2d} concurrency={concurrency:2d}: "
            f"{r['requests_per_s']:6.2f} req/s  {r['tokens_per_s']:7.1f} tok/s  "
            f"TTFT median {r['ttft_median_s'] * 1000:6.0f} ms"
        )
    ratio = results["batched_c16"]["requests_per_s"] / results["sequential_c16"]["requests_per_s"]
    results["batched_over_sequential"] = ratio
    print(f"dynamic batching over one-at-a-time at concurrency 16: {ratio:.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
