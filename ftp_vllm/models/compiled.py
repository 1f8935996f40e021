"""Routed layers in vLLM's compiled mode: two graphs, two custom ops, compiled parts.

A step that routes runs vLLM's graph of the model, in which each routed block's
routed part is one op opaque to the compiler (`vllm::ftp_routed_layer`: its
shapes depend on the decisions).  A step in which no block can skip a token
(decode steps of a router that keeps decode tokens, steps whose prompts are all
too short to route) runs a second graph, `StockGraph`: the stock model plus, for
a router that routes decode tokens, at each routed block an op that records its
tokens' scores, which later tokens rank against (`vllm::ftp_block_scores`);
otherwise nothing but the stock model (`RoutingState.records_scores`).  Both ops find their layer by name in
vLLM's forward context, as vLLM's own opaque ops do.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import CUDAGraphMode
from vllm.forward_context import get_forward_context
from vllm.logger import init_logger
from vllm.utils.torch_utils import direct_register_custom_op

from ftp_vllm import envs

logger = init_logger(f"vllm.{__name__}")  # under vLLM's logger, so its handlers print it


def _routed_layer_op(positions: Tensor, normed: Tensor, residual: Tensor, output: Tensor, layer_name: str) -> None:
    """A routed block for compiled graphs: its hidden states into the caller's `output`,
    `residual` updated in place.  Writing into buffers the graph allocated, as vLLM's own
    splitting ops do, keeps every tensor the next piece reads at an address fixed at
    capture: a piecewise CUDA graph replays at those addresses."""
    layer = get_forward_context().no_compile_layers[layer_name]
    hidden, updated = layer.routed_block(positions, normed, residual)
    output.copy_(hidden)
    if updated is not residual:
        residual.copy_(updated)


def _routed_layer_fake(positions: Tensor, normed: Tensor, residual: Tensor, output: Tensor, layer_name: str) -> None:
    return None


direct_register_custom_op("ftp_routed_layer", _routed_layer_op, mutates_args=["residual", "output"],
                          fake_impl=_routed_layer_fake)


def _block_scores_op(scores: Tensor, normed: Tensor, layer_name: str) -> None:
    """`RoutedDecoderLayer.record_scores` for the stock graph.  Declared as mutating `normed`
    (it does not), which the block reads next: the compiler drops an op whose outputs and
    mutations nothing reads (a mutated `scores` was dropped)."""
    get_forward_context().no_compile_layers[layer_name].record_scores(scores)


def _block_scores_fake(scores: Tensor, normed: Tensor, layer_name: str) -> None:
    return None


direct_register_custom_op("ftp_block_scores", _block_scores_op, mutates_args=["normed"], fake_impl=_block_scores_fake)


def keep_routing_out_of_graphs(compilation_config) -> None:
    """Piecewise compilation splits the graph at the routed-layer op, and CUDA graphs
    (fixed shapes) capture only the pieces between: a routed step's shapes depend on
    its data.  On CPUs vLLM compiles the whole graph and calls the op from it."""
    for op in ("vllm::ftp_routed_layer", "vllm::ftp_block_scores"):  # the latter reads the step's slots
        if compilation_config.splitting_ops is not None and op not in compilation_config.splitting_ops:
            compilation_config.splitting_ops.append(op)
    mode = compilation_config.cudagraph_mode
    if mode is not None and mode.has_full_cudagraphs():
        logger.info("FTP routing: CUDA graphs %s -> PIECEWISE (routed steps have data-dependent shapes)", mode.name)
        compilation_config.cudagraph_mode = CUDAGraphMode.PIECEWISE


@support_torch_compile(dynamic_arg_dims={"input_ids": {0: "b"}, "positions": {0: "b"},
                                         "intermediate_tensors": {0: "b"}, "inputs_embeds": {0: "b"}})
class StockGraph(nn.Module):
    """vLLM's compiled graph of the model as its routed blocks run in a step that routes
    nowhere: stock blocks, which record their tokens' scores where later tokens read them.  The model's layers read
    `tracing` while the compiler traces this module (a compiled graph never reads it)."""

    tracing = False

    def __init__(self, *, vllm_config, model: nn.Module, prefix: str = ""):
        super().__init__()
        self.model = model

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        return self.model.forward(input_ids, positions, intermediate_tensors, inputs_embeds)

    def run(self, *args):
        StockGraph.tracing = True
        try:
            return self(*args)
        finally:
            StockGraph.tracing = False


def compile_parts(layer: nn.Module, inductor_options: dict) -> None:
    """vLLM's compiler sees the routed op as opaque: compile the stock parts it calls
    (`layer.compiled_parts`) on their own, with vLLM's inductor settings, as vLLM does for
    its layers called from opaque ops, so that their norms and activations fuse as in the
    stock compiled layers.  A step that keeps every token runs the whole block
    (`stock_block`) as one compiled piece.

    On CPUs the routed op also runs its MLP on at most `layer.mlp_chunk` tokens at a time.
    The stock graph reuses one set of buffers across its layers; a compiled piece allocates
    its own at every call, and a buffer above glibc's largest mmap threshold (32 MiB: the
    MLP's gate/up output of 4,096 float32 tokens of SmolLM2 is 48 MiB) is mapped afresh each
    time and its pages faulted in.  Pieces below the threshold come back from the heap."""
    from vllm.platforms import current_platform

    for name in layer.compiled_parts:
        setattr(layer, name, compile_tokenwise(getattr(layer, name), inductor_options))
    if envs.FTP_VLLM_MLP_CHUNK is not None:  # tests: chunks of a tiny model's steps
        layer.mlp_chunk = envs.FTP_VLLM_MLP_CHUNK
    elif current_platform.is_cpu():
        gate_up = getattr(layer.mlp.gate_up_proj, "weight", None)
        row_bytes = len(gate_up) * gate_up.element_size() if gate_up is not None else 16384
        layer.mlp_chunk = max(64, (24 << 20) // row_bytes)


def compile_tokenwise(fn, inductor_options: dict):
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
