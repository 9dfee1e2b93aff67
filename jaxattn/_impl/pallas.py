"""FlashAttention-2 as Pallas kernels: one source for GPU, TPU and CPU (interpret).

Dao 2023 (arXiv 2307.08691), with the block logic of `jaxattn._impl.chunked`.
Three `pl.pallas_call` kernels under one `jax.custom_vjp`:

  forward  grid (B, K, query blocks): a query block of the G query heads that
           share a key/value head, folded into rows ordered (t, g), walks the
           key blocks the masks leave non-empty with an online softmax
           (float32 running max and sum); writes the output and the
           logsumexp.
  dK, dV   grid (B, K, key blocks): walks the query blocks that see the key
           block, recomputing the probabilities from the logsumexp.
  dQ       grid (B, K, query blocks): walks the key blocks again.

The block map (query block x key block: 0 empty, 1 partial, 2 full) is
computed once per call outside the kernels from `jaxattn.masks`
classification, O(nq x nk) int32, together with the first and one-past-last
non-empty block of every row and column: loops run over that range only,
empty blocks inside it are skipped with a branch, and full blocks skip the
mask arithmetic. Masks are evaluated inside the kernels on index arrays
through `common.combined_mask` (causal, window, lengths, segment ids, the
caller's mask_fn), score modifiers through `common.combined_score`; the
arrays they hold are kernel inputs (a kernel cannot capture arrays), and
arrays a user function closes over are hoisted into inputs too. K and V are
never copied per query head: the key/value head of a program is its grid
index.

Where it runs:
  CPU  `interpret=True` (automatic): the same kernels, run by Pallas' HLO
       interpreter. Slow; for tests and for checking the kernels.
  GPU  lowered through Triton (`jax.experimental.pallas.triton`; chosen
       explicitly, jax 0.10 otherwise picks Mosaic GPU). Block rows, key
       blocks and head dims are padded to powers of two >= 16, as Triton's
       dot needs (padding is masked or zero, never visible); G is padded to a
       power of two with dummy rows. The lowering to Triton IR is tested on
       CPU (tests/test_pallas.py); compiling and running it needs a GPU
       (bench/gpu.sh).
  TPU  not yet: NotImplementedError (Mosaic wants other block layouts).

Also NotImplementedError on GPU (so `implementation=None` falls back):
score_fn/mask_fn functions that close over arrays, and score modifiers
holding arrays (ALiBi slopes, position tables): they index those arrays with
gathers Triton does not lower. In interpret mode everything runs, dropout
included (the same hash mask as every implementation).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxattn._impl import common, softmax_state
from jaxattn._impl.pallas_plan import (  # noqa: F401 (block_map, _make_plan: for tests)
    block_map,
    _call,
    _call_lifted,
    _check_triton,
    _common_specs,
    DEFAULT_BLOCK_KV,
    default_block_sizes,
    _from_5d,
    _from_rows,
    INTERPRET_BLOCK_KV,
    INTERPRET_BLOCK_Q,
    _lift_functions,
    _make_plan,
    _Plan,
    _prepare,
    _Prepared,
    _to_rows,
    _triton,
)


# ---------------------------------------------------------------------------
# Tiles, inside the kernels.


def _dot_nt(a, b):
  """a (m, d) . b (n, d)^T -> (m, n) float32."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_nn(a, b):
  """a (m, d) . b (d, n) -> (m, n) float32."""
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a, b):
  """a (d, m)^T . b (d, n) -> (m, n) float32."""
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _tile_index(p: _Plan, b, kh, i, j):
  """(b, h, q_idx, kv_idx) of tile (i, j): scalar, (rows, 1) or scalar, (rows, 1), (1, bk)."""
  r = jnp.arange(p.rows, dtype=jnp.int32)[:, None]
  if p.Gp == 1:
    h = kh
    t = r
  else:
    # dummy rows (g >= G) borrow the group's last head so index math stays in range
    h = kh * p.G + jnp.minimum(r % p.Gp, p.G - 1)
    t = r // p.Gp
  q_idx = i * p.bq + t
  kv_idx = j * p.bk + jnp.arange(p.bk, dtype=jnp.int32)[None, :]
  return b, h, q_idx, kv_idx


