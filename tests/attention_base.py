"""The shared test base: every implementation of dot_product_attention
subclasses `AttentionTestBase` and must pass the same checks against the
float64 reference (outputs and gradients) and against jax.nn.
"""

from __future__ import annotations

import contextlib
import importlib.util
import pathlib
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
import jaxattn._impl.common
from jaxattn import testing

B, T, S, N, K, H = 2, 5, 7, 6, 3, 11


def option_grid(key, *, B=B, T=T, S=S, N=N):
  """Named keyword sets covering every argument, on random (never zero) data."""
  ks = jax.random.split(key, 8)
  bias_full = testing.random_normal(ks[0], (B, N, T, S))
  mask_full = testing.random_mask(ks[1], (B, N, T, S))
  q_len = jnp.array([T, max(T // 2, 1)] + [T] * (B - 2), jnp.int32)[:B]
  kv_len = jnp.array([max(S // 3, 1), S] + [S] * (B - 2), jnp.int32)[:B]
  # One query document more than key documents: its rows attend nothing (when T >= 4).
  q_seg = testing.random_segment_ids(ks[2], B, T, num_segments=4)
  kv_seg = testing.random_segment_ids(ks[3], B, S, num_segments=3)
  return {
      "plain": {},
      "scale": dict(scale=0.37),
      "causal": dict(is_causal=True),
      "causal_bottom_right": dict(is_causal=True, causal_alignment="bottom_right"),
      "window": dict(local_window_size=(2, 1)),
      "window_int": dict(local_window_size=1),
      "window_left_only_br": dict(local_window_size=(3, None), causal_alignment="bottom_right"),
      "causal_window": dict(is_causal=True, local_window_size=(2, 0)),
      "bias_full": dict(bias=bias_full),
      "bias_bcast_heads": dict(bias=bias_full[:, :1]),
      "bias_bcast_batch_q": dict(bias=bias_full[:1, :, :1]),
      "mask_full": dict(mask=mask_full),
      "mask_bcast": dict(mask=mask_full[:1, :1]),
      "bias_and_mask": dict(bias=bias_full[:1], mask=mask_full[:, :1]),
      "q_lengths": dict(query_seq_lengths=q_len),
      "kv_lengths": dict(key_value_seq_lengths=kv_len),
      "both_lengths_causal": dict(query_seq_lengths=q_len, key_value_seq_lengths=kv_len, is_causal=True),
      "segments": dict(query_segment_ids=q_seg, key_value_segment_ids=kv_seg),
      "soft_cap": dict(logits_soft_cap=1.5, bias=bias_full[:, :, :1, :]),
      "dropout": dict(dropout_rate=0.25, dropout_key=ks[4]),
      "dropout_causal_raw_key": dict(dropout_rate=0.5, dropout_key=jax.random.PRNGKey(3), is_causal=True),
      "everything": dict(bias=bias_full[:, :1], mask=mask_full[:1], is_causal=True,
                         causal_alignment="bottom_right", local_window_size=(4, 1),
                         key_value_seq_lengths=kv_len, query_segment_ids=q_seg,
                         key_value_segment_ids=kv_seg, logits_soft_cap=3.0, scale=0.2,
                         dropout_rate=0.1, dropout_key=ks[5]),
  }


GRID_NAMES = list(option_grid(jax.random.key(0)))
# jax.nn has these arguments; rows it masks completely are the only difference.
JAX_NN_NAMES = ["plain", "scale", "causal", "window", "window_int", "causal_window", "bias_full",
                "bias_bcast_heads", "bias_bcast_batch_q", "mask_full", "mask_bcast",
                "bias_and_mask", "q_lengths", "kv_lengths", "both_lengths_causal"]


# The default test set runs a subset of each grid; `python -m pytest -m slow` runs the
# rest (CI runs both). Each grid entry is a separate compile, so this is where time goes.
# jax.nn parity in the unbatched (T, N, H) layout: the layout handling is shared by every
# option, so a few options show it; the batched layout runs every option by default.
TNH_FAST = ("plain", "causal", "bias_and_mask", "both_lengths_causal")


def block_any_all(allowed, bq, bk):
  """(nq, nk) any / all of a (B, N, T, S) boolean over (bq, bk) blocks, padding ignored:
  what a sound block classification must agree with (empty: not any; full: all)."""
  B, N, T, S = allowed.shape
  nq, nk = -(-T // bq), -(-S // bk)
  a = np.zeros((B, N, nq * bq, nk * bk), bool)
  a[:, :, :T, :S] = allowed
  v = np.zeros((nq * bq, nk * bk), bool)
  v[:T, :S] = True
  a, v = a.reshape(B, N, nq, bq, nk, bk), v.reshape(nq, bq, nk, bk)
  return a.any((0, 1, 3, 5)), (a | ~v).all((0, 1, 3, 5))


def slow_unless(names, fast):
  """pytest params for `names`; those not in `fast` are marked slow."""
  return [n if n in fast else pytest.param(n, marks=pytest.mark.slow) for n in names]


def rotated_cases(names, options, ids):
  """pytest params (name, *option) for every pair of a name and an option.

  The default set runs each name with one option, taking the options in turn, so
  every name and every option runs; `-m slow` runs the other pairs.
  """
  return [pytest.param(n, *opt, id=f"{oid}-{n}", marks=() if j == i % len(options) else pytest.mark.slow)
          for i, n in enumerate(names) for j, (opt, oid) in enumerate(zip(options, ids))]


def jax_nn_cases(names, tnh_fast=TNH_FAST, all_slow=False):
  """(name, layout) params: every name in (B, T, N, H), `tnh_fast` of them also in (T, N, H)
  by default; the other (T, N, H) cases (and all cases when `all_slow`) are slow."""
  cases = [(n, "BTNH") for n in names] + [(n, "TNH") for n in names]
  return [pytest.param(n, lay, id=f"{lay}-{n}", marks=() if not all_slow and (
      lay == "BTNH" or n in tnh_fast) else pytest.mark.slow) for n, lay in cases]


def _split(kw):
  kw = dict(kw)
  return kw.pop("bias", None), kw.pop("mask", None), kw


def random_cotangents(key, out, lse):
  k1, k2 = jax.random.split(key)
  do = testing.random_normal(k1, out.shape, jnp.float32).astype(out.dtype)
  dl = testing.random_normal(k2, lse.shape, jnp.float32).astype(lse.dtype)
  return do, jnp.where(jnp.isfinite(lse), dl, 0)


# Features a grid case or a base test may need; `AttentionTestBase.serves` lists the
# ones an implementation has. What it lacks it must refuse with NotImplementedError.
FEATURES = frozenset({"bias", "dense_mask", "dropout", "soft_cap", "segment_ids", "window_right",
                      "bottom_right", "value_head_dim", "float32"})


def features_of(kw, T=T, S=S) -> set[str]:
  """The FEATURES a keyword set of dot_product_attention uses (query length T, key length S)."""
  used = set()
  if kw.get("bias") is not None:
    used.add("bias")
  if kw.get("mask") is not None:
    used.add("dense_mask")
  if kw.get("dropout_rate"):
    used.add("dropout")
  if kw.get("logits_soft_cap") is not None:
    used.add("soft_cap")
  if kw.get("query_segment_ids") is not None:
    used.add("segment_ids")
  window = kw.get("local_window_size")
  if window is not None and (isinstance(window, int) or window[1] != 0):
    used.add("window_right")  # a window that looks right of the query too
  if kw.get("causal_alignment") == "bottom_right" and T != S:
    used.add("bottom_right")  # bottom-right alignment that differs from top-left
  return used


def check_against_reference(attend, q, k, v, bias=None, mask=None, kw=None, *, lse_cotangent=True):
  """Values, lse and gradients of `attend(q, k, v, bias) -> (out, lse)` vs the float64
  reference with the same arguments (`kw`: the keyword arguments besides bias and mask).

  The gradient check draws a random output cotangent and, with `lse_cotangent`, a
  random lse cotangent too. Returns (out, lse, gradients).
  """
  kw = {n: x for n, x in (kw or {}).items() if n != "block_sizes"}
  (out, lse), vjp = jax.vjp(attend, q, k, v, bias)
  ref_out, ref_lse = testing.reference_attention(q, k, v, bias, mask, return_residual=True, **kw)
  testing.assert_attention_close(out, ref_out)
  testing.assert_attention_close(lse, ref_lse)
  chex.assert_tree_all_finite(out)
  do, dl = random_cotangents(jax.random.key(2), out, lse)
  if lse_cotangent:
    grads = vjp((do, dl))
  else:  # differentiate the output alone (no lse cotangent reaches the backward)
    dl = None
    grads = jax.vjp(lambda *a: attend(*a)[0], q, k, v, bias)[1](do)
  ref = testing.reference_attention_vjp(q, k, v, bias, mask, d_out=do, d_lse=dl, **kw)
  testing.assert_attention_close(grads[:3], (ref["query"], ref["key"], ref["value"]))
  if bias is not None:
    testing.assert_attention_close(grads[3], ref["bias"])
  chex.assert_tree_all_finite(grads[:3])
  return out, lse, grads


def load_example(name: str):
  """The module examples/<name>.py, imported from its file (examples/ is not a package)."""
  path = pathlib.Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
  spec.loader.exec_module(module)
  return module


class AttentionTestBase:
  """Subclass and set `implementation` (and optionally `block_sizes`).

  Capability flags say what the implementation serves, so one base fits every
  kernel: a grid case that uses an unserved feature must raise
  NotImplementedError (the refusal is tested, not skipped); a base test that
  needs one is skipped with the reason.
  """

  implementation: str = ""
  block_sizes: tuple[int, int] | None = None
  serves: frozenset[str] = FEATURES  # see FEATURES
  low_precision_dtypes: tuple = (jnp.float16, jnp.bfloat16)
  backend: str | None = None  # the only backend it runs on (e.g. "gpu"), None for any

  @pytest.fixture(autouse=True)
  def _on_its_backend(self):
    if self.backend is not None and jaxattn._impl.common.platform() != self.backend:
      pytest.skip(f"{self.implementation} runs on {self.backend} only")

  def require(self, *features):
    """Skips the test unless the implementation serves every one of `features`."""
    missing = sorted(set(features) - self.serves)
    if missing:
      pytest.skip(f"{self.implementation} does not serve {', '.join(missing)}")

  # feature -> regex the refusal's message must match (default: any message)
  refusal_messages: dict[str, str] = {}

  def refuses(self, kw, T=T, S=S):
    """A context: expects NotImplementedError where `kw` uses an unserved feature."""
    missing = sorted(features_of(kw, T, S) - self.serves)
    if not missing:
      return contextlib.nullcontext()
    messages = [self.refusal_messages[f] for f in missing if f in self.refusal_messages]
    return pytest.raises(NotImplementedError, match="|".join(messages) or None)

  def attend(self, *args, **kw):
    if self.block_sizes is not None:
      kw.setdefault("block_sizes", self.block_sizes)
    return jaxattn.dot_product_attention(*args, implementation=self.implementation, **kw)

  def qkv(self, seed=0, dtype=jnp.float32, **sizes):
    dims = dict(B=B, T=T, S=S, N=N, K=K, H=H)
    dims.update(sizes)
    return testing.random_qkv(jax.random.key(seed), dtype=dtype, **dims)

  @pytest.mark.parametrize("name", GRID_NAMES)
  def test_matches_float64_reference_values_and_gradients(self, name):
    q, k, v = self.qkv()
    case = option_grid(jax.random.key(1))[name]
    with self.refuses(case):
      self._check_reference(q, k, v, case)

  def _check_reference(self, q, k, v, case):
    bias, mask, kw = _split(case)
    attend = lambda q, k, v, bias: self.attend(q, k, v, bias, mask, return_residual=True, **kw)
    check_against_reference(attend, q, k, v, bias, mask, kw)

  @pytest.mark.parametrize("name,layout", jax_nn_cases(JAX_NN_NAMES))
  def test_matches_jax_nn(self, name, layout):
    self.require("float32")  # jax.nn parity is checked at float32 tolerances
    grid = option_grid(jax.random.key(1), B=1 if layout == "TNH" else B)
    with self.refuses(grid[name]):
      self._check_jax_nn(grid[name], layout)

  def _check_jax_nn(self, case, layout):
    bias, mask, kw = _split(case)
    q, k, v = self.qkv(seed=3, layout=layout)
    if layout == "TNH":
      bias = None if bias is None else bias[0]
      mask = None if mask is None else mask[0]
    ours, ours_lse = self.attend(q, k, v, bias, mask, return_residual=True, **kw)
    theirs, theirs_lse = jax.nn.dot_product_attention(q, k, v, bias, mask, return_residual=True, **kw)
    # Rows with no key to attend to: ours 0 (lse -inf), jax.nn the mean of V.
    live = np.isfinite(np.asarray(ours_lse))
    np.testing.assert_allclose(np.asarray(ours)[live], np.asarray(theirs)[live], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(ours_lse)[live], np.asarray(theirs_lse)[live], atol=1e-5, rtol=1e-5)
    assert np.all(np.asarray(ours)[~live] == 0)
    # gradients of the output (jax.nn's residual is not differentiable)
    w = testing.random_normal(jax.random.key(4), q.shape)
    gours = jax.grad(lambda *a: jnp.sum(self.attend(*a, bias, mask, **kw) * w), (0, 1, 2))(q, k, v)
    gtheirs = jax.grad(lambda *a: jnp.sum(jax.nn.dot_product_attention(*a, bias, mask, **kw) * w * live[..., None]), (0, 1, 2))(q, k, v)
    chex.assert_trees_all_close(gours, gtheirs, atol=1e-5, rtol=1e-5)

  @pytest.mark.parametrize("heads", [(6, 6), (6, 2), (6, 1)], ids=["MHA", "GQA", "MQA"])
  def test_head_groupings(self, heads):
    n, kh = heads
    q, k, v = self.qkv(seed=5, N=n, K=kh)
    out = self.attend(q, k, v, is_causal=True)
    testing.assert_attention_close(out, testing.reference_attention(q, k, v, is_causal=True))

  @pytest.mark.parametrize("sizes", [dict(T=1, S=9), dict(T=9, S=1), dict(T=1, S=1), dict(T=13, S=4)])
  def test_odd_sizes_and_decoding(self, sizes):
    q, k, v = self.qkv(seed=6, **sizes)
    for kw in (dict(), dict(is_causal=True, causal_alignment="bottom_right")):
      with self.refuses(kw, q.shape[1], k.shape[1]):
        out, lse = self.attend(q, k, v, return_residual=True, **kw)
        ref, ref_lse = testing.reference_attention(q, k, v, return_residual=True, **kw)
        testing.assert_attention_close(out, ref)
        testing.assert_attention_close(lse, ref_lse)

  def test_fully_masked_rows_give_zero_and_finite_gradients(self):
    self.require("bias", "dense_mask")
    q, k, v = self.qkv(seed=7)
    mask = jnp.ones((B, N, T, S), bool).at[0, :, 1].set(False).at[1, 2].set(False)
    bias = jnp.zeros((B, N, T, S)).at[1, 0, 3].set(-jnp.inf)
    kv_len = jnp.array([0, S], jnp.int32)

    def loss(q, k, v, bias):
      out, lse = self.attend(q, k, v, bias, mask, key_value_seq_lengths=kv_len, return_residual=True)
      return jnp.sum(out * out) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0)), (out, lse)

    grads, (out, lse) = jax.grad(loss, (0, 1, 2, 3), has_aux=True)(q, k, v, bias)
    assert np.all(np.asarray(out[0]) == 0) and np.all(np.asarray(lse[0]) == -np.inf)
    assert np.all(np.asarray(out[1, :, 2]) == 0)      # head 2 masked in batch 1
    assert np.all(np.asarray(out[1, 3, 0]) == 0)      # -inf bias row
    chex.assert_tree_all_finite(grads)
    ref = testing.reference_attention(q, k, v, bias, mask, key_value_seq_lengths=kv_len)
    testing.assert_attention_close(out, ref)

  @pytest.mark.parametrize("magnitude", [1e2, 1e4])
  def test_large_logits(self, magnitude):
    self.require("float32")  # the tolerances below are float32 ones
    q, k, v = self.qkv(seed=8)
    q = q * magnitude  # logits around +-magnitude^1 * |k|
    out, lse = self.attend(q, k, v, is_causal=True, return_residual=True)
    chex.assert_tree_all_finite((out, lse))
    ref, ref_lse = testing.reference_attention(q, k, v, is_causal=True, return_residual=True)
    # float32 logits of size ~magnitude carry rounding error ~1e-7 * magnitude * sqrt(H).
    testing.assert_attention_close(out, ref, atol=1e-4)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-7 * magnitude * H)
    g = jax.grad(lambda q: jnp.sum(self.attend(q, k, v, is_causal=True)))(q)
    chex.assert_tree_all_finite(g)

  @pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
  def test_low_precision(self, dtype):
    self.require("bias")
    if dtype not in self.low_precision_dtypes:
      pytest.skip(f"{self.implementation} does not serve {jnp.dtype(dtype).name}")
    q, k, v = self.qkv(seed=9, dtype=dtype)
    bias = (10.0 * testing.random_normal(jax.random.key(1), (1, N, T, S))).astype(dtype)
    out, lse = self.attend(q, k, v, bias, is_causal=True, return_residual=True)
    assert out.dtype == dtype and lse.dtype == dtype
    ref, ref_lse = testing.reference_attention(q, k, v, bias, is_causal=True, return_residual=True)
    testing.assert_attention_close(out, ref, dtype=dtype)
    testing.assert_attention_close(lse, ref_lse, dtype=dtype)
    g = jax.grad(lambda q: jnp.sum(self.attend(q, k, v, bias, is_causal=True).astype(jnp.float32)))(q)
    assert g.dtype == dtype
    chex.assert_tree_all_finite(g)

  def test_jit_and_vmap(self):
    q, k, v = self.qkv(seed=10)
    ref = testing.reference_attention(q, k, v, is_causal=True)
    f = jax.jit(lambda q, k, v: self.attend(q, k, v, is_causal=True))
    testing.assert_attention_close(f(q, k, v), ref)
    # vmap over the batch of the 3D layout equals the 4D call
    per_example = jax.vmap(lambda q, k, v: self.attend(q, k, v, is_causal=True))(q, k, v)
    testing.assert_attention_close(per_example, ref)

  def test_no_retrace_on_repeated_shapes(self):
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(q, k, v):
      return self.attend(q, k, v, is_causal=True)

    for seed in range(3):
      q2, k2, v2 = self.qkv(seed=20 + seed)
      f(q2, k2, v2).block_until_ready()

  def test_value_head_dim_may_differ(self):
    self.require("value_head_dim")
    q, k, _ = self.qkv(seed=12)
    v = testing.random_normal(jax.random.key(13), (B, S, K, 4))
    f = lambda q, k, v: self.attend(q, k, v, is_causal=True)
    out, vjp = jax.vjp(f, q, k, v)
    assert out.shape == (B, T, N, 4)
    testing.assert_attention_close(out, testing.reference_attention(q, k, v, is_causal=True))
    do = testing.random_normal(jax.random.key(14), out.shape)
    ref = testing.reference_attention_vjp(q, k, v, d_out=do, is_causal=True)
    testing.assert_attention_close(vjp(do), (ref["query"], ref["key"], ref["value"]))

  def test_reruns_are_bitwise_equal(self):
    """The same call twice gives the same bits: outputs, lse and gradients (with
    dropout where served: its mask is a hash of the key, never a stateful draw)."""
    q, k, v = self.qkv(seed=15)
    kw = dict(option_grid(jax.random.key(1))["both_lengths_causal"])
    if "dropout" in self.serves:
      kw.update(dropout_rate=0.3, dropout_key=jax.random.key(7))

    def run():
      (out, lse), vjp = jax.vjp(lambda q, k, v: self.attend(q, k, v, return_residual=True, **kw), q, k, v)
      do, dl = random_cotangents(jax.random.key(16), out, lse)
      return out, lse, vjp((do, dl))

    chex.assert_trees_all_equal(run(), run())
