"""The materialized implementation: (T, S) logits, masked softmax, one matmul.

It is the readable reference among the JAX implementations and the fastest
for small problems. Memory is O(B N T S). Forward-mode autodiff works here.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxattn._impl import common
from jaxattn.softmax import logsumexp as _logsumexp


def _grouped(x, K, G):
  """(B|1, N|1, T|1, S|1) -> (B|1, K|1, G|1, T|1, S|1), no copy."""
  b, n, t, s = x.shape
  if n == 1:
    return x[:, :, None]
  return x.reshape(b, K, G, t, s)


def xla_attention(inputs: common.AttentionInputs, config: common.AttentionConfig):
  """Returns (output (B, T, N, Hv) in query dtype, lse (B, T, N) float32)."""
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
  # Index arrays in the (B, K, G, T, S) layout; the head index is k * G + g.
  b = jnp.arange(B).reshape(B, 1, 1, 1, 1)
  h = (jnp.arange(K)[:, None] * G + jnp.arange(G)[None, :]).reshape(1, K, G, 1, 1)
  qi = jnp.arange(T).reshape(1, 1, 1, T, 1)
  ki = jnp.arange(S).reshape(1, 1, 1, 1, S)
  score_fn = common.combined_score(inputs, config)
  if score_fn is not None:
    logits = score_fn(logits, b, h, qi, ki)
  if inputs.bias is not None:
    logits = logits + _grouped(inputs.bias, K, G).astype(jnp.float32)

  mask_fn = common.combined_mask(inputs, config)
  mask = None if mask_fn is None else mask_fn(b, h, qi, ki)
  if inputs.mask is not None:
    user = _grouped(inputs.mask, K, G)
    mask = user if mask is None else mask & user
  if mask is not None:
    logits = jnp.where(mask, logits, -jnp.inf)

  # One pass for the statistics; a row with nothing to attend has lse -inf and
  # probabilities exp(-inf - 0) = 0.
  lse = _logsumexp(logits, axis=-1)
  lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
  probs = jnp.exp(logits - lse_safe[..., None])

  if config.dropout_rate > 0.0:
    keep = common.dropout_keep(inputs.dropout_key, config.dropout_rate, b, h, qi, ki)
    probs = jnp.where(keep, probs / (1.0 - config.dropout_rate), 0.0)

  out = jnp.einsum("bkrs,bskh->bkrh", probs.astype(v.dtype).reshape(B, K, G * T, S), v,
                   precision=common.dot_precision(v.dtype),
                   preferred_element_type=jnp.float32)
  out = out.reshape(B, K, G, T, Hv).transpose(0, 3, 1, 2, 4).reshape(B, T, N, Hv).astype(q.dtype)
  lse = jnp.transpose(lse, (0, 3, 1, 2)).reshape(B, T, N)
  return out, lse
