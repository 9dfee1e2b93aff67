"""jaxattn.decode: cached decoding equals the full forward (float64 reference), ragged batches,
GQA, split-KV == unsplit, paged == contiguous, no retrace per step, the layer's cached path,
and the tiny LM example (cached greedy == full-forward greedy)."""

from __future__ import annotations

import functools
import pathlib
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn import decode as dec
from jaxattn import testing
from jaxattn._impl import common, decode_kernels as dk
from jaxattn.layers import init_multi_head_attention, multi_head_attention, multi_head_attention_decode
from jaxattn.rope import RopeConfig

from attention_base import load_example

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Every size distinct: batch, cache length, query heads, kv heads (GQA, G = 2), head dim,
# page size, pages per sequence, pool pages, tokens in the full sequences.
B, L, N, K, H = 3, 20, 6, 3, 8
PAGE, PAGES_PER_SEQ, NUM_PAGES = 4, 5, 17
TOTAL = 12
PROMPT = np.array([5, 2, 7])      # ragged prefill, padded to T = 7
STEPS = (1, 1, 2, 1)              # then decode steps of this many tokens per row
ATOL = RTOL = 2e-5                # float32 against float64


def _normal(seed, shape):
  # NumPy draws: no per-shape compile of jax.random (the suite stays fast).
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _problem(seed=0):
  """Random full sequences: q (B, TOTAL, N, H), k and v (B, TOTAL, K, H)."""
  return (_normal(seed, (B, TOTAL, N, H)), _normal(seed + 100, (B, TOTAL, K, H)),
          _normal(seed + 200, (B, TOTAL, K, H)))


def _shuffled_page_table(seed=0):
  perm = np.random.default_rng(seed).permutation(NUM_PAGES)[:B * PAGES_PER_SEQ]
  return perm.reshape(B, PAGES_PER_SEQ).astype(np.int32)


def _caches():
  return {
      "contiguous": dec.init_kv_cache(B, L, K, H),
      "paged": dec.init_paged_kv_cache(B, NUM_PAGES, PAGE, K, H,
                                       page_table=_shuffled_page_table()),
  }


def _gather(x, start, T, n=None):
  """Rows x[b, start[b] : start[b] + T], right-padded with zeros past n[b] tokens."""
  x = np.asarray(x)
  out = np.zeros((x.shape[0], T) + x.shape[2:], x.dtype)
  for b in range(x.shape[0]):
    m = T if n is None else n[b]
    out[b, :m] = x[b, start[b]:start[b] + m]
  return out


def _run(cache, q, k, v, **kwargs):
  """Prefill PROMPT then decode STEPS through `cache`; yields (positions (B, T), n, out, lse)."""
  T = int(PROMPT.max())
  zeros = np.zeros(B, np.int64)
  cache = dec.update_kv_cache(cache, _gather(k, zeros, T, PROMPT), _gather(v, zeros, T, PROMPT),
                              seq_lengths=PROMPT)
  out, lse = dec.decode_attention(_gather(q, zeros, T, PROMPT), cache, query_seq_lengths=PROMPT,
                                  return_residual=True, **kwargs)
  yield np.arange(T)[None, :] + zeros[:, None], PROMPT, np.asarray(out), np.asarray(lse), cache
  pos = PROMPT.copy()
  for t in STEPS:
    cache = dec.update_kv_cache(cache, _gather(k, pos, t), _gather(v, pos, t))
    out, lse = dec.decode_attention(_gather(q, pos, t), cache, return_residual=True, **kwargs)
    positions = pos[:, None] + np.arange(t)[None, :]
    yield positions, np.full(B, t), np.asarray(out), np.asarray(lse), cache
    pos = pos + t


