"""What every implementation shares: normalized arguments, masks built from
positions, and the counter-based dropout hash.

The public function validates and normalizes once; implementations receive an
`AttentionInputs` (arrays) and an `AttentionConfig` (static, hashable) and
never re-validate. Masks are computed from query and key *positions*, so the
materialized implementation evaluates them on the full (T, S) grid and a
blocked one on each (query block, key block) tile, with the same function.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.extend.backend
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxattn import masks as _masks
from jaxattn import scores as _scores


class AttentionInputs(NamedTuple):
  """Normalized array arguments (4D layouts, B filled in).

  query: (B, T, N, H); key: (B, S, K, H); value: (B, S, K, Hv).
  bias: None or 4D broadcastable to (B, N, T, S), each dim 1 or full.
  mask: None or boolean, same rule as bias.
  query_seq_lengths, key_value_seq_lengths: None or int32 (B,).
  query_segment_ids: None or int32 (B, T); key_value_segment_ids: (B, S).
  dropout_key: None or uint32 (2,) words seeding the dropout hash.
  mask_fn: None or a `jaxattn.masks.Mask` from the caller.
  score_fn: None or a `jaxattn.scores.ScoreMod` from the caller.
  """
  query: jax.Array
  key: jax.Array
  value: jax.Array
  bias: jax.Array | None = None
  mask: jax.Array | None = None
  query_seq_lengths: jax.Array | None = None
  key_value_seq_lengths: jax.Array | None = None
  query_segment_ids: jax.Array | None = None
  key_value_segment_ids: jax.Array | None = None
  dropout_key: jax.Array | None = None
  mask_fn: Any = None
  score_fn: Any = None


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """Static options, hashable so they can be jit static arguments.

  q_offset: position of query row 0 in key coordinates (0 for top-left causal
    alignment, S - T for bottom-right); causal and window masks compare
    `q_idx + q_offset` with `kv_idx`.
  window: (left, right) or None; either side may be None for unbounded.
  """
  scale: float
  is_causal: bool = False
  q_offset: int = 0
  window: tuple[int | None, int | None] | None = None
  logits_soft_cap: float | None = None
  dropout_rate: float = 0.0


def band(config: AttentionConfig) -> tuple[int | None, int | None] | None:
  """is_causal and local_window_size as one (left, right) band of keys around each
  query (None: unbounded side), or None when neither is set."""
  if not config.is_causal and config.window is None:
    return None
  left, right = config.window if config.window is not None else (None, None)
  if config.is_causal:
    right = 0 if right is None else min(right, 0)
  return left, right


def pad_axis(x, axis: int, size: int, value=0):
  """`x` padded with `value` at the end of `axis` to `size` (unchanged if it is that size)."""
  if x.shape[axis] == size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad, constant_values=value)


def combined_mask(inputs: AttentionInputs, config: AttentionConfig):
  """Every mask argument as one `jaxattn.masks.Mask` (None if nothing masks).

  is_causal and local_window_size become one band, lengths a padding mask,
  segment ids a documents mask, and the caller's mask_fn joins them. The dense
  `mask` array is not included: implementations slice it per tile.
  """
  sides = band(config)
  band_mask = None if sides is None else _masks.Band(*sides, config.q_offset)
  lengths = None
  if inputs.query_seq_lengths is not None or inputs.key_value_seq_lengths is not None:
    lengths = _masks.Lengths(inputs.query_seq_lengths, inputs.key_value_seq_lengths)
  docs = None
  if inputs.query_segment_ids is not None:
    docs = _masks.Documents(inputs.query_segment_ids, inputs.key_value_segment_ids)
  return _masks.all_of(band_mask, lengths, docs, inputs.mask_fn)


def zero_padding(inputs: AttentionInputs) -> AttentionInputs:
  """Zeroes the key/value slots and query rows that the lengths mask for every pair.

  A masked logit never reaches a probability (it is -inf), but masked slots
  still meet a zero weight in P V, dS K and dS^T Q, and 0 * NaN = NaN: padding
  is where real batches keep garbage, so it is replaced by 0 before any
  implementation sees it. Gradients for those slots are 0, as for any
  masked slot.
  """
  kv_len = inputs.key_value_seq_lengths
  return inputs._replace(query=zero_past(inputs.query, inputs.query_seq_lengths),
                         key=zero_past(inputs.key, kv_len), value=zero_past(inputs.value, kv_len))


def zero_past(x, n):
  """x (B, L, ...) with the rows at or past the lengths n (B,) replaced by 0 (x when n is None)."""
  if n is None:
    return x
  live = jnp.arange(x.shape[1])[None, :] < jnp.reshape(n, (-1, 1))         # (B, L)
  live = live.reshape(live.shape + (1,) * (x.ndim - 2))
  return jnp.where(live, x, jnp.zeros((), x.dtype))


def combined_score(inputs: AttentionInputs, config: AttentionConfig):
  """The caller's score_fn, then the soft-cap, as one modifier (or None)."""
  cap = None if config.logits_soft_cap is None else _scores.SoftCap(config.logits_soft_cap)
  return _scores.chain(inputs.score_fn, cap)


