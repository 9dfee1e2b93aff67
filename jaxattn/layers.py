"""Attention layers as pure functions over NamedTuple parameter pytrees."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxattn import attention as _attention
from jaxattn import softmax as _softmax


class SelfAttentionParams(NamedTuple):
  """Projections of single-head self-attention: w_q, w_k (D, d_k), w_v (D, d_v)."""
  w_q: jax.Array
  w_k: jax.Array
  w_v: jax.Array


def init_self_attention(key, d_model: int, d_k: int, d_v: int | None = None,
                        dtype=jnp.float32) -> SelfAttentionParams:
  """Initializes projections with variance-scaling normal(0, 1/D) entries.

  Args:
    key: a `jax.random.key`.
    d_model: input width D.
    d_k: query/key width.
    d_v: value width, default d_k.
    dtype: parameter dtype.

  Returns:
    SelfAttentionParams with w_q, w_k of shape (D, d_k) and w_v (D, d_v).
  """
  d_v = d_k if d_v is None else d_v
  kq, kk, kv = jax.random.split(key, 3)
  std = 1.0 / jnp.sqrt(d_model)
  return SelfAttentionParams(
      w_q=(jax.random.normal(kq, (d_model, d_k)) * std).astype(dtype),
      w_k=(jax.random.normal(kk, (d_model, d_k)) * std).astype(dtype),
      w_v=(jax.random.normal(kv, (d_model, d_v)) * std).astype(dtype))


def self_attention(params: SelfAttentionParams, x, *, mask=None,
                   is_causal: bool = False, return_weights: bool = False):
  r"""Single-head self-attention on one sequence: the seed notebook's layer.

  .. math:: Q = xW_q,\ K = xW_k,\ V = xW_v,\quad
     \mathrm{softmax}(QK^T / \sqrt{d_k})\,V

  Batch it with `jax.vmap(self_attention, in_axes=(None, 0))`.

  Args:
    params: SelfAttentionParams.
    x: (T, D) inputs.
    mask: optional boolean (T, T), True = attend.
    is_causal: mask future positions.
    return_weights: also return the (T, T) attention weights.

  Returns:
    (T, d_v) output, and the weights if asked.
  """
  x = jnp.asarray(x)
  fn = "self_attention"
  D = params.w_q.shape[0]
  if x.ndim != 2 or x.shape[1] != D:
    raise ValueError(f"{fn}: x must have shape (T, D) with D = {D} from params.w_q "
                     f"{tuple(params.w_q.shape)}; got {tuple(x.shape)}. Use jax.vmap for batches.")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(params.w_q.dtype)
  T = x.shape[0]
  if mask is not None:
    mask = jnp.asarray(mask)
    if mask.shape != (T, T) or mask.dtype != jnp.bool_:
      raise ValueError(f"{fn}: mask must be boolean with shape (T, T) = ({T}, {T}); "
                       f"got {mask.dtype} {tuple(mask.shape)}.")
  q, k, v = x @ params.w_q, x @ params.w_k, x @ params.w_v
  if not return_weights:
    return _attention.dot_product_attention(
        q[:, None], k[:, None], v[:, None],
        mask=None if mask is None else mask[None], is_causal=is_causal)[:, 0]
  scores = (q @ k.T) / jnp.sqrt(jnp.asarray(q.shape[-1], q.dtype))
  where = jnp.ones((T, T), bool) if mask is None else mask
  if is_causal:
    where = where & jnp.tril(jnp.ones((T, T), bool))
  weights = _softmax.softmax(scores, axis=-1, where=where)
  return weights @ v, weights
