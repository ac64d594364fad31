"""genie's models: the shared ST transformer, the vector quantizer and the three Genie models.

Importing this package registers the models with transformers' ``AutoConfig`` / ``AutoModel``.
"""

from genie.models.blocks import KVCache, STBlock, STTransformer, STTransformerConfig
from genie.models.hub import GeniePreTrainedModel, model_fields, register_auto
from genie.models.quantizer import QuantizerOutput, VectorQuantizer
from genie.models.tokenizer import TokenizerConfig, TokenizerOutput, VideoTokenizer

register_auto(TokenizerConfig, VideoTokenizer)

__all__ = [
    "GeniePreTrainedModel",
    "KVCache",
    "QuantizerOutput",
    "STBlock",
    "STTransformer",
    "STTransformerConfig",
    "TokenizerConfig",
    "TokenizerOutput",
    "VectorQuantizer",
    "VideoTokenizer",
    "model_fields",
    "register_auto",
]