def _check_against(reference, positions, n, out, lse):
  ref_out, ref_lse = reference
  for b in range(B):
    p = positions[b, :n[b]]
    np.testing.assert_allclose(out[b, :n[b]], ref_out[b, p], atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(lse[b, :n[b]], ref_lse[b, p], atol=ATOL, rtol=RTOL)
    # Right padding of the queries: output 0, lse -inf.
    np.testing.assert_array_equal(np.asarray(out[b, n[b]:]), 0.0)
    assert np.all(np.asarray(lse[b, n[b]:]) == -np.inf)


@pytest.mark.parametrize("kind, kwargs", [
    ("contiguous", dict(block_size=6)),                   # 20 = 6 + 6 + 6 + 2: clamped last block
    ("contiguous", dict(num_splits=2, block_size=6)),     # split-KV, clamped blocks per chunk
    ("contiguous", dict(implementation="xla")),           # dot_product_attention with a row mask
    ("paged", dict(block_size=8)),                        # 2 pages per step of 5: last one half
])
def test_cached_decode_matches_full_attention(kind, kwargs):
  q, k, v = _problem()
  reference = testing.reference_attention(q, k, v, is_causal=True, return_residual=True)
  for positions, n, out, lse, _ in _run(_caches()[kind], q, k, v, **kwargs):
    chex.assert_tree_all_finite(out)
    _check_against(reference, positions, n, out, lse)


def test_split_kv_equals_unsplit():
  q, k, v = _problem(1)
  lengths = jnp.array([20, 13, 9], jnp.int32)
  cache = dec.update_kv_cache(dec.init_kv_cache(B, L, K, H),
                              *(np.concatenate([x, x[:, :L - TOTAL]], axis=1) for x in (k, v)),
                              seq_lengths=lengths)
  query = q[:, :2]  # T = 2: the last two tokens of each row
  unsplit = dec.decode_attention(query, cache, num_splits=1, return_residual=True)
  for P in (2, 4, 5):
    split = dec.decode_attention(query, cache, num_splits=P, return_residual=True)
    chex.assert_trees_all_close(split, unsplit, atol=1e-6, rtol=1e-6)


def test_paged_equals_contiguous():
  q, k, v = _problem(2)
  caches = _caches()
  runs = [list(_run(caches[kind], q, k, v)) for kind in ("contiguous", "paged")]
  for (_, _, out_c, lse_c, cache_c), (_, _, out_p, lse_p, cache_p) in zip(*runs):
    chex.assert_trees_all_close((out_p, lse_p), (out_c, lse_c), atol=1e-6, rtol=1e-6)
    np.testing.assert_array_equal(cache_p.lengths, cache_c.lengths)
  # The pages hold exactly the contiguous cache's tokens, in page-table order.
  for name in ("key", "value"):
    pages = np.asarray(getattr(cache_p, name + "_pages"))[np.asarray(cache_p.page_table)]
    dense = pages.transpose(0, 2, 1, 3, 4).reshape(B, K, PAGES_PER_SEQ * PAGE, H)
    for b in range(B):
      n = int(cache_c.lengths[b])
      np.testing.assert_array_equal(dense[b, :, :n], np.asarray(getattr(cache_c, name))[b, :, :n])


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_no_retrace_across_steps(kind):
  q, k, v = _problem(3)
  chex.clear_trace_counter()  # the counter is per function code, shared by the parameters

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(cache, q, k, v):
    cache = dec.update_kv_cache(cache, k, v)
    return cache, dec.decode_attention(q, cache)

  cache = _caches()[kind]
  # Ragged start: rows at different positions from the first step on.
  cache = cache._replace(lengths=jnp.array([0, 3, 1], jnp.int32))
  for t in range(5):
    cache, out = step(cache, q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1])  # NumPy slices
  np.testing.assert_array_equal(cache.lengths, [5, 8, 6])
  chex.assert_tree_all_finite(out)


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_window_soft_cap_and_scale(kind):
  q, k, v = _problem(4)
  opts = dict(local_window_size=3, logits_soft_cap=2.0, scale=0.3)
  reference = testing.reference_attention(q, k, v, is_causal=True, return_residual=True, **opts)
  extra = dict(num_splits=2, block_size=4) if kind == "contiguous" else dict(block_size=4)
  for positions, n, out, lse, _ in _run(_caches()[kind], q, k, v, **opts, **extra):
    _check_against(reference, positions, n, out, lse)


def test_overflow_is_dropped_under_jit_and_empty_rows_are_zero():
  cache = dec.init_kv_cache(B, L, K, H)._replace(lengths=jnp.array([18, 0, 20], jnp.int32))
  kv = jnp.ones((B, 4, K, H))
  new = jax.jit(dec.update_kv_cache)(cache, kv, 2 * kv)
  np.testing.assert_array_equal(new.lengths, [22, 4, 24])       # counted, past L not stored
  key = np.asarray(new.key)
  np.testing.assert_array_equal(key[0, :, 18:], 1.0)
  np.testing.assert_array_equal(key[2], 0.0)                      # a full row is untouched

  q = jnp.asarray(_normal(5, (B, 2, N, H)))
  n = jnp.array([0, 2, 1], jnp.int32)
  attend = jax.jit(lambda q, c: dec.decode_attention(q, c, query_seq_lengths=n,
                                                    return_residual=True))
  f = lambda q: attend(q, new)
  out, lse = (np.asarray(a) for a in f(q))
  np.testing.assert_array_equal(out[0], 0.0)
  np.testing.assert_array_equal(out[2], 0.0)                      # its token overflowed
  assert np.all(lse[0] == -np.inf) and np.all(lse[2] == -np.inf)
  grad = np.asarray(jax.grad(lambda q: jnp.sum(f(q)[0]))(q))
  chex.assert_tree_all_finite(grad)
  np.testing.assert_array_equal(grad[0], 0.0)


