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

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxattn import _checks
from jaxattn import masks as _masks
from jaxattn._impl import common, softmax_state

# Block sizes measured on 2-core x86 CPUs (bench/, float32, H = 64 and 128):
# large query blocks amortize XLA's per-iteration loop cost; key blocks of
# 256 keep a tile's logits and probabilities (and the backward's dP, dS) half
# the size of 512's, which ran the forward 3-7% and forward + backward 10-15%
# faster on an AMD EPYC (T = 1024 to 16384; 512 x 512 was chosen on an Intel
# Xeon); smaller sequences use one block per side.
DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_KV = 256


@dataclasses.dataclass(frozen=True)
class _Static(_masks.BlockGeometry):
  """Hashable description of a problem: its block geometry, options and group size."""
  config: common.AttentionConfig
  G: int  # query heads per K/V head


def default_block_sizes(T: int, S: int, config: common.AttentionConfig | None = None
                        ) -> tuple[int, int]:
  """Block sizes for a shape and its static masks.

  512 x 256 amortizes XLA's per-iteration loop cost on CPU and keeps each
  tile's temporaries small (measured with `python -m bench`); sequences
  shorter than a block use one block. A sliding window of `w` keys back
  wants blocks of about w / 4 (at least 64), so the key blocks a query block
  touches cover little more than its window (`python -m bench.masks`).
  """
  bq, bk = DEFAULT_BLOCK_Q, DEFAULT_BLOCK_KV
  if config is not None and config.window is not None and config.window[0] is not None:
    b = max(64, min(bq, 1 << max(0, (config.window[0] // 4).bit_length() - 1)))
    bq = bk = b
  return min(bq, T), min(bk, S)


# ---------------------------------------------------------------------------
# Block classification.


def _kinds(p: "_Prepared", st: _Static, qb, kb):
  """Block kinds (`jaxattn.masks.block_kinds`) for query blocks qb x key blocks kb."""
  return _masks.block_kinds(p.mask_fn, st, qb, kb, summary=p.summary, dense_mask=p.mask is not None)


def _by_kind(kind, step, state, empty=lambda s: s):
  """One block of a loop: `empty(state)` (by default `state` unchanged) for an
  empty block, else `step(state, masked)` with the mask applied for a partial
  block and skipped for a full one.

  Keep full-size arrays out of `state`: every branch of the switch returns its
  own buffers, so XLA copies whatever passes through it, on every step.
  """
  return lax.switch(kind, [empty, lambda s: step(s, True), lambda s: step(s, False)], state)


def block_map(inputs: common.AttentionInputs, st: _Static):
  """(nq, nk) int32 block map: 0 empty (skipped), 1 partial (masked), 2 full.

  The kernels never build this table: they classify one row (forward) or
  column (backward) at a time inside their loops. It is for inspection.
  """
  return _masks.block_kinds(common.combined_mask(inputs, st.config), st, jnp.arange(st.nq)[:, None],
                            jnp.arange(st.nk)[None, :], dense_mask=inputs.mask is not None)


def _ranges(needed):
  """First and one-past-last True index of a 1D array (0, 0 where none)."""
  n = needed.shape[0]
  any_ = jnp.any(needed)
  first = jnp.argmax(needed)
  last = n - jnp.argmax(needed[::-1])
  return jnp.where(any_, first, 0), jnp.where(any_, last, 0)


# ---------------------------------------------------------------------------
# Tiles.


def _pad_to(x, axis, size, value=0):
  """`common.pad_axis`, leaving None and broadcast (size 1) dims as they are."""
  if x is None or x.shape[axis] == 1:
    return x
  return common.pad_axis(x, axis, size, value)


def _tile(x, q_start, bq, k_start, bk):
  """Slices a (B|1, N|1, T|1, S|1) array to a query/key tile, keeping 1-dims."""
  if x.shape[2] != 1:
    x = lax.dynamic_slice_in_dim(x, q_start, bq, axis=2)
  if x.shape[3] != 1:
    x = lax.dynamic_slice_in_dim(x, k_start, bk, axis=3)
  return x


def _to_rows(x, K, G, bq):
  """(b, N|1, bq|1, tk) -> (b, K|1, G*bq|1, tk), rows ordered (g, t)."""
  b, n, tq, tk = x.shape
  if n == 1:
    if tq == 1:
      return x
    x = jnp.broadcast_to(x[:, :, None], (b, 1, G, tq, tk))
    return x.reshape(b, 1, G * tq, tk)
  x = jnp.broadcast_to(x.reshape(b, K, G, tq, tk), (b, K, G, bq, tk))
  return x.reshape(b, K, G * bq, tk)


class _Prepared(NamedTuple):
  q: jax.Array  # (B, Tp, N, H), the caller's layout, padded
  k: jax.Array  # (B, Sp, K, H)
  v: jax.Array  # (B, Sp, K, Hv)
  bias: jax.Array | None  # padded (B|1, N|1, Tp|1, Sp|1)
  mask: jax.Array | None  # the dense user mask, padded like bias
  mask_fn: Any  # every other mask, as one jaxattn.masks.Mask (or None)
  summary: Any  # mask_fn's per-block summary
  score_fn: Any  # score modifiers incl. the soft-cap (or None)
  dropout_key: jax.Array | None


def _layout(st: _Static, query, key, value, bias=None, mask=None):
  """The arrays padded to whole blocks, in the caller's layout: q (B, Tp, N, H),
  k and v (B, Sp, K, H), bias and mask to (Tp, Sp) where not broadcast. No
  full-size relayout: each block is put in the matmuls' layout when sliced
  (`_rows`, `_keys`), where the slice is a copy anyway. Without padding
  (T and S multiples of the blocks) nothing is copied here."""
  Tp, Sp = st.Tp, st.Sp
  q = _pad_to(query, 1, Tp)
  k = _pad_to(key, 1, Sp)
  v = _pad_to(value, 1, Sp)
  if bias is not None:
    bias = _pad_to(_pad_to(bias, 2, Tp), 3, Sp)
  if mask is not None:
    mask = _pad_to(_pad_to(mask, 2, Tp), 3, Sp)
  return q, k, v, bias, mask


def _prepare(inputs: common.AttentionInputs, st: _Static) -> _Prepared:
  q, k, v, bias, mask = _layout(st, inputs.query, inputs.key, inputs.value, inputs.bias, inputs.mask)
  mask_fn = common.combined_mask(inputs, st.config)
  summary = None if mask_fn is None else mask_fn.summary(st)
  return _Prepared(q, k, v, bias, mask, mask_fn, summary,
                   common.combined_score(inputs, st.config), inputs.dropout_key)


def _tile_index(p: _Prepared, st: _Static, q0, k0, w):
  """(b, h, q_idx, kv_idx) index arrays of the tile of queries [q0, q0 + bq)
  and keys [k0, k0 + w), in the (B, K, rows, w) layout."""
  B, K = p.q.shape[0], p.k.shape[2]
  r = jnp.arange(st.bq * st.G)
  b = jnp.arange(B).reshape(B, 1, 1, 1)
  if st.G == 1:
    h = jnp.arange(K).reshape(1, K, 1, 1)
  else:
    h = (jnp.arange(K)[:, None] * st.G + (r // st.bq)[None, :])[None, :, :, None]
  q_idx = (q0 + r % st.bq)[None, None, :, None]
  kv_idx = (k0 + jnp.arange(w))[None, None, None, :]
  return b, h, q_idx, kv_idx


def _raw_logits(st: _Static, qi, kj):
  acc = common.stat_dtype(qi.dtype)
  return (jnp.einsum("bkrh,bkch->bkrc", qi, kj, preferred_element_type=acc)
          * jnp.asarray(st.config.scale, acc))


def _bias_at(bias, st: _Static, q0, k0, w):
  """The bias tile (B|1, N|1, bq|1, w|1) of queries [q0, q0 + bq) and keys
  [k0, k0 + w), or None without a bias."""
  return None if bias is None else _tile(bias, q0, st.bq, k0, w)


def _bias_rows(bias, st: _Static, q0):
  """The bias's query rows [q0, q0 + bq): (B|1, N|1, bq|1, Sp|1), or None."""
  if bias is None or bias.shape[2] == 1:
    return bias
  return lax.dynamic_slice_in_dim(bias, q0, st.bq, axis=2)


def _post(p: _Prepared, st: _Static, q0, k0, raw, bias, score_fn, masked: bool):
  """Score modifiers, bias and (for partial blocks) the mask: raw -> logits.

  `bias` is the tile's bias (`_bias_at`), sliced by the caller: where the
  tile is differentiated inside a switch (`chunked_jvp`'s reverse mode), a
  slice taken outside it keeps the branches' cotangents tile-sized.
  """
  K, w = p.k.shape[2], raw.shape[-1]
  idx = _tile_index(p, st, q0, k0, w)
  s = raw if score_fn is None else score_fn(raw, *idx)
  if bias is not None:
    s = s + _to_rows(bias, K, st.G, st.bq).astype(s.dtype)
  if masked:
    mask = None if p.mask_fn is None else p.mask_fn(*idx)
    if p.mask is not None:
      user = _tile(p.mask, q0, st.bq, k0, w)
      user = _to_rows(jnp.broadcast_to(user, user.shape[:2] + (st.bq, w)), K, st.G, st.bq)
      mask = user if mask is None else mask & user
    if p.k.shape[1] > st.S:  # padded key columns
      pad_ok = idx[3] < st.S
      mask = pad_ok if mask is None else mask & pad_ok
    if mask is not None:  # None: this branch is traced but nothing masks
      s = jnp.where(mask, s, -jnp.inf)
  return s


def _dropout_scale(p: _Prepared, st: _Static, q0, k0, w):
  """Per-element dropout multiplier (0 or 1/(1-rate)) for a tile, or None."""
  c = st.config
  if c.dropout_rate == 0.0:
    return None
  b, h, q_idx, kv_idx = _tile_index(p, st, q0, k0, w)
  keep = common.dropout_keep(p.dropout_key, c.dropout_rate, b, h, q_idx, kv_idx)
  dt = common.stat_dtype(p.q.dtype)  # float64 inputs keep 1/(1-rate) to float64
  return jnp.where(keep, jnp.asarray(1.0 / (1.0 - c.dropout_rate), dt), jnp.asarray(0.0, dt))


def _zeros_like(x):
  """Zeros in the statistics dtype (float32, or float64 for float64 inputs)
  derived from `x`, so loop carries inherit its sharding (explicit mesh axes)
  and its device variance (shard_map's check_vma). A select, not `zeros_like`:
  jax >= 0.11 drops explicit shardings from created arrays outside a mesh
  context; the select folds to a broadcast and ignores NaN/inf in `x`."""
  dtype = common.stat_dtype(x.dtype)
  return jnp.where(False, x.astype(dtype), jnp.zeros((), dtype))


def _rows(x, st: _Static, i):
  """Query block i of x (B, Tp, N, ...) in the matmuls' row layout (B, K, G * bq,
  ...): the G query heads of each K/V head folded into its rows, ordered (g, t).
  Head-major, so heads sharded over devices stay so in the rows (with fewer
  K/V heads than devices, (t, g) rows made GSPMD gather the queries per block)."""
  x = lax.dynamic_slice_in_dim(x, i * st.bq, st.bq, axis=1)
  B, _, N = x.shape[:3]
  rest = x.shape[3:]
  K = N // st.G
  x = jnp.moveaxis(x.reshape((B, st.bq, K, st.G) + rest), 1, 3)
  return x.reshape((B, K, st.G * st.bq) + rest)


def _unrows(x, st: _Static):
  """One block from the row layout (B, K, G * bq, ...) back to (B, bq, N, ...)."""
  B, K = x.shape[:2]
  rest = x.shape[3:]
  x = jnp.moveaxis(x.reshape((B, K, st.G, st.bq) + rest), 3, 1)
  return x.reshape((B, st.bq, K * st.G) + rest)


def _put_rows(x, block, st: _Static, i):
  """Writes query block i (row layout) into x (B, Tp, N, ...)."""
  return lax.dynamic_update_slice_in_dim(x, _unrows(block, st).astype(x.dtype), i * st.bq, axis=1)


def _keys(x, start, w):
  """Keys [start, start + w) of x (B, Sp, K, ...) as (B, K, w, ...)."""
  return jnp.moveaxis(lax.dynamic_slice_in_dim(x, start, w, axis=1), 1, 2)


def _value_row(p: _Prepared):
  """Zeros (B, K, 1, Hv) shaped and sharded like the values (for carries)."""
  return jnp.moveaxis(_zeros_like(p.v[:, :1]), 1, 2)


# ---------------------------------------------------------------------------
# Forward.


def _output_init(p: _Prepared):
  """Zero output (B, Tp, N, Hv), lse and lse_lo (B, Tp, N) carries shaped and sharded like q and v."""
  # (Slicing a head axis would trip an explicitly sharded one.)
  out = (_zeros_like(p.q[..., :1]) + jnp.zeros((1, 1, 1) + p.v.shape[-1:], p.q.dtype)).astype(p.q.dtype)
  return out, _zeros_like(p.q[..., 0]), _zeros_like(p.q[..., 0])


def _write_rows(carry, st: _Static, i, state: softmax_state.State):
  """Normalizes a query block's online-softmax state (`softmax_state.finalize`:
  rows with nothing to attend give 0 and lse -inf) and writes it into the
  output carries, in the caller's layout."""
  out, lse, lse_lo = carry
  o, lse_i, lo_i = softmax_state.finalize(state)
  return _put_rows(out, o, st, i), _put_rows(lse, lse_i, st, i), _put_rows(lse_lo, lo_i, st, i)


def _forward(p: _Prepared, st: _Static):
  vdt = p.v.dtype

  def q_block(i, carry):
    qi = _rows(p.q, st, i)
    kinds = _kinds(p, st, i, jnp.arange(st.nk))
    lo, hi = _ranges(kinds > 0)

    def kv_step(j, state, masked):
      kj, vj = _keys(p.k, j * st.bk, st.bk), _keys(p.v, j * st.bk, st.bk)
      s = _post(p, st, i * st.bq, j * st.bk, _raw_logits(st, qi, kj),
                _bias_at(p.bias, st, i * st.bq, j * st.bk, st.bk), p.score_fn, masked)
      drop = _dropout_scale(p, st, i * st.bq, j * st.bk, st.bk)

      def weighted_values(e):
        if drop is not None:
          e = e * drop
        return jnp.einsum("bkrc,bkch->bkrh", e.astype(vdt), vj,
                          preferred_element_type=common.stat_dtype(vdt))

      return softmax_state.update(state, s, weighted_values)

    def body(j, acc_state):
      return _by_kind(kinds[j], functools.partial(kv_step, j), acc_state)

    init = softmax_state.init(_zeros_like(qi[..., 0]), _zeros_like(qi[..., :1]) + _value_row(p))
    return _write_rows(carry, st, i, lax.fori_loop(lo, hi, body, init))

  return lax.fori_loop(0, st.nq, q_block, _output_init(p))


# ---------------------------------------------------------------------------
# Backward.


def _split_float_leaves(tree):
  """Leaves of `tree` that carry gradients (inexact dtypes) and a rebuild function."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  diff = common.inexact_leaves(leaves)

  def rebuild(diff_leaves):
    new = list(leaves)
    for i, x in zip(diff, diff_leaves):
      new[i] = x
    return jax.tree_util.tree_unflatten(treedef, new)

  return [leaves[i] for i in diff], rebuild


def _tile_grads(p: _Prepared, st: _Static, q0, k0, qi, kj, vj, doi, lse_i, delta_i, masked: bool,
                score, lo_i):
  """Gradients from one tile: (dq_tile, dk_tile, dv_tile, dbias_tile, d_score_leaves).

  With a bias, the tile's bias gradient (`_bias_tile`) is returned for the
  caller to add (`_add_bias_tile`); else None.

  P is recomputed as exp((S - lse) - lse_lo); dS = P (dP - D); `score` is
  (leaves, rebuild) of the score modifier's float leaves, whose gradients come
  from a VJP through the modifier (and the soft-cap) on this tile.
  """
  dt = p.q.dtype
  leaves, rebuild = score
  w = kj.shape[2]
  raw = _raw_logits(st, qi, kj)
  bias = _bias_at(p.bias, st, q0, k0, w)
  post = lambda raw, leaves: _post(p, st, q0, k0, raw, bias, rebuild(leaves), masked)
  if p.score_fn is not None:
    s, pull = jax.vjp(post, raw, leaves)
  else:
    s = post(raw, leaves)
  prob = jnp.exp((s - lse_i[..., None]) - lo_i[..., None])
  drop = _dropout_scale(p, st, q0, k0, w)
  pd = prob if drop is None else prob * drop
  acc = common.stat_dtype(dt)
  dv = jnp.einsum("bkrc,bkrh->bkch", pd.astype(dt), doi,
                  preferred_element_type=acc)
  dp = jnp.einsum("bkrh,bkch->bkrc", doi, vj, preferred_element_type=acc)
  if drop is not None:
    dp = dp * drop
  ds = prob * (dp - delta_i[..., None])
  # (+ zeros like the bias tile: the tile keeps the bias's sharding, as the
  # empty branch's tile does, so the switch's branches agree under explicit mesh axes.)
  dbias_tile = None if p.bias is None else (
      _bias_tile(p.bias.shape, ds, st) + _zeros_like(bias))
  d_leaves = []
  if p.score_fn is not None:
    ds, d_leaves = pull(ds)
  ds = (ds * jnp.asarray(st.config.scale, ds.dtype)).astype(dt)
  dk = jnp.einsum("bkrc,bkrh->bkch", ds, qi, preferred_element_type=acc)
  dq = jnp.einsum("bkrc,bkch->bkrh", ds, kj, preferred_element_type=acc)
  return dq, dk, dv, dbias_tile, d_leaves


def _backward_prologue(out, lse, d_out, d_lse):
  """(D, dO) for the backward loop.

  D = rowsum(dO * O) - dlse (the lse cotangent adds P * dlse to dS), 0 for
  rows that attended nothing (lse -inf, padding rows included): their P is 0,
  but NaN or inf in their cotangents would reach dQ and dK through D.

  dO comes back plus a zero computed from D (min(|D|, 0), NaN replaced by 0:
  exactly 0 everywhere, so a NaN D, from NaN in a visible value or in a
  cotangent, reaches no more gradients than before). This makes dO a value
  computed after D, so that O, whose last use is D, is dead when dO is
  written: for `jax.grad` of a sum (or mean), dO is a broadcast that XLA
  otherwise materializes before the forward loop, and O and dO would be two
  (B, T, N, Hv) temporaries at once. Compiled temp memory, causal, H = 64:
  grad of a sum 524 -> 272 MiB at T = 2^20, N = 1, and 149 -> 97 MiB at
  T = 32768, N = 8; a cotangent passed in as a jit argument is copied into
  O's place, which costs the backward's block workspace (85 -> 97 MiB at
  T = 32768, N = 8); inside a model (projections around it) no change.
  """
  acc = lse.dtype
  delta = jnp.sum(d_out.astype(acc) * out.astype(acc), axis=-1)
  if d_lse is not None:
    delta = delta - d_lse
  delta = jnp.where(lse == -jnp.inf, jnp.zeros((), acc), delta)
  zero = jnp.minimum(jnp.abs(delta), 0)
  zero = jnp.where(jnp.isnan(zero), jnp.zeros((), acc), zero).astype(d_out.dtype)[..., None]
  return delta, d_out + zero


def _row_cotangent(d_out, dead, st: _Static, i):
  """Query block i of dO (row layout) with the rows that attended nothing
  (`dead`, from `_row_lse`) zeroed: their P is 0, but 0 * NaN would reach dV.
  Per block, fused into the block's slice: a zeroed full-size copy of dO would
  be one more (B, T, N, Hv) temporary whenever the cotangent is a jit argument
  and the output is kept."""
  doi = _rows(d_out, st, i)
  return jnp.where(dead[..., None], jnp.zeros((), doi.dtype), doi)


def _row_lse(lse, lse_lo, st: _Static, i):
  """Query block i's (lse, lse_lo, dead) for recomputing P = exp((S - lse) -
  lse_lo): rows that attended nothing (and padding rows) have lse -inf, are
  `dead`, and get +inf, so their P is exp(-inf) = 0. Per block, so no
  full-size copy is made."""
  lse_i, lo_i = _rows(lse, st, i), _rows(lse_lo, st, i)
  dead = lse_i == -jnp.inf
  return jnp.where(dead, jnp.inf, lse_i), jnp.where(dead, 0.0, lo_i), dead


def _backward(p: _Prepared, st: _Static, out, lse, lse_lo, d_out, d_lse):
  nk = p.k.shape[1] // st.bk
  delta, d_out = _backward_prologue(out, lse, d_out, d_lse)
  score = _split_float_leaves(p.score_fn)

  def kv_block(j, carry):
    dq, dk_all, dv_all, dbias, dscore = carry
    kj, vj = _keys(p.k, j * st.bk, st.bk), _keys(p.v, j * st.bk, st.bk)
    kinds = _kinds(p, st, jnp.arange(st.nq), j)
    lo, hi = _ranges(kinds > 0)

    # The switch returns the tile's gradients, added into the carries outside
    # it (dQ in place, dbias into this key block's strip). Each of these
    # carries is then used only to update itself, so XLA drops dK and dV (and
    # their two matmuls per tile) for jax.grad w.r.t. the queries alone, and a
    # bias's or score parameters' gradients when they are not asked for (a
    # carry passed through the switch, or a full-size one through both loops,
    # was kept). dQ is still a full-size carry through both loops, so grad
    # w.r.t. keys or values alone still computes it: summing it per key block
    # instead would cost one more (B, T, N, H) buffer.
    def q_step(i, masked):
      lse_i, lo_i, dead = _row_lse(lse, lse_lo, st, i)
      return _tile_grads(
          p, st, i * st.bq, j * st.bk, _rows(p.q, st, i), kj, vj, _row_cotangent(d_out, dead, st, i),
          lse_i, _rows(delta, st, i), masked, score, lo_i)

    def empty():
      dbias_tile = None if p.bias is None else _zeros_like(_tile(p.bias, 0, st.bq, 0, st.bk))
      return (_zeros_like(_rows(p.q, st, 0)), _zeros_like(kj), _zeros_like(vj), dbias_tile,
              [jnp.zeros_like(x) for x in score[0]])

    def body(i, state):
      dk, dv, dq, dbias_j, dscore = state
      dqi, dkj, dvj, dbias_tile, d_leaves = _by_kind(
          kinds[i], lambda _, masked: q_step(i, masked), None, lambda _: empty())
      dq_block = lax.dynamic_slice_in_dim(dq, i * st.bq, st.bq, axis=1) + _unrows(dqi, st)
      dq = lax.dynamic_update_slice_in_dim(dq, dq_block, i * st.bq, axis=1)
      if dbias_j is not None:
        dbias_j = _add_bias_tile(dbias_j, dbias_tile, i * st.bq, 0)
      return dk + dkj, dv + dvj, dq, dbias_j, [a + b for a, b in zip(dscore, d_leaves)]

    # Key block j's bias and score-parameter gradients are summed from zero
    # here and added into the totals after the loop (a bias's in a (Tp, bk)
    # strip): a total passed through this loop would stay live even when
    # unused (64 MiB more temp for a (1, 4, 2048, 2048) bias). When the bias's
    # gradient is asked for, the strip is that much more temp (1/nk of the
    # bias; 16.1 -> 22.1 MiB there). The score parameters' totals round
    # differently than when summed tile by tile (~1e-6 relative in float32).
    dk0, dv0 = _zeros_like(kj), _zeros_like(vj)
    dbias_j = None if dbias is None else _zeros_like(_bias_cols(dbias, st, 0))
    dscore_j = [jnp.zeros_like(x) for x in dscore]
    dk, dv, dq, dbias_j, dscore_j = lax.fori_loop(lo, hi, body, (dk0, dv0, dq, dbias_j, dscore_j))
    dscore = [a + b for a, b in zip(dscore, dscore_j)]
    if dbias is not None:
      dbias = _add_bias_tile(dbias, dbias_j, 0, j * st.bk)
    # Key block j's dK/dV are final: written in place into the results (stacked
    # scan outputs were reshaped after the loop, and XLA copied them whole
    # for some layouts).
    put = lambda full, blk: lax.dynamic_update_slice_in_dim(full, jnp.moveaxis(blk, 1, 2), j * st.bk, axis=1)
    return dq, put(dk_all, dk), put(dv_all, dv), dbias, dscore

  dq0, dk0, dv0 = _zeros_like(p.q), _zeros_like(p.k), _zeros_like(p.v)
  dbias0 = None if p.bias is None else _zeros_like(p.bias)
  dscore0 = [jnp.zeros_like(x) for x in score[0]]
  dq, dk, dv, dbias, dscore = lax.fori_loop(0, nk, kv_block, (dq0, dk0, dv0, dbias0, dscore0))
  d_score_fn = None if p.score_fn is None else _score_cotangent(p.score_fn, dscore)
  return dq, dk, dv, dbias, d_score_fn


def _score_cotangent(score_fn, dscore):
  """Cotangent pytree for score_fn from the gradients of its float leaves, in order."""
  return common.leaf_cotangents(score_fn, dict(zip(common.inexact_leaves(score_fn), dscore)))


# ---------------------------------------------------------------------------
# Narrow bands: one unaligned key window per query block.


def _band(st: _Static, Sp: int):
  """(key span w, left) when causal/window masks bound every query block's keys
  to a window narrow enough that one tile per query block beats aligned key
  blocks (w <= Sp / 2); None otherwise.

  Aligned blocks touch up to ceil((w + bk - 1) / bk) blocks of bk keys for a
  span of w keys, two of them partial; one tile of exactly w keys starting at
  the band's first key does less work in one step (`python -m bench.masks`).
  """
  c = st.config
  if c.window is None:
    return None
  left, right = c.window
  if c.is_causal:
    right = 0 if right is None else min(right, 0)
  if left is None or right is None:
    return None
  w = st.bq + left + right
  if 2 * w > Sp:
    return None
  return w, left


def _band_start(st: _Static, q0, w, left, Sp):
  return jnp.clip(q0 + st.config.q_offset - left, 0, Sp - w)


def _forward_band(p: _Prepared, st: _Static, w: int, left: int):
  Sp = p.k.shape[1]
  vdt = p.v.dtype

  def q_block(i, carry):
    q0 = i * st.bq
    k0 = _band_start(st, q0, w, left, Sp)
    qi = _rows(p.q, st, i)
    kj, vj = _keys(p.k, k0, w), _keys(p.v, k0, w)
    s = _post(p, st, q0, k0, _raw_logits(st, qi, kj), _bias_at(p.bias, st, q0, k0, w), p.score_fn,
              True)
    # One tile holds every key of the block: the softmax needs no running state.
    m = lax.stop_gradient(jnp.max(s, axis=-1))  # a constant to autodiff, as in softmax_state.update
    e = jnp.exp(s - jnp.where(m == -jnp.inf, 0.0, m)[..., None])
    l = jnp.sum(e, axis=-1)
    drop = _dropout_scale(p, st, q0, k0, w)
    if drop is not None:
      e = e * drop
    pv = jnp.einsum("bkrc,bkch->bkrh", e.astype(vdt), vj,
                    preferred_element_type=common.stat_dtype(vdt))
    return _write_rows(carry, st, i, softmax_state.State(m, l, pv))

  return lax.fori_loop(0, st.nq, q_block, _output_init(p))


def _backward_band(p: _Prepared, st: _Static, w: int, left: int, out, lse, lse_lo, d_out, d_lse):
  Sp = p.k.shape[1]
  delta, d_out = _backward_prologue(out, lse, d_out, d_lse)
  score = _split_float_leaves(p.score_fn)

  def q_block(i, carry):
    dq, dk, dv, dbias, dscore = carry
    q0 = i * st.bq
    k0 = _band_start(st, q0, w, left, Sp)
    kj, vj = _keys(p.k, k0, w), _keys(p.v, k0, w)
    lse_i, lo_i, dead = _row_lse(lse, lse_lo, st, i)
    dqi, dkj, dvj, dbias_tile, d_leaves = _tile_grads(
        p, st, q0, k0, _rows(p.q, st, i), kj, vj, _row_cotangent(d_out, dead, st, i),
        lse_i, _rows(delta, st, i), True, score, lo_i)
    if dbias is not None:
      dbias = _add_bias_tile(dbias, dbias_tile, q0, k0)
    dq = _put_rows(dq, dqi, st, i)  # complete: the band is one tile
    add = lambda x, t: lax.dynamic_update_slice_in_dim(
        x, lax.dynamic_slice_in_dim(x, k0, w, axis=1) + jnp.moveaxis(t, 1, 2), k0, axis=1)
    dk, dv = add(dk, dkj), add(dv, dvj)
    return dq, dk, dv, dbias, [a + b for a, b in zip(dscore, d_leaves)]

  init = (_zeros_like(p.q), _zeros_like(p.k), _zeros_like(p.v),
          None if p.bias is None else _zeros_like(p.bias), [jnp.zeros_like(x) for x in score[0]])
  dq, dk, dv, dbias, dscore = lax.fori_loop(0, st.nq, q_block, init)
  d_score_fn = None if p.score_fn is None else _score_cotangent(p.score_fn, dscore)
  return dq, dk, dv, dbias, d_score_fn


def _bias_tile(dbias_shape, ds, st: _Static):
  """Tile gradient ds (B, K, G*bq, w) as a bias tile: (B, N, bq, w), summed
  over the axes where the bias (B|1, N|1, Tp|1, Sp|1) broadcasts."""
  B, K, _, w = ds.shape
  g = ds.reshape(B, K * st.G, st.bq, w)
  axes = tuple(a for a, d in enumerate(dbias_shape) if d == 1)
  return jnp.sum(g, axis=axes, keepdims=True)


def _bias_cols(bias, st: _Static, k0):
  """The bias's keys [k0, k0 + bk): (B|1, N|1, Tp|1, bk|1)."""
  if bias.shape[3] == 1:
    return bias
  return lax.dynamic_slice_in_dim(bias, k0, st.bk, axis=3)


def _add_bias_tile(dbias, g, q0, k0):
  """Adds a bias tile from `_bias_tile` into dbias at query q0, key k0."""
  q_start = 0 if dbias.shape[2] == 1 else q0
  k_start = 0 if dbias.shape[3] == 1 else k0
  cur = lax.dynamic_slice(dbias, (0, 0, q_start, k_start), g.shape)
  return lax.dynamic_update_slice(dbias, cur + g, (0, 0, q_start, k_start))


# ---------------------------------------------------------------------------
# custom_vjp wiring.


def _finish(inputs, *padded):
  """Each of `padded` ((B, Tp, ...): output, lse, gradients) without the padding rows."""
  T = inputs.query.shape[1]
  return tuple(x[:, :T] for x in padded)


def _static(inputs: common.AttentionInputs, config: common.AttentionConfig, block_sizes):
  B, T, N, H = inputs.query.shape
  S, K = inputs.key.shape[1], inputs.key.shape[2]
  if not _checks.concrete_sizes(T, S, N, K, H):
    raise NotImplementedError(
        f"dot_product_attention: the blocked implementations ('chunked', 'chunked_jvp') "
        f"plan their blocks from concrete "
        f"sizes; got T={T}, S={S}, N={N}, K={K}, H={H} with symbolic dimensions (jax.export "
        "shape polymorphism): use implementation='xla', or None, which picks it (a symbolic "
        "batch works on every implementation).")
  bq, bk = block_sizes or default_block_sizes(T, S, config)
  return _Static(B=B, N=N, T=T, S=S, bq=min(bq, T), bk=min(bk, S), config=config, G=N // K)


def _forward_padded(inputs: common.AttentionInputs, config: common.AttentionConfig, block_sizes):
  """(static plan, prepared inputs, out, lse, lse_lo) of the forward, padded to
  whole query blocks (see `_prepare`): (B, Tp, N, Hv), (B, Tp, N) twice."""
  st = _static(inputs, config, block_sizes)
  p = _prepare(inputs, st)
  band = _band(st, p.k.shape[1])
  out_p, lse_p, lo_p = _forward(p, st) if band is None else _forward_band(p, st, *band)
  return st, p, out_p, lse_p, lo_p


def _forward_with_lo(inputs: common.AttentionInputs, config: common.AttentionConfig, block_sizes):
  """(output, lse, lse_lo): lse + lse_lo is the logsumexp to twice the precision."""
  _, _, out_p, lse_p, lo_p = _forward_padded(inputs, config, block_sizes)
  return _finish(inputs, out_p, lse_p, lo_p)


def forward(inputs: common.AttentionInputs, config: common.AttentionConfig, *,
            block_sizes: tuple[int, int] | None = None, with_lse_lo: bool = False):
  """The blocked forward without a VJP rule: (output (B, T, N, Hv), lse (B, T, N)
  float32, float64 for float64 inputs), and lse_lo if asked (lse + lse_lo is
  the logsumexp to twice the precision; pass it to `backward`).

  For kernels built on this one (ring attention) that define their own VJP
  with `backward`.
  """
  out, lse, lo = _forward_with_lo(inputs, config, block_sizes)
  return (out, lse, lo) if with_lse_lo else (out, lse)


def backward(inputs: common.AttentionInputs, config: common.AttentionConfig, out, lse,
             d_out, d_lse=None, *, block_sizes: tuple[int, int] | None = None, lse_lo=None):
  """Gradients of `forward` given its output and logsumexp.

  `out` and `lse` may be those of a larger problem that this one is a part of
  (the same queries against more keys, as in ring attention): the
  probabilities are recomputed as exp(logits - lse), so the returned dK, dV
  are this part's exact share and dQ its additive contribution.

  Second-order reverse mode (differentiating this backward) raises a clear
  error: its loops have data-dependent bounds (skipped blocks).

  Args:
    inputs, config: as for `forward`.
    out: (B, T, N, Hv) attention output; lse: (B, T, N) float32 logsumexp.
    d_out: cotangent of out; d_lse: optional cotangent of lse.
    block_sizes: as for `forward`.
    lse_lo: optional low part of the logsumexp (lse + lse_lo exactly), for
      probabilities accurate at large logits; None means 0.

  Returns:
    (dq, dk, dv, dbias, d_score_fn) in float32 (float64 for float64 inputs);
    dbias is None without a bias, d_score_fn None without score modifiers.
  """
  return _backward_once(config, block_sizes, inputs, out, lse, lse_lo, d_out, d_lse)


_SECOND_ORDER = ("dot_product_attention: implementation='chunked' does not support "
                 "second-order differentiation (jax.grad of a function of its jax.grad, "
                 "jax.hessian, jax.jvp of jax.grad): its backward skips empty blocks with "
                 "data-dependent loop bounds and has no derivative rule of its own; use "
                 "implementation='chunked_jvp' (every second-order derivative, O(T) memory) "
                 "or 'xla'.")


# A custom JVP whose rule refuses: differentiating the backward in either mode
# (grad of grad, or forward over reverse as in jax.hessian) names the paths
# that support it, instead of JAX's while-loop or custom_vjp errors.
@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _backward_once(config, block_sizes, inputs, out, lse, lse_lo, d_out, d_lse):
  st = _static(inputs, config, block_sizes)
  p = _prepare(inputs, st)
  acc = common.stat_dtype(inputs.query.dtype)
  Tp = st.Tp
  out_p = _pad_to(out, 1, Tp)
  # Padding rows get lse -inf, hence P = 0: they contribute exactly nothing,
  # whatever their logits (a large bias or ALiBi would overflow exp(s - 0)).
  lse_p = _pad_to(lse.astype(acc), 1, Tp, -jnp.inf)
  lo_p = _zeros_like(lse_p) if lse_lo is None else _pad_to(lse_lo.astype(acc), 1, Tp)
  do_p = _pad_to(d_out.astype(inputs.query.dtype), 1, Tp)
  dl_p = None if d_lse is None else _pad_to(d_lse.astype(acc), 1, Tp)
  band = _band(st, p.k.shape[1])
  if band is None:
    dq, dk, dv, dbias, dscore = _backward(p, st, out_p, lse_p, lo_p, do_p, dl_p)
  else:
    dq, dk, dv, dbias, dscore = _backward_band(p, st, *band, out_p, lse_p, lo_p, do_p,
                                               dl_p)
  (dq,) = _finish(inputs, dq)
  dk, dv = dk[:, :st.S], dv[:, :st.S]
  if dbias is not None:
    dbias = dbias[:, :, :inputs.bias.shape[2], :inputs.bias.shape[3]]
  return dq, dk, dv, dbias, dscore


@_backward_once.defjvp
def _backward_once_jvp(config, block_sizes, primals, tangents):
  raise NotImplementedError(_SECOND_ORDER)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _flash(config, block_sizes, inputs: common.AttentionInputs):
  return forward(inputs, config, block_sizes=block_sizes)


def _flash_fwd(config, block_sizes, inputs):
  out, lse, lse_lo = _forward_with_lo(inputs, config, block_sizes)
  return (out, lse), (inputs, out, lse, lse_lo)


def _flash_bwd(config, block_sizes, res, cts):
  inputs, out, lse, lse_lo = res
  d_out, d_lse = cts
  dq, dk, dv, dbias, dscore = backward(inputs, config, out, lse, d_out, d_lse,
                                       block_sizes=block_sizes, lse_lo=lse_lo)
  cast = lambda g, x: None if g is None else g.astype(x.dtype)
  # combined_score is the caller's score_fn, chained with SoftCap when a cap is set.
  d_user_score = None
  if inputs.score_fn is not None:
    d_user_score = dscore if config.logits_soft_cap is None else dscore.mods[0]
  return (common.AttentionInputs(
      query=cast(dq, inputs.query), key=cast(dk, inputs.key), value=cast(dv, inputs.value),
      bias=cast(dbias, inputs.bias), score_fn=d_user_score),)


_flash.defvjp(_flash_fwd, _flash_bwd)


def chunked_attention(inputs: common.AttentionInputs, config: common.AttentionConfig, *,
                      block_sizes: tuple[int, int] | None = None):
  """Returns (output (B, T, N, Hv) in query dtype, lse (B, T, N) float32 or wider)."""
  return _flash(config, block_sizes, inputs)
