"""What an FTP server shows beside vLLM's endpoints: `GET /ftp/router`, `GET /ftp/stats`
and `ftp_*` Prometheus metrics on `/metrics`.

The engine counts kept and skipped tokens in its own process and writes them to
a small JSON file (`FTP_VLLM_STATS`) about once a second; the API server process
reads that file.  Both the file and the router are chosen by `--ftp-router`
before the engine starts (see `ftp_vllm.vllm_args`).  Nothing here writes, and
the router description leaves out file paths.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ftp_vllm import envs


def read_stats() -> dict:
    path = envs.FTP_VLLM_STATS
    try:
        return json.loads(Path(path).read_text()) if path else {}
    except (OSError, ValueError):  # not written yet (no request so far) or being replaced
        return {}


def router_description() -> dict:
    from ftp_vllm.checkpoint import load_ladder

    path = envs.FTP_VLLM_ROUTER
    if not path:
        return {}
    ladder, config = load_ladder(path)
    ladder.set_default(envs.FTP_VLLM_SPARSITY)
    rung = ladder.rungs[ladder.default_rung]
    return {
        "router": Path(path).name,
        "base_model": {k: v for k, v in config.get("base_model", {}).items() if k != "path"},
        "levels": ladder.levels,  # what a request may ask for with vllm_xargs {"ftp_sparsity": level}
        "default_level": ladder.default,
        "target_sparsity": ladder.default,  # of the default level, as are the schedules below
        "decode_target_sparsity": round(float(rung.decode_sparsity.mean()), 6),
        "prompt_sparsity_per_block": rung.sparsity.tolist(),
        "decode_sparsity_per_block": rung.decode_sparsity.tolist(),
        "min_prompt": config.get("router", {}).get("min_prompt"),  # shorter prompts are served dense
        "short_prompt_lengths": config.get("router", {}).get("short_prompt_lengths", []),
    }


class FTPRoutes:
    """ASGI middleware answering `/ftp/router` and `/ftp/stats` (GET only); the rest passes on."""

    def __init__(self, app):
        self.app = app
        self.description = router_description()

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path not in ("/ftp/router", "/ftp/stats"):
            return await self.app(scope, receive, send)
        if scope["method"] != "GET":
            return await _json(send, 405, {"error": f"{path} is read-only: use GET"})
        body = self.description if path == "/ftp/router" else read_stats()
        await _json(send, 200, body)


async def _json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


class FTPCollector:
    """Prometheus collector: realised sparsity and token counts, read when /metrics is scraped."""

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = read_stats()
        for kind in ("prompt", "decode"):
            gauge = GaugeMetricFamily(f"ftp_{kind}_sparsity",
                                      f"Share of {kind} token-block computations skipped since start")
            if stats.get(f"{kind}_sparsity") is not None:
                gauge.add_metric([], stats[f"{kind}_sparsity"])
            yield gauge
            yield CounterMetricFamily(f"ftp_{kind}_tokens", f"{kind.capitalize()} tokens routed since start",
                                      value=stats.get(f"{kind}_tokens", 0))
            kept = CounterMetricFamily(f"ftp_{kind}_kept_tokens", f"{kind.capitalize()} tokens kept, per block",
                                       labels=["block"])
            for row in stats.get("per_block", []):  # dense blocks keep every token
                kept.add_metric([str(row["block"])], row[f"{kind}_kept"] if row["routed"] else stats[f"{kind}_tokens"])
            yield kept
        target = GaugeMetricFamily("ftp_target_sparsity", "The level requests that name none are served at")
        if stats.get("target_sparsity") is not None:
            target.add_metric([], stats["target_sparsity"])
        yield target
        for kind in ("prompt", "decode"):  # by the level of the router's ladder each request chose
            gauge = GaugeMetricFamily(f"ftp_level_{kind}_sparsity",
                                      f"Share of {kind} token-block computations skipped since start, by level",
                                      labels=["level"])
            tokens = CounterMetricFamily(f"ftp_level_{kind}_tokens", f"{kind.capitalize()} tokens since start, by level",
                                         labels=["level"])
            for row in stats.get("levels", []):
                if row[f"{kind}_sparsity"] is not None:
                    gauge.add_metric([f"{row['level']:g}"], row[f"{kind}_sparsity"])
                tokens.add_metric([f"{row['level']:g}"], row[f"{kind}_tokens"])
            yield gauge
            yield tokens


def install_server_routes(args, router_path: str, level: float | None = None) -> None:
    """Called with `vllm serve`'s arguments once `--ftp-router` (and `--ftp-sparsity`, the
    default `level`) are known to be good, before the engine starts (its processes inherit
    the environment)."""
    import tempfile

    from prometheus_client import REGISTRY

    os.environ["FTP_VLLM_ROUTER"] = router_path
    if level is not None:
        os.environ["FTP_VLLM_SPARSITY"] = str(level)
    os.environ.setdefault("FTP_VLLM_STATS", os.path.join(tempfile.mkdtemp(prefix="ftp-vllm-"), "stats.json"))
    if hasattr(args, "middleware"):
        args.middleware = [*(args.middleware or []), f"{__name__}.FTPRoutes"]
    if not getattr(REGISTRY, "_ftp_collector", False):
        REGISTRY.register(FTPCollector())
        REGISTRY._ftp_collector = True