# Dropout: a keep decision for element (b, n, i, j) depends only on the key and
# those four indices, so any implementation, materialized or blocked, in any
# order, draws the same mask. The hash is a few rounds of a 32-bit integer
# mixer (the murmur3 finalizer) over the indices and the two key words.
def _fmix32(h):
  h = h ^ (h >> 16)
  h = h * np.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * np.uint32(0xC2B2AE35)
  h = h ^ (h >> 16)
  return h


def dropout_keep(key_data, rate: float, b_idx, n_idx, q_idx, kv_idx):
  """Boolean keep mask for attention-probability dropout.

  Args:
    key_data: uint32 (2,) raw key.
    rate: probability of dropping an element, in [0, 1).
    b_idx, n_idx, q_idx, kv_idx: int32 index arrays that broadcast together.

  Returns:
    A boolean array of the broadcast shape; True keeps the element.
  """
  u = lambda a: jnp.asarray(a).astype(jnp.uint32)
  h = _fmix32(u(key_data[0]) ^ _fmix32(u(b_idx) * np.uint32(0x9E3779B1) + u(n_idx)))
  h = _fmix32(h ^ u(q_idx) * np.uint32(0x85EBCA77))
  h = _fmix32(h ^ u(kv_idx) * np.uint32(0xC2B2AE3D) ^ u(key_data[1]))
  threshold = np.uint32(min(int(round(rate * 2.0**32)), 2**32 - 1))
  return h >= threshold


def dropout_keep_numpy(key_data, rate: float, b_idx, n_idx, q_idx, kv_idx):
  """NumPy twin of `dropout_keep`, for the float64 reference."""
  def fmix(h):
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))

  with np.errstate(over="ignore"):
    u = lambda a: np.asarray(a).astype(np.uint32)
    k = np.asarray(key_data).astype(np.uint32)
    h = fmix(k[0] ^ fmix(u(b_idx) * np.uint32(0x9E3779B1) + u(n_idx)))
    h = fmix(h ^ u(q_idx) * np.uint32(0x85EBCA77))
    h = fmix(h ^ u(kv_idx) * np.uint32(0xC2B2AE3D) ^ k[1])
  threshold = np.uint32(min(int(round(rate * 2.0**32)), 2**32 - 1))
  return h >= threshold


def inexact_leaves(tree) -> list[int]:
  """Indices of the leaves of `tree` that carry gradients (inexact dtypes)."""
  leaves = jax.tree_util.tree_leaves(tree)
  return [i for i, x in enumerate(leaves) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]