def _rows_tile(ref, dims, p: _Plan, i, j, over: str):
  """The (rows, bk) tile (i, j) of a 5D bias/mask block."""
  _, _, Tb, Gb, Sb = dims
  if over == "q":  # block (tb, Gb, Sp|1): slice keys
    x = ref[:, :, pl.ds(j * p.bk, p.bk)] if Sb > 1 else ref[...]
  else:  # block (Tp|1, Gb, bk|1): slice queries
    x = ref[pl.ds(i * p.bq, p.bq), :, :] if Tb > 1 else ref[...]
  x = jnp.broadcast_to(x, (p.bq, p.Gp, p.bk))
  return x.reshape(p.rows, p.bk)


class _Ctx(NamedTuple):
  """What the tile functions of one kernel invocation share."""
  p: _Plan
  refs: dict
  prep: _Prepared
  over: str  # "q" (grid over query blocks) or "k" (over key blocks)
  b: Any
  kh: Any


def _leaf_refs(ctx: _Ctx, kind: str, n: int):
  return [ctx.refs[f"{kind}_leaf{m}"] for m in range(n)]


def _const_refs(ctx: _Ctx, kind: str, n: int):
  return [ctx.refs[f"{kind}_const{m}"] for m in range(n)]


def _score_leaf_values(ctx: _Ctx):
  s = ctx.prep.score
  return [r[...] for r in _leaf_refs(ctx, "score", len(s.leaves))] if s else []


def _post(ctx: _Ctx, i, j, raw, score_leaves, masked: bool):
  """Raw scaled logits -> logits: score modifiers, bias, and for partial tiles the masks."""
  p, refs = ctx.p, ctx.refs
  idx = _tile_index(p, ctx.b, ctx.kh, i, j)
  s = raw
  if ctx.prep.score is not None:
    lifted = ctx.prep.score
    s = _call_lifted(lifted, score_leaves, _const_refs(ctx, "score", len(lifted.consts)),
                     (raw,) + idx, leaves_are_refs=False)
    s = jnp.broadcast_to(s, raw.shape).astype(jnp.float32)
  if "bias" in refs:
    s = s + _rows_tile(refs["bias"], p.bias_dims, p, i, j, ctx.over).astype(jnp.float32)
  if masked:
    keep = None
    if ctx.prep.mask is not None:
      lifted = ctx.prep.mask
      leaves = _leaf_refs(ctx, "mask", len(lifted.leaves))
      keep = _call_lifted(lifted, leaves, _const_refs(ctx, "mask", len(lifted.consts)), idx,
                          leaves_are_refs=True)
      keep = jnp.broadcast_to(jnp.asarray(keep, bool), raw.shape)
    if "dmask" in refs:
      user = _rows_tile(refs["dmask"], p.mask_dims, p, i, j, ctx.over) != 0
      keep = user if keep is None else keep & user
    if p.S % p.bk:
      pad = jnp.broadcast_to(idx[3] < p.S, raw.shape)
      keep = pad if keep is None else keep & pad
    if p.T % p.bq:
      pad = jnp.broadcast_to(idx[2] < p.T, raw.shape)
      keep = pad if keep is None else keep & pad
    if keep is not None:
      s = jnp.where(keep, s, -jnp.inf)
  return s


def _dropout_scale(ctx: _Ctx, i, j):
  """(rows, bk) multiplier 0 or 1/(1-rate), or None without dropout."""
  c = ctx.p.config
  if "dropout_key" not in ctx.refs:
    return None
  b, h, q_idx, kv_idx = _tile_index(ctx.p, ctx.b, ctx.kh, i, j)
  keep = common.dropout_keep(ctx.refs["dropout_key"], c.dropout_rate, b, h, q_idx, kv_idx)
  keep = jnp.broadcast_to(keep, (ctx.p.rows, ctx.p.bk))
  return jnp.where(keep, jnp.float32(1.0 / (1.0 - c.dropout_rate)), jnp.float32(0.0))


