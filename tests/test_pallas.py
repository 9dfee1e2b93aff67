"""implementation="pallas": the kernels in interpret mode on CPU, and their lowering for GPU.

Interpret mode runs the same kernel source as a GPU would, so values,
gradients and every mask kind are checked here against the float64
reference. Compiling and running them on a GPU is bench/gpu.sh's job; what
CPU can check of that is the lowering to Triton IR, done below.
"""

import contextlib
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

import jaxattn
from jaxattn import masks as jm
from jaxattn import scores, testing
from jaxattn._impl import common, pallas

from attention_base import (check_against_reference, B, GRID_NAMES, N, S, AttentionTestBase, jax_nn_cases, option_grid,
                            slow_unless)

# jax.nn parity on a subset (each case compiles the three kernels in interpret
# mode, seconds each on 2 cores); the float64 grid above it covers every option.
JAX_NN_SUBSET = ["plain", "causal_window", "bias_and_mask", "both_lengths_causal"]
PALLAS_FAST = ("plain", "causal_bottom_right", "window_left_only_br", "bias_bcast_batch_q",
               "mask_bcast", "both_lengths_causal", "segments", "soft_cap", "dropout", "everything")


ON_CPU = jax.default_backend() == "cpu"


class TestPallasSmallBlocks(AttentionTestBase):
  """Blocks that do not divide T or S, so every path (pad, partial, full, skip) runs.

  On a GPU the kernels are compiled and need blocks of 16 or more: one block,
  padded, per side at these sizes (bench/gpu.sh runs this file there).
  """
  implementation = "pallas"
  block_sizes = (2, 3) if ON_CPU else (16, 16)

  @pytest.mark.parametrize("name,layout", jax_nn_cases(JAX_NN_SUBSET, tnh_fast=("plain",)))
  def test_matches_jax_nn(self, name, layout):
    super().test_matches_jax_nn(name, layout)

  # Interpret mode compiles the three kernels per case (the heaviest tests): the default set
  # takes options that each reach different kernel code; `-m slow` runs the whole grid.
  @pytest.mark.parametrize("name", slow_unless(GRID_NAMES, PALLAS_FAST))
  def test_matches_float64_reference_values_and_gradients(self, name):
    super().test_matches_float64_reference_values_and_gradients(name)


def _normalized(q, k, v, bias=None, mask=None, **kw):
  return jaxattn.attention.normalize(q, k, v, bias, mask, **kw)[:2]


GPU_LAYOUT_CASES = {
    "causal": dict(is_causal=True),
    "segments_lengths_bias": dict(query_segment_ids="q_seg", key_value_segment_ids="kv_seg",
                                  key_value_seq_lengths="kv_len", bias="bias_bcast_heads"),
    "mask_softcap_dropout": dict(mask="mask_full", logits_soft_cap=2.0, dropout_rate=0.2,
                                 dropout_key=jax.random.key(5)),
}


@pytest.mark.parametrize("name", slow_unless(list(GPU_LAYOUT_CASES), ("segments_lengths_bias", "mask_softcap_dropout")))
def test_gpu_layout_in_interpret_mode(name):
  """The padding the compiled kernels use: G = 3 -> 4 dummy-row groups, H = 11 -> 16,
  16-row and 16-key blocks over T = 5, S = 7."""
  grid = option_grid(jax.random.key(1))
  arrays = {"q_seg": grid["segments"]["query_segment_ids"],
            "kv_seg": grid["segments"]["key_value_segment_ids"],
            "kv_len": grid["kv_lengths"]["key_value_seq_lengths"],
            "bias_bcast_heads": grid["bias_bcast_heads"]["bias"], "mask_full": grid["mask_full"]["mask"]}
  kw = {k: arrays.get(v, v) if isinstance(v, str) else v for k, v in GPU_LAYOUT_CASES[name].items()}
  bias, mask = kw.pop("bias", None), kw.pop("mask", None)
  q, k, v = testing.random_qkv(jax.random.key(0), N=6, K=2)

  def attend(q, k, v, bias):
    inputs, config = _normalized(q, k, v, bias, mask, **kw)
    return pallas.pallas_attention(inputs, config, block_sizes=(4, 16), interpret=True, gpu_layout=True)

  check_against_reference(attend, q, k, v, bias, mask, kw)


