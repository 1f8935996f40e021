"""FTPQwen2ForCausalLM: vLLM's Qwen2 with routed decoder layers."""

from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer, Qwen2ForCausalLM, Qwen2Model
from vllm.model_executor.models.utils import PPMissingLayer, maybe_prefix

from .routed import FTPModelMixin, RoutedDecoderLayer


class FTPQwen2DecoderLayer(RoutedDecoderLayer, Qwen2DecoderLayer):
    pass


class FTPQwen2ForCausalLM(FTPModelMixin, Qwen2ForCausalLM):
    # The stock __init__ builds Qwen2Model with its own layer type and takes no
    # override, so this one builds the same parts with the routed layer instead.
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        nn.Module.__init__(self)
        config = vllm_config.model_config.hf_config.get_text_config()
        self.config = config
        self.quant_config = vllm_config.quant_config
        self.model = Qwen2Model(
            vllm_config=vllm_config,
            prefix=maybe_prefix(prefix, "model"),
            decoder_layer_type=FTPQwen2DecoderLayer,
        )
        if get_pp_group().is_last_rank:
            self.lm_head = ParallelLMHead(
                config.vocab_size,
                config.hidden_size,
                quant_config=self.quant_config,
                prefix=maybe_prefix(prefix, "lm_head"),
            )
            if config.tie_word_embeddings:
                self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        else:
            self.lm_head = PPMissingLayer()
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors
        self._init_routing(vllm_config)
