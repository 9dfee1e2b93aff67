"""Ring attention on 8 simulated CPU devices (conftest sets the device count),
head- and batch-sharded attention without resharding, and two processes.

Every ring result is compared with `dot_product_attention` on one device, the
global problem in token order: output, logsumexp and the gradients of both.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

import jaxattn
from jaxattn import parallel, testing

P = 8
# Global shapes: every dimension a different size. T/P = 8 queries per device
# (4 per zigzag chunk), S/P = 12 keys for cross-attention.
B, T, S, N, K, H = 2, 64, 96, 6, 3, 5
ATOL = 1e-5  # float32 ring vs single device (the target)

pytestmark = pytest.mark.skipif(
    jax.device_count() < P,
    reason=f"needs {P} devices: XLA_FLAGS=--xla_force_host_platform_device_count={P} "
           f"before jax is imported (tests/conftest.py sets it)")


@pytest.fixture(scope="module")
def mesh():
  return jax.make_mesh((P,), ("seq",), devices=jax.devices()[:P])


def _problem(key, *, T=T, S=T, segments=False):
  ks = jax.random.split(key, 6)
  q, k, v = testing.random_qkv(ks[0], B=B, T=T, S=S, N=N, K=K, H=H)
  out = {"query": q, "key": k, "value": v}
  if segments:
    # Sorted (packed documents) and a query id no key has: fully masked rows.
    out["query_segment_ids"] = jnp.sort(jax.random.randint(ks[1], (B, T), 0, 4), axis=1)
    out["key_value_segment_ids"] = jnp.sort(jax.random.randint(ks[2], (B, S), 0, 3), axis=1)
  d_out = testing.random_normal(ks[3], (B, T, N, H))
  d_lse = testing.random_normal(ks[4], (B, T, N))
  return out, d_out, d_lse


def _single_device(args, d_out, d_lse, **kw):
  """Output, lse and (dq, dk, dv) of the global problem on one device."""
  q, k, v = args["query"], args["key"], args["value"]
  seg = {n: args[n] for n in ("query_segment_ids", "key_value_segment_ids") if n in args}
  f = lambda q, k, v: jaxattn.dot_product_attention(
      q, k, v, return_residual=True, implementation="xla", **seg, **kw)
  (out, lse), vjp = jax.vjp(f, q, k, v)
  d_lse = jnp.where(jnp.isfinite(lse), d_lse, 0.0)
  return out, lse, vjp((d_out, d_lse)), d_lse


def _ring(mesh, args, d_out, d_lse, *, layout, **kw):
  """The same through sharded_ring_attention, in `layout` and back to token order."""
  to = lambda x: parallel.to_balanced_layout(x, P, layout=layout)
  back = lambda x: parallel.from_balanced_layout(x, P, layout=layout)
  seg = {n: to(args[n]) for n in ("query_segment_ids", "key_value_segment_ids") if n in args}

  @jax.jit
  def run(q, k, v, d_out, d_lse):
    f = lambda q, k, v: parallel.sharded_ring_attention(
        q, k, v, mesh=mesh, axis_name="seq", layout=layout, return_residual=True, **seg, **kw)
    (out, lse), vjp = jax.vjp(f, q, k, v)
    return out, lse, vjp((d_out, d_lse))

  out, lse, grads = run(to(args["query"]), to(args["key"]), to(args["value"]), to(d_out), to(d_lse))
  return back(out), back(lse), tuple(back(g) for g in grads)


def _assert_same(got, want):
  out, lse, grads = got
  w_out, w_lse, w_grads, _ = want
  for name, a, b in (("output", out, w_out), ("lse", lse, w_lse), ("dq", grads[0], w_grads[0]),
                     ("dk", grads[1], w_grads[1]), ("dv", grads[2], w_grads[2])):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_array_equal(np.isfinite(a), np.isfinite(b), err_msg=name)
    fin = np.isfinite(b)
    np.testing.assert_allclose(a[fin], b[fin], atol=ATOL, rtol=ATOL, err_msg=name)


# ---------------------------------------------------------------------------
# Layouts.


@pytest.mark.parametrize("layout", parallel.LAYOUTS)
def test_layout_round_trip_and_positions(layout):
  x = np.arange(2 * 16).reshape(2, 16)
  y = parallel.to_balanced_layout(x, 4, layout=layout)
  np.testing.assert_array_equal(y[0], parallel.layout_positions(16, 4, layout))
  np.testing.assert_array_equal(parallel.from_balanced_layout(y, 4, layout=layout), x)
  xj = jnp.asarray(x)
  np.testing.assert_array_equal(parallel.to_balanced_layout(xj, 4, layout=layout), y)
  np.testing.assert_array_equal(jax.jit(lambda a: parallel.from_balanced_layout(
      parallel.to_balanced_layout(a, 4, layout=layout, axis=-1), 4, layout=layout, axis=-1))(xj), x)


def test_layout_assignments():
  # zigzag: device d holds chunks d and 2P-1-d; striped: token i on device i % P.
  np.testing.assert_array_equal(parallel.layout_positions(8, 2, "zigzag"), [0, 1, 6, 7, 2, 3, 4, 5])
  np.testing.assert_array_equal(parallel.layout_positions(8, 2, "striped"), [0, 2, 4, 6, 1, 3, 5, 7])


def test_layout_errors_name_the_function_and_sizes():
  with pytest.raises(ValueError, match=r"to_balanced_layout: .*\(10\).* 2 \* num_shards = 8"):
    parallel.to_balanced_layout(np.zeros((1, 10)), 4)
  with pytest.raises(ValueError, match=r"from_balanced_layout: layout must be one of"):
    parallel.from_balanced_layout(np.zeros((1, 8)), 4, layout="ring")


# ---------------------------------------------------------------------------
# Ring attention equals single-device attention.


@pytest.mark.parametrize("layout,is_causal,block_sizes", [
    ("contiguous", False, None),
    pytest.param("contiguous", True, None, marks=pytest.mark.slow),
    ("zigzag", True, (2, 3)),  # blocks that divide nothing: padding inside each piece
    ("striped", True, (4, 4)),  # two blocks per device: the kernel skips masked ones
])
def test_ring_matches_single_device(mesh, layout, is_causal, block_sizes):
  """GQA (N=6, K=3), output, logsumexp and all gradients (lse cotangent too)."""
  args, d_out, d_lse = _problem(jax.random.key(0))
  want = _single_device(args, d_out, d_lse, is_causal=is_causal)
  got = _ring(mesh, args, d_out, want[3], layout=layout, is_causal=is_causal,
              block_sizes=block_sizes)
  chex.assert_trees_all_equal_dtypes(got[0], args["query"])
  _assert_same(got, want)


@pytest.mark.parametrize("layout", ["zigzag", "striped"])
def test_ring_segment_ids_causal(mesh, layout):
  """Packed documents; a query segment no key has gives 0 and lse -inf, no NaN,
  even with NaN in those rows' cotangents."""
  args, d_out, d_lse = _problem(jax.random.key(1), segments=True)
  args["key_value_segment_ids"] = jnp.minimum(args["query_segment_ids"], 2)
  dead = _single_device(args, d_out, d_lse, is_causal=True)[1] == -jnp.inf
  assert np.any(dead), "the problem should have fully masked rows"
  d_out = jnp.where(dead[..., None], jnp.nan, d_out)
  want = _single_device(args, d_out, d_lse, is_causal=True)
  got = _ring(mesh, args, d_out, jnp.where(dead, jnp.nan, d_lse), layout=layout, is_causal=True)
  chex.assert_tree_all_finite(got[2])
  _assert_same(got, want)


