"""Every implementation against the float64 reference and jax.nn."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn import testing

from attention_base import GRID_NAMES, JAX_NN_NAMES, AttentionTestBase, jax_nn_cases, slow_unless

# Chunked with small blocks runs every option against the float64 reference; jax.nn
# parity there and the one-block variant add a few options by default, all with -m slow.
CHUNKED_JAX_NN_FAST = ("plain", "causal_window", "bias_and_mask", "both_lengths_causal")
ONE_BLOCK_FAST = ("plain", "causal_bottom_right", "bias_bcast_heads", "segments", "soft_cap", "everything")


class TestXla(AttentionTestBase):
  implementation = "xla"

  def test_forward_mode_autodiff(self):
    q, k, v = self.qkv()
    tangent = testing.random_normal(jax.random.key(1), q.shape)
    f = lambda q: self.attend(q, k, v, is_causal=True)
    _, jvp_out = jax.jvp(f, (q,), (tangent,))
    eps = 1e-3
    fd = (f(q + eps * tangent) - f(q - eps * tangent)) / (2 * eps)
    np.testing.assert_allclose(jvp_out, fd, atol=2e-3)


class TestChunkedSmallBlocks(AttentionTestBase):
  """Blocks that do not divide T or S, so every path (pad, partial, full, skip) runs."""
  implementation = "chunked"
  block_sizes = (2, 3)

  @pytest.mark.parametrize("name,layout", jax_nn_cases(CHUNKED_JAX_NN_FAST, tnh_fast=("plain",)) + [
      p for p in jax_nn_cases(JAX_NN_NAMES, all_slow=True) if p.values[0] not in CHUNKED_JAX_NN_FAST])
  def test_matches_jax_nn(self, name, layout):
    super().test_matches_jax_nn(name, layout)


class TestChunkedOneBlock(AttentionTestBase):
  implementation = "chunked"
  block_sizes = None

  @pytest.mark.parametrize("name", slow_unless(GRID_NAMES, ONE_BLOCK_FAST))
  def test_matches_float64_reference_values_and_gradients(self, name):
    super().test_matches_float64_reference_values_and_gradients(name)

  # The same code as TestChunkedSmallBlocks with one block per side: the float64 grid
  # covers that path; jax.nn parity adds nothing there beyond the slow set.
  @pytest.mark.parametrize("name,layout", jax_nn_cases(JAX_NN_NAMES, all_slow=True))
  def test_matches_jax_nn(self, name, layout):
    super().test_matches_jax_nn(name, layout)


def test_chunked_forward_mode_is_a_clear_error():
  q, k, v = testing.random_qkv(jax.random.key(0))
  f = lambda q: jaxattn.dot_product_attention(q, k, v, implementation="chunked")
  with pytest.raises(TypeError, match="implementation='chunked' has a custom VJP.*use implementation='chunked_jvp'"):
    jax.jvp(f, (q,), (q,))


def test_bottom_right_alignment_is_decoding():
  """The last T queries against S keys equal the last rows of full causal self-attention."""
  q, k, v = testing.random_qkv(jax.random.key(1), T=7, S=7)
  full = jaxattn.dot_product_attention(q, k, v, is_causal=True)
  for impl in ("xla", "chunked"):
    tail = jaxattn.dot_product_attention(q[:, 4:], k, v, is_causal=True,
                                         causal_alignment="bottom_right", implementation=impl)
    np.testing.assert_allclose(tail, full[:, 4:], atol=1e-6)


def test_dropout_is_the_same_mask_in_every_implementation_and_varies_with_key():
  q, k, v = testing.random_qkv(jax.random.key(2))
  outs = {impl: jaxattn.dot_product_attention(q, k, v, dropout_rate=0.5, dropout_key=jax.random.key(0),
                                              implementation=impl, block_sizes=(2, 3) if impl == "chunked" else None)
          for impl in ("xla", "chunked")}
  np.testing.assert_allclose(outs["xla"], outs["chunked"], atol=1e-5)
  other = jaxattn.dot_product_attention(q, k, v, dropout_rate=0.5, dropout_key=jax.random.key(1))
  assert np.abs(np.asarray(other - outs["xla"])).max() > 1e-2
  # The keep rate is close to 1 - rate over many draws.
  keep = jaxattn._impl.common.dropout_keep(jnp.array([1, 2], jnp.uint32), 0.3,
                                           0, 0, jnp.arange(256)[:, None], jnp.arange(256)[None, :])
  assert abs(float(keep.mean()) - 0.7) < 0.01


def test_implementations_registry():
  assert {"xla", "chunked"} <= set(jaxattn.implementations())


def test_testing_assert_attention_close_compares_complex_values_whole():
  """Both parts of complex values count (a cast to float64 dropped the imaginary part);
  a dtype without a tolerance is a clear error unless atol and rtol are given."""
  x = np.array([1 + 1j, 2 - 1j], np.complex64)
  testing.assert_attention_close(x, x.astype(np.complex128))
  with pytest.raises(AssertionError):
    testing.assert_attention_close(x, x + 1e-3j)
  with pytest.raises(ValueError, match=r"^tolerance: no tolerance for dtype int32; expected one of float64, "):
    testing.assert_attention_close(np.arange(3, dtype=np.int32), np.arange(3))
  testing.assert_attention_close(np.arange(3), np.arange(3), atol=0, rtol=0)


def test_testing_draws_are_deterministic_and_work_under_jit():
  """jaxattn.testing draws with NumPy from the key's bits; a traced key uses jax.random."""
  a = testing.random_qkv(jax.random.key(3))
  b = testing.random_qkv(jax.random.PRNGKey(3))  # raw uint32 key with the same bits
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a[0], testing.random_qkv(jax.random.key(4))[0])
  traced = jax.jit(lambda k: testing.random_normal(k, (3, 4), jnp.bfloat16))(jax.random.key(0))
  assert traced.shape == (3, 4) and traced.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(traced, np.float32)))
  seg = testing.random_segment_ids(jax.random.key(5), 2, 9)
  assert seg.dtype == jnp.int32 and np.all(np.diff(np.asarray(seg), axis=1) >= 0)


