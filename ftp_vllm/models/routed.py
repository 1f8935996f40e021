"""Routed decoder layers for vLLM: the stock layer plus one routing step.

Llama-family layers (Llama, Qwen2) name their parts alike: `input_layernorm`,
`self_attn` (qkv_proj, rotary_emb, attn, o_proj), `post_attention_layernorm`,
`mlp`.  A routed layer reuses them and adds, between the input norm and
attention, the router's decision for every token of the scheduler step
(`ftp_vllm.models.routing`):

* every token runs the input norm and the K/V projections, and its K/V go to
  the paged cache at its own slot, so later tokens attend to it;
* a kept token runs attention, the output projection and the MLP;
* a skipped token's hidden state passes through unchanged.

Two paths compute the same thing (same keep masks; `FTP_VLLM_PATH=simple`
picks the first):

* simple: the stock attention call for every token, then the output
  projection and MLP gathered to kept tokens;
* fast (default): the K/V projection for every token and its cache write,
  the query projection, attention, output projection and MLP for kept tokens
  only (attention at the kept queries' own positions, `ftp_vllm.kernels.backends`).
  Routed blocks get the query and K/V projections as separate layers, split
  from the fused one after loading.

"Stock" below means the block computed as vLLM's own layer does, for every
token: on warm-up steps, and in steps where the block keeps every token.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from vllm.config import CompilationMode
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.logger import init_logger
from vllm.model_executor.layers.attention.attention import unified_kv_cache_update
from vllm.model_executor.layers.linear import UnquantizedLinearMethod
from vllm.model_executor.models.utils import extract_layer_index

from ftp_vllm.kernels.backends import kept_attention
from ftp_vllm.models.compiled import StockGraph, compile_parts, keep_routing_out_of_graphs
from ftp_vllm.models.routing import RoutingState
from ftp_vllm.models.step import StepPrompts, install_step_source, refuse_unroutable, v2_model_state_cls
from ftp_vllm.router import hidden_scores

logger = init_logger(f"vllm.{__name__}")  # under vLLM's logger, so its handlers print it


class RoutedDecoderLayer(nn.Module):
    """Mixin placed before a vLLM decoder layer class in the bases."""

    # the stock parts a routed step calls; compiled on their own in compiled mode (`compile_parts`)
    compiled_parts = ("stock_block", "stock_attention", "mlp_part", "post_norm", "kept_query", "rotary_keys")

    def __init__(self, *args, prefix: str = "", **kwargs):
        super().__init__(*args, prefix=prefix, **kwargs)
        self.layer_idx = extract_layer_index(prefix)
        self.prefix = prefix
        self.mlp_chunk: int | None = None  # tokens per MLP call in routed steps (`compile_parts`)
        self.routing: tuple[RoutingState] | tuple = ()  # set where the block routes; a tuple: not a submodule
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
        if self.routing:
            return self.route(positions, hidden_states, residual)
        hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        hidden_states = self.mlp(hidden_states)
        return hidden_states, residual

    def route(self, positions: Tensor, normed: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        """The routing step: everything after the input norm of a routed block."""
        if StockGraph.tracing:  # a step that routes nowhere: the stock block, scores recorded if read later
            if self.routing[0].records_scores:
                scores = hidden_scores(normed, self.score_weight, self.score_bias)
                torch.ops.vllm.ftp_block_scores(scores, normed, self.prefix)
            return self.stock_block(positions, normed, residual)
        if torch.compiler.is_compiling():  # data-dependent shapes: opaque to the compiler
            output = torch.empty_like(normed)
            torch.ops.vllm.ftp_routed_layer(positions, normed, residual, output, self.prefix)
            return output, residual
        return self.routed_block(positions, normed, residual)

    def routed_block(self, positions: Tensor, normed: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        """Decide which of the step's tokens the block keeps, then compute it for those."""
        state = self.routing[0]
        if state.step is None:  # warm-up
            return self.stock_block(positions, normed, residual)
        block, num_tokens = self.layer_idx, state.step.num_tokens
        qkv = self._qkv_for_key_scores(state, normed)
        keys = self._keys(qkv, num_tokens)
        if not state.routes(block):  # nothing to decide: scores recorded where later tokens read them
            scores = state.scores(block, normed, keys) if state.records_scores or state.routes_step else None
            state.keep_all(block, scores, self._num_slots())
            return self._stock_block_from(positions, normed, qkv, residual)
        keep = torch.zeros(len(normed), dtype=torch.bool, device=normed.device)
        keep[:num_tokens] = state.decide(block, normed, keys, positions[:num_tokens], self._num_slots())
        kept = keep.nonzero().squeeze(1)
        if len(kept) == len(normed):  # nothing skipped
            return self._stock_block_from(positions, normed, qkv, residual)
        return self._kept_block(state, positions, normed, qkv, residual, kept)

    def record_scores(self, scores: Tensor) -> None:
        """The stock graph's block keeps every token and records their scores."""
        state = self.routing[0]
        if state.step is not None:  # not a warm-up step
            state.keep_all(self.layer_idx, scores, self._num_slots())

    def _kept_block(self, state: RoutingState, positions: Tensor, normed: Tensor, qkv: Tensor | None,
                    residual: Tensor, kept: Tensor) -> tuple[Tensor, Tensor]:
        """Attention, output projection and MLP of the `kept` tokens; every token's K/V to the cache."""
        attn = self.self_attn
        kernel = kept_attention(attn.attn) if state.fast and getattr(attn, "kv_proj", None) is not None else None
        if kernel is None:  # simple path
            qkv = attn.qkv_proj(normed)[0] if qkv is None else qkv
            q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
            q, k = attn.rotary_emb(positions, q, k)
            attn_out = attn.attn(q, k, v)[kept]  # every token: its K/V must reach the cache
        else:
            k, v = attn.kv_proj(normed)[0].split([attn.kv_size, attn.kv_size], dim=-1)
            k = self.rotary_keys(positions, k)
            unified_kv_cache_update(k.view(-1, attn.num_kv_heads, attn.head_dim),
                                    v.view(-1, attn.num_kv_heads, attn.head_dim), attn.attn.layer_name)
            if len(kept) == 0:  # every token skips: only the cache write
                return torch.zeros_like(normed), residual
            q = self.kept_query(positions, normed, kept)
            step = state.step
            attn_out = kernel(attn.attn, q.view(len(kept), attn.num_heads, attn.head_dim), kept,
                              step.requests[kept], positions[kept], step.block_table)
        return self._kept_mlp(attn.o_proj(attn_out.reshape(len(kept), -1))[0], residual, kept)

    def _kept_mlp(self, attn_out: Tensor, residual: Tensor, kept: Tensor) -> tuple[Tensor, Tensor]:
        """Residual add, post-attention norm and MLP of the kept tokens, from their attention
        output [N, hidden]; `residual` is updated in place at their rows.  A skipped token's
        residual stays as it is and it adds zero: nothing of the block touches its row."""
        if not len(kept):
            return torch.zeros_like(residual), residual
        normed, kept_residual = self.post_norm(attn_out, residual[kept])
        residual[kept] = kept_residual
        out = torch.zeros_like(residual)
        for rows, part in zip(self._mlp_pieces(kept), self._mlp_pieces(normed)):
            out[rows] = self.mlp_part(part)
        return out, residual

    def _stock_block_from(self, positions: Tensor, normed: Tensor, qkv: Tensor | None, residual: Tensor):
        """The stock block: compiled as one piece, or from a fused projection already
        computed for key scores, or with its MLP in pieces."""
        if qkv is not None:
            return self._stock_block_from_qkv(positions, qkv, residual)
        if self.mlp_chunk is None or len(normed) <= self.mlp_chunk:
            return self.stock_block(positions, normed, residual)
        hidden, residual = self.stock_attention(positions, normed, residual)
        return torch.cat([self.mlp_part(part) for part in self._mlp_pieces(hidden)]), residual

    def _stock_block_from_qkv(self, positions: Tensor, qkv: Tensor, residual: Tensor):
        """The stock block from the fused projection of every token."""
        attn = self.self_attn
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q, k = attn.rotary_emb(positions, q, k)
        hidden, residual = self.post_attention_layernorm(attn.o_proj(attn.attn(q, k, v))[0], residual)
        return self.mlp(hidden), residual

    def _qkv_for_key_scores(self, state: RoutingState, normed: Tensor) -> Tensor | None:
        """The fused projection, computed before the decision only for a router that scores
        keys (quantized weights); one that scores hidden states decides before any projection."""
        return None if state.score_weight is not None else self.self_attn.qkv_proj(normed)[0]

    def _keys(self, qkv: Tensor | None, num_tokens: int) -> Tensor | None:
        """Pre-rotary keys [T, KV, d] of the step's tokens from `_qkv_for_key_scores`' projection."""
        if qkv is None:
            return None
        attn = self.self_attn
        k = qkv[:num_tokens, attn.q_size:attn.q_size + attn.kv_size]
        return k.reshape(num_tokens, attn.num_kv_heads, attn.head_dim)

    def _num_slots(self) -> int:
        attn = self.self_attn
        return attn.attn.kv_cache.numel() // (2 * attn.num_kv_heads * attn.head_dim)

    def _mlp_pieces(self, tokens: Tensor) -> tuple[Tensor, ...]:
        """`tokens` (hidden states or token indices) in the pieces the routed op runs the MLP on."""
        return (tokens,) if self.mlp_chunk is None else tokens.split(self.mlp_chunk)

    # the compiled parts: each called from one place, with tensors made the same way

    def stock_block(self, positions: Tensor, normed: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        hidden_states, residual = self.stock_attention(positions, normed, residual)
        return self.mlp(hidden_states), residual

    def stock_attention(self, positions: Tensor, normed: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        """Attention for every token, residual add and post-attention norm."""
        hidden_states = self.self_attn(positions=positions, hidden_states=normed)
        return self.post_attention_layernorm(hidden_states, residual)

    def mlp_part(self, hidden_states: Tensor) -> Tensor:
        return self.mlp(hidden_states)

    def post_norm(self, attn_out: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        return self.post_attention_layernorm(attn_out, residual)

    def kept_query(self, positions: Tensor, normed: Tensor, kept: Tensor) -> Tensor:
        attn = self.self_attn
        return attn.rotary_emb(positions[kept], attn.q_proj(normed[kept])[0], None)[0]

    def rotary_keys(self, positions: Tensor, k: Tensor) -> Tensor:
        return self.self_attn.rotary_emb(positions, k, None)[0]

    # set-up

    def attach(self, state: RoutingState, compilation_config) -> None:
        """Route this block with `state`.  The compiled graphs' ops find the layer by its
        prefix in vLLM's forward context, as vLLM's own opaque ops find theirs."""
        self.routing = (state,)
        layers = compilation_config.static_forward_context
        if self.prefix in layers:
            raise ValueError(f"Duplicate layer name: {self.prefix}")
        layers[self.prefix] = self

    def finish_loading(self) -> None:
        """Fold the key projection into the router's score, then split the fused projection."""
        state = self.routing[0]
        state.fold_scores(self.layer_idx, self.self_attn)
        if state.score_weight is not None:
            self.score_weight = state.score_weight[self.layer_idx]
            self.score_bias = state.score_bias[self.layer_idx]
        split_qkv(self.self_attn)


def split_qkv(attn: nn.Module) -> None:
    """Give a routed block separate query and K/V projections (the fused one stays for
    stock steps): a skipped token must not pay for its query.  Called after the
    weights are loaded and before vLLM's post-load processing packs them."""
    from vllm.model_executor.layers.linear import ReplicatedLinear

    fused = attn.qkv_proj
    if not isinstance(fused.quant_method, UnquantizedLinearMethod):
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


def load_router(path: str, num_layers: int, level: float | None = None):
    """The router checkpoint at `path` as a ladder of operating points (`ftp_vllm.ladder`),
    requests naming no level served at `level` (default: the checkpoint's), and its config;
    under tensor parallelism, with this rank's KV heads of its mean queries."""
    from ftp_vllm.checkpoint import load_ladder

    default_dtype = torch.get_default_dtype()  # vLLM builds models under the serving dtype
    torch.set_default_dtype(torch.float32)
    try:
        ladder, config = load_ladder(path)
    finally:
        torch.set_default_dtype(default_dtype)
    ladder.set_default(level)
    router = ladder.router
    if router.num_blocks != num_layers:
        raise ValueError(f"router {path} has {router.num_blocks} blocks, the model {num_layers}")
    tp = get_tensor_model_parallel_world_size()
    kv_heads = router.mean_query.shape[1]
    if tp > 1:
        if kv_heads % tp:
            raise ValueError(f"FTP routing needs the {kv_heads} KV heads split evenly over {tp} ranks")
        per_rank = kv_heads // tp
        rank = get_tensor_model_parallel_rank()
        for rung in ladder.rungs:
            rung.mean_query = rung.mean_query[:, rank * per_rank:(rank + 1) * per_rank].contiguous()
    return ladder, config


def attach_routing(model: nn.Module, vllm_config) -> RoutingState | None:
    """Load the router named in the HF config (`ftp_router`, set by `--ftp-router` or
    `hf_overrides`; `ftp_sparsity`, the level of requests that name none) and hand it to every
    decoder layer it routes; None leaves the model stock."""
    hf_config = vllm_config.model_config.hf_config
    path = getattr(hf_config, "ftp_router", None)
    if not path:
        return None
    refuse_unroutable(vllm_config, [layer.self_attn.attn for layer in model.model.layers
                                    if isinstance(layer, RoutedDecoderLayer)])
    ladder, config = load_router(path, hf_config.num_hidden_layers, getattr(hf_config, "ftp_sparsity", None))
    state = RoutingState(ladder, config, vllm_config.cache_config.block_size)
    compilation = vllm_config.compilation_config
    compiled = compilation.mode != CompilationMode.NONE and compilation.backend != "eager"
    for layer in model.model.layers:
        if isinstance(layer, RoutedDecoderLayer) and not ladder.is_dense(layer.layer_idx):
            layer.attach(state, compilation)
            if compiled:
                compile_parts(layer, compilation.inductor_compile_config)
    keep_routing_out_of_graphs(compilation)
    install_step_source(vllm_config)
    StepPrompts.rung_of = ladder.rung_of
    logger.info("FTP router %s: levels %s, default %s", path, ladder.levels, ladder.default)
    return state


class FTPModelMixin:
    """Adds routing to a vLLM *ForCausalLM: call `_init_routing` at the end of __init__."""

    def _init_routing(self, vllm_config) -> None:
        from vllm.compilation.backends import set_model_tag

        self.ftp = attach_routing(self, vllm_config)
        self.stock_graph: tuple[StockGraph] | tuple = ()  # a tuple: the model's modules are registered once
        mode = vllm_config.compilation_config.mode
        compiles = mode not in (CompilationMode.NONE, CompilationMode.STOCK_TORCH_COMPILE)
        if self.ftp is not None and compiles:  # as `support_torch_compile` decides
            with set_model_tag("ftp_stock_graph"):  # its own compile cache
                self.stock_graph = (StockGraph(vllm_config=vllm_config, model=self.model),)

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

    @staticmethod
    def get_model_state_cls() -> type:
        """vLLM's V2 model runner asks the model for its state class: ours feeds routing the
        step's prompt lengths (`ftp_vllm.models.step`)."""
        return v2_model_state_cls()

    def load_weights(self, weights):
        loaded = super().load_weights(weights)
        if self.ftp is not None:  # loaded with the model from its own checkpoint
            loaded |= {name for name, _ in self.named_parameters() if name.startswith("ftp.")}
            for layer in self.model.layers:
                if isinstance(layer, RoutedDecoderLayer) and layer.routing:
                    layer.finish_loading()
        return loaded
