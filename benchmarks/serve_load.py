"""Load test of ``mmfuse-serve`` on loopback (bounded: a fixed number of requests).

    .venv/bin/python benchmarks/serve_load.py --ckpt runs/demo/model

Sends streamed image+audio chat requests and prints requests/s, generated tokens/s and time to
first token at concurrency 1 and 16, then the batched-over-sequential throughput ratio: the
batching server at concurrency 16 over the same server at concurrency 1, whose one client's
requests are generated one after another (the target is 3 on the demo model). A third
configuration gives a stricter ratio too: a server that generates one request at a time
(``max_batch_size=1``), at concurrency 16, where its request path (HTTP, media decoding)
overlaps its generation; batching on over off at the same concurrency. Each figure is the
median of ``--rounds`` rounds of ``--requests`` requests, after one unmeasured round of each
configuration; the rounds of the three configurations take turns.

A round's requests/s counts its whole length: its start, when the clients' first requests
come in one burst, and its drain, when clients that have nothing left to send fall idle one
by one, as well as the time between. A round of 64 requests from 16 clients is mostly start
and drain, and fewer requests in flight leave batching less to batch (one-at-a-time serving
loses nothing there), so each configuration also gets a requests/s at full concurrency
(``full_concurrency_rate``: only while every client has a request in flight), and the
stricter ratio is printed both ways.

The load generator shares the server's two cores, so it is kept lean (``--client async``,
the default): one asyncio loop on aiohttp and a plain parse of the server-sent events, as
vLLM's serving benchmark does. It costs about 0.7 ms of CPU a request (httpx: 2.2 ms).
``--client openai`` sends the same requests with the official client, one thread each; on
this machine the client's own work then takes CPU time from the server and lowers both
throughputs.

The server runs with ``batching.max_wait_ms=20``: a request waits up to 20 ms for others to be
prefilled with it (the encoders cost far less per request in a batch); the time to first
token at concurrency 1 shows what that costs. Its model runs with ``--threads`` torch threads
(1: the other core serves HTTP and the load generator), in a child process (the default,
``batching.separate_process``) or on a thread of the server's process with ``--in-process``.
``--set KEY=VALUE`` passes further overrides to both servers, to compare settings side by
side (``--set batching.continuous=false``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import functools
import json
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
import httpx
import openai
import psutil

QUESTIONS = ["Describe the image.", "Describe the sound.", "How many shapes are there?"]


def start(
    ckpt: str,
    max_batch_size: int,
    threads: int,
    separate_process: bool = True,
    max_wait_ms: float = 20,
    extra: tuple[str, ...] = (),
):
    """Runs ``mmfuse-serve`` in its own process (the load generator must not share its GIL),
    with the further overrides ``extra``; returns its base URL, its pid and a function that
    stops it. A server that does not answer ``/health`` within two minutes is stopped, and
    the error names its command (its own message is on stderr)."""
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
        f"batching.max_wait_ms={max_wait_ms}",
        f"batching.separate_process={str(separate_process).lower()}",
        "log_level=warning",
        *extra,
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
            process.kill()
            process.wait(timeout=30)
            raise RuntimeError(f"mmfuse-serve did not start: {' '.join(command)}")
        time.sleep(0.2)

    def stop() -> None:
        process.terminate()
        process.wait(timeout=30)

    return f"{url}/v1", process.pid, stop


def cpu_seconds(server_pid: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of the server process, of its children (the
    engine process; nothing with ``--in-process``) and of this process (the load generator)."""
    server = psutil.Process(server_pid)
    children = sum(sum(child.cpu_times()[:2]) for child in server.children(recursive=True))
    own = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "server": sum(server.cpu_times()[:2]),
        "engine": children,
        "load_generator": own.ru_utime + own.ru_stime,
    }


def measured_round(
    load, url: str, server_pid: int, requests: list, concurrency: int, max_tokens: int
) -> dict:
    """One round of ``load``, with the CPU each process spent on it: milliseconds per
    request and the share of a core it kept busy."""
    before, start_time = cpu_seconds(server_pid), time.perf_counter()
    round_ = load(url, requests, concurrency, max_tokens)
    elapsed, after = time.perf_counter() - start_time, cpu_seconds(server_pid)
    spent = {name: after[name] - before[name] for name in before}
    round_["cpu_ms_per_request"] = {k: v * 1000 / len(requests) for k, v in spent.items()}
    round_["cores_busy"] = {k: v / elapsed for k, v in spent.items()}
    return round_


@functools.cache
def _test_lines(world: Path) -> list[str]:
    """The world's test records, as JSON lines (read once: every request picks one)."""
    return (world / "test.jsonl").read_text().splitlines()


def load_test_request(world: Path, i: int) -> tuple[dict[str, Path], str]:
    """The ``i``-th request of the load test: the media of the world's ``i``-th test record
    (kind -> path: "image" and/or "audio") and one of ``QUESTIONS``, in turn."""
    lines = _test_lines(world)
    record = json.loads(lines[i % len(lines)])
    media = {p["type"]: world / p["path"] for p in record["messages"][0]["content"] if "path" in p}
    return media, QUESTIONS[i % len(QUESTIONS)]