def test_ring_cross_attention_segment_ids_soft_cap(mesh):
  """S != T (12 keys, 8 queries per device), other segment ids, scale and soft cap."""
  args, d_out, d_lse = _problem(jax.random.key(2), S=S, segments=True)
  kw = dict(scale=0.3, logits_soft_cap=2.0)
  want = _single_device(args, d_out, d_lse, **kw)
  got = _ring(mesh, args, d_out, want[3], layout="contiguous", **kw)
  _assert_same(got, want)


@pytest.mark.parametrize("layout,is_causal,block_sizes", [
    ("contiguous", True, None), ("zigzag", True, (2, 2)), ("striped", True, (4, 4)),
    ("zigzag", False, None)])
def test_ring_sequence_lengths_keep_garbage_in_padding(mesh, layout, is_causal, block_sizes):
  """Global lengths (the padding spread over devices by the layout): NaN/inf in padded
  queries, keys and values never reach an output or gradient, as on one device."""
  args, d_out, d_lse = _problem(jax.random.key(11))
  lengths = dict(query_seq_lengths=jnp.array([T - 5, 23]), key_value_seq_lengths=jnp.array([T - 3, 9]))
  pos = jnp.arange(T)[None, :, None, None]
  args["query"] = jnp.where(pos >= lengths["query_seq_lengths"][:, None, None, None], jnp.nan, args["query"])
  past_kv = pos >= lengths["key_value_seq_lengths"][:, None, None, None]
  args["key"] = jnp.where(past_kv, jnp.inf, args["key"])
  args["value"] = jnp.where(past_kv, jnp.nan, args["value"])
  want = _single_device(args, d_out, d_lse, is_causal=is_causal, **lengths)
  got = _ring(mesh, args, d_out, want[3], layout=layout, is_causal=is_causal, block_sizes=block_sizes,
              **lengths)
  chex.assert_tree_all_finite((got[0], got[2]))
  _assert_same(got, want)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_ring_inside_a_differentiated_scan_over_layers(layout):
  """grad of a lax.scan whose body calls ring attention (scan over layers) compiles
  under Shardy and equals the unrolled layers. Scan hoists the body's loop-invariant
  part into its own shard_map; empty scatter indices from `.at[]` updates made that
  shard_map's only operands, which Shardy could not partition."""
  mesh = jax.make_mesh((P,), ("seq",), devices=jax.devices()[:P],
                       axis_types=(AxisType.Auto,))
  x = testing.random_normal(jax.random.key(13), (1, T, 2, 4))
  attn = jax.shard_map(
      lambda x: parallel.ring_attention(x, x, x, axis_name="seq", is_causal=True, layout=layout),
      mesh=mesh, in_specs=PartitionSpec(None, "seq"), out_specs=PartitionSpec(None, "seq"))

  def scanned(x):
    return jnp.sum(jnp.sin(jax.lax.scan(lambda c, _: (c + attn(c), None), x, None, length=2)[0]))

  def unrolled(x):
    for _ in range(2):
      x = x + attn(x)
    return jnp.sum(jnp.sin(x))

  got = jax.jit(jax.grad(scanned))(x)
  want = jax.jit(jax.grad(unrolled))(x)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_sharded_ring_host_int64_lengths_and_ids_keep_their_meaning(mesh):
  """NumPy int64 lengths past 2**31 and ids that differ above bit 31 (jax, x64 off,
  would wrap both) are clipped and ranked on the host, over the whole sequence."""
  args, _, _ = _problem(jax.random.key(14))
  q, k, v = args["query"], args["key"], args["value"]
  run = lambda **kw: parallel.sharded_ring_attention(q, k, v, mesh=mesh, axis_name="seq", **kw)
  np.testing.assert_allclose(run(key_value_seq_lengths=np.array([2**32 + 3, 2**33], np.int64)), run(),
                             atol=ATOL, rtol=ATOL)
  ids = np.repeat(np.array([[0, 2**32], [5, 2**32 + 5]], np.int64), T // 2, axis=1)
  want = jaxattn.dot_product_attention(q, k, v, query_segment_ids=jnp.asarray(ids != ids[:, :1], jnp.int32),
                                       implementation="xla")
  np.testing.assert_allclose(run(query_segment_ids=ids), want, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("wide", ["uint32", "int64"])
def test_ring_wide_jax_segment_ids_are_ranked_over_the_whole_ring(mesh, wide):
  """jax-array ids that do not fit int32 are replaced by ranks; ranked per device,
  a visiting key block's ranks named other documents (output off by ~1).
  The ring ranks them over every device's ids, so they mean what int32 ids do."""
  args, d_out, d_lse = _problem(jax.random.key(15), segments=True)
  want = _single_device(args, d_out, d_lse, is_causal=True)
  with jax.enable_x64(wide == "int64"):
    step = 2**30 if wide == "uint32" else 2**33
    widen = lambda ids: jnp.asarray(ids, wide) * step + 7  # documents 2, 3 above bit 31
    wide_args = dict(args, query_segment_ids=widen(args["query_segment_ids"]),
                     key_value_segment_ids=widen(args["key_value_segment_ids"]))
    got = _ring(mesh, wide_args, d_out, want[3], layout="zigzag", is_causal=True)
  _assert_same(got, want)


def test_ring_float64_inputs_compute_in_float64(mesh):
  with jax.enable_x64(True):
    args, d_out, _ = _problem(jax.random.key(12))
    q, k, v, d_out = (np.asarray(x, np.float64) for x in (args["query"], args["key"], args["value"], d_out))
    kw = dict(mesh=mesh, axis_name="seq", is_causal=True, layout="striped")
    to = lambda x: parallel.to_balanced_layout(x, P, layout="striped")
    back = lambda x: parallel.from_balanced_layout(x, P, layout="striped")
    out, vjp = jax.vjp(lambda q, k, v: parallel.sharded_ring_attention(q, k, v, **kw), to(q), to(k), to(v))
    grads = [back(g) for g in vjp(to(d_out))]
    assert back(out).dtype == grads[0].dtype == jnp.float64
    np.testing.assert_allclose(back(out), testing.reference_attention(q, k, v, is_causal=True), atol=1e-12)
    ref = testing.reference_attention_vjp(q, k, v, d_out=d_out, is_causal=True)
    for g, name in zip(grads, ("query", "key", "value")):
      np.testing.assert_allclose(g, ref[name], atol=1e-11, err_msg=name)


def test_ring_against_float64_reference(mesh):
  args, d_out, _ = _problem(jax.random.key(3))
  q, k, v = args["query"], args["key"], args["value"]
  kw = dict(mesh=mesh, axis_name="seq", is_causal=True, layout="zigzag")
  to = lambda x: parallel.to_balanced_layout(x, P)
  back = lambda x: parallel.from_balanced_layout(x, P)
  f = jax.jit(lambda q, k, v, do: jax.vjp(
      lambda q, k, v: parallel.sharded_ring_attention(q, k, v, **kw), q, k, v)[1](do))
  out = back(parallel.sharded_ring_attention(to(q), to(k), to(v), **kw))
  grads = [back(g) for g in f(to(q), to(k), to(v), to(d_out))]
  testing.assert_attention_close(out, testing.reference_attention(q, k, v, is_causal=True))
  ref = testing.reference_attention_vjp(q, k, v, d_out=d_out, is_causal=True)
  testing.assert_attention_close(grads, [ref["query"], ref["key"], ref["value"]], dtype=jnp.float32)


def test_ring_gradients_at_large_logits_match_one_device_precision(mesh):
  """Logits up to ~8000, exact in float32 (integer q and k, scale 1): the
  backward recomputes P = exp((S - lse) - lse_lo), so the logsumexp's
  rounding is the only error left. The ring merges each step's logsumexp as
  two floats, so its gradients are as accurate as one device's "chunked"
  (~1e-6); with the merged lse rounded to one float they were 2e-5 to 1e-3."""
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.integers(-40, 41, (B, 128, N, H)), jnp.float32)
  k = jnp.asarray(rng.integers(-40, 41, (B, 128, K, H)), jnp.float32)
  v, d_out = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((B, 128, K, H), q.shape))
  kw = dict(mesh=mesh, axis_name="seq", is_causal=True, layout="zigzag", scale=1.0)
  to = lambda x: parallel.to_balanced_layout(x, P)
  back = lambda x: parallel.from_balanced_layout(x, P)
  ring = jax.jit(lambda q, k, v, do: jax.vjp(
      lambda q, k, v: parallel.sharded_ring_attention(q, k, v, **kw), q, k, v)[1](do))
  got = [back(g) for g in ring(to(q), to(k), to(v), to(d_out))]
  ref = testing.reference_attention_vjp(q, k, v, d_out=d_out, is_causal=True, scale=1.0)
  for name, g in zip(("query", "key", "value"), got):
    want = np.asarray(ref[name], np.float64)
    err = np.abs(np.asarray(g, np.float64) - want).max() / np.abs(want).max()
    assert err <= 1e-5, (name, err)


