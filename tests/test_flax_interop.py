"""flax interop: imported parameters reproduce flax's modules; the attention_fn adapter matches flax's default."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.interop
pytest.importorskip("flax", reason='flax absent: pip install -e ".[examples]"')
from flax import linen as nn  # noqa: E402
from flax import nnx  # noqa: E402
from flax.nnx.nn import dtypes as nnx_dtypes  # noqa: E402

from jaxattn import flax_interop, testing  # noqa: E402
from jaxattn.layers import multi_head_attention  # noqa: E402

B, T, S, D, C, O, N, K, H = 2, 5, 7, 10, 9, 12, 6, 3, 4


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _randomize_nnx(module, seed):
  """Every parameter random (flax starts biases at 0 and norm scales at 1)."""
  state = nnx.state(module, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  leaves = [0.5 * _normal(seed + i, l.shape) + (1.0 if l.ndim == 1 else 0.0)
            for i, l in enumerate(leaves)]
  nnx.update(module, jax.tree.unflatten(treedef, leaves))
  return module


def _randomize_linen(variables, seed):
  leaves, treedef = jax.tree.flatten(variables)
  return jax.tree.unflatten(treedef, [0.5 * _normal(seed + i, l.shape) for i, l in enumerate(leaves)])


def _causal_padding_mask():
  """(B, 1, T, T) boolean: causal, with example 1's last two keys padded."""
  valid = jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
  return nn.make_attention_mask(jnp.ones((B, T)), valid, dtype=jnp.bool_)


def _close(actual, expected):
  to_np = lambda t: jax.tree.map(np.asarray, t)
  testing.assert_attention_close(to_np(actual), to_np(expected), dtype=jnp.float32)


def test_nnx_self_attention_gqa_qknorm_import():
  module = _randomize_nnx(nnx.MultiHeadAttention(
      num_heads=N, in_features=D, qkv_features=N * H, out_features=O, num_kv_heads=K,
      normalize_qk=True, decode=False, rngs=nnx.Rngs(0)), seed=10)
  x = _normal(1, (B, T, D))
  mask = _causal_padding_mask()
  expected = nnx.jit(lambda m, x, mask: m(x, mask=mask, is_causal=True))(module, x, mask)
  params = flax_interop.from_flax_nnx(module)
  assert params.w_key.shape == (D, K, H) and params.query_norm_scale.shape == (H,)
  out = jax.jit(jax.vmap(lambda x, m: multi_head_attention(params, x, mask=m, is_causal=True)))(x, mask)
  _close(out, expected)


def test_nnx_cross_attention_without_bias_import():
  module = _randomize_nnx(nnx.MultiHeadAttention(
      num_heads=N, in_features=D, qkv_features=N * H, out_features=O, in_kv_features=C,
      use_bias=False, decode=False, rngs=nnx.Rngs(1)), seed=20)
  x, ctx = _normal(2, (B, T, D)), _normal(3, (B, S, C))
  params = flax_interop.from_flax_nnx(module)
  assert params.b_query is None and params.w_key.shape == (C, N, H)
  out = jax.jit(jax.vmap(lambda x, c: multi_head_attention(params, x, c)))(x, ctx)
  _close(out, nnx.jit(lambda m, x, c: m(x, c))(module, x, ctx))


def test_linen_import_with_float_padding_mask():
  layer = nn.MultiHeadDotProductAttention(num_heads=N, qkv_features=N * H, out_features=O,
                                          normalize_qk=True)
  x, ctx = _normal(4, (B, T, D)), _normal(5, (B, S, C))
  variables = _randomize_linen(layer.init(jax.random.key(0), x, ctx), seed=30)
  kv_len = jnp.array([7, 3])
  mask = nn.make_attention_mask(jnp.ones((B, T)), jnp.arange(S)[None, :] < kv_len[:, None])  # float32
  expected = jax.jit(lambda v, x, c, mask: layer.apply(v, x, c, mask=mask))(variables, x, ctx, mask)
  params = flax_interop.from_flax_linen(variables)
  assert flax_interop.from_flax_linen(variables["params"]).w_out.shape == (N, H, O)
  out = jax.jit(jax.vmap(lambda x, c, n: multi_head_attention(params, x, c, key_value_seq_lengths=n)))(
      x, ctx, kv_len)
  _close(out, expected)


