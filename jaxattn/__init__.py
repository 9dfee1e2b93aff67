"""jaxattn: attention for JAX, exact, stable and fast on every backend."""

from jaxattn.attention import dot_product_attention, implementations
from jaxattn.decode import (
    KVCache,
    PagedKVCache,
    decode_attention,
    init_kv_cache,
    init_paged_kv_cache,
    update_kv_cache,
)
from jaxattn.layers import (
    MultiHeadParams,
    SelfAttentionParams,
    init_multi_head_attention,
    init_self_attention,
    multi_head_attention,
    multi_head_attention_decode,
    self_attention,
)
from jaxattn.parallel import (
    from_balanced_layout,
    layout_positions,
    ring_attention,
    sharded_ring_attention,
    to_balanced_layout,
)
from jaxattn.rope import RopeConfig, apply_rope, rope_frequencies
from jaxattn.softmax import log_softmax, logsumexp, softmax
from jaxattn.tuning import tune

__version__ = "0.1.0"

__all__ = [
    "KVCache",
    "PagedKVCache",
    "decode_attention",
    "init_kv_cache",
    "init_paged_kv_cache",
    "multi_head_attention_decode",
    "update_kv_cache",
    "MultiHeadParams",
    "RopeConfig",
    "SelfAttentionParams",
    "apply_rope",
    "from_balanced_layout",
    "layout_positions",
    "ring_attention",
    "sharded_ring_attention",
    "to_balanced_layout",
    "dot_product_attention",
    "implementations",
    "init_multi_head_attention",
    "init_self_attention",
    "log_softmax",
    "logsumexp",
    "multi_head_attention",
    "rope_frequencies",
    "self_attention",
    "softmax",
    "tune",
]
