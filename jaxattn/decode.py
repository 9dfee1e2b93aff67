r"""Decoding: a KV cache, attention of new tokens against it, split-KV, paged caches.

Generation runs a model on a few new tokens at a time against the keys and
values of everything before them. This module keeps those in a cache and
attends to it:

- `KVCache`: contiguous per-sequence storage with per-sequence lengths, so a
  batch may hold sequences of different lengths (ragged batches).
- `PagedKVCache`: fixed-size pages shared by all sequences and a page table
  per sequence (vLLM's block tables, Kwon et al., 2023, arXiv:2309.06180).
- `update_kv_cache` writes T new tokens per sequence at that sequence's own
  length; `decode_attention` attends T queries to the cache with bottom-right
  causal alignment per sequence: query t of row b sits at position
  `lengths[b] - n[b] + t` (n[b] new tokens), so it sees every earlier token
  and the new tokens up to itself.
- `multi_head_attention_decode`: the multi-head layer's cached path (project,
  RoPE at positions taken from the cache lengths, append, attend, project).

Kernels. A KVCache is attended by an online softmax (Milakov & Gimelshein,
2018; FlashAttention, Dao et al., 2022) over blocks of keys: each step reads
one (B, K, block, H) slab of keys and values, and blocks beyond every
sequence's length (or before every query's window) are skipped, so a partly
filled cache costs what it holds. Split-KV ("Flash-Decoding", Dao, Haziza,
Massa & Sizov, 2023) cuts the key axis into P chunks that are attended
independently (a batch axis of every step, not a loop) and merged exactly by
their logsumexps:

.. math:: \mathrm{lse} = \log \textstyle\sum_p e^{\mathrm{lse}_p},\quad
   o = \sum_p e^{\mathrm{lse}_p - \mathrm{lse}}\, o_p .

A PagedKVCache is walked the same way, a few pages of every sequence per
step, read by index from the pool. Long query blocks (prefill) go to
`dot_product_attention` with a per-sequence causal mask.

Layout. Caches are stored head-major, key and value (B, K, L, H) (and pages
(num_pages, K, page_size, H)), as Hugging Face's cache and vLLM's pages are:
each (sequence, head) is one contiguous (L, H) slab, so the decode matmuls
read the cache in place. With the (B, L, K, H) layout of
`dot_product_attention` the same matmuls make XLA transpose the whole cache
first (several times slower on CPU; bench/decode.py's jax.nn row). New tokens
come in, and queries and outputs go, in the usual (B, T, K, H) / (B, T, N, H)
layouts.

Everything is a pure function of arrays: lengths and page tables are array
leaves, so appending under `jax.jit` never retraces per position. Jit the step
with the cache donated (`donate_argnums`) so the append writes in place.

Bad input. Shapes and dtypes are checked at trace time. Values (lengths,
page ids) are checked when they are concrete, i.e. when `update_kv_cache` or
`decode_attention` is called outside jit; these raise ValueError:

- `cache.lengths` negative or above the capacity L (pages_per_sequence *
  page_size for a paged cache);
- `seq_lengths` / `query_seq_lengths` outside [0, T];
- an append whose tokens do not fit (`lengths + seq_lengths > L`);
- `query_seq_lengths` above `cache.lengths` (the queries' keys are not in
  the cache);
- a page table entry outside [0, num_pages) for a page that holds (or is
  about to hold) tokens. Entries no token reaches may hold anything, e.g. -1.

Under jit the same values are traced and cannot raise; they are masked, and
never corrupt the cache or reach an output:

- negative lengths count as 0;
- an append that overflows writes the tokens that fit and drops the rest;
  the lengths still count every token (they may exceed L, which marks the
  overflow). Queries keep their true positions `lengths - n + t`, so a query
  sits with its own key, and a query whose key was dropped gives 0, as
  padding does;
- a page id outside [0, num_pages) is never written (no wrap-around to
  another page) and never read: the tokens it should hold are missing;
- slots at or past `lengths` (stale data, anything: NaN, inf) reach neither
  outputs nor gradients: every kernel replaces them by 0 with a `where`
  before any arithmetic, except the CPU one-pass kernel, which masks stale
  keys in its logits and hands the step to the blocked kernel when a stale
  value makes its output non-finite.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn import _checks
from jaxattn import attention as _attention
from jaxattn._impl import common
from jaxattn._impl.decode_kernels import (
    _allowed,
    default_block_size,
    default_num_splits,
    one_pass_fits,
    _paged,
    _row_positions,
    _split_kv,
)

# Queries (T * N) up to this use the decode kernel (all T * N query rows in each
# block's matmul); longer prefills go to dot_product_attention, whose blocked
# implementation also tiles the queries and skips blocks above the diagonal.
_DECODE_MAX_QUERY_ROWS = 256
_fmt = _checks.dims


class KVCache(NamedTuple):
  """A contiguous key/value cache for a batch of sequences.

  Attributes:
    key: (B, K, L, H): batch, key/value heads, max length, head dim.
    value: (B, K, L, H).
    lengths: int32 (B,): tokens stored per sequence; positions at or past it
      hold nothing meaningful.
  """
  key: jax.Array
  value: jax.Array
  lengths: jax.Array


class PagedKVCache(NamedTuple):
  """A paged key/value cache: fixed-size pages and a page table per sequence.

  Token p of sequence b lives in page `page_table[b, p // page_size]` at
  offset `p % page_size`. Pages may sit anywhere in the pool and sequences may
  share read-only pages (a common prompt); two sequences must not write to
  the same page.

  Attributes:
    key_pages: (num_pages, K, page_size, H).
    value_pages: (num_pages, K, page_size, H).
    page_table: int32 (B, pages_per_sequence): page ids, in [0, num_pages).
    lengths: int32 (B,): tokens stored per sequence.
  """
  key_pages: jax.Array
  value_pages: jax.Array
  page_table: jax.Array
  lengths: jax.Array


# ---------------------------------------------------------------------------
# init


def init_kv_cache(batch: int, max_length: int, num_kv_heads: int, head_dim: int,
                  dtype=jnp.float32) -> KVCache:
  """Creates an empty contiguous cache (zeros, all lengths 0).

  Args:
    batch: B, sequences.
    max_length: L, tokens each sequence can hold.
    num_kv_heads: K.
    head_dim: H.
    dtype: storage dtype of keys and values (queries must match it).

  Returns:
    KVCache with key and value (B, K, L, H) and lengths (B,) int32.

  Raises:
    ValueError: a size is not a positive int.
    TypeError: dtype is not floating point.

  >>> import jaxattn.decode as dec
  >>> dec.init_kv_cache(2, 16, 3, 8).key.shape
  (2, 3, 16, 8)
  """
  fn = "init_kv_cache"
  B = _checks.positive_int(fn, "batch", batch)
  L = _checks.positive_int(fn, "max_length", max_length)
  K = _checks.positive_int(fn, "num_kv_heads", num_kv_heads)
  H = _checks.positive_int(fn, "head_dim", head_dim)
  dtype = _checks.float_dtype(fn, "dtype", dtype)
  # Two buffers: a jitted step that donates the cache would donate one buffer twice.
  return KVCache(jnp.zeros((B, K, L, H), dtype), jnp.zeros((B, K, L, H), dtype),
                 jnp.zeros((B,), jnp.int32))


def init_paged_kv_cache(batch: int, num_pages: int, page_size: int, num_kv_heads: int,
                        head_dim: int, dtype=jnp.float32, *, page_table=None) -> PagedKVCache:
  """Creates an empty paged cache.

  Args:
    batch: B, sequences.
    num_pages: pages in the pool.
    page_size: tokens per page.
    num_kv_heads: K.
    head_dim: H.
    dtype: storage dtype.
    page_table: int (B, pages_per_sequence) page ids in [0, num_pages); by
      default sequence b owns pages [b * M, (b + 1) * M) with
      M = num_pages // B.

  Returns:
    PagedKVCache; each sequence holds up to pages_per_sequence * page_size
    tokens.

  Raises:
    ValueError: a size is not a positive int, num_pages < B without a page
      table, or page_table has the wrong shape.
    TypeError: dtype not floating point, page_table not integer.

  >>> import jaxattn.decode as dec
  >>> c = dec.init_paged_kv_cache(2, num_pages=8, page_size=4, num_kv_heads=3, head_dim=8)
  >>> c.key_pages.shape, c.page_table.tolist()
  ((8, 3, 4, 8), [[0, 1, 2, 3], [4, 5, 6, 7]])
  """
  fn = "init_paged_kv_cache"
  B = _checks.positive_int(fn, "batch", batch)
  P = _checks.positive_int(fn, "num_pages", num_pages)
  S = _checks.positive_int(fn, "page_size", page_size)
  K = _checks.positive_int(fn, "num_kv_heads", num_kv_heads)
  H = _checks.positive_int(fn, "head_dim", head_dim)
  dtype = _checks.float_dtype(fn, "dtype", dtype)
  if page_table is None:
    if P < B:
      raise ValueError(f"{fn}: num_pages must be at least batch B = {B} to give each "
                       f"sequence a page; got {P}.")
    M = P // B
    page_table = jnp.arange(B * M, dtype=jnp.int32).reshape(B, M)
  else:
    page_table = jnp.asarray(page_table)
    if not jnp.issubdtype(page_table.dtype, jnp.integer):
      raise TypeError(f"{fn}: page_table must be integer; got {page_table.dtype}.")
    if page_table.ndim != 2 or page_table.shape[0] != B or page_table.shape[1] == 0:
      raise ValueError(f"{fn}: page_table must have shape (B, pages_per_sequence) with "
                       f"B = {B}; got {_fmt(page_table.shape)}.")
    page_table = page_table.astype(jnp.int32)
  return PagedKVCache(jnp.zeros((P, K, S, H), dtype), jnp.zeros((P, K, S, H), dtype), page_table,
                      jnp.zeros((B,), jnp.int32))


# ---------------------------------------------------------------------------
# validation shared by update and attention


def cache_sizes(fn: str, cache):
  """(B, K, H, max_length, dtype) of a cache, checked for internal agreement."""
  if isinstance(cache, KVCache):
    k, v = cache.key, cache.value
    if k.ndim != 4 or v.shape != k.shape:
      raise ValueError(f"{fn}: cache.key and cache.value must have one shape (B, K, L, H); "
                       f"got {_fmt(k.shape)} and {_fmt(v.shape)}.")
    B, K, L, H = k.shape
  elif isinstance(cache, PagedKVCache):
    k, v = cache.key_pages, cache.value_pages
    if k.ndim != 4 or v.shape != k.shape:
      raise ValueError(f"{fn}: cache.key_pages and cache.value_pages must have one shape "
                       f"(num_pages, K, page_size, H); got {_fmt(k.shape)} and {_fmt(v.shape)}.")
    _, K, S, H = k.shape
    if cache.page_table.ndim != 2:
      raise ValueError(f"{fn}: cache.page_table must have shape (B, pages_per_sequence); "
                       f"got {_fmt(cache.page_table.shape)}.")
    if not jnp.issubdtype(cache.page_table.dtype, jnp.integer):
      raise TypeError(f"{fn}: cache.page_table must be integer page ids; got "
                      f"{cache.page_table.dtype}.")
    B = cache.page_table.shape[0]
    L = cache.page_table.shape[1] * S
  else:
    raise TypeError(f"{fn}: cache must be a KVCache or PagedKVCache; got "
                    f"{type(cache).__name__}.")
  if k.dtype != v.dtype:
    raise TypeError(f"{fn}: cache keys and values must share one dtype; got {k.dtype} "
                    f"and {v.dtype}.")
  if not jnp.issubdtype(k.dtype, jnp.floating):
    raise TypeError(f"{fn}: cache keys and values must be floating point; got {k.dtype}.")
  if cache.lengths.shape != (B,):
    raise ValueError(f"{fn}: cache.lengths must have shape (B,) = ({B},); got "
                     f"{_fmt(cache.lengths.shape)}.")
  if not jnp.issubdtype(cache.lengths.dtype, jnp.integer):
    raise TypeError(f"{fn}: cache.lengths must be integer; got {cache.lengths.dtype}.")
  return B, K, H, L, k.dtype


def _check_values(fn, cache, L, *, new=None, T=None, name=None, reading=False):
  """Refuses bad cache contents that are visible now (outside jit); see the module docstring.

  Under jit the values are traced and nothing is checked here: the kernels
  mask instead (negative lengths count as 0, tokens past the capacity are
  dropped, invalid page ids are never read or written).

  Args:
    fn: the public function.
    cache: the cache.
    L: its capacity.
    new: the (B,) counts of new tokens (seq_lengths or query_seq_lengths).
    T: the new tokens' axis size.
    name: new's argument name.
    reading: decode_attention (the new tokens are already in the cache)
      rather than update_kv_cache (they are about to be appended).
  """
  lengths = _checks.concrete(cache.lengths)
  if lengths is not None:
    if np.any(lengths < 0):
      raise ValueError(f"{fn}: cache.lengths must be non-negative; got {lengths.tolist()}.")
    if np.any(lengths > L):
      raise ValueError(f"{fn}: cache.lengths must be at most the capacity L = {L}; got "
                       f"{lengths.tolist()}.")
  n = _checks.concrete(new)
  if n is not None and new is not None:
    if np.any(n < 0) or np.any(n > T):
      raise ValueError(f"{fn}: {name} must be in [0, T] = [0, {T}]; got {n.tolist()}.")
    if lengths is not None and not reading and np.any(lengths + n > L):
      raise ValueError(f"{fn}: appending {name} = {n.tolist()} tokens to cache.lengths = "
                       f"{lengths.tolist()} overflows the capacity L = {L}.")
    if lengths is not None and reading and np.any(n > lengths):
      raise ValueError(f"{fn}: {name} = {n.tolist()} exceeds cache.lengths = "
                       f"{lengths.tolist()}: the new tokens' keys must be in the cache "
                       f"(call update_kv_cache first).")
  if isinstance(cache, PagedKVCache) and lengths is not None:
    table = _checks.concrete(cache.page_table)
    if table is not None:
      num_pages, _, S, _ = cache.key_pages.shape
      end = lengths + (0 if reading or n is None else n)
      used = np.arange(table.shape[1])[None, :] * S < end[:, None]   # pages holding tokens
      bad = used & ((table < 0) | (table >= num_pages))
      if np.any(bad):
        b, j = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{fn}: cache.page_table entries must be page ids in [0, num_pages) "
                         f"= [0, {num_pages}) for every page that holds tokens; got "
                         f"page_table[{b}, {j}] = {int(table[b, j])}.")


def _seq_lengths(fn, name, x, B, T):
  """Counts (B,) of real new tokens (T for every row when None); kernels clip them to [0, T].

  Built on the host and cast only when needed: no eager op compiles per T.
  """
  if x is None:
    if not _checks.concrete_sizes(B):  # a symbolic batch (jax.export)
      return jnp.full((B,), T, jnp.int32)
    return np.full((B,), T, np.int32)
  if not hasattr(x, "dtype"):
    x = np.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(f"{fn}: {name} must have an integer dtype; got {x.dtype}.")
  if x.shape != (B,):
    raise ValueError(f"{fn}: {name} must have shape (B,) = ({B},); got {_fmt(x.shape)}.")
  return x if x.dtype == jnp.int32 else x.astype(jnp.int32)


# ---------------------------------------------------------------------------
# update


def update_kv_cache(cache, key, value, *, seq_lengths=None):
  """Appends T new tokens per sequence, each at its sequence's own length.

  Row b's token t goes to position `cache.lengths[b] + t`; the lengths grow
  by `seq_lengths` (default T). Prefill (a whole prompt) and decode steps (one
  or a few tokens) are the same call. Tokens at or past `seq_lengths[b]`
  (right padding of a ragged batch) are not written. An append that does not
  fit raises outside jit; under jit, tokens past the capacity are dropped and
  counted (see "Bad input" in the module docstring).

  Args:
    cache: KVCache or PagedKVCache.
    key: (B, T, K, H) keys of the new tokens (after RoPE, if any).
    value: (B, T, K, H).
    seq_lengths: optional int (B,): real new tokens per row, in [0, T].

  Returns:
    The updated cache (same type). Under jit, donate the cache argument so
    the write happens in place instead of copying the cache.

  Raises:
    ValueError: shapes do not match the cache, T exceeds its capacity;
      outside jit: negative lengths, seq_lengths outside [0, T], an append
      that overflows, an invalid page id where tokens go.
    TypeError: dtypes do not match the cache.

  >>> import jax.numpy as jnp, jaxattn.decode as dec
  >>> c = dec.init_kv_cache(2, 16, 3, 8)
  >>> kv = jnp.ones((2, 5, 3, 8))
  >>> dec.update_kv_cache(c, kv, kv, seq_lengths=jnp.array([5, 2])).lengths.tolist()
  [5, 2]
  """
  fn = "update_kv_cache"
  B, K, H, L, dtype = cache_sizes(fn, cache)
  key, value = jnp.asarray(key), jnp.asarray(value)
  for name, x in (("key", key), ("value", value)):
    if x.ndim != 4 or x.shape[0] != B or x.shape[2:] != (K, H):
      raise ValueError(f"{fn}: {name} must have shape (B, T, K, H) = "
                       f"({B}, T, {K}, {H}) to match the cache; got {_fmt(x.shape)}.")
    if x.dtype != dtype:
      raise TypeError(f"{fn}: {name} must have the cache's dtype {dtype}; got {x.dtype}.")
  if value.shape != key.shape:
    raise ValueError(f"{fn}: value must have key's shape {_fmt(key.shape)}; got "
                     f"{_fmt(value.shape)}.")
  T = key.shape[1]
  if T > L:
    raise ValueError(f"{fn}: T = {T} new tokens exceed the cache capacity L = {L}.")
  n = _seq_lengths(fn, "seq_lengths", seq_lengths, B, T)
  _check_values(fn, cache, L, new=n, T=T, name="seq_lengths")
  if isinstance(cache, KVCache):
    return _update_contiguous(cache, key, value, n)
  return _update_paged(cache, key, value, n)


def _new_positions(lengths, n, T, L):
  """(B, T) target positions, the (B, T) mask of tokens to write, the new lengths.

  Negative lengths count as 0; tokens at positions >= L (overflow) are not
  written but still counted, so that decode_attention places every query at
  its true position (and gives 0 for those whose keys were dropped).
  """
  lengths = jnp.maximum(lengths, 0)
  n = jnp.clip(n, 0, T)
  t = jnp.arange(T, dtype=jnp.int32)[None, :]
  pos = lengths[:, None] + t
  return pos, (t < n[:, None]) & (pos < L), lengths + n


@jax.jit
def _update_contiguous(cache: KVCache, key, value, n):
  L = cache.key.shape[2]
  pos, write, lengths = _new_positions(cache.lengths, n, key.shape[1], L)
  # Padding and overflow go to position L, which the scatter drops (a negative
  # index would wrap around instead).
  pos = jnp.where(write, pos, L)
  # One scatter per example, batched by vmap: the batch is a batching dimension
  # of the scatter, so a batch-sharded cache is updated where it lives (an
  # index array over the whole batch made XLA gather every example's new K/V
  # on every device, and explicit mesh axes refused it).
  put = jax.vmap(lambda c, p, x: c.at[:, p].set(x.swapaxes(0, 1), mode="drop"))
  return KVCache(put(cache.key, pos, key), put(cache.value, pos, value), lengths)


@jax.jit
def _update_paged(cache: PagedKVCache, key, value, n):
  num_pages, _, S, _ = cache.key_pages.shape
  M = cache.page_table.shape[1]
  pos, write, lengths = _new_positions(cache.lengths, n, key.shape[1], M * S)
  page = jnp.take_along_axis(cache.page_table, jnp.clip(pos // S, 0, M - 1), axis=1)
  # A page id outside [0, num_pages) is never written (nor wrapped to another page).
  write = write & (page >= 0) & (page < num_pages)
  page = jnp.where(write, page, num_pages)
  off = pos % S
  k = cache.key_pages.at[page, :, off].set(key, mode="drop")
  v = cache.value_pages.at[page, :, off].set(value, mode="drop")
  return PagedKVCache(k, v, cache.page_table, lengths)


def decode_attention(query, cache, *, query_seq_lengths=None, scale: float | None = None,
                     logits_soft_cap: float | None = None, local_window_size=None,
                     implementation: str | None = None, num_splits: int | None = None,
                     block_size: int | None = None, return_residual: bool = False):
  r"""Attends T new queries per sequence to a cache that already holds their keys.

  .. math:: o_{b,t} = \mathrm{softmax}_{s \le p_{b,t}}(s \cdot q_{b,t} k_{b,s}^T)\, V_b,
     \quad p_{b,t} = \mathrm{lengths}_b - n_b + t

  Call `update_kv_cache` with the new tokens' keys and values first: query
  t of row b sits at position p_{b,t} (bottom-right causal alignment per
  sequence, with n_b = query_seq_lengths[b] new tokens) and sees keys 0 ..
  p_{b,t}. Query rows at or past n_b (right padding) give 0.

  Args:
    query: (B, T, N, H), the cache's dtype; N a multiple of the cache's K
      (GQA; MQA when K = 1).
    cache: KVCache or PagedKVCache.
    query_seq_lengths: optional int (B,): real new tokens per row (the
      `seq_lengths` given to `update_kv_cache`); default T.
    scale: logit scale, default 1/sqrt(H).
    logits_soft_cap: `cap * tanh(logits / cap)` (Gemma 2).
    local_window_size: `w` or `(left, right)`: a query at p sees keys in
      [p - left, p] (causality makes the right side moot).
    implementation: for a KVCache, None (automatic), "split_kv" (this
      module's kernel: split-KV, or one chunk) or a name from
      `jaxattn.implementations()` (the cache goes to `dot_product_attention`
      with a per-row causal mask). For a PagedKVCache, None or "paged".
      Automatic: "split_kv" when T * N <= 256 (decoding) or num_splits or
      block_size is given, else dot_product_attention's own choice (prefill).
    num_splits: split-KV chunks P (must divide the cache length L); None
      chooses with `default_num_splits`; 1 is the unsplit kernel.
    block_size: keys per online-softmax step, over all split-KV chunks
      (rounded down to whole pages for a PagedKVCache); None chooses with
      `default_block_size`. With neither given, on CPU, a KVCache whose
      visible keys fill at least 70% of it is read in one pass (one matmul
      over the whole cache, no loop; logits bounded by `one_pass_fits`),
      about 1.5x as fast there; derivatives always take the blocked kernel.
    return_residual: also return the logsumexp (B, T, N) (-inf for empty
      rows).

  Returns:
    (B, T, N, H) in the query's dtype, and the logsumexp if asked.

  Raises:
    ValueError: shapes do not fit the cache; unknown implementation; num_splits
      does not divide L; a negative window side, a non-finite scale or
      soft cap; outside jit: lengths outside [0, L], query_seq_lengths
      outside [0, T] or above the lengths, an invalid page id where tokens
      are.
    TypeError: query dtype differs from the cache's.

  >>> import jax, jax.numpy as jnp, jaxattn.decode as dec
  >>> c = dec.init_kv_cache(2, 16, 3, 8)
  >>> kv = jax.random.normal(jax.random.key(0), (2, 4, 3, 8))
  >>> c = dec.update_kv_cache(c, kv, kv)
  >>> dec.decode_attention(jnp.ones((2, 4, 6, 8)), c).shape
  (2, 4, 6, 8)
  """
  fn = "decode_attention"
  B, K, H, L, dtype = cache_sizes(fn, cache)
  if not _checks.concrete_sizes(L):
    raise NotImplementedError(
        f"{fn}: the cache length must be concrete (the kernels plan their key blocks from "
        f"it); got L={L}, a symbolic dimension (jax.export shape polymorphism). A symbolic "
        "batch works.")
  query = jnp.asarray(query)
  if query.ndim != 4 or query.shape[0] != B or query.shape[3] != H:
    raise ValueError(f"{fn}: query must have shape (B, T, N, H) = ({B}, T, N, {H}) to "
                     f"match the cache; got {_fmt(query.shape)}.")
  T, N = query.shape[1], query.shape[2]
  if T == 0 or N == 0:
    raise ValueError(f"{fn}: query has a zero-sized dimension: {_fmt(query.shape)}.")
  if N % K:
    raise ValueError(f"{fn}: the cache's K = {K} key/value heads must divide the query "
                     f"heads N = {N} (GQA/MQA); got query {_fmt(query.shape)}.")
  if T > L:
    raise ValueError(f"{fn}: T = {T} queries exceed the cache capacity L = {L}.")
  if query.dtype != dtype:
    raise TypeError(f"{fn}: query must have the cache's dtype {dtype}; got {query.dtype}.")
  n = _seq_lengths(fn, "query_seq_lengths", query_seq_lengths, B, T)
  # Only given counts are checked: with the default (T), a row whose cache holds fewer
  # tokens (an idle slot of a serving batch) gives 0 for the queries before position 0,
  # outside jit as under it.
  _check_values(fn, cache, L, new=None if query_seq_lengths is None else n, T=T,
                name="query_seq_lengths", reading=True)
  scale, logits_soft_cap = _attention.canonical_scale_and_cap(fn, scale, logits_soft_cap, H)
  # Causal by construction: only the window's left side matters here.
  window = _attention.canonical_window(fn, local_window_size)
  left = None if window is None else window[0]
  lengths = cache.lengths
  if block_size is not None:
    block_size = _checks.positive_int(fn, "block_size", block_size)
  if num_splits is not None:
    num_splits = _checks.positive_int(fn, "num_splits", num_splits)

  if isinstance(cache, PagedKVCache):
    if implementation not in (None, "paged"):
      raise ValueError(f"{fn}: a PagedKVCache takes implementation None or 'paged'; got "
                       f"{implementation!r}.")
    if num_splits not in (None, 1):
      raise ValueError(f"{fn}: num_splits applies to a KVCache; a PagedKVCache is walked "
                       f"page by page; got {num_splits!r}.")
    S = cache.key_pages.shape[2]
    if block_size is None:
      block_size = default_block_size(B, K, H, dtype)
    out, lse = _paged(query, cache.key_pages, cache.value_pages, cache.page_table, lengths, n,
                      scale=scale, soft_cap=logits_soft_cap, window_left=left,
                      pages_per_step=max(1, min(int(block_size) // S, cache.page_table.shape[1])))
  else:
    names = ("split_kv",) + _attention.implementations()
    if implementation is not None and implementation not in names:
      raise ValueError(f"{fn}: implementation must be None or one of "
                       f"{', '.join(map(repr, names))} for a KVCache; got {implementation!r}.")
    kernel_options = num_splits is not None or block_size is not None
    if implementation is None:
      small = T * N <= _DECODE_MAX_QUERY_ROWS
      implementation = "split_kv" if small or kernel_options else None
    if implementation == "split_kv":
      # Neither chunks nor blocks asked for: the one-pass kernel may run.
      one_pass = num_splits is None and block_size is None
      if num_splits is None:
        num_splits = default_num_splits(T, N, L)
      elif L % num_splits:
        raise ValueError(f"{fn}: num_splits must divide the cache length L = {L}; got "
                         f"{num_splits}.")
      if block_size is None:
        block_size = default_block_size(B, K, H, dtype)
      one_pass = one_pass and num_splits == 1 and one_pass_fits(
          B, T, N, L, cache.key.nbytes + cache.value.nbytes)
      out, lse = _split_kv(query, cache.key, cache.value, lengths, n, scale=scale,
                           soft_cap=logits_soft_cap, window_left=left,
                           num_splits=int(num_splits), block_size=int(block_size),
                           one_pass=one_pass)
    else:
      if kernel_options:
        raise ValueError(f"{fn}: num_splits and block_size apply to implementation "
                         f"'split_kv' (or 'paged'); got implementation {implementation!r}.")
      out, lse = _dense(query, cache, lengths, n, scale=scale, soft_cap=logits_soft_cap,
                        window_left=left, implementation=implementation)
  if return_residual:
    return out, lse.astype(out.dtype)
  return out


@functools.partial(jax.jit, static_argnames=("scale", "soft_cap", "window_left",
                                             "implementation"))
def _dense(query, cache: KVCache, lengths, n, *, scale, soft_cap, window_left, implementation):
  """Long query blocks (prefill): dot_product_attention with a per-row causal mask."""
  B, T, N, H = query.shape
  L = cache.key.shape[2]
  G = 1
  row_pos, row_real = _row_positions(lengths, n, T, G, L)             # (B, T)
  kv_pos = jnp.arange(L, dtype=jnp.int32)[None, None, :]
  mask = _allowed(kv_pos, row_pos[:, :, None], row_real[:, :, None], window_left)
  stored = jnp.clip(lengths, 0, L)
  # Stale slots are zeroed (a where, not a product): NaN there never reaches
  # an output or gradient, whatever the implementation does with masked keys.
  keep = (kv_pos[0, 0][None, :] < stored[:, None])[:, :, None, None]  # (B, L, 1, 1)
  key = jnp.where(keep, cache.key.transpose(0, 2, 1, 3), 0)          # (B, L, K, H)
  value = jnp.where(keep, cache.value.transpose(0, 2, 1, 3), 0)
  out, lse = _attention.dot_product_attention(
      query, key, value, mask=mask[:, None], scale=scale, logits_soft_cap=soft_cap,
      query_seq_lengths=jnp.clip(n, 0, T), key_value_seq_lengths=stored,
      implementation=implementation,
      return_residual=True)
  return out, lse.astype(common.stat_dtype(query.dtype))


# ---------------------------------------------------------------------------
# the multi-head layer's cached path


def __getattr__(name):
  # multi_head_attention_decode lives beside multi_head_attention in jaxattn.layers
  # (implementations never import layers); this name is kept for older code.
  if name == "multi_head_attention_decode":
    from jaxattn import layers  # noqa: PLC0415
    return layers.multi_head_attention_decode
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
