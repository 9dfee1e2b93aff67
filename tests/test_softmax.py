"""jaxattn.softmax / log_softmax / logsumexp against float64 NumPy."""

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jaxattn
from jaxattn import testing


def np_softmax(x, where, axis=-1):
  x = np.asarray(x, np.float64)
  xm = np.where(where, x, -np.inf)
  m = np.max(xm, axis=axis, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  e = np.where(where, np.exp(xm - m), 0.0)
  z = e.sum(axis=axis, keepdims=True)
  with np.errstate(divide="ignore"):
    return e / np.where(z == 0, 1, z), np.squeeze(m + np.log(z), axis)


@pytest.fixture
def data():
  k1, k2 = jax.random.split(jax.random.key(0))
  x = 30.0 * testing.random_normal(k1, (4, 7, 9))
  where = jax.random.bernoulli(k2, 0.6, (4, 7, 9)).at[1, 2].set(False)  # one empty row
  return x, where


def test_values_against_float64(data):
  x, where = data
  p_ref, lse_ref = np_softmax(x, where)
  np.testing.assert_allclose(jaxattn.softmax(x, where=where), p_ref, atol=1e-6)
  lse = jaxattn.logsumexp(x, where=where)
  assert lse[1, 2] == -np.inf
  np.testing.assert_allclose(lse, lse_ref, rtol=1e-6)
  ls = jaxattn.log_softmax(x, where=where)
  with np.errstate(divide="ignore"):
    np.testing.assert_allclose(ls, np.where(where, np.log(p_ref), -np.inf), rtol=1e-5, atol=1e-5)


def test_empty_rows_give_zero_and_zero_gradient(data):
  x, where = data
  p = jaxattn.softmax(x, where=where)
  assert np.all(np.asarray(p[1, 2]) == 0)
  w = testing.random_normal(jax.random.key(1), x.shape)
  for fn in (lambda x: jnp.sum(jaxattn.softmax(x, where=where) * w),
             lambda x: jnp.sum(jnp.where(where.any(-1), jaxattn.logsumexp(x, where=where), 0.0)),
             lambda x: jnp.sum(jnp.where(where, jaxattn.log_softmax(x, where=where), 0.0))):
    g = jax.grad(fn)(x)
    chex.assert_tree_all_finite(g)
    assert np.all(np.asarray(g[1, 2]) == 0)
    assert np.all(np.asarray(g)[~np.asarray(where)] == 0)


def test_all_negative_infinity_slices_are_empty_rows_too(data):
  """A slice that is -inf everywhere selects nothing, like a masked one:
  softmax 0, logsumexp -inf, log_softmax -inf (was NaN: -inf - -inf), zero gradients."""
  x, where = data
  x = x.at[1, 2].set(-jnp.inf)
  ls = jaxattn.log_softmax(x)
  assert np.all(np.asarray(ls[1, 2]) == -np.inf)
  np.testing.assert_array_equal(ls[1, 2], jaxattn.log_softmax(x, where=where)[1, 2])
  assert np.all(np.asarray(jaxattn.softmax(x)[1, 2]) == 0) and jaxattn.logsumexp(x)[1, 2] == -np.inf
  rest = np.ones(x.shape, bool)
  rest[1, 2] = False
  np.testing.assert_allclose(np.asarray(ls)[rest], np.asarray(jax.nn.log_softmax(x))[rest], atol=1e-5)
  w = testing.random_normal(jax.random.key(1), x.shape)
  g = jax.grad(lambda x: jnp.sum(jnp.where(jnp.isfinite(jaxattn.log_softmax(x)),
                                           jaxattn.log_softmax(x), 0.0) * w))(x)
  chex.assert_tree_all_finite(g)
  assert np.all(np.asarray(g[1, 2]) == 0)


def test_gradients_match_jax_nn_where_defined(data):
  x, _ = data
  w = testing.random_normal(jax.random.key(2), x.shape)
  ours = jax.grad(lambda x: jnp.sum(jaxattn.softmax(x, axis=1) * w))(x)
  theirs = jax.grad(lambda x: jnp.sum(jax.nn.softmax(x, axis=1) * w))(x)
  np.testing.assert_allclose(ours, theirs, atol=1e-6)
  ours = jax.grad(lambda x: jnp.sum(jaxattn.logsumexp(x, axis=(0, 2)) * w[:, 0, 0].sum()))(x)
  theirs = jax.grad(lambda x: jnp.sum(jax.nn.logsumexp(x, axis=(0, 2)) * w[:, 0, 0].sum()))(x)
  np.testing.assert_allclose(ours, theirs, atol=1e-6)
  # forward mode agrees with reverse mode
  t = testing.random_normal(jax.random.key(3), x.shape)
  _, jvp = jax.jvp(lambda x: jaxattn.log_softmax(x), (x,), (t,))
  vjp = jax.vjp(lambda x: jaxattn.log_softmax(x), x)[1]
  np.testing.assert_allclose(jnp.sum(jvp * w), jnp.sum(vjp(w)[0] * t), rtol=1e-4)


def test_seed_notebook_overflow_case():
  """exp(s)/sum(exp(s)) overflows at s ~ 1e3; ours does not."""
  s = jnp.array([[1000.0, 999.0, -1000.0], [1e4, 1e4, 0.0]])
  with np.errstate(over="ignore", invalid="ignore"):
    naive = np.exp(np.asarray(s)) / np.exp(np.asarray(s)).sum(-1, keepdims=True)
  assert np.isnan(naive).any()
  p_ref, lse_ref = np_softmax(s, np.ones(s.shape, bool))
  np.testing.assert_allclose(jaxattn.softmax(s), p_ref, atol=1e-7)
  np.testing.assert_allclose(jaxattn.logsumexp(s), lse_ref, rtol=1e-7)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_low_precision_keeps_float32_statistics(dtype):
  # 4096 equal entries: a float16/bfloat16 running sum would stall far below 4096.
  x = jnp.zeros((4096,), dtype)
  assert jaxattn.softmax(x).dtype == dtype
  np.testing.assert_allclose(float(jaxattn.logsumexp(x)), np.log(4096.0), rtol=4e-3)
  big = jnp.array([60000.0, 59990.0], jnp.float16)  # exp overflows float16 without the max
  chex.assert_tree_all_finite(jaxattn.softmax(big))
  # log_softmax subtracts the float32 logsumexp before rounding once: with the
  # logsumexp rounded first (100.5 in bfloat16) it gave -0.5 for -0.693.
  x = jnp.array([100.0, 100.0, 90.0], dtype)
  want = np.array([100.0, 100.0, 90.0]) - (100.0 + np.log(2.0 + np.exp(-10.0)))
  got = np.asarray(jaxattn.log_softmax(x), np.float64)
  np.testing.assert_allclose(got, want, atol=np.finfo(dtype).eps * 10.7 + 1e-6)
  assert jaxattn.log_softmax(x).dtype == dtype


def test_bad_input():
  with pytest.raises(TypeError, match="softmax: x must be a floating point array"):
    jaxattn.softmax(jnp.arange(3))
  with pytest.raises(TypeError, match="where must be a boolean"):
    jaxattn.softmax(jnp.ones(3), where=jnp.ones(3))
  with pytest.raises(ValueError, match=r"logsumexp: where must broadcast to x's shape \(2, 3\); got \(3, 2\)"):
    jaxattn.logsumexp(jnp.ones((2, 3)), where=jnp.ones((3, 2), bool))


@settings(max_examples=30, deadline=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=6),
                  elements=st.floats(-1e4, 1e4, width=32)),
       st.floats(-1e3, 1e3, width=32))
