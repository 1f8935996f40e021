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

Two paths compute the same thing (same keep masks; `FTP_VLLM_PATH=simple`
picks the first):

* simple: the stock attention call for every token, then the output
  projection and MLP gathered to kept tokens;
* fast (default): the K/V projection for every token and its cache write,
  the query projection, attention, output projection and MLP for kept tokens
  only (attention at the kept queries' own positions, see
  `ftp_vllm.kernels.attention`).  Routed blocks get the query and K/V
  projections as separate layers, split from the fused one after loading.

In vLLM's compiled mode the model has two compiled graphs.  A step that routes
runs vLLM's graph of the model, in which each routed block's routed part is
one op opaque to the compiler (its shapes depend on the decisions).  A step in
which no block can skip a token (decode steps of a router that keeps decode
tokens dense, steps whose prompts are all too short to route) runs a second graph:
the stock model plus, at each routed block, an op that records its tokens'
scores, which later tokens rank against.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import CompilationMode
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.distributed import tensor_model_parallel_all_reduce
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.logger import init_logger
from vllm.model_executor.layers.attention.attention import unified_kv_cache_update
from vllm.model_executor.models.utils import extract_layer_index
from vllm.utils.torch_utils import direct_register_custom_op

from ftp_vllm.kernels import attention as kept_attention
from ftp_vllm.router import RankLayout, hidden_scores, local_index, request_ids

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
    block_table: Tensor  # [R, pages] the attention metadata's
    is_prompt: Tensor  # [T]
    num_prompt: int  # prompt tokens of the step (the rest are decode tokens)
    routed_prompt: Tensor  # [T] prompt tokens of prompts long enough to route (`Router.routes_prompt`)
    num_routed_prompt: int  # their number
    # for decisions only (`with_context`): a step that routes nowhere skips them
    requests: Tensor | None = None  # [T] each token's request
    n_past: Tensor | None = None  # [R] each request's earlier tokens
    context: tuple | None = None  # (block table, block size) where those tokens are
    batches: dict | None = None  # `DecisionBatch` by the kinds of token routed

    @classmethod
    def of(cls, metadata, positions: Tensor, routes_prompt) -> StepRouting:
        """The step of vLLM's attention `metadata`; `routes_prompt` says which prompt lengths are routed."""
        num_tokens = metadata.num_actual_tokens
        num_reqs = len(_StepPrompts.prompt_lens)
        cu = metadata.query_start_loc[: num_reqs + 1]
        prompt_lens = torch.repeat_interleave(_StepPrompts.prompt_lens, cu[1:] - cu[:-1], output_size=num_tokens)
        is_prompt = positions[:num_tokens] < prompt_lens
        routed_prompt = is_prompt & routes_prompt(prompt_lens)
        return cls(cu_seqlens=cu, prompt_lens=prompt_lens, slots=metadata.slot_mapping[:num_tokens],
                   block_table=metadata.block_table, is_prompt=is_prompt, num_prompt=int(is_prompt.sum()),
                   routed_prompt=routed_prompt, num_routed_prompt=int(routed_prompt.sum()))

    def with_context(self, metadata, block_size: int) -> None:
        """Where each request's earlier tokens are, which decisions rank against."""
        cu = self.cu_seqlens
        self.n_past = metadata.seq_lens[:len(cu) - 1] - (cu[1:] - cu[:-1])
        self.context = (metadata.block_table, block_size)
        self.requests = request_ids(cu)
        self.batches = {}

    def decision_batch(self, routable: Tensor) -> DecisionBatch:
        """The requests holding a `routable` token [T], with their past, as one batch to
        decide on; the other requests' tokens are kept whatever their logits."""
        cu, n_past = self.cu_seqlens, self.n_past
        picked = (torch.zeros(len(n_past), dtype=torch.int32, device=cu.device).index_add_(
            0, self.requests, routable.int()) > 0).nonzero().squeeze(1)
        tokens = None
        if len(picked) < len(n_past):
            lengths = (cu[1:] - cu[:-1])[picked]
            cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
            tokens = self.cu_seqlens[picked][request_ids(cu)] + local_index(cu)
            n_past = n_past[picked]
        past_cu = torch.cat([n_past.new_zeros(1), n_past.cumsum(0)])
        rid, pos = request_ids(past_cu), local_index(past_cu)
        block_table, block_size = self.context
        past_slots = block_table[picked[rid], pos // block_size] * block_size + pos % block_size
        return DecisionBatch(tokens, cu, past_slots, past_cu, RankLayout(cu, past_cu))


@dataclass
class DecisionBatch:
    """The tokens a block decides on: every token of the requests that hold a token of a kind
    (prompt, decode) the block routes.  Any other token is kept by the keep rule (a decode
    token where decode tokens are dense, a prompt shorter than `min_prompt`), so its logit,
    and its rank among its request's tokens, would be wasted work."""

    tokens: Tensor | None  # indices of the step's tokens; None: all of them
    cu_seqlens: Tensor  # [R'+1] the chosen requests' tokens, in `tokens`
    past_slots: Tensor  # cache slots of the chosen requests' earlier tokens, request by request
    past_cu_seqlens: Tensor  # [R'+1]
    rank_layout: RankLayout  # shared by every block of the step that routes the same kinds


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
        self.score_weight: Tensor | None = None  # [B, hidden], `fold_scores`
        self.score_bias: Tensor | None = None  # [B]
        self.fast = os.environ.get("FTP_VLLM_PATH", "fast") != "simple"
        num_blocks = router.num_blocks
        # prompt kept, prompt total, decode kept, decode total; per block
        self.register_buffer("counts", torch.zeros(num_blocks, 4, dtype=torch.int64), persistent=False)
        self._last_log = time.monotonic()
        self._interval = float(os.environ.get("FTP_VLLM_STATS_INTERVAL", "10"))
        self._trace_path = os.environ.get("FTP_VLLM_TRACE")
        self._stats_path = os.environ.get("FTP_VLLM_STATS")
        self._trace: dict[int, Tensor] = {}
        self._kept_all: list[int] = []  # blocks that kept every token this step
        targets = [router.targets(b) for b in range(num_blocks)]
        self._routes_prompts = any(t[0] > 0 for t in targets)
        self._routes_decodes = any(t[1] > 0 for t in targets)
        self.routes_step = False  # whether some block may skip a token of the current step
        self.stock_graph_step = False  # whether the current step ran the stock graph (traced)
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

    def begin_step(self, layer_name: str, positions: Tensor) -> None:
        self.step, self.routes_step = None, False
        if not is_forward_context_available() or _StepPrompts.prompt_lens is None:
            return
        metadata = get_forward_context().attn_metadata
        if isinstance(metadata, dict):
            metadata = metadata.get(layer_name)
        if metadata is None:  # profiling and warm-up runs
            return
        step = self.step = StepRouting.of(metadata, positions, self.router.routes_prompt)
        self._trace.clear()
        self._kept_all.clear()
        self.routes_step = self._has_routed_kinds(self._routes_prompts, self._routes_decodes)
        if self.routes_step:
            step.with_context(metadata, self.block_size)

    def routes(self, block: int) -> bool:
        """Whether some token of the step may skip `block`: not when the step holds only
        kinds of token (prompt, decode) whose target there is 0, e.g. decode steps of a
        router that keeps decode tokens dense, nor when its only prompts are too short to
        route."""
        prompt_target, decode_target = self.router.targets(block)
        return self._has_routed_kinds(prompt_target > 0, decode_target > 0)

    def _has_routed_kinds(self, prompts_routed: bool, decodes_routed: bool) -> bool:
        """Whether the step holds a kind of token (routed prompt, decode) that is routed."""
        step = self.step
        return (prompts_routed and step.num_routed_prompt > 0) or (decodes_routed and step.num_prompt < len(step.slots))

    def fold_scores(self, block: int, attn: nn.Module) -> None:
        """Score `block`'s tokens from their normed hidden states (`router.hidden_scores`): before
        any projection, and with no reduced-precision GEMM in the score.  Unquantized weights
        only; others score keys (as all do with `FTP_VLLM_SCORE=keys`, for tests and debugging)."""
        fused = attn.qkv_proj
        if type(fused.quant_method).__name__ != "UnquantizedLinearMethod" or os.environ.get("FTP_VLLM_SCORE") == "keys":
            return
        rows = slice(attn.q_size, attn.q_size + attn.kv_size)
        weight, bias = self.router.fold(block, fused.weight[rows], None if fused.bias is None else fused.bias[rows])
        if self.score_weight is None:
            self.score_weight = weight.new_zeros(self.router.num_blocks, len(weight))
            self.score_bias = weight.new_zeros(self.router.num_blocks)
        self.score_weight[block], self.score_bias[block] = weight, bias

    def scores(self, block: int, normed: Tensor, keys: Tensor | None) -> Tensor:
        """Router scores of the step's tokens at `block`: from their normed hidden states, or
        their pre-rotary keys [T, KV, d] where the key projection is not folded."""
        if self.score_weight is not None:
            return hidden_scores(normed[:len(self.step.slots)], self.score_weight[block], self.score_bias[block])
        return self.router.block_scores(block, keys)

    def _store(self, block: int, scores: Tensor, num_slots: int) -> Tensor:
        """Scores to the score cache at the step's slots; summed over ranks first."""
        if self.score_cache is None or self.score_cache.shape[1] < num_slots:
            self.score_cache = torch.zeros(self.router.num_blocks, num_slots, dtype=torch.float32, device=scores.device)
        if get_tensor_model_parallel_world_size() > 1:  # each rank holds some KV heads
            scores = tensor_model_parallel_all_reduce(scores)
        self.score_cache[block, self.step.slots] = scores
        return scores

    def keep_all(self, block: int, scores: Tensor, num_slots: int) -> None:
        """A step in which `block` keeps every token: its tokens' scores to the cache (later
        tokens rank against them), no decisions; counted once per step in `end_step`."""
        self._store(block, scores[:len(self.step.slots)], num_slots)
        self._kept_all.append(block)
        if self._trace_path:
            self._trace[block] = torch.ones(len(self.step.slots), dtype=torch.bool)

    def decide(self, block: int, normed: Tensor, keys: Tensor | None, positions: Tensor, num_slots: int) -> Tensor:
        """Keep mask [T] of the step's tokens at `block` from their normed hidden states (or
        pre-rotary keys [T, KV, d])."""
        step, router = self.step, self.router
        scores = self._store(block, self.scores(block, normed, keys), num_slots)
        batch = self._decision_batch(block)
        prompt_lens = step.prompt_lens
        if batch.tokens is not None:
            scores, positions, prompt_lens = scores[batch.tokens], positions[batch.tokens], prompt_lens[batch.tokens]
        past = self.score_cache[block, batch.past_slots]  # other slots than the step's
        logits = router.block_logits(block, scores, positions, prompt_lens, batch.cu_seqlens, past,
                                     batch.past_cu_seqlens, batch.rank_layout)
        keep = router.keep(block, logits, positions, prompt_lens)
        if batch.tokens is not None:
            keep = torch.ones_like(step.is_prompt).index_put_((batch.tokens,), keep)
        is_prompt = step.is_prompt
        self.counts[block] += torch.stack([
            (keep & is_prompt).sum(), is_prompt.sum(), (keep & ~is_prompt).sum(), (~is_prompt).sum(),
        ])
        if self._trace_path:
            self._trace[block] = keep
        return keep

    def _decision_batch(self, block: int) -> DecisionBatch:
        """The step's `DecisionBatch` for the kinds of token `block` routes (made once a step)."""
        step = self.step
        prompt_target, decode_target = self.router.targets(block)
        kinds = (prompt_target > 0, decode_target > 0)
        if kinds not in step.batches:
            routable = step.routed_prompt.clone() if kinds[0] else torch.zeros_like(step.is_prompt)
            if kinds[1]:
                routable |= ~step.is_prompt
            step.batches[kinds] = step.decision_batch(routable)
        return step.batches[kinds]

    def kept_attention(self, layer):
        """The fast path's attention for kept queries on `layer`'s backend (a function of
        layer, q [N, H, D], kept, requests, positions, block_table), or None: the simple path."""
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

        impl = layer.impl
        if not self.fast or layer.attn_backend.forward_includes_kv_cache_update:
            return None  # skipped tokens need the cache write as an op of its own
        if isinstance(impl, CPUAttentionBackendImpl):
            return _cpu_attention
        plain = (getattr(impl, "sliding_window", None) in (None, -1, (-1, -1)) and impl.alibi_slopes is None
                 and not getattr(impl, "logits_soft_cap", 0) and getattr(impl, "sinks", None) is None
                 and impl.kv_cache_dtype == "auto" and layer.kv_cache.dim() == 4)
        if layer.kv_cache.is_cuda and kept_attention.triton is not None and plain:
            return _triton_attention
        return None

    def end_step(self, positions: Tensor) -> None:
        step = self.step
        if step is None:
            return
        if self._kept_all:
            num_decode = len(step.slots) - step.num_prompt
            self.counts[self._kept_all] += torch.tensor([step.num_prompt, step.num_prompt, num_decode, num_decode])
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
            "stock_graph": self.stock_graph_step,
            "keep": {str(b): k.int().tolist() for b, k in sorted(self._trace.items())},
        }
        with open(self._trace_path, "a") as f:
            f.write(json.dumps(record) + "\n")