def _visit(kind, step, carry):
  """Runs step(carry, masked) for a partial (1) or full (2) block, skips empty (0)."""
  return lax.cond(kind == 2, lambda c: step(c, False),
                  lambda c: lax.cond(kind == 1, lambda c2: step(c2, True), lambda c2: c2, c),
                  carry)


# ---------------------------------------------------------------------------
# Forward kernel.


def _forward_kernel(refs, p: _Plan, prep: _Prepared):
  b, kh, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  ctx = _Ctx(p, refs, prep, "q", b, kh)
  q = refs["q"][...]
  score_leaves = _score_leaf_values(ctx)
  scale = jnp.float32(p.config.scale)

  def step(j, state, masked):
    k = refs["k"][pl.ds(j * p.bk, p.bk), :]
    v = refs["v"][pl.ds(j * p.bk, p.bk), :]
    s = _post(ctx, i, j, _dot_nt(q, k) * scale, score_leaves, masked)
    drop = _dropout_scale(ctx, i, j)

    def weighted_values(e):
      if drop is not None:
        e = e * drop
      return _dot_nn(e.astype(v.dtype), v)

    return softmax_state.update(state, s, weighted_values)

  def body(j, carry):
    return _visit(refs["kinds"][i, j], functools.partial(step, j), carry)

  init = softmax_state.init(jnp.zeros((p.rows,), jnp.float32),
                            jnp.zeros((p.rows, p.Hvp), jnp.float32))
  state = lax.fori_loop(refs["row_lo"][i], refs["row_hi"][i], body, init)
  # lse = hi + lo exactly: the backward's exp((s - hi) - lo) stays accurate at
  # logits ~ 1e4, where hi alone is rounded by ~1e-3.
  out, lse, lse_lo = softmax_state.finalize(state)
  refs["out"][...] = out.astype(refs["out"].dtype)
  refs["lse"][...] = lse
  refs["lse_lo"][...] = lse_lo


def _forward(p: _Plan, inputs: common.AttentionInputs):
  """(out rows (B, K, Tp*Gp, Hvp) query dtype, lse rows (B, K, Tp*Gp) float32)."""
  prep = _prepare(inputs, p)
  ins = dict(prep.arrays, q=_to_rows(inputs.query, p, p.Hp))
  specs = _common_specs(prep, p, "q")
  specs["q"] = pl.BlockSpec((None, None, p.rows, p.Hp), lambda b, h, i: (b, h, i, 0))
  R = p.Tp * p.Gp
  outs = {
      "out": (jax.ShapeDtypeStruct((p.B, p.K, R, p.Hvp), inputs.query.dtype),
              pl.BlockSpec((None, None, p.rows, p.Hvp), lambda b, h, i: (b, h, i, 0))),
      "lse": (jax.ShapeDtypeStruct((p.B, p.K, R), jnp.float32),
              pl.BlockSpec((None, None, p.rows), lambda b, h, i: (b, h, i))),
      "lse_lo": (jax.ShapeDtypeStruct((p.B, p.K, R), jnp.float32),
                 pl.BlockSpec((None, None, p.rows), lambda b, h, i: (b, h, i))),
  }
  res = _call(functools.partial(_forward_kernel, p=p, prep=prep), p, "forward",
              (p.B, p.K, p.nq), ins, specs, outs)
  return res["out"], res["lse"], res["lse_lo"]


# ---------------------------------------------------------------------------
# Backward kernels.