def test_adapter_matches_flax_default_nnx():
  kwargs = dict(num_heads=N, in_features=D, qkv_features=N * H, out_features=O, num_kv_heads=K,
                decode=False)
  default = _randomize_nnx(nnx.MultiHeadAttention(**kwargs, rngs=nnx.Rngs(2)), seed=40)
  ours = _randomize_nnx(nnx.MultiHeadAttention(**kwargs, attention_fn=flax_interop.attention_fn,
                                               rngs=nnx.Rngs(2)), seed=40)
  x = _normal(6, (B, T, D))
  mask = _causal_padding_mask()
  call = nnx.jit(lambda m, x, mask: (m(x, mask=mask), m(x, is_causal=True)))
  _close(call(ours, x, mask), call(default, x, mask))


def test_adapter_matches_flax_default_linen_any_batch_dims():
  default = nn.MultiHeadDotProductAttention(num_heads=N, qkv_features=N * H)
  ours = nn.MultiHeadDotProductAttention(num_heads=N, qkv_features=N * H,
                                         attention_fn=flax_interop.attention_fn)
  x = _normal(7, (2, 3, T, D))  # two batch dims
  ctx = _normal(8, (2, 3, S, D))
  variables = _randomize_linen(default.init(jax.random.key(1), x, ctx), seed=50)
  mask = nn.make_attention_mask(jnp.ones((2, 3, T)), _normal(9, (2, 3, S)) > -0.5)
  mask = mask.at[..., 0].set(1.0)  # no fully masked row: there jaxattn gives 0, flax mean(V)
  def both(layer):  # two batch dims, and none
    return jax.jit(lambda v, x, c, mask: (layer.apply(v, x, c, mask=mask), layer.apply(v, x[0, 0], c[0, 0])))(
        variables, x, ctx, mask)
  _close(both(ours), both(default))


def test_make_attention_fn_binds_jaxattn_options():
  fn = flax_interop.make_attention_fn(logits_soft_cap=1.5, local_window_size=(1, 1))
  module = _randomize_nnx(nnx.MultiHeadAttention(
      num_heads=N, in_features=D, qkv_features=N * H, decode=False, attention_fn=fn,
      rngs=nnx.Rngs(3)), seed=60)
  x = _normal(10, (B, T, D))
  params = flax_interop.from_flax_nnx(module)
  expected = jax.vmap(lambda x: multi_head_attention(
      params, x, logits_soft_cap=1.5, local_window_size=(1, 1)))(x)
  _close(nnx.jit(lambda m, x: m(x))(module, x), expected)


def test_adapter_dropout_is_keyed_and_deterministic_flag_works():
  module = _randomize_nnx(nnx.MultiHeadAttention(
      num_heads=N, in_features=D, qkv_features=N * H, decode=False, dropout_rate=0.4,
      attention_fn=flax_interop.attention_fn, rngs=nnx.Rngs(4)), seed=70)
  x = _normal(11, (B, T, D))
  a = module(x, deterministic=False, rngs=nnx.Rngs(dropout=5))
  b = module(x, deterministic=False, rngs=nnx.Rngs(dropout=5))
  c = module(x, deterministic=True)
  np.testing.assert_array_equal(a, b)
  assert np.isfinite(np.asarray(a)).all() and np.abs(np.asarray(a - c)).max() > 1e-3
  params = flax_interop.from_flax_nnx(module)
  _close(c, jax.vmap(lambda x: multi_head_attention(params, x))(x))


