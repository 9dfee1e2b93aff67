"""implementation="cudnn": the fit checks, and the wrapper that keeps jaxattn's semantics.

cuDNN itself needs a CUDA GPU (bench/gpu.sh runs it there). On CPU the
wrapper around the call (row validity, masked rows 0, the lse gradient jax.nn
drops) runs with jax.nn's "xla" implementation standing in for cuDNN, against
the float64 reference.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn import masks, testing
from jaxattn._impl import cudnn

from attention_base import FEATURES, B, N, S, T, AttentionTestBase, option_grid, random_cotangents


def _normalize(dtype=jnp.bfloat16, **kw):
  sizes = {n: kw.pop(n) for n in ("B", "T", "S", "N", "K", "H") if n in kw}
  q, k, v = testing.random_qkv(jax.random.key(0), dtype=dtype, **{"H": 16, **sizes})
  if "Hv" in kw:
    v = v[..., :kw.pop("Hv")]
  inputs, config, _ = jaxattn.attention.normalize(q, k, v, **kw)
  return inputs, config


def test_on_cpu_it_raises_not_implemented_naming_the_backend():
  inputs, config = _normalize()
  if jax.default_backend() != "cpu":
    pytest.skip("checks the CPU message; other backends have their own")
  with pytest.raises(NotImplementedError, match="cudnn needs a CUDA GPU backend; the default backend is cpu"):
    cudnn.cudnn_attention(inputs, config)


SERVED = {
    "plain": dict(),
    "causal": dict(is_causal=True),
    "causal_window": dict(is_causal=True, local_window_size=(3, 2)),
    "left_window": dict(local_window_size=(2, 0)),
    "lengths": dict(query_seq_lengths=jnp.array([3, 1], jnp.int32), key_value_seq_lengths=jnp.array([0, 7], jnp.int32)),
    "bias_even": dict(T=6, S=8, bias=jnp.zeros((1, N, 6, 8), jnp.bfloat16)),
    "mask": dict(mask=jnp.ones((B, 1, T, S), bool)),
    "gqa_h256_hopper": dict(N=8, K=2, H=256),
}

REFUSED = {
    "float32": (dict(dtype=jnp.float32), "float16 or bfloat16 inputs; got float32"),
    "head_dim_not_multiple_of_8": (dict(H=12), "multiple of 8"),
    "value_head_dim": (dict(Hv=8), "Hv to equal H"),
    "dropout": (dict(dropout_rate=0.1, dropout_key=jax.random.key(0)), "dropout"),
    "segments": (dict(query_segment_ids=jnp.zeros((B, T), jnp.int32),
                      key_value_segment_ids=jnp.zeros((B, S), jnp.int32)), "segment ids"),
    "soft_cap": (dict(logits_soft_cap=5.0), "logits_soft_cap"),
    "mask_fn": (dict(mask_fn=masks.causal()), "mask_fn"),
    "score_fn": (dict(score_fn=lambda s, b, h, q, k: s), "score_fn"),
    "right_window": (dict(local_window_size=(2, 1)), "looks left only"),
    "bottom_right": (dict(is_causal=True, causal_alignment="bottom_right"), "top-left"),
    "empty_window_rows": (dict(T=9, S=3, local_window_size=(2, 0)), "no key in the window"),
    "bias_odd_lengths": (dict(bias=jnp.zeros((1, N, T, S), jnp.bfloat16)), "even T and S"),
}


@pytest.mark.parametrize("name", list(SERVED))
def test_served_arguments(name):
  inputs, config = _normalize(**SERVED[name])
  assert cudnn.unsupported_reason(inputs, config, backend="gpu", compute_capability="9.0") is None


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_arguments_name_the_reason(name):
  kw, reason = REFUSED[name]
  inputs, config = _normalize(**kw)
  got = cudnn.unsupported_reason(inputs, config, backend="gpu", compute_capability="9.0")
  assert got is not None and reason in got, got


def test_head_dim_limit_depends_on_the_gpu():
  inputs, config = _normalize(H=192)
  assert cudnn.unsupported_reason(inputs, config, backend="gpu", compute_capability="9.0") is None
  got = cudnn.unsupported_reason(inputs, config, backend="gpu", compute_capability="8.0")
  assert "<= 128" in got


# The names of the shared option grid that cuDNN serves (at even T and S for a bias).
STAND_IN_NAMES = ["plain", "scale", "causal", "causal_window", "bias_full", "bias_bcast_heads",
                  "bias_bcast_batch_q", "mask_full", "mask_bcast", "bias_and_mask", "q_lengths",
                  "kv_lengths", "both_lengths_causal"]


def _stand_in(q, k, v, bias=None, mask=None, **kw):
  inputs, config, _ = jaxattn.attention.normalize(q, k, v, bias, mask, **kw)
  return cudnn.attention(inputs, config, kernel="xla")


@pytest.mark.parametrize("name", STAND_IN_NAMES)
def test_wrapper_matches_float64_reference_with_xla_standing_in(name):
  q, k, v = testing.random_qkv(jax.random.key(0), H=16)
  kw = dict(option_grid(jax.random.key(1))[name])
  bias, mask = kw.pop("bias", None), kw.pop("mask", None)
  inputs, config, _ = jaxattn.attention.normalize(
      q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), bias, mask, **kw)
  reason = cudnn.unsupported_reason(inputs, config, backend="gpu", compute_capability="9.0")
  assert reason is None or "even T and S" in reason, reason

  (out, lse), vjp = jax.vjp(lambda q, k, v, bias: _stand_in(q, k, v, bias, mask, **kw), q, k, v, bias)
  ref_out, ref_lse = testing.reference_attention(q, k, v, bias, mask, return_residual=True, **kw)
  testing.assert_attention_close(out, ref_out)
  testing.assert_attention_close(lse, ref_lse)
  do, dl = random_cotangents(jax.random.key(2), out, lse)
  grads = vjp((do, dl))  # dl: the lse share jax.nn's cuDNN rule drops
  ref = testing.reference_attention_vjp(q, k, v, bias, mask, d_out=do, d_lse=dl, **kw)
  testing.assert_attention_close(grads[:3], (ref["query"], ref["key"], ref["value"]))
  if bias is not None:
    testing.assert_attention_close(grads[3], ref["bias"])


def test_wrapper_zeroes_rows_with_no_key_and_keeps_gradients_finite():
  q, k, v = testing.random_qkv(jax.random.key(7))
  mask = jnp.ones((B, N, T, S), bool).at[0, :, 1].set(False).at[1, 2].set(False)
  bias = jnp.zeros((B, N, T, S)).at[1, 0, 3].set(-jnp.inf)
  kv_len = jnp.array([0, S], jnp.int32)

  def loss(q, k, v, bias):
    out, lse = _stand_in(q, k, v, bias, mask, key_value_seq_lengths=kv_len)
    return jnp.sum(out * out) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0)), (out, lse)

  grads, (out, lse) = jax.grad(loss, (0, 1, 2, 3), has_aux=True)(q, k, v, bias)
  assert np.all(np.asarray(out[0]) == 0) and np.all(np.asarray(lse[0]) == -np.inf)
  assert np.all(np.asarray(out[1, :, 2]) == 0)
  assert np.all(np.asarray(out[1, 3, 0]) == 0)
  chex.assert_tree_all_finite(grads)
  testing.assert_attention_close(out, testing.reference_attention(q, k, v, bias, mask, key_value_seq_lengths=kv_len))


@pytest.mark.skipif(cudnn.unsupported_reason(*_normalize(H=64, T=256, S=256)) is not None,
                    reason="needs a CUDA GPU with cuDNN; bench/gpu.sh runs this there")
def test_cudnn_on_gpu_matches_xla():
  q, k, v = testing.random_qkv(jax.random.key(0), B=2, T=256, S=256, N=8, K=2, H=64, dtype=jnp.bfloat16)
  kw = dict(is_causal=True, local_window_size=(100, 0), key_value_seq_lengths=jnp.array([256, 0], jnp.int32))

  def run(implementation):
    def f(q, k, v):
      inputs, config, _ = jaxattn.attention.normalize(q, k, v, **kw)
      if implementation == "cudnn":
        return cudnn.cudnn_attention(inputs, config)
      return jaxattn._impl.get("xla")(inputs, config)
    (out, lse), vjp = jax.vjp(f, q, k, v)
    do, dl = random_cotangents(jax.random.key(2), out, lse)
    return (out, lse) + vjp((do, dl))

  ours, theirs = jax.jit(lambda: run("cudnn"))(), jax.jit(lambda: run("xla"))()
  assert np.all(np.asarray(ours[0][1]) == 0) and np.all(np.asarray(ours[1][1]) == -np.inf)
  for a, b in zip(ours, theirs):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_array_equal(np.isfinite(a), np.isfinite(b))
    np.testing.assert_allclose(a[np.isfinite(a)], b[np.isfinite(b)], atol=5e-2, rtol=2e-2)


class TestCudnnSharedBase(AttentionTestBase):
  """The shared base through cuDNN, on a CUDA GPU only (skipped elsewhere): bf16
  (fp16 where the base asks for it), H = 16. Unserved features must be refused
  with NotImplementedError; a bias needs even T and S, which the base's T = 5
  is not, so bias cases are refusals here (test_wrapper_* above cover bias)."""
  implementation = "cudnn"
  backend = "gpu"
  serves = FEATURES - {"bias", "dropout", "soft_cap", "segment_ids", "window_right", "bottom_right",
                       "value_head_dim", "float32"}

  def qkv(self, seed=0, dtype=jnp.float32, **sizes):
    dtype = jnp.float16 if dtype == jnp.float16 else jnp.bfloat16
    return super().qkv(seed=seed, dtype=dtype, **{"H": 16, **sizes})