def _tile_grads(ctx: _Ctx, i, j, q, k, v, do, lse, lse_lo, delta, score_leaves, masked, want_leaves):
  """Recomputes tile (i, j); returns (p_dropped, dS at the logits, dS at raw * scale, d leaves)."""
  p = ctx.p
  scale = jnp.float32(p.config.scale)
  raw = _dot_nt(q, k) * scale
  d_leaves = None
  if ctx.prep.score is not None:
    if want_leaves:
      s, pull = jax.vjp(lambda r, ls: _post(ctx, i, j, r, ls, masked), raw, score_leaves)
    else:
      s, pull1 = jax.vjp(lambda r: _post(ctx, i, j, r, score_leaves, masked), raw)
      pull = lambda ds: (pull1(ds)[0], None)
  else:
    s = _post(ctx, i, j, raw, score_leaves, masked)
    pull = None
  dead = lse == -jnp.inf
  prob = jnp.exp((s - jnp.where(dead, jnp.inf, lse)[:, None]) - jnp.where(dead, 0.0, lse_lo)[:, None])
  drop = _dropout_scale(ctx, i, j)
  pd = prob if drop is None else prob * drop
  dp = _dot_nt(do, v)
  if drop is not None:
    dp = dp * drop
  ds_logits = prob * (dp - delta[:, None])
  ds_raw = ds_logits
  if pull is not None:
    ds_raw, d_leaves = pull(ds_logits)
  return pd, ds_logits, ds_raw * scale, d_leaves


def _dkv_kernel(refs, p: _Plan, prep: _Prepared):
  b, kh, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  ctx = _Ctx(p, refs, prep, "k", b, kh)
  k = refs["k"][...]
  v = refs["v"][...]
  dt = k.dtype
  score_leaves = _score_leaf_values(ctx)
  want_leaves = bool(prep.score is not None and common.inexact_leaves(prep.score.leaves))
  fl = common.inexact_leaves(prep.score.leaves) if want_leaves else []
  bias_tiles = "dbias" in refs and p.bias_dims[2] > 1
  if bias_tiles:  # written tile by tile; blocks the loop skips stay 0
    # Zeroed one query tile at a time too: the whole (Tp, Gb, bk) block need not
    # have power-of-two sizes (Tp = nq * bq), which Triton requires of an array.
    zero = jnp.zeros((p.bq,) + tuple(refs["dbias"].shape[1:]), jnp.float32)

    def clear(i, c):
      refs["dbias"][pl.ds(i * p.bq, p.bq), :, :] = zero
      return c

    lax.fori_loop(0, p.nq, clear, 0)

  def step(i, carry, masked):
    dk, dv, dbias, dleaves = carry
    rs = pl.ds(i * p.rows, p.rows)
    q = refs["q"][rs, :]
    do = refs["do"][rs, :]
    pd, ds_logits, ds, d_l = _tile_grads(ctx, i, j, q, k, v, do, refs["lse"][rs], refs["lse_lo"][rs],
                                         refs["delta"][rs], score_leaves, masked, want_leaves)
    dv = dv + _dot_tn(pd.astype(dt), do)
    dk = dk + _dot_tn(ds.astype(dt), q)
    if "dbias" in refs:
      g = _reduce_bias_tile(ds_logits, p)
      if bias_tiles:
        refs["dbias"][pl.ds(i * p.bq, p.bq), :, :] = g
      else:
        dbias = dbias + g
    if want_leaves:
      dleaves = tuple(a + d_l[n].astype(jnp.float32) for a, n in zip(dleaves, fl))
    return dk, dv, dbias, dleaves

  def body(i, carry):
    return _visit(refs["kinds"][i, j], functools.partial(step, i), carry)

  dbias0 = jnp.zeros((1,) + tuple(refs["dbias"].shape[1:]), jnp.float32) \
      if "dbias" in refs and not bias_tiles else jnp.zeros((), jnp.float32)
  dleaves0 = tuple(jnp.zeros(prep.score.leaves[n].shape, jnp.float32) for n in fl)
  init = (jnp.zeros((p.bk, p.Hp), jnp.float32), jnp.zeros((p.bk, p.Hvp), jnp.float32), dbias0, dleaves0)
  dk, dv, dbias, dleaves = lax.fori_loop(refs["col_lo"][j], refs["col_hi"][j], body, init)
  refs["dk"][...] = dk.astype(refs["dk"].dtype)
  refs["dv"][...] = dv.astype(refs["dv"].dtype)
  if "dbias" in refs and not bias_tiles:
    refs["dbias"][...] = dbias
  for n, d in zip(fl, dleaves):
    refs[f"dscore{n}"][...] = d


