"""Test helpers for jaxattn and for users' own attention tests.

- `reference_attention`: NumPy float64 attention covering every argument of
  `jaxattn.dot_product_attention`, written without JAX so it can judge it.
- `reference_attention_vjp`: its analytic gradients (also float64 NumPy).
- `assert_attention_close`: chex comparison with per-dtype tolerances.
- `random_qkv`, `random_normal`, `random_mask`, `random_lengths`,
  `random_segment_ids`: random (never zero) inputs from an explicit key, drawn
  with NumPy (no XLA compile per shape).
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxattn import _checks, attention as _attention
from jaxattn._impl import common

# (atol, rtol) of an implementation in a given input dtype against float64.
TOLERANCES = {
    jnp.dtype(jnp.float64): (1e-10, 1e-10),
    jnp.dtype(jnp.float32): (2e-5, 2e-5),
    jnp.dtype(jnp.float16): (4e-3, 4e-3),
    jnp.dtype(jnp.bfloat16): (3e-2, 3e-2),
    jnp.dtype(jnp.complex64): (2e-5, 2e-5),
    jnp.dtype(jnp.complex128): (1e-10, 1e-10),
}


def tolerance(dtype) -> tuple[float, float]:
  """(atol, rtol) for results computed from inputs of `dtype`."""
  dtype = jnp.dtype(dtype)
  if dtype not in TOLERANCES:
    raise ValueError(f"tolerance: no tolerance for dtype {dtype}; expected one of "
                     f"{', '.join(str(d) for d in TOLERANCES)} (or pass atol= and rtol=).")
  return TOLERANCES[dtype]


def assert_attention_close(actual, expected, *, dtype=None, atol=None, rtol=None,
                           scale_by_magnitude: bool = True):
  """Asserts two attention results (arrays or pytrees) agree for `dtype`.

  Args:
    actual: result of the implementation under test.
    expected: reference, e.g. from `reference_attention` (float64).
    dtype: the input dtype whose tolerance applies (default: actual's dtype).
    atol, rtol: override the per-dtype tolerance.
    scale_by_magnitude: multiply atol by max(1, max |expected|), so large
      outputs (e.g. gradients of sums) are judged relative to their size.
  """
  leaves = jax.tree_util.tree_leaves(actual)
  if atol is None or rtol is None:
    d_atol, d_rtol = tolerance(dtype or leaves[0].dtype)
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
  chex.assert_trees_all_equal_shapes(actual, expected)
  # Compared in float64 (complex128 for complex values: both parts count).
  wide = lambda x: np.asarray(x).astype(np.complex128 if np.iscomplexobj(x) else np.float64)
  def check(a, e):
    a, e = wide(a), wide(e)
    finite = np.isfinite(e)
    np.testing.assert_array_equal(np.isfinite(a), finite, err_msg="non-finite entries differ")
    np.testing.assert_array_equal(a[~finite], e[~finite], err_msg="infinite entries differ")
    mag = max(1.0, float(np.max(np.abs(e[finite])))) if scale_by_magnitude and finite.any() else 1.0
    np.testing.assert_allclose(a[finite], e[finite], atol=atol * mag, rtol=rtol)
  jax.tree_util.tree_map(check, actual, expected)


# ---------------------------------------------------------------------------
# float64 reference


def _np(x):
  return None if x is None else np.asarray(x)


def _reference_problem(query, key, value, bias, mask, kwargs):
  """Normalizes arguments like the library, then builds dense float64 terms."""
  inputs, config, rank3 = _attention.normalize(query, key, value, bias, mask, **kwargs)
  q = _np(inputs.query).astype(np.float64)
  k = _np(inputs.key).astype(np.float64)
  v = _np(inputs.value).astype(np.float64)
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  # Padding past the lengths is replaced by 0, as the library promises: NaN/inf
  # there reaches no output or gradient (a masked weight is 0, but 0 * NaN is NaN).
  if inputs.query_seq_lengths is not None:
    q = np.where((np.arange(T)[None, :] < np.asarray(inputs.query_seq_lengths)[:, None])[..., None, None], q, 0.0)
  if inputs.key_value_seq_lengths is not None:
    live = (np.arange(S)[None, :] < np.asarray(inputs.key_value_seq_lengths)[:, None])[..., None, None]
    k, v = np.where(live, k, 0.0), np.where(live, v, 0.0)
  G = N // K
  kk, vv = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
  raw = np.einsum("btnh,bsnh->bnts", q, kk) * config.scale
  idx = (np.arange(B).reshape(B, 1, 1, 1), np.arange(N).reshape(1, N, 1, 1),
         np.arange(T).reshape(1, 1, T, 1), np.arange(S).reshape(1, 1, 1, S))
  score_fn = inputs.score_fn

  def modify(raw, score_fn):
    """User score modifier, then the soft-cap, evaluated in float64."""
    s = raw
    if score_fn is not None:
      s = score_fn(s, *idx)
    if config.logits_soft_cap is not None:
      s = config.logits_soft_cap * jnp.tanh(s / config.logits_soft_cap)
    return s

  with jax.enable_x64(True):
    s = np.asarray(modify(jnp.asarray(raw), score_fn), np.float64)
  if inputs.bias is not None:
    s = s + _np(inputs.bias).astype(np.float64)
  # The mask is rebuilt here from first principles, not with the library's code.
  allowed = np.ones((B, N, T, S), bool)
  if inputs.mask is not None:
    allowed &= np.asarray(inputs.mask)
  i = np.arange(T)[:, None] + config.q_offset
  j = np.arange(S)[None, :]
  if config.is_causal:
    allowed &= j <= i
  if config.window is not None:
    left, right = config.window
    if left is not None:
      allowed &= j >= i - left
    if right is not None:
      allowed &= j <= i + right
  if inputs.query_seq_lengths is not None:
    ql = np.asarray(inputs.query_seq_lengths)
    allowed &= (np.arange(T)[None, :] < ql[:, None])[:, None, :, None]
  if inputs.key_value_seq_lengths is not None:
    kl = np.asarray(inputs.key_value_seq_lengths)
    allowed &= (np.arange(S)[None, :] < kl[:, None])[:, None, None, :]
  if inputs.mask_fn is not None:
    allowed &= np.asarray(jnp.broadcast_to(inputs.mask_fn(*(jnp.asarray(i) for i in idx)), (B, N, T, S)))
  if inputs.query_segment_ids is not None:
    qs = np.asarray(inputs.query_segment_ids)
    ks = np.asarray(inputs.key_value_segment_ids)
    allowed &= (qs[:, :, None] == ks[:, None, :])[:, None]
  allowed &= s != -np.inf  # a NaN logit stays in: its row is NaN, as everywhere else
  with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
    s_masked = np.where(allowed, s, -np.inf)
    m = np.max(s_masked, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.where(allowed, np.exp(s_masked - m), 0.0)
    z = e.sum(-1, keepdims=True)
    p = e / np.where(z == 0, 1.0, z)
    lse = (m + np.log(z))[..., 0]
  keep_scale = np.ones_like(p)
  if config.dropout_rate > 0:
    b = np.arange(B)[:, None, None, None]
    n = np.arange(N)[None, :, None, None]
    keep = common.dropout_keep_numpy(np.asarray(inputs.dropout_key), config.dropout_rate,
                                     b, n, np.arange(T)[None, None, :, None],
                                     np.arange(S)[None, None, None, :])
    keep_scale = keep / (1.0 - config.dropout_rate)
  return dict(inputs=inputs, config=config, rank3=rank3, q=q, kk=kk, vv=vv,
              raw=raw, modify=modify, score_fn=score_fn, p=p, pd=p * keep_scale, keep_scale=keep_scale,
              lse=np.transpose(lse, (0, 2, 1)), G=G, K=K)


def reference_attention(query, key, value, bias=None, mask=None, *,
                        return_residual: bool = False, **kwargs):
  """Attention in NumPy float64 with `dot_product_attention`'s arguments.

  Args:
    query, key, value, bias, mask: as for `jaxattn.dot_product_attention`.
    return_residual: also return the logsumexp, (B, T, N) or (T, N).
    **kwargs: any other keyword argument of `dot_product_attention`
      (implementation and block_sizes are ignored).

  Returns:
    float64 NumPy output shaped like query (and the logsumexp).
  """
  kwargs.pop("implementation", None)
  kwargs.pop("block_sizes", None)
  r = _reference_problem(query, key, value, bias, mask, kwargs)
  out = np.einsum("bnts,bsnh->btnh", r["pd"], r["vv"])
  lse = r["lse"]
  if r["rank3"]:
    out, lse = out[0], lse[0]
  return (out, lse) if return_residual else out


def reference_attention_vjp(query, key, value, bias=None, mask=None, *,
                            d_out, d_lse=None, **kwargs) -> dict[str, Any]:
  """Analytic float64 gradients of `reference_attention`.

  Args:
    query, key, value, bias, mask, **kwargs: as for `reference_attention`.
    d_out: cotangent of the output (query's shape).
    d_lse: optional cotangent of the logsumexp residual ((B, T, N) or (T, N)).

  Returns:
    dict with "query", "key", "value" and, when given, "bias" and "score_fn"
    gradients (float64, in the caller's shapes; score_fn's as its pytree).
  """
  kwargs.pop("implementation", None)
  kwargs.pop("block_sizes", None)
  r = _reference_problem(query, key, value, bias, mask, kwargs)
  rank3 = r["rank3"]
  do = np.asarray(d_out, np.float64)
  do = do[None] if rank3 else do
  B, T, N, H = do.shape
  K, G = r["K"], r["G"]
  p, pd = r["p"], r["pd"]
  # A row that attends nothing has output 0 whatever the inputs: its
  # cotangent contributes nothing, even when it holds NaN or inf.
  dead = np.transpose(p.sum(-1) == 0, (0, 2, 1))  # (B, T, N)
  do = np.where(dead[..., None], 0.0, do)
  dvv = np.einsum("bnts,btnh->bsnh", pd, do)
  dp = np.einsum("btnh,bsnh->bnts", do, r["vv"]) * r["keep_scale"]
  ds = p * (dp - np.sum(p * dp, axis=-1, keepdims=True))
  if d_lse is not None:
    dl = np.asarray(d_lse, np.float64)
    dl = np.where(dead, 0.0, dl[None] if rank3 else dl)
    ds = ds + p * np.transpose(dl, (0, 2, 1))[..., None]
  grads = {}
  if bias is not None:
    b4 = r["inputs"].bias
    axes = tuple(a for a in range(4) if b4.shape[a] == 1)
    db = ds.sum(axis=axes, keepdims=True).reshape(np.shape(bias))
    grads["bias"] = db
  if r["score_fn"] is not None or r["config"].logits_soft_cap is not None:
    with jax.enable_x64(True):
      _, pull = jax.vjp(r["modify"], jnp.asarray(r["raw"]), r["score_fn"])
      d_raw, d_score = pull(jnp.asarray(ds))
    ds = np.asarray(d_raw, np.float64)
    if r["score_fn"] is not None:
      grads["score_fn"] = d_score
  scale = r["config"].scale
  dq = scale * np.einsum("bnts,bsnh->btnh", ds, r["kk"])
  dkk = scale * np.einsum("bnts,btnh->bsnh", ds, r["q"])
  S = dkk.shape[1]
  dk = dkk.reshape(B, S, K, G, dkk.shape[-1]).sum(3)
  dv = dvv.reshape(B, S, K, G, dvv.shape[-1]).sum(3)
  if rank3:
    dq, dk, dv = dq[0], dk[0], dv[0]
  grads.update(query=dq, key=dk, value=dv)
  return grads


# ---------------------------------------------------------------------------
# random inputs
#
# Drawn with NumPy from the key's bits: jax.random compiles threefry for every new
# shape (seconds each on CPU), which made drawing test data most of a test suite's
# time. The same key gives the same arrays on every run and platform. Under a jax
# transformation (the key is a tracer) they fall back to jax.random.


def _numpy_rng(key) -> np.random.Generator | None:
  """A NumPy generator seeded by the bits of a jax key; None for a traced key."""
  if jnp.issubdtype(jnp.result_type(key), jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  try:
    bits = np.asarray(key, np.uint32).ravel()
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None
  return np.random.default_rng([int(b) for b in bits])


def random_normal(key, shape, dtype=jnp.float32, *, scale: float = 1.0):
  """Standard normal values (times `scale`) of `shape`, cast to `dtype`.

  Like `jax.random.normal` for tests, without an XLA compile per shape.
  """
  shape = tuple(shape)
  rng = _numpy_rng(key)
  if rng is None:
    return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
  x = scale * rng.standard_normal(shape, np.float32)
  return jnp.asarray(x.astype(jnp.dtype(dtype)))


def random_qkv(key, *, B=2, T=5, S=7, N=6, K=3, H=11, dtype=jnp.float32,
               layout: str = "BTNH", scale: float = 1.0):
  """Random normal query (B, T, N, H), key and value (B, S, K, H).

  `layout="TNH"` drops B. Sizes default to distinct numbers so a swapped
  axis fails loudly.
  """
  if layout not in ("BTNH", "TNH"):
    raise ValueError(f"random_qkv: layout must be 'BTNH' or 'TNH'; got {layout!r}.")
  kq, kk, kv = (jax.random.fold_in(key, i) for i in range(3))
  lead = () if layout == "TNH" else (B,)
  return tuple(random_normal(k, lead + shape, dtype, scale=scale)
               for k, shape in ((kq, (T, N, H)), (kk, (S, K, H)), (kv, (S, K, H))))


def random_mask(key, shape, p_keep: float = 0.7):
  """Boolean mask of `shape`, True (attend) with probability p_keep."""
  rng = _numpy_rng(key)
  if rng is None:
    return jax.random.bernoulli(key, p_keep, tuple(shape))
  return jnp.asarray(rng.random(tuple(shape)) < p_keep)


def random_lengths(key, B: int, max_length: int, min_length: int = 0):
  """int32 (B,) lengths in [min_length, max_length]."""
  rng = _numpy_rng(key)
  if rng is None:
    return jax.random.randint(key, (B,), min_length, max_length + 1, jnp.int32)
  return jnp.asarray(rng.integers(min_length, max_length + 1, (B,)).astype(np.int32))


def random_segment_ids(key, B: int, L: int, num_segments: int = 3):
  """int32 (B, L) ids of contiguous documents (sorted, as in packing).

  Each row holds exactly n = min(num_segments, L) documents, ids 0 .. n - 1
  in order, each at least one token long, split at n - 1 distinct random
  positions.
  """
  if not (_checks.is_int(num_segments) and num_segments > 0):
    raise ValueError(f"random_segment_ids: num_segments must be a positive int; got "
                     f"{num_segments!r}.")
  n = min(int(num_segments), L)
  rng = _numpy_rng(key)
  if rng is None:
    order = jnp.argsort(jax.random.uniform(key, (B, max(L - 1, 0))), axis=1)
    starts = (order < n - 1).astype(jnp.int32)  # n - 1 random positions of 1 .. L - 1
  else:
    cuts = np.zeros((B, max(L - 1, 0)), np.int32)
    for row in cuts if n > 1 else ():
      row[rng.choice(L - 1, n - 1, replace=False)] = 1
    starts = jnp.asarray(cuts)
  starts = jnp.concatenate([jnp.zeros((B, min(L, 1)), jnp.int32), starts], axis=1)
  return jnp.cumsum(starts, axis=1).astype(jnp.int32)
