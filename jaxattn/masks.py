"""Masks as functions, with block classification for block-sparse kernels.

A mask is a function `(b, h, q_idx, kv_idx) -> bool` (True = attend) over
broadcastable int32 index arrays: batch, query head, query position, key
position; the FlexAttention design (Dong et al. 2024, arXiv 2412.05496). Each
mask also tells, for a (query block, key block) pair, whether the block is
empty (nothing attends: the kernel skips it) or full (everything attends: the
kernel skips the mask arithmetic). Built-ins answer analytically; masks
holding arrays (lengths, segment ids) from per-block summaries in O(B x
blocks) memory; user functions by evaluating the function block by block
(O(blocks) memory), or from a `block_fn` the user supplies.

Masks are pytrees (their arrays are leaves) so they pass through jit, vmap and
custom VJPs, and compose with `&`, `|` and `~`.

>>> import jaxattn.masks as jm
>>> m = jm.causal() & jm.sliding_window(128) | jm.prefix_lm(16)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn import _checks

_BIG = 2**30  # stands for an unbounded window side in int32 arithmetic


def _pytree(data=(), meta=()):
  def wrap(cls):
    cls = dataclasses.dataclass(frozen=True)(cls)
    return jax.tree_util.register_dataclass(cls, data_fields=list(data), meta_fields=list(meta))
  return wrap


class Mask:
  """Base class: a boolean mask function with block classification."""

  def __call__(self, b, h, q_idx, kv_idx):
    raise NotImplementedError

  def summary(self, geometry: "BlockGeometry") -> Any:
    """Per-call data the classification needs (computed once, outside loops)."""
    return None

  def classify(self, summary, geometry: "BlockGeometry", qb, kb):
    """(empty, full) for query blocks `qb` and key blocks `kb` (broadcastable int arrays).

    Must be sound: empty only if no (b, h, q, kv) pair in the block attends,
    full only if every pair does. (False, False) is always allowed.
    """
    del summary, geometry
    z = jnp.zeros(jnp.broadcast_shapes(jnp.shape(qb), jnp.shape(kb)), bool)
    return z, z

  def validate(self, fn: str, B: int, N: int, T: int, S: int) -> None:
    """Raises ValueError if arrays held by the mask do not fit the problem."""

  def __and__(self, other: "Mask") -> "Mask":
    return And((self, _as_mask(other)))

  def __or__(self, other: "Mask") -> "Mask":
    return Or((self, _as_mask(other)))

  def __invert__(self) -> "Mask":
    return Not(self)


@dataclasses.dataclass(frozen=True)
class BlockGeometry:
  """Static block layout of a problem: sizes and block sizes.

  Every kernel's static plan extends this class (`"chunked"`, `"pallas"`,
  `"mosaic"`), so block counts and padding are computed in one place.
  """
  B: int
  N: int
  T: int
  S: int
  bq: int
  bk: int

  @property
  def nq(self) -> int:
    """Number of query blocks, ceil(T / bq)."""
    return -(-self.T // self.bq)

  @property
  def nk(self) -> int:
    """Number of key blocks, ceil(S / bk)."""
    return -(-self.S // self.bk)

  @property
  def Tp(self) -> int:
    """Query length padded to whole blocks, nq * bq."""
    return self.nq * self.bq

  @property
  def Sp(self) -> int:
    """Key length padded to whole blocks, nk * bk."""
    return self.nk * self.bk

  def q_range(self, qb):
    """First and last (inclusive) query position of blocks qb."""
    return qb * self.bq, jnp.minimum(qb * self.bq + self.bq, self.T) - 1

  def kv_range(self, kb):
    """First and last (inclusive) key position of blocks kb."""
    return kb * self.bk, jnp.minimum(kb * self.bk + self.bk, self.S) - 1


def _as_mask(m):
  if isinstance(m, Mask):
    return m
  if callable(m):
    return from_function(m)
  raise TypeError(f"expected a jaxattn.masks.Mask or a function (b, h, q_idx, kv_idx) -> bool; got {type(m).__name__}")


# ---------------------------------------------------------------------------
# Positional masks (static, classified analytically).


@_pytree(meta=("left", "right", "offset"))
class Band(Mask):
  """Query at position p = q_idx + offset sees keys in [p - left, p + right].

  None on a side means unbounded. Causal is Band(None, 0); a sliding window
  of w keys back is Band(w, 0).
  """
  left: int | None = None
  right: int | None = 0
  offset: int = 0

  def _sides(self):
    return (_BIG if self.left is None else self.left, _BIG if self.right is None else self.right)

  def __call__(self, b, h, q_idx, kv_idx):
    del b, h
    left, right = self._sides()
    p = q_idx + self.offset
    out = True
    if self.left is not None:
      out = kv_idx >= p - left
    if self.right is not None:
      out = out & (kv_idx <= p + right)
    return jnp.asarray(out)

  def classify(self, summary, g, qb, kb):
    left, right = self._sides()
    q0, q1 = g.q_range(qb)
    k0, k1 = g.kv_range(kb)
    p0, p1 = q0 + self.offset, q1 + self.offset
    # The band moves monotonically with p, so its corners decide.
    empty = (k0 > p1 + right) | (k1 < p0 - left)
    full = (k0 >= p1 - left) & (k1 <= p0 + right)
    return empty, full


def causal(offset: int = 0) -> Mask:
  """kv_idx <= q_idx + offset; offset S - T aligns bottom-right (decoding).

  Raises:
    ValueError: offset is not an int.
  """
  return Band(None, 0, _checks.int_value("causal", "offset", offset))


def sliding_window(left: int | None, right: int | None = 0, offset: int = 0) -> Mask:
  """Keys within `left` before and `right` after the query position (Mistral: right=0).

  Args:
    left: keys before the query position, an int >= 0 or None (unbounded).
    right: keys after it, an int >= 0 or None.
    offset: causal alignment, as for `causal`.

  Raises:
    ValueError: a side is negative or not an int (as `local_window_size` of
      dot_product_attention), offset not an int.
  """
  fn = "sliding_window"
  return Band(_checks.window_side(fn, "left", left), _checks.window_side(fn, "right", right),
              _checks.int_value(fn, "offset", offset))


@_pytree(meta=("size", "offset"))
class ChunkedLocal(Mask):
  """Attend within fixed chunks: (q_idx + offset) // size == kv_idx // size (Llama 4)."""
  size: int
  offset: int = 0

  def __call__(self, b, h, q_idx, kv_idx):
    return (q_idx + self.offset) // self.size == kv_idx // self.size

  def classify(self, summary, g, qb, kb):
    q0, q1 = g.q_range(qb)
    k0, k1 = g.kv_range(kb)
    c0, c1 = (q0 + self.offset) // self.size, (q1 + self.offset) // self.size
    d0, d1 = k0 // self.size, k1 // self.size
    return (c1 < d0) | (d1 < c0), (c0 == c1) & (d0 == d1) & (c0 == d0)


