"""multi_head_attention against float64 references: values, gradients, vmap/jit, GQA, RoPE, qk-norm."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn import testing
from jaxattn.layers import (MultiHeadParams, init_multi_head_attention, init_self_attention,
                            multi_head_attention)
from jaxattn.rope import RopeConfig

# Every size distinct, so a swapped axis fails: batch, query length, context
# length, model width, context width, output width, query heads, kv heads, head dim.
B, T, S, D, C, O, N, K, H = 2, 5, 7, 10, 9, 12, 6, 3, 8


def random_params(seed, *, num_kv_heads=K, d_context=None, d_out=O, qk_norm=False,
                  use_bias=True) -> MultiHeadParams:
  """Params with every leaf random (biases and norm scales too), never zeros or ones.

  Shapes come from init (eval_shape: nothing compiles); values from NumPy.
  """
  shapes = jax.eval_shape(lambda k: init_multi_head_attention(
      k, d_model=D, num_heads=N, head_dim=H, num_kv_heads=num_kv_heads,
      d_context=d_context, d_out=d_out, use_bias=use_bias, qk_norm=qk_norm), jax.random.key(0))
  rng = np.random.default_rng(seed)

  def draw(s):
    if len(s.shape) > 1:  # kernels: unit-variance outputs
      return jnp.asarray(rng.normal(size=s.shape) / np.sqrt(s.shape[0]), jnp.float32)
    return jnp.asarray(1.0 + 0.3 * rng.normal(size=s.shape), jnp.float32)

  return jax.tree.map(draw, shapes)


# ---------------------------------------------------------------------------
# float64 references


def _np64(p: MultiHeadParams) -> dict:
  return {k: None if v is None else np.asarray(v, np.float64) for k, v in p._asdict().items()}


def _norm_np(x, scale, kind, eps):
  if scale is None:
    return x
  if kind == "layer_norm":
    x = x - x.mean(-1, keepdims=True)
  return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * scale


def _rope_np(x, pos, rope: RopeConfig | None):
  """RoPE as complex multiplication, z_d = x_d + i x_{d+H/2}, from first principles."""
  if rope is None:
    return x
  h = x.shape[-1]
  base = rope.base
  if rope.scaling == "ntk":
    base = base * rope.scaling_factor ** (h / (h - 2))
  theta = base ** (-np.arange(h // 2) * 2.0 / h)
  if rope.scaling == "linear":
    theta = theta / rope.scaling_factor
  z = x[..., : h // 2] + 1j * x[..., h // 2:]
  z = z * np.exp(1j * np.asarray(pos, np.float64)[:, None, None] * theta)
  return np.concatenate([z.real, z.imag], axis=-1)


def reference_mha(params, x, context=None, *, rope=None, positions=None, context_positions=None,
                  qk_norm_type="layer_norm", qk_norm_epsilon=1e-6, **attention_kwargs):
  """One example in NumPy float64; the core is `jaxattn.testing.reference_attention`."""
  p = _np64(params)
  x = np.asarray(x, np.float64)
  c = x if context is None else np.asarray(context, np.float64)
  add = lambda y, b: y if b is None else y + b
  q = add(np.einsum("td,dnh->tnh", x, p["w_query"]), p["b_query"])
  k = add(np.einsum("sc,ckh->skh", c, p["w_key"]), p["b_key"])
  v = add(np.einsum("sc,ckh->skh", c, p["w_value"]), p["b_value"])
  q = _norm_np(q, p["query_norm_scale"], qk_norm_type, qk_norm_epsilon)
  k = _norm_np(k, p["key_norm_scale"], qk_norm_type, qk_norm_epsilon)
  pos = np.arange(x.shape[0]) if positions is None else positions
  cpos = (pos if context is None else np.arange(c.shape[0])) if context_positions is None else context_positions
  q, k = _rope_np(q, pos, rope), _rope_np(k, cpos, rope)
  kw = dict(attention_kwargs)
  for name in ("query_seq_lengths", "key_value_seq_lengths"):
    if kw.get(name) is not None:
      kw[name] = np.asarray(kw[name]).reshape(1)
  with jax.enable_x64(True):
    o = testing.reference_attention(q, k, v, **kw)
  return add(np.einsum("tnh,nho->to", o, p["w_out"]), p["b_out"])


def _batch(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _cases():
  """(params kwargs, per-example arrays (leading B), static layer kwargs, context?)."""
  rng = np.random.default_rng(0)
  mask = jnp.asarray(rng.random((B, N, T, T)) < 0.7)
  bias = _batch(1, (B, 1, T, S))
  seg = jnp.asarray(np.cumsum(rng.random((B, T)) < 0.4, axis=1), jnp.int32)
  return {
      "gqa_causal_mask": (dict(), dict(mask=mask),
                          dict(is_causal=True), False),
      "cross_bias_kv_lengths": (dict(d_context=C), dict(bias=bias, key_value_seq_lengths=jnp.array([3, 7])),
                                dict(scale=0.3), True),
      "mqa_qknorm_rope_window_cap": (dict(num_kv_heads=1, qk_norm=True), dict(),
                                     dict(rope=RopeConfig(base=100.0), local_window_size=(2, 1),
                                          logits_soft_cap=2.0), False),
      "rms_ntk_rope_segments_qlen": (dict(num_kv_heads=N, qk_norm=True),
                                     dict(query_segment_ids=seg, query_seq_lengths=jnp.array([5, 3]),
                                          positions=jnp.array([[3, 4, 5, 6, 7], [0, 2, 4, 6, 8]])),
                                     dict(rope=RopeConfig(base=50.0, scaling="ntk", scaling_factor=2.0),
                                          qk_norm_type="rms_norm", qk_norm_epsilon=1e-3), False),
      "cross_rope_linear_bottom_right_dropout": (
          dict(d_context=C, use_bias=False, qk_norm=True),
          dict(dropout_key=jax.random.split(jax.random.key(3), B)),
          dict(rope=RopeConfig(scaling="linear", scaling_factor=3.0), is_causal=True,
               causal_alignment="bottom_right", dropout_rate=0.3), True),
  }


CASES = list(_cases())


@pytest.mark.parametrize("case", CASES)
def test_vmapped_forward_matches_float64_reference(case):
  seed = 10 * CASES.index(case)
  pkw, per_example, static, cross = _cases()[case]
  params = random_params(seed, **pkw)
  x = _batch(seed + 1, (B, T, D))
  ctx = _batch(seed + 2, (B, S, C)) if cross else None
  names = list(per_example)

  def one(x, ctx, *arrays):
    return multi_head_attention(params, x, ctx, **static, **dict(zip(names, arrays)))

  out = jax.jit(jax.vmap(one))(x, ctx, *per_example.values())
  chex.assert_shape(out, (B, T, O))
  expected = np.stack([
      reference_mha(params, x[b], None if ctx is None else ctx[b], **static,
                    **{n: a[b] for n, a in per_example.items()})
      for b in range(B)])
  testing.assert_attention_close(out, expected, dtype=jnp.float32)


def test_batched_input_jit_and_vmap_agree():
  params = random_params(1)
  x = _batch(2, (B, T, D))
  lengths = jnp.array([4, 2])
  kw = dict(is_causal=True, rope=RopeConfig())

  @jax.jit
  @chex.assert_max_traces(n=1)
  def vmapped(params, x, lengths):
    return jax.vmap(lambda x, n: multi_head_attention(params, x, key_value_seq_lengths=n, **kw))(x, lengths)

  a = vmapped(params, x, lengths)
  vmapped(params, x + 1.0, lengths)  # same shapes: no retrace
  direct = jax.jit(lambda params, x, n: multi_head_attention(params, x, key_value_seq_lengths=n, **kw))
  b = direct(params, x, lengths)  # (B, T, D) with (B,) lengths, no vmap
  c = jnp.stack([direct(params, x[i], lengths[i]) for i in range(B)])  # one example at a time
  testing.assert_attention_close(a, c, dtype=jnp.float32)
  testing.assert_attention_close(b, c, dtype=jnp.float32)


# ---------------------------------------------------------------------------
# gradients: float32 jax.grad against jax.grad of a plain float64 jnp layer


def _plain_mha(p: MultiHeadParams, x, ctx, *, allowed, rope_base, eps):
  """Dense multi-head attention written directly (no jaxattn code), for x64 gradients."""
  q = jnp.einsum("td,dnh->tnh", x, p.w_query) + p.b_query[None]
  k = jnp.einsum("sc,ckh->skh", ctx, p.w_key) + p.b_key[None]
  v = jnp.einsum("sc,ckh->skh", ctx, p.w_value) + p.b_value[None]

  def norm(y, s):
    y = y - y.mean(-1, keepdims=True)
    return y / jnp.sqrt((y * y).mean(-1, keepdims=True) + eps) * s[None, None]

  def rope(y):
    L, h = y.shape[0], y.shape[-1]
    ang = jnp.arange(L)[:, None, None] * rope_base ** (-jnp.arange(h // 2) * 2.0 / h)[None, None]
    z = (y[..., : h // 2] + 1j * y[..., h // 2:]) * jnp.exp(1j * ang)
    return jnp.concatenate([z.real, z.imag], -1)

  q, k = rope(norm(q, p.query_norm_scale)), rope(norm(k, p.key_norm_scale))
  g = q.shape[1] // k.shape[1]
  k, v = jnp.repeat(k, g, axis=1), jnp.repeat(v, g, axis=1)
  s = jnp.einsum("tnh,snh->nts", q, k) / jnp.sqrt(q.shape[-1])
  s = jnp.where(allowed, s, -jnp.inf)
  w = jax.nn.softmax(s, axis=-1)
  return jnp.einsum("nts,snh,nho->to", w, v, p.w_out) + p.b_out[None]


def test_gradients_match_float64():
  params = random_params(3, qk_norm=True)
  x = _batch(4, (T, D))
  d_out = _batch(5, (T, O))
  length = 4
  rope = RopeConfig(base=100.0)

  def loss32(params, x):
    y = multi_head_attention(params, x, is_causal=True, key_value_seq_lengths=length, rope=rope)
    return jnp.sum(y * d_out)

  g32 = jax.jit(jax.grad(loss32, argnums=(0, 1)))(params, x)
  chex.assert_tree_all_finite(g32)
  with jax.enable_x64(True):
    allowed = ((jnp.arange(T)[:, None] >= jnp.arange(T)[None, :])
               & (jnp.arange(T) < length)[None, :])[None]
    to64 = lambda t: jax.tree.map(lambda a: jnp.asarray(np.asarray(a), jnp.float64), t)

    def loss64(params, x):
      y = _plain_mha(params, x, x, allowed=allowed, rope_base=100.0, eps=1e-6)
      return jnp.sum(y * to64(d_out))

    g64 = jax.tree.map(np.asarray, jax.jit(jax.grad(loss64, argnums=(0, 1)))(to64(params), to64(x)))
  testing.assert_attention_close(jax.tree.map(np.asarray, g32), g64, dtype=jnp.float32,
                                 atol=5e-5, rtol=5e-5)


def test_fully_masked_query_rows_are_finite():
  params = random_params(5)
  x = _batch(6, (T, D))

  def loss(params, x):
    y = multi_head_attention(params, x, query_seq_lengths=2, key_value_seq_lengths=0)
    return jnp.sum(y ** 2), y

  (_, y), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
  chex.assert_tree_all_finite((y, g))
  # No key to attend to: the attention output is 0, so the layer gives b_out.
  np.testing.assert_allclose(y, jnp.broadcast_to(params.b_out, (T, O)), atol=1e-6)


# ---------------------------------------------------------------------------
# implementations, dtypes, init, errors, saving


@pytest.mark.parametrize("name", jaxattn.implementations())
def test_every_implementation_serves_the_layer(name):
  params = random_params(7)
  x = _batch(8, (T, D))
  kw = dict(is_causal=True, local_window_size=(3, 0), key_value_seq_lengths=4)
  try:
    out = jax.jit(lambda p, x: multi_head_attention(p, x, implementation=name, **kw))(params, x)
  except NotImplementedError as exc:  # e.g. cudnn off a CUDA GPU: the message says why
    pytest.skip(str(exc))
  testing.assert_attention_close(out, reference_mha(params, x, **kw), dtype=jnp.float32)


def test_computation_dtype():
  params = random_params(9)
  x = _batch(10, (T, D))
  y16 = jax.jit(lambda p, x: multi_head_attention(p, x, dtype=jnp.bfloat16))(params, x)
  assert y16.dtype == jnp.bfloat16
  testing.assert_attention_close(y16, reference_mha(params, x), dtype=jnp.bfloat16)
  p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
  out = jax.eval_shape(multi_head_attention, p16, x)
  assert out.dtype == jnp.float32  # default: the promotion of x's and the params' dtypes


def test_init_shapes_and_options():
  p = init_multi_head_attention(jax.random.key(0), d_model=D, num_heads=N, num_kv_heads=K,
                                head_dim=H, d_context=C, d_out=O, qk_norm=True,
                                param_dtype=jnp.bfloat16)
  chex.assert_shape([p.w_query, p.w_key, p.w_value, p.w_out], [(D, N, H), (C, K, H), (C, K, H), (N, H, O)])
  chex.assert_shape([p.b_query, p.b_key, p.b_out, p.query_norm_scale], [(N, H), (K, H), (O,), (H,)])
  assert all(l.dtype == jnp.bfloat16 for l in jax.tree.leaves(p))
  q = init_multi_head_attention(jax.random.key(0), d_model=12, num_heads=4, use_bias=False)
  assert q.w_query.shape == (12, 4, 3) and q.b_query is None and q.query_norm_scale is None
  assert len(jax.tree.leaves(q)) == 4
  with pytest.raises(ValueError, match="num_heads N = 4 must divide d_model D = 10"):
    init_multi_head_attention(jax.random.key(0), d_model=10, num_heads=4)
  with pytest.raises(ValueError, match="num_kv_heads K = 4 must divide num_heads N = 6"):
    init_multi_head_attention(jax.random.key(0), d_model=12, num_heads=6, num_kv_heads=4)


def test_errors_name_the_argument():
  params = random_params(0, d_context=C)
  x = jnp.ones((T, D))
  with pytest.raises(ValueError, match=r"x must have shape \(T, D\) with D = 10"):
    multi_head_attention(params, jnp.ones((T, D + 1)), jnp.ones((S, C)))
  with pytest.raises(ValueError, match=r"context must have shape \(S, C\) and C = 9"):
    multi_head_attention(params, x, jnp.ones((S, D)))
  with pytest.raises(ValueError, match="positions are only used by RoPE"):
    multi_head_attention(params, x, jnp.ones((S, C)), positions=jnp.arange(T))
  with pytest.raises(ValueError, match=r"positions must have shape \(5,\)"):
    multi_head_attention(params, x, jnp.ones((S, C)), rope=RopeConfig(), positions=jnp.arange(S))
  with pytest.raises(ValueError, match="rotary dim must be even and at most the head dim H = 8; got 10"):
    multi_head_attention(params, x, jnp.ones((S, C)), rope=RopeConfig(rotary_dim=10))
  with pytest.raises(ValueError, match="qk_norm_type must be"):
    multi_head_attention(params, x, jnp.ones((S, C)), qk_norm_type="batch_norm")
  with pytest.raises(ValueError, match="key_value_seq_lengths must be a scalar"):
    multi_head_attention(params, x, jnp.ones((S, C)), key_value_seq_lengths=jnp.array([1, 2]))
  with pytest.raises(TypeError, match="x must have a floating point dtype"):
    multi_head_attention(params, jnp.ones((T, D), jnp.int32), jnp.ones((S, C)))
  bad = params._replace(b_key=jnp.ones((N, H)))
  with pytest.raises(ValueError, match=r"params.b_key must have shape \(3, 8\)"):
    multi_head_attention(bad, x, jnp.ones((S, C)))


def test_numpy_savez_round_trip(tmp_path):
  params = random_params(11, qk_norm=True, use_bias=False)
  path = tmp_path / "mha.npz"
  np.savez(path, **{k: np.asarray(v) for k, v in params._asdict().items() if v is not None})
  with np.load(path) as f:
    loaded = MultiHeadParams(**{k: jnp.asarray(f[k]) for k in f.files})
  assert loaded.b_query is None and loaded.query_norm_scale is not None
  chex.assert_trees_all_equal(loaded, params)
  x = _batch(12, (T, D))
  chex.assert_trees_all_equal(multi_head_attention(loaded, x), multi_head_attention(params, x))


def test_constructors_and_layer_refuse_nonsense():
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="init_self_attention: d_model must be a positive int; got -4"):
    init_self_attention(key, -4, 4)
  with pytest.raises(TypeError, match="init_self_attention: dtype must be a floating point dtype; got int32"):
    init_self_attention(key, 4, 4, dtype=jnp.int32)
  with pytest.raises(TypeError, match="init_multi_head_attention: param_dtype must be a floating point dtype; got int32"):
    init_multi_head_attention(key, d_model=D, num_heads=N, head_dim=H, param_dtype=jnp.int32)
  params = random_params(1)
  x = jnp.ones((T, D))
  with pytest.raises(ValueError, match="multi_head_attention: qk_norm_epsilon must be a finite positive number; got -1"):
    multi_head_attention(params, x, qk_norm_epsilon=-1)


def test_layer_errors_name_the_layer_and_its_shapes():
  params = random_params(2, d_context=C)
  x, ctx = jnp.ones((T, D)), jnp.ones((S, C))
  cases = [
      (dict(bias=jnp.ones((N, T, S + 1))), ValueError, r"multi_head_attention: bias must broadcast to \(N, T, S\) = \(6, 5, 7\); got \(6, 5, 8\)"),
      (dict(mask=jnp.ones((T, S))), TypeError, "multi_head_attention: mask must be boolean"),
      (dict(query_segment_ids=jnp.zeros(T + 1, jnp.int32), key_value_segment_ids=jnp.zeros(S, jnp.int32)), ValueError, r"multi_head_attention: query_segment_ids must have shape \(T,\) = \(5,\); got \(6,\)"),
      (dict(local_window_size=(2, -1)), ValueError, r"multi_head_attention: local_window_size sides must be non-negative ints or None; got \(2, -1\)"),
      (dict(logits_soft_cap=float("inf")), ValueError, "multi_head_attention: logits_soft_cap must be finite"),
      (dict(scale=float("nan")), ValueError, "multi_head_attention: scale must be a finite number"),
      (dict(dropout_rate=1.5), ValueError, r"multi_head_attention: dropout_rate must be in \[0, 1\)"),
      (dict(implementation="fast"), ValueError, "multi_head_attention: implementation must be None or one of"),
      (dict(causal_alignment="left"), ValueError, "multi_head_attention: causal_alignment must be"),
  ]
  for kwargs, error, message in cases:
    with pytest.raises(error, match=message):
      multi_head_attention(params, x, ctx, **kwargs)
  with pytest.raises(ValueError, match=r"multi_head_attention: bias must broadcast to \(B, N, T, S\) = \(2, 6, 5, 7\)"):
    multi_head_attention(params, jnp.ones((B, T, D)), jnp.ones((B, S, C)), bias=jnp.ones((3, N, T, S)))
  with pytest.raises(ValueError, match=r"multi_head_attention: key_value_seq_lengths must have shape \(B,\) = \(2,\) "
                                       r"for x of shape \(B, T, D\); got shape \(3,\)"):
    multi_head_attention(params, jnp.ones((B, T, D)), jnp.ones((B, S, C)),
                         key_value_seq_lengths=jnp.ones(3, jnp.int32))


def test_odd_head_dim_with_partial_rope_is_relative():
  # H = 7: RoPE must rotate an even part; shifting every position changes nothing.
  params = init_multi_head_attention(jax.random.key(3), d_model=D, num_heads=2, head_dim=7)
  x = jnp.asarray(np.random.default_rng(3).normal(size=(T, D)), jnp.float32)
  f = jax.jit(lambda x, p0: multi_head_attention(params, x, is_causal=True, rope=RopeConfig(rotary_dim=6),
                                                  positions=jnp.arange(T) + p0))
  np.testing.assert_allclose(f(x, 0), f(x, 11), atol=2e-5)
  with pytest.raises(ValueError, match="rotary dim must be even and at most the head dim H = 7; got 7"):
    multi_head_attention(params, x, rope=RopeConfig())


def test_padding_garbage_never_reaches_parameter_gradients():
  """NaN/inf in x and context rows past the lengths: outputs and every gradient
  (parameters included) equal those with zeros there."""
  p = random_params(21, d_context=C)
  rng = np.random.default_rng(21)
  x, ctx = rng.normal(size=(B, T, D)), rng.normal(size=(B, S, C))
  q_len, kv_len = np.array([3, T]), np.array([S - 2, 4])
  clean_x = np.where(np.arange(T)[None, :, None] < q_len[:, None, None], x, 0.0)
  clean_c = np.where(np.arange(S)[None, :, None] < kv_len[:, None, None], ctx, 0.0)
  dirty_x = np.where(np.arange(T)[None, :, None] < q_len[:, None, None], x, np.nan)
  dirty_c = np.where(np.arange(S)[None, :, None] < kv_len[:, None, None], ctx, np.inf)

  def loss(p, x, c):
    y = multi_head_attention(p, x, c, query_seq_lengths=q_len, key_value_seq_lengths=kv_len)
    return jnp.sum(y * y), y

  f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
  (_, y_clean), g_clean = f(p, jnp.asarray(clean_x, jnp.float32), jnp.asarray(clean_c, jnp.float32))
  (_, y_dirty), g_dirty = f(p, jnp.asarray(dirty_x, jnp.float32), jnp.asarray(dirty_c, jnp.float32))
  chex.assert_tree_all_finite((y_dirty, g_dirty))
  chex.assert_trees_all_close((y_dirty, g_dirty), (y_clean, g_clean), atol=0, rtol=0)


def test_mask_and_score_functions_and_the_residual_pass_through():
  p = random_params(22)
  x = jnp.asarray(np.random.default_rng(22).normal(size=(T, D)), jnp.float32)
  slopes = jaxattn.scores.alibi_slopes(N)
  alibi_bias = -slopes[:, None, None] * jnp.abs(jnp.arange(T)[:, None] - jnp.arange(T)[None, :])[None]
  got, lse = multi_head_attention(p, x, mask_fn=jaxattn.masks.causal(),
                                  score_fn=jaxattn.scores.alibi(slopes), return_residual=True)
  want, want_lse = multi_head_attention(p, x, is_causal=True, bias=alibi_bias, return_residual=True)
  assert lse.shape == (T, N)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(lse, want_lse, atol=1e-5, rtol=1e-5)
  with pytest.raises(TypeError, match="multi_head_attention: mask_fn must be a jaxattn.masks.Mask"):
    multi_head_attention(p, x, mask_fn=3)


def test_lengths_as_lists_and_wide_host_ints():
  p = random_params(23)
  x = jnp.asarray(np.random.default_rng(23).normal(size=(B, T, D)), jnp.float32)
  want = multi_head_attention(p, x, key_value_seq_lengths=jnp.array([3, T]))
  np.testing.assert_array_equal(multi_head_attention(p, x, key_value_seq_lengths=[3, T]), want)
  # 2**32 + 3 means "all of it" (jax, x64 off, would wrap it to 3).
  np.testing.assert_array_equal(
      multi_head_attention(p, x, key_value_seq_lengths=np.array([3, 2**32 + 3], np.int64)), want)
