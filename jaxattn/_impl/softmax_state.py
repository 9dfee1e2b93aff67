"""The online softmax of blocked attention, written once (Milakov & Gimelshein
2018, arXiv 1805.02867; FlashAttention, Dao et al. 2022, arXiv 2205.14135).

A query row's state after some key blocks is (m, l, acc): the running maximum
logit m, the sum l = sum_j exp(s_j - m) and the output sum
acc = sum_j exp(s_j - m) v_j. A row that has seen no key yet has m = -inf,
l = 0 and acc = 0; exp is then taken against 0 instead of -inf, so such rows
give weights 0, never NaN. The output is acc / l and the logsumexp m + log l.

Plain jnp on arrays of any leading shape (rows on the last axis of m and l,
the value dimension after it in acc), so the same functions serve the chunked
implementation, the decode kernels and the Pallas kernels (where they lower
inside the kernel body). Statistics stay in the dtype the caller gives them
(float32, or float64 for float64 inputs).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxattn._impl import common


class State(NamedTuple):
  """Online-softmax state of rows (...,): max m, sum l (...,), output sum acc (..., Hv)."""
  m: jax.Array
  l: jax.Array  # noqa: E741 - the paper's name
  acc: jax.Array


def _safe(m):
  """m, with -inf (a row that saw no key) read as 0 so exp(x - m) stays finite."""
  return jnp.where(m == -jnp.inf, 0.0, m)


def init(row_zeros, acc_zeros) -> State:
  """The state of rows that have seen no key: m = -inf, l = 0, acc = 0.

  Args:
    row_zeros: zeros (...,) in the statistics dtype (their sharding and
      device variance are kept, as for any loop carry built from them).
    acc_zeros: zeros (..., Hv) in the same dtype.
  """
  return State(row_zeros - jnp.inf, row_zeros, acc_zeros)


def update(state: State, logits, weighted_values: Callable[[jax.Array], jax.Array],
           key_axis: int = -1) -> State:
  """Folds one block of C keys' logits into the state.

  m' = max(m, max_j s_j), l' = l e^(m - m') + sum_j e^(s_j - m'),
  acc' = acc e^(m - m') + weighted_values(e), with e = e^(s - m') laid out
  like the logits.

  Args:
    state: the rows' state so far.
    logits: (..., C) in the statistics dtype, or (..., C, R) with
      `key_axis=-2`; -inf for masked keys.
    weighted_values: e (the logits' layout) -> (..., Hv), the block's values
      weighted by e (where dropout scales e, it does so here: l counts every
      key).
    key_axis: the keys' axis of logits and e: -1, or -2 for logits laid out
      (..., C, R) with the last of the rows' axes minor (a layout some
      matmuls write faster; `decode_kernels._one_pass`).
  """
  # The output and lse do not depend on m (it cancels exactly), so it is a
  # constant to autodiff: differentiating a forward built on this with JAX's
  # own rules (no custom rule in between) would otherwise take max's
  # derivative, whose tie count can be 0 inside XLA's fused loops (0/0 = NaN).
  m_new = lax.stop_gradient(jnp.maximum(state.m, jnp.max(logits, axis=key_axis)))
  m_safe = _safe(m_new)
  e = jnp.exp(logits - jnp.expand_dims(m_safe, key_axis))
  alpha = jnp.exp(state.m - m_safe)
  l = state.l * alpha + jnp.sum(e, axis=key_axis)  # noqa: E741
  return State(m_new, l, state.acc * alpha[..., None] + weighted_values(e))


def reduce(state: State, axis: int) -> State:
  """Merges the states of independent key chunks stacked on `axis` (>= 0) exactly.

  m = max_p m_p, l = sum_p e^(m_p - m) l_p, acc = sum_p e^(m_p - m) acc_p;
  a chunk that saw no key weighs 0.
  """
  m = jnp.max(state.m, axis=axis)
  w = jnp.exp(state.m - jnp.expand_dims(_safe(m), axis))
  return State(m, jnp.sum(w * state.l, axis=axis), jnp.sum(w[..., None] * state.acc, axis=axis))


def finalize(state: State):
  """Normalizes the state: (out (..., Hv), lse (...,), lse_lo (...,)).

  out = acc / l and lse = m + log l, kept also as the exact sum lse + lse_lo
  of two floats (`common.two_sum`): the blocked backward recomputes
  probabilities as exp((s - lse) - lse_lo), accurate at logits ~ 1e4 where
  lse alone is rounded by ~1e-3. Rows that saw no key (l = 0) give out 0,
  lse -inf and lse_lo 0; rows whose l is NaN give lse -inf too (and keep
  their NaN output). The select on out also zeroes an empty row's cotangent:
  0 * NaN garbage there would otherwise reach the values' gradient.
  """
  live = state.l > 0
  l_safe = jnp.where(live, state.l, 1.0)
  out = jnp.where((state.l == 0)[..., None], 0.0, state.acc / l_safe[..., None])
  hi, lo = common.two_sum(_safe(state.m), jnp.log(l_safe))
  return out, jnp.where(live, hi, -jnp.inf), jnp.where(live, lo, 0.0)


def merge(out_a, lse_a, lo_a, out_b, lse_b, lo_b):
  """Merges two normalized partial results over disjoint keys: (out, lse, lse_lo).

  Each logsumexp comes as two floats, lse + lse_lo (`finalize`'s, exact to
  twice the precision); so does the merged one: with m = max(lse_a, lse_b),
  e_x = exp((lse_x - m) + lo_x) and s = e_a + e_b (in [1, 2]),
  lse + lse_lo = m + log s exactly and out = (e_a out_a + e_b out_b) / s.
  Rounding lse alone at each merge would make the backward's recomputed
  probabilities exp((S - lse) - lse_lo) off by ~1e-4 at logits ~1e4 in
  float32. Rows empty in both (lse -inf) stay out 0, lse -inf, lse_lo 0.
  out_a, out_b (..., Hv), the rest (...,), in the statistics dtype.
  """
  m = _safe(jnp.maximum(lse_a, lse_b))
  e_a = jnp.exp((lse_a - m) + lo_a)
  e_b = jnp.exp((lse_b - m) + lo_b)
  s = e_a + e_b
  live = s > 0
  s_safe = jnp.where(live, s, 1.0)
  out = (out_a * e_a[..., None] + out_b * e_b[..., None]) / s_safe[..., None]
  hi, lo = common.two_sum(m, jnp.log(s_safe))
  return out, jnp.where(live, hi, -jnp.inf), jnp.where(live, lo, 0.0)