def test_mask_fn_and_score_fn_holding_and_closing_over_arrays():
  """A user mask closing over an array and an ALiBi modifier: arrays become kernel inputs;
  ALiBi's slopes get gradients through the kernels."""
  q, k, v = testing.random_qkv(jax.random.key(3))
  doc = jnp.array([[0, 0, 1, 1, 1, 2, 2], [0, 1, 1, 1, 1, 1, 1]], jnp.int32)
  mask_fn = lambda b, h, qi, ki: doc[b, qi] == doc[b, ki]  # T=5 <= S=7: qi indexes doc too
  slopes = jnp.linspace(0.1, 0.6, N)
  kw = dict(mask_fn=mask_fn, is_causal=True)

  def loss(q, k, v, slopes, implementation):
    if implementation == "xla":
      out = jaxattn.dot_product_attention(q, k, v, score_fn=scores.alibi(slopes), implementation="xla", **kw)
    else:  # interpret mode everywhere: compiled kernels refuse these (see the next test)
      inputs, config = _normalized(q, k, v, score_fn=scores.alibi(slopes), **kw)
      out = pallas.pallas_attention(inputs, config, block_sizes=(2, 3), interpret=True)[0]
    return jnp.sum(jnp.sin(out))

  ours = jax.grad(loss, (0, 1, 2, 3))(q, k, v, slopes, "pallas")
  theirs = jax.grad(loss, (0, 1, 2, 3))(q, k, v, slopes, "xla")
  testing.assert_attention_close(ours, theirs)
  chex.assert_tree_all_finite(ours)


def test_compiled_kernels_refuse_what_triton_cannot_lower():
  q, k, v = testing.random_qkv(jax.random.key(4))
  doc = jnp.zeros((B, S), jnp.int32)
  cases = {
      "closes over arrays": dict(mask_fn=lambda b, h, qi, ki: doc[b, ki] == 0),
      "holding arrays": dict(score_fn=scores.alibi(jnp.ones((N,)))),
  }
  for reason, kw in cases.items():
    inputs, config = _normalized(q, k, v, **kw)
    with pytest.raises(NotImplementedError, match=reason):
      pallas.pallas_attention(inputs, config, interpret=False, backend="gpu")
    assert reason in pallas.unsupported_reason(inputs, config, interpret=False, backend="gpu")
    assert pallas.unsupported_reason(inputs, config, interpret=True) is None
  inputs, config = _normalized(q, k, v)
  with pytest.raises(NotImplementedError, match="powers of 2"):
    pallas.pallas_attention(inputs, config, interpret=False, backend="gpu", block_sizes=(2, 3))
  with pytest.raises(NotImplementedError, match="TPU"):
    pallas.pallas_attention(inputs, config, interpret=False, backend="tpu")


def _abstract_gpu():
  """A context naming an abstract NVIDIA GPU as the lowering target.

  jax >= 0.11 asks Pallas' Triton lowering for a GPU to read its compute
  capability from; on a CPU-only machine that is an abstract device on an
  abstract mesh (public `jax.sharding` API). Older jax lowers without one.
  """
  if not hasattr(jax.sharding, "AbstractDevice"):
    return contextlib.nullcontext()
  device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="cuda")
  mesh = jax.sharding.AbstractMesh((1,), ("gpu",), abstract_device=device)
  return jax.sharding.use_abstract_mesh(mesh)


