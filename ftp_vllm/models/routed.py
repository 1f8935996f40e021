"""The one decoder-layer forward shared by every FTP model class.

Llama-family layers (Llama, Qwen2) name their parts alike: `input_layernorm`,
`self_attn`, `post_attention_layernorm`, `mlp`.  An FTP layer is the stock
layer plus one routing step between the input norm and attention; the stock
layer's submodules, weights and loaders are used as they are.
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.model_executor.models.utils import extract_layer_index


class RoutedDecoderLayer(nn.Module):
    """Mixin placed before a vLLM decoder layer class in the bases."""

    def __init__(self, *args, prefix: str = "", **kwargs):
        super().__init__(*args, prefix=prefix, **kwargs)
        self.layer_idx = extract_layer_index(prefix)

    def keep_mask(self, positions: torch.Tensor, normed: torch.Tensor) -> torch.Tensor | None:
        """Which tokens of this step run the block; None keeps every token.

        Without a router every token is kept, which makes the layer compute
        exactly what the stock layer computes.
        """
        return None

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        keep = self.keep_mask(positions, hidden_states)
        if keep is not None:
            raise NotImplementedError("token skipping needs a router; none is loaded")
        hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        hidden_states = self.mlp(hidden_states)
        return hidden_states, residual
