"""Routed decoder layers for vLLM: the stock layer plus one routing step.

Llama-family layers (Llama, Qwen2) name their parts alike: `input_layernorm`,
`self_attn` (qkv_proj, rotary_emb, attn, o_proj), `post_attention_layernorm`,
`mlp`.  An FTP layer reuses them and adds, between the input norm and
attention, the router's decision for every token of the scheduler step
(the math is `ftp_vllm.router`'s; this module only feeds it vLLM's tensors):

* every token runs the input norm and the K/V projections, and its K/V go to
  the paged cache at its own slot, so later tokens attend to it;
* a kept token runs attention, the output projection and the MLP;
* a skipped token's hidden state passes through unchanged.

The router's rank feature needs the scores of each request's earlier tokens
(earlier chunks, prefix-cache hits, earlier decode steps).  They live in a
score cache beside the KV cache, indexed by the same slots, so they are
recomputed with the KV entries on preemption and shared with them on a
prefix-cache hit.

Cost of this first version: attention still runs for every token (the cache
write needs the keys anyway) and a skipped token's query is computed and
dropped; only the output projection and the MLP are gathered to kept tokens.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.distributed import tensor_model_parallel_all_reduce
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.logger import init_logger
from vllm.model_executor.models.utils import extract_layer_index

from ftp_vllm.router import local_index, request_ids

logger = init_logger(f"vllm.{__name__}")  # under vLLM's logger, so its handlers print it


class _StepPrompts:
    """Prompt length of each request of the coming step, in batch order.

    vLLM's attention metadata says where each request's tokens are but not
    which are prompt tokens; the model runner knows, and a hook copies it here
    before every forward (one engine per process, one step at a time)."""

    prompt_lens: Tensor | None = None


def install_step_hook() -> None:
    """Wrap the model runner's input preparation to record prompt lengths (idempotent)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._prepare_inputs
    if getattr(original, "ftp_hook", False):
        return

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        result = original(self, scheduler_output, num_scheduled_tokens)
        n = self.input_batch.num_reqs
        _StepPrompts.prompt_lens = self.input_batch.num_prompt_tokens_cpu_tensor[:n].to(self.device, copy=True)
        return result

    _prepare_inputs.ftp_hook = True
    GPUModelRunner._prepare_inputs = _prepare_inputs