@pytest.mark.parametrize("kw", [
    dict(is_causal=True),
    dict(query_segment_ids="segments", key_value_seq_lengths="lengths", bias="bias", mask="mask",
         logits_soft_cap=30.0, local_window_size=(64, 0), dropout_rate=0.1, dropout_key=jax.random.key(1)),
], ids=["causal", "everything"])
def test_kernels_lower_to_triton_for_gpu(kw):
  """The compiled path lowers to Triton IR on a CPU-only machine (compiling it needs a GPU)."""
  q, k, v = testing.random_qkv(jax.random.key(0), B=2, T=128, S=128, N=4, K=2, H=64, dtype=jnp.bfloat16)
  arrays = {"segments": jnp.zeros((2, 128), jnp.int32), "lengths": jnp.array([100, 128], jnp.int32),
            "bias": jnp.zeros((1, 4, 128, 128), jnp.bfloat16), "mask": jnp.ones((2, 1, 128, 128), bool)}
  kw = {key: arrays.get(val, val) if isinstance(val, str) else val for key, val in kw.items()}
  bias, mask = kw.pop("bias", None), kw.pop("mask", None)

  def attend(q, k, v, bias):
    inputs, config = _normalized(q, k, v, bias, mask, **kw)
    return pallas.pallas_attention(inputs, config, interpret=False, backend="gpu")

  def f(q, k, v, bias):
    out, vjp = jax.vjp(attend, q, k, v, bias)
    return out, vjp(out)

  with _abstract_gpu():
    text = jax.jit(f).trace(q, k, v, bias).lower(lowering_platforms=("cuda",)).as_text()
  kernels = re.findall(r"custom_call @__gpu\$xla\.gpu\.triton", text)
  assert len(kernels) == 3, "forward, dK/dV and dQ kernels"


def test_per_query_bias_and_scalar_mask_params_lower_for_gpu_at_non_power_of_two_lengths():
  """T = 192 (three query blocks): the dbias block (Tp, Gb, bk) is zeroed tile by tile,
  since Triton lowers power-of-two arrays only; a mask holding a 0-d array (a traced
  prefix length) is called on its loaded value, not on the kernel's Ref."""
  q, k, v = testing.random_qkv(jax.random.key(0), B=2, T=192, S=192, N=4, K=2, H=64, dtype=jnp.bfloat16)
  bias = testing.random_normal(jax.random.key(1), (2, 4, 192, 192)).astype(jnp.bfloat16)

  def f(q, k, v, bias, prefix):
    def attend(q, k, v, bias):
      inputs, config = _normalized(q, k, v, bias, mask_fn=jm.prefix_lm(prefix))
      return pallas.pallas_attention(inputs, config, interpret=False, backend="gpu")
    out, vjp = jax.vjp(attend, q, k, v, bias)
    return out, vjp(out)

  prefix = jnp.int32(5)
  with _abstract_gpu():
    text = jax.jit(f).trace(q, k, v, bias, prefix).lower(lowering_platforms=("cuda",)).as_text()
  assert len(re.findall(r"custom_call @__gpu\$xla\.gpu\.triton", text)) == 3


def _abstract_gpus(n):
  """An abstract mesh of n NVIDIA GPUs, one Auto axis "d" (for shard_map lowered on CPU)."""
  device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="cuda")
  return jax.sharding.AbstractMesh((n,), ("d",), axis_types=(jax.sharding.AxisType.Auto,),
                                   abstract_device=device)


@pytest.mark.skipif(not hasattr(jax.sharding, "AbstractDevice"), reason="needs jax.sharding.AbstractDevice")
def test_compiled_kernels_lower_inside_shard_map_with_a_bias_from_outside():
  """Inside `shard_map` (check_vma on, its default) pallas_call needs its
  outputs' varying mesh axes stated (it raised ValueError: "manual_axis_type
  ... must not be None"), and a bias from outside the shard_map gets
  per-device gradients from the kernels, which the custom VJP must sum over
  the devices (it raised a manual-axis type mismatch; the operands are cast
  alike first, `common.vary_alike`, as `dot_product_attention` does). Forward and backward
  lower for 4 GPUs on this CPU; the bias gradient's psum is outside the kernels."""
  mesh = _abstract_gpus(4)
  q, k, v = testing.random_qkv(jax.random.key(0), B=4, T=128, S=128, N=4, K=2, H=64, dtype=jnp.bfloat16)
  bias = testing.random_normal(jax.random.key(1), (1, 4, 128, 128)).astype(jnp.bfloat16)
  lengths = jnp.array([128, 100, 60, 7], jnp.int32)

  def loss(bias, q, k, v, lengths):
    def per_device(q, k, v, lengths):
      inputs, config = _normalized(q, k, v, bias, is_causal=True, key_value_seq_lengths=lengths)
      inputs = common.vary_alike(inputs)  # as dot_product_attention does before any implementation
      return pallas.pallas_attention(inputs, config, interpret=False, backend="gpu")[0]
    out = jax.shard_map(per_device, mesh=mesh, in_specs=(PartitionSpec("d"),) * 4,
                        out_specs=PartitionSpec("d"))(q, k, v, lengths)
    return jnp.sum(out.astype(jnp.float32))

  with jax.sharding.use_abstract_mesh(mesh):
    text = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(bias, q, k, v, lengths).lower(
        lowering_platforms=("cuda",)).as_text()
  assert len(re.findall(r"custom_call @__gpu\$xla\.gpu\.triton", text)) == 3
  assert "all_reduce" in text  # the bias gradient, summed over the devices once