def chunked_local(size: int, offset: int = 0) -> Mask:
  """Attention within chunks of `size` positions (Llama 4's chunked local attention).

  Raises:
    ValueError: size is not a positive int, offset not an int.
  """
  return ChunkedLocal(_checks.positive_int("chunked_local", "size", size),
                      _checks.int_value("chunked_local", "offset", offset))


# ---------------------------------------------------------------------------
# Masks holding arrays (per batch element), classified from per-block summaries.


@_pytree(data=("q_lengths", "kv_lengths"))
class Lengths(Mask):
  """Padding: q_idx < q_lengths[b] and kv_idx < kv_lengths[b] (either may be None)."""
  q_lengths: jax.Array | None = None
  kv_lengths: jax.Array | None = None

  def __call__(self, b, h, q_idx, kv_idx):
    # A scalar length applies to every batch element.
    per_b = lambda x: x if x.ndim == 0 else _by_batch(x, b)
    out = True
    if self.q_lengths is not None:
      out = q_idx < per_b(self.q_lengths)
    if self.kv_lengths is not None:
      out = out & (kv_idx < per_b(self.kv_lengths))
    return jnp.asarray(out)

  def classify(self, summary, g, qb, kb):
    shape = jnp.broadcast_shapes(jnp.shape(qb), jnp.shape(kb))
    q0, q1 = (jnp.broadcast_to(x, shape)[None] for x in g.q_range(qb))
    k0, k1 = (jnp.broadcast_to(x, shape)[None] for x in g.kv_range(kb))
    empty_b = jnp.zeros((g.B,) + shape, bool)
    full_b = jnp.ones((g.B,) + shape, bool)
    expand = lambda x: x.reshape((-1,) + (1,) * len(shape))
    if self.q_lengths is not None:
      ql = expand(self.q_lengths)
      empty_b, full_b = empty_b | (q0 >= ql), full_b & (q1 < ql)
    if self.kv_lengths is not None:
      kl = expand(self.kv_lengths)
      empty_b, full_b = empty_b | (k0 >= kl), full_b & (k1 < kl)
    return jnp.all(empty_b, 0), jnp.all(full_b, 0)

  def validate(self, fn, B, N, T, S):
    for name, x in (("q_lengths", self.q_lengths), ("kv_lengths", self.kv_lengths)):
      if x is not None and jnp.shape(x) not in ((), (B,)):
        raise ValueError(f"{fn}: mask {name} must have shape (B,) = ({B},) or (); got "
                         f"{_checks.fmt(jnp.shape(x))}.")


