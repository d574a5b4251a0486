"""
A load generator for `otter serve`: starts the server on a free port of 127.0.0.1 (the shipped model unless `--model`),
then, for each concurrency level, keeps that many clients busy with streamed chat requests (a ShapesWorld image and a
question each, greedy) until `--requests` have been answered or `--max-seconds` have passed, and reports throughput
(requests/s, generated tokens/s), latency and time to first token (p50 and p95), and the batch sizes the server ran
(from its /metrics). Concurrency 1 is the requests served one after another.

    python benchmarks/serve_load.py                          # 1, 4 and 16 clients, 64 requests each
    python benchmarks/serve_load.py --concurrency 1 16 --requests 128 --out serve.md
    python benchmarks/serve_load.py --questions comparison --max-tokens 32   # two images, a sentence each
"""

import argparse
import base64
import io
import json
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx


WORKLOADS = {"vqa": "one image and a one-word question", "comparison": "two images and 'What are the two shapes?'"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def prompts(count: int, kind: str = "vqa", seed: int = 0) -> list[dict]:
    """
    Chat requests over distinct ShapesWorld scenes: `vqa`, one image and a colour, shape, count or position question
    (answers of a word or two); `comparison`, two images and "What are the two shapes?" (a sentence).
    """
    from otter.shapesworld import ShapesWorld, render

    def url(scene):
        buffer = io.BytesIO()
        render(scene).save(buffer, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    world = ShapesWorld(seed)
    bodies = []
    for index in range(count):
        if kind == "comparison":
            record = world.comparison()
            scenes = record["scenes"]
        else:
            record = world.vqa(("colour", "shape", "count", "position")[index % 4])
            scenes = [record["scene"]]
        content = [{"type": "image_url", "image_url": {"url": url(scene)}} for scene in scenes]
        bodies.append({"messages": [{"role": "user", "content": content + [
            {"type": "text", "text": record["question"]}]}]})
    return bodies


def one_request(client: httpx.Client, url: str, body: dict, max_tokens: int) -> dict:
    """One streamed chat request -> latency, time to first content, completion tokens."""
    started = time.monotonic()
    first = None
    tokens = 0
    payload = {**body, "stream": True, "temperature": 0, "max_tokens": max_tokens,
               "stream_options": {"include_usage": True}}
    with client.stream("POST", url + "/v1/chat/completions", json=payload, timeout=300) as response:
        if response.status_code != 200:
            response.read()
            raise RuntimeError(f"the server answered {response.status_code}: {response.text[:200]}")
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if first is None and any(choice["delta"].get("content") for choice in chunk["choices"]):
                first = time.monotonic() - started
    return {"latency": time.monotonic() - started, "ttft": first, "tokens": tokens}


def metrics(url: str) -> dict:
    text = httpx.get(url + "/metrics", timeout=30).text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and not line.startswith("#")}


def run_level(url: str, bodies: list[dict], clients: int, requests: int, max_seconds: float, max_tokens: int) -> dict:
    """`clients` threads each send requests one after another until `requests` are done or time is up."""
    before = metrics(url)
    results, errors, lock = [], [], threading.Lock()
    issued = iter(range(requests))
    deadline = time.monotonic() + max_seconds

    def client_loop():
        with httpx.Client() as client:
            while time.monotonic() < deadline:
                with lock:
                    index = next(issued, None)
                if index is None:
                    return
                try:
                    result = one_request(client, url, bodies[index % len(bodies)], max_tokens)
                except Exception as error:  # reported, and counted against the level
                    with lock:
                        errors.append(repr(error))
                    continue
                with lock:
                    results.append(result)

    started = time.monotonic()
    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.monotonic() - started
    after = metrics(url)
    batches = after["otter_batch_size_count"] - before.get("otter_batch_size_count", 0)
    sequences = after["otter_batch_size_sum"] - before.get("otter_batch_size_sum", 0)
    latencies = sorted(result["latency"] for result in results)
    ttfts = sorted(result["ttft"] for result in results if result["ttft"] is not None)

    def percentile(values, share):
        return values[min(len(values) - 1, int(share * len(values)))] if values else float("nan")

    return {"clients": clients, "requests": len(results), "errors": errors, "seconds": wall,
            "requests_per_s": len(results) / wall, "tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "latency_p50": statistics.median(latencies) if latencies else float("nan"),
            "latency_p95": percentile(latencies, 0.95), "ttft_p50": statistics.median(ttfts) if ttfts else float("nan"),
            "ttft_p95": percentile(ttfts, 0.95), "mean_batch": sequences / batches if batches else float("nan"),
            "tokens_per_request": statistics.fmean(r["tokens"] for r in results) if results else float("nan")}


def report(rows: list[dict], args) -> str:
    import torch

    base = rows[0]["requests_per_s"] if rows and rows[0]["clients"] == 1 else None
    lines = [f"### Serving (`otter serve`, {args.model_label}, --max-batch-size {args.max_batch_size}, "
             f"{args.device}; streamed chat requests, {WORKLOADS[args.questions]}, greedy, at most {args.max_tokens} new "
             "tokens)", "",
             f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads in the server; "
             "clients on the same machine, over 127.0.0.1.", "",
             "| clients | requests | requests/s | tokens/s | vs 1 client | latency p50 | p95 | first token p50 | p95 "
             "| mean batch |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        gain = f"{row['requests_per_s'] / base:.2f}x" if base else "-"
        lines.append(f"| {row['clients']} | {row['requests']} | {row['requests_per_s']:.1f} | {row['tokens_per_s']:.0f} "
                     f"| {gain} | {row['latency_p50'] * 1000:.0f} ms | {row['latency_p95'] * 1000:.0f} ms | "
                     f"{row['ttft_p50'] * 1000:.0f} ms | {row['ttft_p95'] * 1000:.0f} ms | {row['mean_batch']:.1f} |")
    errors = sum(len(row["errors"]) for row in rows)
    lines += ["", f"{rows[0]['tokens_per_request']:.1f} tokens per answer on average; {errors} failed requests."]
    return "\n".join(lines) + "\n"


def main():
    from otter import SHAPESWORLD_MODEL

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHAPESWORLD_MODEL), help="an Otter folder (default: the shipped model)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    parser.add_argument("--max-seconds", type=float, default=120, help="time limit per concurrency level")
    parser.add_argument("--questions", choices=["vqa", "comparison"], default="vqa",
                        help="one image and a short answer, or two images and a sentence")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, help="also write the Markdown table here")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    args.model_label = "the shipped model" if Path(args.model) == SHAPESWORLD_MODEL else Path(args.model).name

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a full pipe would stop the server at its next log line
    server = subprocess.Popen([sys.executable, "-m", "otter", "serve", "--model", args.model, "--port", str(port),
                               "--device", args.device, "--max-batch-size", str(args.max_batch_size),
                               "--max-queue", str(4 * max(args.concurrency))],
                              stdout=subprocess.DEVNULL, stderr=log, text=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                log.seek(0)
                raise SystemExit(f"the server exited: {log.read()[-2000:]}")
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the server did not start in 300 s")
            time.sleep(0.2)
        bodies = prompts(64, args.questions)
        run_level(url, bodies, 1, 4, 60, args.max_tokens)  # warm-up
        rows = []
        for clients in args.concurrency:
            rows.append(run_level(url, bodies, clients, args.requests, args.max_seconds, args.max_tokens))
            print(f"{clients} clients: {rows[-1]['requests_per_s']:.1f} requests/s", file=sys.stderr, flush=True)
    finally:
        server.terminate()
        server.wait(60)
        log.close()
    table = report(rows, args)
    print(table)
    if args.out:
        args.out.write_text(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if any(row["errors"] for row in rows):
        raise SystemExit(f"failed requests: {[row['errors'][:3] for row in rows if row['errors']]}")


if __name__ == "__main__":
    main()