def _reduce_bias_tile(ds, p: _Plan):
  """(rows, bk) dS -> the bias block's tile shape (bq|1, Gb, bk|1), summed over broadcast dims."""
  _, _, Tb, Gb, Sb = p.bias_dims
  g = ds.reshape(p.bq, p.Gp, p.bk)
  if Gb == 1:
    g = jnp.sum(g, axis=1, keepdims=True)
  if Sb == 1:
    g = jnp.sum(g, axis=2, keepdims=True)
  if Tb == 1:
    g = jnp.sum(g, axis=0, keepdims=True)
  return g


def _dq_kernel(refs, p: _Plan, prep: _Prepared):
  b, kh, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  ctx = _Ctx(p, refs, prep, "q", b, kh)
  q = refs["q"][...]
  do = refs["do"][...]
  lse = refs["lse"][...]
  lse_lo = refs["lse_lo"][...]
  delta = refs["delta"][...]
  score_leaves = _score_leaf_values(ctx)

  def step(j, dq, masked):
    k = refs["k"][pl.ds(j * p.bk, p.bk), :]
    v = refs["v"][pl.ds(j * p.bk, p.bk), :]
    _, _, ds, _ = _tile_grads(ctx, i, j, q, k, v, do, lse, lse_lo, delta, score_leaves, masked, False)
    return dq + _dot_nn(ds.astype(k.dtype), k)

  def body(j, dq):
    return _visit(refs["kinds"][i, j], functools.partial(step, j), dq)

  dq = lax.fori_loop(refs["row_lo"][i], refs["row_hi"][i], body,
                     jnp.zeros((p.rows, p.Hp), jnp.float32))
  refs["dq"][...] = dq.astype(refs["dq"].dtype)


