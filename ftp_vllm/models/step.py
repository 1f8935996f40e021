"""What the routed layers of one forward know about the scheduler step's requests.

vLLM's attention metadata says where each request's tokens are (`query_start_loc`),
their cache slots and pages, but not which tokens are prompt tokens, nor the level
each request asked for.  The model runner knows, and a step source copies each
request's prompt length and ladder rung before every real step (`StepPrompts`): under vLLM's V1 model runner (the CPU's, and CUDA's
where V1 is chosen) a wrap of the method the runner calls the model from; under
the V2 runner (CUDA's default) the model-state hook V2 offers models.
`StepRouting.of` reads the rest from the metadata.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ftp_vllm.router import RankLayout, local_index, request_ids


class StepPrompts:
    """Prompt length and ladder rung (`ftp_vllm.ladder`) of each request of the step being
    run, in batch order; None outside a real step (profiling, warm-up, CUDA-graph capture).
    One engine per process, one step at a time.  `source` names the model runner that feeds
    it: None means nothing will, and a routed model must not run (`RoutingState.begin_step`
    stops it).  `rung_of` maps a request's sampling params to its rung (set with the router)."""

    prompt_lens: Tensor | None = None
    rungs: list[int] | None = None
    source: str | None = None
    rung_of: Callable | None = None


def request_rung(state) -> int:
    """The rung of a V1 runner's request, read from its params once."""
    rung = getattr(state, "ftp_rung", None)
    if rung is None:
        rung = state.ftp_rung = StepPrompts.rung_of(state.sampling_params) if StepPrompts.rung_of else 0
    return rung


def install_v1_step_source() -> None:
    """V1 model runner: set the prompt lengths around `_model_forward`, which the runner calls
    for real steps only, inside the forward context, and documents as the place to override
    model execution; cleared afterwards, so no dummy run sees a past step (idempotent)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._model_forward
    if not getattr(original, "ftp_step_source", False):
        def _model_forward(self, *args, **kwargs):
            n = self.input_batch.num_reqs
            StepPrompts.prompt_lens = self.input_batch.num_prompt_tokens_cpu_tensor[:n].to(self.device, copy=True)
            StepPrompts.rungs = [request_rung(self.requests[r]) for r in self.input_batch.req_ids[:n]]
            try:
                return original(self, *args, **kwargs)
            finally:
                StepPrompts.prompt_lens = StepPrompts.rungs = None

        _model_forward.ftp_step_source = True
        GPUModelRunner._model_forward = _model_forward
    StepPrompts.source = "v1"


def v2_model_state_cls() -> type:
    """V2 model runner: the model state class it builds for a model that names one
    (`get_model_state_cls`); its `prepare_inputs` runs before every forward, real or dummy."""
    from vllm.v1.worker.gpu.model_states.default import DefaultModelState

    class FTPModelState(DefaultModelState):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.ftp_rungs: dict[int, int] = {}  # by request index
            StepPrompts.source = "v2"

        def add_request(self, req_index: int, new_req_data) -> None:
            super().add_request(req_index, new_req_data)
            self.ftp_rungs[req_index] = StepPrompts.rung_of(new_req_data.sampling_params) if StepPrompts.rung_of else 0

        def prepare_inputs(self, input_batch, req_states):
            # a dummy batch's request ids are made up; a real one's are the runner's requests
            real = input_batch.num_reqs > 0 and input_batch.req_ids[0] in req_states.req_id_to_index
            StepPrompts.prompt_lens = req_states.prompt_len.gpu[input_batch.idx_mapping] if real else None
            StepPrompts.rungs = [self.ftp_rungs[i] for i in input_batch.idx_mapping_np.tolist()] if real else None
            return super().prepare_inputs(input_batch, req_states)

        def prepare_dummy_inputs(self, num_reqs: int, num_tokens: int):
            StepPrompts.prompt_lens = StepPrompts.rungs = None
            return super().prepare_dummy_inputs(num_reqs, num_tokens)

    return FTPModelState


# attention backends whose metadata has what `StepRouting.of` reads, under the same names
ROUTABLE_BACKENDS = ("CPU_ATTN", "FLASH_ATTN", "TRITON_ATTN")


def refuse_unroutable(vllm_config, attention_layers) -> None:
    """Stop the engine at start, with one line naming the cause and the fix, where a step
    could arrive without what routing needs: a router must never serve dense output."""
    parallel = vllm_config.parallel_config
    backends = sorted({layer.attn_backend.get_name() for layer in attention_layers} - set(ROUTABLE_BACKENDS))
    if backends:
        raise ValueError(f"ftp-vllm: the {', '.join(backends)} attention backend's metadata lacks the request "
                         "layout routing reads; start with --attention-backend FLASH_ATTN (or TRITON_ATTN)")
    if parallel.use_ubatching:
        raise ValueError("ftp-vllm: micro-batched steps (--enable-dbo, --ubatch-size) cannot be routed; "
                         "serve without them")
    if getattr(parallel, "prefill_context_parallel_size", 1) > 1:
        raise ValueError("ftp-vllm: prefill context parallelism splits a request's tokens across ranks, which "
                         "routing does not follow; serve with --prefill-context-parallel-size 1")
    if vllm_config.speculative_config is not None:
        raise ValueError("ftp-vllm: speculative decoding is not supported with a router; serve without "
                         "--speculative-config")
    import vllm.envs

    if vllm.envs.VLLM_USE_BREAKABLE_CUDAGRAPH:
        raise ValueError("ftp-vllm: breakable CUDA graphs capture the routing decisions of one step and "
                         "replay them; unset VLLM_USE_BREAKABLE_CUDAGRAPH")


def install_step_source(vllm_config) -> None:
    """The step source for the model runner vLLM picked (the same property its worker reads)."""
    if vllm_config.use_v2_model_runner:
        return  # `v2_model_state_cls`, which the V2 runner asks the model for after loading it
    install_v1_step_source()


def rung_mask(flags: list[bool], rungs: Tensor | None, present: list[int]) -> Tensor | bool:
    """Per token (or for the step, where its requests share one rung): whether its rung's flag is set."""
    if rungs is None:
        return flags[present[0]]
    return torch.tensor(flags, device=rungs.device)[rungs]


