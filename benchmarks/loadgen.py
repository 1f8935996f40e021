"""Streaming load for an OpenAI-compatible server: what `serve_load.py` sends and checks.

Each request streams a completion with `ignore_eos`, so its length is known in
advance: a response is complete when every one of its `max_tokens` tokens
arrived, the usage block says so and the stream ended with `[DONE]`.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field


@dataclass
class Request:
    prompt: str
    max_tokens: int


@dataclass
class Record:
    """What one request saw: times in seconds from its send."""

    request: Request
    ok: bool = False
    error: str = ""
    ttft: float | None = None
    latency: float | None = None
    token_times: list[float] = field(default_factory=list)  # arrival of each streamed chunk with text
    completion_tokens: int = 0
    text: str = ""

    @property
    def itl(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]

    @property
    def tpot(self) -> float | None:
        n = self.completion_tokens
        return None if n < 2 or self.ttft is None else (self.latency - self.ttft) / (n - 1)


def mixed_requests(n: int, seed: int = 0, prompt_words=(8, 600), outputs=(1, 16, 64, 128)) -> list[Request]:
    """`n` requests over held-out text: prompt lengths spread over `prompt_words`, output
    lengths drawn from `outputs` (deterministic per seed)."""
    from ftp_vllm import texts

    words = " ".join(texts.documents("evaluation")).split()
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(*prompt_words)
        start = rng.randrange(len(words) - length)
        out.append(Request(" ".join(words[start:start + length]), rng.choice(outputs)))
    return out


async def _one(session, url: str, model: str, req: Request, headers: dict) -> Record:
    import aiohttp

    rec = Record(req)
    body = {"model": model, "prompt": req.prompt, "max_tokens": req.max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    done = False
    try:
        async with session.post(url, json=body, headers=headers) as resp:
            if resp.status != 200:
                rec.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return rec
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    rec.completion_tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    if choice.get("text"):
                        now = time.perf_counter() - start
                        rec.ttft = now if rec.ttft is None else rec.ttft
                        rec.token_times.append(now)
                        rec.text += choice["text"]
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
        rec.error = f"{type(e).__name__}: {e}"
        return rec
    rec.latency = time.perf_counter() - start
    if not done:
        rec.error = "stream ended without [DONE]"
    elif rec.completion_tokens != req.max_tokens:
        rec.error = f"truncated: {rec.completion_tokens} of {req.max_tokens} tokens"
    else:
        rec.ok = True
    return rec


async def _run(base_url: str, model: str, requests: list[Request], concurrency: int | None, rate: float | None,
               api_key: str | None, seed: int, timeout: float) -> tuple[list[Record], float]:
    import aiohttp

    url = f"{base_url}/v1/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limit = asyncio.Semaphore(concurrency or len(requests))
    rng = random.Random(seed)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        async def bounded(req):
            async with limit:
                return await _one(session, url, model, req, headers)

        start = time.perf_counter()
        tasks = []
        for req in requests:
            tasks.append(asyncio.create_task(bounded(req)))
            if rate:  # Poisson arrivals
                await asyncio.sleep(rng.expovariate(rate))
        records = await asyncio.gather(*tasks)
        return records, time.perf_counter() - start


def run_load(base_url: str, model: str, requests: list[Request], *, concurrency: int | None = None,
             rate: float | None = None, api_key: str | None = None, seed: int = 0,
             timeout: float = 1800) -> tuple[list[Record], float]:
    """Send `requests` (at most `concurrency` in flight, or arriving at `rate` per second);
    returns the records and the wall time."""
    return asyncio.run(_run(base_url, model, requests, concurrency, rate, api_key, seed, timeout))


def percentiles(values: list[float], ps=(50, 90, 99)) -> dict[str, float | None]:
    if not values:
        return {f"p{p}": None for p in ps}
    qs = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else [values[0]] * 99
    return {f"p{p}": round(qs[p - 1], 4) for p in ps}


def summarise(records: list[Record], wall: float) -> dict:
    ok = [r for r in records if r.ok]
    return {
        "requests": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "errors": sorted({r.error for r in records if r.error})[:10],
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(ok) / wall, 3),
        "output_tok_per_s": round(sum(r.completion_tokens for r in ok) / wall, 2),
        "latency_s": percentiles([r.latency for r in ok]),
        "ttft_s": percentiles([r.ttft for r in ok if r.ttft is not None]),
        "tpot_s": percentiles([r.tpot for r in ok if r.tpot is not None]),
        "itl_s": percentiles([x for r in ok for x in r.itl]),
    }