def test_ring_inside_own_shard_map_with_batch_axis():
  """ring_attention in the user's shard_map on a 2 x 4 mesh: batch over 'data',
  the ring over 'seq' (4 devices), 3D per-example inputs under vmap."""
  mesh = jax.make_mesh((2, 4), ("data", "seq"), devices=jax.devices()[:P])
  args, d_out, _ = _problem(jax.random.key(4))
  q, k, v = args["query"], args["key"], args["value"]
  to = lambda x: parallel.to_balanced_layout(x, 4)
  spec = PartitionSpec("data", "seq")

  def local(q, k, v):
    one = lambda q, k, v: parallel.ring_attention(q, k, v, axis_name="seq", is_causal=True,
                                                  layout="zigzag")
    return jax.vmap(one)(q, k, v)  # (T, N, H) per example

  f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=spec))
  place = lambda x: jax.device_put(to(x), NamedSharding(mesh, spec))
  out = parallel.from_balanced_layout(f(place(q), place(k), place(v)), 4)
  want = jaxattn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
  np.testing.assert_allclose(out, want, atol=ATOL, rtol=ATOL)


def test_ring_under_check_vma():
  mesh = jax.make_mesh((P,), ("seq",), devices=jax.devices()[:P])
  args, _, _ = _problem(jax.random.key(5))
  f = jax.shard_map(lambda q, k, v: parallel.ring_attention(q, k, v, axis_name="seq", is_causal=True),
                    mesh=mesh, in_specs=PartitionSpec(None, "seq"), out_specs=PartitionSpec(None, "seq"))
  q, k, v = (jax.device_put(args[n], NamedSharding(mesh, PartitionSpec(None, "seq")))
             for n in ("query", "key", "value"))
  out = jax.jit(f)(q, k, v)
  want = jaxattn.dot_product_attention(args["query"], args["key"], args["value"], is_causal=True)
  np.testing.assert_allclose(out, want, atol=ATOL, rtol=ATOL)