@_pytree(data=("q_lengths", "kv_lengths"))
class _PrefixLengths(Lengths):
  """kv_idx < prefix_lengths[b]: the array form of prefix_lm's prefix."""

  def validate(self, fn, B, N, T, S):
    if jnp.shape(self.kv_lengths) not in ((), (B,)):
      raise ValueError(f"{fn}: mask prefix_lm's prefix_lengths must have shape (B,) = ({B},) "
                       f"or (); got {_checks.fmt(jnp.shape(self.kv_lengths))}.")


def _int_lengths(fn, name, x):
  """An int array of rank 0 or 1 (the batch), as int32."""
  if x is None:
    return None
  if not hasattr(x, "dtype"):
    x = np.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(f"{fn}: {name} must have an integer dtype; got {x.dtype}.")
  if x.ndim > 1:
    raise ValueError(f"{fn}: {name} must be a scalar or have shape (B,); got "
                     f"{_checks.fmt(x.shape)}.")
  return jnp.asarray(x, jnp.int32)


def padding(q_lengths=None, kv_lengths=None) -> Mask:
  """Queries and keys at or past their sequence's length are masked.

  Args:
    q_lengths: optional int (B,) (or a scalar for every sequence).
    kv_lengths: optional int (B,) (or a scalar).

  Raises:
    TypeError: a length is not integer.
    ValueError: a length has rank above 1.
  """
  return Lengths(_int_lengths("padding", "q_lengths", q_lengths),
                 _int_lengths("padding", "kv_lengths", kv_lengths))


def prefix_lm(prefix_lengths, offset: int = 0) -> Mask:
  """Bidirectional over the first keys, causal after (T5, PaliGemma).

  Args:
    prefix_lengths: a static int >= 0 (Python or NumPy), or an int array
      (B,) of per-sequence prefix lengths (or a scalar array, e.g. traced).
    offset: causal alignment, as for `causal`.

  Raises:
    ValueError: a static prefix length is negative; an array has rank > 1.
    TypeError: prefix_lengths is not integer.
  """
  fn = "prefix_lm"
  offset = _checks.int_value(fn, "offset", offset)
  if _checks.is_int(prefix_lengths):
    n = _checks.non_negative_int(fn, "prefix_lengths", prefix_lengths)
    return Or((_KeyBelow(n), causal(offset)))
  if isinstance(prefix_lengths, (bool, np.bool_)):
    raise TypeError(f"{fn}: prefix_lengths must be an int or an int array; got a bool.")
  return Or((_PrefixLengths(None, _int_lengths(fn, "prefix_lengths", prefix_lengths)),
             causal(offset)))


@_pytree(meta=("n",))
class _KeyBelow(Mask):
  """kv_idx < n for a static n."""
  n: int

  def __call__(self, b, h, q_idx, kv_idx):
    return kv_idx < self.n

  def classify(self, summary, g, qb, kb):
    k0, k1 = g.kv_range(kb)
    shape = jnp.broadcast_shapes(jnp.shape(qb), jnp.shape(kb))
    return jnp.broadcast_to(k0 >= self.n, shape), jnp.broadcast_to(k1 < self.n, shape)


