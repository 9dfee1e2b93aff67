"""cuDNN's fused flash attention, through `jax.nn.dot_product_attention(implementation="cudnn")`.

Serves what cuDNN's kernel takes: a CUDA GPU, float16/bfloat16, H == Hv, H a
multiple of 8 up to 128 (256 from compute capability 9.0), top-left causal
and left-only sliding windows, query/key lengths, a dense boolean mask and a
bias (full in T and S; broadcast ones are expanded), GQA/MQA. Everything else
raises NotImplementedError naming the reason, so `implementation=None` falls
back: segment ids, mask_fn, score_fn, logits_soft_cap (jax.nn passes none of
them to cuDNN), dropout (jaxattn's dropout mask is a hash of the key and the
indices, cuDNN draws its own), bottom-right alignment with T != S, windows
that look right, and rows left with no key by a window.

jaxattn's semantics are kept around the call:
- A row with no key to attend to gives 0 and lse -inf (cuDNN, like jax.nn,
  gives the mean of V there): a row-validity (B, T, N) is computed from the
  mask arguments, O(B T) for causal/window/lengths, and from the dense mask
  and bias where given (they are T x S already). Its cotangent is zeroed, so
  gradients stay finite; -inf bias entries become a large finite negative.
- The logsumexp is differentiable. jax.nn's cuDNN rule drops the cotangent of
  its residual, so a nonzero lse cotangent (ring attention merges, not plain
  training) adds its share through the materialized "xla" implementation's
  VJP: O(B N T S) memory on that path only.
- jax.nn returns the logsumexp rounded to the output dtype (bf16/f16): lse
  from this implementation carries that rounding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jaxattn._impl import common

_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))



def unsupported_reason(inputs: common.AttentionInputs, config: common.AttentionConfig, *,
                       backend: str | None = None, compute_capability: str | None = None) -> str | None:
  """Why cuDNN can't serve these arguments, or None if it can.

  `backend` and `compute_capability` override the detected ones (for tests).
  With `backend="gpu"` and no compute capability on a machine whose default
  backend is a GPU, both are detected: a ROCm GPU is refused, and a Hopper's
  head-dim limit applies.
  """
  if backend is None or (backend == "gpu" and compute_capability is None
                         and jax.default_backend() == "gpu"):
    cuda, detected_cc, name = common.cuda_gpu()
    if not cuda:
      return f"cudnn needs a CUDA GPU backend; the default backend is {name}"
    compute_capability = compute_capability or detected_cc
  elif backend != "gpu":
    return f"cudnn needs a CUDA GPU backend; the default backend is {backend}"
  B, T, N, H = inputs.query.shape
  _, S, K, Hv = inputs.value.shape
  dtype = jnp.dtype(inputs.query.dtype)
  if dtype not in _DTYPES:
    return f"cudnn needs float16 or bfloat16 inputs; got {dtype}"
  if Hv != H:
    return f"cudnn needs the value head dim Hv to equal H; got H={H}, Hv={Hv}"
  major = int(str(compute_capability or "0").split(".")[0])
  h_max = 256 if major >= 9 else 128
  if H % 8 or H > h_max:
    return (f"cudnn needs the head dim H to be a multiple of 8 and <= {h_max} on compute "
            f"capability {compute_capability}; got H={H}")
  if config.dropout_rate > 0.0:
    return "cudnn draws its own dropout mask, not jaxattn's (a hash of dropout_key and the indices)"
  if inputs.query_segment_ids is not None:
    return "cudnn is not given segment ids by jax.nn.dot_product_attention"
  if inputs.mask_fn is not None:
    return "cudnn takes no mask_fn"
  if inputs.score_fn is not None:
    return "cudnn takes no score_fn"
  if config.logits_soft_cap is not None:
    return "cudnn takes no logits_soft_cap"
  band = common.band(config)
  if band is not None:
    left, right = band
    if right != 0:
      return f"cudnn's sliding window looks left only; got local_window_size right side {right}"
    if config.q_offset != 0:
      return f"cudnn aligns causal masks top-left; got bottom-right with T={T} != S={S}"
    if left is not None and T > S + left:
      return f"cudnn would see query rows with no key in the window (T={T} > S + left = {S + left})"
  if inputs.bias is not None and (T % 2 or S % 2):
    return f"cudnn with a bias needs even T and S; got T={T}, S={S}"
  return None


def _large_negative(dtype):
  # jax.nn's value for masked logits on cuDNN (a cuDNN workaround for
  # differences of two large negatives).
  return -(2 << 40) if jnp.dtype(dtype) == jnp.bfloat16 else -(2 << 14)


def _row_valid(inputs: common.AttentionInputs, config: common.AttentionConfig):
  """(B, T, N) bool: rows with at least one key to attend to."""
  q = inputs.query
  B, T, N, _ = q.shape
  S = inputs.key.shape[1]
  t = jnp.arange(T)
  lo = jnp.zeros((T,), jnp.int32)
  hi = jnp.full((T,), S - 1, jnp.int32)
  band = common.band(config)
  if band is not None:
    left, right = band
    pos = t + config.q_offset
    if left is not None:
      lo = jnp.maximum(lo, pos - left)
    if right is not None:
      hi = jnp.minimum(hi, pos + right)
  hi = jnp.broadcast_to(hi, (B, T))
  if inputs.key_value_seq_lengths is not None:
    hi = jnp.minimum(hi, inputs.key_value_seq_lengths[:, None] - 1)
  valid = hi >= lo[None, :]
  if inputs.query_seq_lengths is not None:
    valid = valid & (t[None, :] < inputs.query_seq_lengths[:, None])
  valid = jnp.broadcast_to(valid[:, :, None], (B, T, N))
  if inputs.mask is None and inputs.bias is None:
    return valid
  # A dense mask or -inf bias entries can empty a row: check element by element.
  j = jnp.arange(S)
  allowed = (j[None, None, :] >= lo[None, :, None]) & (j[None, None, :] <= hi[:, :, None])  # (B, T, S)
  allowed = allowed[:, None]  # (B, 1, T, S)
  if inputs.mask is not None:
    allowed = allowed & inputs.mask
  if inputs.bias is not None:
    allowed = allowed & (inputs.bias > -jnp.inf)
  any_key = jnp.any(allowed, axis=-1)  # (B, N|1, T)
  return valid & jnp.broadcast_to(any_key, (B, N, T)).transpose(0, 2, 1)


def _call(config: common.AttentionConfig, kernel: str, q, k, v, bias, mask, q_len, kv_len):
  """jax.nn's attention on the cuDNN-ready arguments: (out, lse float32)."""
  band = common.band(config)
  kw = {}
  if band is not None:
    kw["is_causal"] = True
    if band[0] is not None:
      kw["local_window_size"] = (band[0], 0)
  out, lse = jax.nn.dot_product_attention(
      q, k, v, bias, mask, scale=config.scale, query_seq_lengths=q_len,
      key_value_seq_lengths=kv_len, implementation=kernel, return_residual=True, **kw)
  return out, lse.astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attend(config, kernel, q, k, v, bias, mask, q_len, kv_len, valid):
  out, lse = _call(config, kernel, q, k, v, bias, mask, q_len, kv_len)
  return (jnp.where(valid[..., None], out, jnp.zeros((), out.dtype)),
          jnp.where(valid, lse, -jnp.inf))