def messages(world: Path, i: int) -> list[dict]:
    paths, question = load_test_request(world, i)
    content = []
    if "image" in paths:
        data = base64.b64encode(paths["image"].read_bytes()).decode()
        content.append({"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}})
    if "audio" in paths:
        data = base64.b64encode(paths["audio"].read_bytes()).decode()
        content.append({"type": "input_audio", "input_audio": {"data": data, "format": "wav"}})
    content.append({"type": "text", "text": question})
    return [{"role": "user", "content": content}]


class RoundQueue:
    """A round's requests, handed out in order to the clients that ask, and their results
    (in request order), with the times ``full_concurrency_rate`` needs: when each answer
    ended and when the last request was taken. Safe from client threads as from one event
    loop's tasks."""

    def __init__(self, requests: list) -> None:
        self._left = collections.deque(enumerate(requests))
        self._lock = threading.Lock()
        self.results: list = [None] * len(requests)
        self.finished: list[float] = []  # perf_counter
        self.emptied = 0.0

    def take(self) -> tuple[int, list[dict]] | None:
        """The next (index, messages), or None when none is left."""
        with self._lock:
            if not self._left:
                return None
            item = self._left.popleft()
            if not self._left:
                self.emptied = time.perf_counter()
            return item

    def answered(self, index: int, result) -> None:
        """Stores the result of request ``index`` and when it ended."""
        with self._lock:
            self.results[index] = result
            self.finished.append(time.perf_counter())


def summary(round_: RoundQueue, elapsed: float, concurrency: int) -> dict:
    """requests/s, tokens/s and median time to first token of the round's (ttft, tokens)
    results over the whole round, and requests/s at full concurrency
    (``full_concurrency_rate``)."""
    results = round_.results
    full = full_concurrency_rate(round_.finished, round_.emptied, concurrency)
    return {
        "requests_per_s": len(results) / elapsed,
        "full_concurrency_requests_per_s": full,
        "tokens_per_s": sum(t for _, t in results) / elapsed,
        "ttft_median_s": statistics.median(f for f, _ in results),
        "errors": 0,
    }


def full_concurrency_rate(finished: list[float], emptied: float, concurrency: int) -> float | None:
    """Requests/s while every client had a request in flight: the answers that came between
    the ``concurrency``-th answer (the opening burst is through) and the moment the last
    request was sent (``emptied``; from then on clients fall idle one by one), over that time.
    A round's whole-round rate also counts its start and its drain, when fewer requests are
    in flight: batching has less to batch there, one-at-a-time serving loses nothing. None
    when the round is too short to have such a window (no answer in it)."""
    finished = sorted(finished)
    if len(finished) <= concurrency:
        return None
    start = finished[concurrency - 1]
    count = sum(start < t <= emptied for t in finished)
    return count / (emptied - start) if count and emptied > start else None


def request_body(msgs: list[dict], max_tokens: int) -> dict:
    return {
        "model": "bench",
        "messages": msgs,
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def load_async(url: str, requests: list, concurrency: int, max_tokens: int) -> dict:
    """``concurrency`` asyncio workers on one aiohttp session, each sending its next request
    when the last ends."""

    async def one(session: aiohttp.ClientSession, msgs: list[dict]) -> tuple[float, int]:
        start, first, tokens = time.perf_counter(), None, 0
        body = request_body(msgs, max_tokens)
        async with session.post(f"{url}/chat/completions", json=body) as response:
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {await response.text()}")
            async for raw in response.content:  # one server-sent event line at a time
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if (
                    first is None
                    and chunk["choices"]
                    and chunk["choices"][0]["delta"].get("content")
                ):
                    first = time.perf_counter() - start
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        return (first if first is not None else time.perf_counter() - start), tokens

    round_ = RoundQueue(requests)

    async def run() -> None:
        connector = aiohttp.TCPConnector(limit=concurrency)
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

            async def worker() -> None:
                while (item := round_.take()) is not None:
                    round_.answered(item[0], await one(session, item[1]))

            await asyncio.gather(*(worker() for _ in range(concurrency)))

    start = time.perf_counter()
    asyncio.run(run())
    return summary(round_, time.perf_counter() - start, concurrency)


def load_openai(url: str, requests: list, concurrency: int, max_tokens: int) -> dict:
    """The official client, one thread per concurrent request."""
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)

    def one(msgs: list[dict]) -> tuple[float, int]:
        start, first, tokens = time.perf_counter(), None, 0
        stream = client.chat.completions.create(**request_body(msgs, max_tokens))
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - start
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return (first if first is not None else time.perf_counter() - start), tokens

    round_ = RoundQueue(requests)

    def worker() -> None:
        while (item := round_.take()) is not None:
            round_.answered(item[0], one(item[1]))

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    return summary(round_, time.perf_counter() - start, concurrency)


TARGET = 3.0  # batched over sequential throughput wanted of the demo model


def ratio_of(results: dict, over: str, under: str, key: str = "requests_per_s") -> float | None:
    """``results[over][key] / results[under][key]``, or None where either is missing."""
    a, b = results[over].get(key), results[under].get(key)
    return a / b if a and b else None


def print_ratios(results: dict) -> None:
    """Stores and prints the throughput ratios of the median rounds.

    ``batched_over_sequential`` is the headline figure: the batched server at concurrency
    16 over the same server at concurrency 1, where one client's requests are generated one
    after another. ``batching_on_over_off`` is the stricter comparison: the same 16 clients,
    served by a server that batches and by one that generates one request at a time, whose
    request path then overlaps the generation (over whole rounds and at full concurrency).
    """
    full = "full_concurrency_median"
    ratios = {
        "batched_over_sequential": ratio_of(results, "batched_c16", "batched_c1"),
        "batching_on_over_off": ratio_of(results, "batched_c16", "unbatched_c16"),
        "batching_on_over_off_full_concurrency": ratio_of(
            results, "batched_c16", "unbatched_c16", full
        ),
    }
    results.update({k: v for k, v in ratios.items() if v is not None})
    verdict = "met" if ratios["batched_over_sequential"] >= TARGET else "NOT met"
    print(
        "batched over sequential throughput (concurrency 16 over concurrency 1, medians): "
        f"{ratios['batched_over_sequential']:.2f}x (target {TARGET:g}: {verdict})"
    )
    line = f"batching on over off, both at concurrency 16: {ratios['batching_on_over_off']:.2f}x"
    if ratios["batching_on_over_off_full_concurrency"] is not None:
        at_full = ratios["batching_on_over_off_full_concurrency"]
        line += f", at full concurrency (start and drain left out) {at_full:.2f}x"
    print(line)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default="runs/demo/model")
    parser.add_argument("--world", default="data/world")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="the engine's torch threads")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-wait-ms", type=float, default=20, help="batching.max_wait_ms")
    parser.add_argument("--in-process", action="store_true", help="batching.separate_process=false")
    parser.add_argument("--client", choices=("async", "openai"), default="async")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a further mmfuse-serve override for both servers (repeatable), e.g. "
        "batching.continuous=false",
    )
    parser.add_argument("--out", default="runs/bench/serve_load.json")
    args = parser.parse_args(argv)
    requests = [messages(Path(args.world), i) for i in range(args.requests)]
    load = load_async if args.client == "async" else load_openai
    results: dict = {
        "client": args.client,
        "threads": args.threads,
        "separate_process": not args.in_process,
        "overrides": args.set,
        "rounds": {},
    }
    runs = {  # name: (max batch size, concurrency)
        "batched_c1": (16, 1),
        "batched_c16": (16, 16),
        "unbatched_c16": (1, 16),
    }
    servers = {}  # max batch size: (url, pid, stop)
    separate, overrides = not args.in_process, tuple(args.set)
    try:
        for size in (16, 1):
            servers[size] = start(
                args.ckpt, size, args.threads, separate, args.max_wait_ms, overrides
            )
        # warm-up: a whole unmeasured round of each configuration (a new product shape builds
        # its oneDNN kernel on first use: the first round met hundreds of them)
        for size, concurrency in runs.values():
            load(servers[size][0], requests, concurrency, args.max_tokens)
        # rounds interleave the configurations, so that a slower spell of the machine hits
        # them alike; each figure is the median round (by requests/s)
        for _ in range(args.rounds):
            for name, (size, concurrency) in runs.items():
                url, pid, _ = servers[size]
                round_ = measured_round(load, url, pid, requests, concurrency, args.max_tokens)
                results["rounds"].setdefault(name, []).append(round_)
    finally:
        for _, _, stop in servers.values():
            stop()
    for name, (size, concurrency) in runs.items():
        rounds = sorted(results["rounds"][name], key=lambda r: r["requests_per_s"])
        results[name] = r = rounds[len(rounds) // 2]
        each = ", ".join(f"{x['requests_per_s']:.0f}" for x in results["rounds"][name])
        full = [x["full_concurrency_requests_per_s"] for x in results["rounds"][name]]
        full = [x for x in full if x is not None]
        r["full_concurrency_median"] = statistics.median(full) if full else None
        print(
            f"{name:15s} max_batch={size:2d} concurrency={concurrency:2d}: "
            f"{r['requests_per_s']:6.2f} req/s  {r['tokens_per_s']:7.1f} tok/s  "
            f"TTFT median {r['ttft_median_s'] * 1000:6.0f} ms   (rounds: {each} req/s)"
        )
        if full:
            each = ", ".join(f"{x:.0f}" for x in full)
            print(
                f"{'':15s} at full concurrency ({concurrency} in flight): "
                f"{r['full_concurrency_median']:6.2f} req/s   (rounds: {each} req/s)"
            )
        cpu = ", ".join(
            f"{k.replace('_', ' ')} {r['cpu_ms_per_request'][k]:.2f} ms ({r['cores_busy'][k]:.2f})"
            for k in r["cores_busy"]
        )
        print(f"{'':15s} CPU per request (share of a core busy): {cpu}")
    print_ratios(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
