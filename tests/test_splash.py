"""implementation="splash": JAX's TPU splash attention in Pallas' TPU interpret mode on CPU.

Off TPU, `implementation="splash"` runs the kernel in interpret mode: the
same kernel source a TPU compiles, so values, lse and gradients are checked
here against the float64 reference. Each case compiles splash's forward and
backward kernels in interpret mode (seconds each on 2 cores), so the default
run keeps a representative subset of the shared base; `-m slow` (or
JAXATTN_RUN_SLOW=1) runs all of it. Arguments splash cannot serve (bias, a
dense mask, dropout, score_fn, float16, ...) must raise NotImplementedError
naming the reason: those cases compile nothing and always run.
"""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn import masks, testing
from jaxattn._impl import splash

from attention_base import (check_against_reference, B, FEATURES, GRID_NAMES, JAX_NN_NAMES, N, S, T, AttentionTestBase,
                            features_of, option_grid)

slow = pytest.mark.slow

_NO_BIAS = "splash takes no bias"
_NO_MASK = "splash takes no dense mask array"
_NO_DROPOUT = "splash has no attention dropout"
SERVES = FEATURES - {"bias", "dense_mask", "dropout"}
# Grid entries of the shared base that splash refuses (cheap: the refusal comes at trace time).
REFUSED_GRID = {n for n, kw in option_grid(jax.random.key(0)).items() if features_of(kw) - SERVES}
# Served grid entries run by default (the rest behind -m slow): both causal
# alignments' machinery (a LocalMask with an offset), a two-sided window,
# lengths (as segment ids) and the caller's segment ids.
CI_GRID = ["causal_bottom_right", "both_lengths_causal", "segments"]
CI_JAX_NN = []  # jax.nn parity of served cases: -m slow (the float64 grid covers them)


def _grid_params(names, ci):
  return [pytest.param(n, marks=() if n in ci or n in REFUSED_GRID else slow) for n in names]


def _refusal(reason):
  return pytest.raises(NotImplementedError, match=re.escape(reason))


