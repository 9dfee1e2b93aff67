"""Score modifiers: functions `(score, b, h, q_idx, kv_idx) -> score`.

Applied to the scaled logits before the bias and the mask, in every
implementation. Modifiers are pytrees: arrays they hold (ALiBi slopes, a
learned relative-position table) are leaves, so gradients flow to them
through jit and through the chunked implementation's custom VJP.

>>> import jax.numpy as jnp, jaxattn.scores as js
>>> mod = js.alibi(js.alibi_slopes(8))
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn import _checks


def _pytree(data=(), meta=()):
  def wrap(cls):
    cls = dataclasses.dataclass(frozen=True)(cls)
    return jax.tree_util.register_dataclass(cls, data_fields=list(data), meta_fields=list(meta))
  return wrap


class ScoreMod:
  """Base class of score modifiers."""

  def __call__(self, score, b, h, q_idx, kv_idx):
    raise NotImplementedError

  def validate(self, fn: str, B: int, N: int, T: int, S: int) -> None:
    """Raises ValueError if arrays held by the modifier do not fit the problem."""


@_pytree(meta=("cap",))
class SoftCap(ScoreMod):
  """`cap * tanh(score / cap)` (Gemma 2)."""
  cap: float

  def __call__(self, score, b, h, q_idx, kv_idx):
    return self.cap * jnp.tanh(score / self.cap)


def soft_cap(cap: float) -> ScoreMod:
  """`cap * tanh(score / cap)` (Gemma 2).

  Raises:
    ValueError: cap is not a finite positive number (as `logits_soft_cap`).
  """
  return SoftCap(_checks.finite_positive_float("soft_cap", "cap", cap))


@_pytree(data=("slopes",))
class Alibi(ScoreMod):
  """score + slopes[h] * (kv_idx - q_idx) (Press et al. 2022, arXiv 2108.12409)."""
  slopes: jax.Array

  def __call__(self, score, b, h, q_idx, kv_idx):
    return score + self.slopes[h].astype(score.dtype) * (kv_idx - q_idx).astype(score.dtype)

  def validate(self, fn, B, N, T, S):
    if jnp.shape(self.slopes) != (N,):
      raise ValueError(f"{fn}: alibi slopes must have shape (N,) = ({N},); got {jnp.shape(self.slopes)}.")


def alibi_slopes(num_heads: int, dtype=jnp.float32) -> jax.Array:
  """The geometric slopes of the ALiBi paper, 2^(-8 i / n), with its rule for non powers of 2,
  in `dtype` (float64 for float64 attention, with x64 enabled).

  Raises:
    ValueError: num_heads is not a positive int.
  """
  num_heads = _checks.positive_int("alibi_slopes", "num_heads", num_heads)
  def pow2(n):
    start = 2.0 ** (-8.0 / n)
    return [start ** (i + 1) for i in range(n)]
  n = 2 ** math.floor(math.log2(num_heads))
  slopes = pow2(n)
  if n < num_heads:
    slopes += pow2(2 * n)[0::2][: num_heads - n]
  return jnp.asarray(slopes, dtype)


def alibi(slopes) -> ScoreMod:
  """ALiBi with per-head `slopes` (N,) (see `alibi_slopes`).

  Raises:
    ValueError: slopes is not 1-D.
    TypeError: slopes is not real numbers.
  """
  slopes = _real_array("alibi", "slopes", slopes, 1, "(N,)")
  # Floating slopes keep their dtype (float64 attention stays float64 exact);
  # the scores cast them to their own dtype.
  return Alibi(slopes if jnp.issubdtype(slopes.dtype, jnp.floating)
               else slopes.astype(jnp.float32))


def _real_array(fn, name, x, ndim, letters):
  if not hasattr(x, "dtype"):
    x = np.asarray(x)
  if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)):
    raise TypeError(f"{fn}: {name} must hold real numbers; got dtype {x.dtype}.")
  if x.ndim != ndim:
    raise ValueError(f"{fn}: {name} must have shape {letters}; got {_checks.fmt(x.shape)}.")
  return jnp.asarray(x)


@_pytree(data=("table",), meta=("max_distance",))
class RelativePositionBias(ScoreMod):
  """score + table[h, clip(kv_idx - q_idx, -max_distance, max_distance) + max_distance]."""
  table: jax.Array  # (N, 2 * max_distance + 1)
  max_distance: int

  def __call__(self, score, b, h, q_idx, kv_idx):
    rel = jnp.clip(kv_idx - q_idx, -self.max_distance, self.max_distance) + self.max_distance
    return score + self.table[h, rel].astype(score.dtype)

  def validate(self, fn, B, N, T, S):
    want = (N, 2 * self.max_distance + 1)
    if jnp.shape(self.table) != want:
      raise ValueError(f"{fn}: relative position table must have shape (N, 2 * max_distance + 1) = {want}; got {jnp.shape(self.table)}.")


def relative_position_bias(table, max_distance: int) -> ScoreMod:
  """score + table[h, clip(kv_idx - q_idx) + max_distance]; table (N, 2 * max_distance + 1).

  Raises:
    ValueError: max_distance is not a non-negative int; table not
      (N, 2 * max_distance + 1).
    TypeError: table is not real numbers.
  """
  fn = "relative_position_bias"
  max_distance = _checks.non_negative_int(fn, "max_distance", max_distance)
  table = _real_array(fn, "table", table, 2, "(N, 2 * max_distance + 1)")
  if table.shape[1] != 2 * max_distance + 1:
    raise ValueError(f"{fn}: table must have shape (N, 2 * max_distance + 1) = (N, "
                     f"{2 * max_distance + 1}); got {_checks.fmt(table.shape)}.")
  return RelativePositionBias(table, max_distance)


def t5_bucket(relative_position, *, bidirectional: bool = True, num_buckets: int = 32,
              max_distance: int = 128):
  """T5's bucket of `kv_idx - q_idx`: exact for small distances, logarithmic after."""
  ret = 0
  n = -relative_position
  if bidirectional:
    num_buckets //= 2
    ret = (n < 0).astype(jnp.int32) * num_buckets
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  large = max_exact + (jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact)
                       / math.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return ret + jnp.where(is_small, n, large)