def leaf_cotangents(tree, grads: dict[int, Any]):
  """A cotangent for the pytree `tree` from `grads`, {leaf index: gradient}.

  Inexact leaves get their gradient cast to their dtype (zeros where `grads`
  has none); other leaves get the float0 zeros custom VJPs must return.
  """
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  out: list[Any] = []
  for i, x in enumerate(leaves):
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.inexact):
      out.append(np.zeros(jnp.shape(x), jax.dtypes.float0))
    elif i in grads:
      out.append(jnp.asarray(grads[i]).astype(dtype))
    else:
      out.append(jnp.zeros(jnp.shape(x), dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


def stat_dtype(dtype):
  """The dtype of logits, softmax statistics and accumulators for inputs of `dtype`:
  float32 for half precision and float32, float64 for float64."""
  return jnp.promote_types(dtype, jnp.float32)


def two_sum(a, b):
  """(hi, lo) with hi = fl(a + b) and hi + lo = a + b exactly (Knuth's TwoSum).

  The blocked backward recomputes probabilities as exp((s - hi) - lo): with hi
  alone (a logsumexp rounded at the logits' magnitude) every probability of
  a row with logits ~ 1e4 would be off by ~1e-3 relative in float32.
  """
  hi = a + b
  bb = hi - a
  lo = (a - (hi - bb)) + (b - bb)
  return hi, lo


def platform(backend: str | None = None) -> str:
  """`backend` (default: `jax.default_backend()`) with "cuda" and "rocm" read as "gpu".

  Other names ("cpu", "tpu", a plugin's) come back as they are.
  """
  backend = jax.default_backend() if backend is None else backend
  return "gpu" if backend in ("gpu", "cuda", "rocm") else backend


def cuda_gpu() -> tuple[bool, str | None, str]:
  """(the default backend is a CUDA GPU, its compute capability or None, the backend's name).

  A GPU backend whose platform version does not say CUDA (ROCm) is named
  "gpu (<platform>)", e.g. "gpu (rocm)", and has no compute capability here.
  """
  backend = jax.default_backend()
  if backend != "gpu":
    return False, None, backend
  try:
    platform_version = jax.extend.backend.get_backend().platform_version.lower()
  except Exception:  # pragma: no cover - depends on the installed plugin
    platform_version = "cuda"
  if "cuda" not in platform_version:
    return False, None, "gpu (" + platform_version.split()[0] + ")"
  return True, getattr(jax.devices()[0], "compute_capability", None), backend


# ---------------------------------------------------------------------------
# Choices made once for a whole vmapped batch. A `lax.cond` / `lax.switch` on a
# batched predicate or index becomes a select that runs every branch (and that
# JAX cannot transpose through a linear function); on these it stays a branch.


@jax.custom_batching.custom_vmap
def everywhere(pred):
  """`pred` (a bool scalar); under `vmap`, whether it holds for every example."""
  return pred


@everywhere.def_vmap
def _everywhere_vmap(axis_size, in_batched, pred):
  del axis_size, in_batched
  return jnp.all(pred), False


@jax.custom_batching.custom_vmap
def uniform_kind(kind):
  """A block kind (0 empty, 1 partial, 2 full); under `vmap`, one kind for the
  whole batch: 0 if empty everywhere, 2 if full everywhere, else 1 (the masked
  branch, exact for empty and full blocks too)."""
  return kind


@uniform_kind.def_vmap
def _uniform_kind_vmap(axis_size, in_batched, kind):
  del axis_size, in_batched
  return jnp.where(jnp.all(kind == 0), 0, jnp.where(jnp.all(kind == 2), 2, 1)).astype(kind.dtype), False


def varying_axes(x) -> frozenset:
  """The manual mesh axes (inside `shard_map`) that `x` varies over; empty elsewhere."""
  mat = jax.ShapeDtypeStruct.like(x).manual_axis_type
  return frozenset() if mat is None else frozenset(mat.varying)


def vary_over(y, axes: frozenset):
  """`y` made to vary over `axes` as well (`lax.pcast`); `y` itself where it already does."""
  missing = axes - varying_axes(y)
  return y if not missing else lax.pcast(y, tuple(sorted(missing, key=str)), to="varying")


def vary_alike(tree):
  """`tree` with every array leaf (but PRNG keys) cast to vary over the manual
  mesh axes (inside `shard_map`) that any of them varies over.

  The blocked kernels combine queries, keys, values, a bias and function
  parameters in one loop body, whose branches must agree on their types:
  keys sharded where the queries are replicated, or a bias varying over a
  mesh axis the queries do not, raised switch-branch type errors. And where
  a value from outside the shard_map meets per-device logits inside a loop,
  JAX casts it there, and the cast's transpose (the psum of its gradient)
  would run once per tile; with per-device block counts the devices waited
  for each other forever. Cast once here, outside the kernels' custom
  derivatives, the transposes run once, outside every loop. Outside a
  shard_map nothing is cast: dtypes, weak types and vmap's batching stay.
  """
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  arrays = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array)
            and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)]
  axes = frozenset().union(*(varying_axes(leaves[i]) for i in arrays))
  if axes:
    for i in arrays:
      leaves[i] = vary_over(leaves[i], axes)
  return jax.tree_util.tree_unflatten(treedef, leaves)
