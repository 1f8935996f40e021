"""A `vllm serve` process for tests and benchmarks: start on a free loopback port,
wait for `/health`, stop with SIGTERM and make sure no engine process is left."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


GiB = 1 << 30


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX); without, vLLM's CPU
    kernels emulate it and float32 is faster."""
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def meminfo_kib(path: str, prefix: str = "") -> dict[str, int]:
    """`/proc/meminfo` (or a NUMA node's, whose lines start with "Node N"), as kB by field."""
    fields = {}
    with open(path) as f:
        for line in f:
            parts = line[len(prefix):].split() if line.startswith(prefix) else []
            if len(parts) >= 2 and parts[1].isdigit():
                fields[parts[0].rstrip(":")] = int(parts[1])
    return fields


def numa_node_available(node: int) -> int | None:
    """A NUMA node's reclaimable memory, counted as vLLM's CPU worker counts it before it
    places the KV cache there; None where the kernel exposes no such node."""
    path = f"/sys/devices/system/node/node{node}/meminfo"
    if not os.path.exists(path):
        return None
    m = meminfo_kib(path, f"Node {node} ")
    keys = ("MemFree", "Active(file)", "Inactive(file)", "SReclaimable")
    return sum(m.get(k, 0) for k in keys) * 1024 if "MemFree" in m else None


def first_cpu_node() -> int:
    """The NUMA node of the first CPU this process may run on: the one vLLM's CPU worker binds
    its memory to."""
    cpu = min(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    cpu_dir = Path(f"/sys/devices/system/cpu/cpu{cpu}")
    nodes = sorted(cpu_dir.glob("node[0-9]*")) if cpu_dir.exists() else []
    return int(nodes[0].name[4:]) if nodes else 0


def available_memory() -> int:
    """Free memory where the engine will allocate: the system's, or the NUMA node's if that is
    less (a VM can report nodes smaller than the machine, and vLLM refuses a KV cache larger
    than its node's free memory)."""
    path = "/proc/meminfo"
    system = meminfo_kib(path).get("MemAvailable", 8 * GiB // 1024) * 1024 if os.path.exists(path) else 8 * GiB
    node = numa_node_available(first_cpu_node())
    return min(system, node) if node is not None else system


def kv_cache_bytes() -> int:
    """A quarter of free memory, within [1, 8] GiB: the weights and the engine need the rest."""
    return int(min(max(available_memory() // 4, GiB), 8 * GiB))


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    port: int
    proc: subprocess.Popen
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float) -> bool:
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


@contextmanager
def vllm_server(args: list[str], log_path: str | Path, env: dict | None = None, timeout: float = 900) -> Iterator[Server]:
    """`vllm serve ARGS --host 127.0.0.1 --port FREE`, as a user would type it; the engine's
    threads are bound to every core unless `VLLM_CPU_OMP_THREADS_BIND` says otherwise, and
    it gets the launcher's CPU defaults (`cpu_serve_args`)."""
    import psutil

    port = free_port()
    log_path = Path(log_path)
    env = {**os.environ, **(env or {})}
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{os.cpu_count() - 1}")
    args = [*args, *cpu_serve_args(args)]
    vllm = Path(sys.executable).parent / "vllm"
    with log_path.open("w") as log:
        proc = subprocess.Popen([str(vllm), "serve", *args, "--host", "127.0.0.1", "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
    server = Server(port, proc, log_path)
    try:
        if not wait_healthy(proc, f"{server.base_url}/health", timeout):
            raise RuntimeError(f"vllm serve did not become healthy (exit code {proc.poll()}):\n{server.log()[-4000:]}")
        yield server
    finally:
        children = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for child in psutil.wait_procs(children, timeout=30)[1]:
            child.kill()
