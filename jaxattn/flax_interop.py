"""Moving flax attention over to jaxattn, with the same numbers.

- `from_flax_nnx(module)`: an `nnx.MultiHeadAttention`'s parameters as
  `MultiHeadParams`.
- `from_flax_linen(variables)`: a linen `MultiHeadDotProductAttention`'s
  parameters as `MultiHeadParams`.
- `attention_fn` / `make_attention_fn(...)`: an `attention_fn` for flax's own
  modules (`nnx.MultiHeadAttention(..., attention_fn=...)`,
  `nn.MultiHeadDotProductAttention(attention_fn=...)`) that runs
  `jaxattn.dot_product_attention`.

flax is optional: it is imported only inside the functions that need it.

Calls jaxattn cannot serve are handed to flax's own default attention (its
numbers and conventions): `sow_weights=True` (flax passes `module`; the user
asked for the weights, and flax's materialized path computes and sows them),
custom einsums (`qk_attn_weights_einsum`, `attn_weights_value_einsum`,
`einsum_dot_general`, e.g. AQT quantization) and complex dtypes (jaxattn's
softmax is real). dtypes follow flax: query, key and value are promoted
together (`promote_dtype`, or `jnp.result_type` and the `dtype` argument) and
the result has the promoted dtype.

Differences from flax's default `dot_product_attention` that the adapter
keeps: a query row with no key to attend to gives 0 (flax gives the mean of
V); dropout draws jaxattn's counter-based mask, independent per batch element
and head (`broadcast_dropout` is not honoured), so it matches flax's in
distribution, not bit for bit; `precision` is ignored (float32 products are
exact, half precision accumulates in float32).
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp

from jaxattn import attention as _attention
from jaxattn.layers import MultiHeadParams


def _array(v):
  """The array inside an nnx Variable (or the array itself)."""
  if hasattr(v, "get_value"):
    return jnp.asarray(v.get_value())
  if hasattr(v, "value"):
    return jnp.asarray(v.value)
  return jnp.asarray(v)


def from_flax_nnx(module) -> MultiHeadParams:
  """Converts an `nnx.MultiHeadAttention`'s parameters to `MultiHeadParams`.

  `multi_head_attention(params, x, context)` then equals `module(x, context)`
  (and `module(x)` for self-attention), with module options mapped as:
  `normalize_qk` -> the norm scales (qk_norm_type="layer_norm", epsilon 1e-6,
  the defaults), `dtype` -> `dtype=`, `dropout_rate` -> `dropout_rate=` with a
  `dropout_key`, `num_kv_heads` -> the shapes. A module built with
  `in_kv_features` different from its `in_features` gives cross-attention
  params (C != D).

  Args:
    module: an `nnx.MultiHeadAttention`.

  Returns:
    MultiHeadParams holding the module's arrays (no copies).

  Raises:
    TypeError: module is not an `nnx.MultiHeadAttention`.
    NotImplementedError: the module decodes with a cache (decode=True): use
      jaxattn's own decoding instead.
  """
  from flax import nnx  # optional dependency

  fn = "from_flax_nnx"
  if not isinstance(module, nnx.MultiHeadAttention):
    raise TypeError(f"{fn}: module must be a flax.nnx.MultiHeadAttention; got "
                    f"{type(module).__name__}.")
  if getattr(module, "decode", False):
    raise NotImplementedError(f"{fn}: modules built with decode=True keep a KV cache "
                              f"that MultiHeadParams does not hold.")

  def dense(layer):
    bias = getattr(layer, "bias", None)
    return _array(layer.kernel), (None if bias is None else _array(bias))

  wq, bq = dense(module.query)
  wk, bk = dense(module.key)
  wv, bv = dense(module.value)
  wo, bo = dense(module.out)
  qs = ks = None
  if module.normalize_qk:
    qs, ks = _array(module.query_ln.scale), _array(module.key_ln.scale)
  return MultiHeadParams(w_query=wq, w_key=wk, w_value=wv, w_out=wo,
                         b_query=bq, b_key=bk, b_value=bv, b_out=bo,
                         query_norm_scale=qs, key_norm_scale=ks)


def from_flax_linen(variables) -> MultiHeadParams:
  """Converts a linen `MultiHeadDotProductAttention`'s parameters.

  Args:
    variables: what `module.init(...)` returns (`{"params": {...}}`), or its
      "params" entry, with the submodules "query", "key", "value", "out"
      ({"kernel", optional "bias"}) and, with normalize_qk, "query_ln" and
      "key_ln" ({"scale"}).

  Returns:
    MultiHeadParams; `multi_head_attention(params, x, context)` equals
    `module.apply(variables, x, context)`.

  Raises:
    ValueError: a submodule or kernel is missing.
  """
  fn = "from_flax_linen"
  tree = variables.get("params", variables) if hasattr(variables, "get") else None
  if tree is None or not all(name in tree for name in ("query", "key", "value", "out")):
    have = sorted(tree) if tree is not None else type(variables).__name__
    raise ValueError(f"{fn}: variables must hold the submodules 'query', 'key', 'value' "
                     f"and 'out' (directly or under 'params'); got {have}.")

  def dense(name):
    sub = tree[name]
    if "kernel" not in sub:
      raise ValueError(f"{fn}: params[{name!r}] has no 'kernel'; got {sorted(sub)}.")
    bias = sub.get("bias")
    return jnp.asarray(sub["kernel"]), (None if bias is None else jnp.asarray(bias))

  wq, bq = dense("query")
  wk, bk = dense("key")
  wv, bv = dense("value")
  wo, bo = dense("out")
  qs = jnp.asarray(tree["query_ln"]["scale"]) if "query_ln" in tree else None
  ks = jnp.asarray(tree["key_ln"]["scale"]) if "key_ln" in tree else None
  return MultiHeadParams(w_query=wq, w_key=wk, w_value=wv, w_out=wo,
                         b_query=bq, b_key=bk, b_value=bv, b_out=bo,
                         query_norm_scale=qs, key_norm_scale=ks)


def _to_4d(fn, name, x, batch: tuple[int, ...]):
  """[batch..., N|1, T|1, S|1] (numpy broadcasting) -> (B|1, N|1, T|1, S|1)."""
  rank = len(batch) + 3
  if x.ndim > rank:
    raise ValueError(f"{fn}: {name} must broadcast to [batch..., N, T, S] with batch "
                     f"{tuple(batch)}; got shape {tuple(x.shape)}.")
  x = x.reshape((1,) * (rank - x.ndim) + x.shape)
  xb = x.shape[:len(batch)]
  if any(d not in (1, want) for d, want in zip(xb, batch)):
    raise ValueError(f"{fn}: {name} must broadcast to [batch..., N, T, S] with batch "
                     f"{tuple(batch)}; got shape {tuple(x.shape[rank - len(xb) - 3:])}.")
  if all(d == 1 for d in xb):
    return x.reshape((1,) + x.shape[len(batch):])
  x = jnp.broadcast_to(x, tuple(batch) + x.shape[len(batch):])
  return x.reshape((math.prod(batch),) + x.shape[len(batch):])


def make_attention_fn(*, implementation: str | None = None,
                      scale: float | None = None,
                      local_window_size=None,
                      logits_soft_cap: float | None = None,
                      causal_alignment: str = "top_left",
                      block_sizes: tuple[int, int] | None = None):
  """Builds a flax `attention_fn` that runs `jaxattn.dot_product_attention`.

  The options are bound once and apply to every call the module makes:

      nnx.MultiHeadAttention(..., attention_fn=make_attention_fn(logits_soft_cap=50.0))

  Args:
    implementation: None (automatic) or a name from
      `jaxattn.implementations()`.
    scale, local_window_size, logits_soft_cap, causal_alignment,
      block_sizes: as for `jaxattn.dot_product_attention`. A window or an
      alignment places queries by their index in the call: under flax's
      `decode=True`, one query attends to the whole fixed-size cache and its
      position is not passed to attention_fn, so a bound window is placed
      wrongly there (flax's cache mask handles causality; express a window
      as a mask, or use `jaxattn.layers.multi_head_attention_decode`).

  Returns:
    A function with flax's `dot_product_attention` signature (query, key,
    value [batch..., T|S, N|K, H], bias, mask, broadcast_dropout,
    dropout_rng, dropout_rate, deterministic, dtype, precision, module,
    is_causal, ...) returning [batch..., T, N, H].
  """

  def attention_fn(query, key, value, bias=None, mask=None,
                   broadcast_dropout: bool = True, dropout_rng=None,
                   dropout_rate: float = 0.0, deterministic: bool = False,
                   dtype=None, precision=None, module=None,
                   is_causal: bool = False, force_fp32_for_softmax: bool = False,
                   qk_attn_weights_einsum=None, attn_weights_value_einsum=None,
                   einsum_dot_general=None, promote_dtype=None):
    """flax's `dot_product_attention`, computed by jaxattn (see make_attention_fn)."""
    fn = "jaxattn.flax_interop.attention_fn"
    einsums = dict(qk_attn_weights_einsum=qk_attn_weights_einsum,
                   attn_weights_value_einsum=attn_weights_value_einsum,
                   einsum_dot_general=einsum_dot_general)
    is_complex = any(a is not None and jnp.issubdtype(jnp.result_type(a), jnp.complexfloating)
                     for a in (query, key, value, bias))
    if module is not None or is_complex or any(f is not None for f in einsums.values()):
      return _flax_default(query, key, value, bias=bias, mask=mask,
                           broadcast_dropout=broadcast_dropout, dropout_rng=dropout_rng,
                           dropout_rate=dropout_rate, deterministic=deterministic, dtype=dtype,
                           precision=precision, module=module, is_causal=is_causal,
                           force_fp32_for_softmax=force_fp32_for_softmax,
                           promote_dtype=promote_dtype, **einsums)
    del broadcast_dropout, precision, force_fp32_for_softmax  # see the module docstring
    if promote_dtype is not None:
      query, key, value = promote_dtype((query, key, value), dtype=dtype)
    elif dtype is not None:
      query, key, value = (jnp.asarray(a, dtype) for a in (query, key, value))
    else:
      common = jnp.result_type(query, key, value)
      query, key, value = (jnp.asarray(a, common) for a in (query, key, value))
    if query.ndim < 3 or key.ndim != query.ndim or value.ndim != query.ndim:
      raise ValueError(f"{fn}: query, key and value must have shapes [batch..., T|S, N|K, H] "
                       f"of one rank; got {tuple(query.shape)}, {tuple(key.shape)}, "
                       f"{tuple(value.shape)}.")
    batch = query.shape[:-3]
    if key.shape[:-3] != batch or value.shape[:-3] != batch:
      raise ValueError(f"{fn}: query, key and value batch dims must match; got "
                       f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}.")
    if mask is not None:
      mask = jnp.asarray(mask)
      if mask.dtype != jnp.bool_:
        mask = mask != 0  # flax's masks are often float (make_attention_mask)
    if bias is not None:
      bias = jnp.asarray(bias)
    if len(batch) == 0:
      q, k, v = query, key, value
    else:
      B = math.prod(batch)
      q = query.reshape((B,) + query.shape[-3:])
      k = key.reshape((B,) + key.shape[-3:])
      v = value.reshape((B,) + value.shape[-3:])
      mask = None if mask is None else _to_4d(fn, "mask", mask, batch)
      bias = None if bias is None else _to_4d(fn, "bias", bias, batch)
    rate, dropout_key = 0.0, None
    if not deterministic and dropout_rate > 0.0:
      if dropout_rng is None:
        raise ValueError(f"{fn}: dropout_rng is required when dropout_rate > 0 and "
                         f"deterministic is False.")
      rate, dropout_key = dropout_rate, dropout_rng
    out = _attention.dot_product_attention(
        q, k, v, bias, mask, scale=scale, is_causal=bool(is_causal),
        local_window_size=local_window_size, implementation=implementation,
        logits_soft_cap=logits_soft_cap, causal_alignment=causal_alignment,
        dropout_rate=rate, dropout_key=dropout_key, block_sizes=block_sizes)
    return out.reshape(query.shape[:-1] + (value.shape[-1],))

  return attention_fn


