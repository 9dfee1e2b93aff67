"""implementation="chunked_jvp": forward-mode autodiff (jvp, jacfwd, Hessian-vector
products) through the blocked O(T) path, against the float64 reference and "xla",
and its reverse mode (the transposed tangent) through the shared test base."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn import scores, testing

from attention_base import (GRID_NAMES, JAX_NN_NAMES, AttentionTestBase, jax_nn_cases, option_grid,
                            slow_unless)

B, T, S, N, K, H = 2, 5, 7, 6, 3, 11
BLOCKS = (2, 3)  # blocks that divide neither T nor S: pad, partial, full and skipped tiles


def _attend(impl, kw):
  opts = {"block_sizes": BLOCKS} if impl == "chunked_jvp" else {}
  return lambda q, k, v, bias: jaxattn.dot_product_attention(
      q, k, v, bias, implementation=impl, return_residual=True, **opts, **kw)


def _tangents(q, k, v, bias, seed=7):
  ks = jax.random.split(jax.random.key(seed), 4)
  t = [testing.random_normal(kk, x.shape).astype(x.dtype) for kk, x in zip(ks, (q, k, v))]
  t.append(None if bias is None else testing.random_normal(ks[3], bias.shape))
  return tuple(t)


# Forward mode against the float64 reference by duality: for any cotangent c,
# <J t, c> = <t, J^T c>, with J^T c the reference's analytic float64 VJP.
JVP_CASES = ["plain", "causal_bottom_right", "window", "bias_bcast_heads", "mask_bcast",
             "both_lengths_causal", "segments", "soft_cap", "dropout", "everything"]


@pytest.mark.parametrize("name", slow_unless(JVP_CASES, ("causal_bottom_right", "bias_bcast_heads",
                                                          "both_lengths_causal", "everything")))
def test_jvp_matches_float64_reference_by_duality(name):
  q, k, v = testing.random_qkv(jax.random.key(0), B=B, T=T, S=S, N=N, K=K, H=H)
  kw = dict(option_grid(jax.random.key(1))[name])
  bias, mask = kw.pop("bias", None), kw.pop("mask", None)
  kw_m = dict(kw, mask=mask)
  tangents = _tangents(q, k, v, bias)
  (out, lse), (t_out, t_lse) = jax.jvp(_attend("chunked_jvp", kw_m), (q, k, v, bias), tangents)
  chex.assert_tree_all_finite((t_out, t_lse))
  c_out = testing.random_normal(jax.random.key(2), out.shape)
  c_lse = jnp.where(jnp.isfinite(lse), testing.random_normal(jax.random.key(3), lse.shape), 0)
  ref = testing.reference_attention_vjp(q, k, v, bias, mask, d_out=c_out, d_lse=c_lse, **kw)
  want = sum(np.sum(np.asarray(t, np.float64) * ref[n])
             for t, n in zip(tangents, ("query", "key", "value", "bias")) if t is not None)
  got = (np.sum(np.asarray(t_out, np.float64) * np.asarray(c_out, np.float64))
         + np.sum(np.where(np.isfinite(lse), np.asarray(t_lse, np.float64) * np.asarray(c_lse), 0)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # rows with no key: output and lse stay constant (0 and -inf), their tangents 0
  dead = ~np.isfinite(np.asarray(lse))
  assert np.all(np.asarray(t_out)[dead] == 0) and np.all(np.asarray(t_lse)[dead] == 0)


def test_jvp_matches_xla_elementwise_with_gqa_and_alibi():
  """Every element of the tangent (output and lse) equals "xla"'s jvp, including a
  tangent of the score modifier's parameters (the ALiBi slopes)."""
  q, k, v = testing.random_qkv(jax.random.key(4), B=B, T=T, S=S, N=N, K=K, H=H)
  slopes = scores.alibi_slopes(N)
  t_slopes = testing.random_normal(jax.random.key(5), slopes.shape)

  def f(impl):
    opts = {"block_sizes": BLOCKS} if impl == "chunked_jvp" else {}
    return lambda q, slopes: jaxattn.dot_product_attention(
        q, k, v, is_causal=True, score_fn=scores.alibi(slopes), logits_soft_cap=4.0,
        implementation=impl, return_residual=True, **opts)

  tq = testing.random_normal(jax.random.key(6), q.shape)
  ours = jax.jvp(f("chunked_jvp"), (q, slopes), (tq, t_slopes))
  theirs = jax.jvp(f("xla"), (q, slopes), (tq, t_slopes))
  chex.assert_trees_all_close(ours, theirs, atol=2e-5, rtol=2e-5)


