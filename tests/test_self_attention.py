"""The seed notebook's layer: same numbers as its NumPy code, and no overflow."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn import __main__ as main
from jaxattn import testing


@pytest.mark.parametrize("cell", [0, 1])
def test_matches_the_notebook_numpy_code(cell):
  x = main.NOTEBOOK_INPUTS[cell]
  params = main.notebook_weights(jax.random.key(cell))
  w_np, out_np = main.notebook_self_attention(x, *(np.asarray(p, np.float64) for p in params))
  out, w = jaxattn.self_attention(params, jnp.asarray(x, jnp.float32), return_weights=True)
  np.testing.assert_allclose(w, w_np, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out, out_np, rtol=1e-5, atol=1e-6)
  # The weights-free path (dot_product_attention) gives the same output.
  np.testing.assert_allclose(jaxattn.self_attention(params, x), out_np, rtol=1e-5, atol=1e-6)


def test_overflow_where_numpy_gives_nan():
  x = main.NOTEBOOK_INPUTS[1] * 1000
  params = main.notebook_weights(jax.random.key(1))
  p64 = [np.asarray(p, np.float64) for p in params]
  with np.errstate(over="ignore", invalid="ignore"):
    w_np, _ = main.notebook_self_attention(x, *p64)
  assert np.isnan(w_np).any()
  w_ref, out_ref = main.stable_float64(x, *p64)
  out, w = jaxattn.self_attention(params, x, return_weights=True)
  np.testing.assert_allclose(w, w_ref, atol=1e-6)
  np.testing.assert_allclose(out, out_ref, rtol=1e-5)


def test_init_vmap_mask_and_causal():
  params = jaxattn.init_self_attention(jax.random.key(0), d_model=8, d_k=5, d_v=3)
  assert [p.shape for p in params] == [(8, 5), (8, 5), (8, 3)]
  xs = testing.random_normal(jax.random.key(1), (4, 6, 8))
  batched = jax.jit(jax.vmap(lambda x: jaxattn.self_attention(params, x, is_causal=True)))(xs)
  assert batched.shape == (4, 6, 3)
  for i in range(4):
    x = np.asarray(xs[i], np.float64)
    q, k, v = (x @ np.asarray(w, np.float64) for w in params)
    s = q @ k.T / np.sqrt(5) + np.triu(np.full((6, 6), -np.inf), 1)
    p = np.exp(s - s.max(1, keepdims=True))
    np.testing.assert_allclose(batched[i], (p / p.sum(1, keepdims=True)) @ v, atol=1e-5)
  mask = jnp.ones((6, 6), bool).at[2].set(False)
  out, w = jaxattn.self_attention(params, xs[0], mask=mask, return_weights=True)
  assert np.all(np.asarray(out[2]) == 0) and np.all(np.asarray(w[2]) == 0)
  with pytest.raises(ValueError, match=r"self_attention: x must have shape \(T, D\) with D = 8"):
    jaxattn.self_attention(params, xs)


def test_main_job_functions_run():
  assert main.seed_demo() < 1e-5