@_pytree(data=("q_segment_ids", "kv_segment_ids"))
class Documents(Mask):
  """Packed documents: attend where q_segment_ids[b, q] == kv_segment_ids[b, kv]."""
  q_segment_ids: jax.Array
  kv_segment_ids: jax.Array

  def __call__(self, b, h, q_idx, kv_idx):
    return _gather(self.q_segment_ids, b, q_idx, -1) == _gather(self.kv_segment_ids, b, kv_idx, -2)

  def summary(self, g):
    return (_block_min_max(self.q_segment_ids, g.bq), _block_min_max(self.kv_segment_ids, g.bk))

  def classify(self, summary, g, qb, kb):
    (qmin, qmax), (kmin, kmax) = summary
    take = lambda x, idx: jnp.take(x, idx, axis=1, mode="clip")  # (B, *idx.shape)
    shape = jnp.broadcast_shapes(jnp.shape(qb), jnp.shape(kb))
    qb, kb = jnp.broadcast_to(qb, shape), jnp.broadcast_to(kb, shape)
    a0, a1, c0, c1 = take(qmin, qb), take(qmax, qb), take(kmin, kb), take(kmax, kb)
    empty = jnp.all((a1 < c0) | (c1 < a0), 0)
    full = jnp.all((a0 == a1) & (c0 == c1) & (a0 == c0), 0)
    return empty, full

  def validate(self, fn, B, N, T, S):
    for name, x, L, letter in (("q_segment_ids", self.q_segment_ids, T, "T"),
                               ("kv_segment_ids", self.kv_segment_ids, S, "S")):
      if jnp.shape(x) != (B, L):
        raise ValueError(f"{fn}: mask {name} must have shape (B, {letter}) = ({B}, {L}); got {jnp.shape(x)}.")


def documents(q_segment_ids, kv_segment_ids=None) -> Mask:
  """Packed documents from int segment ids (B, T) and (B, S) (default: the same ids).

  Raises:
    TypeError: ids are not integer.
    ValueError: ids are not 2-D or their batch sizes differ.
  """
  fn = "documents"
  q_segment_ids, kv_segment_ids = _checks.host_ids_as_int32(q_segment_ids, kv_segment_ids)
  ids = []
  for name, x in (("q_segment_ids", q_segment_ids), ("kv_segment_ids", kv_segment_ids)):
    if x is None:
      ids.append(None)
      continue
    if not hasattr(x, "dtype"):
      x = np.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise TypeError(f"{fn}: {name} must have an integer dtype; got {x.dtype}.")
    if x.ndim != 2:
      raise ValueError(f"{fn}: {name} must have shape (B, {'T' if name[0] == 'q' else 'S'}); "
                       f"got {_checks.fmt(x.shape)}.")
    ids.append(jnp.asarray(x))
  q, kv = ids
  if kv is not None and kv.shape[0] != q.shape[0]:
    raise ValueError(f"{fn}: kv_segment_ids must have shape (B, S) with B = {q.shape[0]} "
                     f"from q_segment_ids {_checks.fmt(q.shape)}; got {_checks.fmt(kv.shape)}.")
  # int32, ranked where the ids do not fit (a cast would merge documents), as segment ids are.
  q, kv = _checks.segments_as_int32(q, q if kv is None else kv)
  return Documents(q, kv)


def _gather(ids, b, idx, fill):
  """ids[b, idx] for broadcastable index arrays; positions past the end give `fill`."""
  L = ids.shape[1]
  return jnp.where(idx < L, _by_batch(ids, b, jnp.clip(idx, 0, L - 1)), fill)


def _by_batch(x, b, *rest):
  """x[b, *rest]; where x's batch axis is sharded over an explicit mesh axis and
  b runs over the whole batch (the kernels' b), the result keeps that sharding.

  (With explicit axes jax refuses a gather whose output sharding it cannot
  infer: batch-sharded lengths or segment ids failed in every implementation.)
  """
  index = (b, *rest)
  spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
  axis = spec[0] if spec is not None and len(spec) else None
  if axis is None or jnp.ndim(b) == 0 or jnp.shape(b)[0] != x.shape[0]:
    return x[index]
  ndim = len(jnp.broadcast_shapes(*(jnp.shape(i) for i in index)))
  return x.at[index].get(out_sharding=jax.sharding.PartitionSpec(axis, *([None] * (ndim - 1))))


