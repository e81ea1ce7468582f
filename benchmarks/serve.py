"""Throughput of `mllm serve` at concurrency 1 and 16: does batching pay?

Starts the real command (`mllm serve CHECKPOINT`, a separate process on 127.0.0.1) on the demo's
stage-2 model, then sends N chat-completion requests built from the demo's held-out questions
(mixed: image + sound, image only, sound only, text only; media as base64 data URLs) from a
bounded async client, with 1 request in flight and with 16, the two taking turns over ``--rounds``
rounds. Prints requests/s at each, their ratio (the batching gain), p50 / p95 latency, and failed
or lost requests.

    python benchmarks/serve.py                      # builds ./mllm-demo-quick with `mllm demo --quick` if needed
    python benchmarks/serve.py --checkpoint mllm-demo/runs/instruct --requests 128 --rounds 4
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLACEHOLDERS = ("<image>\n", "<audio>\n", "<image>", "<audio>")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="stage-2 output (default: DEMO_DIR/runs/instruct, built if missing)")
    parser.add_argument("--demo-dir", default="mllm-demo-quick", help="where `mllm demo --quick` writes, if needed")
    parser.add_argument("--requests", type=int, default=512,
                        help="requests sent at each concurrency (default 512: 128 a round, so that a round at "
                             "16 lasts long enough for its first and last waves not to dominate)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=4,
                        help="the requests are split into this many rounds; in each, every concurrency runs its share")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-window-ms", type=float, default=50.0, help="`mllm serve --batch-window-ms`")
    parser.add_argument("--client", choices=["raw", "httpx"], default="raw",
                        help="load generator: a minimal keep-alive HTTP/1.1 client (default; little CPU taken from "
                             "the server on a small machine) or httpx")
    parser.add_argument("--threads", type=int, default=1,
                        help="`mllm serve --threads`: torch CPU threads of the server (default 1: the tiny demo model "
                             "runs fastest on one thread, above all on a shared CPU)")
    parser.add_argument("--engine", choices=["process", "thread"], default="process",
                        help="`mllm serve --engine`: the model in a process of its own (default) or in a thread of "
                             "the server's")
    return parser.parse_args()


def ensure_demo(args) -> tuple[str, str, str]:
    """(checkpoint, eval records, media root), running the quick demo once if there is no checkpoint."""
    demo = os.path.abspath(args.demo_dir)
    checkpoint = args.checkpoint or os.path.join(demo, "runs", "instruct")
    if not os.path.isfile(os.path.join(checkpoint, "mllm_config.json")):
        print(f"[bench] no checkpoint at {checkpoint}: running `mllm demo --quick --output-dir {demo}` ...", flush=True)
        subprocess.run([sys.executable, "-m", "mllm.cli", "demo", "--quick", "--output-dir", demo], check=True,
                       cwd=REPO_ROOT)
    data = os.path.join(demo, "data") if args.checkpoint is None else os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(checkpoint))), "data")
    return checkpoint, os.path.join(data, "eval.jsonl"), data


def data_url(path: str, mime: str) -> str:
    with open(path, "rb") as f:
        return f"data:{mime};base64,{base64.b64encode(f.read()).decode()}"


def build_requests(eval_path: str, media_root: str, count: int, max_tokens: int) -> list[tuple[str, bytes]]:
    """Demo questions, cycling through four media mixes; (kind, JSON request body)."""
    with open(eval_path) as f:
        records = [json.loads(line) for line in f]
    kinds = ("image+audio", "image", "audio", "text")
    requests = []
    for i in range(count):
        record, kind = records[i % len(records)], kinds[i % len(kinds)]
        question = record["conversations"][0]["value"]
        for placeholder in PLACEHOLDERS:
            question = question.replace(placeholder, "")
        parts = []
        if "image" in kind and record.get("image"):
            parts.append({"type": "image_url", "image_url": {"url": data_url(os.path.join(media_root, record["image"]),
                                                                             "image/png")}})
        if "audio" in kind and record.get("audio"):
            with open(os.path.join(media_root, record["audio"]), "rb") as f:
                parts.append({"type": "input_audio", "input_audio": {"data": base64.b64encode(f.read()).decode(),
                                                                     "format": "wav"}})
        parts.append({"type": "text", "text": question})
        body = {"model": "bench", "messages": [{"role": "user", "content": parts}], "max_tokens": max_tokens,
                "temperature": 0}
        requests.append((kind, json.dumps(body).encode()))   # encoded once: the clock measures the server
    return requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, checkpoint: str, port: int) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    server = subprocess.Popen([sys.executable, "-m", "mllm.cli", "serve", checkpoint, "--port", str(port),
                               "--threads", str(args.threads), "--engine", args.engine,
                               "--model-name", "bench", "--max-batch-size", str(args.max_batch_size),
                               "--batch-window-ms", str(args.batch_window_ms), "--device", "cpu"],
                              cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    import httpx

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"mllm serve exited: {server.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    server.kill()
    raise SystemExit("mllm serve did not become ready in 300 s")


class KeepAliveConnection:
    """A minimal HTTP/1.1 client on one kept-alive connection: writes a POST, reads the status and a
    Content-Length body. The load generator shares the CPU with the server, so it must cost little:
    httpx spends about 1.6 ms of CPU a request here, this about a tenth of that (``--client httpx``
    measures with httpx instead)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n" % (path.encode(), self.host.encode(), len(body)) + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
        length = int(next(v for k, v in headers.items() if k.strip().lower() == "content-length"))
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def run_load(url: str, requests: list[tuple[str, bytes]], concurrency: int, client_kind: str = "raw") -> dict:
    """Send every request with at most ``concurrency`` in flight (one kept-alive connection each);
    latencies and failures."""
    import httpx

    latencies, failures = [], []
    host, port = url.rsplit("//", 1)[1].split(":")
    pending = list(reversed(requests))

    async def worker():
        if client_kind == "httpx":
            client = httpx.AsyncClient(timeout=600)

            async def post(body):
                response = await client.post(f"{url}/v1/chat/completions", content=body,
                                             headers={"Content-Type": "application/json"})
                return response.status_code, response.content
        else:
            client = KeepAliveConnection(host, int(port))

            async def post(body):
                return await client.post("/v1/chat/completions", body)
        try:
            while pending:
                _, body = pending.pop()
                started = time.perf_counter()
                try:
                    status, content = await post(body)
                    reply = json.loads(content)
                    if status != 200 or reply["choices"][0]["finish_reason"] not in ("stop", "length"):
                        failures.append(f"{status}: {str(reply)[:200]}")
                        continue
                except Exception as e:  # noqa: BLE001 - every failure is counted
                    failures.append(f"{type(e).__name__}: {e}")
                    continue
                latencies.append(time.perf_counter() - started)
        finally:
            await client.aclose() if client_kind == "httpx" else client.close()

    before = httpx.get(f"{url}/health").json()
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    after = httpx.get(f"{url}/health").json()
    counts = {key: after[key] - before[key]
              for key in ("batches", "batched_requests", "prefills", "prefilled_requests")}
    return {"concurrency": concurrency, "seconds": elapsed, "sent": len(requests), "latencies": latencies,
            "failures": failures, **counts}


