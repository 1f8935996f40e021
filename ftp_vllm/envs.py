"""Every FTP_VLLM_* environment variable, in one place (as `vllm.envs` for vLLM's).

`ftp_vllm.envs.FTP_VLLM_TRACE` reads the variable when it is accessed, never at
import: one process may start several engines under different settings (the
tests do), and each reads its own when it starts.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _optional(name: str) -> str | None:
    return os.environ.get(name) or None


environment_variables: dict[str, Callable[[], Any]] = {
    # Folder of downloaded models and routers (default ~/.cache/ftp-vllm).
    "FTP_VLLM_HOME": lambda: Path(os.environ.get("FTP_VLLM_HOME", Path.home() / ".cache" / "ftp-vllm")),
    # Router checkpoint a server was started with; set by `--ftp-router` for `/ftp/router`.
    "FTP_VLLM_ROUTER": lambda: _optional("FTP_VLLM_ROUTER"),
    # Level (prompt sparsity) a server serves requests that name none at; set by `--ftp-sparsity`.
    "FTP_VLLM_SPARSITY": lambda: float(os.environ["FTP_VLLM_SPARSITY"]) if os.environ.get("FTP_VLLM_SPARSITY") else None,
    # "simple": routed blocks run attention for every token, then gather kept ones (default "fast").
    "FTP_VLLM_PATH": lambda: os.environ.get("FTP_VLLM_PATH", "fast"),
    # "keys": score tokens from their keys, as for quantized weights, not from folded hidden states.
    "FTP_VLLM_SCORE": lambda: os.environ.get("FTP_VLLM_SCORE", ""),
    # Tokens per MLP call in routed steps of compiled models (default: sized by the platform).
    "FTP_VLLM_MLP_CHUNK": lambda: int(os.environ["FTP_VLLM_MLP_CHUNK"]) if os.environ.get("FTP_VLLM_MLP_CHUNK") else None,
    # JSON file the engine writes realised-sparsity counters to, about once a second.
    "FTP_VLLM_STATS": lambda: _optional("FTP_VLLM_STATS"),
    # Seconds between realised-sparsity log lines (default 10).
    "FTP_VLLM_STATS_INTERVAL": lambda: float(os.environ.get("FTP_VLLM_STATS_INTERVAL", "10")),
    # JSON-lines file of every step's keep masks (tests and debugging).
    "FTP_VLLM_TRACE": lambda: _optional("FTP_VLLM_TRACE"),
}


def __getattr__(name: str) -> Any:
    if name in environment_variables:
        return environment_variables[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return list(environment_variables)