def test_block_map_skips_and_spares_mask_work():
  """Causal, 4 x 4 blocks of 16: the upper triangle is skipped, the diagonal masked, the rest full.
  Under jit too (block indices as iota miscompile on XLA:CPU, see pallas.block_map)."""
  q, k, v = testing.random_qkv(jax.random.key(0), T=64, S=64)
  inputs, config = _normalized(q, k, v, is_causal=True)
  p = pallas._make_plan(inputs, config, (16, 16), True)
  want = np.tril(np.full((4, 4), 2)) - np.eye(4, dtype=int)
  np.testing.assert_array_equal(pallas.block_map(inputs, p), want)
  # bottom-right causal with padded blocks: the block that XLA:CPU got wrong
  q, k, v = testing.random_qkv(jax.random.key(0))
  inputs, config = _normalized(q, k, v, is_causal=True, causal_alignment="bottom_right")
  p = pallas._make_plan(inputs, config, (2, 3), True)
  got = jax.jit(lambda i: pallas.block_map(i, p))(inputs)
  np.testing.assert_array_equal(got, [[2, 1, 0], [2, 1, 0], [1, 1, 1]])


@pytest.mark.skipif(not ON_CPU, reason="about dispatch on CPU")
def test_dispatch_never_picks_pallas_on_cpu():
  q, k, v = testing.random_qkv(jax.random.key(0), T=512, S=512, N=2, K=2, H=8)
  inputs, config = _normalized(q, k, v, is_causal=True)
  assert jaxattn.attention.choose_implementation(inputs, config) != "pallas"


@pytest.mark.skipif(ON_CPU, reason="compiled kernels need a GPU; bench/gpu.sh runs this there")
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_compiled_on_gpu_matches_xla(dtype):
  """Triton-compiled kernels at a size with many blocks (GQA, causal, segments, lengths)."""
  q, k, v = testing.random_qkv(jax.random.key(0), B=2, T=1000, S=1000, N=8, K=2, H=128, dtype=dtype)
  seg = jnp.repeat(jnp.arange(4, dtype=jnp.int32), 250)[None].repeat(2, 0)
  kw = dict(is_causal=True, query_segment_ids=seg, key_value_seq_lengths=jnp.array([1000, 700], jnp.int32))
  do = testing.random_normal(jax.random.key(1), q.shape, jnp.float32).astype(dtype)

  def run(implementation):
    f = lambda q, k, v: jaxattn.dot_product_attention(q, k, v, implementation=implementation, **kw)
    out, vjp = jax.vjp(f, q, k, v)
    return (out,) + vjp(do)

  text = jax.jit(lambda q, k, v: jaxattn.dot_product_attention(q, k, v, implementation="pallas", **kw)
                 ).lower(q, k, v).as_text()
  assert "triton" in text  # compiled, not interpreted
  ours, theirs = jax.jit(lambda: run("pallas"))(), jax.jit(lambda: run("xla"))()
  # relative to each result's largest entry: summation order differs, and XLA's
  # float32 dots may use TF32 on the GPU where Triton's use IEEE float32
  tol = 2e-2 if dtype == jnp.bfloat16 else 5e-3
  for name, a, b in zip(("out", "dq", "dk", "dv"), ours, theirs):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.abs(a - b).max() <= tol * np.abs(b).max(), name
