"""What this machine offers an engine: a GPU or not, native bfloat16 on the CPU, and free
memory where vLLM's CPU worker will place its KV cache (the system's or its NUMA node's)."""

from __future__ import annotations

import os
from pathlib import Path

GiB = 1 << 30


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def bind_cpu_threads(env: dict) -> dict:
    """vLLM's CPU engine threads on every core, unless `VLLM_CPU_OMP_THREADS_BIND` in `env`
    binds them already."""
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{os.cpu_count() - 1}")
    return env


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