def _block_min_max(ids, block):
  B, L = ids.shape
  n = -(-L // block)
  pad = n * block - L
  big = jnp.iinfo(jnp.int32).max
  lo = jnp.pad(ids, ((0, 0), (0, pad)), constant_values=big).reshape(B, n, block).min(-1)
  hi = jnp.pad(ids, ((0, 0), (0, pad)), constant_values=-big).reshape(B, n, block).max(-1)
  return lo, hi


# ---------------------------------------------------------------------------
# User functions and combinators.


@_pytree(data=("params", "block_params"), meta=("fn", "block_fn", "takes_params"))
class FunctionMask(Mask):
  """A user mask function, optionally with a block classifier.

  Without `block_fn`, blocks are classified by evaluating `fn` on each block
  (a pass over the grid in O(blocks) memory; elementwise work only).
  `block_fn(q_first, q_last, kv_first, kv_last) -> (empty, full)` gets the
  inclusive position ranges of blocks and must be sound. With
  `takes_params`, `fn(params, b, h, q_idx, kv_idx)`: `params` is a pytree of
  arrays (data, traced like any argument). `block_params` is not None only
  for a lifted `block_fn` (`lift_traced_closures`), called as
  `block_fn(block_params, ...)`.
  """
  fn: Callable
  block_fn: Callable | None = None
  params: Any = None
  takes_params: bool = False
  block_params: Any = None

  def __call__(self, b, h, q_idx, kv_idx):
    if self.takes_params:
      return jnp.asarray(self.fn(self.params, b, h, q_idx, kv_idx), bool)
    return jnp.asarray(self.fn(b, h, q_idx, kv_idx), bool)

  def summary(self, g):
    if self.block_fn is not None:
      return None
    return evaluate_blocks(self, g)

  def classify(self, summary, g, qb, kb):
    if self.block_fn is not None:
      q0, q1 = g.q_range(qb)
      k0, k1 = g.kv_range(kb)
      if self.block_params is not None:
        empty, full = self.block_fn(self.block_params, q0, q1, k0, k1)
      else:
        empty, full = self.block_fn(q0, q1, k0, k1)
      shape = jnp.broadcast_shapes(jnp.shape(qb), jnp.shape(kb))
      return jnp.broadcast_to(empty, shape), jnp.broadcast_to(full, shape)
    any_, all_ = summary
    return ~any_[qb, kb], all_[qb, kb]

  def validate(self, fn, B, N, T, S):
    check_index_function(fn, "mask_fn", self.fn, (self.params,) if self.takes_params else (),
                         B, N, T, S, score=False)


def check_index_function(fn, arg, f, lead, B, N, T, S, *, score, name=None):
  """Checks that a user's mask or score function is elementwise in its index arguments.

  Kernels call it on tiles, with index arrays broadcastable to a tile, so its
  result must have the broadcast shape of its arguments (or broadcast to
  it); one evaluation of shapes on the whole (B, N, T, S) grid and one on a
  single element show a result of the wrong shape at trace time, naming the
  user's function and the expected shape, instead of a broadcasting error
  deep inside a kernel.

  Args:
    fn: the public function, for the message.
    arg: the argument's name ("mask_fn", "score_fn").
    f: the user function; called as f(*lead, [score,] b, h, q_idx, kv_idx).
    lead: leading arguments (a score function's params).
    B, N, T, S: the problem's sizes.
    score: f takes and returns a float score (B, N, T, S).
    name: the user function's name for the message (default f's).
  """
  name = _checks.callable_name(f) if name is None else name
  i32 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.int32)
  for label, shape in (("(B, N, T, S) = ", (B, N, T, S)), ("one element: ", (1, 1, 1, 1))):
    b, h, q, kv = (i32(tuple(n if i == d else 1 for i in range(4))) for d, n in enumerate(shape))
    args = (b, h, q, kv)
    if score:
      args = (jax.ShapeDtypeStruct(shape, jnp.float32),) + args
    out = jax.eval_shape(lambda *a: f(*a), *lead, *args)  # (f may not be weak-referenceable)
    got = getattr(out, "shape", None)
    try:
      ok = got is not None and jnp.broadcast_shapes(got, shape) == shape
    except ValueError:
      ok = False
    if score:
      ok = ok and got == shape and jnp.issubdtype(out.dtype, jnp.floating)
    else:  # an int or float result (a typo for a comparison) would pass as `!= 0`
      ok = ok and getattr(out, "dtype", None) == jnp.bool_
    if not ok:
      what = ("a floating point score of its score argument's shape"
              if score else "a bool array that broadcasts to its index arguments' shape")
      shown = f"{None if got is None else _checks.fmt(got)}"
      if got is not None:
        shown += f" {out.dtype}"
      where = label + _checks.fmt(shape)
      raise ValueError(
          f"{fn}: {arg} {name} must return {what}, {where}, when "
          f"called with b {_checks.fmt(b.shape)}, h {_checks.fmt(h.shape)}, q_idx "
          f"{_checks.fmt(q.shape)} and kv_idx {_checks.fmt(kv.shape)}; got {shown}.")


