"""The decode kernels behind `jaxattn.decode.decode_attention`: an online softmax
over blocks of a key/value cache for few queries (all T x N query rows of a
key/value head in each block's matmul), split-KV (flash-decoding: chunks of the
cache attended independently and merged by their logsumexps) and reads of a
paged cache through its page table. Arguments arrive validated.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxattn import _checks
from jaxattn._impl import common, softmax_state

# Split-KV: chunks of at least this many keys, at most this many chunks.
_SPLIT_MIN_CHUNK = 2048
_SPLIT_MAX_CHUNKS = 16
# Bytes of keys and values per online-softmax step (see default_block_size).
_STEP_BYTES = 4 << 20


def _query_rows(query, K):
  """(B, T, N, H) -> (B, K, T*G, H), rows ordered (t, g): K/V are never repeated."""
  B, T, N, H = query.shape
  G = N // K
  return query.reshape(B, T, K, G, H).transpose(0, 2, 1, 3, 4).reshape(B, K, T * G, H)


def _real_rows_only(q, row_real):
  """q (B, K, R, H) with the rows that are not real set to 0: their logits are
  masked, but the logits' transpose (dK = dS^T q) would still meet 0 * NaN
  where such a row holds garbage (padding past query_seq_lengths)."""
  return jnp.where(row_real[:, None, :, None], q, jnp.zeros((), q.dtype))


def _from_rows(out, lse, T, G):
  """(B, K, T*G, H), (B, K, T*G) -> (B, T, N, H), (B, T, N)."""
  B, K, _, H = out.shape
  out = out.reshape(B, K, T, G, H).transpose(0, 2, 1, 3, 4).reshape(B, T, K * G, H)
  lse = lse.reshape(B, K, T, G).transpose(0, 2, 1, 3).reshape(B, T, K * G)
  return out, lse


def _row_positions(lengths, q_lengths, T, G, L):
  """Per query row (B, T*G): its absolute position and whether it is real.

  A row is real if it is one of the n[b] new tokens and its key was stored
  (position < L): a query whose token overflowed the cache gives 0.
  """
  lengths = jnp.maximum(lengths, 0)
  q_lengths = jnp.clip(q_lengths, 0, T)
  t = jnp.arange(T, dtype=jnp.int32)[None, :]
  pos = lengths[:, None] - q_lengths[:, None] + t
  real = (t < q_lengths[:, None]) & (pos < L)
  rep = lambda x: jnp.broadcast_to(x[:, :, None], x.shape + (G,)).reshape(x.shape[0], T * G)
  return rep(pos), rep(real)


def _allowed(kv_pos, row_pos, row_real, window_left):
  """Causal (+ window) mask; kv_pos broadcasts against row_pos/row_real."""
  ok = (kv_pos <= row_pos) & row_real
  if window_left is not None:
    ok = ok & (kv_pos >= row_pos - window_left)
  return ok


def _soft_cap(logits, cap):
  """`cap * tanh(logits / cap)` (Gemma 2); identity when cap is None."""
  return logits if cap is None else cap * jnp.tanh(logits / cap)


def _finish(state: softmax_state.State):
  """Normalizes an online-softmax state; empty rows give 0 and lse -inf.

  A row whose sum is NaN (NaN logits) keeps lse NaN here, as decode always
  returned (`softmax_state.finalize` gives it -inf); its output is NaN either way.
  """
  out, lse, _ = softmax_state.finalize(state)
  return out, jnp.where(jnp.isnan(state.l), state.l, lse)


def _online_softmax(q, read, num_blocks, lo, hi, row_pos, row_real, kv_lengths, *, scale,
                    soft_cap, window_left, value_dtype, chunks=None):
  """Online softmax of rows q (B, K, R, H) over key blocks lo .. hi - 1 of num_blocks.

  `read(j)` returns block j: keys and values (B, K, [P,] C, H), their
  positions ([P,] C) and which of them are this block's own ((B or 1, [P,]
  C) bool: a clamped last block overlaps its neighbour; a page with an
  invalid id is no one's). With `chunks` = P, every step reads one block of
  each of P independent chunks and keeps P states. Keys at or past
  `kv_lengths` (B,) (stale slots) and not own are replaced by 0 with a
  `where` before any arithmetic, so NaN or inf there never reaches an output
  or a gradient. Returns the `softmax_state.State` (max, sum, output sum),
  (B, K, [P,] R[, H]), in float32 (float64 for float64 inputs).

  The loop has a static trip count, so reverse-mode differentiation works;
  blocks outside [lo, hi) (beyond every sequence's length, or before every
  query's window) are skipped by a `lax.cond` and never read.
  """
  B, K, R, H = q.shape
  acc = common.stat_dtype(q.dtype)  # float32, float64 for float64 inputs
  lead = () if chunks is None else (chunks,)
  if chunks is not None:  # (b, k, p) as the batch of both matmuls
    q = jnp.broadcast_to(q[:, :, None], (B, K, chunks, R, H))
  spec = "bkrh,bkch->bkrc" if chunks is None else "bkprh,bkpch->bkprc"
  pv_spec = "bkrc,bkch->bkrh" if chunks is None else "bkprc,bkpch->bkprh"
  # Broadcast row data against ([P,] R, C) tiles.
  ex = (slice(None),) + (None,) * len(lead) + (slice(None), None)
  rpos, rreal = row_pos[ex], row_real[ex]                            # (B, [1,] R, 1)

  def body(j, state):
    kb, vb, kv_pos, own = read(j)
    stored = own & (kv_pos[None] < kv_lengths.reshape((B,) + (1,) * kv_pos.ndim))  # (B, [P,] C)
    keep = stored[:, None, ..., None]                                # (B, 1, [P,] C, 1)
    kb, vb = jnp.where(keep, kb, 0), jnp.where(keep, vb, 0)
    s = jnp.einsum(spec, q, kb, preferred_element_type=acc) * jnp.asarray(scale, acc)
    s = _soft_cap(s, soft_cap)
    kv_pos = kv_pos[..., None, :][None]                              # (1, [P,] 1, C)
    ok = _allowed(kv_pos, rpos, rreal, window_left) & stored[..., None, :]
    s = jnp.where(ok[:, None], s, -jnp.inf)                          # (B, K, [P,] R, C)
    return softmax_state.update(
        state, s, lambda e: jnp.einsum(pv_spec, e.astype(value_dtype), vb,
                                       preferred_element_type=acc))

  def maybe(j, carry):
    # Under vmap with per-example lengths the predicate is batched, and a batched
    # cond becomes a select, which reverse mode cannot transpose through this
    # loop (the softmax state's stop_gradient): the block runs when any example
    # needs it (exact for the others: their keys there are all masked).
    skip = common.everywhere((j < lo) | (j >= hi))
    return lax.cond(skip, lambda c: c, lambda c: body(j, c), carry)

  # zeros_like q: its sharding, which the blocks' results have (explicit mesh
  # axes need the cond's two branches to agree on it).
  zero_rows = jnp.zeros_like(q[..., 0], acc)                         # (B, K, [P,] R)
  init = softmax_state.init(zero_rows, jnp.broadcast_to(zero_rows[..., None], zero_rows.shape + (H,)))
  return lax.fori_loop(0, num_blocks, maybe, init)


def _visible_span(row_pos, row_real, window_left):
  """Keys [first, end) that some real query row can see: first is 0 without
  a window; end is 0 when no row is real."""
  end = jnp.max(jnp.where(row_real, row_pos + 1, 0))
  if window_left is None:
    return jnp.int32(0), end
  big = jnp.iinfo(jnp.int32).max
  return jnp.maximum(jnp.min(jnp.where(row_real, row_pos - window_left, big)), 0), end


def default_block_size(batch: int, num_kv_heads: int, head_dim: int, dtype) -> int:
  """Keys per online-softmax step: about 4 MiB of keys and values per step.

  Measured on 2-core x86 CPUs (bench/decode.py): the step's working set must
  stay near the caches, so a larger batch takes shorter blocks (64 keys for
  B=8, K=8, H=128 float32; 256 for B=2). A power of two in [16, 1024].
  """
  if not _checks.concrete_sizes(batch):
    batch = 8  # a symbolic batch (jax.export): sized for a typical serving batch
  per_key = 2 * batch * num_kv_heads * head_dim * jnp.dtype(dtype).itemsize
  n = max(1, _STEP_BYTES // per_key)
  return int(min(1024, max(16, 1 << (n.bit_length() - 1))))


def default_num_splits(T: int, N: int, L: int, backend: str | None = None) -> int:
  """Split-KV chunks chosen for T queries of N heads against L cached keys.

  On accelerators: one chunk unless the queries are few (T * N <= 64) and the
  cache long; then the largest P <= 16 dividing L with chunks of at least 2048
  keys, so that the chunks fill the device. On CPU: one chunk, since XLA:CPU
  already spreads each step over the cores (B * K slabs) and P chunks per
  step only enlarge its working set (measured slower, bench/decode.py).
  """
  if common.platform(backend) == "cpu" or T * N > 64:
    return 1
  for P in range(min(_SPLIT_MAX_CHUNKS, L // _SPLIT_MIN_CHUNK), 1, -1):
    if L % P == 0:
      return P
  return 1


def _blocked(query, key, value, lengths, q_lengths, *, scale, soft_cap, window_left,
             num_splits, block_size):
  """Decode kernel over a contiguous (B, K, L, H) cache: P chunks, merged by logsumexp.

  The P chunks are an independent (batch) axis of every step (flash-decoding);
  within them an online softmax walks key blocks, reading only the blocks
  that hold keys some query can see (a partly filled cache costs its filled
  part).
  """
  B, T, N, H = query.shape
  _, K, L, _ = key.shape
  G, P = N // K, num_splits
  Lp = L // P
  Cb = min(max(1, block_size // P), Lp)  # block_size keys per step over all P chunks
  nb = -(-Lp // Cb)
  q = _query_rows(query, K)                                          # (B, K, R, H)
  row_pos, row_real = _row_positions(lengths, q_lengths, T, G, L)   # (B, R)
  q = _real_rows_only(q, row_real)
  base = (jnp.arange(P, dtype=jnp.int32) * Lp)[:, None]              # (P, 1)

  def read(j):
    # The last block is clamped to end at Lp and overlaps its neighbour: `own`
    # marks the keys that are this block's.
    start = jnp.minimum(j * Cb, Lp - Cb)
    idx = start + jnp.arange(Cb, dtype=jnp.int32)
    own = idx >= j * Cb
    if P == 1:
      block = lambda x: lax.dynamic_slice_in_dim(x, start, Cb, axis=2)
      return block(key), block(value), idx, own[None]
    # Reshaped inside the loop: a reshaped loop invariant makes XLA copy the cache.
    block = lambda x: lax.dynamic_slice_in_dim(x.reshape(B, K, P, Lp, H), start, Cb, axis=3)
    return block(key), block(value), base + idx[None, :], jnp.broadcast_to(own, (1, P, Cb))

  # Chunk p's block j holds keys p * Lp + [j * Cb, (j + 1) * Cb): chunk 0 needs
  # the most blocks, the last chunk the earliest (with a window).
  first, end = _visible_span(row_pos, row_real, window_left)
  hi = jnp.clip((jnp.minimum(end, Lp) + Cb - 1) // Cb, 0, nb)
  lo = 0
  if window_left is not None:
    lo = jnp.clip((first - (P - 1) * Lp) // Cb, 0, hi)
  state = _online_softmax(q, read, nb, lo, hi, row_pos, row_real,
                          jnp.clip(lengths, 0, L), scale=scale,
                          soft_cap=soft_cap, window_left=window_left,
                          value_dtype=value.dtype, chunks=None if P == 1 else P)
  if P > 1:  # exact merge across the chunks (B, K, P, R[, H])
    state = softmax_state.reduce(state, axis=2)
  out, lse = _finish(state)
  out, lse = _from_rows(out, lse, T, G)
  return out.astype(query.dtype), lse


def _one_pass(query, key, value, lengths, q_lengths, *, scale, soft_cap, window_left):
  """Every cached key's logit at once, one softmax, one weighted sum of values.

  No loop and no copy of the cache: on XLA:CPU a loop step's dynamic slices
  are copies and its (B, K, T * G, block) matmuls are small, so reading the
  cache in one matmul is about 1.5x as fast (bench/decode.py). Stale slots
  are masked in the logits only: a stale key never counts, but NaN or inf in
  a stale value makes this output non-finite (its weight 0 times inf), and
  `_one_pass_or_blocked` then reruns the blocked kernel, which zeroes them.
  Its temporaries are the (B, K, L, T * G) float32 (float64) logits, their
  exponentials and a (B, L, T * G) mask, which the caller bounds
  (`one_pass_fits`).
  """
  B, T, N, H = query.shape
  _, K, L, _ = key.shape
  G = N // K
  q = _query_rows(query, K)                                          # (B, K, R, H)
  row_pos, row_real = _row_positions(lengths, q_lengths, T, G, L)   # (B, R)
  q = _real_rows_only(q, row_real)
  kv_pos = jnp.arange(L, dtype=jnp.int32)
  stored = kv_pos[None, :] < jnp.clip(lengths, 0, L)[:, None]        # (B, L)
  ok = _allowed(kv_pos[None, :, None], row_pos[:, None, :], row_real[:, None, :],
                window_left) & stored[:, :, None]                    # (B, L, R)
  # Logits (B, K, L, R), keys before rows: with few rows, XLA:CPU's matmul
  # reads the cache about 1.3x faster writing this layout than (B, K, R, L).
  acc = common.stat_dtype(query.dtype)
  s = jnp.einsum("bkrh,bklh->bklr", q, key, preferred_element_type=acc) * jnp.asarray(scale, acc)
  s = jnp.where(ok[:, None], _soft_cap(s, soft_cap), -jnp.inf)
  R = q.shape[2]
  init = softmax_state.init(jnp.zeros((B, K, R), acc), jnp.zeros((B, K, R, H), acc))
  state = softmax_state.update(init, s, lambda e: jnp.einsum(
      "bklr,bklh->bkrh", e.astype(value.dtype), value, preferred_element_type=acc),
      key_axis=-2)
  out, lse = _finish(state)
  out, lse = _from_rows(out, lse, T, G)
  return out.astype(query.dtype), lse


def one_pass_fits(B: int, T: int, N: int, L: int, kv_bytes: int, backend: str | None = None
                  ) -> bool:
  """Whether `_split_kv` may take the one-pass kernel for this problem.

  On CPU only (measured there), when its float32 logits (B, N, T, L) stay
  within an eighth of the cache's key and value bytes, or 16 MiB (its
  temporaries are about three times the logits: with their exponentials and
  the mask).
  """
  if not _checks.concrete_sizes(B, T, N, L):
    return False  # symbolic sizes (jax.export): the blocked kernel serves any size
  logits = 4 * B * N * T * L
  return common.platform(backend) == "cpu" and logits <= max(kv_bytes // 8, 16 << 20)


@functools.partial(jax.custom_jvp, nondiff_argnums=(5,))
def _one_pass_or_blocked(query, key, value, lengths, q_lengths, options):
  """`_one_pass` when the visible keys span at least `_ONE_PASS_MIN_SPAN` of
  the cache and its output is finite, else `_blocked`.

  A non-finite one-pass output comes from NaN or inf in a stale value slot
  (its weight 0 times inf; stale keys are masked in the logits) or in the
  visible keys and values (where the blocked kernel gives NaN as well). The
  blocked kernel is traced once. Derivatives always come from it (its JVP,
  and the transpose of that for gradients), which never multiplies a stale
  slot.
  """
  one, blocked = options
  args = (query, key, value, lengths, q_lengths)
  B, T, N, _ = query.shape
  _, K, L, _ = key.shape
  # Real rows sit before L (`_row_positions`), so end <= L.
  first, end = _visible_span(*_row_positions(lengths, q_lengths, T, N // K, L), one["window_left"])
  wide = common.everywhere((end - first).astype(jnp.float32) >= _ONE_PASS_MIN_SPAN * L)
  # full_like: the query's sharding (explicit mesh axes need both branches' types equal).
  skipped = lambda: (jnp.full_like(query, jnp.nan),
                     jnp.full_like(query[..., 0], jnp.nan, common.stat_dtype(query.dtype)))
  out, lse = lax.cond(wide, lambda: _one_pass(*args, **one), skipped)
  use = common.everywhere(wide & jnp.all(jnp.isfinite(out)))
  return lax.cond(use, lambda: (out, lse), lambda: _blocked(*args, **blocked))


@_one_pass_or_blocked.defjvp
def _one_pass_or_blocked_jvp(options, primals, tangents):
  return jax.jvp(functools.partial(_blocked, **options[1]), primals, tangents)


# The one-pass kernel runs when the visible span covers at least this share of
# the cache: it reads all of it, the blocked kernel only the span, at about
# 1.5x the cost per key on 2-core x86 (bench/decode.py --fill: the two
# cross near 70%).
_ONE_PASS_MIN_SPAN = 0.7


class _Frozen(dict):
  """A hashable dict of static keyword arguments (custom_jvp's nondiff_argnums)."""

  def __hash__(self):
    return hash(tuple(sorted(self.items())))


@functools.partial(jax.jit, static_argnames=("scale", "soft_cap", "window_left", "num_splits",
                                             "block_size", "one_pass"))
def _split_kv(query, key, value, lengths, q_lengths, *, scale, soft_cap, window_left,
              num_splits, block_size, one_pass=False):
  """The contiguous-cache decode kernel: `_blocked`, or with `one_pass`
  (chosen by the caller from the backend and the logits' size)
  `_one_pass_or_blocked`."""
  blocked = dict(scale=scale, soft_cap=soft_cap, window_left=window_left,
                 num_splits=num_splits, block_size=block_size)
  args = (query, key, value, lengths, q_lengths)
  if not one_pass:
    return _blocked(*args, **blocked)
  options = (_Frozen(scale=scale, soft_cap=soft_cap, window_left=window_left), _Frozen(blocked))
  return _one_pass_or_blocked(*args, options)


@functools.partial(jax.jit, static_argnames=("scale", "soft_cap", "window_left",
                                             "pages_per_step"))
def _paged(query, key_pages, value_pages, page_table, lengths, q_lengths, *, scale,
           soft_cap, window_left, pages_per_step):
  """Online softmax over the page table, W pages of each sequence per step.

  Each step reads B * W pages by index; the cache is never assembled into a
  contiguous copy. The loop covers the pages that hold keys some query can
  see.
  """
  B, T, N, H = query.shape
  _, K, S, _ = key_pages.shape
  M = page_table.shape[1]
  G, W = N // K, pages_per_step
  q = _query_rows(query, K)
  num_pages = key_pages.shape[0]
  row_pos, row_real = _row_positions(lengths, q_lengths, T, G, M * S)
  q = _real_rows_only(q, row_real)
  nb = -(-M // W)
  first, end = _visible_span(row_pos, row_real, window_left)
  hi = jnp.clip((end + W * S - 1) // (W * S), 0, nb)
  lo = 0
  if window_left is not None:
    lo = jnp.clip(first // (W * S), 0, hi)

  def read(j):
    cols = j * W + jnp.arange(W, dtype=jnp.int32)
    ids = jnp.take(page_table, jnp.minimum(cols, M - 1), axis=1)   # (B, W)
    # (B, W, K, S, H) -> (B, K, W * S, H): one block of W pages, in the cache.
    block = lambda x: jnp.take(x, ids, axis=0, mode="clip").transpose(0, 2, 1, 3, 4).reshape(
        B, K, W * S, H)
    pos = (cols[:, None] * S + jnp.arange(S, dtype=jnp.int32)[None, :]).reshape(W * S)
    # A page id outside [0, num_pages) is never read: its (clipped) page is no one's.
    valid = (cols[None, :] < M) & (ids >= 0) & (ids < num_pages)      # (B, W)
    own = jnp.broadcast_to(valid[:, :, None], (B, W, S)).reshape(B, W * S)
    return block(key_pages), block(value_pages), pos, own

  state = _online_softmax(q, read, nb, lo, hi, row_pos, row_real,
                          jnp.clip(lengths, 0, M * S), scale=scale,
                          soft_cap=soft_cap, window_left=window_left,
                          value_dtype=value_pages.dtype)
  out, lse = _finish(state)
  out, lse = _from_rows(out, lse, T, G)
  return out.astype(query.dtype), lse
