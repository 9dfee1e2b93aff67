"""Attention over a sequence sharded across devices: ring attention.

Ring Attention (Liu, Zaharia & Abbeel 2023, arXiv 2310.01889): each of the P
devices on a mesh axis holds T/P queries and T/P keys and values. The K/V
blocks travel around the ring with `lax.ppermute` (P steps, P - 1 sends); at each step a
device attends its queries to the visiting block with the chunked
(FlashAttention-2) kernel, which returns the logsumexp, and merges the partial
result into its running one exactly:

  lse = logaddexp(lse_a, lse_b),
  out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b.

The backward (a `jax.custom_vjp`) rotates K/V once more (P - 1 sends), with
dK/dV accumulators travelling alongside that arrive back at their owner after P
sends; every step calls the chunked backward with the *global* output and
logsumexp, so each step's share of the gradient is exact. Per-device memory
stays O(T/P); nothing of size T is ever gathered. The next block is sent before
the current one is used, so XLA may overlap the transfer with the compute.

Causal masks need the global positions of the local queries and the visiting
keys, which depend on the (traced) device index; the kernel's configuration is
static, so each step chooses among a few static configurations with
`lax.switch`. Three layouts say which tokens a device holds (device d of P):

  contiguous  tokens [d*T/P, (d+1)*T/P). Causally, device P-1 attends to every
              block and device 0 to one: no faster than non-causal.
  zigzag      the sequence cut into 2P chunks; device d holds chunks d and
              2P-1-d. Every step after the first is exactly half a block of
              unmasked work (Brandon et al. 2023 for the balance argument).
  striped     token i on device i % P (Striped Attention, Brandon et al. 2023,
              arXiv 2311.09431). Every step is a triangular mask, half of
              which the chunked kernel skips when its blocks are smaller than
              the local length.

`to_balanced_layout` / `from_balanced_layout` permute a global sequence into
and out of a layout, so that plain contiguous sharding then gives each device
its tokens; `layout_positions` gives each token's original position (for RoPE).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxattn import _checks
from jaxattn import attention as _attention
from jaxattn._impl import chunked, common, softmax_state

LAYOUTS = ("contiguous", "zigzag", "striped")
Layout = Literal["contiguous", "zigzag", "striped"]


# ---------------------------------------------------------------------------
# Layouts.


def _check_layout(fn: str, layout):
  if layout not in LAYOUTS:
    raise ValueError(f"{fn}: layout must be one of {', '.join(map(repr, LAYOUTS))}; got {layout!r}.")


def _layout_order(length: int, num_shards: int, layout: str, fn: str) -> np.ndarray:
  """order[i] = original position of the token at index i of the laid-out sequence."""
  _check_layout(fn, layout)
  if isinstance(num_shards, bool) or not isinstance(num_shards, (int, np.integer)) or num_shards < 1:
    raise ValueError(f"{fn}: num_shards must be a positive int; got {num_shards!r}.")
  parts = {"contiguous": 1, "zigzag": 2 * num_shards, "striped": num_shards}[layout]
  if length % parts:
    raise ValueError(f"{fn}: the sequence length ({length}) must be divisible by "
                     f"{'2 * num_shards' if layout == 'zigzag' else 'num_shards'} = {parts} "
                     f"for the {layout!r} layout.")
  pos = np.arange(length)
  if layout == "zigzag":
    c = length // parts
    chunks = [i for d in range(num_shards) for i in (d, 2 * num_shards - 1 - d)]
    return pos.reshape(parts, c)[chunks].reshape(-1)
  if layout == "striped":
    return pos.reshape(length // num_shards, num_shards).T.reshape(-1)
  return pos


def _permute(x, order, axis):
  """x[..., order, ...] on `axis`; a sharded array keeps its sharding."""
  if not isinstance(x, jax.Array):  # NumPy: data preparation on the host
    return np.take(np.asarray(x), order, axis=axis)
  index = (slice(None),) * (axis % x.ndim) + (order,)
  # With explicit mesh axes the gather must be told its output sharding.
  return x.at[index].get(out_sharding=jax.typeof(x).sharding)


def layout_positions(length: int, num_shards: int, layout: Layout = "zigzag") -> np.ndarray:
  """Original positions of the tokens of a sequence in `layout`, int (T,).

  `layout_positions(T, P, layout)[i]` is the position that index i of
  `to_balanced_layout(x, P, layout=layout)` came from: pass these to RoPE.

  >>> layout_positions(8, 2, "zigzag").tolist()
  [0, 1, 6, 7, 2, 3, 4, 5]
  >>> layout_positions(8, 2, "striped").tolist()
  [0, 2, 4, 6, 1, 3, 5, 7]
  """
  return _layout_order(length, num_shards, layout, "layout_positions")


def to_balanced_layout(x, num_shards: int, *, layout: Layout = "zigzag", axis: int = 1):
  """Permutes the sequence axis of x into `layout` for `num_shards` devices.

  After this, sharding `axis` contiguously over num_shards devices gives each
  the tokens that layout assigns it (see the module docstring). Apply it to
  query, key, value and segment ids alike (and `from_balanced_layout` to the
  output); it is a gather, so do it once, where the data is made.

  Args:
    x: array with the sequence (T) on `axis`, e.g. (B, T, N, H) or (B, T).
    num_shards: P, the size of the mesh axis the sequence is sharded over.
    layout: "zigzag", "striped" or "contiguous" (the identity).
    axis: the sequence axis.

  Returns:
    x with its sequence axis permuted.

  Raises:
    ValueError: T is not divisible by 2P (zigzag) or P (striped).

  >>> import numpy as np
  >>> to_balanced_layout(np.arange(8)[None], 2, layout="zigzag").tolist()
  [[0, 1, 6, 7, 2, 3, 4, 5]]
  """
  order = _layout_order(np.shape(x)[axis], num_shards, layout, "to_balanced_layout")
  return _permute(x, order, axis)


def from_balanced_layout(x, num_shards: int, *, layout: Layout = "zigzag", axis: int = 1):
  """Inverse of `to_balanced_layout`: back to the original token order.

  >>> import numpy as np
  >>> x = np.arange(12)[None]
  >>> bool((from_balanced_layout(to_balanced_layout(x, 3), 3) == x).all())
  True
  """
  order = _layout_order(np.shape(x)[axis], num_shards, layout, "from_balanced_layout")
  return _permute(x, np.argsort(order), axis)


# ---------------------------------------------------------------------------
# The plan: which (query rows, key rows, static config) pieces a step computes.


class _Piece(NamedTuple):
  """Queries [q0, q0 + tq) attend keys [k0, k0 + tk) under `config`."""
  q0: int
  tq: int
  k0: int
  tk: int
  config: common.AttentionConfig


class _Ring(NamedTuple):
  """Static description of a ring problem (hashable: a custom_vjp nondiff arg)."""
  axis_name: object
  layout: str
  is_causal: bool
  config: common.AttentionConfig  # scale and soft cap; no mask
  block_sizes: tuple[int, int] | None
  T: int  # local query length
  S: int  # local key length


def _plan(st: _Ring):
  """(pieces of the first step, pieces of each later step's branches).

  The first step is the device's own block (static). A later step picks
  branch 0 when the visiting block comes from a lower device index (it lies
  before the local queries) and branch 1 otherwise.
  """
  plain = st.config
  full = (_Piece(0, st.T, 0, st.S, plain),)
  if not st.is_causal:
    return full, (full,)
  causal = dataclasses.replace(plain, is_causal=True, q_offset=0)
  if st.layout == "contiguous":
    return (_Piece(0, st.T, 0, st.S, causal),), (full, ())
  if st.layout == "zigzag":
    c = st.T // 2
    # Local order is global order, so the own block is causal; queries of the
    # second chunk start at local key position c.
    own = (_Piece(0, c, 0, c, causal),
           _Piece(c, c, 0, 2 * c, dataclasses.replace(causal, q_offset=c)))
    # From a lower device: both query chunks see its first chunk, not its second.
    before = (_Piece(0, 2 * c, 0, c, plain),)
    # From a higher device: only the second query chunk sees it, all of it.
    after = (_Piece(c, c, 0, 2 * c, plain),)
    return own, (before, after)
  # striped: local key j of device src is at global j*P + src, query i at
  # i*P + d. From src <= d, key j is visible iff j <= i; from src > d iff j < i.
  strict = dataclasses.replace(causal, q_offset=-1)
  return (_Piece(0, st.T, 0, st.S, causal),), ((_Piece(0, st.T, 0, st.S, causal),),
                                               (_Piece(0, st.T, 0, st.S, strict),))


def _piece_inputs(p: _Piece, q, qaux, kv):
  """The chunked kernel's inputs for piece p. qaux = (segment ids, real rows)
  of the local queries; kv = (k, v, segment ids, real keys) of the visiting
  block. A block's real tokens are a prefix of it (global positions increase
  along every layout's local order), so a piece's are its first
  clip(n - start, 0, size)."""
  qseg, qn = qaux
  k, v, kseg, kn = kv
  qs, ks = slice(p.q0, p.q0 + p.tq), slice(p.k0, p.k0 + p.tk)
  return common.AttentionInputs(
      q[:, qs], k[:, ks], v[:, ks],
      query_seq_lengths=None if qn is None else jnp.clip(qn - p.q0, 0, p.tq),
      key_value_seq_lengths=None if kn is None else jnp.clip(kn - p.k0, 0, p.tk),
      query_segment_ids=None if qseg is None else qseg[:, qs],
      key_value_segment_ids=None if kseg is None else kseg[:, ks])


def _positions(n: int, layout: str, P: int, d):
  """Global positions (n,) of a device's n local tokens: device d of P in `layout`."""
  i = jnp.arange(n, dtype=jnp.int32)
  if layout == "zigzag":
    c = n // 2
    return jnp.where(i < c, d, 2 * P - 1 - d) * c + i % c
  if layout == "striped":
    return i * P + d
  return d * n + i


def _real_prefix(lengths, n: int, layout: str, axis_name):
  """How many of this device's n local tokens lie before the global `lengths` (B,):
  they are a prefix of the local order."""
  if lengths is None:
    return None
  pos = _positions(n, layout, _ring_size(axis_name), lax.axis_index(axis_name))
  return jnp.sum(pos[None, :] < lengths[:, None], axis=1, dtype=jnp.int32)


def _vma(*xs) -> frozenset:
  """The mesh axes the arrays vary over, inside shard_map (empty outside)."""
  out: frozenset = frozenset()
  for x in jax.tree.leaves(xs):
    t = jax.typeof(x)
    # jax >= 0.10: the ShapedArray field `manual_axis_type`, a public
    # jax.sharding.ManualAxisType whose `varying` are the axes; before: `vma`.
    axis_type = getattr(t, "manual_axis_type", None)
    out |= frozenset(axis_type.varying if axis_type is not None else getattr(t, "vma", ()))
  return out


def _varying(x, vma: frozenset):
  """x typed as varying over `vma`, so loop carries and branches type-check under shard_map."""
  missing = tuple(sorted(vma - _vma(x), key=str))
  return lax.pcast(x, missing, to="varying") if missing else x


def _rotate(tree, axis_name, P):
  """Sends every array of tree to the next device on the ring."""
  perm = [(i, (i + 1) % P) for i in range(P)]
  return jax.tree.map(lambda x: lax.ppermute(x, axis_name, perm), tree)


def _check_varying(axis_name, inputs):
  """Refuses an axis_name the local shards do not vary over (shard_map's check_vma
  on): the sequence is sharded over another axis, and the ring would rotate
  blocks that are the same on every device of this one."""
  names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
  vma = _vma(inputs.query, inputs.key, inputs.value)
  if vma and not set(names) <= vma:
    raise ValueError(
        f"{_FN}: axis_name {axis_name!r} must be a mesh axis the sequence is sharded over; "
        f"query, key and value vary over {tuple(sorted(vma, key=str))} only (shard_map's "
        f"in_specs). Pass the axis their sequence dimension is split over.")
  if vma:
    for name, x in (("query", inputs.query), ("key", inputs.key), ("value", inputs.value)):
      if not set(names) <= _vma(x):
        raise ValueError(
            f"{_FN}: {name} must be sharded over axis_name {axis_name!r} like the others (each "
            f"device holds its own block of the sequence); it varies over "
            f"{tuple(sorted(_vma(x), key=str))} only. A replicated {name} is not a ring problem: "
            f"use dot_product_attention on the gathered arrays.")


def _ring_size(axis_name) -> int:
  try:
    return lax.axis_size(axis_name)
  except NameError as e:
    raise ValueError(
        f"ring_attention: axis_name {axis_name!r} is not a bound mesh axis here; call "
        f"ring_attention inside jax.shard_map over a mesh with that axis, or use "
        f"sharded_ring_attention, which does. ({e})") from None


# ---------------------------------------------------------------------------
# Forward and backward.


def _rows_update(x, start: int, new):
  """x with rows [start, start + new.shape[1]) (axis 1) replaced by new.

  Not `x.at[:, a:b].set(new)` (or `.add`): that lowers to a scatter whose
  index operand is a constant int32[0] array. Under `jax.grad` of a
  `lax.scan`, scan hoists the loop-invariant part of the ring's forward out of
  the loop as a separate shard_map whose only operands are such empty
  constants, and Shardy (the default partitioner) then fails to compile it
  ("'func.call' op expected at least one operand of
  @xla.sdy.manual_computation_body.N to be produced by a
  xla.sdy.GlobalToLocalShape CustomCallOp"). A whole-array update, or
  `dynamic_update_slice` with a static start (scalar literals), has no such
  operand and is what XLA makes of the scatter anyway.
  """
  new = new.astype(x.dtype)
  if start == 0 and new.shape == x.shape:
    return new
  return lax.dynamic_update_slice_in_dim(x, new, start, axis=1)


def _rows_add(x, start: int, delta):
  """x with delta added to rows [start, start + delta.shape[1]) (see `_rows_update`)."""
  stop = start + delta.shape[1]
  return _rows_update(x, start, lax.slice_in_dim(x, start, stop, axis=1) + delta.astype(x.dtype))


def _merge(acc, p: _Piece, out, lse, lo):
  """Merges a piece's normalized (out, lse, lse_lo) into the running rows."""
  rows = slice(p.q0, p.q0 + p.tq)
  acc_out, acc_lse, acc_lo = (x[:, rows] for x in acc)
  new = softmax_state.merge(acc_out, acc_lse, acc_lo, out.astype(acc_out.dtype), lse, lo)
  return tuple(_rows_update(x, p.q0, y) for x, y in zip(acc, new))


def _forward_step(st: _Ring, pieces, q, qaux, kv, acc):
  for p in pieces:
    acc = _merge(acc, p, *chunked.forward(_piece_inputs(p, q, qaux, kv), p.config,
                                          block_sizes=st.block_sizes, with_lse_lo=True))
  return acc


def _ring_forward(st: _Ring, q, k, v, qseg, kseg, qn, kn):
  P, d = _ring_size(st.axis_name), lax.axis_index(st.axis_name)
  own, later = _plan(st)
  B, T, N = q.shape[:3]
  vary = functools.partial(_varying, vma=_vma(q, k, v, qseg, kseg, qn, kn))
  # Running output and logsumexp (as lse + lse_lo, see softmax_state.merge) of the local
  # queries, in float32 (float64 for float64 inputs).
  dt = common.stat_dtype(q.dtype)
  acc = (vary(jnp.zeros((B, T, N, v.shape[-1]), dt)), vary(jnp.full((B, T, N), -jnp.inf, dt)),
         vary(jnp.zeros((B, T, N), dt)))
  kv, qaux = (k, v, kseg, kn), (qseg, qn)
  nxt = _rotate(kv, st.axis_name, P) if P > 1 else kv
  acc = _forward_step(st, own, q, qaux, kv, acc)

  def step(s, kv, acc):  # the block that left device d - s
    branches = [functools.partial(_forward_step, st, b, q, qaux, kv) for b in later]
    if len(branches) == 1:
      return branches[0](acc)
    return lax.switch(jnp.where(s <= d, 0, 1), branches, acc)

  def body(s, carry):
    kv, acc = carry
    nxt = _rotate(kv, st.axis_name, P)  # sent before use: may overlap the compute
    return nxt, step(s, kv, acc)

  # Steps 1 .. P - 2 send the block on; the last one keeps it: P - 1 sends in all.
  if P > 2:
    nxt, acc = lax.fori_loop(1, P - 1, body, (nxt, acc))
  if P > 1:
    acc = step(P - 1, nxt, acc)
  out, lse, lo = acc
  return out.astype(q.dtype), lse, lo


def _backward_step(st: _Ring, pieces, q, qaux, out, lse, lo, d_out, d_lse, kv, grads):
  dq, dk, dv = grads
  for p in pieces:
    rows = slice(p.q0, p.q0 + p.tq)
    gq, gk, gv = chunked.backward(  # (dq, dk, dv, dbias, ...): no bias here
        _piece_inputs(p, q, qaux, kv), p.config, out[:, rows], lse[:, rows], d_out[:, rows],
        d_lse[:, rows], block_sizes=st.block_sizes, lse_lo=lo[:, rows])[:3]
    dq = _rows_add(dq, p.q0, gq)
    dk = _rows_add(dk, p.k0, gk)
    dv = _rows_add(dv, p.k0, gv)
  return dq, dk, dv


def _ring_backward(st: _Ring, q, k, v, qseg, kseg, qn, kn, out, lse, lo, d_out, d_lse):
  P, d = _ring_size(st.axis_name), lax.axis_index(st.axis_name)
  own, later = _plan(st)
  vary = functools.partial(_varying, vma=_vma(q, k, v, qseg, kseg, qn, kn, out, lse, lo, d_out, d_lse))
  zeros = lambda x: vary(jnp.zeros(x.shape, common.stat_dtype(x.dtype)))
  step = functools.partial(_backward_step, st)
  kv, qaux = (k, v, kseg, kn), (qseg, qn)
  nxt = _rotate(kv, st.axis_name, P) if P > 1 else kv
  dq, dk, dv = step(own, q, qaux, out, lse, lo, d_out, d_lse, kv, (zeros(q), zeros(k), zeros(v)))
  if P == 1:
    return dq, dk, dv
  # dK/dV of a block travel with it and are back at its owner after P sends.
  dkv = _rotate((dk, dv), st.axis_name, P)

  def step_at(s, kv, dkv, dq):
    branches = [functools.partial(step, b, q, qaux, out, lse, lo, d_out, d_lse, kv)
                for b in later]
    grads = (dq,) + dkv
    if len(branches) == 1:
      dq, dk, dv = branches[0](grads)
    else:
      dq, dk, dv = lax.switch(jnp.where(s <= d, 0, 1), branches, grads)
    return _rotate((dk, dv), st.axis_name, P), dq

  def body(s, carry):
    kv, dkv, dq = carry
    nxt = _rotate(kv, st.axis_name, P)
    return (nxt,) + step_at(s, kv, dkv, dq)

  # As in the forward, the last step does not send its key/value block on.
  if P > 2:
    nxt, dkv, dq = lax.fori_loop(1, P - 1, body, (nxt, dkv, dq))
  (dk, dv), dq = step_at(P - 1, nxt, dkv, dq)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(st: _Ring, q, k, v, qseg, kseg, qn, kn):
  return _ring_forward(st, q, k, v, qseg, kseg, qn, kn)[:2]


def _ring_fwd(st, q, k, v, qseg, kseg, qn, kn):
  out, lse, lo = _ring_forward(st, q, k, v, qseg, kseg, qn, kn)
  return (out, lse), (q, k, v, qseg, kseg, qn, kn, out, lse, lo)


def _ring_bwd(st, res, cts):
  q, k, v, qseg, kseg, qn, kn, out, lse, lo = res
  d_out, d_lse = cts
  dq, dk, dv = _ring_backward(st, q, k, v, qseg, kseg, qn, kn, out, lse, lo,
                              d_out.astype(q.dtype), d_lse.astype(common.stat_dtype(q.dtype)))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


# ---------------------------------------------------------------------------
# Public functions.

_FN = "ring_attention"


def _ids_ranked_over_ring(q_ids, kv_ids, axis_name):
  """Segment ids that do not fit int32 (uint32, int64, uint64) as int32 ranks
  among the ids of every device on the ring.

  `dot_product_attention` replaces such ids by their rank among the ids of its
  call; ranked per device, a visiting key block's ranks would name other
  documents than the local queries'. The ids (small next to K and V) are
  gathered once over the ring to build one table. Others pass unchanged.
  """
  if q_ids is None:
    return q_ids, kv_ids
  q = jnp.asarray(q_ids)
  kv = q if kv_ids is None else jnp.asarray(kv_ids)
  if not (jnp.issubdtype(q.dtype, jnp.integer) and jnp.issubdtype(kv.dtype, jnp.integer)):
    return q_ids, kv_ids  # normalize names the dtype
  every = lambda x: lax.all_gather(x, axis_name, axis=x.ndim - 1, tiled=True)
  q, kv = _checks.segments_as_int32(q, kv, every=every)
  return q, None if kv_ids is None else kv


def ring_attention(
    query, key, value, *,
    axis_name,
    is_causal: bool = False,
    layout: Layout = "contiguous",
    query_segment_ids=None,
    key_value_segment_ids=None,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    scale: float | None = None,
    logits_soft_cap: float | None = None,
    return_residual: bool = False,
    block_sizes: tuple[int, int] | None = None,
):
  r"""Attention over a sequence sharded on mesh axis `axis_name` (ring attention).

  Call it inside `jax.shard_map` (or use `sharded_ring_attention`): each device
  passes its local shard and gets its local shard of

  .. math:: \mathrm{softmax}(s \cdot QK^T + \text{mask}) V

  computed over the *whole* sequence: K/V blocks rotate around the ring with
  `lax.ppermute` (Liu et al. 2023, arXiv 2310.01889) and the partial results
  are merged exactly with their logsumexp. Differentiable (a custom VJP that
  rotates dK/dV back to their owners); per-device memory O(T/P).

  Shapes are the local ones on one of the P devices: B batch, T = T_global / P
  queries, S = S_global / P keys, N query heads, K key/value heads (N % K == 0;
  GQA without copying K/V), H head dim. Batch and heads may be sharded over
  other mesh axes too.

  Args:
    query: (B, T, N, H) or (T, N, H), this device's queries.
    key: (B, S, K, H) or (S, K, H), this device's keys, the query's dtype.
    value: (B, S, K, Hv) or (S, K, Hv), the query's dtype (Hv may differ from H).
    axis_name: the mesh axis (or tuple of axes) the sequence is sharded over.
    is_causal: mask keys after the query's global position (self-attention:
      needs T == S).
    layout: which global positions the local tokens have (device d of P):
      "contiguous" (tokens [d*T, (d+1)*T)), "zigzag" (chunks d and 2P-1-d of
      2P; T must be even) or "striped" (tokens d, d+P, d+2P, ...). Only
      matters when is_causal; zigzag and striped balance the causal work
      (see `to_balanced_layout`).
    query_segment_ids: int (B, T); a query attends only to keys with the same
      id (packed documents), in the same layout as the query.
    key_value_segment_ids: int (B, S); defaults to query_segment_ids. They
      rotate with K/V. Ids that do not fit int32 (uint32, int64) are ranked
      over every device's ids (one all_gather of the ids).
    query_seq_lengths: int (B,), the same on every device: real queries of
      each *global* sequence (positions before it, in the original order);
      rows past it give 0 and their padding is zeroed, as in
      `dot_product_attention`.
    key_value_seq_lengths: int (B,), global: keys at or past it are masked and
      zeroed (NaN/inf there never reaches an output or gradient). Pad a
      sequence to a length the mesh divides and pass its real length here.
    scale: logit scale, default 1/sqrt(H).
    logits_soft_cap: `cap * tanh(logits / cap)` on the scaled logits.
    return_residual: also return the logsumexp over all keys, (B, T, N).
    block_sizes: (query block, key block) of the chunked kernel at each step.
      Blocks smaller than the local length let it skip masked blocks (what
      the striped layout relies on) and bound its temporary memory.

  Returns:
    This device's output, (B, T, N, Hv) in the query's dtype (with
    return_residual, the tuple (output, logsumexp)).

  Raises:
    ValueError: a shape does not fit, an unknown layout, or axis_name is not
      bound (not inside shard_map).
    TypeError: a dtype does not fit.

  A fully masked query row gives 0 and logsumexp -inf, as in
  `dot_product_attention`.

  >>> import jax
  >>> from jax.sharding import NamedSharding, PartitionSpec as P
  >>> from jaxattn.parallel import ring_attention
  >>> mesh = jax.make_mesh((1,), ("seq",))
  >>> x = jax.random.normal(jax.random.key(0), (2, 8, 4, 16))
  >>> x = jax.device_put(x, NamedSharding(mesh, P(None, "seq")))
  >>> f = jax.jit(jax.shard_map(lambda q, k, v: ring_attention(
  ...     q, k, v, axis_name="seq", is_causal=True, layout="zigzag"),
  ...     mesh=mesh, in_specs=P(None, "seq"), out_specs=P(None, "seq")))
  >>> f(x, x, x).shape
  (2, 8, 4, 16)
  """
  _check_layout(_FN, layout)
  block_sizes = _checks.block_sizes(_FN, block_sizes)
  query_segment_ids, key_value_segment_ids = _ids_ranked_over_ring(
      query_segment_ids, key_value_segment_ids, axis_name)
  inputs, config, rank3 = _attention.normalize(
      query, key, value, scale=scale, is_causal=is_causal,
      query_segment_ids=query_segment_ids, key_value_segment_ids=key_value_segment_ids,
      logits_soft_cap=logits_soft_cap, fn=_FN)
  T, S = inputs.query.shape[1], inputs.key.shape[1]
  if is_causal and T != S:
    raise ValueError(f"{_FN}: is_causal needs local query and key lengths to match "
                     f"(self-attention); got T={T}, S={S}.")
  if is_causal and layout == "zigzag" and T % 2:
    raise ValueError(f"{_FN}: the zigzag layout needs an even local length (two chunks "
                     f"per device); got T={T}.")
  P = _ring_size(axis_name)  # bound: we are inside shard_map
  _check_varying(axis_name, inputs)
  B = inputs.query.shape[0]
  if layout == "zigzag":
    for name, n, given in (("query", T, query_seq_lengths), ("key", S, key_value_seq_lengths)):
      if given is not None and n % 2:
        raise ValueError(f"{_FN}: the zigzag layout needs an even local {name} length (two "
                         f"chunks per device) to place sequence lengths; got {n}.")
  q, k, v = inputs.query, inputs.key, inputs.value
  qn = _real_prefix(_attention.canonical_lengths(_FN, "query_seq_lengths", query_seq_lengths, B,
                                                 P * T, rank3), T, layout, axis_name)
  kn = _real_prefix(_attention.canonical_lengths(_FN, "key_value_seq_lengths", key_value_seq_lengths,
                                                 B, P * S, rank3), S, layout, axis_name)
  q, k, v = common.zero_past(q, qn), common.zero_past(k, kn), common.zero_past(v, kn)
  st = _Ring(axis_name=axis_name, layout=layout, is_causal=bool(is_causal),
             config=dataclasses.replace(config, is_causal=False, q_offset=0),
             block_sizes=block_sizes, T=T, S=S)
  out, lse = _ring(st, q, k, v, inputs.query_segment_ids, inputs.key_value_segment_ids, qn, kn)
  if rank3:
    out, lse = out[0], lse[0]
  if return_residual:
    return out, lse.astype(out.dtype)
  return out


@functools.lru_cache(maxsize=64)
def _sharded_fn(mesh, axis_name, batch_axis, head_axis, given, options):
  """The jitted shard_map; `given` = whether (segment ids, query lengths, key lengths) are passed."""
  spec = PartitionSpec(batch_axis, axis_name, head_axis, None)
  seg_spec = PartitionSpec(batch_axis, axis_name)
  len_spec = PartitionSpec(batch_axis)  # global lengths: the same on every device of the ring
  kw = dict(options)

  def local(q, k, v, qseg, kseg, qn, kn):
    return ring_attention(q, k, v, axis_name=axis_name, query_segment_ids=qseg,
                          key_value_segment_ids=kseg, query_seq_lengths=qn,
                          key_value_seq_lengths=kn, **kw)

  has_segments, has_q_lengths, has_kv_lengths = given
  seg = seg_spec if has_segments else None
  in_specs = (spec, spec, spec, seg, seg, len_spec if has_q_lengths else None,
              len_spec if has_kv_lengths else None)
  out_specs = (spec, PartitionSpec(batch_axis, axis_name, head_axis)) if kw["return_residual"] else spec
  ring = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
  explicit = any(t == AxisType.Explicit for t in mesh.axis_types)

  def place(x, s):
    # Explicit mesh axes type arrays by their sharding (reshard); auto ones take a constraint.
    if x is None:
      return None
    s = NamedSharding(mesh, s)
    return jax.reshard(x, s) if explicit else lax.with_sharding_constraint(x, s)

  def run(q, k, v, qseg, kseg, qn, kn):
    return ring(place(q, spec), place(k, spec), place(v, spec), place(qseg, seg_spec),
                place(kseg, seg_spec), place(qn, len_spec), place(kn, len_spec))

  return jax.jit(run)


def sharded_ring_attention(
    query, key, value, *,
    mesh: Mesh,
    axis_name,
    batch_axis=None,
    head_axis=None,
    is_causal: bool = False,
    layout: Layout = "contiguous",
    query_segment_ids=None,
    key_value_segment_ids=None,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    scale: float | None = None,
    logits_soft_cap: float | None = None,
    return_residual: bool = False,
    block_sizes: tuple[int, int] | None = None,
):
  """`ring_attention` on global arrays: runs `jax.shard_map` over `mesh` for you.

  The sequence axis (T, and S) is sharded over `axis_name`, optionally the
  batch over `batch_axis` and the heads over `head_axis`. The arrays are taken
  to be in `layout` already: for a balanced causal layout, permute once with
  `to_balanced_layout` where the data is made (and positions with
  `layout_positions`), and back with `from_balanced_layout`.

  Args:
    query: global (B, T, N, H) or (T, N, H).
    key: global (B, S, K, H) or (S, K, H); value: (B, S, K, Hv) or (S, K, Hv).
    mesh: a `jax.sharding.Mesh` with the named axes.
    axis_name: mesh axis of the sequence; T and S must be divisible by its
      size P (by 2P for the zigzag layout).
    batch_axis, head_axis: optional mesh axes for B and for N and K.
    is_causal, layout, query_segment_ids, key_value_segment_ids,
    query_seq_lengths, key_value_seq_lengths, scale, logits_soft_cap,
    return_residual, block_sizes: as for `ring_attention` (segment ids global
      (B, T) and (B, S); lengths (B,) count positions in the original order,
      not the layout's).

  Returns:
    The global output (and logsumexp), sharded like query.

  Raises:
    ValueError: a mesh axis is missing or a length does not divide.

  >>> import jax
  >>> from jaxattn.parallel import sharded_ring_attention
  >>> mesh = jax.make_mesh((1,), ("seq",))
  >>> x = jax.random.normal(jax.random.key(0), (2, 8, 4, 16))
  >>> sharded_ring_attention(x, x, x, mesh=mesh, axis_name="seq", is_causal=True).shape
  (2, 8, 4, 16)
  """
  fn = "sharded_ring_attention"
  _check_layout(fn, layout)
  block_sizes = _checks.block_sizes(fn, block_sizes)
  for arg, name in (("axis_name", axis_name), ("batch_axis", batch_axis), ("head_axis", head_axis)):
    names = name if isinstance(name, tuple) else (name,)
    if name is None and arg != "axis_name":
      continue
    for n in names:
      if n not in mesh.shape:
        raise ValueError(f"{fn}: {arg} {n!r} is not an axis of the mesh "
                         f"{dict(mesh.shape)}.")
  query, key, value = (jnp.asarray(x) for x in (query, key, value))
  rank3 = query.ndim == 3
  if rank3 and key.ndim == 3 and value.ndim == 3:
    query, key, value = query[None], key[None], value[None]
    add_batch = lambda x: (x if isinstance(x, jax.Array) else np.asarray(x))[None]  # host ids stay host
    if query_segment_ids is not None:
      query_segment_ids = add_batch(query_segment_ids)
    if key_value_segment_ids is not None:
      key_value_segment_ids = add_batch(key_value_segment_ids)
  if query.ndim != 4 or key.ndim != 4:
    raise ValueError(f"{fn}: query, key and value must have shapes (B, T, N, H) and "
                     f"(B, S, K, H) (or their 3D forms); got {query.shape}, {key.shape}.")
  # The caller's global shapes are validated here, so errors show them (the
  # ring inside shard_map would only see per-device shards).
  _attention.normalize(query, key, value, scale=scale, is_causal=is_causal,
                       query_segment_ids=query_segment_ids,
                       key_value_segment_ids=key_value_segment_ids,
                       logits_soft_cap=logits_soft_cap, fn=fn)
  if is_causal and query.shape[1] != key.shape[1]:
    raise ValueError(f"{fn}: is_causal needs query and key lengths to match "
                     f"(self-attention); got T={query.shape[1]}, S={key.shape[1]}.")
  size = lambda name: int(np.prod([mesh.shape[n] for n in (
      name if isinstance(name, tuple) else (name,))]))
  for arg, axis, dims in (("batch_axis", batch_axis, (("B", query.shape[0]),)),
                          ("head_axis", head_axis, (("N", query.shape[2]), ("K", key.shape[2])))):
    if axis is None:
      continue
    for letter, d in dims:
      if d % size(axis):
        raise ValueError(f"{fn}: {letter} = {d} (query {tuple(query.shape)}, key "
                         f"{tuple(key.shape)}) must be divisible by the size of mesh axis "
                         f"{arg} {axis!r} = {size(axis)}.")
  names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
  P = int(np.prod([mesh.shape[n] for n in names]))
  parts = 2 * P if (is_causal and layout == "zigzag") else P
  for arg, length in (("query", query.shape[1]), ("key", key.shape[1])):
    if length % parts:
      raise ValueError(f"{fn}: the {arg} sequence length ({length}) must be divisible by "
                       f"{'2 * ' if parts != P else ''}the size of mesh axis {axis_name!r} "
                       f"= {parts}; got query {tuple(query.shape)}, key {tuple(key.shape)}. "
                       f"Pad the sequences to a multiple of {parts} and pass the real "
                       f"lengths as query_seq_lengths and key_value_seq_lengths.")
  if key_value_segment_ids is None and query_segment_ids is not None and key.shape[1] == query.shape[1]:
    key_value_segment_ids = query_segment_ids
  # Python floats (a jax scalar scale is not hashable: the shard_map'd function is cached).
  scale, logits_soft_cap = _attention.canonical_scale_and_cap(fn, scale, logits_soft_cap, query.shape[3])
  options = (("is_causal", bool(is_causal)), ("layout", layout), ("scale", scale),
             ("logits_soft_cap", logits_soft_cap), ("return_residual", bool(return_residual)),
             ("block_sizes", block_sizes))
  given = (query_segment_ids is not None, query_seq_lengths is not None,
           key_value_seq_lengths is not None)
  # Host values jax would wrap (64-bit with x64 off) are clipped and ranked here, before
  # the jitted shard_map; ids are ranked over the whole sequence, not per device.
  lengths = [_attention.canonical_lengths(fn, name, x, query.shape[0], L, False)
             for name, x, L in (("query_seq_lengths", query_seq_lengths, query.shape[1]),
                                ("key_value_seq_lengths", key_value_seq_lengths, key.shape[1]))]
  query_segment_ids, key_value_segment_ids = _checks.host_ids_as_int32(query_segment_ids,
                                                                      key_value_segment_ids)
  f = _sharded_fn(mesh, axis_name, batch_axis, head_axis, given, options)
  try:
    result = f(query, key, value, query_segment_ids, key_value_segment_ids, *lengths)
  except (ValueError, TypeError) as e:
    if str(e).startswith(f"{_FN}:"):
      raise type(e)(str(e).replace(f"{_FN}:", f"{fn}:", 1)) from None
    raise
  if rank3:
    result = jax.tree.map(lambda x: x[0], result)
  return result