def _flax_default(query, key, value, *, module, is_causal, promote_dtype, force_fp32_for_softmax,
                  qk_attn_weights_einsum, attn_weights_value_einsum, einsum_dot_general,
                  **kwargs):
  """flax's own dot_product_attention: nnx's for nnx modules, linen's otherwise.

  linen's takes the einsum and fp32-softmax options but no is_causal (a causal
  mask is added here); nnx's takes is_causal and promote_dtype.
  """
  from flax import nnx  # optional dependency
  import flax.linen as nn
  einsums = dict(qk_attn_weights_einsum=qk_attn_weights_einsum,
                 attn_weights_value_einsum=attn_weights_value_einsum,
                 einsum_dot_general=einsum_dot_general)
  use_nnx = isinstance(module, nnx.Module) or (
      module is None and promote_dtype is not None and not any(
          f is not None for f in einsums.values()) and not force_fp32_for_softmax)
  if use_nnx:
    extra = {} if promote_dtype is None else dict(promote_dtype=promote_dtype)
    return nnx.dot_product_attention(query, key, value, module=module, is_causal=is_causal,
                                     **extra, **kwargs)
  if is_causal:
    T, S = query.shape[-3], key.shape[-3]
    causal = jnp.tril(jnp.ones((T, S), bool))
    mask = kwargs.pop("mask")
    kwargs["mask"] = causal if mask is None else jnp.logical_and(mask, causal)
  return nn.dot_product_attention(query, key, value, module=module,
                                  force_fp32_for_softmax=force_fp32_for_softmax,
                                  **{k: v for k, v in einsums.items() if v is not None}, **kwargs)


attention_fn: Any = make_attention_fn()
attention_fn.__doc__ = """flax `attention_fn` running `jaxattn.dot_product_attention` with defaults.

Pass it to flax's modules: `nnx.MultiHeadAttention(..., attention_fn=attention_fn)`
or `nn.MultiHeadDotProductAttention(..., attention_fn=attention_fn)`. Same
arguments and results as flax's `dot_product_attention` (see the module
docstring for the differences); `make_attention_fn` binds jaxattn options.
"""