def from_function(fn: Callable, block_fn: Callable | None = None, *, params: Any = None) -> Mask:
  """Wraps `fn(b, h, q_idx, kv_idx) -> bool` as a Mask (see FunctionMask); with
  `params` (a pytree of arrays, e.g. per-example lengths), `fn(params, b, h,
  q_idx, kv_idx)`. Arrays that `fn` closes over work too: traced ones (under
  an enclosing jit or grad) are lifted into its params when the mask is used.

  Raises:
    TypeError: fn or block_fn is not callable.
  """
  if not callable(fn):
    raise TypeError(f"from_function: fn must be a function (b, h, q_idx, kv_idx) -> bool; "
                    f"got {type(fn).__name__}.")
  if block_fn is not None and not callable(block_fn):
    raise TypeError(f"from_function: block_fn must be a function or None; got "
                    f"{type(block_fn).__name__}.")
  if params is not None:
    return FunctionMask(fn, block_fn, params, True)
  return FunctionMask(fn, block_fn)


def lift_traced_closures(mask: Mask | None) -> Mask | None:
  """`mask` with every FunctionMask whose function closes over traced arrays
  given those arrays as params (`_checks.lift_traced_closure`)."""
  if mask is None:
    return None
  i32 = jax.ShapeDtypeStruct((1, 1, 1, 1), jnp.int32)
  i32_scalar = jax.ShapeDtypeStruct((), jnp.int32)

  def lift(m):
    if not isinstance(m, FunctionMask):
      return m
    fn, params, takes = m.fn, m.params, m.takes_params
    name = _checks.callable_name(fn)
    lifted = (_checks.lift_traced_closure_with_params(fn, params) if takes
              else _checks.lift_traced_closure(fn))
    if lifted is not None:
      (fn, params), takes = lifted, True
    # What the templates cannot reach: found by tracing the function.
    if (hoisted := _checks.hoist_traced_constants(fn, takes, params, (i32,) * 4, name)):
      (fn, params), takes = hoisted, True
    block_fn, block_params = m.block_fn, m.block_params
    if block_fn is not None:
      block_name = _checks.callable_name(block_fn)
      if block_params is None and (lifted := _checks.lift_traced_closure(block_fn)) is not None:
        block_fn, block_params = lifted
      block_takes = block_params is not None
      if (hoisted := _checks.hoist_traced_constants(block_fn, block_takes, block_params,
                                                    (i32_scalar,) * 4, block_name)):
        block_fn, block_params = hoisted
    return FunctionMask(fn, block_fn, params, takes, block_params)

  return jax.tree_util.tree_map(lift, mask, is_leaf=lambda m: isinstance(m, FunctionMask))


def evaluate_blocks(mask: Mask, g: BlockGeometry):
  """(any, all) of `mask` over each (query block, key block), (nq, nk) bool each.

  Evaluates one query block at a time (memory O(bq x S), not O(T x S)).
  """
  b = jnp.arange(g.B)[:, None, None, None]
  h = jnp.arange(g.N)[None, :, None, None]
  kv = jnp.arange(g.nk * g.bk)[None, None, None, :]

  def row(i):
    q = (i * g.bq + jnp.arange(g.bq))[None, None, :, None]
    m = jnp.broadcast_to(mask(b, h, q, kv), (g.B, g.N, g.bq, g.nk * g.bk))
    valid = (q < g.T) & (kv < g.S)
    m = m.reshape(g.B, g.N, g.bq, g.nk, g.bk)
    v = jnp.broadcast_to(valid, (1, 1, g.bq, g.nk * g.bk)).reshape(1, 1, g.bq, g.nk, g.bk)
    return jnp.any(m & v, (0, 1, 2, 4)), jnp.all(m | ~v, (0, 1, 2, 4))

  return jax.lax.map(row, jnp.arange(g.nq))


