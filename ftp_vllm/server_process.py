"""A `vllm serve` process, started and stopped one way for the launcher, the benchmarks and
the tests: the command with this machine's defaults, a wait for `/health`, and a stop by
SIGTERM that makes sure no engine process is left behind."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ftp_vllm.hardware import GiB, bind_cpu_threads, has_gpu, kv_cache_bytes, native_bf16


def has_flag(args: list[str], *flags: str) -> bool:
    return any(a == f or a.startswith(f + "=") for a in args for f in flags)


def cpu_serve_args(args: list[str]) -> list[str]:
    """Flags `vllm serve` gets on a machine without a GPU unless `args` choose: a KV cache sized
    from free memory, and float32 where bfloat16 would be emulated."""
    if has_gpu():
        return []
    extra = []
    if not has_flag(args, "--kv-cache-memory-bytes", "--gpu-memory-utilization"):
        extra += ["--kv-cache-memory-bytes", str(kv_cache_bytes())]
    if not has_flag(args, "--dtype") and not native_bf16():
        extra += ["--dtype", "float32"]
    return extra


def shared_memory_args(args: list[str], servers: int) -> list[str]:
    """Equal memory for `servers` servers alive at once, unless `args` choose: a KV cache each
    (CPU), or a share of the GPU."""
    if has_flag(args, "--kv-cache-memory-bytes", "--gpu-memory-utilization"):
        return []
    if has_gpu():
        return ["--gpu-memory-utilization", f"{0.9 / servers:.2f}"]
    return ["--kv-cache-memory-bytes", str(max(kv_cache_bytes() // servers, GiB))]


def vllm_executable() -> str:
    """The `vllm` command of this Python's environment (else whichever is on PATH)."""
    return shutil.which("vllm", path=str(Path(sys.executable).parent)) or "vllm"


def serve_command(args: list[str], host: str, port: int) -> list[str]:
    """`vllm serve ARGS --host HOST --port PORT` as a user would type it, with the CPU defaults
    (`cpu_serve_args`) for whatever `args` leave open."""
    return [vllm_executable(), "serve", *args, *cpu_serve_args(args), "--host", host, "--port", str(port)]


def serve_env(env: dict | None = None) -> dict:
    """The environment for a server: on a machine without a GPU the engine's threads are bound
    to every core unless `VLLM_CPU_OMP_THREADS_BIND` says otherwise."""
    env = {**os.environ, **(env or {})}
    return env if has_gpu() else bind_cpu_threads(env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], log_path: str | Path | None = None, env: dict | None = None) -> subprocess.Popen:
    """Run `cmd`, its output to `log_path` (or this process's own output when None)."""
    if log_path is None:
        return subprocess.Popen(cmd, env=env)
    with Path(log_path).open("w") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float) -> bool:
    """Whether `url` answered 200 within `timeout` seconds while `proc` was running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(1)
    return False


def descendants(proc: subprocess.Popen) -> list:
    """The processes `proc` started (the API server's engine processes), while it runs."""
    import psutil

    try:
        return psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
    except psutil.NoSuchProcess:
        return []


def stop(proc: subprocess.Popen, known: list = (), timeout: float = 60) -> None:
    """SIGTERM, as Ctrl-C would, so that vLLM shuts its engine down; whatever is left after
    `timeout` seconds, of `proc` and of the processes it started (those running now and the
    `known` ones seen earlier), is killed."""
    import psutil

    children = {p.pid: p for p in [*known, *descendants(proc)]}.values()
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    left = psutil.wait_procs(list(children), timeout=timeout / 2)[1]
    for child in left:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(left, timeout=10)


@dataclass
class Server:
    proc: subprocess.Popen
    base_url: str
    log_path: Path | None
    children: list = field(default_factory=list)  # the processes it had started once healthy

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""


@contextmanager
def running(cmd: list[str], base_url: str, log_path: str | Path | None = None, env: dict | None = None,
            timeout: float = 900, stop_timeout: float = 60) -> Iterator[Server]:
    """Run `cmd`, a server that answers `BASE_URL/health`, until the block ends (then `stop`);
    raises if it is not healthy within `timeout` seconds."""
    server = Server(start(cmd, log_path, env), base_url, Path(log_path) if log_path else None)
    try:
        if not wait_healthy(server.proc, f"{base_url}/health", timeout):
            raise RuntimeError(f"{Path(cmd[0]).name} did not become healthy (exit code {server.proc.poll()}):\n"
                               f"{server.log()[-4000:]}")
        server.children = descendants(server.proc)
        yield server
    finally:
        stop(server.proc, server.children, stop_timeout)


@contextmanager
def vllm_server(args: list[str], log_path: str | Path, env: dict | None = None, timeout: float = 900) -> Iterator[Server]:
    """`vllm serve ARGS` on a free loopback port (`serve_command`, `serve_env`)."""
    port = free_port()
    with running(serve_command(args, "127.0.0.1", port), f"http://127.0.0.1:{port}", log_path,
                 serve_env(env), timeout) as server:
        yield server
