"""implementation="mosaic": the Mosaic GPU kernel in Pallas' GPU interpreter, and its CUDA lowering.

No GPU runs here. What CPU checks:
- Executed (jax >= 0.11, Python 3.12 here): the kernel's whole source in
  Pallas' GPU interpreter (`plgpu.InterpretGPUParams`): TMA copies into
  swizzled SMEM with barriers, the two-slot K/V prefetch, both wgmmas, the
  iota/segment masks, block lists, exp2 softmax, lse - values, lse and
  gradients against the float64 reference.
- Lowered, not executed (both jax versions): the compiled kernel through the
  Mosaic GPU lowering for CUDA (`.lower(lowering_platforms=("cuda",))`),
  which runs layout inference (a register layout that does not fit fails
  here).
- Not checked anywhere on CPU: compiling that module to PTX/SASS (ptxas),
  running it on a GPU, and its speed; bench/gpu.sh does those on a GPU.
  The interpreter also does not model wgmma asynchrony (it completes each
  wgmma at once) or the register layouts (values are kept logically).
- jax 0.10 (Python 3.11) has no GPU interpreter: the interpreted tests skip
  there with that reason; the lowering tests run.

The shared test base (bf16/fp16, H = 64, the features the kernel serves)
runs with `-m slow`: every case runs the interpreter (seconds each).
"""

import dataclasses
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn import masks, testing
from jaxattn._impl import mosaic

from attention_base import FEATURES, AttentionTestBase, random_cotangents

INTERPRETER = mosaic.interpreter_available()
needs_interpreter = pytest.mark.skipif(
    not INTERPRETER or jax.default_backend() != "cpu",
    reason=f"Pallas' GPU interpreter (plgpu.InterpretGPUParams) needs jax >= 0.11 on CPU; "
           f"this is jax {jax.__version__} on {jax.default_backend()}")


def _normalized(q, k, v, **kw):
  return jaxattn.attention.normalize(q, k, v, **kw)[:2]


# ---------------------------------------------------------------------------
# Executed in the GPU interpreter: values, lse and gradients vs float64.

def _segments(key, B, L):
  return testing.random_segment_ids(key, B, L)


CASES = {
    # G = 2 query heads per key/value head folded into the rows.
    "causal_gqa": (dict(B=2, T=5, S=7, N=6, K=3), dict(is_causal=True)),
    # Lengths leave whole rows (query length) and a whole batch (key length 0) empty.
    "bottom_right_lengths": (dict(B=2, T=5, S=7, N=2, K=2),
                             dict(is_causal=True, causal_alignment="bottom_right",
                                  query_seq_lengths=jnp.array([5, 2], jnp.int32),
                                  key_value_seq_lengths=jnp.array([0, 6], jnp.int32))),
    "window_softcap": (dict(B=1, T=6, S=9, N=2, K=1), dict(local_window_size=(2, 1), logits_soft_cap=1.5)),
    "segments": (dict(B=2, T=6, S=6, N=2, K=2), dict(query_segment_ids="seg", is_causal=True)),
    # Full blocks (no mask arithmetic) before partial ones, padded last blocks.
    "causal_full_blocks": (dict(B=1, T=150, S=150, N=1, K=1), dict(is_causal=True)),
    # Documents of 128 and 22: query block 1 x key block 0 lies in one document (full).
    "documents_full_blocks": (dict(B=1, T=150, S=150, N=1, K=1),
                              dict(query_segment_ids="docs", is_causal=True)),
    # Three key blocks of 64, a band that skips the first ones, two query blocks.
    "multi_block_window": (dict(B=1, T=40, S=150, N=2, K=1),
                           dict(is_causal=True, causal_alignment="bottom_right",
                                local_window_size=(70, None))),
}