def _attend_fwd(config, kernel, q, k, v, bias, mask, q_len, kv_len, valid):
  q, k, v, bias, mask, q_len, kv_len, valid = (
      None if x is None else x.value for x in (q, k, v, bias, mask, q_len, kv_len, valid))
  call = lambda q, k, v, bias: _call(config, kernel, q, k, v, bias, mask, q_len, kv_len)
  (out, lse), pull = jax.vjp(call, q, k, v, bias)
  result = (jnp.where(valid[..., None], out, jnp.zeros((), out.dtype)),
            jnp.where(valid, lse, -jnp.inf))
  return result, (pull, q, k, v, bias, mask, q_len, kv_len, valid, lse)


def _attend_bwd(config, kernel, res, cts):
  pull, q, k, v, bias, mask, q_len, kv_len, valid, lse = res
  d_out, d_lse = cts
  if isinstance(d_out, SymbolicZero):
    d_out = jnp.zeros(q.shape[:3] + v.shape[3:], q.dtype)
  d_out = jnp.where(valid[..., None], d_out, jnp.zeros((), d_out.dtype))
  dq, dk, dv, dbias = pull((d_out, jnp.zeros_like(lse)))
  if not isinstance(d_lse, SymbolicZero):
    # jax.nn's cuDNN rule ignores the residual's cotangent: add the lse share
    # (dS += P * dlse) through the materialized implementation.
    from jaxattn._impl import xla  # noqa: PLC0415
    dl = jnp.where(valid, d_lse.astype(jnp.float32), 0.0)
    lse_of = lambda q, k, v, bias: xla.xla_attention(
        common.AttentionInputs(q, k, v, bias, mask, q_len, kv_len), config)[1]
    _, pull_lse = jax.vjp(lse_of, q, k, v, bias)
    gq, gk, gv, gb = pull_lse(dl)
    dq, dk, dv = dq + gq.astype(dq.dtype), dk + gk.astype(dk.dtype), dv + gv.astype(dv.dtype)
    if bias is not None:
      dbias = dbias + gb.astype(dbias.dtype)
  return dq, dk, dv, dbias, None, None, None, None


