"""Attention layers as pure functions over NamedTuple parameter pytrees."""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn import _checks
from jaxattn import attention as _attention
from jaxattn import decode as _decode
from jaxattn import rope as _rope
from jaxattn._impl import common
from jaxattn.softmax import softmax as _softmax


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

  Raises:
    ValueError: a width is not a positive int.
    TypeError: dtype is not floating point.
  """
  fn = "init_self_attention"
  d_model = _checks.positive_int(fn, "d_model", d_model)
  d_k = _checks.positive_int(fn, "d_k", d_k)
  d_v = d_k if d_v is None else _checks.positive_int(fn, "d_v", d_v)
  dtype = _checks.float_dtype(fn, "dtype", dtype)
  kq, kk, kv = jax.random.split(key, 3)
  # Drawn in float32 and cast, so every dtype gets the same values.
  init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal")
  return SelfAttentionParams(
      w_q=init(kq, (d_model, d_k), jnp.float32).astype(dtype),
      w_k=init(kk, (d_model, d_k), jnp.float32).astype(dtype),
      w_v=init(kv, (d_model, d_v), jnp.float32).astype(dtype))


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
  weights = _softmax(scores, axis=-1, where=where)
  return weights @ v, weights


# ---------------------------------------------------------------------------
# Multi-head attention


class MultiHeadParams(NamedTuple):
  """Parameters of multi-head attention (arrays only; sizes come from shapes).

  Shapes: D input width, C context width (D for self-attention), N query
  heads, K key/value heads (N % K == 0; K < N is GQA, K == 1 MQA), H head dim,
  O output width. The layout is flax's (`DenseGeneral` kernels), so flax
  parameters convert without reshapes. Optional fields are None when absent.

  Attributes:
    w_query: (D, N, H).
    w_key: (C, K, H).
    w_value: (C, K, H).
    w_out: (N, H, O).
    b_query: (N, H) or None.
    b_key: (K, H) or None.
    b_value: (K, H) or None.
    b_out: (O,) or None.
    query_norm_scale: (H,) or None: qk-norm scale applied to each query head.
    key_norm_scale: (H,) or None: qk-norm scale applied to each key head.
  """
  w_query: jax.Array
  w_key: jax.Array
  w_value: jax.Array
  w_out: jax.Array
  b_query: jax.Array | None = None
  b_key: jax.Array | None = None
  b_value: jax.Array | None = None
  b_out: jax.Array | None = None
  query_norm_scale: jax.Array | None = None
  key_norm_scale: jax.Array | None = None


def _positive_int(fn, name, value):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise ValueError(f"{fn}: {name} must be a positive int; got {value!r}.")
  return int(value)


def init_multi_head_attention(
    key, *, d_model: int, num_heads: int, head_dim: int | None = None,
    num_kv_heads: int | None = None, d_context: int | None = None,
    d_out: int | None = None, use_bias: bool = True, qk_norm: bool = False,
    param_dtype=jnp.float32) -> MultiHeadParams:
  """Initializes multi-head attention parameters.

  Kernels are drawn from normal(0, 1/fan_in) (LeCun, as flax's default
  `lecun_normal` up to truncation): fan_in = D for the query, C for key and
  value, N*H for the output. Biases start at 0 and qk-norm scales at 1.

  Args:
    key: a `jax.random.key`.
    d_model: D, the width of the input x.
    num_heads: N, query heads.
    head_dim: H, default D // N (then N must divide D).
    num_kv_heads: K, key/value heads, default N; must divide N (GQA; 1 is
      MQA).
    d_context: C, the width of the cross-attention context, default D.
    d_out: O, the output width, default D.
    use_bias: give the four projections biases.
    qk_norm: add per-head query and key normalization scales (ViT-22B,
      Dehghani et al., 2023, arXiv:2302.05442); `multi_head_attention`'s
      `qk_norm_type` picks the normalization.
    param_dtype: dtype of every parameter. The computation dtype is chosen at
      apply time (`multi_head_attention(dtype=...)`), since nothing static
      lives in the pytree.

  Returns:
    MultiHeadParams.

  Raises:
    ValueError: a size is not a positive int, N % K != 0, or H is None and
      N does not divide D.
    TypeError: param_dtype is not floating point.

  >>> import jax
  >>> from jaxattn.layers import init_multi_head_attention
  >>> p = init_multi_head_attention(jax.random.key(0), d_model=12, num_heads=6, num_kv_heads=3)
  >>> p.w_query.shape, p.w_key.shape, p.w_out.shape
  ((12, 6, 2), (12, 3, 2), (6, 2, 12))
  """
  fn = "init_multi_head_attention"
  D = _positive_int(fn, "d_model", d_model)
  N = _positive_int(fn, "num_heads", num_heads)
  K = N if num_kv_heads is None else _positive_int(fn, "num_kv_heads", num_kv_heads)
  C = D if d_context is None else _positive_int(fn, "d_context", d_context)
  O = D if d_out is None else _positive_int(fn, "d_out", d_out)
  if head_dim is None:
    if D % N:
      raise ValueError(f"{fn}: num_heads N = {N} must divide d_model D = {D} when "
                       f"head_dim is not given; got D % N = {D % N}.")
    H = D // N
  else:
    H = _positive_int(fn, "head_dim", head_dim)
  if N % K:
    raise ValueError(f"{fn}: num_kv_heads K = {K} must divide num_heads N = {N}.")
  return _init_mha(key, sizes=(D, C, N, K, H, O), use_bias=bool(use_bias),
                   qk_norm=bool(qk_norm),
                   param_dtype=_checks.float_dtype(fn, "param_dtype", param_dtype))


# One compiled program per configuration instead of one per random draw.
@functools.partial(jax.jit, static_argnames=("sizes", "use_bias", "qk_norm", "param_dtype"))
def _init_mha(key, *, sizes, use_bias, qk_norm, param_dtype):
  D, C, N, K, H, O = sizes
  shapes = ((D, N, H), (C, K, H), (C, K, H), (N, H, O))
  fan_in = (D, C, C, N * H)
  # One draw sliced four ways: a single random kernel compiles much faster than
  # four (jax.nn.initializers would draw four times), which matters on CPU.
  flat = jax.random.normal(key, (sum(math.prod(s) for s in shapes),), jnp.float32)
  offsets = np.cumsum([0] + [math.prod(s) for s in shapes])
  wq, wk, wv, wo = (
      (flat[a:b].reshape(s) / np.sqrt(f)).astype(param_dtype)
      for a, b, s, f in zip(offsets[:-1], offsets[1:], shapes, fan_in))
  zeros = lambda shape: jnp.zeros(shape, param_dtype) if use_bias else None
  ones = lambda shape: jnp.ones(shape, param_dtype) if qk_norm else None
  return MultiHeadParams(
      w_query=wq, w_key=wk, w_value=wv, w_out=wo,
      b_query=zeros((N, H)), b_key=zeros((K, H)), b_value=zeros((K, H)),
      b_out=zeros((O,)), query_norm_scale=ones((H,)), key_norm_scale=ones((H,)))


def _shape(x) -> str:
  return "(" + ", ".join(str(int(s)) for s in x) + ")"


def _check_params(fn, params: MultiHeadParams):
  """Sizes (D, C, N, K, H, O) from the parameter shapes, checked for agreement."""
  if not isinstance(params, MultiHeadParams):
    raise TypeError(f"{fn}: params must be a MultiHeadParams; got {type(params).__name__}.")
  wq, wk, wv, wo = params.w_query, params.w_key, params.w_value, params.w_out
  if wq.ndim != 3 or wk.ndim != 3 or wo.ndim != 3:
    raise ValueError(f"{fn}: params.w_query (D, N, H), w_key (C, K, H) and w_out "
                     f"(N, H, O) must be 3D; got {_shape(wq.shape)}, {_shape(wk.shape)}, "
                     f"{_shape(wo.shape)}.")
  D, N, H = wq.shape
  C, K, _ = wk.shape
  O = wo.shape[2]
  expect = {
      "w_key": (wk.shape, (C, K, H)), "w_value": (wv.shape, (C, K, H)),
      "w_out": (wo.shape, (N, H, O)), "b_query": (None, (N, H)), "b_key": (None, (K, H)),
      "b_value": (None, (K, H)), "b_out": (None, (O,)), "query_norm_scale": (None, (H,)),
      "key_norm_scale": (None, (H,))}
  for name, (_, want) in expect.items():
    leaf = getattr(params, name)
    if leaf is not None and tuple(leaf.shape) != want:
      raise ValueError(f"{fn}: params.{name} must have shape {_shape(want)} to match "
                       f"w_query (D, N, H) = {_shape(wq.shape)} and w_key (C, K, H) = "
                       f"{_shape(wk.shape)}; got {_shape(leaf.shape)}.")
  if N % K:
    raise ValueError(f"{fn}: key/value heads K = {K} (params.w_key) must divide the "
                     f"query heads N = {N} (params.w_query).")
  for name in params._fields:
    leaf = getattr(params, name)
    if leaf is not None and not jnp.issubdtype(leaf.dtype, jnp.floating):
      raise TypeError(f"{fn}: params.{name} must be floating point; got {leaf.dtype}.")
  return D, C, N, K, H, O


def _qk_normalize(x, scale, kind: str, epsilon: float):
  """LayerNorm (no bias) or RMSNorm over the head dim, statistics in float32+."""
  if scale is None:
    return x
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  if kind == "layer_norm":
    xf = xf - jnp.mean(xf, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
  y = xf * jax.lax.rsqrt(var + epsilon)
  return (y * _lead(scale.astype(y.dtype), y.ndim)).astype(x.dtype)


def _lead(a, ndim):
  """`a` with leading 1-dims up to `ndim`: explicit, so rank promotion never hides a bug."""
  return a.reshape((1,) * (ndim - a.ndim) + a.shape)


def _project(x, w, b, spec):
  y = jnp.einsum(spec, x, w)
  return y if b is None else y + _lead(b, y.ndim)


def _check_norm_and_rope(fn: str, qk_norm_type, qk_norm_epsilon, rope, H: int) -> float:
  """Checks the query/key normalization options and the RoPE config for head dim H;
  returns the epsilon as a float."""
  if qk_norm_type not in ("layer_norm", "rms_norm"):
    raise ValueError(f"{fn}: qk_norm_type must be 'layer_norm' or 'rms_norm'; got "
                     f"{qk_norm_type!r}.")
  if rope is not None:
    if not isinstance(rope, _rope.RopeConfig):
      raise TypeError(f"{fn}: rope must be a jaxattn.rope.RopeConfig or None; got "
                      f"{type(rope).__name__}.")
    R = H if rope.rotary_dim is None else rope.rotary_dim
    if R > H or R % 2:
      raise ValueError(f"{fn}: RoPE rotates feature pairs: the rotary dim must be even and "
                       f"at most the head dim H = {H}; got {R}.")
  return _checks.finite_positive_float(fn, "qk_norm_epsilon", qk_norm_epsilon)


def _qkv_projections(params: MultiHeadParams, x, context, dtype, qk_norm_type: str, qk_norm_epsilon):
  """(params in dtype, q, k, v): the projections of x (..., T, D) and context (..., S, C),
  with the query/key normalization where the params hold its scales."""
  p = type(params)(*(None if l is None else l.astype(dtype) for l in params))
  x, context = x.astype(dtype), context.astype(dtype)
  q = _project(x, p.w_query, p.b_query, "...td,dnh->...tnh")
  k = _project(context, p.w_key, p.b_key, "...sc,ckh->...skh")
  v = _project(context, p.w_value, p.b_value, "...sc,ckh->...skh")
  q = _qk_normalize(q, p.query_norm_scale, qk_norm_type, float(qk_norm_epsilon))
  k = _qk_normalize(k, p.key_norm_scale, qk_norm_type, float(qk_norm_epsilon))
  return p, q, k, v


def _check_attention_options(fn, batched, lead, N, T, S, H, *, bias, mask, scale, is_causal,
                             local_window_size,
                             query_segment_ids, key_value_segment_ids, logits_soft_cap,
                             causal_alignment, dropout_rate, dropout_key, implementation,
                             block_sizes):
  """The layer's own checks of what it forwards to dot_product_attention.

  Shapes are the layer's: per example (N, T, S), (T,), scalars; with a
  leading batch dim B of x, (B, ...). Errors name the layer.
  """
  letters = "(B, N, T, S)" if batched else "(N, T, S)"
  full = tuple(lead) + (N, T, S)
  for name, a in (("bias", bias), ("mask", mask)):
    if a is None:
      continue
    a_shape = jnp.shape(a)
    try:
      ok = len(a_shape) <= len(full) and jnp.broadcast_shapes(a_shape, full) == full
    except ValueError:
      ok = False
    if not ok:
      raise ValueError(f"{fn}: {name} must broadcast to {letters} = {_checks.fmt(full)}; got "
                       f"{_checks.fmt(a_shape)}.")
    dtype = jnp.result_type(a)
    if name == "bias" and not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(f"{fn}: bias must have a floating point dtype (use mask= for booleans); "
                      f"got {dtype}.")
    if name == "mask" and dtype != jnp.bool_:
      raise TypeError(f"{fn}: mask must be boolean (True = attend); got {dtype}.")
  for name, a, L, letter in (("query_segment_ids", query_segment_ids, T, "T"),
                             ("key_value_segment_ids", key_value_segment_ids, S, "S")):
    if a is None:
      continue
    want = tuple(lead) + (L,)
    if jnp.shape(a) != want:
      shown = f"(B, {letter})" if batched else f"({letter},)"
      raise ValueError(f"{fn}: {name} must have shape {shown} = {_checks.fmt(want)}; got "
                       f"{_checks.fmt(jnp.shape(a))}.")
    if not jnp.issubdtype(jnp.result_type(a), jnp.integer):
      raise TypeError(f"{fn}: {name} must have an integer dtype; got {jnp.result_type(a)}.")
  if key_value_segment_ids is not None and query_segment_ids is None:
    raise ValueError(f"{fn}: query_segment_ids is required when key_value_segment_ids is "
                     f"given.")
  if query_segment_ids is not None and key_value_segment_ids is None and T != S:
    raise ValueError(f"{fn}: key_value_segment_ids is required when T != S (T = {T}, "
                     f"S = {S}).")
  # The scalar options: dot_product_attention's own canonicalizers, in the layer's name.
  _attention.canonical_window(fn, local_window_size)
  _attention.canonical_causal(fn, is_causal, causal_alignment, T, S)
  _attention.canonical_scale_and_cap(fn, scale, logits_soft_cap, H)
  _attention.canonical_dropout_rate(fn, dropout_rate, dropout_key)
  names = _attention.implementations()
  if implementation is not None and implementation not in names:
    raise ValueError(f"{fn}: implementation must be None or one of "
                     f"{', '.join(map(repr, names))}; got {implementation!r}.")
  _checks.block_sizes(fn, block_sizes)


def _lengths(fn, name, value, batched, B=None):
  """() or (1,) per example; (B,) with a leading batch dim, as given."""
  if value is None:
    return None
  value = value if isinstance(value, jax.Array) else np.asarray(value)  # host ints stay wide
  if batched and value.shape != (B,):
    raise ValueError(f"{fn}: {name} must have shape (B,) = ({B},) for x of shape (B, T, D); "
                     f"got shape {_checks.fmt(value.shape)}.")
  if not batched:
    if value.shape not in ((), (1,)):
      raise ValueError(f"{fn}: {name} must be a scalar (or shape (1,)) for one example "
                       f"x (T, D); got shape {_shape(value.shape)}. Use jax.vmap for batches.")
    value = value.reshape(1)
  return value


def multi_head_attention(
    params: MultiHeadParams, x, context=None, *,
    bias=None, mask=None, scale: float | None = None, is_causal: bool = False,
    query_seq_lengths=None, key_value_seq_lengths=None,
    local_window_size=None, query_segment_ids=None, key_value_segment_ids=None,
    logits_soft_cap: float | None = None,
    causal_alignment: str = "top_left",
    positions=None, context_positions=None, rope=None,
    qk_norm_type: str = "layer_norm", qk_norm_epsilon: float = 1e-6,
    dropout_rate: float = 0.0, dropout_key=None, dtype=None,
    implementation: str | None = None, block_sizes: tuple[int, int] | None = None,
    mask_fn=None, score_fn=None, return_residual: bool = False):
  r"""Multi-head attention on one example: self-attention, or cross-attention to `context`.

  .. math::
     q = x W_q + b_q,\ k = c W_k + b_k,\ v = c W_v + b_v
     \quad (c = x \text{ for self-attention})

     q, k \leftarrow \mathrm{rope}(\mathrm{norm}(q), p),\ \mathrm{rope}(\mathrm{norm}(k), p_c)

     y = \mathrm{attention}(q, k, v)\, W_o + b_o

  with `jaxattn.dot_product_attention` as the attention (Vaswani et al.,
  2017, arXiv:1706.03762). Batch it with `jax.vmap`:

      jax.vmap(lambda x, n: multi_head_attention(p, x, key_value_seq_lengths=n))(xs, lengths)

  (x of shape (B, T, D) with per-example arguments of leading dim B is also
  accepted directly). Under vmap, pass one dropout key per example
  (`jax.random.split(key, B)`): a key shared through vmap draws the same
  dropout mask for every example.

  Args:
    params: MultiHeadParams; every size is read from its shapes.
    x: (T, D) queries' input.
    context: (S, C) keys' and values' input; None for self-attention (S = T).
    bias: float, broadcastable to (N, T, S); added to the logits.
    mask: bool, broadcastable to (N, T, S); True = attend.
    scale: logit scale, default 1/sqrt(H).
    is_causal: mask keys after the query's position (see causal_alignment).
    query_seq_lengths: int scalar: query rows at or past it give 0 (before
      the output projection, so the output there is b_o).
    key_value_seq_lengths: int scalar: keys at or past it are masked
      (right padding).
    local_window_size: `w` or `(left, right)`, as in dot_product_attention.
    query_segment_ids: int (T,): attend only within the same segment.
    key_value_segment_ids: int (S,); default query_segment_ids when S == T.
    logits_soft_cap: `cap * tanh(logits / cap)` (Gemma 2).
    causal_alignment: "top_left" or "bottom_right" (queries are the last T
      of the S positions: decoding against a cache).
    positions: (T,) int or float query positions for RoPE, default
      arange(T).
    context_positions: (S,) key positions for RoPE; default `positions` for
      self-attention and arange(S) for cross-attention.
    rope: a `jaxattn.rope.RopeConfig` to rotate queries and keys (after
      qk-norm); None for no RoPE.
    qk_norm_type: how the per-head norms in `params.query_norm_scale` /
      `key_norm_scale` normalize when present: "layer_norm" (mean-centred,
      no bias; flax, ViT-22B) or "rms_norm" (Gemma 3, Qwen3, OLMo 2).
    qk_norm_epsilon: the norms' epsilon (flax's default 1e-6).
    dropout_rate: attention-weight dropout probability.
    dropout_key: a `jax.random.key`, required when dropout_rate > 0.
    dtype: computation dtype; default the promotion of x's and the
      parameters' dtypes. Parameters and inputs are cast to it.
    implementation: None (automatic) or a name from
      `jaxattn.implementations()`.
    block_sizes: (query block, key block) for blocked implementations.
    mask_fn, score_fn: a `jaxattn.masks.Mask` / `jaxattn.scores.ScoreMod` (or
      a function), as in dot_product_attention; their b index is 0 for one
      example (b of the batch for x (B, T, D)).
    return_residual: also return the attention's logsumexp, (T, N) (or
      (B, T, N)), -inf for rows that attend nothing.

  Returns:
    (T, O) in the computation dtype (and the logsumexp with return_residual).
    Rows past `query_seq_lengths` are b_o. Rows of x and context past the
    lengths are zeroed before the projections, so NaN/inf there reaches no
    output or gradient (parameters included).

  Raises:
    ValueError: a shape does not fit (x, context, params, positions, the
      options of dot_product_attention); unknown qk_norm_type.
    TypeError: x or context not floating point; params not MultiHeadParams.

  >>> import jax
  >>> from jaxattn.layers import init_multi_head_attention, multi_head_attention
  >>> p = init_multi_head_attention(jax.random.key(0), d_model=12, num_heads=6, num_kv_heads=3)
  >>> x = jax.random.normal(jax.random.key(1), (2, 5, 12))
  >>> jax.vmap(lambda x: multi_head_attention(p, x, is_causal=True))(x).shape
  (2, 5, 12)
  """
  fn = "multi_head_attention"
  D, C, N, K, H, O = _check_params(fn, params)
  x = jnp.asarray(x)
  if x.ndim not in (2, 3) or x.shape[-1] != D:
    raise ValueError(f"{fn}: x must have shape (T, D) with D = {D} from params.w_query "
                     f"{_shape(params.w_query.shape)} (or (B, T, D)); got {_shape(x.shape)}. "
                     f"Use jax.vmap for batches.")
  batched = x.ndim == 3
  self_attention = context is None
  context = x if self_attention else jnp.asarray(context)
  if context.ndim != x.ndim or context.shape[-1] != C or context.shape[:-2] != x.shape[:-2]:
    want = "(S, C)" if not batched else f"(B, S, C) with B = {x.shape[0]}"
    raise ValueError(f"{fn}: context must have shape {want} and C = {C} from params.w_key "
                     f"{_shape(params.w_key.shape)}; got {_shape(context.shape)}.")
  for name, a in (("x", x), ("context", context)):
    if not jnp.issubdtype(a.dtype, jnp.floating):
      raise TypeError(f"{fn}: {name} must have a floating point dtype; got {a.dtype}.")
  qk_norm_epsilon = _check_norm_and_rope(fn, qk_norm_type, qk_norm_epsilon, rope, H)

  T, S = x.shape[-2], context.shape[-2]
  if rope is not None:
    if positions is None:
      positions = jnp.arange(T)
    if context_positions is None:
      context_positions = positions if self_attention else jnp.arange(S)
    for name, pos, L in (("positions", positions, T), ("context_positions", context_positions, S)):
      pos = jnp.asarray(pos)
      if pos.shape not in ((L,), x.shape[:-2] + (L,)):
        raise ValueError(f"{fn}: {name} must have shape ({L},) (one position per "
                         f"token); got {_shape(pos.shape)}.")
  elif positions is not None or context_positions is not None:
    raise ValueError(f"{fn}: positions are only used by RoPE; pass rope=RopeConfig(...) "
                     f"or leave positions=None.")

  _check_attention_options(
      fn, batched, x.shape[:-2], N, T, S, H, bias=bias, mask=mask, scale=scale,
      is_causal=is_causal, local_window_size=local_window_size,
      query_segment_ids=query_segment_ids, key_value_segment_ids=key_value_segment_ids,
      logits_soft_cap=logits_soft_cap, causal_alignment=causal_alignment,
      dropout_rate=dropout_rate, dropout_key=dropout_key, implementation=implementation,
      block_sizes=block_sizes)
  B = x.shape[0] if batched else 1
  mask_fn, score_fn = _attention.canonical_functions(fn, mask_fn, score_fn, B, N, T, S)
  leaves = [l for l in params if l is not None]
  if dtype is None:
    dtype = jnp.result_type(x.dtype, context.dtype, *(l.dtype for l in leaves))
  dtype = jnp.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"{fn}: dtype must be floating point; got {dtype}.")
  # int32 (B,), clipped to [0, T] / [0, S] (as dot_product_attention reads them).
  q_len = _attention.canonical_lengths(
      fn, "query_seq_lengths", _lengths(fn, "query_seq_lengths", query_seq_lengths, batched, B), B, T, False)
  kv_len = _attention.canonical_lengths(
      fn, "key_value_seq_lengths", _lengths(fn, "key_value_seq_lengths", key_value_seq_lengths, batched, B),
      B, S, False)
  # Padding rows are zeroed before the projections: dot_product_attention keeps
  # NaN/inf there out of q, k and v's gradients, but x^T dq would still meet it.
  zero = lambda a, n: common.zero_past(a, n) if batched else common.zero_past(a[None], n)[0]
  p, q, k, v = _qkv_projections(params, zero(x, q_len), zero(context, kv_len), dtype,
                                qk_norm_type, qk_norm_epsilon)

  if rope is not None:
    q = rope.apply(q, positions)
    k = rope.apply(k, context_positions)

  out = _attention.dot_product_attention(
      q, k, v, bias, mask, scale=scale, is_causal=is_causal,
      query_seq_lengths=q_len, key_value_seq_lengths=kv_len,
      local_window_size=local_window_size, implementation=implementation,
      query_segment_ids=query_segment_ids, key_value_segment_ids=key_value_segment_ids,
      logits_soft_cap=logits_soft_cap, causal_alignment=causal_alignment,
      dropout_rate=dropout_rate, dropout_key=dropout_key, block_sizes=block_sizes,
      mask_fn=mask_fn, score_fn=score_fn, return_residual=return_residual)
  if return_residual:
    out, lse = out
    return _project(out, p.w_out, p.b_out, "...tnh,nho->...to"), lse
  return _project(out, p.w_out, p.b_out, "...tnh,nho->...to")


# ---------------------------------------------------------------------------
# Cached decoding (jaxattn.decode holds the cache and the attention step).


def multi_head_attention_decode(
    params, x, cache, *, seq_lengths=None, rope=None, scale: float | None = None,
    logits_soft_cap: float | None = None, local_window_size=None,
    qk_norm_type: str = "layer_norm", qk_norm_epsilon: float = 1e-6, dtype=None,
    implementation: str | None = None, num_splits: int | None = None):
  r"""Causal multi-head self-attention of T new tokens per sequence, with a cache.

  The cached twin of `multi_head_attention(params, x, is_causal=True,
  rope=rope)` on the whole sequence: it projects the new tokens, rotates
  queries and keys at their absolute positions `cache.lengths[b] + t`, appends
  keys and values to the cache, attends (`decode_attention`) and projects the
  output. Prefill and decode steps are the same call.

  Args:
    params: `jaxattn.layers.MultiHeadParams` for self-attention (C = D).
    x: (B, T, D) the new tokens' inputs (batched: the cache is per batch).
    cache: KVCache or PagedKVCache with K and H of params; keys and values
      are stored, and queries attend, in the cache's dtype.
    seq_lengths: optional int (B,): real new tokens per row (right padding of
      a ragged prefill); padded rows give b_out and are not stored.
    rope: a `jaxattn.rope.RopeConfig` or None.
    scale, logits_soft_cap, local_window_size, implementation, num_splits:
      as for `decode_attention`.
    qk_norm_type, qk_norm_epsilon: as for `multi_head_attention`.
    dtype: computation dtype of the projections; default the promotion of
      x's and the parameters' dtypes.

  Returns:
    (y, cache): y (B, T, O) in the computation dtype, and the updated cache.

  Raises:
    ValueError: shapes of x, params and cache disagree.
    TypeError: params not MultiHeadParams, x not floating point.

  >>> import jax, jax.numpy as jnp, jaxattn
  >>> p = jaxattn.init_multi_head_attention(jax.random.key(0), d_model=12, num_heads=6, num_kv_heads=3)
  >>> cache = jaxattn.init_kv_cache(2, 16, 3, 2)
  >>> y, cache = jaxattn.multi_head_attention_decode(p, jnp.ones((2, 5, 12)), cache)  # prefill
  >>> y, cache = jaxattn.multi_head_attention_decode(p, jnp.ones((2, 1, 12)), cache)  # one step
  >>> y.shape, cache.lengths.tolist()
  ((2, 1, 12), [6, 6])
  """
  fn = "multi_head_attention_decode"
  D, C, N, K, H, O = _check_params(fn, params)
  B, Kc, Hc, L, cache_dtype = _decode.cache_sizes(fn, cache)
  x = jnp.asarray(x)
  if x.ndim != 3 or x.shape[0] != B or x.shape[2] != D:
    raise ValueError(f"{fn}: x must have shape (B, T, D) = ({B}, T, {D}) from the cache "
                     f"and params.w_query {_checks.dims(params.w_query.shape)}; got {_checks.dims(x.shape)}.")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{fn}: x must have a floating point dtype; got {x.dtype}.")
  if C != D:
    raise ValueError(f"{fn}: params are for cross-attention (C = {C} != D = {D}); the "
                     f"cache holds self-attention keys.")
  if (Kc, Hc) != (K, H):
    raise ValueError(f"{fn}: the cache's (K, H) = ({Kc}, {Hc}) must match params.w_key "
                     f"(C, K, H) = {_checks.dims(params.w_key.shape)}.")
  qk_norm_epsilon = _check_norm_and_rope(fn, qk_norm_type, qk_norm_epsilon, rope, H)
  leaves = [l for l in params if l is not None]
  if dtype is None:
    dtype = jnp.result_type(x.dtype, *(l.dtype for l in leaves))
  dtype = _checks.float_dtype(fn, "dtype", dtype)
  T = x.shape[1]
  if seq_lengths is not None:
    # Padding rows (a ragged prefill) are zeroed before the projections, as in
    # multi_head_attention: the kernels keep NaN/inf there out of q, k and v's
    # gradients, but x^T dq would still meet it.
    x = common.zero_past(x, _attention.canonical_lengths(fn, "seq_lengths", seq_lengths, B, T, False))
  p, q, k, v = _qkv_projections(params, x, x, dtype, qk_norm_type, qk_norm_epsilon)
  if rope is not None:
    positions = jnp.maximum(cache.lengths, 0)[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    q = rope.apply(q, positions)
    k = rope.apply(k, positions)
  q, k, v = (a.astype(cache_dtype) for a in (q, k, v))
  cache = _decode.update_kv_cache(cache, k, v, seq_lengths=seq_lengths)
  out = _decode.decode_attention(q, cache, query_seq_lengths=seq_lengths, scale=scale,
                                 logits_soft_cap=logits_soft_cap, local_window_size=local_window_size,
                                 implementation=implementation, num_splits=num_splits)
  y = _project(out.astype(dtype), p.w_out, p.b_out, "btnh,nho->bto")
  return y, cache