def _check_case(name, dtype=jnp.bfloat16):
  sizes, kw = CASES[name]
  kw = dict(kw)
  q, k, v = testing.random_qkv(jax.random.key(0), dtype=dtype, H=64, **sizes)
  if kw.get("query_segment_ids") == "seg":
    kw["query_segment_ids"] = _segments(jax.random.key(1), sizes["B"], sizes["T"])
  if kw.get("query_segment_ids") == "docs":
    kw["query_segment_ids"] = jnp.asarray(np.arange(sizes["T"])[None] >= 128, jnp.int32)

  def f(q, k, v):
    return jaxattn.dot_product_attention(q, k, v, implementation="mosaic", return_residual=True, **kw)

  (out, lse), vjp = jax.vjp(f, q, k, v)
  ref, ref_lse = testing.reference_attention(q, k, v, return_residual=True, **kw)
  testing.assert_attention_close(out, ref, dtype=dtype)
  testing.assert_attention_close(lse, ref_lse, dtype=dtype)
  live = np.isfinite(np.asarray(lse, np.float32))
  assert np.all(np.asarray(out, np.float32)[~live] == 0)
  do, dl = random_cotangents(jax.random.key(2), out, lse)
  grads = vjp((do, dl))
  chex.assert_tree_all_finite(grads)
  r = testing.reference_attention_vjp(q, k, v, d_out=do, d_lse=dl, **kw)
  testing.assert_attention_close(grads, (r["query"], r["key"], r["value"]), dtype=dtype)
  return live


@needs_interpreter
@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_kernel_matches_float64_reference(name):
  live = _check_case(name)
  if name == "bottom_right_lengths":
    assert not live.all() and live.any()  # the case does leave rows empty


@needs_interpreter
def test_interpreted_float16_mqa():
  """fp16 and N/K = 6 (padded to 8 rows per position, dummy rows inert)."""
  q, k, v = testing.random_qkv(jax.random.key(3), dtype=jnp.float16, B=1, T=9, S=5, N=6, K=1, H=64)
  out = jaxattn.dot_product_attention(q, k, v, implementation="mosaic", is_causal=True)
  assert out.dtype == jnp.float16
  testing.assert_attention_close(out, testing.reference_attention(q, k, v, is_causal=True))


# ---------------------------------------------------------------------------
# Lowered for CUDA on CPU (both jax versions): the compiled kernel's path.

LOWER_CASES = {
    "dense_h128": (128, dict()),
    "everything_h64": (64, dict(is_causal=True, causal_alignment="bottom_right", local_window_size=(90, None),
                                query_segment_ids="seg", key_value_segment_ids="seg_kv",
                                query_seq_lengths=jnp.array([100, 7], jnp.int32),
                                key_value_seq_lengths=jnp.array([300, 3], jnp.int32),
                                logits_soft_cap=30.0)),
    "causal_h256_gqa8": (256, dict(is_causal=True)),
}


@pytest.mark.parametrize("name", list(LOWER_CASES))
def test_compiled_kernel_lowers_for_cuda(name):
  H, kw = LOWER_CASES[name]
  B, T, S = 2, 130, 300
  N, K = (16, 2) if name == "causal_h256_gqa8" else (4, 2)
  q, k, v = testing.random_qkv(jax.random.key(0), dtype=jnp.bfloat16, B=B, T=T, S=S, N=N, K=K, H=H)
  kw = dict(kw)
  if kw.get("query_segment_ids") == "seg":
    kw["query_segment_ids"] = jnp.zeros((B, T), jnp.int32)
    kw["key_value_segment_ids"] = jnp.zeros((B, S), jnp.int32)
  inputs, config = _normalized(q, k, v, **kw)
  fn = jax.jit(lambda i: mosaic.mosaic_attention(i, config, backend="gpu"))
  text = fn.trace(inputs).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text  # one Mosaic GPU custom call, not an interpreter loop
  assert "callback" not in text


def test_block_sizes_that_wgmma_cannot_take_are_refused():
  """Key blocks must be multiples of 64, query blocks 64 rows."""
  q, k, v = testing.random_qkv(jax.random.key(0), dtype=jnp.bfloat16, B=1, T=64, S=64, N=1, K=1, H=64)
  inputs, config = _normalized(q, k, v)
  with pytest.raises(NotImplementedError, match="key block a multiple of 64"):
    mosaic.mosaic_attention(inputs, config, backend="gpu", block_sizes=(64, 32))


# ---------------------------------------------------------------------------
# Static checks: what it refuses, block lists, dispatch.

