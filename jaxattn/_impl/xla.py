"""The materialized implementation: (T, S) logits, masked softmax, one matmul.

It is the readable reference among the JAX implementations and the fastest
for small problems. Memory is O(B N T S).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxattn.softmax import logsumexp as _logsumexp, softmax as _softmax
from jaxattn._impl import common


def _grouped(x, K, G):
  """(B|1, N|1, T|1, S|1) -> (B|1, K|1, G|1, T|1, S|1), no copy."""
  if x is None:
    return None
  b, n, t, s = x.shape
  if n == 1:
    return x[:, :, None]
  return x.reshape(b, K, G, t, s)


def xla_attention(inputs: common.AttentionInputs, config: common.AttentionConfig):
  """Returns (output (B, T, N, H) in query dtype, lse (B, T, N) float32)."""
  q, k, v = inputs.query, inputs.key, inputs.value
  B, T, N, H = q.shape
  _, S, K, Hv = v.shape
  G = N // K
  # Fold the G query heads of each key/value head into matmul rows: a 4D
  # batched matmul is much faster on CPU than a 5D einsum, and K/V stay as is.
  rows = q.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)
  logits = jnp.einsum("bkrh,bskh->bkrs", rows, k,
                      precision=common.dot_precision(q.dtype),
                      preferred_element_type=jnp.float32).reshape(B, K, G, T, S)
  logits = logits * jnp.float32(config.scale)
  logits = common.soft_cap(logits, config.logits_soft_cap)
  if inputs.bias is not None:
    logits = logits + _grouped(inputs.bias, K, G).astype(jnp.float32)

  mask = common.tile_mask(inputs, config, jnp.arange(T), jnp.arange(S),
                          inputs.mask)
  if mask is not None:
    mask = jnp.broadcast_to(_grouped(mask, K, G), logits.shape)

  probs = _softmax(logits, axis=-1, where=mask)
  lse = _logsumexp(logits, axis=-1, where=mask)

  if config.dropout_rate > 0.0:
    b = jnp.arange(B)[:, None, None, None, None]
    n = (jnp.arange(K)[:, None] * G + jnp.arange(G)[None, :])[None, :, :, None, None]
    keep = common.dropout_keep(inputs.dropout_key, config.dropout_rate, b, n,
                               jnp.arange(T)[None, None, None, :, None],
                               jnp.arange(S)[None, None, None, None, :])
    probs = jnp.where(keep, probs / (1.0 - config.dropout_rate), 0.0)

  out = jnp.einsum("bkrs,bskh->bkrh", probs.astype(v.dtype).reshape(B, K, G * T, S), v,
                   precision=common.dot_precision(v.dtype),
                   preferred_element_type=jnp.float32)
  out = out.reshape(B, K, G, T, Hv).transpose(0, 3, 1, 2, 4).reshape(B, T, N, Hv).astype(q.dtype)
  lse = jnp.transpose(lse, (0, 3, 1, 2)).reshape(B, T, N)
  return out, lse