def test_jacfwd_equals_jacrev_and_xla():
  q, k, v = testing.random_qkv(jax.random.key(8), B=1, T=4, S=6, N=2, K=1, H=3)

  def f(impl):
    opts = {"block_sizes": BLOCKS} if impl == "chunked_jvp" else {}
    return lambda q: jaxattn.dot_product_attention(q, k, v, is_causal=True, causal_alignment="bottom_right",
                                                   implementation=impl, **opts)

  fwd = jax.jacfwd(f("chunked_jvp"))(q)
  assert fwd.shape == q.shape + q.shape
  chex.assert_trees_all_close(fwd, jax.jacrev(f("chunked_jvp"))(q), atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(fwd, jax.jacfwd(f("xla"))(q), atol=1e-5, rtol=1e-5)


def test_hessian_vector_product_matches_xla():
  """Forward over reverse: jvp of the gradient (the transposed tangent, differentiated again)."""
  q, k, v = testing.random_qkv(jax.random.key(9), B=B, T=T, S=S, N=N, K=K, H=H)
  kv_len = jnp.array([4, S], jnp.int32)

  def loss(impl):
    opts = {"block_sizes": BLOCKS} if impl == "chunked_jvp" else {}
    def f(q, k, v):
      out, lse = jaxattn.dot_product_attention(q, k, v, is_causal=True, key_value_seq_lengths=kv_len,
                                               implementation=impl, return_residual=True, **opts)
      return jnp.sum(out ** 2) + jnp.sum(jnp.where(jnp.isfinite(lse), jnp.sin(lse), 0.0))
    return f

  t = _tangents(q, k, v, None)[:3]
  ours = jax.jvp(jax.grad(loss("chunked_jvp"), (0, 1, 2)), (q, k, v), t)
  theirs = jax.jvp(jax.grad(loss("xla"), (0, 1, 2)), (q, k, v), t)
  chex.assert_trees_all_close(ours, theirs, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("case", ["bias", "alibi"])
def test_second_order_forward_mode_with_a_bias_or_score_stays_finite(case):
  """jvp of grad and jvp of jvp differentiate the blocked forward itself: its
  running max must be a constant to autodiff (jnp.max's derivative divides by a
  tie count that XLA's fused loop could make 0: NaN where "xla" was finite)."""
  q, k, v = testing.random_qkv(jax.random.key(11), B=B, T=T, S=S, N=N, K=K, H=H)
  bias = testing.random_normal(jax.random.key(12), (B, N, T, S))
  score = scores.alibi(scores.alibi_slopes(N)) if case == "alibi" else None

  def f(impl):
    opts = {"block_sizes": BLOCKS} if impl == "chunked_jvp" else {}
    def attend(q, k, v, bias):
      return jaxattn.dot_product_attention(q, k, v, bias if case == "bias" else None, score_fn=score,
                                           implementation=impl, **opts)
    return attend

  args = (q, k, v, bias)
  t = _tangents(q, k, v, None)[:3] + (testing.random_normal(jax.random.key(13), bias.shape),)
  results = {}
  for impl in ("chunked_jvp", "xla"):
    loss = lambda *a, impl=impl: jnp.sum(jnp.sin(f(impl)(*a)))
    hvp = jax.jvp(jax.grad(loss, (0, 1, 2, 3)), args, t)[1]
    fwd2 = jax.jvp(lambda *a: jax.jvp(f(impl), a, t)[1], args, t)[1]
    results[impl] = (hvp, fwd2)
  chex.assert_tree_all_finite(results["chunked_jvp"])
  chex.assert_trees_all_close(results["chunked_jvp"], results["xla"], atol=5e-5, rtol=5e-5)


SECOND_ORDER_CASES = ["both_lengths_causal", "segments", "bias_bcast_heads", "window", "soft_cap",
                      "dropout", "everything"]


def _second_order(impl, kw, q, k, v, bias, t):
  """(grad of jvp, grad of grad) of a loss of the output and the logsumexp:
  reverse over forward and reverse over reverse, every input differentiated."""
  f = _attend(impl, kw)
  lse_weight = lambda lse: jnp.where(jnp.isfinite(lse), jnp.cos(jnp.arange(lse.size).reshape(lse.shape)), 0)

  def of_jvp(q, k, v, bias, *t):
    (_, lse), (t_out, t_lse) = jax.jvp(f, (q, k, v, bias), t)
    return jnp.sum(jnp.sin(t_out)) + jnp.sum(lse_weight(lse) * jnp.where(jnp.isfinite(lse), t_lse, 0))

  def loss(q, k, v, bias):
    out, lse = f(q, k, v, bias)
    return jnp.sum(jnp.sin(out)) + jnp.sum(lse_weight(lse) * jnp.where(jnp.isfinite(lse), lse, 0))

  argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
  rof = jax.grad(of_jvp, argnums + tuple(4 + i for i in argnums))(q, k, v, bias, *t)
  ror = jax.grad(lambda *a: sum(jnp.sum(jnp.cos(g)) for g in jax.grad(loss, argnums)(*a)),
                 argnums)(q, k, v, bias)
  return rof, ror


@pytest.mark.parametrize("name", slow_unless(SECOND_ORDER_CASES, ("both_lengths_causal", "everything")))
def test_reverse_over_forward_and_over_reverse_match_float64_xla(name):
  """`grad` of `jvp` and `grad` of `grad` go through the custom JVP's tangent
  (static loops), not the forward's data-dependent loop bounds: they work with
  every mask, bias, score modifier and dropout, and match "xla" in float64
  (bitwise-level agreement in float64, float32 within rounding)."""
  q, k, v = testing.random_qkv(jax.random.key(20), B=B, T=T, S=S, N=N, K=K, H=H)
  kw = dict(option_grid(jax.random.key(21))[name])
  bias = kw.pop("bias", None)
  t = _tangents(q, k, v, bias, seed=22)
  t = t if bias is not None else t[:3] + (None,)
  with jax.enable_x64(True):
    up = lambda x: None if x is None else x.astype(jnp.float64)
    args64 = [up(x) for x in (q, k, v, bias, *t)]
    want = _second_order("xla", kw, *args64[:4], args64[4:])
    got64 = _second_order("chunked_jvp", kw, *args64[:4], args64[4:])
  chex.assert_tree_all_finite(want)
  chex.assert_trees_all_close(got64, want, atol=1e-10, rtol=1e-10)
  got = _second_order("chunked_jvp", kw, q, k, v, bias, t)
  chex.assert_tree_all_finite(got)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(w), rtol=2e-4,
                               atol=2e-4 * float(np.max(np.abs(np.asarray(w)))))


def test_jacrev_of_jacfwd_is_the_hessian():
  """Reverse over forward as `jax.hessian` would not build it (jacrev(jacfwd)),
  against jax.hessian (forward over reverse) and "xla"."""
  q, k, v = testing.random_qkv(jax.random.key(23), B=1, T=3, S=4, N=2, K=1, H=2)

  def f(impl):
    opts = {"block_sizes": BLOCKS} if impl == "chunked_jvp" else {}
    return lambda q: jnp.sum(jnp.sin(jaxattn.dot_product_attention(
        q, k, v, is_causal=True, causal_alignment="bottom_right", implementation=impl, **opts)))

  rf = jax.jacrev(jax.jacfwd(f("chunked_jvp")))(q)
  assert rf.shape == q.shape + q.shape
  chex.assert_trees_all_close(rf, jax.hessian(f("chunked_jvp"))(q), atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(rf, jax.hessian(f("xla"))(q), atol=1e-5, rtol=1e-5)


def _temp_mib(fn, *args):
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes / 2**20


def test_jvp_and_its_transpose_take_linear_memory():
  """memory_analysis (deterministic): doubling T at most ~doubles the temporaries
  of the jvp, the gradient, and of grad of jvp and grad of grad (a materialized
  T x S tangent would quadruple them; so would per-query-block stacks of the
  key loop's carries, before the query blocks were rematerialized: grad of grad
  took 71.7 -> 201.5 MiB from T = 8192 to 16384)."""
  f = lambda q, k, v: jaxattn.dot_product_attention(q, k, v, is_causal=True, implementation="chunked_jvp")
  jvp = lambda q, k, v, tq, tk, tv: jax.jvp(f, (q, k, v), (tq, tk, tv))
  grad = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v)), (0, 1, 2))
  # second order in reverse mode: grad of jvp, grad of grad
  rof = jax.grad(lambda *a: jnp.sum(jvp(*a)[1]), tuple(range(6)))
  ror = jax.grad(lambda q, k, v: jnp.sum(grad(q, k, v)[0] ** 2), (0, 1, 2))
  mem = {}
  for t_len in (16384, 32768):
    sds = jax.ShapeDtypeStruct((1, t_len, 1, 64), jnp.float32)
    mem[t_len] = (_temp_mib(jvp, *(sds,) * 6), _temp_mib(grad, sds, sds, sds),
                  _temp_mib(rof, *(sds,) * 6), _temp_mib(ror, sds, sds, sds))
  for small, large in zip(mem[16384], mem[32768]):
    assert large <= 2.1 * small, mem
  assert mem[32768][0] < 64 and max(mem[32768]) < 128, mem  # a (T, T) float32 tile grid is 4096 MiB