def test_errors():
  with pytest.raises(TypeError, match="nnx.MultiHeadAttention"):
    flax_interop.from_flax_nnx(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="'query', 'key', 'value'"):
    flax_interop.from_flax_linen({"params": {"query": {}}})
  q = jnp.ones((2, 4, 2, 8))
  with pytest.raises(ValueError, match=r"attention_fn: mask must broadcast to \[batch..., N, T, S\] "
                                       r"with batch \(2,\); got shape \(3, 1, 4, 4\)"):
    flax_interop.attention_fn(q, q, q, mask=jnp.ones((3, 1, 4, 4), bool))


def test_sow_weights_delegates_to_flax_and_sows_the_weights():
  kwargs = dict(num_heads=N, in_features=D, qkv_features=N * H, decode=False)
  default = _randomize_nnx(nnx.MultiHeadAttention(**kwargs, rngs=nnx.Rngs(5)), seed=80)
  ours = _randomize_nnx(nnx.MultiHeadAttention(**kwargs, attention_fn=flax_interop.attention_fn,
                                               rngs=nnx.Rngs(5)), seed=80)
  x = _normal(12, (B, T, D))
  _close(ours(x, sow_weights=True), default(x, sow_weights=True))
  w_ours = nnx.state(ours, nnx.Intermediate)["attention_weights"]
  w_default = nnx.state(default, nnx.Intermediate)["attention_weights"]
  _close(jax.tree.leaves(w_ours), jax.tree.leaves(w_default))
  assert jax.tree.leaves(w_ours)[0].shape == (B, N, T, T)
  # linen: the module sows into "intermediates".
  layer = nn.MultiHeadDotProductAttention(num_heads=N, qkv_features=N * H,
                                          attention_fn=flax_interop.attention_fn)
  variables = layer.init(jax.random.key(2), x)
  y, state = layer.apply(variables, x, sow_weights=True, mutable=["intermediates"])
  assert jax.tree.leaves(state["intermediates"])[0].shape == (B, N, T, T)


def test_custom_einsums_and_complex_dtypes_delegate_to_flax():
  q, k, v = _normal(13, (B, T, N, H)), _normal(14, (B, S, N, H)), _normal(15, (B, S, N, H))
  calls = []

  def einsum(spec, *args, **kwargs):
    calls.append(spec)
    return jnp.einsum(spec, *args, **kwargs)

  got = flax_interop.attention_fn(q, k, v, qk_attn_weights_einsum=einsum,
                                  attn_weights_value_einsum=einsum)
  assert len(calls) == 2          # the user's einsums ran
  _close(got, nn.dot_product_attention(q, k, v))
  qc, kc, vc = (a.astype(jnp.complex64) * (1 + 0.5j) for a in (q, k, v))
  got = flax_interop.attention_fn(qc, kc, vc)
  assert got.dtype == jnp.complex64
  _close(got, nn.dot_product_attention(qc, kc, vc))


@pytest.mark.parametrize("dtypes, dtype", [
    ((jnp.bfloat16, jnp.float32, jnp.float32), None),     # mixed inputs: promoted
    ((jnp.float32, jnp.float32, jnp.float32), jnp.bfloat16),   # dtype= casts
    ((jnp.float16, jnp.float16, jnp.float16), None),
])
def test_dtypes_follow_flax_promotion(dtypes, dtype):
  q, k, v = (_normal(16 + i, shape).astype(d) for i, (shape, d) in
             enumerate(zip(((B, T, N, H), (B, S, N, H), (B, S, N, H)), dtypes)))
  got = flax_interop.attention_fn(q, k, v, dtype=dtype)
  want = nn.dot_product_attention(q, k, v, dtype=dtype)
  assert got.dtype == want.dtype
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=2e-2)
  # nnx's modules pass their promote_dtype: the same result.
  got = flax_interop.attention_fn(q, k, v, dtype=dtype, promote_dtype=nnx_dtypes.promote_dtype)
  assert got.dtype == nnx.dot_product_attention(q, k, v, dtype=dtype).dtype