# ---------------------------------------------------------------------------
# Memory: O(T/P) per device.


def _sends(jaxpr, shape) -> int:
  """ppermute'd arrays of `shape` per run of `jaxpr` (scans times their length,
  the largest branch of a cond; a send in a while loop, whose trip count is
  unknown here, fails)."""
  n = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "ppermute":
      n += sum(tuple(v.aval.shape) == shape for v in eqn.invars)
    subs = []
    for value in eqn.params.values():
      for x in value if isinstance(value, (tuple, list)) else (value,):
        x = getattr(x, "jaxpr", x)
        if hasattr(x, "eqns"):
          subs.append(x)
    counts = [_sends(x, shape) for x in subs]
    if name == "while":
      assert not any(counts), "a send in a while loop"
    elif counts:
      n += (max(counts) if name == "cond" else sum(counts)) * eqn.params.get("length", 1)
  return n


@pytest.mark.parametrize("P_ring", [2, 3, 8])
def test_ring_sends_each_key_value_block_p_minus_1_times(P_ring):
  """Forward: K and V each go around the ring P - 1 times (the last visitor
  is not sent on); backward: K/V again P - 1 times, dK/dV P times (home).
  Results still match one device (P = 2 and 3 run the peeled last step with
  no loop, or a loop of one step)."""
  mesh = jax.make_mesh((P_ring,), ("seq",), devices=jax.devices()[:P_ring])
  T_ring = 8 * P_ring
  args, d_out, d_lse = _problem(jax.random.key(3), T=T_ring, S=T_ring)
  q, k, v = args["query"], args["key"], args["value"]

  def fwd_bwd(q, k, v, d_out, d_lse):
    f = lambda q, k, v: parallel.sharded_ring_attention(
        q, k, v, mesh=mesh, axis_name="seq", is_causal=True, layout="zigzag",
        return_residual=True)
    res, vjp = jax.vjp(f, q, k, v)
    return res, vjp((d_out, d_lse))

  local = (B, T_ring // P_ring, K, H)
  fwd = jax.make_jaxpr(lambda q, k, v: parallel.sharded_ring_attention(
      q, k, v, mesh=mesh, axis_name="seq", is_causal=True, layout="zigzag"))(q, k, v)
  assert _sends(fwd.jaxpr, local) == 2 * (P_ring - 1)
  both = jax.make_jaxpr(fwd_bwd)(q, k, v, d_out, d_lse)
  assert _sends(both.jaxpr, local) == 2 * (P_ring - 1) * 2 + 2 * P_ring

  want = _single_device(args, d_out, d_lse, is_causal=True)
  to = lambda x: parallel.to_balanced_layout(x, P_ring, layout="zigzag")
  back = lambda x: parallel.from_balanced_layout(x, P_ring, layout="zigzag")
  (out, lse), grads = jax.jit(fwd_bwd)(to(q), to(k), to(v), to(d_out), to(want[3]))
  _assert_same((back(out), back(lse), tuple(back(g) for g in grads)), want)


def _ring_temp_bytes(mesh, T):
  """Per-device compiled temp bytes of ring forward + backward at global length T."""
  sh = NamedSharding(mesh, PartitionSpec(None, "seq"))
  q = jax.ShapeDtypeStruct((1, T, 2, 8), jnp.float32, sharding=sh)
  kv = jax.ShapeDtypeStruct((1, T, 1, 8), jnp.float32, sharding=sh)

  def fwd_bwd(q, k, v, do):
    f = lambda q, k, v: parallel.sharded_ring_attention(
        q, k, v, mesh=mesh, axis_name="seq", is_causal=True, layout="zigzag", block_sizes=(16, 16))
    out, vjp = jax.vjp(f, q, k, v)
    return (out,) + vjp(do)
  return jax.jit(fwd_bwd).lower(q, kv, kv, q).compile().memory_analysis().temp_size_in_bytes


def test_ring_temp_memory_grows_linearly(mesh):
  """Doubling T doubles (not quadruples) the per-device temp memory."""
  small, large = _ring_temp_bytes(mesh, 512), _ring_temp_bytes(mesh, 1024)
  assert 1.5 < large / small < 2.5, (small, large)


# ---------------------------------------------------------------------------
# Batch- and head-sharded dot_product_attention: no resharding.

_COLLECTIVE = re.compile(r"= (\(?[^=]*?) (all-gather|all-to-all|collective-permute|all-reduce|"
                         r"reduce-scatter)(?:-start)?\(")


def _collectives(hlo: str) -> dict[str, set[str]]:
  """{collective op: element types it moves} in compiled HLO text."""
  found = {}
  for m in _COLLECTIVE.finditer(hlo):
    found.setdefault(m.group(2), set()).update(re.findall(r"\b([a-z]+\d*)\[", m.group(1)))
  return found


def _sharded_attention(implementation, sharded, axis_type, segments):
  """(compiled fwd+bwd, sharded args, single-device results, sharding) for B=4 or N=8, K=4 on 4 devices."""
  mesh = jax.make_mesh((4,), ("d",), axis_types=(axis_type,), devices=jax.devices()[:4])
  spec = PartitionSpec("d") if sharded == "batch" else PartitionSpec(None, None, "d")
  sh = NamedSharding(mesh, spec)
  host = testing.random_qkv(jax.random.key(6), B=4, T=24, S=24, N=8, K=4, H=5) + (
      testing.random_segment_ids(jax.random.key(7), 4, 24),)
  seg_sh = NamedSharding(mesh, PartitionSpec("d") if sharded == "batch" else PartitionSpec())
  args = tuple(jax.device_put(x, sh) for x in host[:3]) + (jax.device_put(host[3], seg_sh),)

  def fwd_bwd(q, k, v, seg, do):
    f = lambda q, k, v: jaxattn.dot_product_attention(
        q, k, v, is_causal=True, query_segment_ids=seg if segments else None,
        implementation=implementation)
    out, vjp = jax.vjp(f, q, k, v)
    return (out,) + vjp(do)

  compiled = jax.jit(fwd_bwd).lower(*args, args[0]).compile()
  want = jax.jit(fwd_bwd)(*host, host[0])  # on one device
  return compiled, args + (args[0],), want, sh


def _check_results(compiled, args, want, sh):
  results = compiled(*args)
  for r in results:
    assert r.sharding.is_equivalent_to(sh, r.ndim), (r.sharding, sh)
  chex.assert_trees_all_close(results, want, atol=ATOL, rtol=ATOL)


# Each case compiles a sharded forward and backward: the default set takes chunked with
# both axis types and both shardings, and xla once; -m slow runs the rest.
@pytest.mark.parametrize("implementation,axis_type,sharded", [
    pytest.param(impl, axis, sharded, marks=() if impl == "chunked" or (axis, sharded) == (
        AxisType.Auto, "batch") else pytest.mark.slow)
    for impl in ("xla", "chunked") for axis in (AxisType.Auto, AxisType.Explicit)
    for sharded in ("batch", "heads")])
def test_batch_or_head_sharded_attention_has_no_collectives(implementation, sharded, axis_type):
  """jit with NamedSharding on B or on N and K: causal forward and backward
  compile to per-device programs with no collective at all, and the results
  keep the sharding."""
  compiled, args, want, sh = _sharded_attention(implementation, sharded, axis_type, False)
  found = _collectives(compiled.as_text())
  assert not found, f"collectives in the compiled HLO: {found}"
  _check_results(compiled, args, want, sh)


@pytest.mark.parametrize("implementation", ["chunked", pytest.param("xla", marks=pytest.mark.slow)])
@pytest.mark.parametrize("sharded", ["batch", "heads"])
def test_sharded_attention_with_segment_ids_moves_no_qkv(implementation, sharded):
  """With segment ids, q/k/v and results still stay where they are: no
  collective moves floating-point data. (Integer ids and boolean block flags
  may move: the mask code gathers segment ids by position, and the chunked
  kernel reduces per-block flags over the batch.)"""
  compiled, args, want, sh = _sharded_attention(implementation, sharded, AxisType.Auto, True)
  found = _collectives(compiled.as_text())
  floats = {op: t for op, t in found.items() if any(x.startswith(("f", "bf")) for x in t)}
  assert not floats, f"floating-point data moved in the compiled HLO: {found}"
  _check_results(compiled, args, want, sh)


@pytest.mark.parametrize("implementation", ["xla", "chunked", "chunked_jvp"])
def test_batch_sharded_lengths_and_segment_ids_on_explicit_mesh_axes(implementation):
  """jax.make_mesh's default (explicit axes) with lengths and segment ids sharded
  over the batch like q/k/v: every implementation raised ShardingTypeError
  (the masks' per-batch gather had no inferable output sharding); jax.nn works.
  Values and gradients equal one device's; the outputs keep the sharding."""
  mesh = jax.make_mesh((4,), ("d",), axis_types=(AxisType.Explicit,), devices=jax.devices()[:4])
  sh = NamedSharding(mesh, PartitionSpec("d"))
  q, k, v = testing.random_qkv(jax.random.key(16), B=4, T=24, S=24, N=2, K=1, H=5)
  kv_len, q_len = jnp.array([24, 17, 9, 3]), jnp.array([20, 24, 5, 24])
  seg = jnp.asarray(np.repeat([[0, 1, 2], [0, 0, 1], [1, 1, 1], [2, 3, 3]], 8, axis=1))
  loss = lambda impl: lambda q, k, v, kv_len, q_len, seg: jnp.sum(jnp.sin(jaxattn.dot_product_attention(
      q, k, v, is_causal=True, key_value_seq_lengths=kv_len, query_seq_lengths=q_len,
      query_segment_ids=seg, implementation=impl,
      block_sizes=(8, 8) if impl != "xla" else None)))
  args = (q, k, v, kv_len, q_len, seg)
  with jax.set_mesh(mesh):
    got = jax.jit(jax.value_and_grad(loss(implementation), argnums=(0, 1, 2)))(
        *(jax.device_put(x, sh) for x in args))
  assert got[1][0].sharding.is_equivalent_to(sh, 4), got[1][0].sharding
  want = jax.value_and_grad(loss("xla"), argnums=(0, 1, 2))(*args)
  chex.assert_trees_all_close(got, want, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
@pytest.mark.parametrize("sharded", ["batch", "heads"])
def test_decoding_with_a_sharded_cache(axis_type, sharded):
  """A prefill then a decode step on a cache sharded over the batch or the KV
  heads: explicit axes raised (the update's whole-batch scatter index; the
  decode kernels' skip branches built unsharded zeros), and on Auto axes the
  update gathered every example's new K/V on every device. Results equal one
  device's; the update moves nothing; the cache keeps its sharding."""
  from jaxattn import decode as dec
  mesh = jax.make_mesh((4,), ("d",), axis_types=(axis_type,), devices=jax.devices()[:4])
  B_, L_, N_, K_, H_ = (4, 32, 4, 2, 8) if sharded == "batch" else (2, 32, 8, 4, 8)
  spec = PartitionSpec("d") if sharded == "batch" else PartitionSpec(None, "d")  # cache (B, K, L, H)
  qspec = PartitionSpec("d") if sharded == "batch" else PartitionSpec(None, None, "d")  # (B, T, N, H)
  q1, k1, v1 = testing.random_qkv(jax.random.key(17), B=B_, T=6, S=6, N=N_, K=K_, H=H_)
  q2, k2, v2 = testing.random_qkv(jax.random.key(18), B=B_, T=1, S=1, N=N_, K=K_, H=H_)
  n = jnp.array([6, 3, 5, 1][:B_], jnp.int32)

  def step(cache, q1, k1, v1, q2, k2, v2):
    cache = dec.update_kv_cache(cache, k1, v1, seq_lengths=n)
    out1 = dec.decode_attention(q1, cache, query_seq_lengths=n)
    cache = dec.update_kv_cache(cache, k2, v2)
    return cache, out1, dec.decode_attention(q2, cache)

  cache = dec.init_kv_cache(B_, L_, K_, H_)
  want = jax.jit(step)(cache, q1, k1, v1, q2, k2, v2)
  put = lambda x, sp: jax.device_put(x, NamedSharding(mesh, sp))
  sharded_cache = dec.KVCache(put(cache.key, spec), put(cache.value, spec),
                              put(cache.lengths, PartitionSpec("d") if sharded == "batch" else PartitionSpec()))
  args = [put(x, qspec) for x in (q1, k1, v1, q2, k2, v2)]
  with jax.set_mesh(mesh):
    got = jax.jit(step)(sharded_cache, *args)
    update = jax.jit(lambda c, k, v: dec.update_kv_cache(c, k, v, seq_lengths=n))
    moved = _collectives(update.lower(sharded_cache, args[1], args[2]).compile().as_text())
  assert not moved, f"the cache update moved data: {moved}"
  assert got[0].key.sharding.is_equivalent_to(NamedSharding(mesh, spec), 4), got[0].key.sharding
  chex.assert_trees_all_close(got, want, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("bias_batch", [4, 1])
def test_explicitly_sharded_bias_gradient_inside_a_mesh_context(bias_batch):
  """The chunked backward with a bias under explicit mesh axes and `jax.set_mesh`:
  the per-block switch's branches must give bias tiles of one sharding type."""
  mesh = jax.make_mesh((4,), ("d",), axis_types=(AxisType.Explicit,), devices=jax.devices()[:4])
  sh = NamedSharding(mesh, PartitionSpec("d"))
  q, k, v = testing.random_qkv(jax.random.key(6), B=4, T=40, S=40, N=2, K=2, H=5)
  bias = testing.random_normal(jax.random.key(3), (bias_batch, 2, 40, 40))
  args = [jax.device_put(x, sh) for x in (q, k, v)] + [
      jax.device_put(bias, sh) if bias_batch == 4 else bias]
  loss = lambda impl: lambda q, k, v, b: jnp.sum(jaxattn.dot_product_attention(
      q, k, v, b, is_causal=True, implementation=impl, block_sizes=(8, 8)) ** 2)
  with jax.set_mesh(mesh):
    got = jax.jit(jax.grad(loss("chunked"), argnums=(0, 3)))(*args)
  want = jax.grad(loss("xla"), argnums=(0, 3))(q, k, v, bias)
  chex.assert_trees_all_close(got, want, atol=ATOL, rtol=ATOL)


_CALLED = re.compile(r"\b(body|condition|to_apply|calls|true_computation|false_computation)="
                     r"%?([\w.\-]+)|\bbranch_computations=\{([^}]*)\}")


def _collectives_in_loops(hlo: str, op: str | None = None) -> set[str]:
  """Names of the computations run by a `while` or `conditional` (directly or
  through calls) that hold a collective (an `op` one if given), in compiled
  HLO text."""
  bodies = dict(re.findall(r"^(?:ENTRY )?%?([\w.\-]+) [^\n]*\{\n(.*?)^\}", hlo, re.S | re.M))

  def callees(text, loops_only):
    out = set()
    for m in _CALLED.finditer(text):
      if m.group(3) is not None:
        out |= {n.strip().lstrip("%") for n in m.group(3).split(",")}
      elif not loops_only or m.group(1) not in ("to_apply", "calls"):
        out.add(m.group(2))
    return out

  inside = set().union(*(callees(text, True) for text in bodies.values()))
  todo = list(inside)
  while todo:
    for name in callees(bodies.get(todo.pop(), ""), False) - inside:
      inside.add(name)
      todo.append(name)
  return {n for n in inside if op in _collectives(bodies.get(n, ""))} if op else {
      n for n in inside if _COLLECTIVE.search(bodies.get(n, ""))}


@pytest.mark.parametrize("implementation,operand", [
    ("chunked", "score"), ("chunked", "score_window"), ("chunked", "bias"),
    ("chunked_jvp", "score"), ("chunked_jvp", "bias")])
def test_gradients_of_operands_from_outside_a_shard_map_sum_once_after_the_loops(
    implementation, operand):
  """A bias or score parameters from outside a shard_map over the batch, with
  per-device lengths, differentiated with jit(grad): JAX sums their gradients
  over the devices (a psum), which ran once per tile inside the blocked loops,
  whose trip counts differ per device, and the devices waited for each other
  until XLA aborted the process ("chunked" with a score modifier); with a
  bias, "chunked" raised a switch-branch type error. Now every collective is
  outside the loops (checked in the compiled HLO before running it), and the
  gradients equal "xla"'s."""
  mesh = jax.make_mesh((4,), ("d",), axis_types=(AxisType.Auto,), devices=jax.devices()[:4])
  q, k, v = testing.random_qkv(jax.random.key(21), B=4, T=40, S=40, N=2, K=2, H=5)
  lengths = jnp.array([40, 17, 5, 29], jnp.int32)
  params = (testing.random_normal(jax.random.key(22), (1, 2, 40, 40)) if operand == "bias"
            else jnp.array([0.3, 0.7]))

  def loss(impl):
    def per_device(params, q, k, v, lengths):
      kw = dict(is_causal=True, key_value_seq_lengths=lengths, implementation=impl)
      if impl != "xla":
        kw["block_sizes"] = (8, 8)
      if operand == "bias":
        kw["bias"] = params
      else:
        kw["score_fn"] = jaxattn.scores.alibi(params)
      if operand == "score_window":
        kw["local_window_size"] = (9, 0)
      return jnp.sum(jnp.sin(jaxattn.dot_product_attention(q, k, v, **kw))).reshape(1)
    spec = PartitionSpec("d")
    return lambda params, *args: jnp.sum(jax.shard_map(
        functools.partial(per_device, params), mesh=mesh, in_specs=(spec,) * 4,
        out_specs=spec)(*args))

  args = (params, q, k, v, lengths)
  grad = jax.jit(jax.grad(loss(implementation), argnums=(0, 1)))
  looped = _collectives_in_loops(grad.lower(*args).compile().as_text())
  assert not looped, f"collectives inside loops (a device skipping a block would hang): {looped}"
  want = jax.grad(loss("xla"), argnums=(0, 1))(*args)
  # The slopes' gradients sum many float32 terms that partly cancel: against
  # float64, "chunked" is 3e-5 off here and "xla" 1e-5.
  chex.assert_trees_all_close(grad(*args), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("implementation", ["chunked", "chunked_jvp"])
@pytest.mark.parametrize("inside", ["queries", "keys"])
def test_queries_or_keys_replicated_inside_a_shard_map(implementation, inside):
  """Inside a shard_map over 4 devices, either the queries are sharded and the
  keys/values come from outside it (one copy on every device), or the other
  way round: the blocked kernels' loop branches met operands of different
  varying types (switch-branch TypeError in "chunked"'s gradient, and in both
  forwards when the keys varied and the queries did not). All operands are
  now cast to vary alike before the kernels; values and gradients equal
  "xla"'s in the same shard_map, and no collective runs inside a loop."""
  mesh = jax.make_mesh((4,), ("d",), axis_types=(AxisType.Auto,), devices=jax.devices()[:4])
  q, k, v = testing.random_qkv(jax.random.key(41), B=4, T=24, S=24, N=2, K=1, H=5)
  if inside == "queries":
    k, v = k[:1], v[:1]
  else:
    q = q[:1]

  def loss(impl):
    def per_device(q, k, v):
      kw = {} if impl == "xla" else dict(block_sizes=(8, 8))
      return jaxattn.dot_product_attention(q, k, v, is_causal=True, implementation=impl, **kw)
    def f(q, k, v):
      sharded = (q,) if inside == "queries" else (k, v)
      def g(*args):
        return per_device(*args, k, v) if inside == "queries" else per_device(q, *args)
      out = jax.shard_map(g, mesh=mesh, in_specs=(PartitionSpec("d"),) * len(sharded),
                          out_specs=PartitionSpec("d"))(*sharded)
      return jnp.sum(jnp.sin(out))
    return f

  grad = jax.jit(jax.value_and_grad(loss(implementation), argnums=(0, 1, 2)))
  looped = _collectives_in_loops(grad.lower(q, k, v).compile().as_text())
  assert not looped, f"collectives inside loops: {looped}"
  want = jax.value_and_grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
  chex.assert_trees_all_close(grad(q, k, v), want, atol=ATOL, rtol=ATOL)


# ---------------------------------------------------------------------------
# Errors.


def test_errors_name_the_function_and_argument(mesh):
  q, k, v = testing.random_qkv(jax.random.key(7), B=B, T=8, S=8, N=N, K=K, H=H)
  with pytest.raises(ValueError, match=r"ring_attention: axis_name 'seq' is not a bound mesh axis"):
    parallel.ring_attention(q, k, v, axis_name="seq")
  with pytest.raises(ValueError, match=r"ring_attention: layout must be one of"):
    parallel.ring_attention(q, k, v, axis_name="seq", layout="ring")
  with pytest.raises(ValueError, match=r"ring_attention: key must have shape"):
    parallel.ring_attention(q, k[..., :4], v, axis_name="seq")
  with pytest.raises(ValueError, match=r"ring_attention: is_causal needs .* T=8, S=4"):
    parallel.ring_attention(q, k[:, :4], v[:, :4], axis_name="seq", is_causal=True)
  with pytest.raises(ValueError, match=r"sharded_ring_attention: axis_name 'sp' is not an axis"):
    parallel.sharded_ring_attention(q, k, v, mesh=mesh, axis_name="sp")
  auto = jax.make_mesh((2, 4), ("data", "seq"), devices=jax.devices()[:P],
                       axis_types=(AxisType.Auto, AxisType.Auto))
  f = jax.shard_map(lambda q, k, v: parallel.ring_attention(q, k, v, axis_name="data"), mesh=auto,
                    in_specs=PartitionSpec(None, "seq"), out_specs=PartitionSpec(None, "seq"))
  with pytest.raises(ValueError, match=r"ring_attention: axis_name 'data' must be a mesh axis the "
                                       r"sequence is sharded over; query, key and value vary over \('seq',\)"):
    jax.jit(f).trace(q, k, v)
  g = jax.shard_map(lambda q, k, v: parallel.ring_attention(q, k, v, axis_name="seq"), mesh=auto,
                    in_specs=(PartitionSpec(), PartitionSpec(None, "seq"), PartitionSpec(None, "seq")),
                    out_specs=PartitionSpec())
  with pytest.raises(ValueError, match=r"ring_attention: query must be sharded over axis_name 'seq' like "
                                       r"the others"):
    jax.jit(g).trace(q, k, v)
  with pytest.raises(ValueError, match=r"ring_attention: key_value_seq_lengths must have shape \(B,\) = \(2\); got \(3\)"):
    jax.jit(jax.shard_map(lambda q, k, v: parallel.ring_attention(
        q, k, v, axis_name="seq", key_value_seq_lengths=jnp.ones(3, jnp.int32)), mesh=auto,
        in_specs=PartitionSpec(None, "seq"), out_specs=PartitionSpec(None, "seq"))).trace(q, k, v)
  # A jax scalar scale and cap (unhashable) are taken, as by dot_product_attention.
  out = parallel.sharded_ring_attention(q, k, v, mesh=mesh, axis_name="seq", scale=1 / jnp.sqrt(5.0),
                                        logits_soft_cap=jnp.float32(3.0))
  want = jaxattn.dot_product_attention(q, k, v, scale=float(1 / np.sqrt(5.0)), logits_soft_cap=3.0)
  np.testing.assert_allclose(out, want, atol=ATOL, rtol=ATOL)
  with pytest.raises(ValueError, match=r"sharded_ring_attention: the query sequence length \(8\) "
                                       r"must be divisible by 2 \* the size .* = 16"):
    parallel.sharded_ring_attention(q, k, v, mesh=mesh, axis_name="seq", is_causal=True,
                                    layout="zigzag")


# ---------------------------------------------------------------------------
# Two processes.

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                       "ring_multiprocess.py")


def test_two_processes_four_cpu_devices_each():
  """examples/ring_multiprocess.py: jax.distributed on localhost, gloo CPU collectives.

  One retry: the example picks a free port and then binds it, and another
  process may take the port in between (seen once in a full run). A real
  failure fails both attempts; both logs are shown."""
  logs = []
  for _ in range(2):
    r = subprocess.run([sys.executable, EXAMPLE, "--timeout", "240"], capture_output=True,
                       text=True, timeout=300)
    logs.append(r.stdout + r.stderr)
    if r.returncode == 0:
      break
  log = logs[-1]
  assert r.returncode == 0, "\n--- next attempt ---\n".join(x[-3000:] for x in logs)
  assert log.count("] OK") == 2, log[-4000:]
  assert "4 local of 8 devices in 2 processes" in log, log[-4000:]


def test_sharded_errors_show_global_shapes_and_uneven_lengths_are_refused(mesh):
  # T = 20 is not divisible by the 8 devices: a clear error with the global shapes.
  q, k, v = testing.random_qkv(jax.random.key(8), B=B, T=20, S=20, N=N, K=K, H=H)
  with pytest.raises(ValueError, match=r"sharded_ring_attention: the query sequence length \(20\) must be "
                                       r"divisible by the size of mesh axis 'seq' = 8; got query \(2, 20, 6, 5\)"):
    parallel.sharded_ring_attention(q, k, v, mesh=mesh, axis_name="seq")
  q, k, v = testing.random_qkv(jax.random.key(9), B=B, T=16, S=16, N=N, K=K, H=H)
  # Global (B, S, K, H), not a per-device shard (B, 2, K, H).
  with pytest.raises(ValueError, match=r"sharded_ring_attention: key must have shape .*\(2, 16, 3, 5\).*got \(2, 16, 3, 4\)"):
    parallel.sharded_ring_attention(q, k[..., :4], v, mesh=mesh, axis_name="seq")
  with pytest.raises(ValueError, match=r"sharded_ring_attention: logits_soft_cap"):
    parallel.sharded_ring_attention(q, k, v, mesh=mesh, axis_name="seq", logits_soft_cap=-1.0)
  with pytest.raises(ValueError, match=r"sharded_ring_attention: is_causal needs .* T=16, S=8"):
    parallel.sharded_ring_attention(q, k[:, :8], v[:, :8], mesh=mesh, axis_name="seq", is_causal=True)


@pytest.mark.parametrize("implementation,with_bias", [
    ("chunked", False), ("chunked", True), ("chunked_jvp", True)])
def test_head_sharding_with_fewer_kv_heads_than_devices_keeps_the_queries_sharded(
    implementation, with_bias):
  """N=8 query heads sharded over 4 devices with K=2 key/value heads (Auto
  axes): a device holds half of a K/V head's query heads. The blocked
  implementations fold them into their rows head-major ((g, t)), so their
  loops gather no queries (rows ordered (t, g) made GSPMD all-gather query
  blocks in every step: 13 all-gathers in "chunked"'s loops, 10 in
  "chunked_jvp"'s with a bias); what moves inside them are partial dK/dV
  sums. Values and gradients (a head-sharded bias's too) equal one device's."""
  mesh = jax.make_mesh((4,), ("d",), axis_types=(AxisType.Auto,), devices=jax.devices()[:4])
  host = testing.random_qkv(jax.random.key(16), B=2, T=64, S=64, N=8, K=2, H=8)
  host += (testing.random_normal(jax.random.key(17), (1, 8, 64, 64)) if with_bias else None,)
  q_sh = NamedSharding(mesh, PartitionSpec(None, None, "d"))
  put = lambda x, spec: None if x is None else jax.device_put(x, NamedSharding(mesh, spec))
  args = (put(host[0], q_sh.spec), put(host[1], PartitionSpec()), put(host[2], PartitionSpec()),
          put(host[3], PartitionSpec(None, "d")))

  def fwd_bwd(q, k, v, bias):
    f = lambda q, k, v, bias: jaxattn.dot_product_attention(
        q, k, v, bias, is_causal=True, implementation=implementation, block_sizes=(16, 16))
    out, vjp = jax.vjp(f, q, k, v, bias)
    return (out,) + vjp(out)

  gathers = _collectives_in_loops(jax.jit(fwd_bwd).lower(*args).compile().as_text(), "all-gather")
  assert not gathers, gathers
  got = jax.jit(fwd_bwd)(*args)
  assert got[0].sharding.is_equivalent_to(q_sh, 4), got[0].sharding
  chex.assert_trees_all_close(got, jax.jit(fwd_bwd)(*host), atol=ATOL, rtol=ATOL)