def _backward(p: _Plan, inputs: common.AttentionInputs, out_rows, lse_rows, lo_rows, d_out, d_lse):
  """Gradients (dq, dk, dv, dbias, d score leaves) in the inputs' own layouts."""
  prep = _prepare(inputs, p)
  # Rows that attended nothing (lse -inf) get dO = 0 and D = 0: their P is 0,
  # but 0 * NaN garbage in their cotangents would otherwise reach dV (and dQ, dK).
  dead = lse_rows == -jnp.inf
  do_rows = _to_rows(d_out.astype(inputs.query.dtype), p, p.Hvp)
  do_rows = jnp.where(dead[..., None], jnp.zeros((), do_rows.dtype), do_rows)
  # dS = P * (dP - D) with D = rowsum(dO * O) - dlse (the lse cotangent adds P * dlse).
  delta = jnp.sum(do_rows.astype(jnp.float32) * out_rows.astype(jnp.float32), axis=-1)
  if d_lse is not None:
    delta = delta - _to_rows(d_lse.astype(jnp.float32), p, 0)
  delta = jnp.where(dead, 0.0, delta)
  q_rows = _to_rows(inputs.query, p, p.Hp)
  R = p.Tp * p.Gp
  shared = dict(prep.arrays, q=q_rows, do=do_rows, lse=lse_rows, lse_lo=lo_rows, delta=delta)

  # dK, dV (and dbias, d score leaves): grid over key blocks.
  specs = _common_specs(prep, p, "k")
  for name, width in (("q", p.Hp), ("do", p.Hvp)):
    specs[name] = pl.BlockSpec((None, None, R, width), lambda b, h, j: (b, h, 0, 0))
  for name in ("lse", "lse_lo", "delta"):
    specs[name] = pl.BlockSpec((None, None, R), lambda b, h, j: (b, h, 0))
  outs = {
      "dk": (jax.ShapeDtypeStruct((p.B, p.Sp, p.K, p.Hp), inputs.key.dtype),
             pl.BlockSpec((None, p.bk, None, p.Hp), lambda b, h, j: (b, j, h, 0))),
      "dv": (jax.ShapeDtypeStruct((p.B, p.Sp, p.K, p.Hvp), inputs.value.dtype),
             pl.BlockSpec((None, p.bk, None, p.Hvp), lambda b, h, j: (b, j, h, 0))),
  }
  if inputs.bias is not None:
    _, _, Tb, Gb, Sb = p.bias_dims
    # Per (b, h) program partials (and per key block when the bias broadcasts
    # over keys), summed below: programs never write the same block.
    npart = p.nk if Sb == 1 else 1
    outs["dbias"] = (
        jax.ShapeDtypeStruct((p.B, p.K, npart, Tb, Gb, Sb), jnp.float32),
        pl.BlockSpec((None, None, None, Tb, Gb, p.bk if Sb > 1 else 1),
                     lambda b, h, j: (b, h, j if Sb == 1 else 0, 0, 0, j if Sb > 1 else 0)))
  fl = common.inexact_leaves(prep.score.leaves) if prep.score is not None else []
  for n in fl:
    shape = prep.score.leaves[n].shape
    zeros = (0,) * len(shape)
    outs[f"dscore{n}"] = (jax.ShapeDtypeStruct((p.B, p.K, p.nk) + shape, jnp.float32),
                          pl.BlockSpec((None, None, None) + shape, lambda b, h, j, z=zeros: (b, h, j) + z))
  kv = _call(functools.partial(_dkv_kernel, p=p, prep=prep), p, "backward_dkv",
             (p.B, p.K, p.nk), shared, specs, outs)

  # dQ: grid over query blocks.
  specs = _common_specs(prep, p, "q")
  specs["q"] = pl.BlockSpec((None, None, p.rows, p.Hp), lambda b, h, i: (b, h, i, 0))
  specs["do"] = pl.BlockSpec((None, None, p.rows, p.Hvp), lambda b, h, i: (b, h, i, 0))
  for name in ("lse", "lse_lo", "delta"):
    specs[name] = pl.BlockSpec((None, None, p.rows), lambda b, h, i: (b, h, i))
  outs = {"dq": (jax.ShapeDtypeStruct((p.B, p.K, R, p.Hp), inputs.query.dtype),
                 pl.BlockSpec((None, None, p.rows, p.Hp), lambda b, h, i: (b, h, i, 0)))}
  dq = _call(functools.partial(_dq_kernel, p=p, prep=prep), p, "backward_dq",
             (p.B, p.K, p.nq), shared, specs, outs)["dq"]

  dq = _from_rows(dq, p, p.H)
  dk = kv["dk"][:, :p.S, :, :p.H]
  dv = kv["dv"][:, :p.S, :, :p.Hv]
  dbias = None
  if inputs.bias is not None:
    Bb, Kb = p.bias_dims[:2]
    part = jnp.sum(kv["dbias"], axis=2)  # (B, K, Tb, Gb, Sb)
    if Bb == 1:
      part = jnp.sum(part, axis=0, keepdims=True)
    if Kb == 1:
      part = jnp.sum(part, axis=1, keepdims=True)
    dbias = _from_5d(part, inputs.bias.shape, p).astype(inputs.bias.dtype)
  dleaves = {n: jnp.sum(kv[f"dscore{n}"], axis=(0, 1, 2)) for n in fl}
  return dq, dk, dv, dbias, dleaves


# ---------------------------------------------------------------------------
# custom_vjp wiring.


