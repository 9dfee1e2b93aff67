"""JAX's TPU splash attention kernel, behind jaxattn's semantics.

Splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`) is a
block-sparse flash attention kernel for TPU: a static mask, known when the
kernel is built, decides which (query block, key block) tiles run at all;
segment ids mask packed documents inside the tiles it runs.

Serves, on TPU (and in Pallas' TPU interpret mode elsewhere, for tests):
float32 and bfloat16; any head dims H and Hv (zero-padded to multiples of
128); MHA, GQA and MQA without K/V copies (splash maps query head n to key
head n // (N // K), as jaxattn does); causal masks in both alignments,
sliding windows (a splash LocalMask with an offset); query and key lengths
and segment ids (as splash segment ids); mask_fn when it holds no arrays
and does not depend on the batch index (evaluated at trace time into a
static splash NumpyMask per head: its block map makes splash skip empty
tiles); logits_soft_cap. Refused with NotImplementedError naming the
reason, so `implementation=None` falls back: bias, a dense `mask=` array,
score_fn, dropout, float16, mask_fn holding arrays or depending on traced
values or the batch index, block sizes that are not multiples of 128.

jaxattn's semantics around the kernel:
- T and S are padded to multiples of the block sizes; padded and
  past-the-length keys get a segment id no query has, so they are never
  attended; padded query rows are sliced off.
- The scale is folded into the query (splash applies none).
- A row with no key to attend to gives 0 and lse -inf: splash gives such a
  row its `mask_value` logits (lse near -2.4e38, or -inf where the row's
  whole block is skipped), so rows with lse below half the mask value are
  zeroed, and their cotangents too, so gradients stay finite.
- The logsumexp is differentiable. Splash's residual-saving forward (which
  returns the lse) has no VJP, so the backward pass recomputes splash's
  differentiable forward once and runs splash's backward kernels on it. A
  nonzero lse cotangent (ring attention merges, not plain training) adds its
  share through the pure-JAX blocked backward of "chunked", from the saved
  output and lse (O(block) memory).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from jaxattn import masks as _masks
from jaxattn._impl import common

try:  # Pallas' TPU ops ship with jax; guard against stripped installs.
  from jax.experimental.pallas.ops.tpu import splash_attention as _splash
except ImportError as _exc:  # pragma: no cover - depends on the installed jax
  _splash = None
  _IMPORT_ERROR = str(_exc)

_LANES = 128  # splash's key blocks, and our head-dim padding, are multiples of this
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # splash's default, passed explicitly
# A mask_fn is evaluated densely at trace time over (B, N, T, S) positions.
_MAX_DENSE_MASK = 2**26


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m



def default_block_sizes(T: int, S: int) -> tuple[int, int]:
  """Splash's default tiles (128 x 128, `BlockSizes.get_default()`), shrunk to
  the padded sequence lengths."""
  d = _splash.BlockSizes.get_default()
  return min(d.block_q, _round_up(T, _LANES)), min(d.block_kv, _round_up(S, _LANES))


def _block_sizes_reason(block_sizes) -> str | None:
  if block_sizes is None:
    return None
  bq, bk = block_sizes
  if bq % _LANES or bk % _LANES:
    return f"splash needs block_sizes that are multiples of {_LANES}; got {block_sizes}"
  return None


def _dense_static_mask(mask_fn, band, offset: int, B: int, N: int, T: int, S: int,
                       Tp: int, Sp: int):
  """The mask_fn (and band) as numpy bool (N', Tp, Sp), N' in (1, N); or a reason str.

  Padded keys are masked; padded query rows see the real keys (they are
  sliced off, and keep splash's arithmetic finite).
  """
  if jax.tree_util.tree_leaves(mask_fn):
    return ("splash takes a mask_fn only when it holds no arrays (its values are computed "
            "at trace time); pass lengths and segment ids as arguments instead")
  args = (mask_fn, band, offset, B, N, T, S, Tp, Sp)
  try:
    hash(args)
  except TypeError:  # a user mask with unhashable static fields: evaluate it every time
    return _evaluate_static_mask(*args)
  return _cached_static_mask(*args)


def _evaluate_static_mask(mask_fn, band, offset, B, N, T, S, Tp, Sp):
  if B * N * Tp * Sp > _MAX_DENSE_MASK:
    return (f"splash evaluates mask_fn at trace time over B * N * T * S positions; "
            f"{B} * {N} * {Tp} * {Sp} exceeds {_MAX_DENSE_MASK}")
  m = mask_fn if band is None else _masks.all_of(_masks.Band(band[0], band[1], offset), mask_fn)
  b = np.arange(B, dtype=np.int32)[:, None, None, None]
  h = np.arange(N, dtype=np.int32)[None, :, None, None]
  q = np.arange(Tp, dtype=np.int32)[None, None, :, None]
  kv = np.arange(Sp, dtype=np.int32)[None, None, None, :]
  try:
    with jax.ensure_compile_time_eval():
      dense = np.asarray(jnp.broadcast_to(m(b, h, q, kv), (B, N, Tp, Sp)))
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError,
          jax.errors.TracerBoolConversionError):
    return "splash needs a mask_fn whose values can be computed at trace time; it uses traced values"
  if not np.all(dense == dense[:1]):
    return "splash masks are per head, not per batch element; mask_fn depends on the batch index"
  dense = dense[0] & (kv[0] < S)
  dense = dense | ((q[0] >= T) & (kv[0] < S))
  if np.all(dense == dense[:1]):
    dense = dense[:1]
  return dense


_cached_static_mask = functools.lru_cache(maxsize=32)(_evaluate_static_mask)


def _static_reason(inputs: common.AttentionInputs, config: common.AttentionConfig,
                   block_sizes=None) -> str | None:
  """Why splash can't serve these arguments on any backend, or None."""
  if _splash is None:  # pragma: no cover
    return f"splash attention is not importable from this jax: {_IMPORT_ERROR}"
  dtype = jnp.dtype(inputs.query.dtype)
  if dtype not in _DTYPES:
    return f"splash takes float32 or bfloat16 inputs; got {dtype}"
  if inputs.bias is not None:
    return "splash takes no bias"
  if inputs.mask is not None:
    return "splash takes no dense mask array (a static mask_fn is served)"
  if inputs.score_fn is not None:
    return "splash takes no score_fn (logits_soft_cap is served)"
  if config.dropout_rate > 0.0:
    return "splash has no attention dropout"
  reason = _block_sizes_reason(block_sizes)
  if reason is not None:
    return reason
  if inputs.mask_fn is not None:
    B, T, N, _ = inputs.query.shape
    S = inputs.key.shape[1]
    bq, bk = block_sizes or default_block_sizes(T, S)
    dense = _dense_static_mask(inputs.mask_fn, common.band(config), config.q_offset, B, N, T, S,
                               _round_up(T, bq), _round_up(S, bk))
    if isinstance(dense, str):
      return dense
  return None


def unsupported_reason(inputs: common.AttentionInputs, config: common.AttentionConfig, *,
                       backend: str | None = None, block_sizes=None) -> str | None:
  """Why splash can't serve these arguments on `backend` (default: JAX's), or None.

  Off TPU splash serves nothing here: dispatch never picks it there, while
  `implementation="splash"` runs it in Pallas' TPU interpret mode (tests).
  """
  backend = common.platform(backend)
  if backend != "tpu":
    return f"splash is a TPU kernel; the backend is {backend}"
  return _static_reason(inputs, config, block_sizes)


class _Plan:
  """Static layout: block sizes, padded sizes, splash kernels."""

  def __init__(self, inputs: common.AttentionInputs, config: common.AttentionConfig,
               block_sizes, interpret: bool):
    B, T, N, H = inputs.query.shape
    _, S, K, Hv = inputs.value.shape
    bq, bk = block_sizes or default_block_sizes(T, S)
    self.B, self.T, self.S, self.N, self.K, self.H, self.Hv = B, T, S, N, K, H, Hv
    self.Tp, self.Sp = _round_up(T, bq), _round_up(S, bk)
    self.Hp, self.Hvp = _round_up(H, _LANES), _round_up(Hv, _LANES)
    self.scale = config.scale
    band = common.band(config)
    shape = (self.Tp, self.Sp)
    if inputs.mask_fn is not None:
      dense = _dense_static_mask(inputs.mask_fn, band, config.q_offset, B, N, T, S, self.Tp, self.Sp)
      heads = [_splash.NumpyMask(d) for d in dense]
      mask = _splash.MultiHeadMask(heads * N if len(heads) == 1 else heads)
    else:
      if band is None:
        head = _splash.FullMask(shape)
      else:
        head = _splash.LocalMask(shape, band, config.q_offset)
      mask = _splash.MultiHeadMask([head] * N)
    sizes = _splash.BlockSizes(
        block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
        block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
    self.mqa = K == 1
    make = _splash.make_splash_mqa_single_device if self.mqa else _splash.make_splash_mha_single_device
    kw = dict(block_sizes=sizes, mask_value=_MASK_VALUE, attn_logits_soft_cap=config.logits_soft_cap,
              interpret=interpret)
    # The kernels' block maps are constants: build them outside any trace.
    with jax.ensure_compile_time_eval():
      self.forward_kernel = make(mask, save_residuals=True, **kw)
      self.grad_kernel = make(mask, save_residuals=False, **kw)
    # Segment ids carry lengths, padded keys and the caller's segment ids.
    self.segmented = (self.Sp != S or inputs.key_value_seq_lengths is not None
                      or inputs.query_segment_ids is not None)


def _segment_ids(p: _Plan, inputs: common.AttentionInputs):
  """(q ids (B, Tp), kv ids (B, Sp)) int32, or None when nothing needs them.

  Keys past S or past their length get an id below every query id of their
  sequence (above, if the minimum is int32's), so no query attends them.
  """
  if not p.segmented:
    return None
  if inputs.query_segment_ids is not None:
    q_ids, kv_ids = inputs.query_segment_ids, inputs.key_value_segment_ids
  else:
    q_ids = jnp.zeros((p.B, p.T), jnp.int32)
    kv_ids = jnp.zeros((p.B, p.S), jnp.int32)
  lo, hi = jnp.min(q_ids, axis=1), jnp.max(q_ids, axis=1)
  int_min = jnp.iinfo(jnp.int32).min
  unused = jnp.where(lo > int_min, lo - 1, hi + 1)[:, None]
  keep = jnp.ones((p.B, p.S), bool)
  if inputs.key_value_seq_lengths is not None:
    keep = jnp.arange(p.S)[None, :] < inputs.key_value_seq_lengths[:, None]
  kv_ids = jnp.where(keep, kv_ids, unused)
  kv_ids = jnp.concatenate([kv_ids, jnp.broadcast_to(unused, (p.B, p.Sp - p.S))], axis=1)
  q_ids = jnp.concatenate([q_ids, jnp.broadcast_to(lo[:, None], (p.B, p.Tp - p.T))], axis=1)
  return q_ids, kv_ids


def _to_splash(p: _Plan, q, k, v):
  """Scaled, padded, head-major: q (B, N, Tp, Hp); k, v (B, K, Sp, H*p) or (B, Sp, H*p) for MQA."""
  q = (q * jnp.asarray(p.scale, q.dtype)).astype(q.dtype)
  q = jnp.pad(q, ((0, 0), (0, p.Tp - p.T), (0, 0), (0, p.Hp - p.H))).transpose(0, 2, 1, 3)
  k = jnp.pad(k, ((0, 0), (0, p.Sp - p.S), (0, 0), (0, p.Hp - p.H))).transpose(0, 2, 1, 3)
  v = jnp.pad(v, ((0, 0), (0, p.Sp - p.S), (0, 0), (0, p.Hvp - p.Hv))).transpose(0, 2, 1, 3)
  if p.mqa:
    k, v = k[:, 0], v[:, 0]
  return q, k, v


def _call(p: _Plan, kernel, q, k, v, ids):
  """Runs `kernel` per batch element; output (B, T, N, Hv) (and lse (B, T, N))."""
  qs, ks, vs = _to_splash(p, q, k, v)
  if ids is None:
    result = jax.vmap(kernel)(qs, ks, vs)
  else:
    result = jax.vmap(lambda q, k, v, qi, ki: kernel(q, k, v, segment_ids=_splash.SegmentIds(qi, ki)))(
        qs, ks, vs, *ids)
  out, lse = result if isinstance(result, tuple) else (result, None)
  out = out[:, :, :p.T, :p.Hv].transpose(0, 2, 1, 3)
  if lse is None:
    return out
  (lse,) = lse
  return out, lse[:, :, :p.T].transpose(0, 2, 1).astype(jnp.float32)


def _row_valid(p: _Plan, inputs: common.AttentionInputs, lse):
  """(B, T, N) bool: rows that attend at least one key (and are within their length)."""
  valid = lse > 0.5 * _MASK_VALUE
  if inputs.query_seq_lengths is not None:
    valid = valid & (jnp.arange(p.T)[None, :, None] < inputs.query_seq_lengths[:, None, None])
  return valid


def _make_attend(p: _Plan, config: common.AttentionConfig):
  """The differentiable (out, lse) of the padded splash calls, as a custom VJP."""

  def forward(q, k, v, rest):
    inputs = rest._replace(query=q, key=k, value=v)
    out, lse = _call(p, p.forward_kernel, q, k, v, _segment_ids(p, inputs))
    valid = _row_valid(p, inputs, lse)
    out = jnp.where(valid[..., None], out, jnp.zeros((), out.dtype))
    lse = jnp.where(valid, lse, -jnp.inf)
    return (out, lse), valid

  @jax.custom_vjp
  def attend(q, k, v, rest):
    return forward(q, k, v, rest)[0]

  def attend_fwd(q, k, v, rest):
    q, k, v, rest = jax.tree_util.tree_map(
        lambda x: x.value, (q, k, v, rest), is_leaf=lambda x: hasattr(x, "perturbed"))
    (out, lse), valid = forward(q, k, v, rest)
    return (out, lse), (q, k, v, rest, out, lse, valid)

  def attend_bwd(res, cts):
    q, k, v, rest, out, lse, valid = res
    d_out, d_lse = cts
    inputs = rest._replace(query=q, key=k, value=v)
    ids = _segment_ids(p, inputs)
    if isinstance(d_out, SymbolicZero):  # only the lse is used (e.g. ring attention merges)
      dq, dk, dv = jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v)
    else:
      d_out = jnp.where(valid[..., None], d_out, jnp.zeros((), d_out.dtype))
      # Splash's residual-saving forward has no VJP: recompute its differentiable one.
      _, pull = jax.vjp(lambda q, k, v: _call(p, p.grad_kernel, q, k, v, ids), q, k, v)
      dq, dk, dv = pull(d_out)
    if not isinstance(d_lse, SymbolicZero):
      from jaxattn._impl import chunked  # noqa: PLC0415
      dl = jnp.where(valid, d_lse.astype(jnp.float32), 0.0)
      gq, gk, gv, _, _ = chunked.backward(inputs, config, out, lse, jnp.zeros_like(out), dl)
      dq, dk, dv = dq + gq.astype(dq.dtype), dk + gk.astype(dk.dtype), dv + gv.astype(dv.dtype)
    return dq, dk, dv, None

  attend.defvjp(attend_fwd, attend_bwd, symbolic_zeros=True)
  return attend


def attention(inputs: common.AttentionInputs, config: common.AttentionConfig, *,
              block_sizes: tuple[int, int] | None = None, interpret: bool | None = None):
  """The call behind `splash_attention`, without the checks.

  `interpret` defaults to True off TPU (Pallas' TPU interpret mode on CPU).
  """
  if interpret is None:
    interpret = common.platform() != "tpu"
  p = _Plan(inputs, config, block_sizes, interpret)
  rest = inputs._replace(query=None, key=None, value=None)
  return _make_attend(p, config)(inputs.query, inputs.key, inputs.value, rest)


def splash_attention(inputs: common.AttentionInputs, config: common.AttentionConfig, *,
                     block_sizes: tuple[int, int] | None = None):
  """Returns (output (B, T, N, Hv) in query dtype, lse (B, T, N) float32).

  On TPU the compiled kernel; elsewhere Pallas' TPU interpret mode (slow:
  for tests), which automatic dispatch never picks.

  Raises:
    NotImplementedError: splash can't serve these arguments; the message says why.
  """
  reason = _static_reason(inputs, config, block_sizes)
  if reason is not None:
    raise NotImplementedError(f"dot_product_attention: implementation='splash': {reason}.")
  return attention(inputs, config, block_sizes=block_sizes)
