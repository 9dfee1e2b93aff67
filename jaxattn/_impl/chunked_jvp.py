"""`implementation="chunked_jvp"`: the blocked O(T)-memory path with a custom JVP.

`"chunked"` has a custom VJP, and JAX cannot apply forward mode to a custom
VJP, so `jax.jvp`, `jax.jacfwd` and Hessian-vector products through it raise.
This implementation runs the same blocked forward (`chunked`'s, block
skipping included) under a `jax.custom_jvp` whose tangent is itself computed
block by block, in O(T) memory:

  dS = scale (dQ K^T + Q dK^T) (+ dbias, through the score modifiers),
  m  = rowsum(P * dS) = d lse,
  dO = sum_j (P * drop)_j (dS_j V_j + dV_j) - m O,

with P = exp(S - lse) recomputed per tile from the saved logsumexp (its low
part too, as the backward does) and `drop` the dropout multiplier. Empty
blocks are skipped, full blocks skip the mask, as everywhere.

The tangent is linear in (dQ, dK, dV, dbias, d score parameters) and written
with loops of static trip count and rematerialized tiles, so JAX can transpose
it: reverse mode (`jax.grad`) works too, in O(T) memory. The rule gets its
primal from this custom-JVP function itself, so every derivative of a
derivative goes through the tangent, never through the forward's
data-dependent loop bounds: forward over reverse (`jax.hessian`, `jvp` of
`grad`), reverse over forward (`grad` of `jvp`, `jacrev(jacfwd)`), reverse
over reverse (`grad` of `grad`) and forward over forward, all in O(T) memory
(query blocks and key tiles rematerialized). That transposed backward took
1.05-1.27x the time and 1.4-2.5x the temp memory of `"chunked"`'s hand-written
one (`python -m bench`, CPU); `"chunked"` stays the default, and this one is
there where forward mode is needed. (With public JAX APIs one function cannot
carry both a custom JVP and a custom VJP.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxattn._impl import chunked, common


def _tangent_leaves(primal_tree, tangent_tree):
  """The tangents of the inexact leaves of `primal_tree`, in order."""
  if primal_tree is None:
    return []
  t_leaves = jax.tree_util.tree_leaves(tangent_tree)
  return [t_leaves[i] for i in common.inexact_leaves(primal_tree)]


def _tangent_rows(p, st, tq, tk, tv, tbias, t_score, out_p, lse_p, lo_p):
  """(dO (B, Tp, N, Hv), d lse (B, Tp, N)) of the blocked forward, in the
  statistics dtype, for tangents padded like the inputs (see `chunked._prepare`)."""
  acc = common.stat_dtype(p.q.dtype)
  # dO = a - m O cancels where the softmax is peaked (P dS ~ m P). With float32
  # (float64) values both sides are exact enough. With bfloat16/float16 values
  # the tile products stay in the statistics dtype (not rounded to the value
  # dtype as the forward's P is) and O is recomputed from them alongside, so
  # a and m O carry the same rounding: tangents as accurate as "xla"'s. The
  # tangents arrive in the statistics dtype (see `_forward_rows_jvp`), so the logits'
  # tangent is taken at q and k upcast (exact), and in reverse mode their
  # cotangents add up over blocks in that dtype.
  low = jnp.dtype(p.v.dtype) != jnp.dtype(acc)
  pv = lambda x, y: jnp.einsum("bkrc,bkch->bkrh", x.astype(acc), y.astype(acc),
                               preferred_element_type=acc)
  score_leaves, rebuild = chunked._split_float_leaves(p.score_fn)

  def logits(q0, k0, masked, qi, kj, bias, leaves):
    return chunked._post(p, st, q0, k0, chunked._raw_logits(st, qi, kj), bias, rebuild(leaves),
                         masked)

  # Rematerialized as a whole too, with the rows written outside: differentiated
  # again in reverse mode (`grad` of `grad` or of `jvp`), each query block's
  # key-loop carries are then stored for one block at a time, not for all.
  @jax.checkpoint
  def q_rows(i):
    q0 = i * st.bq
    qi, tqi = chunked._rows(p.q, st, i), chunked._rows(tq, st, i)
    lse_i, lo_i, dead = chunked._row_lse(lse_p, lo_p, st, i)  # rows with no key: P = 0
    kinds = chunked._kinds(p, st, i, jnp.arange(st.nk))
    # The block's rows of the bias tangent, sliced once outside the key loop
    # (its tiles below are then sliced at query 0 of these rows): transposed,
    # the key loop accumulates a (bq, Sp) cotangent, not a second full-size
    # one. In forward mode the slice is a (bq, Sp) copy per query block, a
    # little more temp than tiles sliced from the whole tangent.
    tbias_i = chunked._bias_rows(tbias, st, q0)

    def tile(j, blocks, state, masked):
      a, m = state[:2]
      k0 = j * st.bk
      kj, vj, tkj, tvj, bias, tbias_j = blocks
      s, ts = jax.jvp(functools.partial(logits, q0, k0, masked),
                      (qi.astype(tqi.dtype), kj.astype(tkj.dtype), bias, score_leaves),
                      (tqi, tkj, tbias_j, t_score))
      prob = jnp.exp((s - lse_i[..., None]) - lo_i[..., None])
      pts = prob * ts
      drop = chunked._dropout_scale(p, st, q0, k0, st.bk)
      pd, ptsd = (prob, pts) if drop is None else (prob * drop, pts * drop)
      a = a + pv(pd, tvj) + pv(ptsd, vj)
      m = m + jnp.sum(pts, axis=-1)
      return (a, m, state[2] + pv(pd, vj)) if low else (a, m)

    # Rematerialized: transposing this loop (reverse mode) recomputes each tile
    # from loop-invariant inputs instead of storing every tile's probabilities.
    # The key block's slices (and the bias tile's) are taken outside the
    # switch: transposed, a slice inside it would send a full-size cotangent
    # through every branch, which XLA copies on every step (a bias's gradient
    # took 2x the time and one more bias-sized buffer).
    @jax.checkpoint
    def body(j, state):
      blocks = tuple(chunked._keys(x, j * st.bk, st.bk) for x in (p.k, p.v, tk, tv))
      blocks += (chunked._bias_at(p.bias, st, q0, j * st.bk, st.bk),
                 chunked._bias_at(tbias_i, st, 0, j * st.bk, st.bk))
      # One kind for a vmapped batch: a batched switch index would become a
      # select, which JAX cannot transpose through this linear tangent.
      kind = common.uniform_kind(kinds[j])
      return chunked._by_kind(kind, lambda s, masked: tile(j, blocks, s, masked), state)

    zero_rows = chunked._zeros_like(qi[..., 0])
    init = (zero_rows[..., None] + chunked._value_row(p), zero_rows)
    if low:
      init = init + (init[0],)
    state = lax.fori_loop(0, st.nk, body, init)  # static trip count: transposable
    a, m = state[:2]
    o_i = state[2] if low else chunked._rows(out_p, st, i).astype(acc)
    # Rows that attended nothing have tangent 0 already (P = 0); the selects
    # also zero their cotangents in reverse mode, where 0 * NaN garbage in
    # such a row would otherwise reach dV.
    return jnp.where(dead[..., None], 0.0, a - m[..., None] * o_i), jnp.where(dead, 0.0, m)

  def q_block(i, carry):
    d_out, d_lse = carry
    rows_out, rows_lse = q_rows(i)
    return chunked._put_rows(d_out, rows_out, st, i), chunked._put_rows(d_lse, rows_lse, st, i)

  init = (chunked._zeros_like(out_p), chunked._zeros_like(lse_p))
  return lax.fori_loop(0, st.nq, q_block, init)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _forward_rows(config, block_sizes, inputs: common.AttentionInputs):
  """The blocked forward's own rows: (out (B, Tp, N, Hv), lse, lse_lo (B, Tp, N)),
  padded to whole query blocks."""
  return chunked._forward_padded(inputs, config, block_sizes)[2:]


@_forward_rows.defjvp
def _forward_rows_jvp(config, block_sizes, primals, tangents):
  (inputs,), (t_inputs,) = primals, tangents
  st = chunked._static(inputs, config, block_sizes)
  p = chunked._prepare(inputs, st)
  # The primal comes from this custom-JVP function itself, not from the blocked
  # forward directly: differentiated again, it goes through this rule, whose
  # tangent has static loops. Reverse mode over this jvp (`grad` of `jvp`,
  # `jacrev(jacfwd)`, `grad` of `grad`) then never meets the forward's
  # data-dependent loop bounds, and forward over forward differentiates the
  # tangent, not the forward's running maximum.
  out_p, lse_p, lo_p = _forward_rows(config, block_sizes, inputs)
  zero = lambda x: jnp.zeros(x.shape, x.dtype)
  t_q, t_k, t_v = (zero(x) if t is None else t for x, t in (
      (inputs.query, t_inputs.query), (inputs.key, t_inputs.key), (inputs.value, t_inputs.value)))
  tq, tk, tv, tbias, _ = chunked._layout(st, t_q, t_k, t_v, t_inputs.bias)
  # Low-precision tangents are upcast once (see `_tangent_rows`): rounded to
  # bfloat16 on every key block, dQ's cotangent lost accuracy with their number.
  acc = common.stat_dtype(inputs.query.dtype)
  tq, tk, tv = (x.astype(acc) for x in (tq, tk, tv))
  t_score = _tangent_leaves(p.score_fn, common.combined_score(t_inputs, config)
                            if inputs.score_fn is not None else None)
  # lse + lse_lo is the logsumexp; its tangent is carried by lse (lse_lo is a
  # rounding remainder, constant to first order).
  d_out, d_lse = _tangent_rows(p, st, tq, tk, tv, tbias, t_score, out_p, lse_p, lo_p)
  return (out_p, lse_p, lo_p), (d_out.astype(out_p.dtype), d_lse.astype(lse_p.dtype),
                                jnp.zeros_like(lo_p))


def chunked_jvp_attention(inputs: common.AttentionInputs, config: common.AttentionConfig, *,
                          block_sizes: tuple[int, int] | None = None):
  """Returns (output (B, T, N, Hv) in query dtype, lse (B, T, N) float32 or wider);
  differentiable in forward and reverse mode (see the module docstring)."""
  out_p, lse_p, _ = _forward_rows(config, block_sizes, inputs)
  return chunked._finish(inputs, out_p, lse_p)
