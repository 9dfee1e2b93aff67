"""FlashAttention-2 in pure JAX: O(T) memory forward and backward, block skipping.

Dao 2023 (arXiv 2307.08691), Rabe & Staats 2021 (arXiv 2112.05682). The
forward walks query blocks; for each it walks only the key blocks that the
masks leave non-empty, keeping a running max and sum in float32 (online
softmax). It stores the output and the logsumexp; a `jax.custom_vjp` backward
walks key blocks and, for each, the query blocks that see it, recomputing the
probabilities from the logsumexp.

A block map (query block x key block: empty / partial / full) is derived from
causal and window masks (analytically), lengths and segment ids (per-block
min/max, O(blocks) memory). Empty blocks are never computed; full blocks skip
the mask arithmetic. GQA folds the G query heads of a key/value head into the
rows of one matmul, so K and V are never repeated.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxattn._impl import common

# Block sizes measured on 2-core x86 CPUs (bench/, float32, H=64): larger
# blocks amortize XLA's per-iteration loop cost; 512 x 512 is near the best
# for T >= 2048, smaller sequences use one block per side.
DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_KV = 512


class _Static(NamedTuple):
  """Hashable description of a problem: sizes, blocks and options."""
  config: common.AttentionConfig
  T: int
  S: int
  bq: int
  bk: int
  G: int


def _blocks(n: int, b: int) -> int:
  return -(-n // b)


def default_block_sizes(T: int, S: int, backend: str | None = None) -> tuple[int, int]:
  """Block sizes for the backend and shape, rounded to a multiple of 8 when clipped."""
  del backend
  bq = T if T <= DEFAULT_BLOCK_Q else DEFAULT_BLOCK_Q
  bk = S if S <= DEFAULT_BLOCK_KV else DEFAULT_BLOCK_KV
  return bq, bk


# ---------------------------------------------------------------------------
# The block map.


def _positional_block_map(st: _Static):
  """Static (nq, nk) int8: 0 empty, 1 partial, 2 full, from causal/window/padding."""
  nq, nk = _blocks(st.T, st.bq), _blocks(st.S, st.bk)
  q0 = np.arange(nq) * st.bq
  q1 = np.minimum(q0 + st.bq, st.T) - 1  # last real query of the block
  k0 = np.arange(nk) * st.bk
  k1 = np.minimum(k0 + st.bk, st.S) - 1
  # Over a block, the allowed band [pos - left, pos + right] (pos = q + offset)
  # is monotone in q, so corner checks decide empty and full exactly.
  lo_first = np.full(nq, -np.inf)  # smallest allowed key for the first query
  lo_last = np.full(nq, -np.inf)
  hi_first = np.full(nq, np.inf)
  hi_last = np.full(nq, np.inf)
  c = st.config
  pos0, pos1 = q0 + c.q_offset, q1 + c.q_offset
  if c.is_causal:
    hi_first, hi_last = np.minimum(hi_first, pos0), np.minimum(hi_last, pos1)
  if c.window is not None:
    left, right = c.window
    if left is not None:
      lo_first, lo_last = np.maximum(lo_first, pos0 - left), np.maximum(lo_last, pos1 - left)
    if right is not None:
      hi_first, hi_last = np.minimum(hi_first, pos0 + right), np.minimum(hi_last, pos1 + right)
  # Empty: every query's band misses the key range [k0, k1].
  empty = (hi_last[:, None] < k0[None, :]) | (lo_first[:, None] > k1[None, :])
  empty |= lo_first[:, None] > hi_first[:, None]  # a degenerate band (not reachable with valid args)
  full = (lo_last[:, None] <= k0[None, :]) & (hi_first[:, None] >= k1[None, :])
  # Padded key columns (past S) must be masked, so the last block is partial.
  if st.S % st.bk:
    full[:, -1] = False
  return np.where(empty, 0, np.where(full, 2, 1)).astype(np.int8)


def _segment_minmax(ids, L, b, pad_value):
  n = _blocks(L, b)
  x = jnp.pad(ids, ((0, 0), (0, n * b - L)), constant_values=pad_value).reshape(ids.shape[0], n, b)
  if L % b:  # padding must not widen the range
    valid = (jnp.arange(n * b) < L).reshape(n, b)
    big = jnp.iinfo(jnp.int32).max
    return (jnp.min(jnp.where(valid, x, big), -1), jnp.max(jnp.where(valid, x, -big), -1))
  return jnp.min(x, -1), jnp.max(x, -1)


def block_map(inputs: common.AttentionInputs, st: _Static):
  """(nq, nk) int8 block map: 0 empty (skipped), 1 partial (masked), 2 full.

  Static masks (causal, window) are decided analytically; lengths and segment
  ids per block from their min/max over the batch, in O(B * blocks) memory.
  A user mask makes every non-empty block partial.
  """
  bm = _positional_block_map(st)
  dynamic = (inputs.query_seq_lengths is not None or inputs.key_value_seq_lengths is not None
             or inputs.query_segment_ids is not None)
  if not dynamic:
    if inputs.mask is not None:
      bm = np.minimum(bm, 1)
    return jnp.asarray(bm)
  nq, nk = bm.shape
  q0 = jnp.arange(nq) * st.bq
  q1 = jnp.minimum(q0 + st.bq, st.T)
  k0 = jnp.arange(nk) * st.bk
  k1 = jnp.minimum(k0 + st.bk, st.S)
  B = inputs.query.shape[0]
  empty_b = jnp.zeros((B, nq, nk), bool)
  full_b = jnp.ones((B, nq, nk), bool)
  if inputs.query_seq_lengths is not None:
    ql = inputs.query_seq_lengths[:, None, None]
    empty_b |= q0[None, :, None] >= ql
    full_b &= q1[None, :, None] <= ql
  if inputs.key_value_seq_lengths is not None:
    kl = inputs.key_value_seq_lengths[:, None, None]
    empty_b |= k0[None, None, :] >= kl
    full_b &= k1[None, None, :] <= kl
  if inputs.query_segment_ids is not None:
    qmin, qmax = _segment_minmax(inputs.query_segment_ids, st.T, st.bq, 0)
    kmin, kmax = _segment_minmax(inputs.key_value_segment_ids, st.S, st.bk, 0)
    empty_b |= (qmax[:, :, None] < kmin[:, None, :]) | (kmax[:, None, :] < qmin[:, :, None])
    full_b &= ((qmin == qmax)[:, :, None] & (kmin == kmax)[:, None, :]
               & (qmin[:, :, None] == kmin[:, None, :]))
  bm = jnp.asarray(bm)
  bm = jnp.where(jnp.all(empty_b, 0), 0, jnp.where(jnp.all(full_b, 0), bm, jnp.minimum(bm, 1)))
  if inputs.mask is not None:
    bm = jnp.minimum(bm, 1)
  return bm.astype(jnp.int8)


def _ranges(needed, axis):
  """First and one-past-last True index along `axis` (0, 0 where none)."""
  n = needed.shape[axis]
  any_ = jnp.any(needed, axis=axis)
  first = jnp.argmax(needed, axis=axis)
  last = n - jnp.argmax(jnp.flip(needed, axis=axis), axis=axis)
  return jnp.where(any_, first, 0), jnp.where(any_, last, 0)


# ---------------------------------------------------------------------------
# Tiles.


def _pad_to(x, axis, size, value=0):
  if x is None or x.shape[axis] in (1, size):
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad, constant_values=value)


def _tile(x, q_start, bq, k_start, bk):
  """Slices a (B|1, N|1, T|1, S|1) array to a query/key tile, keeping 1-dims."""
  if x.shape[2] != 1:
    x = lax.dynamic_slice_in_dim(x, q_start, bq, axis=2)
  if x.shape[3] != 1:
    x = lax.dynamic_slice_in_dim(x, k_start, bk, axis=3)
  return x


def _to_rows(x, K, G, bq):
  """(b, N|1, bq|1, tk) -> (b, K|1, bq*G|1, tk), rows ordered (t, g)."""
  b, n, tq, tk = x.shape
  if n == 1:
    if tq == 1:
      return x
    x = jnp.broadcast_to(x[:, :, :, None, :], (b, 1, tq, G, tk))
    return x.reshape(b, 1, tq * G, tk)
  x = jnp.broadcast_to(x.reshape(b, K, G, tq, tk), (b, K, G, bq, tk)).transpose(0, 1, 3, 2, 4)
  return x.reshape(b, K, bq * G, tk)


class _Prepared(NamedTuple):
  q: jax.Array  # (B, K, Tp * G, H), rows ordered (t, g)
  k: jax.Array  # (B, K, Sp, H)
  v: jax.Array
  bias: jax.Array | None  # padded (B|1, N|1, Tp|1, Sp|1)
  inputs: common.AttentionInputs  # mask padded like bias


def _prepare(inputs: common.AttentionInputs, st: _Static) -> _Prepared:
  B, T, N, H = inputs.query.shape
  K = N // st.G
  Tp, Sp = _blocks(T, st.bq) * st.bq, _blocks(st.S, st.bk) * st.bk
  q = _pad_to(inputs.query, 1, Tp).reshape(B, Tp, K, st.G, H).transpose(0, 2, 1, 3, 4)
  q = q.reshape(B, K, Tp * st.G, H)
  k = _pad_to(inputs.key, 1, Sp).transpose(0, 2, 1, 3)
  v = _pad_to(inputs.value, 1, Sp).transpose(0, 2, 1, 3)
  bias = inputs.bias
  if bias is not None:
    bias = _pad_to(_pad_to(bias, 2, Tp), 3, Sp)
  mask = inputs.mask
  if mask is not None:
    mask = _pad_to(_pad_to(mask, 2, Tp), 3, Sp)
  qseg, kseg = inputs.query_segment_ids, inputs.key_value_segment_ids
  if qseg is not None:
    qseg = jnp.pad(qseg, ((0, 0), (0, Tp - T)), constant_values=-1)
    kseg = jnp.pad(kseg, ((0, 0), (0, Sp - st.S)), constant_values=-2)
  return _Prepared(q, k, v, bias, inputs._replace(
      mask=mask, query_segment_ids=qseg, key_value_segment_ids=kseg))


def _logits(p: _Prepared, st: _Static, i, j, qi, kj, masked: bool):
  """Float32 logits of tile (i, j), (B, K, bq*G, bk); masked entries -inf.

  Returns (logits, raw scaled logits before the soft-cap, mask or None).
  """
  c = st.config
  K = p.k.shape[1]
  raw = jnp.einsum("bkrh,bkch->bkrc", qi, kj, precision=common.dot_precision(qi.dtype),
                   preferred_element_type=jnp.float32) * jnp.float32(c.scale)
  s = common.soft_cap(raw, c.logits_soft_cap)
  if p.bias is not None:
    s = s + _to_rows(_tile(p.bias, i * st.bq, st.bq, j * st.bk, st.bk), K, st.G, st.bq).astype(jnp.float32)
  mask = None
  if masked:
    q_idx = i * st.bq + jnp.arange(st.bq)
    k_idx = j * st.bk + jnp.arange(st.bk)
    user = None if p.inputs.mask is None else _tile(p.inputs.mask, i * st.bq, st.bq, j * st.bk, st.bk)
    mask = common.tile_mask(p.inputs, c, q_idx, k_idx, user)
    if st.S % st.bk:
      pad_ok = (k_idx < st.S)[None, None, None, :]
      mask = pad_ok if mask is None else mask & pad_ok
    if mask is not None:  # None: this branch is traced but no mask applies
      mask = _to_rows(jnp.broadcast_to(mask, mask.shape[:2] + (st.bq, st.bk)), K, st.G, st.bq)
      s = jnp.where(mask, s, -jnp.inf)
  return s, raw, mask


def _dropout_scale(p: _Prepared, st: _Static, i, j):
  """Per-element dropout multiplier (0 or 1/(1-rate)) for tile (i, j), or None."""
  c = st.config
  if c.dropout_rate == 0.0:
    return None
  B, K = p.q.shape[0], p.q.shape[1]
  r = jnp.arange(st.bq * st.G)
  b = jnp.arange(B)[:, None, None, None]
  n = (jnp.arange(K)[:, None] * st.G + (r % st.G)[None, :])[None, :, :, None]
  q_idx = (i * st.bq + r // st.G)[None, None, :, None]
  k_idx = (j * st.bk + jnp.arange(st.bk))[None, None, None, :]
  keep = common.dropout_keep(p.inputs.dropout_key, c.dropout_rate, b, n, q_idx, k_idx)
  return jnp.where(keep, jnp.float32(1.0 / (1.0 - c.dropout_rate)), jnp.float32(0.0))


def _row_slice(x, i, rows):
  return lax.dynamic_slice_in_dim(x, i * rows, rows, axis=2)


# ---------------------------------------------------------------------------
# Forward.


def _forward(p: _Prepared, bm, st: _Static):
  B, K, R, H = p.q.shape
  Hv = p.v.shape[-1]
  rows = st.bq * st.G
  nq = R // rows
  lo, hi = _ranges(bm > 0, axis=1)
  vdt = p.v.dtype

  def q_block(i, carry):
    out, lse = carry
    qi = _row_slice(p.q, i, rows)

    def kv_step(j, acc_state, masked):
      m, l, acc = acc_state
      kj = lax.dynamic_slice_in_dim(p.k, j * st.bk, st.bk, axis=2)
      vj = lax.dynamic_slice_in_dim(p.v, j * st.bk, st.bk, axis=2)
      s, _, _ = _logits(p, st, i, j, qi, kj, masked)
      m_new = jnp.maximum(m, jnp.max(s, axis=-1))
      m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
      e = jnp.exp(s - m_safe[..., None])
      alpha = jnp.exp(m - m_safe)
      l = l * alpha + jnp.sum(e, axis=-1)
      drop = _dropout_scale(p, st, i, j)
      if drop is not None:
        e = e * drop
      pv = jnp.einsum("bkrc,bkch->bkrh", e.astype(vdt), vj, precision=common.dot_precision(vdt),
                      preferred_element_type=jnp.float32)
      return m_new, l, acc * alpha[..., None] + pv

    def body(j, acc_state):
      kind = bm[i, j]
      return lax.switch(jnp.clip(kind, 0, 2).astype(jnp.int32), [
          lambda s: s,
          lambda s: kv_step(j, s, True),
          lambda s: kv_step(j, s, False),
      ], acc_state)

    init = (jnp.full((B, K, rows), -jnp.inf, jnp.float32), jnp.zeros((B, K, rows), jnp.float32),
            jnp.zeros((B, K, rows, Hv), jnp.float32))
    m, l, acc = lax.fori_loop(lo[i], hi[i], body, init)
    o = acc / jnp.where(l == 0, 1.0, l)[..., None]
    m_safe = jnp.where(m == -jnp.inf, 0.0, m)
    lse_i = jnp.where(l == 0, -jnp.inf, m_safe + jnp.log(jnp.where(l == 0, 1.0, l)))
    out = lax.dynamic_update_slice_in_dim(out, o.astype(out.dtype), i * rows, axis=2)
    lse = lax.dynamic_update_slice_in_dim(lse, lse_i, i * rows, axis=2)
    return out, lse

  out = jnp.zeros((B, K, R, Hv), p.q.dtype)
  lse = jnp.zeros((B, K, R), jnp.float32)
  return lax.fori_loop(0, nq, q_block, (out, lse))


# ---------------------------------------------------------------------------
# Backward.


def _backward(p: _Prepared, bm, st: _Static, out, lse, d_out, d_lse):
  B, K, R, H = p.q.shape
  rows = st.bq * st.G
  nk = p.k.shape[2] // st.bk
  lo, hi = _ranges(bm > 0, axis=0)
  # dS = P * (dP - D) with D = rowsum(dO * O) - dlse (the lse cotangent adds P * dlse).
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  if d_lse is not None:
    delta = delta - d_lse
  lse_safe = jnp.where(lse == -jnp.inf, jnp.inf, lse)
  c = st.config
  dt = p.q.dtype
  prec = common.dot_precision(dt)

  def kv_block(j, carry):
    dq, dbias = carry
    kj = lax.dynamic_slice_in_dim(p.k, j * st.bk, st.bk, axis=2)
    vj = lax.dynamic_slice_in_dim(p.v, j * st.bk, st.bk, axis=2)

    def q_step(i, state, masked):
      dk, dv, dq, dbias = state
      qi = _row_slice(p.q, i, rows)
      doi = _row_slice(d_out, i, rows)
      s, raw, _ = _logits(p, st, i, j, qi, kj, masked)
      prob = jnp.exp(s - _row_slice(lse_safe, i, rows)[..., None])
      drop = _dropout_scale(p, st, i, j)
      pd = prob if drop is None else prob * drop
      dv = dv + jnp.einsum("bkrc,bkrh->bkch", pd.astype(dt), doi, precision=prec,
                           preferred_element_type=jnp.float32)
      dp = jnp.einsum("bkrh,bkch->bkrc", doi, vj, precision=prec,
                      preferred_element_type=jnp.float32)
      if drop is not None:
        dp = dp * drop
      ds = prob * (dp - _row_slice(delta, i, rows)[..., None])
      if dbias is not None:
        dbias = _accumulate_bias(dbias, ds, st, i, j, K)
      if c.logits_soft_cap is not None:
        t = jnp.tanh(raw / c.logits_soft_cap)
        ds = ds * (1.0 - t * t)
      ds = ds * jnp.float32(c.scale)
      dk = dk + jnp.einsum("bkrc,bkrh->bkch", ds.astype(dt), qi, precision=prec,
                           preferred_element_type=jnp.float32)
      dqi = jnp.einsum("bkrc,bkch->bkrh", ds.astype(dt), kj, precision=prec,
                       preferred_element_type=jnp.float32)
      dq = lax.dynamic_update_slice_in_dim(dq, _row_slice(dq, i, rows) + dqi, i * rows, axis=2)
      return dk, dv, dq, dbias

    def body(i, state):
      return lax.switch(jnp.clip(bm[i, j], 0, 2).astype(jnp.int32), [
          lambda s: s,
          lambda s: q_step(i, s, True),
          lambda s: q_step(i, s, False),
      ], state)

    dk0 = jnp.zeros((B, K, st.bk, H), jnp.float32)
    dv0 = jnp.zeros((B, K, st.bk, p.v.shape[-1]), jnp.float32)
    dk, dv, dq, dbias = lax.fori_loop(lo[j], hi[j], body, (dk0, dv0, dq, dbias))
    return (dq, dbias), (dk, dv)

  dq0 = jnp.zeros((B, K, R, H), jnp.float32)
  dbias0 = None if p.bias is None else jnp.zeros(p.bias.shape, jnp.float32)
  # A scan over key blocks: each step emits its (dK, dV) block, so no
  # read-modify-write of a full dK/dV carry is needed.
  (dq, dbias), (dk, dv) = lax.scan(lambda c_, j: kv_block(j, c_), (dq0, dbias0), jnp.arange(nk))
  # (nk, B, K, bk, H) -> (B, K, Sp, H)
  dk = dk.transpose(1, 2, 0, 3, 4).reshape(B, K, nk * st.bk, H)
  dv = dv.transpose(1, 2, 0, 3, 4).reshape(B, K, nk * st.bk, p.v.shape[-1])
  return dq, dk, dv, dbias


def _accumulate_bias(dbias, ds, st: _Static, i, j, K):
  """Adds tile gradient ds (B, K, bq*G, bk) into dbias (B|1, N|1, Tp|1, Sp|1)."""
  B = ds.shape[0]
  g = ds.reshape(B, K, st.bq, st.G, st.bk).transpose(0, 1, 3, 2, 4).reshape(B, K * st.G, st.bq, st.bk)
  b1, n1, t1, s1 = (d == 1 for d in dbias.shape)
  axes = tuple(a for a, one in enumerate((b1, n1, t1, s1)) if one)
  g = jnp.sum(g, axis=axes, keepdims=True)
  q_start = 0 if t1 else i * st.bq
  k_start = 0 if s1 else j * st.bk
  cur = lax.dynamic_slice(dbias, (0, 0, q_start, k_start), g.shape)
  return lax.dynamic_update_slice(dbias, cur + g, (0, 0, q_start, k_start))


# ---------------------------------------------------------------------------
# custom_vjp wiring.


def _finish(inputs, st: _Static, out_rows, lse_rows):
  """(B, K, Tp*G, H) rows -> (B, T, N, H); lse rows -> (B, T, N)."""
  B, T, N = inputs.query.shape[:3]
  H = out_rows.shape[-1]
  K = N // st.G
  Tp = out_rows.shape[2] // st.G
  out = out_rows.reshape(B, K, Tp, st.G, H).transpose(0, 2, 1, 3, 4).reshape(B, Tp, N, H)[:, :T]
  lse = lse_rows.reshape(B, K, Tp, st.G).transpose(0, 2, 1, 3).reshape(B, Tp, N)[:, :T]
  return out, lse


def _to_row_layout(x, st: _Static, Tp):
  """(B, T, N, ...) -> (B, K, Tp*G, ...), padding T to Tp with zeros."""
  B, T, N = x.shape[:3]
  K = N // st.G
  rest = x.shape[3:]
  x = _pad_to(x, 1, Tp).reshape((B, Tp, K, st.G) + rest)
  x = jnp.moveaxis(x, 1, 2)
  return x.reshape((B, K, Tp * st.G) + rest)


def _static(inputs: common.AttentionInputs, config: common.AttentionConfig, block_sizes):
  B, T, N, H = inputs.query.shape
  S, K = inputs.key.shape[1], inputs.key.shape[2]
  bq, bk = block_sizes or default_block_sizes(T, S)
  return _Static(config=config, T=T, S=S, bq=min(bq, T), bk=min(bk, S), G=N // K)


def forward(inputs: common.AttentionInputs, config: common.AttentionConfig, *,
            block_sizes: tuple[int, int] | None = None):
  """The blocked forward without a VJP rule: (output (B, T, N, H), lse (B, T, N) f32).

  For kernels built on this one (ring attention) that define their own VJP
  with `backward`.
  """
  st = _static(inputs, config, block_sizes)
  p = _prepare(inputs, st)
  out_rows, lse_rows = _forward(p, block_map(inputs, st), st)
  return _finish(inputs, st, out_rows, lse_rows)


def backward(inputs: common.AttentionInputs, config: common.AttentionConfig, out, lse,
             d_out, d_lse=None, *, block_sizes: tuple[int, int] | None = None):
  """Gradients of `forward` given its output and logsumexp.

  `out` and `lse` may be those of a larger problem that this one is a part of
  (the same queries against more keys, as in ring attention): the
  probabilities are recomputed as exp(logits - lse), so the returned dK, dV
  are this part's exact share and dQ its additive contribution.

  Args:
    inputs, config: as for `forward`.
    out: (B, T, N, H) attention output; lse: (B, T, N) float32 logsumexp.
    d_out: cotangent of out; d_lse: optional cotangent of lse.
    block_sizes: as for `forward`.

  Returns:
    (dq, dk, dv, dbias) in float32; dbias is None without a bias.
  """
  st = _static(inputs, config, block_sizes)
  p = _prepare(inputs, st)
  bm = block_map(inputs, st)
  Tp = _blocks(st.T, st.bq) * st.bq
  out_rows = _to_row_layout(out, st, Tp)
  lse_rows = _to_row_layout(lse.astype(jnp.float32), st, Tp)
  do_rows = _to_row_layout(d_out.astype(inputs.query.dtype), st, Tp)
  dl_rows = None if d_lse is None else _to_row_layout(d_lse.astype(jnp.float32), st, Tp)
  dq, dk, dv, dbias = _backward(p, bm, st, out_rows, lse_rows, do_rows, dl_rows)
  dq, _ = _finish(inputs, st, dq, lse_rows)
  dk = dk.transpose(0, 2, 1, 3)[:, :st.S]
  dv = dv.transpose(0, 2, 1, 3)[:, :st.S]
  if dbias is not None:
    dbias = dbias[:, :, :inputs.bias.shape[2], :inputs.bias.shape[3]]
  return dq, dk, dv, dbias


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _flash(config, block_sizes, inputs: common.AttentionInputs):
  return forward(inputs, config, block_sizes=block_sizes)


def _flash_fwd(config, block_sizes, inputs):
  out, lse = forward(inputs, config, block_sizes=block_sizes)
  return (out, lse), (inputs, out, lse)


def _flash_bwd(config, block_sizes, res, cts):
  inputs, out, lse = res
  d_out, d_lse = cts
  dq, dk, dv, dbias = backward(inputs, config, out, lse, d_out, d_lse, block_sizes=block_sizes)
  cast = lambda g, x: None if g is None else g.astype(x.dtype)
  return (common.AttentionInputs(
      query=cast(dq, inputs.query), key=cast(dk, inputs.key), value=cast(dv, inputs.value),
      bias=cast(dbias, inputs.bias)),)


_flash.defvjp(_flash_fwd, _flash_bwd)


def chunked_attention(inputs: common.AttentionInputs, config: common.AttentionConfig, *,
                      block_sizes: tuple[int, int] | None = None):
  """Returns (output (B, T, N, H) in query dtype, lse (B, T, N) float32)."""
  return _flash(config, block_sizes, inputs)