def summarize(parts: list[dict]) -> dict:
    """One concurrency's rounds together: requests/s over their summed time, latency percentiles, losses."""
    latencies = sorted(x for part in parts for x in part["latencies"])
    failures = [f for part in parts for f in part["failures"]]
    seconds, answered = sum(part["seconds"] for part in parts), len(latencies)
    total = {key: sum(part[key] for part in parts) for key in ("batches", "batched_requests", "prefills",
                                                               "prefilled_requests", "sent")}
    return {"concurrency": parts[0]["concurrency"], "seconds": seconds, "rps": answered / seconds,
            "answered": answered, "failed": len(failures), "lost": total["sent"] - answered - len(failures),
            "p50": statistics.median(latencies) if latencies else float("nan"),
            "p95": latencies[max(0, int(round(0.95 * answered)) - 1)] if latencies else float("nan"),
            "mean_batch": total["batched_requests"] / max(total["batches"], 1),
            "mean_prefill": total["prefilled_requests"] / max(total["prefills"], 1), "first_failures": failures[:3]}


def main() -> int:
    args = parse_args()
    checkpoint, eval_path, media_root = ensure_demo(args)
    requests = build_requests(eval_path, media_root, args.requests, args.max_tokens)
    port = free_port()
    server = start_server(args, checkpoint, port)
    url = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(run_load(url, requests[:8], 4, args.client))   # warm-up: first batches, allocator, caches
        # The concurrencies take turns, round by round, so that a change in the machine's speed (a
        # shared or virtual machine's) falls on all of them rather than on whichever ran last.
        share = -(-len(requests) // args.rounds)
        parts: dict[int, list[dict]] = {c: [] for c in args.concurrency}
        for start in range(0, len(requests), share):
            for c in args.concurrency:
                parts[c].append(asyncio.run(run_load(url, requests[start:start + share], c, args.client)))
        results = [summarize(parts[c]) for c in args.concurrency]
    finally:
        server.terminate()
        server.wait(timeout=60)
    mix = {}
    for kind, _ in requests:
        mix[kind] = mix.get(kind, 0) + 1
    print(f"\nmllm serve on {checkpoint} (CPU, {args.threads} thread(s), max batch {args.max_batch_size}, "
          f"window {args.batch_window_ms:g} ms; {args.client} client); "
          f"{args.requests} requests {mix} in {args.rounds} rounds, max_tokens {args.max_tokens}\n")
    print(f"{'concurrency':>11} {'req/s':>8} {'p50 s':>8} {'p95 s':>8} {'mean batch':>10} {'mean prefill':>12} "
          f"{'answered':>9} {'failed':>7} {'lost':>5}")
    for r in results:
        print(f"{r['concurrency']:>11} {r['rps']:>8.2f} {r['p50']:>8.3f} {r['p95']:>8.3f} {r['mean_batch']:>10.1f} "
              f"{r['mean_prefill']:>12.1f} {r['answered']:>9} {r['failed']:>7} {r['lost']:>5}")
        for failure in r["first_failures"]:
            print(f"            failure: {failure}")
    if len(results) >= 2:
        print(f"\nbatching gain (req/s at {results[-1]['concurrency']} / at {results[0]['concurrency']}): "
              f"{results[-1]['rps'] / results[0]['rps']:.2f}x")
    return 0 if all(r["failed"] == 0 and r["lost"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
