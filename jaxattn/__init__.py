"""jaxattn: attention for JAX, exact, stable and fast on every backend."""

from jaxattn.attention import dot_product_attention, implementations
from jaxattn.layers import SelfAttentionParams, init_self_attention, self_attention
from jaxattn.softmax import log_softmax, logsumexp, softmax

__version__ = "0.1.0"

__all__ = [
    "SelfAttentionParams",
    "dot_product_attention",
    "implementations",
    "init_self_attention",
    "log_softmax",
    "logsumexp",
    "self_attention",
    "softmax",
]