@dataclass
class StepRouting:
    """What every routed layer of one forward needs to know about the step's requests."""

    cu_seqlens: Tensor  # [R+1] step tokens of request r: cu[r]:cu[r+1]
    prompt_lens: Tensor  # [T] prompt length of each token's request
    slots: Tensor  # [T] each token's cache slot
    past_slots: Tensor  # cache slots of every request's earlier tokens, request by request
    past_cu_seqlens: Tensor  # [R+1]

    @classmethod
    def of(cls, metadata, block_size: int) -> StepRouting:
        num_tokens = metadata.num_actual_tokens
        num_reqs = len(_StepPrompts.prompt_lens)
        cu = metadata.query_start_loc[: num_reqs + 1]
        n_step = cu[1:] - cu[:-1]
        n_past = metadata.seq_lens[:num_reqs] - n_step
        past_cu = torch.cat([n_past.new_zeros(1), n_past.cumsum(0)])
        rid, pos = request_ids(past_cu), local_index(past_cu)
        past_slots = metadata.block_table[rid, pos // block_size] * block_size + pos % block_size
        return cls(
            cu_seqlens=cu,
            prompt_lens=torch.repeat_interleave(_StepPrompts.prompt_lens, n_step, output_size=num_tokens),
            slots=metadata.slot_mapping[:num_tokens],
            past_slots=past_slots,
            past_cu_seqlens=past_cu,
        )


class RoutingState(nn.Module):
    """Per-model routing state shared by the layers: the router, the score cache,
    the current step, and realised-sparsity counters."""

    def __init__(self, router, checkpoint_config: dict, block_size: int):
        super().__init__()
        self.router = router
        self.config = checkpoint_config
        self.block_size = block_size
        self.step: StepRouting | None = None
        self.score_cache: Tensor | None = None
        num_blocks = router.num_blocks
        # prompt kept, prompt total, decode kept, decode total; per block
        self.register_buffer("counts", torch.zeros(num_blocks, 4, dtype=torch.int64), persistent=False)
        self._last_log = time.monotonic()
        self._interval = float(os.environ.get("FTP_VLLM_STATS_INTERVAL", "10"))
        self._trace_path = os.environ.get("FTP_VLLM_TRACE")
        self._stats_path = os.environ.get("FTP_VLLM_STATS")
        self._trace: dict[int, Tensor] = {}
        if self._stats_path:  # the last steps before an idle spell must reach the file too
            threading.Thread(target=self._flush_stats, daemon=True, name="ftp-stats").start()

    def _flush_stats(self) -> None:
        written = None
        while True:
            time.sleep(min(1.0, self._interval) or 0.1)
            counts = self.counts.tolist()
            if counts != written:
                self._write_stats(self.stats(counts))
                written = counts

    def begin_step(self, layer_name: str) -> None:
        self.step = None
        if not is_forward_context_available() or _StepPrompts.prompt_lens is None:
            return
        metadata = get_forward_context().attn_metadata
        if isinstance(metadata, dict):
            metadata = metadata.get(layer_name)
        if metadata is None:  # profiling and warm-up runs
            return
        self.step = StepRouting.of(metadata, self.block_size)
        self._trace.clear()

    def decide(self, block: int, keys: Tensor, positions: Tensor, num_slots: int) -> Tensor:
        """Keep mask [T] of the step's tokens at `block` from their pre-rotary keys [T, KV, d]."""
        step, router = self.step, self.router
        if self.score_cache is None or self.score_cache.shape[1] < num_slots:
            self.score_cache = torch.zeros(router.num_blocks, num_slots, dtype=torch.float32, device=keys.device)
        scores = router.block_scores(block, keys)
        if get_tensor_model_parallel_world_size() > 1:  # each rank holds some KV heads
            scores = tensor_model_parallel_all_reduce(scores)
        past = self.score_cache[block, step.past_slots]
        logits = router.block_logits(block, scores, positions, step.prompt_lens, step.cu_seqlens, past, step.past_cu_seqlens)
        keep = router.keep(block, logits, positions, step.prompt_lens)
        self.score_cache[block, step.slots] = scores
        is_prompt = positions < step.prompt_lens
        self.counts[block] += torch.stack([
            (keep & is_prompt).sum(), is_prompt.sum(), (keep & ~is_prompt).sum(), (~is_prompt).sum(),
        ])
        if self._trace_path:
            self._trace[block] = keep
        return keep

    def end_step(self, positions: Tensor) -> None:
        if self.step is None:
            return
        if self._trace_path:
            self._write_trace(positions)
        now = time.monotonic()
        if now - self._last_log >= self._interval:
            self._last_log = now
            self._log(self.stats())

    def stats(self, counts: list | None = None) -> dict:
        """Realised sparsity since start: the share of token-block computations skipped,
        over all blocks (dense blocks count as computing every token)."""
        c = self.counts.tolist() if counts is None else counts
        num_blocks = self.router.num_blocks
        prompt_tokens = max(row[1] for row in c)  # every routed block sees every token
        decode_tokens = max(row[3] for row in c)

        def skipped(kept_col, total_col, tokens):
            return None if tokens == 0 else sum(row[total_col] - row[kept_col] for row in c) / (num_blocks * tokens)

        return {
            "prompt_sparsity": skipped(0, 1, prompt_tokens),
            "decode_sparsity": skipped(2, 3, decode_tokens),
            "prompt_tokens": prompt_tokens,
            "decode_tokens": decode_tokens,
            "target_sparsity": self.config.get("target_sparsity"),
            "per_block": [
                {"block": b, "routed": not self.router.is_dense(b),
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

    def _write_stats(self, stats: dict) -> None:
        """For the API server (`/ftp/stats`, `/metrics`) and benchmarks, in another process."""
        tmp = f"{self._stats_path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(stats, f)
        os.replace(tmp, self._stats_path)

    def _write_trace(self, positions: Tensor) -> None:
        step = self.step
        record = {
            "rank": get_tensor_model_parallel_rank(),
            "cu_seqlens": step.cu_seqlens.tolist(),
            "positions": positions[: len(step.slots)].tolist(),
            "prompt_lens": step.prompt_lens.tolist(),
            "keep": {str(b): k.int().tolist() for b, k in sorted(self._trace.items())},
        }
        with open(self._trace_path, "a") as f:
            f.write(json.dumps(record) + "\n")


class RoutedDecoderLayer(nn.Module):
    """Mixin placed before a vLLM decoder layer class in the bases."""

    def __init__(self, *args, prefix: str = "", **kwargs):
        super().__init__(*args, prefix=prefix, **kwargs)
        self.layer_idx = extract_layer_index(prefix)
        self.routing: tuple[RoutingState] | tuple = ()  # a tuple: not a submodule of every layer

    def forward(
        self,
        positions: Tensor,
        hidden_states: Tensor,
        residual: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        state = self.routing[0] if self.routing else None
        if state is None or state.step is None or state.router.is_dense(self.layer_idx):
            hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states)
            hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
            return self.mlp(hidden_states), residual
        return self._routed(state, positions, hidden_states, residual)

    def _routed(self, state: RoutingState, positions: Tensor, normed: Tensor, residual: Tensor):
        attn = self.self_attn
        num_tokens = len(state.step.slots)
        qkv, _ = attn.qkv_proj(normed)
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        keys = k[:num_tokens].view(num_tokens, attn.num_kv_heads, attn.head_dim)
        kv_cache = attn.attn.kv_cache
        num_slots = kv_cache.numel() // (2 * attn.num_kv_heads * attn.head_dim)
        keep = torch.ones(len(normed), dtype=torch.bool, device=normed.device)
        keep[:num_tokens] = state.decide(self.layer_idx, keys, positions[:num_tokens], num_slots)
        q, k = attn.rotary_emb(positions, q, k)
        attn_out = attn.attn(q, k, v)  # every token: its K/V must reach the cache
        if bool(keep.all()):
            out, _ = attn.o_proj(attn_out)
            out, residual = self.post_attention_layernorm(out, residual)
            return self.mlp(out), residual
        kept = keep.nonzero().squeeze(1)
        delta = torch.zeros_like(normed)
        delta[kept] = attn.o_proj(attn_out[kept])[0]
        normed, residual = self.post_attention_layernorm(delta, residual)  # skipped: residual + 0
        out = torch.zeros_like(normed)
        out[kept] = self.mlp(normed[kept])
        return out, residual


def attach_routing(model: nn.Module, vllm_config) -> RoutingState | None:
    """Load the router named in the HF config (`ftp_router`, set by `--ftp-router` or
    `hf_overrides`) and hand it to every decoder layer; None leaves the model stock."""
    hf_config = vllm_config.model_config.hf_config
    path = getattr(hf_config, "ftp_router", None)
    if not path:
        return None
    from vllm.config import CompilationMode

    from ftp_vllm.checkpoint import load_checkpoint

    if vllm_config.compilation_config.mode != CompilationMode.NONE:
        raise ValueError("FTP routing runs in eager mode for now: pass --enforce-eager (LLM(enforce_eager=True))")
    default_dtype = torch.get_default_dtype()  # vLLM builds models under the serving dtype
    torch.set_default_dtype(torch.float32)
    try:
        router, config = load_checkpoint(path)
    finally:
        torch.set_default_dtype(default_dtype)
    if router.num_blocks != hf_config.num_hidden_layers:
        raise ValueError(f"router {path} has {router.num_blocks} blocks, the model {hf_config.num_hidden_layers}")
    tp = get_tensor_model_parallel_world_size()
    kv_heads = router.mean_query.shape[1]
    if tp > 1:
        if kv_heads % tp:
            raise ValueError(f"FTP routing needs the {kv_heads} KV heads split evenly over {tp} ranks")
        per_rank = kv_heads // tp
        rank = get_tensor_model_parallel_rank()
        router.mean_query = router.mean_query[:, rank * per_rank:(rank + 1) * per_rank].contiguous()
    state = RoutingState(router, config, vllm_config.cache_config.block_size)
    for layer in model.model.layers:
        if isinstance(layer, RoutedDecoderLayer):
            layer.routing = (state,)
    install_step_hook()
    logger.info("FTP router %s: target sparsity %s", path, config.get("target_sparsity"))
    return state


class FTPModelMixin:
    """Adds routing to a vLLM *ForCausalLM: call `_init_routing` at the end of __init__."""

    def _init_routing(self, vllm_config) -> None:
        self.ftp = attach_routing(self, vllm_config)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        if self.ftp is None:
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds)
        self.ftp.begin_step(self.model.layers[self.model.start_layer].self_attn.attn.layer_name)
        out = super().forward(input_ids, positions, intermediate_tensors, inputs_embeds)
        self.ftp.end_step(positions)
        return out

    def load_weights(self, weights):
        loaded = super().load_weights(weights)
        if self.ftp is not None:  # loaded with the model from its own checkpoint
            loaded |= {name for name, _ in self.named_parameters() if name.startswith("ftp.")}
        return loaded