def test_layer_decode_matches_full_forward():
  D = 10
  params = init_multi_head_attention(jax.random.key(6), d_model=D, num_heads=N, head_dim=H,
                                     num_kv_heads=K, qk_norm=True)
  # Non-trivial biases and norm scales, so every parameter is exercised.
  params = params._replace(
      b_query=jnp.full((N, H), 0.1), b_key=jnp.full((K, H), -0.2), b_value=jnp.full((K, H), 0.3),
      b_out=jnp.full((D,), 0.05), query_norm_scale=jnp.linspace(0.5, 1.5, H),
      key_norm_scale=jnp.linspace(1.5, 0.5, H))
  rope = RopeConfig(base=100.0)
  x = _normal(7, (B, TOTAL, D))
  full = np.asarray(jax.jit(jax.vmap(
      lambda x: multi_head_attention(params, x, is_causal=True, rope=rope)))(x))
  layer = jax.jit(functools.partial(multi_head_attention_decode, rope=rope))

  prompt = np.array([4, 1, 6])
  T = int(prompt.max())
  zeros = np.zeros(B, np.int64)
  cache = dec.init_kv_cache(B, L, K, H)
  y, cache = layer(params, _gather(x, zeros, T, prompt), cache, seq_lengths=prompt)
  y = np.asarray(y)
  for b in range(B):
    np.testing.assert_allclose(y[b, :prompt[b]], full[b, :prompt[b]], atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(y[b, prompt[b]:], np.broadcast_to(params.b_out, (T - prompt[b], D)),
                               atol=ATOL)  # padded rows: attention 0, then the output bias
  pos = prompt.copy()
  for _ in range(4):
    y, cache = layer(params, _gather(x, pos, 1), cache)
    np.testing.assert_allclose(np.asarray(y)[:, 0], full[np.arange(B), pos], atol=ATOL, rtol=RTOL)
    pos = pos + 1
  np.testing.assert_array_equal(cache.lengths, pos)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the one-pass kernel is CPU-only")
@pytest.mark.parametrize("kwargs, ref_kwargs", [
    (dict(), dict()),
    (dict(local_window_size=14), dict(local_window_size=(14, 0))),   # still 100% visible
    (dict(logits_soft_cap=2.0), dict(logits_soft_cap=2.0)),
])
def test_one_pass_kernel_matches_reference_and_blocked(kwargs, ref_kwargs):
  # A cache whose visible keys fill at least 70% of it: on CPU the automatic
  # path reads it in one pass, guarded by the blocked kernel.
  q, k, v = _problem(3)
  full = lambda x: np.concatenate([x, x[:, :L - TOTAL]], axis=1)          # (B, L, ...)
  lengths = np.array([20, 16, 14])
  clean = dec.update_kv_cache(dec.init_kv_cache(B, L, K, H), full(k), full(v),
                              seq_lengths=lengths)
  rows = np.stack([lengths - 2, lengths - 1], 1)                         # the last two tokens
  query = jnp.asarray(np.take_along_axis(full(q), rows[:, :, None, None], 1))
  decode = jax.jit(lambda q, c: dec.decode_attention(q, c, return_residual=True, **kwargs))
  assert "custom_jvp_call" in str(jax.make_jaxpr(decode)(query, clean))
  out, lse = decode(query, clean)
  ref_out, ref_lse = testing.reference_attention(full(q), full(k), full(v), is_causal=True,
                                                 return_residual=True, **ref_kwargs)
  for b in range(B):
    np.testing.assert_allclose(out[b], ref_out[b, rows[b]], atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(lse[b], ref_lse[b, rows[b]], atol=ATOL, rtol=RTOL)
  # The one-pass kernel ran: its bits, not the blocked kernel's.
  one = jax.jit(lambda q, c: dk._one_pass(
      q, c.key, c.value, c.lengths, jnp.full(B, 2), scale=H ** -0.5,
      soft_cap=kwargs.get("logits_soft_cap"), window_left=kwargs.get("local_window_size")))
  blocked = lambda q, c: dec.decode_attention(q, c, block_size=6, **kwargs)
  np.testing.assert_array_equal(out, one(query, clean)[0])
  assert not np.array_equal(out, blocked(query, clean)), "the test cannot tell the kernels apart"
  loss = lambda f: lambda q, kc, vc, c: jnp.sum(jnp.sin(f(q, c._replace(key=kc, value=vc))))
  auto = lambda q, c: decode(q, c)[0]
  grads = lambda f, c: jax.grad(loss(f), (0, 1, 2))(query, c.key, c.value, c)
  chex.assert_trees_all_close(grads(auto, clean), grads(blocked, clean), atol=1e-5)
  chex.assert_trees_all_close(jax.jvp(lambda q: auto(q, clean), (query,), (query,)),
                              jax.jvp(lambda q: blocked(q, clean), (query,), (query,)), atol=1e-5)
  # NaN keys and inf values in the stale slots: the one-pass output is not
  # finite, so the blocked kernel reruns; nothing reaches the output or gradients.
  stale = (np.arange(L)[None, :] >= lengths[:, None])[:, None, :, None]
  dirty = clean._replace(key=jnp.where(stale, jnp.nan, clean.key),
                         value=jnp.where(stale, jnp.inf, clean.value))
  chex.assert_trees_all_close(decode(query, dirty), (out, lse), atol=1e-6)
  g = grads(auto, dirty)
  chex.assert_tree_all_finite(g)
  chex.assert_trees_all_close(g, grads(auto, clean), atol=1e-6)
  # vmap over queries: the choice is made for the whole batch.
  many = jnp.stack([query, query[::-1]])
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *[decode(x, clean) for x in many])
  chex.assert_trees_all_close(jax.vmap(decode, (0, None))(many, clean), stacked, atol=1e-6)


@pytest.mark.parametrize("case", ["gqa_padded_queries", "empty_row", "empty_cache", "bfloat16"])
def test_one_pass_kernel_equals_blocked(case):
  # `_one_pass` alone (no guard) against `_blocked` on the edge cases.
  Bc, Lc, Nc, Kc, Hc, T = 3, 24, 6, 2, 8, 3
  dtype = jnp.bfloat16 if case == "bfloat16" else jnp.float32
  lengths = {"empty_row": [24, 0, 9], "empty_cache": [0, 0, 0]}.get(case, [24, 17, 9])
  q_lengths = [3, 1, 2] if case == "gqa_padded_queries" else [3, 3, 3]
  lengths, q_lengths = jnp.array(lengths, jnp.int32), jnp.array(q_lengths, jnp.int32)
  key = jnp.asarray(_normal(80, (Bc, Kc, Lc, Hc)), dtype)
  value = jnp.asarray(_normal(81, (Bc, Kc, Lc, Hc)), dtype)
  query = jnp.asarray(_normal(82, (Bc, T, Nc, Hc)), dtype)
  opts = dict(scale=0.3, soft_cap=None, window_left=None)
  one = dk._one_pass(query, key, value, lengths, q_lengths, **opts)
  blocked = dk._blocked(query, key, value, lengths, q_lengths, num_splits=1, block_size=5, **opts)
  tol = 2e-2 if dtype == jnp.bfloat16 else 1e-6  # bf16 outputs: 8 mantissa bits, two summation orders
  chex.assert_trees_all_close(one, blocked, atol=tol, rtol=tol)
  real = (np.arange(T)[None, :] < np.asarray(q_lengths)[:, None]) & (np.asarray(lengths)[:, None] > 0)
  np.testing.assert_array_equal(np.asarray(one[0], np.float32)[~real], 0.0)
  assert np.all(np.asarray(one[1])[~real] == -np.inf)


@pytest.mark.parametrize("one_pass", [False, True], ids=["blocked", "one_pass"])
def test_garbage_cotangent_of_empty_rows_stays_there(one_pass):
  # Padded query rows and a row with an empty cache output 0 whatever the
  # inputs: NaN or inf in their cotangents changes no gradient (P = 0 there,
  # but 0 * NaN once reached dV through the normalization's division).
  Bc, Lc, Nc, Kc, Hc, T = 3, 24, 6, 2, 8, 3
  lengths, q_lengths = jnp.array([24, 0, 9], jnp.int32), jnp.array([3, 1, 2], jnp.int32)
  query, key, value = (jnp.asarray(_normal(s, shape)) for s, shape in (
      (82, (Bc, T, Nc, Hc)), (80, (Bc, Kc, Lc, Hc)), (81, (Bc, Kc, Lc, Hc))))
  f = functools.partial(dk._split_kv, lengths=lengths, q_lengths=q_lengths, scale=0.3,
                        soft_cap=None, window_left=None, num_splits=1, block_size=5,
                        one_pass=one_pass)
  (out, lse), vjp = jax.vjp(lambda q, k, v: f(q, k, v), query, key, value)
  real = (jnp.arange(T)[None, :] < q_lengths[:, None]) & (lengths[:, None] > 0)
  do, dl = jnp.asarray(_normal(83, out.shape)), jnp.asarray(_normal(84, lse.shape))
  grads = [vjp((jnp.where(real[..., None, None], do, fill), jnp.where(real[..., None], dl, fill)))
           for fill in (jnp.nan, jnp.inf, 0.5)]
  chex.assert_tree_all_finite(grads)
  chex.assert_trees_all_equal(grads[0], grads[1], grads[2])


@pytest.mark.parametrize("kw", [{}, {"block_size": 4}, {"num_splits": 2}],
                         ids=["default", "block_size", "split_kv"])
def test_grad_of_vmap_with_per_example_lengths_matches_a_loop(kw):
  """vmap over caches with different lengths: a block's skip test was a batched
  cond, which vmap turns into a select that reverse mode could not transpose
  ("Transpose rule for 'stop_gradient'"); the default path's gradient failed."""
  V, Bc, Lc, Kc, Nc, Hc = 3, 2, 16, 2, 4, 8
  key, value = (jnp.asarray(_normal(s, (V, Bc, Kc, Lc, Hc))) for s in (90, 91))
  query = jnp.asarray(_normal(92, (V, Bc, 1, Nc, Hc)))
  lengths = jnp.array([[16, 14], [13, 16], [15, 15]], jnp.int32)  # >= 70% full: one-pass eligible

  def loss(q, k, v, n):
    return jnp.sum(jnp.sin(dec.decode_attention(q, dec.KVCache(k, v, n), **kw)))

  got = jax.jit(jax.grad(lambda q: jnp.sum(jax.vmap(loss)(q, key, value, lengths))))(query)
  want = jnp.stack([jax.grad(loss)(query[i], key[i], value[i], lengths[i]) for i in range(V)])
  chex.assert_trees_all_close(got, want, atol=1e-6, rtol=1e-6)


def test_batch_wide_choice_stays_a_branch_under_vmap():
  pick = lambda x: jax.lax.cond(common.everywhere(jnp.all(x > 0)), lambda: x + 1, lambda: x - 1)
  x = jnp.array([[1.0, 2.0], [3.0, -4.0]])
  np.testing.assert_array_equal(jax.vmap(pick)(x), x - 1)         # one example fails: all do
  np.testing.assert_array_equal(jax.vmap(pick)(jnp.abs(x)), jnp.abs(x) + 1)
  jaxpr = str(jax.make_jaxpr(jax.vmap(pick))(x))
  assert "cond" in jaxpr and "select_n" not in jaxpr


def test_automatic_choices():
  assert dec.default_num_splits(1, 32, 32768, backend="gpu") == 16    # few queries, long cache
  assert dec.default_num_splits(1, 32, 3000, backend="gpu") == 1      # short cache
  assert dec.default_num_splits(8, 32, 32768, backend="gpu") == 1     # many queries
  assert dec.default_num_splits(1, 32, 32768, backend="cpu") == 1
  assert dec.default_block_size(8, 8, 128, jnp.float32) == 64
  assert dec.default_block_size(2, 8, 128, jnp.float32) == 256
  # Which path runs: the decode kernel for few queries, dot_product_attention for a prefill.
  cache = dec.init_kv_cache(1, 64, 1, 4)
  jaxpr = lambda T: str(jax.make_jaxpr(dec.decode_attention)(jnp.zeros((1, T, 8, 4)), cache))
  assert "_split_kv" in jaxpr(4) and "_split_kv" not in jaxpr(40)
  # The one-pass kernel: on CPU, with its logits within an eighth of the cache.
  kv = 2 * 8 * 8 * 32768 * 128 * 4                                    # B=8, K=8, H=128 f32
  assert dec.one_pass_fits(8, 1, 32, 32768, kv, backend="cpu")
  assert not dec.one_pass_fits(8, 1, 32, 32768, kv, backend="gpu")
  assert not dec.one_pass_fits(8, 64, 32, 32768, kv, backend="cpu")   # 2 GiB of logits


def test_errors_name_the_argument():
  cache = dec.init_kv_cache(B, L, K, H)._replace(lengths=jnp.full((B,), 4, jnp.int32))
  with pytest.raises(ValueError, match=r"update_kv_cache: key must have shape \(B, T, K, H\)"):
    dec.update_kv_cache(cache, jnp.zeros((B, 2, K + 1, H)), jnp.zeros((B, 2, K + 1, H)))
  with pytest.raises(TypeError, match="update_kv_cache: key must have the cache's dtype"):
    dec.update_kv_cache(cache, jnp.zeros((B, 2, K, H), jnp.bfloat16),
                        jnp.zeros((B, 2, K, H), jnp.bfloat16))
  with pytest.raises(ValueError, match="exceed the cache capacity"):
    dec.update_kv_cache(cache, jnp.zeros((B, L + 1, K, H)), jnp.zeros((B, L + 1, K, H)))
  with pytest.raises(ValueError, match=r"decode_attention: query must have shape"):
    dec.decode_attention(jnp.zeros((B + 1, 1, N, H)), cache)
  with pytest.raises(ValueError, match="must divide the query heads N = 5"):
    dec.decode_attention(jnp.zeros((B, 1, 5, H)), cache)
  with pytest.raises(ValueError, match="num_splits must divide the cache length L = 20"):
    dec.decode_attention(jnp.zeros((B, 1, N, H)), cache, num_splits=3)
  with pytest.raises(ValueError, match="implementation"):
    dec.decode_attention(jnp.zeros((B, 1, N, H)), _caches()["paged"]._replace(lengths=cache.lengths),
                         implementation="xla")
  with pytest.raises(ValueError, match=r"query_seq_lengths must have shape \(B,\) = \(3,\)"):
    dec.decode_attention(jnp.zeros((B, 1, N, H)), cache, query_seq_lengths=jnp.ones(2, jnp.int32))
  with pytest.raises(TypeError, match="cache must be a KVCache or PagedKVCache"):
    dec.decode_attention(jnp.zeros((B, 1, N, H)), (cache.key, cache.value))
  with pytest.raises(ValueError, match="init_kv_cache: max_length must be a positive int"):
    dec.init_kv_cache(B, 0, K, H)


@pytest.mark.interop
def test_tiny_lm_cached_greedy_equals_full_forward():
  pytest.importorskip("optax", reason='optax absent: pip install -e ".[examples]"')
  lm = load_example("train_tiny_lm")
  config = lm.Config(copy_length=4, d_model=32, d_mlp=64, num_heads=4, num_kv_heads=2,
                     head_dim=8)
  params, losses = lm.train(config, steps=30, batch=32, log=None)
  assert np.mean(losses[-5:]) < 0.8 * losses[0], losses  # learning, in 30 steps
  prompts, lengths, _ = lm.ragged_prompts(jax.random.key(1), 5, config)
  steps = config.seq_len - int(lengths.min())
  full = lm.greedy_full(params, prompts, lengths, config, steps)
  cached = lm.greedy_cached(params, prompts, lengths, config, steps)
  np.testing.assert_array_equal(cached, full)


def test_bench_decode_smoke(capsys):
  sys.path.insert(0, str(ROOT))  # bench/ is a folder of the repository, not installed
  from bench import decode as bench_decode
  # Tiny, and without the peers and the extra split row: a few compiles.
  assert bench_decode.main(["--batch", "2", "--length", "64", "--heads", "4", "--kv-heads", "2",
                            "--head-dim", "8", "--rounds", "1", "--paged", "16", "--splits", "1",
                            "--no-peers"]) == 0
  out = capsys.readouterr().out
  assert "paged (page_size=16)" in out and "decode_attention / read K+V once" in out


# ---------------------------------------------------------------------------
# Bad input: what raises outside jit, what is masked under jit (module docstring).


def _filled(seed, lengths, cache=None):
  """A contiguous cache holding random keys/values up to `lengths` (B,)."""
  lengths = np.asarray(lengths)
  T = int(lengths.max())
  k, v = _normal(seed, (B, T, K, H)), _normal(seed + 1, (B, T, K, H))
  cache = dec.init_kv_cache(B, L, K, H) if cache is None else cache
  return dec.update_kv_cache(cache, k, v, seq_lengths=lengths.astype(np.int32)), k, v


def _reference_rows(q, k, v, positions, visible):
  """float64 attention of q (B, T, N, H) to k, v (B, S, K, H) with visible (B, T, S)."""
  mask = jnp.asarray(visible)[:, None]
  return np.asarray(testing.reference_attention(q, k, v, mask=mask))


def test_concrete_misuse_raises():
  cache, _, _ = _filled(0, [6, 3, 2])
  one = jnp.zeros((B, 1, K, H))
  with pytest.raises(ValueError, match=r"update_kv_cache: cache.lengths must be non-negative; got \[-1, 3, 2\]"):
    dec.update_kv_cache(cache._replace(lengths=jnp.array([-1, 3, 2], jnp.int32)), one, one)
  with pytest.raises(ValueError, match=r"decode_attention: cache.lengths must be at most the capacity L = 20; got \[21, 3, 2\]"):
    dec.decode_attention(jnp.zeros((B, 1, N, H)), cache._replace(lengths=jnp.array([21, 3, 2], jnp.int32)))
  four = jnp.zeros((B, 4, K, H))
  full = cache._replace(lengths=jnp.array([18, 3, 2], jnp.int32))
  with pytest.raises(ValueError, match=r"update_kv_cache: appending seq_lengths = \[4, 4, 4\] tokens to cache.lengths = \[18, 3, 2\] overflows the capacity L = 20"):
    dec.update_kv_cache(full, four, four)
  with pytest.raises(ValueError, match=r"update_kv_cache: seq_lengths must be in \[0, T\] = \[0, 4\]; got \[5, 0, 0\]"):
    dec.update_kv_cache(cache, four, four, seq_lengths=jnp.array([5, 0, 0], jnp.int32))
  with pytest.raises(ValueError, match=r"decode_attention: query_seq_lengths = \[4, 4, 4\] exceeds cache.lengths = \[6, 3, 2\]"):
    dec.decode_attention(jnp.zeros((B, 4, N, H)), cache, query_seq_lengths=jnp.full(B, 4, jnp.int32))
  with pytest.raises(ValueError, match=r"decode_attention: local_window_size sides must be non-negative ints or None; got \(2, -1\)"):
    dec.decode_attention(jnp.zeros((B, 1, N, H)), cache, local_window_size=(2, -1))
  for bad in (NUM_PAGES, -1):
    table = _shuffled_page_table()
    table[1, 1] = bad
    paged = dec.init_paged_kv_cache(B, NUM_PAGES, PAGE, K, H, page_table=table)
    kv = jnp.zeros((B, 6, K, H))   # 6 tokens reach page column 1
    with pytest.raises(ValueError, match=rf"update_kv_cache: cache.page_table entries must be page ids in \[0, num_pages\) = \[0, {NUM_PAGES}\) .* got page_table\[1, 1\] = {bad}"):
      dec.update_kv_cache(paged, kv, kv)
    # Entries no token reaches may hold anything (e.g. -1 for "no page").
    dec.update_kv_cache(paged, kv[:, :PAGE], kv[:, :PAGE])


@pytest.mark.parametrize("bad", [NUM_PAGES, -1])
def test_invalid_page_ids_are_never_read_or_written_under_jit(bad):
  table = _shuffled_page_table(3)
  table[1, 1] = bad
  paged = dec.init_paged_kv_cache(B, NUM_PAGES, PAGE, K, H, page_table=table)
  T = 7                                                # pages 0 and 1 of every row
  k, v = _normal(30, (B, T, K, H)), _normal(31, (B, T, K, H))
  paged = jax.jit(dec.update_kv_cache)(paged, k, v)
  pages = np.asarray(paged.key_pages)
  written = set(table[:, :2].ravel().tolist()) - {bad}
  for p in set(range(NUM_PAGES)) - written:           # the last page and page 0 among them
    np.testing.assert_array_equal(pages[p], 0.0)
  q = _normal(32, (B, 1, N, H))
  out = np.asarray(jax.jit(dec.decode_attention)(q, paged))
  # Row 1 attends to the tokens it could store: positions outside the bad page.
  pos = np.arange(T)
  visible = np.ones((B, 1, T), bool)
  visible[1, 0] = pos // PAGE != 1
  want = _reference_rows(q, k, v, None, visible)
  np.testing.assert_allclose(out, want, atol=ATOL, rtol=RTOL)


def test_negative_lengths_count_as_zero_under_jit():
  cache = dec.init_kv_cache(B, L, K, H)._replace(lengths=jnp.array([-1, 0, -5], jnp.int32))
  k = jnp.asarray(_normal(40, (B, 2, K, H)))
  new = jax.jit(dec.update_kv_cache)(cache, k, k)
  np.testing.assert_array_equal(new.lengths, [2, 2, 2])
  np.testing.assert_array_equal(np.asarray(new.key)[:, :, :2], np.asarray(k).transpose(0, 2, 1, 3))
  np.testing.assert_array_equal(np.asarray(new.key)[:, :, 2:], 0.0)   # nothing wrapped to L - 1


def test_overflowing_append_places_queries_with_their_keys():
  # lengths 6 + 4 new tokens, capacity 8: tokens 0, 1 land at 6, 7 and their
  # queries sit there; tokens 2, 3 are dropped and their queries give 0.
  Lc, T = 8, 4
  k0, v0 = _normal(50, (B, 6, K, H)), _normal(51, (B, 6, K, H))
  k1, v1 = _normal(52, (B, T, K, H)), _normal(53, (B, T, K, H))
  q = _normal(54, (B, T, N, H))
  cache = dec.update_kv_cache(dec.init_kv_cache(B, Lc, K, H), k0, v0)

  @jax.jit
  def step(cache, k, v, q):
    cache = dec.update_kv_cache(cache, k, v)
    return cache, dec.decode_attention(q, cache, block_size=3)

  new, out = step(cache, k1, v1, q)
  np.testing.assert_array_equal(new.lengths, [10, 10, 10])
  k_all, v_all = np.concatenate([k0, k1[:, :2]], 1), np.concatenate([v0, v1[:, :2]], 1)
  visible = np.arange(Lc)[None, None, :] <= (6 + np.arange(2))[None, :, None]
  want = _reference_rows(q[:, :2], k_all, v_all, None, np.broadcast_to(visible, (B, 2, Lc)))
  np.testing.assert_allclose(np.asarray(out)[:, :2], want, atol=ATOL, rtol=RTOL)
  np.testing.assert_array_equal(np.asarray(out)[:, 2:], 0.0)
  with pytest.raises(ValueError, match="overflows the capacity L = 8"):
    dec.update_kv_cache(cache, k1, v1)


@pytest.mark.parametrize("kind, kwargs", [
    ("contiguous", dict(block_size=6)),
    ("contiguous", dict(num_splits=2, block_size=6)),
    ("contiguous", dict(implementation="xla")),
    ("contiguous", dict(implementation="chunked")),
    ("paged", dict(block_size=8)),
])
def test_nan_in_stale_slots_never_reaches_the_output(kind, kwargs):
  lengths = np.array([5, 9, 2], np.int32)
  T = int(lengths.max())
  k, v = _normal(60, (B, T, K, H)), _normal(61, (B, T, K, H))
  clean = dec.update_kv_cache(_caches()[kind], k, v, seq_lengths=lengths)
  # Poison everything the cache holds at or past lengths (and unused pages).
  if kind == "contiguous":
    stale = (np.arange(L)[None, :] >= lengths[:, None])[:, None, :, None]
    dirty = clean._replace(key=jnp.where(stale, jnp.nan, clean.key),
                           value=jnp.where(stale, jnp.inf, clean.value))
  else:
    table = np.asarray(clean.page_table)
    pages = np.ones((NUM_PAGES, PAGE), bool)          # True = stale
    for b in range(B):
      for t in range(lengths[b]):
        pages[table[b, t // PAGE], t % PAGE] = False
    stale = pages[:, None, :, None]
    dirty = clean._replace(key_pages=jnp.where(stale, jnp.nan, clean.key_pages),
                           value_pages=jnp.where(stale, jnp.nan, clean.value_pages))
  q = jnp.asarray(_normal(62, (B, 2, N, H)))
  n = jnp.array([2, 1, 2], jnp.int32)
  f = jax.jit(lambda q, c: jnp.sum(jnp.sin(dec.decode_attention(q, c, query_seq_lengths=n, **kwargs))))
  chex.assert_trees_all_close(f(q, dirty), f(q, clean), atol=1e-6)
  g = jax.grad(f)(q, dirty)
  chex.assert_tree_all_finite(g)
  chex.assert_trees_all_close(g, jax.grad(f)(q, clean), atol=1e-6)


def test_zero_lengths_and_empty_cache_give_zero():
  cache = dec.init_kv_cache(B, L, K, H)
  q = jnp.asarray(_normal(70, (B, 2, N, H)))
  # Nothing stored yet (idle slots): every row gives 0, outside jit as under it.
  for attend in (dec.decode_attention, jax.jit(dec.decode_attention)):
    np.testing.assert_array_equal(np.asarray(attend(q, cache)), 0.0)
  out = dec.decode_attention(q, cache, query_seq_lengths=jnp.zeros(B, jnp.int32))
  np.testing.assert_array_equal(np.asarray(out), 0.0)
  new = dec.update_kv_cache(cache, jnp.ones((B, 2, K, H)), jnp.ones((B, 2, K, H)),
                            seq_lengths=jnp.zeros(B, jnp.int32))
  np.testing.assert_array_equal(new.lengths, 0)
  np.testing.assert_array_equal(np.asarray(new.key), 0.0)


def test_float64_caches_decode_in_float64():
  # Every decode kernel keeps float64 statistics and accumulators for a float64 cache.
  lengths = np.array([6, 3, 2], np.int32)
  with jax.enable_x64(True):
    rng = np.random.default_rng(5)
    k, v = rng.normal(size=(2, B, 6, K, H))
    q = rng.normal(size=(B, 1, N, H))
    contiguous = dec.update_kv_cache(dec.init_kv_cache(B, L, K, H, jnp.float64), k, v,
                                     seq_lengths=lengths)
    paged = dec.update_kv_cache(
        dec.init_paged_kv_cache(B, NUM_PAGES, PAGE, K, H, jnp.float64,
                                page_table=_shuffled_page_table()), k, v, seq_lengths=lengths)
    visible = np.arange(6)[None, None, :] < lengths[:, None, None]   # (B, 1, S)
    want = np.asarray(testing.reference_attention(q, k, v, mask=jnp.asarray(visible)[:, None]))
    runs = {"one pass": (contiguous, {}), "blocked": (contiguous, dict(block_size=4)),
            "split": (contiguous, dict(num_splits=2)), "xla": (contiguous, dict(implementation="xla")),
            "paged": (paged, {})}
    for name, (cache, kw) in runs.items():
      out, lse = dec.decode_attention(jnp.asarray(q), cache, return_residual=True, **kw)
      assert out.dtype == lse.dtype == jnp.float64, name
      np.testing.assert_allclose(np.asarray(out), want, atol=1e-12, rtol=1e-12, err_msg=name)
    grads = {name: jax.grad(lambda q, cache=cache, kw=kw: dec.decode_attention(q, cache, **kw).sum())(
        jnp.asarray(q)) for name, (cache, kw) in runs.items()}
    for name, g in grads.items():
      np.testing.assert_allclose(np.asarray(g), np.asarray(grads["xla"]), atol=1e-12, err_msg=name)


def test_a_fresh_cache_can_be_donated():
  # init_*_cache give keys and values their own buffers: a jitted step that donates
  # the cache (as README shows) would otherwise donate one buffer twice.
  step = jax.jit(lambda c, k, v: dec.update_kv_cache(c, k, v), donate_argnums=0)
  kv = jnp.ones((B, 1, K, H))
  for cache in (dec.init_kv_cache(B, L, K, H), dec.init_paged_kv_cache(B, NUM_PAGES, PAGE, K, H)):
    assert jax.tree.leaves(cache)[0] is not jax.tree.leaves(cache)[1]
    new = step(cache, kv, kv)
    np.testing.assert_array_equal(np.asarray(new.lengths), 1)


def test_cache_and_option_types_are_checked():
  cache, _, _ = _filled(0, [6, 3, 2])
  q = jnp.zeros((B, 1, N, H))
  paged = _caches()["paged"]._replace(lengths=cache.lengths)
  with pytest.raises(TypeError, match="decode_attention: cache.page_table must be integer page ids; got float32"):
    dec.decode_attention(q, paged._replace(page_table=paged.page_table.astype(jnp.float32)))
  with pytest.raises(TypeError, match="update_kv_cache: cache.page_table must be integer"):
    dec.update_kv_cache(paged._replace(page_table=paged.page_table.astype(jnp.float32)),
                        jnp.zeros((B, 1, K, H)), jnp.zeros((B, 1, K, H)))
  ints = cache._replace(key=cache.key.astype(jnp.int32), value=cache.value.astype(jnp.int32))
  with pytest.raises(TypeError, match="decode_attention: cache keys and values must be floating point; got int32"):
    dec.decode_attention(q.astype(jnp.int32), ints)
  with pytest.raises(TypeError, match="decode_attention: logits_soft_cap must be a static Python number"):
    jax.jit(lambda cap: dec.decode_attention(q, cache, logits_soft_cap=cap))(30.0)


@pytest.mark.parametrize("kw", [{}, {"block_size": 4}, {"num_splits": 2, "block_size": 4},
                                {"paged": True}, {"implementation": "xla"}],
                         ids=["default", "blocked", "split_kv", "paged", "xla"])
def test_nan_in_query_rows_past_the_lengths_reaches_no_gradient(kw):
  """Query rows past query_seq_lengths hold NaN: their logits are masked, but the
  logits' transpose (dK = dS^T q) met 0 * NaN and made every valid key's
  gradient NaN in the split-KV, one-pass and paged kernels. Now every
  output and gradient equals the one with zeros there."""
  kw = dict(kw)
  paged = kw.pop("paged", False)
  Bc, T, Nc, Kc, Hc, Lc = 2, 3, 4, 2, 8, 8
  lengths, n = jnp.array([5, 6], jnp.int32), jnp.array([3, 1], jnp.int32)
  key, value = (jnp.asarray(_normal(s, (Bc, Kc, Lc, Hc))) for s in (95, 96))
  clean = np.asarray(_normal(97, (Bc, T, Nc, Hc)), np.float32)
  clean[1, 1:] = 0.0
  dirty = clean.copy()
  dirty[1, 1:] = np.nan

  def loss(q, k, v):
    if paged:  # pages of 4 tokens, the second example's pages stored first
      pages = lambda x: jnp.stack([x[b, :, 4 * p:4 * p + 4] for b in (1, 0) for p in (0, 1)])
      cache = dec.PagedKVCache(pages(k), pages(v), jnp.array([[2, 3], [0, 1]], jnp.int32), lengths)
    else:
      cache = dec.KVCache(k, v, lengths)
    out = dec.decode_attention(q, cache, query_seq_lengths=n, **kw)
    return jnp.sum(jnp.sin(out))

  f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  got, want = f(jnp.asarray(dirty), key, value), f(jnp.asarray(clean), key, value)
  chex.assert_tree_all_finite(got)
  chex.assert_trees_all_close(got, want, atol=1e-6, rtol=1e-6)


def test_layer_decode_keeps_nan_in_padded_rows_out_of_parameter_gradients():
  """A ragged prefill whose padding rows hold NaN: the cached layer zeroes them
  before the projections, as multi_head_attention does (x^T dq met 0 * NaN and
  made w_query, w_key, w_value NaN). Outputs and every gradient equal those
  with zeros there."""
  D, T = 8, 3
  params = init_multi_head_attention(jax.random.key(9), d_model=D, num_heads=4, num_kv_heads=2)
  params = params._replace(b_key=jnp.full(params.w_key.shape[1:], 0.1))
  n = jnp.array([3, 1], jnp.int32)
  real = (jnp.arange(T)[None, :] < n[:, None])[..., None]
  clean = np.asarray(_normal(98, (2, T, D)), np.float32)
  clean[1, 1:] = 0.0
  dirty = clean.copy()
  dirty[1, 1:] = np.nan

  def loss(p, x):
    y, cache = multi_head_attention_decode(p, x, dec.init_kv_cache(2, 8, 2, D // 4), seq_lengths=n)
    return jnp.sum(jnp.where(real, jnp.sin(y), 0.0)), cache.key

  f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  got, want = f(params, jnp.asarray(dirty)), f(params, jnp.asarray(clean))
  chex.assert_tree_all_finite(got)
  chex.assert_trees_all_close(got, want, atol=1e-6, rtol=1e-6)


def test_export_with_a_symbolic_batch():
  """jax.export of an update + decode step with a symbolic batch: the default
  queries' counts and the block size no longer need a concrete B (TypeError,
  InconclusiveDimensionOperation before); the exported step equals the jitted
  one at two batch sizes. A symbolic cache length is refused, saying why."""
  from jax import export

  def step(cache, q, k, v):
    cache = dec.update_kv_cache(cache, k, v)
    return cache, dec.decode_attention(q, cache)

  b, l = export.symbolic_shape("b, l")
  sym = lambda x, L=None: jax.ShapeDtypeStruct(
      (b,) + x.shape[1:2] + ((L,) if L is not None else x.shape[2:3]) + x.shape[3:], x.dtype)
  cache = dec.init_kv_cache(2, 16, 2, 8)
  q, k = jnp.ones((2, 1, 4, 8)), jnp.ones((2, 1, 2, 8))
  specs = (dec.KVCache(sym(cache.key), sym(cache.value), jax.ShapeDtypeStruct((b,), jnp.int32)),
           sym(q), sym(k), sym(k))
  exported = export.export(jax.jit(step))(*specs)
  for B_ in (2, 3):
    cache = dec.init_kv_cache(B_, 16, 2, 8)._replace(lengths=jnp.arange(B_, dtype=jnp.int32) + 4)
    cache = dec.update_kv_cache(cache, *(jnp.asarray(_normal(60 + s, (B_, 4, 2, 8))) for s in (0, 1)))
    args = (cache,) + tuple(jnp.asarray(_normal(70 + s, (B_, 1, n, 8))) for s, n in ((0, 4), (1, 2), (2, 2)))
    chex.assert_trees_all_close(exported.call(*args), jax.jit(step)(*args), atol=1e-6, rtol=1e-6)
  long = dec.KVCache(sym(cache.key, l), sym(cache.value, l), jax.ShapeDtypeStruct((b,), jnp.int32))
  with pytest.raises(NotImplementedError, match=r"cache length must be concrete .* got L=l"):
    export.export(jax.jit(step))(long, sym(q), sym(k), sym(k))
