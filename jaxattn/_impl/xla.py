"""The materialized implementation: (T, S) logits, masked softmax, one matmul.

It is the readable reference among the JAX implementations and the fastest
for small problems. Memory is O(B N T S). Forward-mode autodiff works here.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jaxattn._impl import common


def _grouped(x, K, G):
  """(B|1, N|1, T|1, S|1) -> (B|1, K|1, G|1, T|1, S|1), no copy."""
  b, n, t, s = x.shape
  if n == 1:
    return x[:, :, None]
  return x.reshape(b, K, G, t, s)


def xla_attention(inputs: common.AttentionInputs, config: common.AttentionConfig):
  """Returns (output (B, T, N, Hv) in query dtype, lse (B, T, N) float32 or wider)."""
  q, k, v = inputs.query, inputs.key, inputs.value
  acc = common.stat_dtype(q.dtype)
  B, T, N, H = q.shape
  _, S, K, Hv = v.shape
  G = N // K
  # Fold the G query heads of each key/value head into matmul rows: a 4D
  # batched matmul is much faster on CPU than a 5D einsum, and K/V stay as is.
  rows = q.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)
  logits = jnp.einsum("bkrh,bskh->bkrs", rows, k,
                      preferred_element_type=acc).reshape(B, K, G, T, S)
  logits = logits * jnp.asarray(config.scale, acc)
  # Index arrays in the (B, K, G, T, S) layout; the head index is k * G + g.
  b = jnp.arange(B).reshape(B, 1, 1, 1, 1)
  h = (jnp.arange(K)[:, None] * G + jnp.arange(G)[None, :]).reshape(1, K, G, 1, 1)
  qi = jnp.arange(T).reshape(1, 1, 1, T, 1)
  ki = jnp.arange(S).reshape(1, 1, 1, 1, S)
  score_fn = common.combined_score(inputs, config)
  if score_fn is not None:
    logits = score_fn(logits, b, h, qi, ki)
  if inputs.bias is not None:
    logits = logits + _grouped(inputs.bias, K, G).astype(acc)

  mask_fn = common.combined_mask(inputs, config)
  mask = None if mask_fn is None else mask_fn(b, h, qi, ki)
  if inputs.mask is not None:
    user = _grouped(inputs.mask, K, G)
    mask = user if mask is None else mask & user
  if mask is not None:
    logits = jnp.where(mask, logits, -jnp.inf)

  # Probabilities are exp(logits - max) / sum, not exp(logits - lse): lse is
  # rounded at the logits' magnitude (1e-3 at |logits| ~ 1e4 in float32) and
  # that error would scale every probability. A row with nothing to attend has
  # max -inf (shifted by 0 instead), sum 0, probabilities 0 and lse -inf.
  m = jnp.max(logits, axis=-1, keepdims=True)
  m = lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  e = jnp.exp(logits - m)
  total = jnp.sum(e, axis=-1, keepdims=True)
  empty = total == 0  # not `~live`: a NaN row keeps its NaN output, as in jax.nn
  live = total > 0
  total = jnp.where(live, total, 1.0)
  probs = e / total
  lse = jnp.where(live, m + jnp.log(total), -jnp.inf)[..., 0]

  if config.dropout_rate > 0.0:
    keep = common.dropout_keep(inputs.dropout_key, config.dropout_rate, b, h, qi, ki)
    probs = jnp.where(keep, probs / (1.0 - config.dropout_rate), 0.0)

  out = jnp.einsum("bkrs,bskh->bkrh", probs.astype(v.dtype).reshape(B, K, G * T, S), v,
                   preferred_element_type=acc)
  # Rows that attended nothing are already 0; the select zeroes their
  # cotangent too, since 0 * NaN garbage there would otherwise reach dV.
  out = jnp.where(empty, 0.0, out.reshape(B, K, G, T, Hv))
  out = out.transpose(0, 3, 1, 2, 4).reshape(B, T, N, Hv).astype(q.dtype)
  lse = jnp.transpose(lse, (0, 3, 1, 2)).reshape(B, T, N)
  return out, lse
