"""`dot_product_attention`: validation, normalization and dispatch.

A drop-in superset of `jax.nn.dot_product_attention`. Everything is checked
here, once, from static shapes and dtypes; the chosen implementation (see
`jaxattn._impl`) receives normalized 4D arguments.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn import _checks, _impl
from jaxattn import masks as _masks
from jaxattn import scores as _scores
from jaxattn import tuning as _tuning
from jaxattn._impl import common

_FN = "dot_product_attention"

# Below this many logits per (batch, head) the materialized path wins on CPU.
_CHUNKED_MIN_LOGITS = 256 * 256


_fmt = _checks.dims


def _err(fn: str, arg: str, msg: str) -> ValueError:
  return ValueError(f"{fn}: {arg} {msg}")


def _broadcastable_4d(fn: str, name: str, x, full: tuple[int, int, int, int], rank3: bool):
  """Checks that x broadcasts to (B, N, T, S) by NumPy rules (missing leading
  dims are 1, as in jax.nn: a (S,) mask applies to every query); returns it as 4D."""
  letters = "(N, T, S)" if rank3 else "(B, N, T, S)"
  shown = full[1:] if rank3 else full
  if x.ndim > 4:
    raise _err(fn, name, f"must have rank at most 4 and broadcast to {letters} = "
               f"{_fmt(shown)}; got shape {_fmt(x.shape)}.")
  x4 = x.reshape((1,) * (4 - x.ndim) + x.shape)
  for have, want in zip(x4.shape, full):
    if have not in (1, want):
      raise _err(fn, name, f"must broadcast to {letters} = {_fmt(shown)} (each dim 1 "
                 f"or full); got shape {_fmt(x.shape)}.")
  return x4


def _integer_array(fn: str, name: str, x):
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(f"{fn}: {name} must have an integer dtype; got {x.dtype}.")
  return x


# ---------------------------------------------------------------------------
# Canonicalizers: one per argument group. Each takes the public function's name
# (`fn`) for its messages, so every entry point (dot_product_attention, the
# layers, ring attention) raises errors in its own name.


def canonical_qkv(fn: str, query, key, value):
  """(query, key, value) as 4D arrays of one float dtype, and whether the caller's were 3D."""
  query, key, value = (jnp.asarray(x) for x in (query, key, value))
  if query.ndim not in (3, 4):
    raise _err(fn, "query", f"must have shape (B, T, N, H) or (T, N, H); got rank "
               f"{query.ndim} shape {_fmt(query.shape)}.")
  rank3 = query.ndim == 3
  shown = (lambda shape: shape[1:]) if rank3 else (lambda shape: shape)
  for name, x in (("key", key), ("value", value)):
    if x.ndim != query.ndim:
      letters = "(S, K, H)" if rank3 else "(B, S, K, H)"
      raise _err(fn, name, f"must have shape {letters}, the rank of query "
                 f"{_fmt(query.shape)}; got {_fmt(x.shape)}.")
  if rank3:
    query, key, value = query[None], key[None], value[None]
  B, T, N, H = query.shape
  _, S, K, _ = key.shape
  if key.shape[0] != B or key.shape[3] != H:
    letters = "(S, K, H)" if rank3 else "(B, S, K, H)"
    raise _err(fn, "key", f"must have shape {letters} = {_fmt(shown((B, S, K, H)))} "
               f"to match query {_fmt(shown(query.shape))}; got {_fmt(shown(key.shape))}.")
  if value.shape[:3] != key.shape[:3]:
    letters = "(S, K, Hv)" if rank3 else "(B, S, K, Hv)"
    raise _err(fn, "value", f"must have shape {letters} with the key's leading dims "
               f"{_fmt(shown(key.shape[:3]))}; got {_fmt(shown(value.shape))}.")
  for name, x in (("query", query), ("key", key), ("value", value)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{fn}: {name} must have a floating point dtype; got {x.dtype}.")
  if key.dtype != query.dtype or value.dtype != query.dtype:
    raise TypeError(f"{fn}: query, key and value must share one dtype; got "
                    f"{query.dtype}, {key.dtype}, {value.dtype}.")
  if K == 0 or N % K != 0:
    raise _err(fn, "key", f"heads K={K} must divide the query heads N={N} (GQA/MQA); "
               f"got query {_fmt(shown(query.shape))} and key {_fmt(shown(key.shape))}.")
  for name, n in (("T", T), ("S", S), ("H", H), ("N", N)):
    if n == 0:
      raise _err(fn, "query" if name != "S" else "key", f"has a zero-sized {name} dimension.")
  return query, key, value, rank3


def canonical_bias_and_mask(fn: str, bias, mask, full: tuple[int, int, int, int], rank3: bool):
  """bias (float) and mask (bool) as 4D arrays broadcastable to `full` = (B, N, T, S)."""
  if bias is not None:
    bias = jnp.asarray(bias)
    if not jnp.issubdtype(bias.dtype, jnp.floating):
      raise TypeError(f"{fn}: bias must have a floating point dtype (use mask= for "
                      f"boolean masks); got {bias.dtype}.")
    bias = _broadcastable_4d(fn, "bias", bias, full, rank3)
  if mask is not None:
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
      raise TypeError(f"{fn}: mask must be boolean (True = attend; pass additive "
                      f"masks as bias=); got {mask.dtype}.")
    mask = _broadcastable_4d(fn, "mask", mask, full, rank3)
  return bias, mask


def canonical_lengths(fn: str, name: str, x, B: int, L: int, rank3: bool):
  """int32 (B,) lengths clipped to [0, L], or None."""
  if x is None:
    return None
  if not isinstance(x, jax.Array):
    host = np.asarray(x)
    if np.issubdtype(host.dtype, np.integer):
      # Clipped on the host in a wide type: jax (x64 off) would wrap a 64-bit
      # length past 2**31 to 32 bits first.
      wide = host.astype(np.uint64 if host.dtype.kind == "u" else np.int64)
      x = np.clip(wide, 0, L).astype(np.int32)
  x = _integer_array(fn, name, x)
  if x.shape != (B,):
    want = "(B,) = " + _fmt((B,)) if not rank3 else "(1,) for the 3D (T, N, H) layout"
    raise _err(fn, name, f"must have shape {want}; got {_fmt(x.shape)}.")
  # Clipped to [0, L] before the cast: a length past the sequence means all of it
  # (2**32 would wrap to 0 in int32), a negative one none of it. Narrow types
  # are widened first (an int8 clip to L = 200 would wrap).
  if jnp.dtype(x.dtype).itemsize < 4:
    x = x.astype(jnp.int32)
  return jnp.clip(x, 0, L).astype(jnp.int32)


def _check_segments(fn, name, x, B, L, letter, rank3):
  x = _integer_array(fn, name, x)
  want = (L,) if rank3 else (B, L)
  if x.shape != want:
    letters = f"({letter},)" if rank3 else f"(B, {letter})"
    raise _err(fn, name, f"must have shape {letters} = {_fmt(want)}; got {_fmt(x.shape)}.")
  return x.reshape(B, L)


def canonical_segments(fn: str, query_segment_ids, key_value_segment_ids, B: int, T: int, S: int,
                       rank3: bool):
  """int32 (B, T) and (B, S) segment ids (the key side defaults to the query's), or Nones."""
  if key_value_segment_ids is not None and query_segment_ids is None:
    raise _err(fn, "query_segment_ids", "is required when key_value_segment_ids is given.")
  if query_segment_ids is None:
    return None, None
  query_segment_ids, key_value_segment_ids = _checks.host_ids_as_int32(query_segment_ids,
                                                                      key_value_segment_ids)
  q_ids = _check_segments(fn, "query_segment_ids", query_segment_ids, B, T, "T", rank3)
  if key_value_segment_ids is None:
    if S != T:
      raise _err(fn, "key_value_segment_ids", f"is required when T != S (T={T}, S={S}).")
    kv_ids = q_ids
  else:
    kv_ids = _check_segments(fn, "key_value_segment_ids", key_value_segment_ids, B, S, "S", rank3)
  return _checks.segments_as_int32(q_ids, kv_ids)


def canonical_window(fn: str, w):
  """local_window_size as a (left, right) tuple of ints or None sides, or None."""
  if w is None:
    return None
  if isinstance(w, (int, np.integer)) and not isinstance(w, bool):
    w = (int(w), int(w))
  if isinstance(w, list):  # [left, right], as from a JSON config (jax.nn accepts it)
    w = tuple(w)
  if not (isinstance(w, tuple) and len(w) == 2):
    raise _err(fn, "local_window_size", f"must be an int or a (left, right) tuple of "
               f"ints (None for unbounded); got {w!r}.")
  for side in w:
    if side is not None and (isinstance(side, bool) or not isinstance(side, (int, np.integer)) or side < 0):
      raise _err(fn, "local_window_size", f"sides must be non-negative ints or None; got {w!r}.")
  return tuple(None if s is None else int(s) for s in w)


def canonical_scale_and_cap(fn: str, scale, logits_soft_cap, H: int):
  """(scale, cap) as finite Python floats; scale defaults to 1 / sqrt(H), cap may be None."""
  if scale is None:
    scale = 1.0 / float(np.sqrt(H))
  scale = _checks.static_float(fn, "scale", scale)
  if not math.isfinite(scale):
    raise _err(fn, "scale", f"must be a finite number; got {scale}.")
  if logits_soft_cap is not None:
    logits_soft_cap = _checks.static_float(fn, "logits_soft_cap", logits_soft_cap)
    if not logits_soft_cap > 0:
      raise _err(fn, "logits_soft_cap", f"must be positive; got {logits_soft_cap}.")
    if not math.isfinite(logits_soft_cap):
      raise _err(fn, "logits_soft_cap", f"must be finite (cap * tanh(x / cap) is nan at "
                 f"cap = inf; pass None for no cap); got {logits_soft_cap}.")
  return scale, logits_soft_cap


def canonical_causal(fn: str, is_causal, causal_alignment, T: int, S: int):
  """(is_causal, q_offset): the offset of bottom-right alignment, S - T, or 0."""
  if isinstance(is_causal, jax.Array) and is_causal.shape == () and is_causal.dtype == jnp.bool_:
    value = _checks.concrete(is_causal)  # jnp.bool_(True), as jax.nn accepts; traced: refused
    is_causal = is_causal if value is None else np.bool_(value)
  if not isinstance(is_causal, (bool, np.bool_)):
    raise TypeError(f"{fn}: is_causal must be a Python bool (static: it picks the block plan); "
                    f"got {type(is_causal).__name__}.")
  if causal_alignment not in ("top_left", "bottom_right"):
    raise _err(fn, "causal_alignment", f"must be 'top_left' or 'bottom_right'; got {causal_alignment!r}.")
  return bool(is_causal), (S - T) if causal_alignment == "bottom_right" else 0


def canonical_dropout_rate(fn: str, dropout_rate, dropout_key) -> float:
  """The rate as a float in [0, 1); a key is required when it is positive."""
  dropout_rate = _checks.static_float(fn, "dropout_rate", dropout_rate)
  if not 0.0 <= dropout_rate < 1.0:
    raise _err(fn, "dropout_rate", f"must be in [0, 1); got {dropout_rate}.")
  if dropout_rate > 0.0 and dropout_key is None:
    raise _err(fn, "dropout_key", f"is required when dropout_rate > 0 (got rate {dropout_rate}).")
  return dropout_rate


def canonical_dropout(fn: str, dropout_rate, dropout_key):
  """(rate, words): the rate as a float in [0, 1) and the key's two uint32 words (None at rate 0)."""
  dropout_rate = canonical_dropout_rate(fn, dropout_rate, dropout_key)
  if dropout_rate == 0.0:
    return dropout_rate, None
  k = jnp.asarray(dropout_key) if not isinstance(dropout_key, jax.Array) else dropout_key
  if not jax.dtypes.issubdtype(k.dtype, jax.dtypes.prng_key):
    if k.dtype != jnp.uint32:
      raise TypeError(f"{fn}: dropout_key must be a key from jax.random.key or "
                      f"jax.random.PRNGKey; got dtype {k.dtype}.")
    if k.ndim == 0 or k.shape[-1] != 2:
      raise _err(fn, "dropout_key", f"as raw uint32 key data must have shape (2,) "
                 f"(jax.random.PRNGKey); got {_fmt(k.shape)}.")
    k = jax.random.wrap_key_data(k)
  if k.shape != ():
    raise _err(fn, "dropout_key", f"must be a single key (shape ()); got key shape {_fmt(k.shape)}.")
  return dropout_rate, jax.random.bits(k, (2,), jnp.uint32)


def canonical_functions(fn: str, mask_fn, score_fn, B: int, N: int, T: int, S: int):
  """mask_fn as a jaxattn.masks.Mask and score_fn as a jaxattn.scores.ScoreMod (or None),
  each validated against the problem's sizes."""
  if mask_fn is not None:
    if not isinstance(mask_fn, _masks.Mask):
      if not callable(mask_fn):
        raise TypeError(f"{fn}: mask_fn must be a jaxattn.masks.Mask or a function "
                        f"(b, h, q_idx, kv_idx) -> bool; got {type(mask_fn).__name__}.")
      mask_fn = _masks.from_function(mask_fn)
    mask_fn = _masks.lift_traced_closures(mask_fn)
    mask_fn.validate(fn, B, N, T, S)
  if score_fn is not None:
    if not isinstance(score_fn, _scores.ScoreMod):
      if not callable(score_fn):
        raise TypeError(f"{fn}: score_fn must be a jaxattn.scores.ScoreMod or a function "
                        f"(score, b, h, q_idx, kv_idx) -> score; got {type(score_fn).__name__}.")
      score_fn = _scores.from_function(score_fn)
    score_fn = _scores.lift_traced_closures(score_fn)
    score_fn.validate(fn, B, N, T, S)
  return mask_fn, score_fn


def normalize(query, key, value, bias=None, mask=None, *, scale=None,
              is_causal=False, query_seq_lengths=None,
              key_value_seq_lengths=None, local_window_size=None,
              query_segment_ids=None, key_value_segment_ids=None,
              logits_soft_cap=None, causal_alignment="top_left",
              dropout_rate=0.0, dropout_key=None, mask_fn=None, score_fn=None,
              fn: str = _FN):
  """Validates public arguments; returns (inputs, config, rank3).

  `fn` names the public function in error messages.
  """
  query, key, value, rank3 = canonical_qkv(fn, query, key, value)
  B, T, N, H = query.shape
  S = key.shape[1]
  bias, mask = canonical_bias_and_mask(fn, bias, mask, (B, N, T, S), rank3)
  query_seq_lengths = canonical_lengths(fn, "query_seq_lengths", query_seq_lengths, B, T, rank3)
  key_value_seq_lengths = canonical_lengths(fn, "key_value_seq_lengths", key_value_seq_lengths, B, S, rank3)
  query_segment_ids, key_value_segment_ids = canonical_segments(
      fn, query_segment_ids, key_value_segment_ids, B, T, S, rank3)
  window = canonical_window(fn, local_window_size)
  is_causal, q_offset = canonical_causal(fn, is_causal, causal_alignment, T, S)
  scale, logits_soft_cap = canonical_scale_and_cap(fn, scale, logits_soft_cap, H)
  dropout_rate, words = canonical_dropout(fn, dropout_rate, dropout_key)
  mask_fn, score_fn = canonical_functions(fn, mask_fn, score_fn, B, N, T, S)
  inputs = common.AttentionInputs(
      query, key, value, bias, mask, query_seq_lengths, key_value_seq_lengths,
      query_segment_ids, key_value_segment_ids, words, mask_fn, score_fn)
  config = common.AttentionConfig(
      scale=scale, is_causal=is_causal, q_offset=q_offset, window=window,
      logits_soft_cap=logits_soft_cap, dropout_rate=dropout_rate)
  return inputs, config, rank3


# GPU dispatch order per compute capability (major, minor): the first
# implementation in the entry for the largest capability <= the device's that
# serves the arguments runs. The order is measured, and these are the figures
# it came from (issue 12; H200, compute capability 9.0, jax 0.11.2, CUDA 13,
# bf16 B=2 T=S=8192 N=K=16 H=128, medians of 10 in one process, ms):
#
#                               causal fwd  causal fwd+bwd  dense fwd
#   "cudnn" (jaxattn)                 1.47            4.01       2.12
#   "pallas" (Triton)                 3.08           10.0        5.27
#   "chunked"                        13.2            36.4       20.1
#   tokamax Mosaic GPU (a peer)       1.10            4.25       1.95
#
# and, where cuDNN does not serve (8 packed documents of 1024, causal):
#   "pallas" 0.81 fwd / 1.90 fwd+bwd; soft-cap 30 causal: 3.93 / 13.2.
#
# So cuDNN first where it serves, then the Pallas Triton kernel; what neither
# serves goes to "chunked" (below). "mosaic" (jaxattn._impl.mosaic) is not in
# the table: it has been run in Pallas' GPU interpreter and lowered for CUDA
# on CPU only, never compiled or timed on a GPU, so nothing says it beats
# "pallas" (or that it compiles there). Add it to the 9.0 entry (and only
# there: it needs wgmma/TMA) with its figures once `bench/gpu.sh` has
# measured it. Below 9.0 nothing was measured: the same order, by the same
# reasoning (cuDNN's fused kernel vs a Triton kernel).
GPU_ORDER: dict[tuple[int, int], tuple[str, ...]] = {
    (0, 0): ("cudnn", "pallas"),
    (9, 0): ("cudnn", "pallas"),
}


def _compute_capability() -> tuple[int, int] | None:
  try:
    cc = common.cuda_gpu()[1]
    major, minor = (str(cc).split(".") + ["0"])[:2]
    return int(major), int(minor)
  except Exception:  # no GPU device, or a device without the attribute
    return None


def gpu_order(compute_capability: tuple[int, int] | None = None) -> tuple[str, ...]:
  """The GPU dispatch order for a compute capability (default: the device's)."""
  cc = compute_capability or _compute_capability() or (0, 0)
  return GPU_ORDER[max(k for k in GPU_ORDER if k <= tuple(cc))]


def choose_implementation(inputs: common.AttentionInputs,
                          config: common.AttentionConfig, backend: str | None = None,
                          compute_capability: tuple[int, int] | None = None) -> str:
  """What `implementation=None` runs, from the backend and the static arguments.

  GPU: the first implementation of `gpu_order(compute_capability)` (cudnn,
  then pallas; see GPU_ORDER for the measurements) that serves the
  arguments. TPU: "splash" (JAX's splash attention kernel) where it serves
  them. Otherwise (CPU, TPU and GPU leftovers) "chunked" from 256 x 256
  logits per head up, "xla" below (measured on CPU: the materialized path
  wins there). Symbolic sequence lengths (`jax.export` shape polymorphism)
  get "xla": the blocked kernels plan their blocks from concrete sizes.
  """
  T, S = inputs.query.shape[1], inputs.key.shape[1]
  if not _checks.concrete_sizes(*inputs.query.shape[1:], *inputs.key.shape[1:]):
    return "xla"  # symbolic sizes (jax.export shape polymorphism): the kernels plan statically
  backend = common.platform(backend or None)
  if backend == "gpu":
    cc = compute_capability or _compute_capability()
    cc_text = None if cc is None else f"{cc[0]}.{cc[1]}"
    for name in gpu_order(cc):
      if name in _impl.names() and _impl.unsupported_reason(name, inputs, config, "gpu", cc_text) is None:
        return name
  if backend == "tpu":
    if "splash" in _impl.names() and _impl.unsupported_reason("splash", inputs, config, "tpu") is None:
      return "splash"
  if "chunked" in _impl.names() and T * S >= _CHUNKED_MIN_LOGITS:
    return "chunked"
  return "xla"


def _attend(inputs, *, name, config, options):
  return _impl.get(name)(common.vary_alike(common.zero_padding(inputs)), config, **dict(options))


_attend_jit = jax.jit(_attend, static_argnames=("name", "config", "options"))


def _run(inputs, *, name, config, options):
  # A Hoisted function holds tracers: traced inline, it stays out of jit's
  # cache keys (which would keep a finished trace alive, and grow per trace).
  holds = _checks.holds_hoisted(inputs.mask_fn) or _checks.holds_hoisted(inputs.score_fn)
  run = _attend if holds else _attend_jit
  return run(inputs, name=name, config=config, options=options)


def dot_product_attention(
    query, key, value, bias=None, mask=None, *,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    local_window_size: int | tuple[int | None, int | None] | None = None,
    implementation: str | None = None,
    return_residual: bool = False,
    query_segment_ids=None,
    key_value_segment_ids=None,
    logits_soft_cap: float | None = None,
    causal_alignment: Literal["top_left", "bottom_right"] = "top_left",
    dropout_rate: float = 0.0,
    dropout_key=None,
    mask_fn=None,
    score_fn=None,
    block_sizes: tuple[int, int] | None = None,
):
  r"""Scaled dot-product attention; a drop-in superset of jax.nn's.

  .. math:: \mathrm{softmax}(\mathrm{cap}(s \cdot QK^T) + \mathrm{bias},
     \text{where}=\mathrm{mask}) V

  Shapes use B batch, T query length, S key length, N query heads, K key/value
  heads (N % K == 0: GQA, MQA when K == 1; K/V are never copied per group), H
  head dim.

  Args:
    query: (B, T, N, H) or (T, N, H).
    key: (B, S, K, H) or (S, K, H), the query's dtype.
    value: (B, S, K, Hv) or (S, K, Hv), the query's dtype; Hv may differ
      from H (jax.nn requires Hv == H).
    bias: optional float array added to the logits, broadcastable to
      (B, N, T, S) (or (N, T, S)) by NumPy rules, as in jax.nn: missing
      leading dims are 1, so a (S,) or (T, S) bias applies to every batch and
      head; differentiable.
    mask: optional boolean array, True = attend, broadcastable like bias.
    scale: logit scale, default 1/sqrt(H); must be finite.
    is_causal: mask keys after the query's position.
    query_seq_lengths: int (B,); query rows at or past the length give 0.
    key_value_seq_lengths: int (B,); keys at or past the length are masked.
      Lengths are clipped to [0, T] / [0, S] (any integer width). Padding
      (query rows and key/value slots past the lengths) never reaches an
      output or a gradient, even if it holds NaN or inf.
    local_window_size: `w` or `(left, right)`: query at position p sees keys
      in [p - left, p + right]; a side may be None (unbounded).
    implementation: None (choose per backend and shape), or a registered
      name: see `jaxattn.implementations()`. For forward-mode autodiff
      (`jax.jvp`, `jax.jacfwd`, `jax.hessian`) in O(T) memory, use
      "chunked_jvp"; the other blocked implementations have custom VJPs.
    return_residual: also return the logsumexp of the masked logits, (B, T, N)
      or (T, N), differentiable (-inf for a fully masked row).
    query_segment_ids: int (B, T); a query attends only to keys with the same
      id (packed documents). Ids of any integer width keep their meaning.
    key_value_segment_ids: int (B, S); defaults to query_segment_ids if T == S.
    logits_soft_cap: `cap * tanh(logits / cap)` applied to the scaled logits,
      before the bias (Gemma 2).
    causal_alignment: "top_left" (jax.nn's: query i at key position i) or
      "bottom_right" (query i at position S - T + i: decoding against a
      cache). Applies to is_causal and local_window_size.
    dropout_rate: probability of dropping an attention weight; kept weights
      are scaled by 1 / (1 - rate). The logsumexp is unaffected.
    dropout_key: a `jax.random.key`, required when dropout_rate > 0. The same
      key draws the same mask in every implementation.
    mask_fn: a `jaxattn.masks.Mask` or a function (b, h, q_idx, kv_idx) ->
      bool over broadcastable int32 index arrays (True = attend); combined
      with every other mask argument. Blocked implementations skip the blocks
      it leaves empty (see jaxattn.masks).
    score_fn: a `jaxattn.scores.ScoreMod` or a function (score, b, h, q_idx,
      kv_idx) -> score, applied to the scaled logits before the soft-cap and
      the bias; arrays held by a ScoreMod get gradients.
    block_sizes: (query block, key block) for blocked implementations.

  Returns:
    The output, (B, T, N, Hv) or (T, N, Hv) in the query's dtype; with return_residual, the
    tuple (output, logsumexp).

  Raises:
    ValueError: a shape or value does not fit (the message names the argument
      and the expected shape); unknown implementation.
    TypeError: a dtype does not fit.
    NotImplementedError: the named implementation cannot serve this input.

  Differences from jax.nn: a query row with no key to attend to gives 0 (jax.nn
  gives the mean of V), its logsumexp is -inf, and the residual is
  differentiable. NaN in padding masked by the lengths does not propagate
  (jax.nn's output is NaN). float64 inputs are computed in float64 ("xla",
  "chunked"; "pallas" raises NotImplementedError). Second-order reverse mode
  (jax.grad of jax.grad) works on "xla" only; "chunked" and "pallas" raise
  NotImplementedError naming it; forward mode (jax.jvp) needs "xla" or
  "chunked_jvp" (O(T) memory).

  >>> import jax, jaxattn
  >>> q = k = v = jax.random.normal(jax.random.key(0), (2, 5, 4, 8))
  >>> jaxattn.dot_product_attention(q, k, v, is_causal=True).shape
  (2, 5, 4, 8)
  """
  if implementation is not None and implementation not in _impl.names():
    raise ValueError(f"{_FN}: implementation must be None or one of "
                     f"{', '.join(map(repr, _impl.names()))}; got {implementation!r}.")
  block_sizes = _checks.block_sizes(_FN, block_sizes)
  inputs, config, rank3 = normalize(
      query, key, value, bias, mask, scale=scale, is_causal=is_causal,
      query_seq_lengths=query_seq_lengths,
      key_value_seq_lengths=key_value_seq_lengths,
      local_window_size=local_window_size, query_segment_ids=query_segment_ids,
      key_value_segment_ids=key_value_segment_ids,
      logits_soft_cap=logits_soft_cap, causal_alignment=causal_alignment,
      dropout_rate=dropout_rate, dropout_key=dropout_key, mask_fn=mask_fn, score_fn=score_fn)
  name = implementation or choose_implementation(inputs, config)
  blocks = block_sizes or _tuning.block_sizes_for(name, inputs, config)
  options = () if blocks is None or name == "xla" else (("block_sizes", blocks),)
  try:
    out, lse = _run(inputs, name=name, config=config, options=options)
  except TypeError as e:
    if "forward-mode" not in str(e):
      raise
    raise TypeError(
        f"{_FN}: implementation={name!r} has a custom VJP, which JAX cannot differentiate in "
        f"forward mode (jax.jvp, jax.jacfwd, jax.hessian); use implementation='chunked_jvp' "
        f"(O(T) memory) or 'xla'.") from e
  except NotImplementedError:
    if implementation is not None or name in ("xla", "chunked"):
      raise
    # A kernel refused at trace time what its static check let through: the
    # portable implementations serve every valid input.
    name = "chunked" if inputs.query.shape[1] * inputs.key.shape[1] >= _CHUNKED_MIN_LOGITS else "xla"
    blocks = block_sizes or _tuning.block_sizes_for(name, inputs, config)
    options = () if blocks is None or name == "xla" else (("block_sizes", blocks),)
    out, lse = _run(inputs, name=name, config=config, options=options)
  if rank3:
    out, lse = out[0], lse[0]
  if return_residual:
    return out, lse.astype(out.dtype)
  return out


def implementations() -> tuple[str, ...]:
  """Names accepted by `dot_product_attention(implementation=...)`."""
  return _impl.names()