class TestSplash(AttentionTestBase):
  """The shared base through splash in interpret mode (T, S padded to one 128 block)."""
  implementation = "splash"
  serves = SERVES
  refusal_messages = {"bias": re.escape(_NO_BIAS), "dense_mask": re.escape(_NO_MASK),
                      "dropout": re.escape(_NO_DROPOUT)}

  @pytest.mark.parametrize("name", _grid_params(GRID_NAMES, CI_GRID))
  def test_matches_float64_reference_values_and_gradients(self, name):
    super().test_matches_float64_reference_values_and_gradients(name)

  @pytest.mark.parametrize("name,layout", [
      pytest.param(n, lay, marks=() if (n, lay) in CI_JAX_NN or (n in REFUSED_GRID and lay == "BTNH")
                   else slow)
      for n in JAX_NN_NAMES for lay in ("BTNH", "TNH")])
  def test_matches_jax_nn(self, name, layout):
    super().test_matches_jax_nn(name, layout)

  # GQA (N=6, K=3) runs in every grid case above; MQA takes splash's MQA kernel.
  @pytest.mark.parametrize("heads", [pytest.param((6, 6), marks=slow), pytest.param((6, 2), marks=slow),
                                     (6, 1)],
                           ids=["MHA", "GQA", "MQA"])
  def test_head_groupings(self, heads):
    super().test_head_groupings(heads)

  @pytest.mark.parametrize("sizes", [pytest.param(dict(T=1, S=9), marks=slow),
                                     pytest.param(dict(T=9, S=1), marks=slow),
                                     pytest.param(dict(T=1, S=1), marks=slow),
                                     pytest.param(dict(T=13, S=4), marks=slow)])
  def test_odd_sizes_and_decoding(self, sizes):
    super().test_odd_sizes_and_decoding(sizes)

  def test_fully_masked_rows_give_zero_and_finite_gradients(self):
    """The base's version uses a dense mask and a bias (refused); here rows are
    emptied by a zero key length, a segment id no key has and a static mask_fn."""
    q, k, v = self.qkv(seed=7)
    out, lse = _check_against_reference(
        q, k, v, key_value_seq_lengths=jnp.array([0, S], jnp.int32),
        query_segment_ids=jnp.zeros((B, T), jnp.int32).at[1, 3].set(9),
        key_value_segment_ids=jnp.zeros((B, S), jnp.int32),
        mask_fn=lambda b, h, qi, ki: (h != 2) | (qi != 1))  # head 2, row 1: no key
    assert np.all(np.asarray(out[0]) == 0) and np.all(np.asarray(lse[0]) == -np.inf)
    assert np.all(np.asarray(out[1, 3]) == 0) and np.all(np.asarray(lse[1, 3]) == -np.inf)
    assert np.all(np.asarray(out[1, 1, 2]) == 0) and np.asarray(lse[1, 1, 2]) == -np.inf

  @pytest.mark.parametrize("magnitude", [pytest.param(1e2, marks=slow), pytest.param(1e4, marks=slow)])
  def test_large_logits(self, magnitude):
    super().test_large_logits(magnitude)

  @pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
  def test_low_precision(self, dtype):
    """The base's version adds a bias (refused); splash takes bfloat16, not float16."""
    q, k, v = self.qkv(seed=9, dtype=dtype)
    if dtype == jnp.float16:
      with _refusal("splash takes float32 or bfloat16 inputs; got float16"):
        self.attend(q, k, v, is_causal=True)
      return
    out, lse = self.attend(q, k, v, is_causal=True, return_residual=True)
    assert out.dtype == dtype and lse.dtype == dtype
    ref, ref_lse = testing.reference_attention(q, k, v, is_causal=True, return_residual=True)
    testing.assert_attention_close(out, ref, dtype=dtype)
    testing.assert_attention_close(lse, ref_lse, dtype=dtype)
    g = jax.grad(lambda q: jnp.sum(self.attend(q, k, v, is_causal=True).astype(jnp.float32)))(q)
    assert g.dtype == dtype
    chex.assert_tree_all_finite(g)
    ref_g = testing.reference_attention_vjp(q, k, v, d_out=jnp.ones(out.shape, dtype), is_causal=True)
    testing.assert_attention_close(g, ref_g["query"], dtype=dtype)

  @slow
  def test_jit_and_vmap(self):
    super().test_jit_and_vmap()

  @slow
  def test_no_retrace_on_repeated_shapes(self):
    super().test_no_retrace_on_repeated_shapes()

  @slow
  def test_value_head_dim_may_differ(self):
    super().test_value_head_dim_may_differ()


def _check_against_reference(q, k, v, lse_cotangent=True, **kw):
  """Values, lse and gradients of splash vs float64.

  With `lse_cotangent`, the gradient includes a random lse cotangent (its
  share runs through chunked's backward: one more compile).
  """
  attend = lambda q, k, v, bias: jaxattn.dot_product_attention(
      q, k, v, bias, implementation="splash", return_residual=True, **kw)
  return check_against_reference(attend, q, k, v, kw=kw, lse_cotangent=lse_cotangent)[:2]


@slow
def test_soft_cap_with_window_and_mqa():
  q, k, v = testing.random_qkv(jax.random.key(11), B=B, T=T, S=S, N=4, K=1, H=11)
  _check_against_reference(q, k, v, lse_cotangent=False, logits_soft_cap=1.5,
                           local_window_size=(2, 1), scale=0.9)


def test_static_mask_functions_become_splash_masks():
  """A head-dependent function, chunked-local and a static prefix-LM, as one NumpyMask per head."""
  q, k, v = testing.random_qkv(jax.random.key(12), B=B, T=9, S=9, N=4, K=2, H=11)
  fn = masks.from_function(lambda b, h, qi, ki: (ki <= qi + h) | (ki == 0))
  _check_against_reference(q, k, v, lse_cotangent=False,
                           mask_fn=fn & (masks.chunked_local(4) | masks.prefix_lm(2)))