@_pytree(data=("table",), meta=("bidirectional", "num_buckets", "max_distance"))
class T5RelativeBias(ScoreMod):
  """score + table[h, t5_bucket(kv_idx - q_idx)] (Raffel et al. 2020)."""
  table: jax.Array  # (N, num_buckets)
  bidirectional: bool = True
  num_buckets: int = 32
  max_distance: int = 128

  def __call__(self, score, b, h, q_idx, kv_idx):
    bucket = t5_bucket(kv_idx - q_idx, bidirectional=self.bidirectional,
                       num_buckets=self.num_buckets, max_distance=self.max_distance)
    return score + self.table[h, bucket].astype(score.dtype)

  def validate(self, fn, B, N, T, S):
    if jnp.shape(self.table) != (N, self.num_buckets):
      raise ValueError(f"{fn}: T5 bias table must have shape (N, num_buckets) = ({N}, {self.num_buckets}); got {jnp.shape(self.table)}.")


def t5_relative_bias(table, *, bidirectional=True, num_buckets=32, max_distance=128) -> ScoreMod:
  """score + table[h, t5_bucket(kv_idx - q_idx)]; table (N, num_buckets).

  Raises:
    ValueError: num_buckets leaves no exact bucket (fewer than 2, 4 when
      bidirectional), max_distance not above the exact range, table not
      (N, num_buckets).
    TypeError: table is not real numbers.
  """
  fn = "t5_relative_bias"
  num_buckets = _checks.positive_int(fn, "num_buckets", num_buckets)
  max_distance = _checks.positive_int(fn, "max_distance", max_distance)
  bidirectional = bool(bidirectional)
  exact = (num_buckets // 2 if bidirectional else num_buckets) // 2
  if exact < 1:
    raise ValueError(f"{fn}: num_buckets must be at least {4 if bidirectional else 2} "
                     f"(bidirectional={bidirectional}); got {num_buckets}.")
  if max_distance <= exact:
    raise ValueError(f"{fn}: max_distance must exceed the {exact} exact buckets; got "
                     f"{max_distance}.")
  table = _real_array(fn, "table", table, 2, "(N, num_buckets)")
  if table.shape[1] != num_buckets:
    raise ValueError(f"{fn}: table must have shape (N, num_buckets) = (N, {num_buckets}); "
                     f"got {_checks.fmt(table.shape)}.")
  return T5RelativeBias(table, bidirectional, num_buckets, max_distance)


@_pytree(data=("params",), meta=("fn",))
class FunctionScore(ScoreMod):
  """`fn(params, score, b, h, q_idx, kv_idx)`; gradients flow to `params`."""
  fn: Callable
  params: Any = None

  def __call__(self, score, b, h, q_idx, kv_idx):
    return self.fn(self.params, score, b, h, q_idx, kv_idx)

  def validate(self, fn, B, N, T, S):
    from jaxattn import masks  # masks holds the shared probe; imported late (no import cycle)
    user = self.fn.fn if isinstance(self.fn, _WithoutParams) else self.fn  # Hoisted: its name
    masks.check_index_function(fn, "score_fn", self.fn, (self.params,), B, N, T, S, score=True,
                               name=_checks.callable_name(user))


@dataclasses.dataclass(frozen=True)
class _WithoutParams:
  """Adapts fn(score, b, h, q, kv) to the params-first signature; hashable by fn."""
  fn: Callable

  def __call__(self, params, *args):
    del params
    return self.fn(*args)


def from_function(fn: Callable, params: Any = None) -> ScoreMod:
  """Wraps a user modifier. With params, `fn(params, score, b, h, q, kv)`; without,
  `fn(score, b, h, q, kv)`. Arrays it closes over are constants, except traced
  ones (under an enclosing jit or grad): those are lifted into its params when
  it is used, so they get gradients as through any JAX function.

  Raises:
    TypeError: fn is not callable.
  """
  if not callable(fn):
    raise TypeError(f"from_function: fn must be a function (score, b, h, q_idx, kv_idx) -> "
                    f"score; got {type(fn).__name__}.")
  if params is None:
    return FunctionScore(_WithoutParams(fn), None)
  return FunctionScore(fn, params)


def lift_traced_closures(mod: ScoreMod | None) -> ScoreMod | None:
  """`mod` with every parameterless FunctionScore whose function closes over
  traced arrays given those arrays as params (`_checks.lift_traced_closure`)."""
  if mod is None:
    return None

  example = (jax.ShapeDtypeStruct((1, 1, 1, 1), jnp.float32),) + (
      jax.ShapeDtypeStruct((1, 1, 1, 1), jnp.int32),) * 4

  def lift(m):
    if not isinstance(m, FunctionScore):
      return m
    name = _checks.callable_name(m.fn.fn if isinstance(m.fn, _WithoutParams) else m.fn)
    if isinstance(m.fn, _WithoutParams):
      lifted = _checks.lift_traced_closure(m.fn.fn)
    else:  # explicit params, and maybe traced values in its closure too
      lifted = _checks.lift_traced_closure_with_params(m.fn, m.params)
    m = m if lifted is None else FunctionScore(*lifted)
    # What the templates cannot reach: found by tracing the function.
    hoisted = _checks.hoist_traced_constants(m.fn, True, m.params, example, name)
    return m if hoisted is None else FunctionScore(*hoisted)

  return jax.tree_util.tree_map(lift, mod, is_leaf=lambda m: isinstance(m, FunctionScore))


@_pytree(data=("mods",))
class Chain(ScoreMod):
  """Applies modifiers left to right."""
  mods: tuple

  def __call__(self, score, b, h, q_idx, kv_idx):
    for m in self.mods:
      score = m(score, b, h, q_idx, kv_idx)
    return score

  def validate(self, fn, B, N, T, S):
    for m in self.mods:
      m.validate(fn, B, N, T, S)


def chain(*mods: ScoreMod | None) -> ScoreMod | None:
  """Compose score modifiers, applied left to right: chain(f, g)(s) = g(f(s)).

  Args:
    *mods: `ScoreMod`s or None; None entries are skipped.

  Returns:
    None if no modifier is given, the modifier itself if one is, else a
    `Chain` of them.

  >>> import jaxattn.scores as js
  >>> js.chain(None, js.soft_cap(30.0)) == js.soft_cap(30.0)
  True
  """
  ms = tuple(m for m in mods if m is not None)
  if not ms:
    return None
  return ms[0] if len(ms) == 1 else Chain(ms)