@_pytree(data=("masks",))
class And(Mask):
  """Conjunction of masks: a pair is kept when every mask keeps it (`m1 & m2`)."""
  masks: tuple

  def __call__(self, b, h, q_idx, kv_idx):
    out = self.masks[0](b, h, q_idx, kv_idx)
    for m in self.masks[1:]:
      out = out & m(b, h, q_idx, kv_idx)
    return out

  def summary(self, g):
    return tuple(m.summary(g) for m in self.masks)

  def classify(self, summary, g, qb, kb):
    parts = [m.classify(s, g, qb, kb) for m, s in zip(self.masks, summary)]
    empty, full = parts[0]
    for e, f in parts[1:]:
      empty, full = empty | e, full & f
    return empty, full

  def validate(self, fn, B, N, T, S):
    for m in self.masks:
      m.validate(fn, B, N, T, S)


@_pytree(data=("masks",))
class Or(And):
  """Disjunction of masks: a pair is kept when any mask keeps it (`m1 | m2`)."""

  def __call__(self, b, h, q_idx, kv_idx):
    out = self.masks[0](b, h, q_idx, kv_idx)
    for m in self.masks[1:]:
      out = out | m(b, h, q_idx, kv_idx)
    return out

  def classify(self, summary, g, qb, kb):
    parts = [m.classify(s, g, qb, kb) for m, s in zip(self.masks, summary)]
    empty, full = parts[0]
    for e, f in parts[1:]:
      empty, full = empty & e, full | f
    return empty, full


@_pytree(data=("mask",))
class Not(Mask):
  """Complement of a mask: keeps the pairs it masks and masks the rest (`~m`)."""
  mask: Mask

  def __call__(self, b, h, q_idx, kv_idx):
    return ~self.mask(b, h, q_idx, kv_idx)

  def summary(self, g):
    return self.mask.summary(g)

  def classify(self, summary, g, qb, kb):
    empty, full = self.mask.classify(summary, g, qb, kb)
    return full, empty

  def validate(self, fn, B, N, T, S):
    self.mask.validate(fn, B, N, T, S)


def all_of(*masks: Mask | None) -> Mask | None:
  """The conjunction of the given masks (None entries ignored; None if none)."""
  ms = tuple(m for m in masks if m is not None)
  if not ms:
    return None
  return ms[0] if len(ms) == 1 else And(ms)


EMPTY, PARTIAL, FULL = 0, 1, 2  # block kinds


def block_kinds(mask: Mask | None, g: BlockGeometry, qb, kb, *, summary: Any = None,
                dense_mask: bool = False, pad_keys: bool = True, pad_queries: bool = False):
  """Block kinds of query blocks `qb` x key blocks `kb`, as kernels use them.

  Returns int32 of the broadcast shape of `qb` and `kb`: `EMPTY` (0: no pair
  attends, the kernel skips the block), `PARTIAL` (1: the kernel applies the
  mask) or `FULL` (2: every pair attends, no mask arithmetic). `mask=None`
  attends everywhere. `summary` is `mask.summary(g)`, computed here when not
  given (kernels compute it once, outside their loops). A dense boolean mask
  beside `mask` (`dense_mask=True`) makes no block full. With `pad_keys`, the
  last key block is never full when it holds padding columns (`S % bk`);
  with `pad_queries` the same holds for padding rows (`T % bq`).
  """
  shape = jnp.broadcast_shapes(jnp.shape(qb), jnp.shape(kb))
  if mask is None:
    empty, full = jnp.zeros(shape, bool), jnp.ones(shape, bool)
  else:
    if summary is None:
      summary = mask.summary(g)
    empty, full = mask.classify(summary, g, qb, kb)
    empty, full = jnp.broadcast_to(empty, shape), jnp.broadcast_to(full, shape)
  if dense_mask:
    full = jnp.zeros(shape, bool)
  if pad_keys and g.S % g.bk:
    full = full & (kb != g.nk - 1)
  if pad_queries and g.T % g.bq:
    full = full & (qb != g.nq - 1)
  return jnp.where(empty, EMPTY, jnp.where(full, FULL, PARTIAL)).astype(jnp.int32)


def block_map(mask: Mask, g: BlockGeometry):
  """(nq, nk) int8: 0 empty, 1 partial, 2 full, for inspection and tests.

  The mask's own classification: padding blocks are not marked partial.
  """
  kinds = block_kinds(mask, g, jnp.arange(g.nq)[:, None], jnp.arange(g.nk)[None, :], pad_keys=False)
  return kinds.astype(jnp.int8)