def test_several_blocks_with_an_empty_query_block_gqa_and_soft_cap():
  """T = 256 in two 128-row blocks against one key block, bottom-right causal:
  the first query block attends nothing (splash skips it); GQA 4 -> 2; soft-cap."""
  q, k, v = testing.random_qkv(jax.random.key(13), B=1, T=256, S=128, N=4, K=2, H=16)
  out, lse = _check_against_reference(q, k, v, is_causal=True, causal_alignment="bottom_right",
                                      logits_soft_cap=2.0, block_sizes=(128, 128))
  assert np.all(np.asarray(out[0, :128]) == 0) and np.all(np.asarray(lse[0, :128]) == -np.inf)


@slow
def test_sliding_window_over_several_blocks():
  q, k, v = testing.random_qkv(jax.random.key(14), B=1, T=384, S=384, N=2, K=1, H=16)
  _check_against_reference(q, k, v, local_window_size=(100, 0), block_sizes=(128, 128),
                           key_value_seq_lengths=jnp.array([300], jnp.int32))


def _normalized(dtype=jnp.float32, **kw):
  sizes = {n: kw.pop(n) for n in ("B", "T", "S", "N", "K", "H") if n in kw}
  dims = dict(B=B, T=T, S=S, N=N, K=3, H=11)
  dims.update(sizes)
  shape = lambda L, heads: (dims["B"], L, heads, dims["H"])
  q = jnp.ones(shape(dims["T"], dims["N"]), dtype)  # the checks read shapes and dtypes only
  k = v = jnp.ones(shape(dims["S"], dims["K"]), dtype)
  inputs, config, _ = jaxattn.attention.normalize(q, k, v, **kw)
  return inputs, config


SERVED = {
    "plain": dict(),
    "causal_bottom_right": dict(is_causal=True, causal_alignment="bottom_right"),
    "window": dict(local_window_size=(3, 1)),
    "lengths": dict(query_seq_lengths=jnp.array([3, 1], jnp.int32),
                    key_value_seq_lengths=jnp.array([0, 7], jnp.int32)),
    "segments": dict(query_segment_ids=jnp.zeros((B, T), jnp.int32),
                     key_value_segment_ids=jnp.ones((B, S), jnp.int32)),
    "soft_cap": dict(logits_soft_cap=5.0),
    "static_mask_fn": dict(mask_fn=masks.chunked_local(2) & masks.causal()),
    "bfloat16_mqa": dict(dtype=jnp.bfloat16, N=4, K=1),
}

REFUSED = {
    "bias": (dict(bias=jnp.zeros((1, N, T, S))), "splash takes no bias"),
    "mask": (dict(mask=jnp.ones((B, 1, T, S), bool)), "splash takes no dense mask array"),
    "score_fn": (dict(score_fn=lambda s, b, h, q, k: s * 2), "splash takes no score_fn"),
    "dropout": (dict(dropout_rate=0.1, dropout_key=jax.random.key(0)), "no attention dropout"),
    "float16": (dict(dtype=jnp.float16), "float32 or bfloat16 inputs; got float16"),
    "mask_fn_with_arrays": (dict(mask_fn=masks.padding(kv_lengths=jnp.array([3, 4]))),
                            "mask_fn only when it holds no arrays"),
    "mask_fn_per_batch": (dict(mask_fn=lambda b, h, q, k: (b == 0) | (k <= q)),
                          "depends on the batch index"),
}


@pytest.mark.parametrize("name", list(SERVED))
def test_served_arguments(name):
  inputs, config = _normalized(**SERVED[name])
  assert splash.unsupported_reason(inputs, config, backend="tpu") is None
  assert jaxattn.attention.choose_implementation(inputs, config, backend="tpu") == "splash"


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_arguments_name_the_reason(name):
  kw, reason = REFUSED[name]
  inputs, config = _normalized(**kw)
  got = splash.unsupported_reason(inputs, config, backend="tpu")
  assert got is not None and reason in got, got
  with _refusal(reason):
    splash.splash_attention(inputs, config)
  # Dispatch on TPU falls back to the portable implementations (small: xla).
  assert jaxattn.attention.choose_implementation(inputs, config, backend="tpu") == "xla"