def _finish(p: _Plan, out_rows, lse_rows):
  return _from_rows(out_rows, p, p.Hv), _from_rows(lse_rows, p, None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(p: _Plan, inputs: common.AttentionInputs):
  out_rows, lse_rows, _ = _forward(p, inputs)
  return _finish(p, out_rows, lse_rows)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _forward_in_vjp(p: _Plan, inputs):
  return _forward(p, inputs)


@_forward_in_vjp.defjvp
def _forward_in_vjp_jvp(p: _Plan, primals, tangents):
  # Reached only when the forward of the VJP is itself differentiated:
  # second-order reverse mode (jax.grad of a function of jax.grad).
  raise NotImplementedError(
      "dot_product_attention: implementation='pallas' does not support second-order "
      "differentiation (jax.grad of a function of its jax.grad): its kernels have "
      "first-order rules only; use implementation='chunked_jvp' (every second-order "
      "derivative, O(T) memory) or 'xla'.")


def _flash_fwd(p: _Plan, inputs):
  out_rows, lse_rows, lo_rows = _forward_in_vjp(p, inputs)
  return _finish(p, out_rows, lse_rows), (inputs, out_rows, lse_rows, lo_rows)


def _flash_bwd(p: _Plan, res, cts):
  inputs, out_rows, lse_rows, lo_rows = res
  d_out, d_lse = cts
  dq, dk, dv, dbias, dleaves = _backward(p, inputs, out_rows, lse_rows, lo_rows, d_out, d_lse)
  d_score = None
  if inputs.score_fn is not None:
    # The soft-cap holds no arrays, so the combined modifier's leaves are the caller's.
    d_score = common.leaf_cotangents(inputs.score_fn, dleaves)
  return (common.AttentionInputs(query=dq, key=dk, value=dv, bias=dbias, score_fn=d_score),)


_flash.defvjp(_flash_fwd, _flash_bwd)


def unsupported_reason(inputs: common.AttentionInputs, config: common.AttentionConfig, *,
                       block_sizes: tuple[int, int] | None = None, interpret: bool | None = None,
                       backend: str | None = None) -> str | None:
  """Why `pallas_attention` would raise NotImplementedError for these arguments, or None.

  Static and cheap (it traces the mask and score functions, runs nothing), so
  dispatch can choose without trying.
  """
  try:
    p = _make_plan(inputs, config, block_sizes, interpret, backend)
    _check_triton(p)
    _lift_functions(inputs, p)
  except NotImplementedError as exc:
    return str(exc)
  return None


def pallas_attention(inputs: common.AttentionInputs, config: common.AttentionConfig, *,
                     block_sizes: tuple[int, int] | None = None, interpret: bool | None = None,
                     backend: str | None = None, gpu_layout: bool | None = None):
  """Returns (output (B, T, N, Hv) in query dtype, lse (B, T, N) float32).

  Args:
    inputs, config: normalized arguments (see `jaxattn._impl.common`).
    block_sizes: (query block, key block) in positions; a program holds the
      query block's rows for all G query heads of a key/value head. Compiled
      kernels need bq x G (G padded to a power of 2) and the key block to be
      powers of 2 >= 16.
    interpret: run the kernels in Pallas' interpreter; default: on CPU only.
    backend: "gpu" (or "cuda") or "tpu": the compiler the kernels are
      lowered for (default: the default backend's); set it to lower for
      another platform, e.g. with `jax.export` on a CPU machine.
    gpu_layout: pad blocks and head dims as the compiled kernels do
      (default: when not interpreting); True runs that layout in interpret
      mode, for tests.

  Raises:
    NotImplementedError: see the module docstring.
  """
  B, T, N, _ = inputs.query.shape
  Hv = inputs.value.shape[-1]
  if B == 0:  # nothing to compute; the same empty results as every implementation
    return (jnp.zeros((0, T, N, Hv), inputs.query.dtype), jnp.zeros((0, T, N), jnp.float32))
  if Hv == 0:  # the logsumexp is still defined: run with one zero value column
    one = inputs._replace(value=jnp.pad(inputs.value, ((0, 0), (0, 0), (0, 0), (0, 1))))
    out, lse = pallas_attention(one, config, block_sizes=block_sizes, interpret=interpret,
                                backend=backend, gpu_layout=gpu_layout)
    return out[..., :0], lse
  p = _make_plan(inputs, config, block_sizes, interpret, backend, gpu_layout)
  _check_triton(p)
  return _flash(p, inputs)
