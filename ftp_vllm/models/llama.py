"""FTPLlamaForCausalLM: vLLM's Llama with routed decoder layers."""

from vllm.config import VllmConfig
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM

from .routed import FTPModelMixin, RoutedDecoderLayer


class FTPLlamaDecoderLayer(RoutedDecoderLayer, LlamaDecoderLayer):
    pass


class FTPLlamaForCausalLM(FTPModelMixin, LlamaForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", layer_type=FTPLlamaDecoderLayer):
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)
        self._init_routing(vllm_config)
