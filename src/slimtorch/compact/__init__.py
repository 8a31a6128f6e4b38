"""Compaction: turn masks into a really smaller model (the "speedup" of NNI) that computes the same thing."""

from slimtorch.compact.compact import COMPACTION_ATTR, compact_, replay_
from slimtorch.compact.layers import SlimMultiheadAttention, ZeroPaddedLayerNorm
from slimtorch.compact.plan import CompactionPlan, plan_compaction
from slimtorch.compact.surgery import (
    register_shrink,
    shrink_batchnorm_,
    shrink_conv_,
    shrink_embedding_,
    shrink_groupnorm_,
    shrink_layernorm_,
    shrink_linear_,
    shrink_multihead_attention_,
    shrink_prelu_,
    shrink_recurrent_,
    shrink_tensors_,
)

__all__ = [
    "COMPACTION_ATTR",
    "CompactionPlan",
    "SlimMultiheadAttention",
    "ZeroPaddedLayerNorm",
    "compact_",
    "plan_compaction",
    "register_shrink",
    "replay_",
    "shrink_batchnorm_",
    "shrink_conv_",
    "shrink_embedding_",
    "shrink_groupnorm_",
    "shrink_layernorm_",
    "shrink_linear_",
    "shrink_multihead_attention_",
    "shrink_prelu_",
    "shrink_recurrent_",
    "shrink_tensors_",
]