REFUSED = {
    "float32": (dict(dtype=jnp.float32), "float16 or bfloat16"),
    "head_dim": (dict(H=96), r"H == Hv in \(64, 128, 256\); got H=96"),
    "bias": (dict(bias=True), "bias is not served"),
    "mask": (dict(mask=True), "mask is not served"),
    "mask_fn": (dict(mask_fn=masks.causal()), "mask_fn is not served"),
    "score_fn": (dict(score_fn=lambda s, b, h, q, k: s), "score_fn is not served"),
    "dropout": (dict(dropout_rate=0.1, dropout_key=jax.random.key(0)), "dropout is not served"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_unsupported_arguments_raise_not_implemented(name):
  kw, msg = REFUSED[name]
  kw = dict(kw)
  dtype = kw.pop("dtype", jnp.bfloat16)
  H = kw.pop("H", 64)
  q, k, v = testing.random_qkv(jax.random.key(0), dtype=dtype, B=2, T=5, S=7, N=2, K=1, H=H)
  if kw.pop("bias", None):
    kw["bias"] = jnp.zeros((1, 2, 5, 7), dtype)
  if kw.pop("mask", None):
    kw["mask"] = jnp.ones((1, 1, 5, 7), bool)
  inputs, config = _normalized(q, k, v, **kw)
  reason = mosaic.unsupported_reason(inputs, config, backend="gpu")
  assert reason is not None and re.search(msg, reason), reason
  with pytest.raises(NotImplementedError, match=msg):
    mosaic.mosaic_attention(inputs, config, backend="gpu")


def test_platform_checks():
  q, k, v = testing.random_qkv(jax.random.key(0), dtype=jnp.bfloat16, B=1, T=5, S=7, N=2, K=1, H=64)
  inputs, config = _normalized(q, k, v, is_causal=True)
  assert "compute capability >= 9.0" in mosaic.unsupported_reason(
      inputs, config, backend="gpu", compute_capability="8.0")
  assert mosaic.unsupported_reason(inputs, config, backend="gpu", compute_capability="9.0") is None
  assert "CUDA GPU" in mosaic.unsupported_reason(inputs, config, backend="tpu")
  reason = mosaic.unsupported_reason(inputs, config, backend="cpu")
  assert (reason is None) == INTERPRETER
  if not INTERPRETER:
    assert "jax >= 0.11" in reason
    with pytest.raises(NotImplementedError, match="jax >= 0.11"):
      jaxattn.dot_product_attention(q, k, v, implementation="mosaic")


def test_block_lists_follow_the_classification():
  """Compacted lists: full blocks first, then partial, each once and in order; empty blocks never."""
  q, k, v = testing.random_qkv(jax.random.key(0), dtype=jnp.bfloat16, B=1, T=200, S=300, N=1, K=1, H=64)
  inputs, config = _normalized(q, k, v, is_causal=True, local_window_size=(70, None))
  p = mosaic._make_plan(inputs, config, None, interpret=True)
  counts, full, blocks = map(np.asarray, mosaic.block_lists(inputs, p))
  assert (p.nq, p.nk) == (4, 5) and p.bq == 64
  for i in range(p.nq):
    q0, q1 = i * p.bq, min(p.T, (i + 1) * p.bq) - 1
    k0 = lambda j: j * p.bk
    k1 = lambda j: min(p.S, (j + 1) * p.bk) - 1
    want_full = [j for j in range(p.nk) if k1(j) <= q0 and k0(j) >= q1 - 70 and (j + 1) * p.bk <= p.S]
    want_any = [j for j in range(p.nk) if k0(j) <= q1 and k1(j) >= q0 - 70]
    want_partial = [j for j in want_any if j not in want_full]
    assert list(blocks[i, :full[i]]) == want_full
    assert list(blocks[i, full[i]:counts[i]]) == want_partial
  assert full.sum() == 0  # a 70-key window never covers a 64 x 64 block whole ...
  inputs, config = _normalized(q, k, v, is_causal=True)
  counts, full, _ = map(np.asarray, mosaic.block_lists(inputs, dataclasses.replace(p, config=config)))
  assert list(full) == [0, 1, 2, 3] and list(counts) == [1, 2, 3, 4]  # ... plain causal does


def test_dispatch_keeps_unmeasured_mosaic_out_of_the_gpu_order():
  """Not a default choice until bench/gpu.sh has measured it (see attention.GPU_ORDER)."""
  for cc in [(8, 0), (9, 0), (10, 0), None]:
    assert "mosaic" not in jaxattn.attention.gpu_order(cc)
  q, k, v = testing.random_qkv(jax.random.key(0), dtype=jnp.bfloat16, B=1, T=5, S=7, N=2, K=1, H=64)
  inputs, config = _normalized(q, k, v, is_causal=True, logits_soft_cap=30.0)
  assert jaxattn.attention.choose_implementation(inputs, config, backend="gpu", compute_capability=(9, 0)) == "pallas"


# ---------------------------------------------------------------------------
# The shared test base, restricted to what the kernel serves (slow).

@needs_interpreter
@pytest.mark.slow
class TestMosaicSharedBase(AttentionTestBase):
  """bf16 (fp16 where the base asks for it), H = 64; the base's sizes otherwise.

  Its float64 comparison covers the served grid; jax.nn parity and the large-logits
  test compare at float32 tolerances, which bf16/fp16 kernels cannot meet (the
  float64 comparisons here and below cover them); empty rows are checked by
  CASES['bottom_right_lengths'].
  """
  implementation = "mosaic"
  serves = FEATURES - {"bias", "dense_mask", "dropout", "value_head_dim", "float32"}

  def qkv(self, seed=0, dtype=jnp.float32, **sizes):
    dtype = jnp.float16 if dtype == jnp.float16 else jnp.bfloat16
    return super().qkv(seed=seed, dtype=dtype, **{"H": 64, **sizes})


@needs_interpreter
@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_float16(name):
  _check_case(name, dtype=jnp.float16)


@needs_interpreter
@pytest.mark.slow
@pytest.mark.parametrize("H", [128, 256])
def test_interpreted_larger_head_dims(H):
  q, k, v = testing.random_qkv(jax.random.key(4), dtype=jnp.bfloat16, B=1, T=70, S=130, N=2, K=2, H=H)
  out, lse = jaxattn.dot_product_attention(q, k, v, implementation="mosaic", is_causal=True,
                                           return_residual=True)
  ref, ref_lse = testing.reference_attention(q, k, v, is_causal=True, return_residual=True)
  testing.assert_attention_close(out, ref)
  testing.assert_attention_close(lse, ref_lse)


# ---------------------------------------------------------------------------
# On a GPU (bench/gpu.sh): the compiled kernel against the float64 reference.

def _hopper():
  if jax.default_backend() != "gpu":
    return False
  cc = getattr(jax.devices()[0], "compute_capability", "0")
  return int(str(cc).split(".")[0]) >= 9


@pytest.mark.skipif(not _hopper(), reason="needs a GPU of compute capability >= 9.0")
@pytest.mark.parametrize("H", [64, 128, 256])
@pytest.mark.parametrize("kw", [dict(is_causal=True), dict(), dict(is_causal=True, logits_soft_cap=30.0,
                                                                     query_segment_ids="seg")],
                         ids=["causal", "dense", "softcap_segments"])
def test_compiled_kernel_on_gpu(H, kw):
  B, T, S, N, K = 2, 1000, 1000, 8, 2
  q, k, v = testing.random_qkv(jax.random.key(0), dtype=jnp.bfloat16, B=B, T=T, S=S, N=N, K=K, H=H)
  kw = dict(kw)
  if kw.get("query_segment_ids") == "seg":
    kw["query_segment_ids"] = jnp.asarray(np.arange(T)[None].repeat(B, 0) * 3 // T, jnp.int32)

  def f(q, k, v):
    return jaxattn.dot_product_attention(q, k, v, implementation="mosaic", return_residual=True, **kw)

  (out, lse), vjp = jax.vjp(jax.jit(f), q, k, v)
  ref, ref_lse = testing.reference_attention(q, k, v, return_residual=True, **kw)
  testing.assert_attention_close(out, ref)
  testing.assert_attention_close(lse, ref_lse, dtype=jnp.bfloat16)
  do, dl = random_cotangents(jax.random.key(2), out, lse)
  r = testing.reference_attention_vjp(q, k, v, d_out=do, d_lse=dl, **kw)
  testing.assert_attention_close(vjp((do, dl)), (r["query"], r["key"], r["value"]))
