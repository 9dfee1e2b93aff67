"""`python -m bench.ring`: causal ring attention, balanced layouts vs non-causal / 2.

A causal mask halves the work; ring attention only gets that half back in
time when every device does half of every step (a balanced layout). This
times `jaxattn.parallel.ring_attention` on P simulated CPU devices (P=8 by
default, set through XLA_FLAGS before jax is imported), for the non-causal
problem and the causal one in each layout, forward and forward + backward,
and reports each causal time divided by half the non-causal time (target:
within 1.2 for a balanced layout), for wall time and for this process's CPU
time (all threads), which drifts less when other processes share the cores.

On simulated devices that share a few cores the wall time is roughly the sum
of all devices' work, so load imbalance barely shows: a contiguous causal
layout looks almost as good as a balanced one. With as many devices as cores
(`--devices 2`) the imbalance shows.

Timing as in `bench/`: jit, lower and compile timed apart, temp memory from
`compiled.memory_analysis()` (per device), one warm-up, then the median of
repeats ending in `jax.block_until_ready`; the cases take turns within each
round so a drifting shared machine affects them alike.

  python -m bench.ring [--devices 8] [--seq 4096] [--batch 1] [--heads 4]
                       [--kv-heads 4] [--head-dim 64] [--repeats 7] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _parse(argv):
  p = argparse.ArgumentParser(prog="python -m bench.ring", description=__doc__.split("\n\n")[0])
  p.add_argument("--devices", type=int, default=8, help="simulated CPU devices P (default 8)")
  p.add_argument("--seq", type=int, default=4096, help="global sequence length T (default 4096)")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--heads", type=int, default=4, help="query heads N")
  p.add_argument("--kv-heads", type=int, default=4, help="key/value heads K")
  p.add_argument("--head-dim", type=int, default=64, help="H")
  p.add_argument("--striped-blocks", type=int, default=4,
                 help="chunked blocks per local sequence for the striped layout (default 4), "
                      "so the kernel can skip masked blocks")
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--modes", default="fwd,fwd+bwd")
  p.add_argument("--json", default=None, help="also write the records as JSON lines here")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = _parse(sys.argv[1:] if argv is None else argv)
  if "jax" in sys.modules:
    print("bench.ring: jax is already imported; XLA_FLAGS can no longer set the device count",
          file=sys.stderr)
  flag = f"--xla_force_host_platform_device_count={args.devices}"
  if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()

  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec

  from jaxattn import parallel

  P = args.devices
  if jax.device_count() < P:
    print(f"bench.ring: {P} devices wanted, {jax.device_count()} available", file=sys.stderr)
    return 2
  mesh = jax.make_mesh((P,), ("seq",), devices=jax.devices()[:P])
  B, T, N, K, H = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
  Tl = T // P
  spec = PartitionSpec(None, "seq")
  sh = NamedSharding(mesh, spec)
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.device_put(jax.random.normal(keys[0], (B, T, N, H), jnp.float32), sh)
  k = jax.device_put(jax.random.normal(keys[1], (B, T, K, H), jnp.float32), sh)
  v = jax.device_put(jax.random.normal(keys[2], (B, T, K, H), jnp.float32), sh)
  do = jax.device_put(jax.random.normal(keys[3], (B, T, N, H), jnp.float32), sh)

  striped_block = max(Tl // args.striped_blocks, 1)
  cases = {  # name: (is_causal, layout, block_sizes)
      "non-causal": (False, "contiguous", None),
      "causal contiguous": (True, "contiguous", None),
      "causal zigzag": (True, "zigzag", None),
      "causal striped": (True, "striped", (striped_block, striped_block)),
  }

  def build(mode, causal, layout, block_sizes):
    ring = jax.shard_map(
        lambda q, k, v: parallel.ring_attention(q, k, v, axis_name="seq", is_causal=causal,
                                                layout=layout, block_sizes=block_sizes),
        mesh=mesh, in_specs=spec, out_specs=spec)
    if mode == "fwd":
      return ring, (q, k, v)

    def fwd_bwd(q, k, v, do):
      out, vjp = jax.vjp(ring, q, k, v)
      return (out,) + vjp(do)
    return fwd_bwd, (q, k, v, do)

  records, runs = [], []
  for mode in args.modes.split(","):
    for name, (causal, layout, bs) in cases.items():
      fn, fargs = build(mode, causal, layout, bs)
      t0 = time.perf_counter()
      lowered = jax.jit(fn).lower(*fargs)
      t1 = time.perf_counter()
      compiled = lowered.compile()
      t2 = time.perf_counter()
      mem = compiled.memory_analysis()
      jax.block_until_ready(compiled(*fargs))  # warm-up
      rec = dict(case=name, mode=mode, devices=P, B=B, T=T, N=N, K=K, H=H,
                 block_sizes=bs, lower_s=t1 - t0, compile_s=t2 - t1,
                 temp_bytes_per_device=None if mem is None else int(mem.temp_size_in_bytes),
                 times_s=[], cpu_times_s=[])
      records.append(rec)
      runs.append((rec, compiled, fargs))
  for _ in range(args.repeats):  # round robin: drift hits every case alike
    for rec, compiled, fargs in runs:
      c0, t0 = time.process_time(), time.perf_counter()
      jax.block_until_ready(compiled(*fargs))
      rec["times_s"].append(time.perf_counter() - t0)
      rec["cpu_times_s"].append(time.process_time() - c0)
  for rec in records:
    rec["time_s"] = float(np.median(rec["times_s"]))
    rec["cpu_s"] = float(np.median(rec["cpu_times_s"]))
  print(f"ring attention on {P} simulated CPU devices ({os.cpu_count()} cores), "
        f"B={B} T={T} (T/P={Tl}) N={N} K={K} H={H}, float32; median of {args.repeats}")
  print("wall: elapsed time; cpu: this process's CPU time over all threads (steadier when "
        "other processes share the cores)")
  print(f"{'mode':8} {'case':18} {'wall ms':>8} {'ratio':>6} {'cpu ms':>8} {'ratio':>6} "
        f"{'compile s':>9} {'temp KiB/dev':>12}")
  for mode in args.modes.split(","):
    base = next(r for r in records if r["mode"] == mode and r["case"] == "non-causal")
    for r in (r for r in records if r["mode"] == mode):
      r["ratio_to_half_noncausal"] = r["time_s"] / (base["time_s"] / 2)
      r["cpu_ratio_to_half_noncausal"] = r["cpu_s"] / (base["cpu_s"] / 2)
      temp = "" if r["temp_bytes_per_device"] is None else f"{r['temp_bytes_per_device'] / 1024:.0f}"
      print(f"{mode:8} {r['case']:18} {1e3 * r['time_s']:8.1f} {r['ratio_to_half_noncausal']:6.2f} "
            f"{1e3 * r['cpu_s']:8.1f} {r['cpu_ratio_to_half_noncausal']:6.2f} "
            f"{r['compile_s']:9.1f} {temp:>12}")
  print("ratio: time / (non-causal time / 2); target for a balanced causal layout: <= 1.2")
  if args.json:
    with open(args.json, "a") as f:
      for r in records:
        f.write(json.dumps(r) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
