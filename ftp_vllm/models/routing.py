"""The routing state a model's routed layers share: the router, the step, the score cache.

The router's rank feature needs the scores of each request's earlier tokens
(earlier chunks, prefix-cache hits, earlier decode steps).  They live in a
score cache beside the KV cache, indexed by the same slots, so they are
recomputed with the KV entries on preemption and shared with them on a
prefix-cache hit.  The math is `ftp_vllm.router`'s; this module feeds it vLLM's
tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from vllm.distributed import get_tensor_model_parallel_world_size, tensor_model_parallel_all_reduce
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.model_executor.layers.linear import UnquantizedLinearMethod

from ftp_vllm import envs
from ftp_vllm.models.step import DecisionBatch, StepPrompts, StepRouting, rung_mask
from ftp_vllm.models.telemetry import Telemetry
from ftp_vllm.router import hidden_scores


class RoutingState(nn.Module):
    """Per-model routing state shared by the layers: the router's ladder of operating points
    (`ftp_vllm.ladder`; each request routed by its rung), the current step, the score cache,
    each block's folded key projection, and the telemetry."""

    def __init__(self, ladder, checkpoint_config: dict, block_size: int):
        super().__init__()
        self.ladder = ladder
        self.router = ladder.router  # what the rungs share: mean queries, MLP, shape
        self.config = checkpoint_config
        self.block_size = block_size
        self.telemetry = Telemetry(ladder, checkpoint_config)
        self.step: StepRouting | None = None
        self.score_cache: Tensor | None = None
        self.score_weight: Tensor | None = None  # [B, hidden], `fold_scores`
        self.score_bias: Tensor | None = None  # [B]
        self.fast = envs.FTP_VLLM_PATH != "simple"
        self.scores_keys = envs.FTP_VLLM_SCORE == "keys"
        self.routed_kinds = (any(ladder.routes_prompts), any(ladder.routes_decode))  # prompt, decode
        # Where decode tokens are routed, a decode token ranks against every earlier token of its
        # request, so every step records its tokens' scores.  Where only prompts are, a routed
        # prompt's tokens are scored in the steps that route them, and its cached K/V and scores
        # go only to prompts routed alike (`ftp_vllm.prefix_cache`): a step that routes nowhere
        # (decode steps, short prompts) computes no score, as stock vLLM.
        self.records_scores = self.routed_kinds[1]
        self.routes_step = False  # whether some block may skip a token of the current step
        self.stock_graph_step = False  # whether the current step runs the stock graph (traced)

    def begin_step(self, layer_name: str, positions: Tensor) -> None:
        """Read the step from vLLM's forward context (attention metadata of `layer_name`)."""
        self.step, self.routes_step = None, False
        metadata = get_forward_context().attn_metadata if is_forward_context_available() else None
        if isinstance(metadata, list):
            raise RuntimeError("ftp-vllm: micro-batched steps (--enable-dbo, --ubatch-size) cannot be routed; "
                               "serve without them")
        if isinstance(metadata, dict):
            metadata = metadata.get(layer_name)
        if metadata is None:  # profiling runs; a real step always carries its attention metadata
            if StepPrompts.prompt_lens is not None:
                raise RuntimeError(f"ftp-vllm: a step arrived without attention metadata for {layer_name}, so "
                                   "nothing would be routed")
            return
        if StepPrompts.source is None:
            raise RuntimeError("ftp-vllm: no prompt lengths reach the routed layers under this model runner, so "
                               "nothing would be routed; serve with vLLM's V1 or V2 GPU/CPU model runner")
        if StepPrompts.prompt_lens is None:  # warm-up and CUDA-graph capture runs
            return
        step = self.step = StepRouting.of(metadata, positions, self.ladder)
        self.telemetry.begin_step()
        self.routes_step = self._holds_routed(self.ladder.routes_prompts, self.ladder.routes_decode)
        if self.routes_step:
            step.with_context(metadata, self.block_size)

    def end_step(self, positions: Tensor) -> None:
        if self.step is None:
            return
        if self.stock_graph_step and not self.records_scores:  # the graph's blocks did not count themselves
            for block in self.telemetry.routed_block_ids:
                self.telemetry.count_keep_all(block, self.step.num_tokens)
        self.telemetry.end_step(self.step, positions, self.stock_graph_step)

    def stats(self) -> dict:
        """Realised sparsity since start (`Telemetry.stats`)."""
        return self.telemetry.stats()

    def routes(self, block: int) -> bool:
        """Whether some token of the step may skip `block`: not when the step holds only
        kinds of token (prompt, decode) whose rung's target there is 0, e.g. decode steps of
        a router that keeps decode tokens, nor when its only prompts are too short to route
        or of the dense rung."""
        return self._holds_routed(self.ladder.prompt_routed[block], self.ladder.decode_routed[block])

    def _holds_routed(self, prompt_routed: list[bool], decode_routed: list[bool]) -> bool:
        """Whether the step holds a routable prompt token or a decode token of a rung whose
        flag for that kind is set."""
        step = self.step
        return any(prompt_routed[r] for r in step.prompt_rungs) or any(decode_routed[r] for r in step.decode_rungs)

    def fold_scores(self, block: int, attn: nn.Module) -> None:
        """Score `block`'s tokens from their normed hidden states (`router.hidden_scores`): before
        any projection, and with no reduced-precision GEMM in the score.  Unquantized weights
        only; others score keys (as all do with `FTP_VLLM_SCORE=keys`, for tests and debugging)."""
        fused = attn.qkv_proj
        if not isinstance(fused.quant_method, UnquantizedLinearMethod) or self.scores_keys:
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
            return hidden_scores(normed[:self.step.num_tokens], self.score_weight[block], self.score_bias[block])
        return self.router.block_scores(block, keys)

    def keep_all(self, block: int, scores: Tensor | None, num_slots: int) -> None:
        """A step in which `block` keeps every token: no decisions, and where `records_scores`,
        its tokens' scores to the cache (later tokens rank against them)."""
        num_tokens = self.step.num_tokens
        if scores is not None:
            self._store(block, scores[:num_tokens], num_slots)
        self.telemetry.count_keep_all(block, num_tokens)

    def decide(self, block: int, normed: Tensor, keys: Tensor | None, positions: Tensor, num_slots: int) -> Tensor:
        """Keep mask [T] of the step's tokens at `block` from their normed hidden states (or
        pre-rotary keys [T, KV, d])."""
        step, ladder = self.step, self.ladder
        scores = self._store(block, self.scores(block, normed, keys), num_slots)
        batch = self._decision_batch(block)
        prompt_lens, rungs = step.prompt_lens, step.rungs
        if batch.tokens is not None:
            scores, positions, prompt_lens = scores[batch.tokens], positions[batch.tokens], prompt_lens[batch.tokens]
            rungs = None if rungs is None else rungs[batch.tokens]
        past = self.score_cache[block, batch.past_slots]  # other slots than the step's
        logits = ladder.block_logits(block, rungs, step.present, scores, positions, prompt_lens, batch.cu_seqlens,
                                     past, batch.past_cu_seqlens, batch.rank_layout)
        keep = ladder.keep(block, logits, positions, prompt_lens, rungs, step.present)
        if batch.tokens is not None:
            keep = torch.ones_like(step.is_prompt).index_put_((batch.tokens,), keep)
        self.telemetry.count(block, keep, step)
        return keep

    def _store(self, block: int, scores: Tensor, num_slots: int) -> Tensor:
        """Scores to the score cache at the step's slots; summed over ranks first."""
        if self.score_cache is None or self.score_cache.shape[1] < num_slots:
            self.score_cache = torch.zeros(self.router.num_blocks, num_slots, dtype=torch.float32, device=scores.device)
        if get_tensor_model_parallel_world_size() > 1:  # each rank holds some KV heads
            scores = tensor_model_parallel_all_reduce(scores)
        self.score_cache[block, self.step.slots] = scores
        return scores

    def _decision_batch(self, block: int) -> DecisionBatch:
        """The step's `DecisionBatch` for the kinds of token each rung routes at `block` (made
        once a step for each such pattern)."""
        step = self.step
        kinds = (tuple(self.ladder.prompt_routed[block]), tuple(self.ladder.decode_routed[block]))
        if kinds not in step.batches:
            routed = (step.routed_prompt & rung_mask(kinds[0], step.rungs, step.present)) | (
                ~step.is_prompt & rung_mask(kinds[1], step.rungs, step.present))
            step.batches[kinds] = step.decision_batch(routed)
        return step.batches[kinds]