@dataclass
class StepRouting:
    """What every routed layer of one forward needs to know about the step's requests."""

    cu_seqlens: Tensor  # [R+1] step tokens of request r: cu[r]:cu[r+1]
    prompt_lens: Tensor  # [T] prompt length of each token's request
    slots: Tensor  # [T] each token's cache slot
    block_table: Tensor  # [R, pages] the attention metadata's
    is_prompt: Tensor  # [T]
    num_prompt: int  # prompt tokens of the step (the rest are decode tokens)
    routed_prompt: Tensor  # [T] prompt tokens of prompts long enough to route, of rungs that route prompts
    num_routed_prompt: int  # their number
    rungs: Tensor | None  # [T] each token's ladder rung; None where the step's requests share one
    present: list[int]  # the rungs of the step's requests
    prompt_rungs: list[int] | None = None  # the rungs of its routed prompt tokens
    decode_rungs: list[int] | None = None  # the rungs of its decode tokens
    # for decisions only (`with_context`): a step that routes nowhere skips them
    requests: Tensor | None = None  # [T] each token's request
    n_past: Tensor | None = None  # [R] each request's earlier tokens
    context: tuple | None = None  # (block table, block size) where those tokens are
    batches: dict | None = None  # `DecisionBatch` by the kinds of token routed

    @classmethod
    def of(cls, metadata, positions: Tensor, ladder) -> StepRouting:
        """The step of vLLM's attention `metadata`, routed by the rungs of `ladder` its requests chose."""
        num_tokens = metadata.num_actual_tokens
        num_reqs = len(StepPrompts.prompt_lens)
        cu = metadata.query_start_loc[: num_reqs + 1]
        counts = cu[1:] - cu[:-1]
        prompt_lens = torch.repeat_interleave(StepPrompts.prompt_lens, counts, output_size=num_tokens)
        request_rungs = StepPrompts.rungs if StepPrompts.rungs is not None else [ladder.default_rung] * num_reqs
        present = sorted(set(request_rungs))
        rungs = None
        if len(present) > 1:
            rungs = torch.repeat_interleave(torch.tensor(request_rungs, device=cu.device), counts, output_size=num_tokens)
        is_prompt = positions[:num_tokens] < prompt_lens
        routed_prompt = is_prompt & ladder.router.routes_prompt(prompt_lens) & rung_mask(ladder.routes_prompts, rungs, present)
        step = cls(cu_seqlens=cu, prompt_lens=prompt_lens, slots=metadata.slot_mapping[:num_tokens],
                   block_table=metadata.block_table, is_prompt=is_prompt, num_prompt=int(is_prompt.sum()),
                   routed_prompt=routed_prompt, num_routed_prompt=int(routed_prompt.sum()), rungs=rungs,
                   present=present)
        if rungs is None:
            step.prompt_rungs = present if step.num_routed_prompt else []
            step.decode_rungs = present if step.num_prompt < num_tokens else []
        else:
            step.prompt_rungs = rungs[routed_prompt].unique().tolist()
            step.decode_rungs = rungs[~is_prompt].unique().tolist()
        return step

    def rung_counts(self, num_rungs: int) -> Tensor:
        """[rungs, 4] the step's (prompt, prompt, decode, decode) tokens of each rung: what a
        block that keeps every token adds to its kept and total counters."""
        kinds = torch.stack([self.is_prompt, self.is_prompt, ~self.is_prompt, ~self.is_prompt], 1).long()
        counts = kinds.new_zeros(num_rungs, 4)
        if self.rungs is None:
            counts[self.present[0]] = kinds.sum(0)
            return counts
        return counts.index_add_(0, self.rungs, kinds)

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
