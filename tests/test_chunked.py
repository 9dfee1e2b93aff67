"""The chunked implementation: O(T) memory, the block map, and dispatch."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jaxattn
from jaxattn import testing
from jaxattn._impl import chunked, common

from attention_base import block_any_all, rotated_cases


def _temp_bytes(fn, *args):
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def _shapes(T, H=64):
  return [jax.ShapeDtypeStruct((1, T, 1, H), jnp.float32)] * 3


def _fwd(q, k, v):
  return jaxattn.dot_product_attention(q, k, v, is_causal=True, implementation="chunked")


def _grad(q, k, v):
  return jax.grad(lambda q, k, v: jnp.sum(_fwd(q, k, v)), argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("fn,limit_mib", [(_fwd, 32), (_grad, 64)], ids=["forward", "gradient"])
def test_memory_is_linear_in_sequence_length(fn, limit_mib):
  small, large = _temp_bytes(fn, *_shapes(16384)), _temp_bytes(fn, *_shapes(32768))
  assert large <= limit_mib * 2**20, large / 2**20
  assert large <= 2.1 * small, (small, large)  # doubling T at most doubles it
  dense = _temp_bytes(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True),
                      *_shapes(16384))
  assert dense > 8 * small  # the materialized path is quadratic


@pytest.mark.parametrize("window", [None, (256, 0)], ids=["causal", "band"])
def test_gradient_of_a_sum_holds_one_output_sized_temporary(window):
  """jax.grad of sum(attention): the cotangent is a broadcast of ones that XLA
  materializes; it must not be live beside the output O (which the backward
  needs only to form rowsum(dO * O)): one (T, H) float32 buffer plus O(T)
  statistics, not two (524 MiB at T = 2^20 before)."""
  def grad(q, k, v):
    f = lambda q, k, v: jnp.sum(jaxattn.dot_product_attention(
        q, k, v, is_causal=True, local_window_size=window, implementation="chunked"))
    return jax.grad(f, argnums=(0, 1, 2))(q, k, v)

  small, large = _temp_bytes(grad, *_shapes(16384)), _temp_bytes(grad, *_shapes(32768))
  buffer_growth = 16384 * 64 * 4  # one more (T, H) float32 buffer's bytes
  assert large - small <= 1.25 * buffer_growth, (small / 2**20, large / 2**20)


def _dense_allowed(inputs, config, T, S):
  """The (T, S) mask of every query/key pair per batch element (heads broadcast)."""
  m = common.combined_mask(inputs, config)
  if m is None:
    return None
  B = inputs.query.shape[0]
  idx = (jnp.arange(B)[:, None, None, None], jnp.zeros((1, 1, 1, 1), jnp.int32),
         jnp.arange(T)[None, None, :, None], jnp.arange(S)[None, None, None, :])
  return np.asarray(jnp.broadcast_to(m(*idx), (B, 1, T, S)))


@settings(max_examples=10, deadline=None)
@given(T=st.integers(1, 40), S=st.integers(1, 40), bq=st.integers(1, 9), bk=st.integers(1, 9),
       causal=st.booleans(), bottom_right=st.booleans(),
       left=st.one_of(st.none(), st.integers(0, 12)), right=st.one_of(st.none(), st.integers(0, 12)),
       use_lengths=st.booleans(), use_segments=st.booleans(), seed=st.integers(0, 1000))
def test_block_map_is_sound_and_exact(T, S, bq, bk, causal, bottom_right, left, right,
                                      use_lengths, use_segments, seed):
  """Empty blocks have no allowed pair, full blocks no masked pair (so skipping is exact)."""
  key = jax.random.key(seed)
  B = 2
  q, k, v = testing.random_qkv(key, B=B, T=T, S=S, N=1, K=1, H=2)
  window = None if left is None and right is None else (left, right)
  kw = dict(is_causal=causal, local_window_size=window,
            causal_alignment="bottom_right" if bottom_right else "top_left")
  if use_lengths:
    kw["key_value_seq_lengths"] = testing.random_lengths(key, B, S)
    kw["query_seq_lengths"] = testing.random_lengths(jax.random.fold_in(key, 1), B, T)
  if use_segments:
    kw["query_segment_ids"] = testing.random_segment_ids(key, B, T)
    kw["key_value_segment_ids"] = testing.random_segment_ids(jax.random.fold_in(key, 2), B, S)
  inputs, config, _ = jaxattn.attention.normalize(q, k, v, **kw)
  st_ = chunked._Static(B=B, N=1, T=T, S=S, bq=min(bq, T), bk=min(bk, S), config=config, G=1)
  bm = np.asarray(chunked.block_map(inputs, st_))
  allowed = _dense_allowed(inputs, config, T, S)
  if allowed is None:
    allowed = np.ones((1, 1, T, S), bool)
  any_, all_ = block_any_all(allowed, st_.bq, st_.bk)
  assert not np.any((bm == 0) & any_), "an empty block has an allowed pair"
  assert not np.any((bm == 2) & ~all_), "a full block has a masked pair"
  if not use_lengths and not use_segments:
    # Static masks are classified exactly: a partial block is really mixed (the
    # last key block is partial when its padding needs masking).
    padded_col = np.zeros(bm.shape, bool)
    if S % st_.bk:
      padded_col[:, -1] = True
    assert np.all(~((bm == 1) & ~padded_col) | (any_ & ~all_))
    assert np.all((bm > 0) == any_)


def _static(config):
  return chunked._Static(B=1, N=1, T=64, S=64, bq=8, bk=8, config=config, G=1)


def test_no_full_size_relayout_of_inputs_or_outputs():
  # Blocks are put in the matmuls' layout when sliced: no full-size transposed
  # copy of q, k, v, the output or the cotangent, with several heads (with
  # one head such transposes are free reshapes). The temporaries are then
  # blocks plus, for the gradient, the saved output (the residual).
  q = jax.ShapeDtypeStruct((1, 32768, 8, 64), jnp.float32)
  kv = jax.ShapeDtypeStruct((1, 32768, 2, 64), jnp.float32)       # GQA
  size = 32768 * 8 * 64 * 4
  vjp = lambda q, k, v: jax.vjp(_fwd, q, k, v)[1](q)
  assert _temp_bytes(_fwd, q, kv, kv) <= 0.5 * size
  assert _temp_bytes(vjp, q, kv, kv) <= 1.5 * size


def _big_copies(hlo: str, min_elems: int, *, bodies: bool) -> list[str]:
  """Shapes of copies of at least `min_elems` elements in the branches of
  conditionals (and, with `bodies`, in loop bodies) of compiled HLO text."""
  names = set(re.findall(r"body=(%[\w.\-]+)", hlo)) if bodies else set()
  for group in re.findall(r"branch_computations=\{([^}]*)\}", hlo):
    names |= {n.strip() for n in group.split(",")}
  found = []
  for comp in re.split(r"\n(?=\S)", hlo):
    if comp.split(" ", 1)[0] in names:
      found += [shape for shape in re.findall(r"= \w+\[([\d,]*)\]\S* copy\(", comp)
                if math.prod(int(d) for d in shape.split(",") if d) >= min_elems]
  return found


@pytest.mark.parametrize("name", ["chunked", "chunked_jvp"])
def test_backward_never_copies_a_full_size_array_per_block(name):
  # dQ and dbias (and, transposed, chunked_jvp's dK/dV) once passed through the
  # per-block switch, whose branches XLA gives buffers of their own: a full
  # copy on every block, cubic time in T.
  T, N, H = 256, 2, 16
  q = jax.ShapeDtypeStruct((1, T, N, H), jnp.float32)
  bias = jax.ShapeDtypeStruct((1, N, T, T), jnp.float32)
  loss = lambda q, k, v, b: jnp.sum(jaxattn.dot_product_attention(
      q, k, v, bias=b, is_causal=True, implementation=name, block_sizes=(64, 64)))
  hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(q, q, q, bias).compile().as_text()
  assert "branch_computations" in hlo  # the switch is there to be checked
  # chunked_jvp's transposed loops copy dK/dV once per query block, outside the switch.
  assert not _big_copies(hlo, T * N * H, bodies=name == "chunked")


def test_causal_block_skipping_does_about_half_the_work():
  q, k, v = testing.random_qkv(jax.random.key(0), B=1, T=64, S=64, N=1, K=1, H=4)
  inputs, config, _ = jaxattn.attention.normalize(q, k, v, is_causal=True)
  bm = np.asarray(chunked.block_map(inputs, _static(config)))
  assert (bm == 0).sum() == 28 and (bm == 1).sum() == 8 and (bm == 2).sum() == 28
  # (a sliding window of 16 keys: 2 partial + 1 full block per row at most)
  inputs, config, _ = jaxattn.attention.normalize(q, k, v, is_causal=True, local_window_size=(16, 0))
  bm = np.asarray(chunked.block_map(inputs, _static(config)))
  assert (bm > 0).sum(1).max() == 3
  assert (bm == 2).sum() == 7 and (bm == 1).sum() == 14 and (bm == 0).sum() == 43


@pytest.mark.parametrize("T,expected", [(16, "xla"), (1024, "chunked")])
def test_dispatch_picks_chunked_on_cpu_for_all_but_tiny_shapes(T, expected):
  q, k, v = testing.random_qkv(jax.random.key(0), B=1, T=T, S=T, N=2, K=2, H=8)
  inputs, config, _ = jaxattn.attention.normalize(q, k, v, is_causal=True)
  assert jaxattn.attention.choose_implementation(inputs, config) == expected
  # ... and visible in the lowered program: the chunked path loops, the xla one does not.
  text = jax.jit(lambda q, k, v: jaxattn.dot_product_attention(q, k, v, is_causal=True)).lower(q, k, v).as_text()
  assert ("stablehlo.while" in text) == (expected == "chunked")


def test_long_keys_and_single_query():
  q, k, v = testing.random_qkv(jax.random.key(3), B=1, T=1, S=3000, N=4, K=2, H=8)
  lens = jnp.array([2500], jnp.int32)
  out = jaxattn.dot_product_attention(q, k, v, key_value_seq_lengths=lens, implementation="chunked",
                                      block_sizes=(1, 256))
  testing.assert_attention_close(out, testing.reference_attention(q, k, v, key_value_seq_lengths=lens))


@pytest.mark.parametrize("dtype,kw,expected", [
    (jnp.bfloat16, dict(is_causal=True), "cudnn"),
    (jnp.float32, dict(is_causal=True), "pallas"),        # cuDNN takes no float32
    (jnp.bfloat16, dict(logits_soft_cap=5.0), "pallas"),  # nor a soft-cap
])
def test_dispatch_on_gpu_prefers_cudnn_then_pallas(dtype, kw, expected):
  q, k, v = testing.random_qkv(jax.random.key(0), B=1, T=1024, S=1024, N=2, K=2, H=64, dtype=dtype)
  inputs, config, _ = jaxattn.attention.normalize(q, k, v, **kw)
  assert jaxattn.attention.choose_implementation(inputs, config, backend="gpu") == expected
  assert jaxattn.attention.choose_implementation(inputs, config, backend="cpu") == "chunked"


BAND_CASES = {
    "window": dict(local_window_size=(3, 2)),
    "causal_window_bottom_right": dict(local_window_size=(4, 0), is_causal=True, causal_alignment="bottom_right"),
    "window_bias_lengths_cap_dropout": dict(local_window_size=(5, 1), key_value_seq_lengths=jnp.array([30, 47]),
                                            logits_soft_cap=2.0, dropout_rate=0.2, dropout_key=jax.random.key(0),
                                            bias=testing.random_normal(jax.random.key(3), (1, 6, 41, 47))),
    "window_segments_mask": dict(local_window_size=(2, 2),
                                 query_segment_ids=testing.random_segment_ids(jax.random.key(7), 2, 41),
                                 key_value_segment_ids=testing.random_segment_ids(jax.random.key(8), 2, 47),
                                 mask=testing.random_mask(jax.random.key(9), (2, 1, 41, 47))),
}


@pytest.mark.parametrize("name,blocks", rotated_cases(list(BAND_CASES), [((4, 8),), ((5, 3),)], ["4x8", "5x3"]))
def test_narrow_band_path_values_and_gradients(name, blocks):
  """Narrow windows take one unaligned key tile per query block: same results."""
  q, k, v = testing.random_qkv(jax.random.key(1), B=2, T=41, S=47, N=6, K=3, H=5)
  kw = dict(BAND_CASES[name])
  bias, mask = kw.pop("bias", None), kw.pop("mask", None)
  inputs, config, _ = jaxattn.attention.normalize(q, k, v, bias, mask, **kw)
  st_ = chunked._static(inputs, config, blocks)
  assert chunked._band(st_, -(-47 // blocks[1]) * blocks[1]) is not None  # the band path runs

  def f(q, k, v, bias):
    return jaxattn.dot_product_attention(q, k, v, bias, mask, return_residual=True, implementation="chunked",
                                         block_sizes=blocks, **kw)

  (out, lse), vjp = jax.vjp(f, q, k, v, bias)
  ref, ref_lse = testing.reference_attention(q, k, v, bias, mask, return_residual=True, **kw)
  testing.assert_attention_close((out, lse), (ref, ref_lse))
  do = testing.random_normal(jax.random.key(5), out.shape)
  dl = jnp.where(jnp.isfinite(lse), testing.random_normal(jax.random.key(6), lse.shape), 0.0)
  grads = vjp((do, dl))
  rg = testing.reference_attention_vjp(q, k, v, bias, mask, d_out=do, d_lse=dl, **kw)
  testing.assert_attention_close(grads[:3], (rg["query"], rg["key"], rg["value"]))
  if bias is not None:
    testing.assert_attention_close(grads[3], rg["bias"])


@pytest.mark.parametrize("implementation", ["chunked", "chunked_jvp"])
@pytest.mark.parametrize("argnums", [0, (0, 1)], ids=["without_dbias", "with_dbias"])
def test_bias_gradient_takes_no_bias_sized_temporary(implementation, argnums):
  """memory_analysis: with a (B, N, T, S) bias, jax.grad holds no temporary the
  size of the bias, whether or not the bias's gradient is taken. Before:
  "chunked" carried a full dbias through both loops even when it was not
  asked for (XLA could not drop it: 80 MiB temp with a 64 MiB bias), and
  "chunked_jvp"'s transposed tangent sent full-size bias cotangents through its
  switch and key loop (149 MiB, and 6x the time)."""
  T, N = 1024, 2
  q = jax.ShapeDtypeStruct((1, T, N, 32), jnp.float32)
  bias = jax.ShapeDtypeStruct((1, N, T, T), jnp.float32)  # 8 MiB
  loss = lambda q, b: jnp.sum(jaxattn.dot_product_attention(
      q, q, q, bias=b, is_causal=True, implementation=implementation, block_sizes=(256, 128)))
  temp = _temp_bytes(jax.grad(loss, argnums=argnums), q, bias)
  assert temp < 4 * T * T * N, (temp / 2**20, implementation, argnums)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "dense"])
def test_gradient_of_the_queries_alone_skips_the_key_and_value_matmuls(causal):
  """jax.grad w.r.t. the queries alone: XLA drops dK and dV and their two
  matmuls per tile (the backward's tile gradients leave its switch and are
  summed outside it; carried through it, they were kept: 14 dots either way,
  now 10, and 105 -> 70 ms at T = 2048, N = 8)."""
  sds = jax.ShapeDtypeStruct((1, 256, 2, 32), jnp.float32)
  loss = lambda q, k, v: jnp.sum(jnp.sin(jaxattn.dot_product_attention(
      q, k, v, is_causal=causal, implementation="chunked", block_sizes=(64, 64))))
  dots = lambda argnums: jax.jit(jax.grad(loss, argnums)).lower(sds, sds, sds).compile().as_text().count(" dot(")
  assert dots(0) + 4 <= dots((0, 1, 2)), (dots(0), dots((0, 1, 2)))
