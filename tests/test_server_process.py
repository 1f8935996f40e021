"""Starting and stopping a server (`ftp_vllm.server_process`) without vLLM, and the KV-cache
size (`ftp_vllm.hardware`): never more than vLLM's CPU worker will find free on its NUMA node."""

import sys

import psutil
import pytest

from ftp_vllm import hardware, server_process
from ftp_vllm.hardware import GiB

# A stand-in server: answers /health once it has started a child that ignores SIGTERM (as an
# engine process stuck in a step would), and writes that child's pid to the log.
FAKE_SERVER = r"""
import http.server, signal, subprocess, sys
child = subprocess.Popen([sys.executable, "-c",
                          "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
print("child", child.pid, flush=True)

class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *args):
        pass

signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""


def test_running_server_is_healthy_and_leaves_no_process(tmp_path):
    port = server_process.free_port()
    log = tmp_path / "server.log"
    with server_process.running([sys.executable, "-c", FAKE_SERVER, str(port)], f"http://127.0.0.1:{port}",
                                log, timeout=60, stop_timeout=4) as server:
        assert server.port == port and server.proc.poll() is None
        child = int(server.log().split()[1])
        assert [p.pid for p in server.children] == [child]
    assert server.proc.poll() is not None
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE


def test_a_server_that_exits_before_healthy_raises_with_its_log(tmp_path):
    cmd = [sys.executable, "-c", "print('no model here'); raise SystemExit(3)"]
    with pytest.raises(RuntimeError, match="no model here"):
        with server_process.running(cmd, f"http://127.0.0.1:{server_process.free_port()}", tmp_path / "log",
                                    timeout=60):
            pass


def test_serve_command_adds_cpu_defaults_only_where_the_arguments_leave_them_open(monkeypatch):
    monkeypatch.setattr(server_process, "has_gpu", lambda: False)
    monkeypatch.setattr(server_process, "native_bf16", lambda: False)
    monkeypatch.setattr(server_process, "kv_cache_bytes", lambda: 3 * GiB)
    cmd = server_process.serve_command(["model"], "127.0.0.1", 8123)
    assert cmd[1:] == ["serve", "model", "--kv-cache-memory-bytes", str(3 * GiB), "--dtype", "float32",
                       "--host", "127.0.0.1", "--port", "8123"]
    chosen = ["model", "--dtype=bfloat16", "--gpu-memory-utilization", "0.5"]
    assert server_process.serve_command(chosen, "h", 1)[2:] == [*chosen, "--host", "h", "--port", "1"]
    monkeypatch.setattr(server_process, "has_gpu", lambda: True)
    assert server_process.serve_command(["model"], "h", 1)[2:] == ["model", "--host", "h", "--port", "1"]


def test_node_meminfo_is_read_as_vllm_counts_it(tmp_path):
    node = tmp_path / "meminfo"
    node.write_text("Node 0 MemTotal:  10184440 kB\nNode 0 MemFree:  1000 kB\n"
                    "Node 0 Active(file):  200 kB\nNode 0 Inactive(file):  30 kB\n"
                    "Node 0 SReclaimable:  4 kB\nNode 0 HugePages_Total:     0\n")
    m = hardware.meminfo_kib(str(node), "Node 0 ")
    assert m["MemTotal"] == 10184440 and m["MemFree"] == 1000 and m["HugePages_Total"] == 0
    assert sum(m[k] for k in ("MemFree", "Active(file)", "Inactive(file)", "SReclaimable")) == 1234


def test_a_small_numa_node_caps_the_kv_cache(monkeypatch):
    system = 20 * GiB  # fixed: the machine's own MemAvailable moves between two reads
    monkeypatch.setattr(hardware, "meminfo_kib", lambda path, prefix="": {"MemAvailable": system // 1024})
    monkeypatch.setattr(hardware, "numa_node_available", lambda node: 6 * GiB)
    assert hardware.available_memory() == min(system, 6 * GiB)
    assert hardware.kv_cache_bytes() <= 6 * GiB // 4 + 1
    monkeypatch.setattr(hardware, "numa_node_available", lambda node: None)
    assert hardware.available_memory() == system


@pytest.mark.skipif(not hardware.numa_node_available(hardware.first_cpu_node()), reason="no NUMA node meminfo here")
def test_kv_cache_fits_this_machines_node():
    node = hardware.numa_node_available(hardware.first_cpu_node())
    assert hardware.kv_cache_bytes() <= max(node // 4, GiB)