class RoutedDecoderLayer(nn.Module):
    """Mixin placed before a vLLM decoder layer class in the bases."""

    def __init__(self, *args, prefix: str = "", **kwargs):
        super().__init__(*args, prefix=prefix, **kwargs)
        self.layer_idx = extract_layer_index(prefix)
        self.prefix = prefix
        self.mlp_chunk: int | None = None  # tokens per MLP call in routed steps (`compile_parts`)
        self.routing: tuple[RoutingState] | tuple = ()  # a tuple: not a submodule of every layer
        # this block's rows of the routing state's folded key projection (`fold_scores`), as
        # buffers: inputs of the compiled stock graph, not constants baked into it
        self.register_buffer("score_weight", None, persistent=False)
        self.register_buffer("score_bias", None, persistent=False)

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
        if self.routing and not self.routing[0].router.is_dense(self.layer_idx):
            if _StockGraph.tracing:  # a step that routes nowhere: stock block, scores recorded
                scores = hidden_scores(hidden_states, self.score_weight, self.score_bias)
                torch.ops.vllm.ftp_block_scores(scores, hidden_states, self.prefix)
            elif torch.compiler.is_compiling():  # data-dependent shapes: opaque to the compiler
                return torch.ops.vllm.ftp_routed_layer(positions, hidden_states, residual, self.prefix), residual
            else:
                return self.routed_forward(positions, hidden_states, residual)
        return self._dense(positions, hidden_states, residual)

    def _dense(self, positions: Tensor, normed: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        hidden_states, residual = self._attention(positions, normed, residual)
        return self.mlp(hidden_states), residual

    def _attention(self, positions: Tensor, normed: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        """Attention for every token, residual add and post-attention norm."""
        hidden_states = self.self_attn(positions=positions, hidden_states=normed)
        return self.post_attention_layernorm(hidden_states, residual)

    def _mlp(self, hidden_states: Tensor) -> Tensor:
        return self.mlp(hidden_states)

    def _mlp_pieces(self, tokens: Tensor) -> tuple[Tensor, ...]:
        """`tokens` (hidden states or token indices) in the pieces the routed op runs the MLP
        on (`compile_parts`)."""
        return (tokens,) if self.mlp_chunk is None else tokens.split(self.mlp_chunk)

    def record_scores(self, scores: Tensor) -> None:
        """The stock graph's block keeps every token and records their scores."""
        state = self.routing[0]
        if state.step is not None:  # not a warm-up step
            state.keep_all(self.layer_idx, scores, self._num_slots())

    def routed_forward(self, positions: Tensor, normed: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        """Everything after the input norm of a routed block (dense on warm-up steps)."""
        state = self.routing[0]
        if state.step is None:
            return self._dense(positions, normed, residual)
        return self._routed(state, positions, normed, residual)

    def _keep_all(self, state: RoutingState, positions: Tensor, normed: Tensor, residual: Tensor):
        """A step with nothing to decide at this block: the stock computation, plus the
        scores that later tokens rank against."""
        qkv = self._qkv_for_key_scores(state, normed)
        state.keep_all(self.layer_idx, state.scores(self.layer_idx, normed, self._keys(qkv, state)), self._num_slots())
        return self._stock(positions, normed, qkv, residual)

    def _qkv_for_key_scores(self, state: RoutingState, normed: Tensor) -> Tensor | None:
        """The fused projection, computed before the decision only for a router that scores
        keys (quantized weights); one that scores hidden states decides before any projection."""
        return None if state.score_weight is not None else self.self_attn.qkv_proj(normed)[0]

    def _keys(self, qkv: Tensor | None, state: RoutingState) -> Tensor | None:
        """Pre-rotary keys [T, KV, d] of the step's tokens from `_qkv_for_key_scores`' projection;
        None when the router scores hidden states."""
        if qkv is None:
            return None
        attn, num_tokens = self.self_attn, len(state.step.slots)
        k = qkv[:num_tokens, attn.q_size:attn.q_size + attn.kv_size]
        return k.reshape(num_tokens, attn.num_kv_heads, attn.head_dim)

    def _stock(self, positions: Tensor, normed: Tensor, qkv: Tensor | None, residual: Tensor):
        """The stock block, every token kept: compiled as one piece, or from a fused projection
        already computed for key scores."""
        if qkv is not None:
            return self._attend_all(positions, qkv, residual)
        if self.mlp_chunk is None or len(normed) <= self.mlp_chunk:
            return self._dense(positions, normed, residual)
        hidden, residual = self._attention(positions, normed, residual)
        return torch.cat([self._mlp(part) for part in self._mlp_pieces(hidden)]), residual

    def _attend_all(self, positions: Tensor, qkv: Tensor, residual: Tensor):
        """The stock block from its fused projection (computed for key scores): every token kept."""
        attn = self.self_attn
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q, k = attn.rotary_emb(positions, q, k)
        hidden, residual = self.post_attention_layernorm(attn.o_proj(attn.attn(q, k, v))[0], residual)
        return self.mlp(hidden), residual

    def _num_slots(self) -> int:
        attn = self.self_attn
        return attn.attn.kv_cache.numel() // (2 * attn.num_kv_heads * attn.head_dim)

    def _routed(self, state: RoutingState, positions: Tensor, normed: Tensor, residual: Tensor):
        if not state.routes(self.layer_idx):
            return self._keep_all(state, positions, normed, residual)
        attn = self.self_attn
        num_tokens = len(state.step.slots)
        qkv = self._qkv_for_key_scores(state, normed)
        keep = torch.zeros(len(normed), dtype=torch.bool, device=normed.device)
        keep[:num_tokens] = state.decide(self.layer_idx, normed, self._keys(qkv, state), positions[:num_tokens],
                                         self._num_slots())
        kept = keep.nonzero().squeeze(1)
        if len(kept) == len(normed):  # nothing skipped: the stock block
            return self._stock(positions, normed, qkv, residual)
        kernel = state.kept_attention(attn.attn) if getattr(attn, "kv_proj", None) is not None else None
        if kernel is None:  # simple path
            qkv = attn.qkv_proj(normed)[0] if qkv is None else qkv
            q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
            q, k = attn.rotary_emb(positions, q, k)
            attn_out = attn.attn(q, k, v)[kept]  # every token: its K/V must reach the cache
        else:
            k, v = attn.kv_proj(normed)[0].split([attn.kv_size, attn.kv_size], dim=-1)
            k = self._rotary_keys(positions, k)
            unified_kv_cache_update(k.view(-1, attn.num_kv_heads, attn.head_dim),
                                    v.view(-1, attn.num_kv_heads, attn.head_dim), attn.attn.layer_name)
            if len(kept) == 0:  # every token skips: only the cache write
                return torch.zeros_like(normed), residual
            q = self._kept_query(positions, normed, kept)
            step = state.step
            attn_out = kernel(attn.attn, q.view(len(kept), attn.num_heads, attn.head_dim), kept,
                              step.requests[kept], positions[kept], step.block_table)
        return self._finish(attn.o_proj(attn_out.reshape(len(kept), -1))[0], residual, kept)

    def _rotary_keys(self, positions: Tensor, k: Tensor) -> Tensor:
        return self.self_attn.rotary_emb(positions, k, None)[0]

    def _kept_query(self, positions: Tensor, normed: Tensor, kept: Tensor) -> Tensor:
        attn = self.self_attn
        return attn.rotary_emb(positions[kept], attn.q_proj(normed[kept])[0], None)[0]

    def compile_parts(self, inductor_options: dict) -> None:
        """vLLM's compiler sees the routed op as opaque: compile its dense parts on their own,
        with vLLM's inductor settings, as vLLM does for its layers called from opaque ops, so
        that their norms and activations fuse as in the stock compiled layers.  A step that
        keeps every token runs the whole block (`_dense`) as one compiled piece.

        On CPUs the routed op also runs its MLP on at most `mlp_chunk` tokens at a time.  The
        stock graph reuses one set of buffers across its layers; a compiled piece allocates
        its own at every call, and a buffer above glibc's largest mmap threshold (32 MiB: the
        MLP's gate/up output of 4,096 float32 tokens of SmolLM2 is 48 MiB) is mapped afresh
        each time and its pages faulted in (a keep-everything router's prompt throughput rose
        from 0.94 to 0.96 of stock's).  Pieces below the threshold come back from the heap."""
        from vllm.platforms import current_platform

        for name in ("_dense", "_attention", "_mlp", "_post_norm", "_kept_query", "_rotary_keys"):
            setattr(self, name, _compile_tokenwise(getattr(self, name), inductor_options))
        if os.environ.get("FTP_VLLM_MLP_CHUNK"):  # tests: chunks of a tiny model's steps
            self.mlp_chunk = int(os.environ["FTP_VLLM_MLP_CHUNK"])
        elif current_platform.is_cpu():
            gate_up = getattr(self.mlp.gate_up_proj, "weight", None)
            row_bytes = len(gate_up) * gate_up.element_size() if gate_up is not None else 16384
            self.mlp_chunk = max(64, (24 << 20) // row_bytes)

    def _post_norm(self, attn_out: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        return self.post_attention_layernorm(attn_out, residual)

    def _finish(self, attn_out: Tensor, residual: Tensor, kept: Tensor):
        """Residual add, post-attention norm and MLP of the kept tokens, from their attention
        output [N, hidden]; `residual` is updated in place at their rows.  A skipped token's
        residual stays as it is and it adds zero: nothing of the block touches its row."""
        if not len(kept):
            return torch.zeros_like(residual), residual
        normed, kept_residual = self._post_norm(attn_out, residual[kept])
        residual[kept] = kept_residual
        out = torch.zeros_like(residual)
        for rows, part in zip(self._mlp_pieces(kept), self._mlp_pieces(normed)):
            out[rows] = self._mlp(part)
        return out, residual


def _compile_tokenwise(fn, inductor_options: dict):
    """`fn` compiled as vLLM compiles its models: dimension 0 of every tensor argument (the
    tokens) symbolic, every other dimension static, and only the guards on those symbols
    checked (checking all cost more than a decode step's work at a block).  So each call
    must pass arguments of the first call's dtypes and layouts (the routed layer calls each
    part from one place, with tensors made the same way), and the layers of a model, which
    share the compiled code, must have the same shapes (Llama and Qwen2 layers do; weights
    and layer names are read from the layer at each call).  Fewer than two tokens would be
    a specialised size, which no unchecked guard may stand for: those calls run eagerly."""
    from vllm.model_executor.utils import maybe_disable_graph_partition
    from vllm.platforms import current_platform

    backend = current_platform.simple_compile_backend
    options = {**{k: v for k, v in inductor_options.items() if isinstance(v, (bool, int, float, str))},
               **maybe_disable_graph_partition(backend),
               "guard_filter_fn": lambda entries: [e.guard_type == "SHAPE_ENV" for e in entries]}
    compiled = torch.compile(fn, dynamic=False, backend=backend, options=options)

    def call(*args):
        if torch.compiler.is_compiling() or any(len(arg) < 2 for arg in args):
            return fn(*args)
        for arg in args:
            torch._dynamo.maybe_mark_dynamic(arg, 0)
        return compiled(*args)

    return call


def _cpu_attention(layer, q: Tensor, kept: Tensor, requests: Tensor, positions: Tensor,
                   block_table: Tensor) -> Tensor:
    """vLLM's CPU attention kernel over runs of consecutive kept queries (see `query_runs`)."""
    from vllm import _custom_ops as ops
    from vllm import envs

    impl = layer.impl
    query_start_loc, seq_lens, run_requests = kept_attention.query_runs(kept, requests, positions)
    num_blocks, num_kv_heads, block_size, _ = layer.kv_cache.shape
    key_cache, value_cache = layer.kv_cache.view(num_blocks, num_kv_heads, 2 * block_size, -1).chunk(2, dim=2)
    scheduler_metadata = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=len(seq_lens), num_heads=impl.num_heads, num_kv_heads=impl.num_kv_heads,
        head_dim=impl.head_size, seq_lens=seq_lens, dtype=q.dtype, query_start_loc=query_start_loc,
        causal=True, sliding_window_size=impl.sliding_window, isa=layer.isa,
        enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, kv_cache_dtype=impl.kv_cache_dtype,
    )
    out = torch.empty_like(q)
    ops.cpu_attention_with_kv_cache(
        query=q, key_cache=key_cache, value_cache=value_cache, output=out,
        query_start_loc=query_start_loc, seq_lens=seq_lens, scale=impl.scale, causal=True,
        alibi_slopes=impl.alibi_slopes, sliding_window=impl.sliding_window,
        block_table=block_table[run_requests], softcap=impl.logits_soft_cap,
        scheduler_metadata=scheduler_metadata, s_aux=impl.sinks,
        k_scale=layer._k_scale_float, v_scale=layer._v_scale_float, kv_cache_dtype=impl.kv_cache_dtype,
    )
    return out


def _triton_attention(layer, q: Tensor, kept: Tensor, requests: Tensor, positions: Tensor,
                      block_table: Tensor) -> Tensor:
    """The Triton kernel over vLLM's GPU cache, [blocks, kv_heads, block_size, 2 * head_dim]."""
    key_cache, value_cache = layer.kv_cache.transpose(1, 2).split(layer.impl.head_size, dim=-1)
    return kept_attention.attention_at_positions(q, positions, requests, block_table, key_cache, value_cache,
                                                 layer.impl.scale)


def split_qkv(attn: nn.Module) -> None:
    """Give a routed block separate query and K/V projections (the fused one stays for
    dense steps): a skipped token must not pay for its query.  Called after the
    weights are loaded and before vLLM's post-load processing packs them."""
    from vllm.model_executor.layers.linear import ReplicatedLinear

    fused = attn.qkv_proj
    if type(fused.quant_method).__name__ != "UnquantizedLinearMethod":
        return  # quantized: the fast path computes the fused projection
    weight, bias = fused.weight.data, fused.bias.data if fused.bias is not None else None
    for name, rows in (("q_proj", slice(0, attn.q_size)), ("kv_proj", slice(attn.q_size, None))):
        part = ReplicatedLinear(weight.shape[1], weight[rows].shape[0], bias=bias is not None,
                                params_dtype=weight.dtype, prefix=f"{fused.prefix}.ftp_{name}")
        part.to(weight.device)
        part.weight.data.copy_(weight[rows])
        if bias is not None:
            part.bias.data.copy_(bias[rows])
        setattr(attn, name, part)


_ROUTED_LAYERS: dict[str, RoutedDecoderLayer] = {}  # by prefix; one engine per process


def _routed_layer_op(positions: Tensor, normed: Tensor, residual: Tensor, prefix: str) -> Tensor:
    """A routed block for compiled graphs: returns the hidden states, updates `residual` in place."""
    hidden, updated = _ROUTED_LAYERS[prefix].routed_forward(positions, normed, residual)
    if updated is not residual:
        residual.copy_(updated)
    return hidden


def _routed_layer_fake(positions: Tensor, normed: Tensor, residual: Tensor, prefix: str) -> Tensor:
    return torch.empty_like(normed)


direct_register_custom_op("ftp_routed_layer", _routed_layer_op, mutates_args=["residual"], fake_impl=_routed_layer_fake)


def _block_scores_op(scores: Tensor, normed: Tensor, prefix: str) -> None:
    """`RoutedDecoderLayer.record_scores` for the stock graph.  Declared as mutating `normed`
    (it does not), which the block reads next: the compiler drops an op whose outputs and
    mutations nothing reads (a mutated `scores` was dropped)."""
    _ROUTED_LAYERS[prefix].record_scores(scores)


def _block_scores_fake(scores: Tensor, normed: Tensor, prefix: str) -> None:
    return None


direct_register_custom_op("ftp_block_scores", _block_scores_op, mutates_args=["normed"], fake_impl=_block_scores_fake)


def attach_routing(model: nn.Module, vllm_config) -> RoutingState | None:
    """Load the router named in the HF config (`ftp_router`, set by `--ftp-router` or
    `hf_overrides`) and hand it to every decoder layer; None leaves the model stock."""
    hf_config = vllm_config.model_config.hf_config
    path = getattr(hf_config, "ftp_router", None)
    if not path:
        return None
    from ftp_vllm.checkpoint import load_checkpoint

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
    compilation = vllm_config.compilation_config
    compiled = compilation.mode != CompilationMode.NONE and compilation.backend != "eager"
    for layer in model.model.layers:
        if isinstance(layer, RoutedDecoderLayer):
            layer.routing = (state,)
            _ROUTED_LAYERS[layer.prefix] = layer
            if compiled and not router.is_dense(layer.layer_idx):
                layer.compile_parts(compilation.inductor_compile_config)
    _keep_routing_out_of_graphs(compilation)
    install_step_hook()
    logger.info("FTP router %s: target sparsity %s", path, config.get("target_sparsity"))
    return state


def _keep_routing_out_of_graphs(compilation_config) -> None:
    """Piecewise compilation splits the graph at the routed-layer op, and CUDA graphs
    (fixed shapes) capture only the pieces between: a routed step's shapes depend on
    its data.  On CPUs vLLM compiles the whole graph and calls the op from it."""
    from vllm.config import CUDAGraphMode

    for op in ("vllm::ftp_routed_layer", "vllm::ftp_block_scores"):  # the latter reads the step's slots
        if compilation_config.splitting_ops is not None and op not in compilation_config.splitting_ops:
            compilation_config.splitting_ops.append(op)
    mode = compilation_config.cudagraph_mode
    if mode is not None and mode.has_full_cudagraphs():
        logger.info("FTP routing: CUDA graphs %s -> PIECEWISE (routed steps have data-dependent shapes)", mode.name)
        compilation_config.cudagraph_mode = CUDAGraphMode.PIECEWISE


@support_torch_compile(dynamic_arg_dims={"input_ids": {0: "b"}, "positions": {0: "b"},
                                         "intermediate_tensors": {0: "b"}, "inputs_embeds": {0: "b"}})
class _StockGraph(nn.Module):
    """vLLM's compiled graph of the model as its routed blocks run in a step that routes
    nowhere: stock blocks that record their tokens' scores.  The model's layers read
    `tracing` while the compiler traces this module (a compiled graph never reads it)."""

    tracing = False

    def __init__(self, *, vllm_config, model: nn.Module, prefix: str = ""):
        super().__init__()
        self.model = model

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        return self.model.forward(input_ids, positions, intermediate_tensors, inputs_embeds)

    def run(self, *args):
        _StockGraph.tracing = True
        try:
            return self(*args)
        finally:
            _StockGraph.tracing = False


class FTPModelMixin:
    """Adds routing to a vLLM *ForCausalLM: call `_init_routing` at the end of __init__."""

    def _init_routing(self, vllm_config) -> None:
        from vllm.compilation.backends import set_model_tag

        self.ftp = attach_routing(self, vllm_config)
        self.stock_graph: tuple[_StockGraph] | tuple = ()  # a tuple: the model's modules are registered once
        mode = vllm_config.compilation_config.mode
        compiles = mode not in (CompilationMode.NONE, CompilationMode.STOCK_TORCH_COMPILE)
        if self.ftp is not None and compiles:  # as `support_torch_compile` decides
            with set_model_tag("ftp_stock_graph"):  # its own compile cache
                self.stock_graph = (_StockGraph(vllm_config=vllm_config, model=self.model),)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        if self.ftp is None:
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds)
        state = self.ftp
        state.begin_step(self.model.layers[self.model.start_layer].self_attn.attn.layer_name, positions)
        args = (input_ids, positions, intermediate_tensors, inputs_embeds)
        # the stock graph scores hidden states only: a router that scores keys never runs it
        state.stock_graph_step = bool(self.stock_graph) and state.score_weight is not None and not state.routes_step
        if not state.stock_graph_step:
            out = super().forward(*args)
        elif state.step is not None:
            out = self.stock_graph[0].run(*args)
        else:  # warm-up: both graphs compile before serving
            self.stock_graph[0].run(*args)
            out = super().forward(*args)
        state.end_step(positions)
        return out

    def load_weights(self, weights):
        loaded = super().load_weights(weights)
        if self.ftp is not None:  # loaded with the model from its own checkpoint
            loaded |= {name for name, _ in self.named_parameters() if name.startswith("ftp.")}
            for layer in self.model.layers:
                if isinstance(layer, RoutedDecoderLayer) and not self.ftp.router.is_dense(layer.layer_idx):
                    self.ftp.fold_scores(layer.layer_idx, layer.self_attn)
                    if self.ftp.score_weight is not None:
                        layer.score_weight = self.ftp.score_weight[layer.layer_idx]
                        layer.score_bias = self.ftp.score_bias[layer.layer_idx]
                    split_qkv(layer.self_attn)
        return loaded
