"""Numerically stable softmax, log-softmax and logsumexp with a `where` mask.

All three subtract the maximum before exponentiating and keep their statistics
(maximum, sum) in float32 or wider, whatever the input dtype; results come back
in the input dtype. A slice with nothing selected by `where` (or whose entries
are all -inf) gives softmax 0 and logsumexp -inf, and their derivatives are 0,
never NaN. Derivatives are defined with `jax.custom_jvp`, so reverse mode costs
one extra elementwise pass over the output.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn import _checks

Axis = int | Sequence[int] | None


def _stat_dtype(dtype) -> np.dtype:
  """float32 for half precision inputs, the input dtype otherwise."""
  return jnp.promote_types(dtype, jnp.float32)


def _normalize_axis(fn: str, axis: Axis, shape) -> tuple[int, ...]:
  """Axes in [0, ndim), refused out of range or repeated (as jax.nn does)."""
  ndim = len(shape)
  if axis is None:
    return tuple(range(ndim))
  axes = (axis,) if _checks.is_int(axis) else axis
  try:
    axes = tuple(axes)
  except TypeError:
    raise TypeError(f"{fn}: axis must be an int, a sequence of ints or None; got "
                    f"{axis!r}.") from None
  out = []
  for a in axes:
    if not _checks.is_int(a):
      raise TypeError(f"{fn}: axis must be an int, a sequence of ints or None; got {axis!r}.")
    if not -ndim <= a < ndim:
      raise ValueError(f"{fn}: axis {int(a)} is out of bounds for x of rank {ndim} "
                       f"(shape {_checks.fmt(shape)}); got axis={axis!r}.")
    out.append(int(a) % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f"{fn}: axis must not repeat an axis; got {axis!r} for x of rank {ndim}.")
  return tuple(out)


def _check(fn: str, x, where):
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{fn}: x must be a floating point array; got dtype {x.dtype}.")
  if where is not None:
    where = jnp.asarray(where)
    if where.dtype != jnp.bool_:
      raise TypeError(f"{fn}: where must be a boolean array; got dtype {where.dtype}.")
    try:
      shape = jnp.broadcast_shapes(where.shape, x.shape)
    except ValueError:
      shape = None
    if shape != x.shape:
      raise ValueError(
          f"{fn}: where must broadcast to x's shape {x.shape}; got {where.shape}.")
    where = jnp.broadcast_to(where, x.shape)
  return x, where


def _stats(x, axis, where):
  """Returns (x in stat dtype with masked entries at -inf, safe max, sum of exp)."""
  xs = x.astype(_stat_dtype(x.dtype))
  if where is not None:
    xs = jnp.where(where, xs, -jnp.inf)
  # initial=-inf: an empty slice (a zero-sized axis) reduces like an all-masked one.
  m = jnp.max(xs, axis=axis, keepdims=True, initial=-jnp.inf)
  # An empty (all -inf) slice would give -inf - -inf = nan: shift by 0 instead.
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  m = jax.lax.stop_gradient(m)
  e = jnp.exp(xs - m)
  return xs, m, e, jnp.sum(e, axis=axis, keepdims=True)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _softmax(x, axis, where):
  _, _, e, s = _stats(x, axis, where)
  # s == 0 only when every entry is masked; then e == 0 too and the result is 0.
  return (e / jnp.where(s == 0, 1.0, s)).astype(x.dtype)


@_softmax.defjvp
def _softmax_jvp(axis, primals, tangents):
  x, where = primals
  dx, _ = tangents
  y = _softmax(x, axis, where)
  yf = y.astype(_stat_dtype(y.dtype))
  dxf = dx.astype(yf.dtype)
  if where is not None:
    dxf = jnp.where(where, dxf, 0.0)
  dy = yf * (dxf - jnp.sum(yf * dxf, axis=axis, keepdims=True))
  return y, dy.astype(y.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _logsumexp(x, axis, where):
  """In the statistics dtype (float32 for bfloat16/float16 x): `log_softmax`
  subtracts it before rounding once, the public `logsumexp` rounds it."""
  _, m, _, s = _stats(x, axis, where)
  return m + jnp.log(s)


@_logsumexp.defjvp
def _logsumexp_jvp(axis, primals, tangents):
  x, where = primals
  dx, _ = tangents
  out = _logsumexp(x, axis, where)
  p = _softmax(x, axis, where).astype(_stat_dtype(x.dtype))
  dxf = dx.astype(p.dtype)
  if where is not None:
    dxf = jnp.where(where, dxf, 0.0)
  return out, jnp.sum(p * dxf, axis=axis, keepdims=True).astype(out.dtype)


def softmax(x, axis: Axis = -1, where=None) -> jax.Array:
  r"""Computes a numerically stable softmax along `axis`.

  .. math:: \mathrm{softmax}(x)_i = \exp(x_i - m) / \sum_j \exp(x_j - m),
     \quad m = \max_j x_j

  Args:
    x: floating point array of any shape.
    axis: axis or axes to normalize over; None means all axes.
    where: optional boolean array broadcastable to `x.shape`; entries that are
      False take no part and come out as 0.

  Returns:
    An array of `x`'s shape and dtype. A slice with nothing selected is all 0.

  Raises:
    TypeError: `x` is not floating point or `where` is not boolean.
    ValueError: `where` does not broadcast to `x`'s shape; `axis` is out of
      range or repeats an axis (as in jax.nn).

  >>> import jax.numpy as jnp, jaxattn
  >>> jaxattn.softmax(jnp.array([1000.0, 1000.0]))
  Array([0.5, 0.5], dtype=float32)
  """
  x, where = _check("softmax", x, where)
  return _softmax(x, _normalize_axis("softmax", axis, x.shape), where)


def logsumexp(x, axis: Axis = -1, where=None) -> jax.Array:
  r"""Computes :math:`\log \sum_j \exp(x_j)` along `axis`, stably.

  Args:
    x: floating point array of any shape.
    axis: axis or axes to reduce; None means all axes.
    where: optional boolean array broadcastable to `x.shape`.

  Returns:
    `x` reduced over `axis` (dims removed), in `x`'s dtype; -inf for a slice
    with nothing selected, whose gradient is 0.

  >>> import jax.numpy as jnp, jaxattn
  >>> jaxattn.logsumexp(jnp.array([0.0, 0.0]), where=jnp.array([False, False]))
  Array(-inf, dtype=float32)
  """
  x, where = _check("logsumexp", x, where)
  axes = _normalize_axis("logsumexp", axis, x.shape)
  return jnp.squeeze(_logsumexp(x, axes, where), axis=axes).astype(x.dtype)


def log_softmax(x, axis: Axis = -1, where=None) -> jax.Array:
  r"""Computes :math:`x_i - \log \sum_j \exp(x_j)` along `axis`, stably.

  Args:
    x: floating point array of any shape.
    axis: axis or axes to normalize over.
    where: optional boolean mask; unselected entries come out as -inf.

  Returns:
    An array of `x`'s shape and dtype; a slice with nothing selected (every
    entry -inf or masked) is all -inf, with zero gradients.
  """
  x, where = _check("log_softmax", x, where)
  axes = _normalize_axis("log_softmax", axis, x.shape)
  lse = _logsumexp(x, axes, where)
  # A slice with nothing selected (lse -inf: all -inf or masked) gives -inf,
  # the log of its softmax 0, not -inf - -inf = NaN.
  out = jnp.where(jnp.isneginf(lse), -jnp.inf, x.astype(lse.dtype) - lse)
  if where is not None:
    out = jnp.where(where, out, -jnp.inf)
  return out.astype(x.dtype)