def test_tpu_dispatch_falls_back_to_chunked_for_long_sequences():
  served, served_config = _normalized(T=256, S=256, is_causal=True)
  assert jaxattn.attention.choose_implementation(served, served_config, backend="tpu") == "splash"
  refused, refused_config = _normalized(T=256, S=256, is_causal=True, bias=jnp.zeros((1, 1, 256, 256)))
  assert jaxattn.attention.choose_implementation(refused, refused_config, backend="tpu") == "chunked"


def test_mask_fn_of_traced_values_is_refused_at_trace_time():
  q, k, v = testing.random_qkv(jax.random.key(0))

  @jax.jit
  def f(q, k, v, w):
    return jaxattn.dot_product_attention(q, k, v, mask_fn=lambda b, h, qi, ki: ki <= qi + w,
                                         implementation="splash")

  # The traced w is lifted into the function's params (dot_product_attention does that
  # for every implementation), so splash sees a mask holding an array and refuses it.
  with _refusal("a mask_fn only when it holds no arrays"):
    f(q, k, v, jnp.int32(1))


def test_lse_alone_is_differentiable():
  """Only the lse used (d_out a symbolic zero): its gradient through chunked's backward."""
  q, k, v = testing.random_qkv(jax.random.key(15), B=1, T=T, S=S, N=2, K=1, H=11)
  kw = dict(is_causal=True, causal_alignment="bottom_right", key_value_seq_lengths=jnp.array([4]))
  f = lambda q, k, v: jnp.sum(jnp.sin(jaxattn.dot_product_attention(
      q, k, v, implementation="splash", return_residual=True, **kw)[1]))
  grads = jax.grad(f, (0, 1, 2))(q, k, v)
  lse = testing.reference_attention(q, k, v, return_residual=True, **kw)[1]
  ref = testing.reference_attention_vjp(q, k, v, d_out=jnp.zeros((1, T, 2, 11)),
                                        d_lse=jnp.cos(lse), **kw)
  testing.assert_attention_close(grads, (ref["query"], ref["key"], ref["value"]))


@pytest.mark.parametrize("block_sizes", [(2, 3), (128, 64)])
def test_block_sizes_must_be_multiples_of_128(block_sizes):
  q, k, v = testing.random_qkv(jax.random.key(0))
  with _refusal("block_sizes that are multiples of 128"):
    jaxattn.dot_product_attention(q, k, v, implementation="splash", block_sizes=block_sizes)


def test_never_chosen_off_tpu():
  inputs, config = _normalized(is_causal=True)
  for backend in ("cpu", "gpu"):
    reason = splash.unsupported_reason(inputs, config, backend=backend)
    assert reason == f"splash is a TPU kernel; the backend is {backend}"
    assert jaxattn.attention.choose_implementation(inputs, config, backend=backend) != "splash"
  if jax.default_backend() != "tpu":
    assert jaxattn.attention.choose_implementation(inputs, config) != "splash"


def test_the_splash_kernel_is_what_runs_with_the_chosen_block_sizes():
  """The jaxpr holds splash's pallas_call, with the blocks given by block_sizes (or splash's defaults)."""
  q, k, v = testing.random_qkv(jax.random.key(0), B=1, T=200, S=300, N=2, K=1, H=16)
  f = lambda bs: str(jax.make_jaxpr(lambda q, k, v: jaxattn.dot_product_attention(
      q, k, v, is_causal=True, implementation="splash", block_sizes=bs))(q, k, v))
  default, custom = f(None), f((256, 128))
  assert "splash_mqa_fwd" in default and "splash_mqa_fwd" in custom
  assert '"block_q": 128, "block_kv": 128' in default
  assert '"block_q": 256, "block_kv": 128' in custom
  # T = 200 -> 256 and S = 300 -> 384: grid (heads, query blocks, key blocks), the
  # key axis shrunk by the causal block map to the 2 of 3 key blocks a query block needs.
  assert "grid=(2, 2, 2)" in default and "grid=(2, 1, 2)" in custom
  assert splash.default_block_sizes(200, 300) == (128, 128)
  assert splash.default_block_sizes(5, 7) == (128, 128)
