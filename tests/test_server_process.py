"""The launcher's KV-cache size: never more than vLLM's CPU worker will find free on its NUMA node."""

from ftp_vllm import server_process
from ftp_vllm.server_process import GiB


def test_node_meminfo_is_read_as_vllm_counts_it(tmp_path):
    node = tmp_path / "meminfo"
    node.write_text("Node 0 MemTotal:  10184440 kB\nNode 0 MemFree:  1000 kB\n"
                    "Node 0 Active(file):  200 kB\nNode 0 Inactive(file):  30 kB\n"
                    "Node 0 SReclaimable:  4 kB\nNode 0 HugePages_Total:     0\n")
    m = server_process.meminfo_kib(str(node), "Node 0 ")
    assert m["MemTotal"] == 10184440 and m["MemFree"] == 1000 and m["HugePages_Total"] == 0
    assert sum(m[k] for k in ("MemFree", "Active(file)", "Inactive(file)", "SReclaimable")) == 1234


def test_a_small_numa_node_caps_the_kv_cache(monkeypatch):
    system = server_process.meminfo_kib("/proc/meminfo")["MemAvailable"] * 1024
    monkeypatch.setattr(server_process, "numa_node_available", lambda node: 6 * GiB)
    assert server_process.available_memory() == min(system, 6 * GiB)
    assert server_process.kv_cache_bytes() <= 6 * GiB // 4 + 1
    monkeypatch.setattr(server_process, "numa_node_available", lambda node: None)
    assert server_process.available_memory() == system


def test_kv_cache_fits_this_machines_node():
    node = server_process.numa_node_available(server_process.first_cpu_node())
    if node is not None:
        assert server_process.kv_cache_bytes() <= max(node // 4, GiB)
