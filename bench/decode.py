"""`python -m bench.decode`: one decode step against a long KV cache, next to reading it once.

Decoding one token is memory bound: every key and value in the cache is read
once for a few flops each. The bound is measured in the same process, on the
same arrays: a jitted `jnp.sum` over K and V (a read of every byte, on every
core). Each implementation is timed in interleaved rounds (one call of each
per round, after a warm-up; medians), so drifting load on a shared machine
hits all of them alike; compile time and `memory_analysis()` temp bytes are
recorded separately.

    python -m bench.decode          # B=8, S=32768, N=32, K=8, H=128, float32: 2 GiB of K/V
    python -m bench.decode --batch 2 --json out.jsonl

Rows: the read bound; `decode_attention` (automatic choice, and split-KV
with --splits chunks); the step's two matmuls alone (q K^T, then P V, as
XLA's dot computes them: a floor for any XLA formulation); the full decode step (append one token + attend, jitted
with the cache donated so the append writes in place); `jax.nn.
dot_product_attention` and `jaxattn.dot_product_attention` on the same
cache in their (B, S, K, H) layout (in rounds of their own: their GiB-sized
temporaries disturb their neighbours); optionally the paged cache (--paged).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxattn
from jaxattn import decode as dec


def _meminfo_available() -> int | None:
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


class Row:
  """A jitted callable on fixed arguments, compiled up front."""

  def __init__(self, name, fn, args, donate=False, compare=True):
    self.name, self.fn, self.compare = name, fn, compare
    t0 = time.perf_counter()
    jitted = jax.jit(fn, donate_argnums=(0,) if donate else ())
    self.compiled = jitted.lower(*args).compile()
    self.compile_s = time.perf_counter() - t0
    mem = self.compiled.memory_analysis()
    self.temp_bytes = None if mem is None else int(mem.temp_size_in_bytes)
    self.args = list(args)
    self.donate = donate
    self.times = []
    self.out = None

  def call(self):
    t0 = time.perf_counter()
    out = jax.block_until_ready(self.compiled(*self.args))
    self.times.append(time.perf_counter() - t0)
    if self.donate:  # the step returns (cache, output): feed the cache back
      self.args[0], out = out
    self.out = out


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--length", type=int, default=32768, help="cache length S")
  ap.add_argument("--heads", type=int, default=32, help="query heads N")
  ap.add_argument("--kv-heads", type=int, default=8, help="key/value heads K")
  ap.add_argument("--head-dim", type=int, default=128)
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--fill", type=float, default=1.0,
                  help="share of the cache holding keys (the longest row; the others 7 fewer each)")
  ap.add_argument("--rounds", type=int, default=7)
  ap.add_argument("--splits", type=int, default=4, help="also time split-KV with this many chunks")
  ap.add_argument("--paged", type=int, default=0, metavar="PAGE_SIZE",
                  help="also time a paged cache with this page size")
  ap.add_argument("--no-peers", action="store_true", help="skip jax.nn and jaxattn's generic path")
  ap.add_argument("--json", help="append one JSON line with every figure to this file")
  a = ap.parse_args(argv)
  B, S, N, K, H = a.batch, a.length, a.heads, a.kv_heads, a.head_dim
  dtype = jnp.dtype(a.dtype)
  kv_bytes = 2 * B * S * K * H * dtype.itemsize
  print(f"decode 1 token: B={B} S={S} (filled {a.fill:.0%}) N={N} K={K} H={H} {dtype.name}; K+V = "
        f"{kv_bytes / 2**30:.2f} GiB; {jax.default_backend()} x{jax.device_count()}, "
        f"jax {jax.__version__}")

  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  draw = jax.jit(lambda k, shape: jax.random.normal(k, shape, jnp.float32).astype(dtype),
                 static_argnums=1)
  # A nearly full cache with ragged lengths.
  filled = max(1, min(S, round(a.fill * S)))
  lengths = jnp.asarray(np.maximum(filled - 7 * np.arange(B), 1), jnp.int32)
  cache = dec.KVCache(draw(kk, (B, K, S, H)), draw(kv, (B, K, S, H)), lengths)
  query = draw(kq, (B, 1, N, H))
  auto = dec.default_num_splits(1, N, S)
  block = dec.default_block_size(B, K, H, dtype)

  rows = [Row("read K+V once (jnp.sum)",
              lambda c: jnp.sum(c.key, dtype=jnp.float32) + jnp.sum(c.value, dtype=jnp.float32),
              (cache,))]
  one_pass = auto == 1 and dec.one_pass_fits(B, 1, N, S, kv_bytes)
  rows.append(Row(f"jaxattn decode_attention (auto: P={auto}, "
                  f"{'one pass when 70% full, else ' if one_pass else ''}block {block})",
                  lambda q, c: dec.decode_attention(q, c), (query, cache)))
  if one_pass:
    rows.append(Row(f"jaxattn decode_attention, blocked (block_size={block})",
                    lambda q, c: dec.decode_attention(q, c, block_size=block), (query, cache)))
  if a.splits != auto:
    rows.append(Row(f"jaxattn decode_attention, split-KV P={a.splits}",
                    lambda q, c: dec.decode_attention(q, c, num_splits=a.splits), (query, cache)))
  def step(c, q, k, v):
    c = dec.update_kv_cache(c, k, v)
    return c, dec.decode_attention(q, c)

  # The step appends one token; start one short of full so it never saturates the
  # lengths in a way that changes the work (a full cache drops the token: same cost).
  step_cache = dec.KVCache(cache.key + 0, cache.value + 0, jnp.minimum(lengths, S - 1))
  new_kv = draw(kq, (B, 1, K, H))
  rows.append(Row("jaxattn step: update_kv_cache + decode_attention (donated)", step,
                  (step_cache, query, new_kv, new_kv), donate=True))
  del step_cache
  # What any XLA formulation pays: the two matmuls of one step alone, in the
  # one-pass kernel's layout (queries grouped by K/V head, keys before rows).
  G = N // K
  rows_q = query.reshape(B, K, G, H)
  weights = draw(kk, (B, K, S, G)).astype(jnp.float32)
  rows.append(Row("floor: logits matmul q K^T alone (XLA dot)",
                  lambda q, c: jnp.einsum("bkrh,bklh->bklr", q, c.key,
                                          preferred_element_type=jnp.float32),
                  (rows_q, cache), compare=False))
  rows.append(Row("floor: weighted sum P V alone (XLA dot)",
                  lambda w, c: jnp.einsum("bklr,bklh->bkrh", w.astype(dtype), c.value,
                                          preferred_element_type=jnp.float32),
                  (weights, cache), compare=False))
  if a.paged:
    P = a.paged
    M = -(-S // P)
    perm = np.random.default_rng(0).permutation(B * M).reshape(B, M).astype(np.int32)
    pages = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, M * P - S), (0, 0))).reshape(
        B, K, M, P, H).transpose(0, 2, 1, 3, 4).reshape(B * M, K, P, H)
    kp = jnp.zeros((B * M, K, P, H), dtype).at[perm.reshape(-1)].set(pages(cache.key))
    vp = jnp.zeros((B * M, K, P, H), dtype).at[perm.reshape(-1)].set(pages(cache.value))
    paged = dec.PagedKVCache(kp, vp, jnp.asarray(perm), lengths)
    rows.append(Row(f"jaxattn decode_attention, paged (page_size={P})",
                    lambda q, c: dec.decode_attention(q, c), (query, paged)))
  read = rows[0]
  peer_rows = [Row("read K+V once (jnp.sum), peers' rounds", read.fn, read.args)]
  if not a.no_peers:
    free = _meminfo_available()
    # The peers read (B, S, K, H) copies and may transpose them again.
    if free is not None and free < 3 * kv_bytes:
      print(f"skipping jax.nn and jaxattn.dot_product_attention: {free / 2**30:.1f} GiB "
            f"available, they need about {3 * kv_bytes / 2**30:.1f}")
    else:
      k_bskh = cache.key.transpose(0, 2, 1, 3)
      v_bskh = cache.value.transpose(0, 2, 1, 3)
      peer_rows.append(Row("jax.nn.dot_product_attention",
                      lambda q, k, v, n: jax.nn.dot_product_attention(
                          q, k, v, key_value_seq_lengths=n),
                      (query, k_bskh, v_bskh, lengths)))
      peer_rows.append(Row("jaxattn.dot_product_attention (generic, B S K H)",
                      lambda q, k, v, n: jaxattn.dot_product_attention(
                          q, k, v, key_value_seq_lengths=n),
                      (query, k_bskh, v_bskh, lengths)))

  records = []
  print("\n| implementation | ms (median) | ms (min) | vs read (median) | vs read (min) | GB/s "
        "| max abs diff | compile s | temp MiB |")
  print("|---|---|---|---|---|---|---|---|---|")
  ref = None
  # The peers allocate and fault in GiBs per call, which disturbs whatever runs
  # beside them: they get their own rounds, each phase with its own read bound.
  for phase in (rows, peer_rows):
    if len(phase) < 2:
      continue
    for row in phase:  # warm-up
      row.call()
      row.times.clear()
    for _ in range(a.rounds if phase is rows else max(2, a.rounds // 2)):
      for row in phase:
        row.call()
    if ref is None:
      ref = np.asarray(phase[1].out, np.float64)
    bound, bound_min = float(np.median(phase[0].times)), float(np.min(phase[0].times))
    for i, row in enumerate(phase):
      med, best = float(np.median(row.times)), float(np.min(row.times))
      # The step attends to one more token than the others: no common reference.
      diff = "" if i == 0 or row.donate or not row.compare else (
          f"{float(np.max(np.abs(np.asarray(row.out, np.float64) - ref))):.1e}")
      temp = "" if row.temp_bytes is None else f"{row.temp_bytes / 2**20:.0f}"
      print(f"| {row.name} | {med * 1e3:.1f} | {best * 1e3:.1f} | {med / bound:.2f}x | "
            f"{best / bound_min:.2f}x | {kv_bytes / med / 1e9:.1f} | {diff} | "
            f"{row.compile_s:.2f} | {temp} |")
      records.append(dict(name=row.name, time_s=med, min_s=best, ratio_to_read=med / bound,
                          ratio_to_read_min=best / bound_min, times_s=row.times,
                          compile_s=row.compile_s, temp_bytes=row.temp_bytes))
  ratio, ratio_min = records[1]["ratio_to_read"], records[1]["ratio_to_read_min"]
  print(f"\ndecode_attention / read K+V once = {ratio:.2f}x (medians), {ratio_min:.2f}x (minima); "
        f"target <= 1.25x: {'met' if ratio <= 1.25 else 'not met'}")
  floor = sum(r["time_s"] for r in records if r["name"].startswith("floor:"))
  if floor:
    print(f"the two matmuls alone take {floor / records[0]['time_s']:.2f}x the read: no XLA "
          f"formulation of the step is faster than that on this machine")
  if a.json:
    with open(a.json, "a") as f:
      f.write(json.dumps(dict(B=B, S=S, N=N, K=K, H=H, dtype=dtype.name, num_splits=auto,
                              block_size=block,
                              backend=jax.default_backend(), jax=jax.__version__,
                              rows=records)) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