_attend.defvjp(_attend_fwd, _attend_bwd, symbolic_zeros=True)


def _prepare(inputs: common.AttentionInputs):
  """cuDNN-ready bias, mask and lengths: full T, S; finite; lengths >= 1."""
  B, T, N, _ = inputs.query.shape
  S = inputs.key.shape[1]
  bias, mask = inputs.bias, inputs.mask
  if bias is not None:
    bias = jnp.broadcast_to(bias, bias.shape[:2] + (T, S))
    bias = jnp.maximum(bias, jnp.asarray(_large_negative(bias.dtype), bias.dtype))
  if mask is not None:
    mask = jnp.broadcast_to(mask, mask.shape[:2] + (T, S))
  # Rows with no key are zeroed afterwards; lengths of 0 are raised to 1 so
  # cuDNN never normalizes an empty row (their cotangents are zero).
  q_len, kv_len = inputs.query_seq_lengths, inputs.key_value_seq_lengths
  if q_len is not None:
    q_len = jnp.maximum(q_len, 1)
  if kv_len is not None:
    kv_len = jnp.maximum(kv_len, 1)
  return bias, mask, q_len, kv_len


def attention(inputs: common.AttentionInputs, config: common.AttentionConfig, *, kernel: str = "cudnn"):
  """The call behind `cudnn_attention`, without the checks.

  `kernel` is jax.nn's implementation: "cudnn"; "xla" runs the same wrapper
  (validity, lse gradient) on any backend, for tests.
  """
  bias, mask, q_len, kv_len = _prepare(inputs)
  valid = _row_valid(inputs, config)
  return _attend(config, kernel, inputs.query, inputs.key, inputs.value, bias, mask, q_len,
                 kv_len, valid)


def cudnn_attention(inputs: common.AttentionInputs, config: common.AttentionConfig, *,
                    block_sizes: tuple[int, int] | None = None):
  """Returns (output (B, T, N, H) in query dtype, lse (B, T, N) float32).

  Raises:
    NotImplementedError: cuDNN can't serve these arguments; the message says why.
  """
  del block_sizes  # cuDNN picks its own tiles
  reason = unsupported_reason(inputs, config)
  if reason is not None:
    raise NotImplementedError(f"dot_product_attention: implementation='cudnn': {reason}.")
  try:
    return attention(inputs, config)
  except RuntimeError as exc:  # e.g. "cuDNN is not detected."
    raise NotImplementedError(f"dot_product_attention: implementation='cudnn': {exc}") from exc
