"""`python -m bench.compile_time`: compile time of a forward + backward jit, against jax.nn.

Each measurement runs in a fresh process (this checkout's jaxattn, the
caller's XLA_FLAGS and JAX_* variables dropped) with JAX's compilation cache off:
`jax.jit(jax.grad(sum of attention))` traced, lowered and compiled for
B=1, T=4096, N=8, H=64 float32, causal. Processes alternate between the
implementations, so drifting load hits both; the ratio of medians is printed.

    python -m bench.compile_time                 # chunked vs jax.nn, 3 processes each
    python -m bench.compile_time --impl chunked_jvp --runs 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

_CHILD = """
import json, sys, time
import jax, jax.numpy as jnp
jax.config.update("jax_enable_compilation_cache", False)
import jaxattn
impl, T = sys.argv[1], int(sys.argv[2])
q = jnp.ones((1, T, 8, 64), jnp.float32)
if impl == "jax.nn":
  attn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)
else:
  attn = lambda q, k, v: jaxattn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
f = jax.jit(jax.grad(lambda q, k, v: attn(q, k, v).sum(), argnums=(0, 1, 2)))
t0 = time.perf_counter(); traced = f.trace(q, q, q)
t1 = time.perf_counter(); lowered = traced.lower()
t2 = time.perf_counter(); lowered.compile()
t3 = time.perf_counter()
print(json.dumps(dict(trace_s=t1 - t0, lower_s=t2 - t1, compile_s=t3 - t2, total_s=t3 - t0)))
"""


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(impl: str, T: int) -> dict:
  # This checkout's jaxattn, and no XLA_FLAGS/JAX_* from the caller (a test's
  # optimization level or a dump directory would change what is measured).
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS" and not k.startswith("JAX_")}
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  out = subprocess.run([sys.executable, "-c", _CHILD, impl, str(T)], capture_output=True,
                       text=True, cwd=ROOT, env=env)
  if out.returncode:
    raise RuntimeError(f"measuring {impl} failed:\n{out.stderr[-2000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--impl", default="chunked", help="jaxattn implementation (default chunked)")
  ap.add_argument("--runs", type=int, default=3, help="fresh processes per implementation")
  ap.add_argument("--length", type=int, default=4096, help="T = S")
  a = ap.parse_args(argv)
  runs: dict[str, list[dict]] = {"jax.nn": [], a.impl: []}
  for _ in range(a.runs):
    for name in runs:
      runs[name].append(measure(name, a.length))
  print(f"fwd+bwd jit, causal, B=1 T={a.length} N=8 H=64 float32, fresh process, cache off")
  print("| implementation | trace s | lower s | compile s | total s (median) |")
  print("|---|---:|---:|---:|---:|")
  med = {}
  for name, rs in runs.items():
    m = {k: float(np.median([r[k] for r in rs])) for k in rs[0]}
    med[name] = m["total_s"]
    print(f"| {name} | {m['trace_s']:.3f} | {m['lower_s']:.3f} | {m['compile_s']:.3f} | {m['total_s']:.3f} |")
  ratios = [r["total_s"] / n["total_s"] for r, n in zip(runs[a.impl], runs["jax.nn"])]
  print(f"\n{a.impl} / jax.nn = {med[a.impl] / med['jax.nn']:.2f}x (medians; per pair: "
        f"{', '.join(f'{x:.2f}x' for x in ratios)}); target <= 1.5x")
  return 0


if __name__ == "__main__":
  sys.exit(main())
