"""RoPE: the complex-number formula, relative positions, layouts and scalings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn import testing
from jaxattn import rope as rope_lib
from jaxattn.rope import RopeConfig, rope_frequencies

T, N, H = 5, 3, 8

# Whole calls compiled once each: cheaper on 2 cores than op-by-op dispatch.
apply_rope = jax.jit(rope_lib.apply_rope, static_argnames="interleaved")


def apply_config(config: RopeConfig, x, positions):
  return jax.jit(config.apply)(x, positions)


def _complex_rope(x, pos, theta):
  """(x_d + i x_{d+H/2}) * exp(i p theta_d): the half-split layout, in float64."""
  x = np.asarray(x, np.float64)
  h = x.shape[-1] // 2
  z = (x[..., :h] + 1j * x[..., h:]) * np.exp(1j * np.asarray(pos, np.float64)[:, None, None] * theta)
  return np.concatenate([z.real, z.imag], -1)


def test_matches_complex_formula_and_keeps_dtype():
  x = testing.random_normal(jax.random.key(0), (T, N, H))
  pos = jnp.array([0, 3, 7, 100, 2049])
  theta = 10000.0 ** (-np.arange(H // 2) * 2.0 / H)
  np.testing.assert_allclose(apply_rope(x, pos), _complex_rope(x, pos, theta), atol=2e-4)
  y16 = apply_rope(x.astype(jnp.bfloat16), pos)
  assert y16.dtype == jnp.bfloat16 and y16.shape == x.shape
  # Rotations keep each pair's norm.
  np.testing.assert_allclose(jnp.linalg.norm(apply_rope(x, pos), axis=-1),
                             jnp.linalg.norm(x, axis=-1), rtol=1e-5)


def test_scores_depend_only_on_position_differences():
  kq, kk = jax.random.split(jax.random.key(1))
  q = testing.random_normal(kq, (T, N, H))
  k = testing.random_normal(kk, (T, N, H))
  pos = jnp.array([0, 1, 4, 9, 10])

  def scores(shift):
    return jnp.einsum("tnh,snh->nts", apply_rope(q, pos + shift), apply_rope(k, pos + shift))

  np.testing.assert_allclose(scores(0), scores(37), atol=1e-4)
  np.testing.assert_allclose(scores(0), scores(1000), atol=1e-3)
  # and do depend on the difference: a query moved relative to the keys changes them
  moved = jnp.einsum("tnh,snh->nts", apply_rope(q, pos + 1), apply_rope(k, pos))
  assert np.abs(moved - scores(0)).max() > 1e-2


def test_interleaved_is_a_permutation_of_half_split():
  x = testing.random_normal(jax.random.key(2), (T, N, H))
  pos = jnp.arange(T)
  perm = np.concatenate([np.arange(0, H, 2), np.arange(1, H, 2)])  # interleaved -> halves
  inter = apply_rope(x, pos, interleaved=True)
  half = apply_rope(x[..., perm], pos)
  np.testing.assert_allclose(inter[..., perm], half, atol=1e-6)


def test_partial_rotary_dim_passes_the_rest():
  x = testing.random_normal(jax.random.key(3), (2, T, N, H))  # leading batch dim too
  pos = jnp.arange(T) + 3
  y = apply_config(RopeConfig(rotary_dim=4, base=10.0), x, pos)
  np.testing.assert_array_equal(y[..., 4:], x[..., 4:])
  np.testing.assert_allclose(y[..., :4], apply_rope(x[..., :4], pos, rope_frequencies(4, base=10.0)),
                             atol=1e-6)


def test_scalings():
  base = rope_frequencies(H)
  np.testing.assert_allclose(rope_frequencies(H, scaling="linear", scaling_factor=4.0), base / 4.0, rtol=1e-6)
  ntk = rope_frequencies(H, scaling="ntk", scaling_factor=4.0)
  np.testing.assert_allclose(ntk, rope_frequencies(H, base=10000.0 * 4.0 ** (H / (H - 2))), rtol=1e-6)
  assert ntk[0] == base[0] and ntk[-1] < base[-1]  # NTK keeps the fastest frequency
  # Linear interpolation: position p at factor f rotates like position p / f.
  x = testing.random_normal(jax.random.key(4), (T, N, H))
  pos = jnp.arange(T) * 4.0
  np.testing.assert_allclose(apply_config(RopeConfig(scaling="linear", scaling_factor=4.0), x, pos),
                             apply_rope(x, pos / 4.0), atol=1e-5)


def test_errors():
  with pytest.raises(ValueError, match="rotary_dim must be a positive even number"):
    rope_frequencies(7)
  with pytest.raises(ValueError, match="scaling must be None, 'linear' or 'ntk'"):
    rope_frequencies(8, scaling="yarn")
  with pytest.raises(ValueError, match=r"positions must broadcast to x.shape\[:-2\] = \(5,\)"):
    rope_lib.apply_rope(jnp.ones((T, N, H)), jnp.arange(T + 1))
  with pytest.raises(ValueError, match="rotary_dim must be at most the head dim H = 8"):
    RopeConfig(rotary_dim=10).frequencies(H)
  with pytest.raises(TypeError, match="floating point"):
    rope_lib.apply_rope(jnp.ones((T, N, H), jnp.int32), jnp.arange(T))


def test_odd_head_dim():
  x = testing.random_normal(jax.random.key(5), (T, N, 7))
  with pytest.raises(ValueError, match=r"apply_rope: x's head dim H = 7 is odd .* rope_frequencies\(6\)"):
    rope_lib.apply_rope(x, jnp.arange(T))
  with pytest.raises(ValueError, match="RopeConfig: the head dim H = 7 is odd .* set rotary_dim"):
    RopeConfig().apply(x, jnp.arange(T))
  # An even rotary dim rotates part of an odd head; the last feature passes through.
  pos = jnp.arange(T) + 2
  y = apply_config(RopeConfig(rotary_dim=6, base=10.0), x, pos)
  np.testing.assert_array_equal(y[..., 6:], x[..., 6:])
  np.testing.assert_allclose(y[..., :6], _complex_rope(x[..., :6], pos, np.asarray(rope_frequencies(6, base=10.0))),
                             atol=1e-5)


def test_float64_inputs_rotate_with_float64_angles():
  # Positions around 1000: float32 frequencies would be off by ~1e-6 there.
  with jax.enable_x64(True):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 2, 8))
    pos = np.arange(1000, 1004)
    theta = 10000.0 ** (-np.arange(0, 8, 2) / 8)
    z = (x[..., :4] + 1j * x[..., 4:]) * np.exp(1j * pos[:, None, None] * theta)
    want = np.concatenate([z.real, z.imag], axis=-1)
    for got in (rope_lib.apply_rope(jnp.asarray(x), pos), RopeConfig().apply(jnp.asarray(x), pos)):
      assert got.dtype == jnp.float64
      np.testing.assert_allclose(got, want, atol=1e-12)
    assert rope_frequencies(8, dtype=jnp.float64).dtype == jnp.float64
  assert rope_frequencies(8).dtype == jnp.float32