class TestChunkedJvp(AttentionTestBase):
  """The shared base: values, and reverse mode through the transposed tangent."""
  implementation = "chunked_jvp"
  block_sizes = BLOCKS

  @pytest.mark.parametrize("name", slow_unless(GRID_NAMES, ("causal_window", "bias_and_mask", "segments",
                                                             "dropout_causal_raw_key", "everything")))
  def test_matches_float64_reference_values_and_gradients(self, name):
    super().test_matches_float64_reference_values_and_gradients(name)

  @pytest.mark.parametrize("name,layout", jax_nn_cases(JAX_NN_NAMES, all_slow=True))
  def test_matches_jax_nn(self, name, layout):
    super().test_matches_jax_nn(name, layout)


def test_grad_and_jvp_of_vmap_with_per_example_lengths():
  # Batched lengths make the block kinds differ per example; the tangent's
  # switch must stay a switch (a select is not transposable), one kind for all.
  q, k, v = testing.random_qkv(jax.random.key(11), B=3, T=40, S=40, N=2, K=1, H=8)
  lengths = jnp.array([40, 25, 9])

  def loss(impl):
    def one(q, k, v, n):
      return jaxattn.dot_product_attention(
          q[None], k[None], v[None], key_value_seq_lengths=n[None], is_causal=True,
          implementation=impl, block_sizes=(8, 8))[0]
    return lambda q, k, v: jnp.sum(jnp.sin(jax.vmap(one)(q, k, v, lengths)))

  chex.assert_trees_all_close(jax.grad(loss("chunked_jvp"), (0, 1, 2))(q, k, v),
                              jax.grad(loss("xla"), (0, 1, 2))(q, k, v), atol=2e-5, rtol=2e-5)
  tangents = (jnp.cos(q), v, k)
  chex.assert_trees_all_close(jax.jvp(loss("chunked_jvp"), (q, k, v), tangents),
                              jax.jvp(loss("xla"), (q, k, v), tangents), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("scale,T_,S_,blocks", [(10.0, 8, 12, (3, 4)), (1.0, 16, 256, (16, 8))],
                         ids=["peaked", "many_key_blocks"])
def test_bfloat16_tangents_and_gradients_as_accurate_as_xla(scale, T_, S_, blocks):
  """bfloat16: dO = sum P (dS V + dV) - m O cancels where the softmax is peaked,
  and dQ's cotangent adds up over key blocks. Rounded to bfloat16 there, the
  tangent's error was 35x "xla"'s (peaked) and the transposed dQ's 3x (32 key
  blocks); both must stay within 1.5x of "xla"'s, against float32 "xla"."""
  q, k, v = testing.random_qkv(jax.random.key(0), B=1, T=T_, S=S_, N=2, K=1, H=16,
                               dtype=jnp.bfloat16, scale=scale)
  t = testing.random_qkv(jax.random.key(1), B=1, T=T_, S=S_, N=2, K=1, H=16, dtype=jnp.bfloat16)
  d_out = testing.random_normal(jax.random.key(2), q.shape, jnp.bfloat16)
  f32 = lambda xs: tuple(x.astype(jnp.float32) for x in xs)

  def run(impl, xs, ts, do):
    f = lambda q, k, v: jaxattn.dot_product_attention(
        q, k, v, implementation=impl, block_sizes=blocks if impl == "chunked_jvp" else None)
    _, tangent = jax.jvp(f, xs, ts)
    return (tangent,) + jax.vjp(f, *xs)[1](do)

  want = run("xla", f32((q, k, v)), f32(t), d_out.astype(jnp.float32))
  err = lambda got: [float(jnp.max(jnp.abs(g.astype(jnp.float32) - w)) / jnp.max(jnp.abs(w)))
                     for g, w in zip(got, want)]
  ours, xla = err(run("chunked_jvp", (q, k, v), t, d_out)), err(run("xla", (q, k, v), t, d_out))
  for name, a, b in zip(("tangent", "dq", "dk", "dv"), ours, xla):
    assert a <= 1.5 * b + 1e-3, (name, a, b)


@pytest.mark.parametrize("implementation", ["chunked", "chunked_jvp", "pallas"])
def test_bias_and_score_parameter_types_survive_the_backward(implementation):
  """Operands are cast to vary alike before the implementation (for shard_map;
  a first version cast a bias and score parameters in the backwards, by a
  multiply); that must leave everything else as it was: a bfloat16 bias
  gets a bfloat16 gradient ("chunked" raised: its float32 accumulator reached
  the cast's pull-back), a weakly typed Python-float parameter under x64
  keeps float32 logits (a multiply by a strong one made them float64 in some
  branches: switch type errors in "chunked_jvp"'s grad and jvp), and a bias
  shared by a vmap is not copied per problem (compiled temp memory)."""
  q, k, v = testing.random_qkv(jax.random.key(31), B=1, T=32, S=32, N=2, K=1, H=4)
  blocks = dict(block_sizes=(8, 8)) if implementation != "pallas" else {}
  bias = testing.random_normal(jax.random.key(32), (1, 2, 32, 32)).astype(jnp.bfloat16)
  loss = lambda impl, **kw: lambda b, q: jnp.sum(jnp.sin(jaxattn.dot_product_attention(
      q, k, v, bias=b, is_causal=True, implementation=impl, **kw)))
  got = jax.grad(loss(implementation, **blocks))(bias, q)
  assert got.dtype == jnp.bfloat16
  chex.assert_trees_all_close(got.astype(jnp.float32),
                              jax.grad(loss("xla"))(bias, q).astype(jnp.float32), atol=2e-2, rtol=2e-2)
  if implementation != "pallas":  # Pallas' interpreter is too slow for the rest
    score = lambda c: jaxattn.scores.from_function(lambda c, s, b, h, qi, ki: s * c, c)
    attend = lambda impl, c, q, **kw: jaxattn.dot_product_attention(
        q, k, v, is_causal=True, score_fn=score(c), implementation=impl, **kw)
    with jax.enable_x64(True):
      want = jax.grad(lambda c: jnp.sum(jnp.sin(attend("xla", c, q))))(0.5)
      got = jax.grad(lambda c: jnp.sum(jnp.sin(attend(implementation, c, q, **blocks))))(0.5)
      np.testing.assert_allclose(got, want, rtol=1e-5)
      if implementation == "chunked_jvp":
        t = jax.jvp(lambda q: attend(implementation, 0.5, q, **blocks), (q,), (q,))[1]
        assert t.dtype == jnp.float32
  if implementation == "pallas":  # its dbias partials dwarf a bias copy: no discriminating bound
    return
  T, N = 512, 4
  q, k, v = testing.random_qkv(jax.random.key(33), B=1, T=T, S=T, N=N, K=N, H=8)
  bias = jnp.zeros((1, N, T, T))  # 4 MiB
  grad = jax.grad(loss(implementation, block_sizes=(128, 128)), argnums=(0, 1))
  qs = jnp.stack([q] * 4)
  temp = jax.jit(jax.vmap(grad, in_axes=(None, 0))).lower(bias, qs).compile().memory_analysis()
  # The four problems' own temporaries and up to two bias-sized buffers, not four bias
  # copies (with the cast a multiply, vmap's temp was 21.8 MiB in chunked and 51.9 in
  # chunked_jvp; then 5.8 and 35.9, single problems 1.2 and 9.0; since the per-key-block
  # dbias strips and chunked_jvp's tile-sized bias cotangents, 12.4 and 8.9, single 1.9
  # and 2.1).
  single = jax.jit(grad).lower(bias, q).compile().memory_analysis().temp_size_in_bytes
  assert temp.temp_size_in_bytes <= 4 * single + 2 * bias.nbytes, (temp.temp_size_in_bytes, single)