def test_lengths_and_segment_ids_of_any_integer_width_keep_their_meaning():
  """Narrow lengths are not wrapped by the clip to [0, S]; NumPy int64 lengths and ids
  (which jax, x64 off, would wrap to 32 bits) are clipped and ranked on the host."""

  q, k, v = testing.random_qkv(jax.random.key(0), B=1, T=4, S=200, N=1, K=1, H=4)
  want = jaxattn.dot_product_attention(q, k, v, key_value_seq_lengths=jnp.array([100]), implementation="xla")
  for n in (np.array([100], np.int8), jnp.array([100], jnp.int8), np.array([100], np.uint8)):
    got = jax.jit(lambda q, n: jaxattn.dot_product_attention(q, k, v, key_value_seq_lengths=n,
                                                             implementation="xla"))(q, n)
    np.testing.assert_array_equal(got, want)
  full = jaxattn.dot_product_attention(q, k, v, implementation="xla")
  got = jaxattn.dot_product_attention(q, k, v, key_value_seq_lengths=np.array([2**32 + 1], np.int64),
                                      implementation="xla")
  np.testing.assert_array_equal(got, full)
  q, k, v = testing.random_qkv(jax.random.key(1), B=1, T=4, S=4, N=1, K=1, H=4)
  two_docs = jaxattn.dot_product_attention(q, k, v, query_segment_ids=jnp.array([[0, 0, 1, 1]]),
                                           implementation="xla")
  wide = np.array([[0, 0, 2**32, 2**32]], np.int64)
  for kw in (dict(query_segment_ids=wide), dict(mask_fn=jaxattn.masks.documents(wide))):
    np.testing.assert_array_equal(jaxattn.dot_product_attention(q, k, v, implementation="xla", **kw), two_docs)


def test_reference_zeroes_padding_like_the_library():

  q, k, v = testing.random_qkv(jax.random.key(2), B=2, T=5, S=6, N=2, K=1, H=4)
  kw = dict(query_seq_lengths=jnp.array([3, 5]), key_value_seq_lengths=jnp.array([4, 2]))
  dirty = [jnp.where(jnp.arange(x.shape[1])[None, :, None, None] >= n[:, None, None, None], jnp.nan, x)
           for x, n in ((q, kw["query_seq_lengths"]), (k, kw["key_value_seq_lengths"]),
                        (v, kw["key_value_seq_lengths"]))]
  clean = testing.reference_attention(q, k, v, **kw)
  np.testing.assert_array_equal(testing.reference_attention(*dirty, **kw), clean)
  d_out = testing.random_normal(jax.random.key(3), (2, 5, 2, 4))
  grads = testing.reference_attention_vjp(*dirty, d_out=d_out, **kw)
  assert all(np.all(np.isfinite(grads[n])) for n in ("query", "key", "value"))
  testing.assert_attention_close(jaxattn.dot_product_attention(*dirty, **kw), clean)
