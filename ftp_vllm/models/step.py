"""What the routed layers of one forward know about the scheduler step's requests.

vLLM's attention metadata says where each request's tokens are (`query_start_loc`),
their cache slots and pages, but not which tokens are prompt tokens.  The model
runner knows: `install_step_hook` copies each request's prompt length before
every forward, and `StepRouting.of` reads the rest from the metadata.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ftp_vllm.router import RankLayout, local_index, request_ids


class StepPrompts:
    """Prompt length of each request of the coming step, in batch order (one engine per
    process, one step at a time); set by `install_step_hook`."""

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
        StepPrompts.prompt_lens = self.input_batch.num_prompt_tokens_cpu_tensor[:n].to(self.device, copy=True)
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
        num_reqs = len(StepPrompts.prompt_lens)
        cu = metadata.query_start_loc[: num_reqs + 1]
        prompt_lens = torch.repeat_interleave(StepPrompts.prompt_lens, cu[1:] - cu[:-1], output_size=num_tokens)
        is_prompt = positions[:num_tokens] < prompt_lens
        routed_prompt = is_prompt & routes_prompt(prompt_lens)
        return cls(cu_seqlens=cu, prompt_lens=prompt_lens, slots=metadata.slot_mapping[:num_tokens],
                   block_table=metadata.block_table, is_prompt=is_prompt, num_prompt=int(is_prompt.sum()),
                   routed_prompt=routed_prompt, num_routed_prompt=int(routed_prompt.sum()))

    @property
    def num_tokens(self) -> int:
        return len(self.slots)

    def with_context(self, metadata, block_size: int) -> None:
        """Where each request's earlier tokens are, which decisions rank against."""
        cu = self.cu_seqlens
        self.n_past = metadata.seq_lens[:len(cu) - 1] - (cu[1:] - cu[:-1])
        self.context = (metadata.block_table, block_size)
        self.requests = request_ids(cu)
        self.batches = {}

    def decision_batch(self, routed: Tensor) -> DecisionBatch:
        """The requests holding a `routed` token [T], with their past, as one batch to
        decide on; the other requests' tokens are kept whatever their logits."""
        cu, n_past = self.cu_seqlens, self.n_past
        picked = (torch.zeros(len(n_past), dtype=torch.int32, device=cu.device).index_add_(
            0, self.requests, routed.int()) > 0).nonzero().squeeze(1)
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
    token where decode tokens are not routed, a prompt shorter than `min_prompt`), so its
    logit, and its rank among its request's tokens, would be wasted work."""

    tokens: Tensor | None  # indices of the step's tokens; None: all of them
    cu_seqlens: Tensor  # [R'+1] the chosen requests' tokens, in `tokens`
    past_slots: Tensor  # cache slots of the chosen requests' earlier tokens, request by request
    past_cu_seqlens: Tensor  # [R'+1]
    rank_layout: RankLayout  # shared by every block of the step that routes the same kinds