def test_properties_sum_to_one_and_shift_invariance(x, c):
  p = np.asarray(jaxattn.softmax(x), np.float64)
  np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(jaxattn.softmax(x + c), p, atol=1e-5)
  lse = np.asarray(jaxattn.logsumexp(x), np.float64)
  assert np.all(lse >= x.max(-1) - 1e-3) and np.all(lse <= x.max(-1) + np.log(x.shape[-1]) + 1e-2)


@pytest.mark.parametrize("f", [jaxattn.softmax, jaxattn.log_softmax, jaxattn.logsumexp])
@pytest.mark.parametrize("axis", [2, -3, (0, 2)])
def test_axis_out_of_range_raises_like_jax_nn(f, axis):
  x = jnp.ones((2, 3))
  peer = getattr(jax.nn, f.__name__)
  with pytest.raises(ValueError):
    peer(x, axis=axis)
  with pytest.raises(ValueError, match=rf"{f.__name__}: axis -?\d is out of bounds for x of rank 2"):
    f(x, axis=axis)


@pytest.mark.parametrize("f", [jaxattn.softmax, jaxattn.log_softmax, jaxattn.logsumexp])
@pytest.mark.parametrize("axis", [-1, 0, None])
def test_zero_size_input_matches_jax_nn(f, axis):
  x = jnp.ones((2, 0))
  got, want = f(x, axis=axis), getattr(jax.nn, f.__name__)(x, axis=axis)
  assert got.shape == want.shape and got.dtype == want.dtype
  np.testing.assert_array_equal(got, want)     # empty, or -inf for logsumexp over the empty axis
  assert jax.grad(lambda x: jnp.sum(f(x, axis=axis)))(x).shape == (2, 0)
