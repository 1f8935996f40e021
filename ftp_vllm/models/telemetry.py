"""What a routed model reports: realised sparsity, and each step's keep masks.

Per ladder rung and block, it counts kept and total prompt and decode tokens; every
`FTP_VLLM_STATS_INTERVAL` seconds it logs the share skipped, with
`FTP_VLLM_STATS` a thread writes the counters to a JSON file about once a second
(for the API server, `ftp_vllm.server_routes`, in another process), and with
`FTP_VLLM_TRACE` every step's keep masks go to a JSON-lines file.
"""

from __future__ import annotations

import json
import os
import threading
import time

import torch
from torch import Tensor, nn
from vllm.distributed import get_tensor_model_parallel_rank
from vllm.logger import init_logger

from ftp_vllm import envs
from ftp_vllm.models.step import StepRouting

logger = init_logger(f"vllm.{__name__}")  # under vLLM's logger, so its handlers print it


class Telemetry(nn.Module):
    """Realised-sparsity counters of one model's routed blocks, and the step trace."""

    def __init__(self, ladder, checkpoint_config: dict):
        super().__init__()
        self.levels = ladder.levels
        self.num_blocks = num_blocks = ladder.router.num_blocks
        self.routed_blocks = [not ladder.is_dense(b) for b in range(num_blocks)]
        self.routed_block_ids = [b for b, routed in enumerate(self.routed_blocks) if routed]
        self.target_sparsity = ladder.default  # of requests that name no level
        # prompt kept, prompt total, decode kept, decode total; per rung and block
        shape = (len(ladder.levels), num_blocks, 4)
        self.register_buffer("counts", torch.zeros(shape, dtype=torch.int64), persistent=False)
        self.host_counts = torch.zeros(shape, dtype=torch.int64)  # what readers read (`_publish`)
        self.interval = envs.FTP_VLLM_STATS_INTERVAL
        self.trace_path = envs.FTP_VLLM_TRACE
        self.stats_path = envs.FTP_VLLM_STATS
        self.trace: dict[int, Tensor] = {}  # keep mask by block, this step
        self.keep_all_blocks: list[int] = []  # blocks that kept every token this step
        self._last_log = time.monotonic()
        if self.stats_path:  # the last steps before an idle spell must reach the file too
            threading.Thread(target=self._flush_stats, daemon=True, name="ftp-stats").start()

    def begin_step(self) -> None:
        self.trace.clear()
        self.keep_all_blocks.clear()

    def count(self, block: int, keep: Tensor, step: StepRouting) -> None:
        """A block's decisions on the step's tokens."""
        is_prompt = step.is_prompt
        if step.rungs is None:  # one rung: four sums, no per-token table
            self.counts[step.present[0], block] += torch.stack([
                (keep & is_prompt).sum(), is_prompt.sum(), (keep & ~is_prompt).sum(), (~is_prompt).sum()])
        else:
            kinds = torch.stack([keep & is_prompt, is_prompt, keep & ~is_prompt, ~is_prompt], 1).long()
            self.counts[:, block].index_add_(0, step.rungs, kinds)
        if self.trace_path:
            self.trace[block] = keep

    def count_keep_all(self, block: int, num_tokens: int) -> None:
        """A block that kept every token of the step: counted once, in `end_step`."""
        self.keep_all_blocks.append(block)
        if self.trace_path:
            self.trace[block] = torch.ones(num_tokens, dtype=torch.bool)

    def end_step(self, step: StepRouting, positions: Tensor, stock_graph: bool) -> None:
        if self.keep_all_blocks:
            self.counts[:, self.keep_all_blocks] += step.rung_counts(len(self.levels))[:, None].to(self.counts.device)
        self._publish()
        if self.trace_path:
            self._write_trace(step, positions, stock_graph)
        now = time.monotonic()
        if now - self._last_log >= self.interval:
            self._last_log = now
            self._log(self.stats())

    def _publish(self) -> None:
        """The counters where the log and the stats thread read them: on a CPU the buffer
        itself; on an accelerator a pinned host copy made without waiting for the device, so
        that no reader syncs with it or touches a stream that vLLM may be capturing."""
        counts = self.counts
        if counts.device.type == "cpu":
            self.host_counts = counts
            return
        if self.host_counts.device.type != "cpu" or self.host_counts.is_pinned() != counts.is_cuda:
            self.host_counts = torch.zeros(counts.shape, dtype=counts.dtype, pin_memory=counts.is_cuda)
        self.host_counts.copy_(counts, non_blocking=True)

    def stats(self, counts: Tensor | None = None) -> dict:
        """Realised sparsity since start: the share of token-block computations skipped,
        over all blocks (blocks the router never routes count as computing every token), in
        all and per level of the router's ladder."""
        counts = self.host_counts.clone() if counts is None else counts
        levels = []
        for level, rung in zip(self.levels, counts.tolist()):
            stats = self._sparsity(rung)
            levels.append({"level": level, **{k: v for k, v in stats.items() if k != "per_block"}})
        return {**self._sparsity(counts.sum(0).tolist()), "target_sparsity": self.target_sparsity, "levels": levels}

    def _sparsity(self, c: list) -> dict:
        """Realised sparsity of [blocks][4] counters."""
        num_blocks = self.num_blocks
        prompt_tokens = max(row[1] for row in c)  # every routed block sees every token
        decode_tokens = max(row[3] for row in c)

        def skipped(kept_col, total_col, tokens):
            return None if tokens == 0 else sum(row[total_col] - row[kept_col] for row in c) / (num_blocks * tokens)

        return {
            "prompt_sparsity": skipped(0, 1, prompt_tokens),
            "decode_sparsity": skipped(2, 3, decode_tokens),
            "prompt_tokens": prompt_tokens,
            "decode_tokens": decode_tokens,
            "per_block": [
                {"block": b, "routed": self.routed_blocks[b],
                 "prompt_kept": c[b][0], "prompt_total": c[b][1], "decode_kept": c[b][2], "decode_total": c[b][3]}
                for b in range(num_blocks)
            ],
        }

    @staticmethod
    def _log(stats: dict) -> None:
        fmt = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
        logger.info(
            "FTP realised sparsity: prompt %s of %d tokens, decode %s of %d tokens",
            fmt(stats["prompt_sparsity"]), stats["prompt_tokens"],
            fmt(stats["decode_sparsity"]), stats["decode_tokens"],
        )

    def _flush_stats(self) -> None:
        written = None
        while True:
            time.sleep(min(1.0, self.interval) or 0.1)
            counts = self.host_counts.clone()
            if written is None or not torch.equal(counts, written):
                self._write_stats(self.stats(counts))
                written = counts

    def _write_stats(self, stats: dict) -> None:
        tmp = f"{self.stats_path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(stats, f)
        os.replace(tmp, self.stats_path)

    def _write_trace(self, step: StepRouting, positions: Tensor, stock_graph: bool) -> None:
        record = {
            "rank": get_tensor_model_parallel_rank(),
            "cu_seqlens": step.cu_seqlens.tolist(),
            "positions": positions[:step.num_tokens].tolist(),
            "prompt_lens": step.prompt_lens.tolist(),
            "stock_graph": stock_graph,
            "keep": {str(b): k.int().tolist() for b, k in sorted(self.trace.items())},
        }
        with open(self.trace_path, "a") as f:
            f.write(json.dumps(record) + "\n")
