"""`python -m jaxattn`: the seed notebook through the library, then a head-to-head."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxattn
from jaxattn import testing

NOTEBOOK_INPUTS = (
    np.array([[1, 0, 1, 0], [0, 2, 0, 2], [1, 1, 1, 1]]),
    np.array([[5, 0, 5, 0], [0, 5, 0, 5], [1, 1, 1, 1]]),
)


def notebook_self_attention(x, w_q, w_k, w_v):
  """The seed notebook's NumPy code, verbatim in substance: exp / sum softmax."""
  q, k, v = np.dot(x, w_q), np.dot(x, w_k), np.dot(x, w_v)
  scores = np.dot(q, k.T) / np.sqrt(k.shape[-1])
  weights = np.exp(scores) / np.sum(np.exp(scores), axis=1, keepdims=True)
  return weights, np.dot(weights, v)


def stable_float64(x, w_q, w_k, w_v):
  """The same computation in float64 with the max subtracted."""
  x, w_q, w_k, w_v = (np.asarray(a, np.float64) for a in (x, w_q, w_k, w_v))
  q, k, v = x @ w_q, x @ w_k, x @ w_v
  s = q @ k.T / np.sqrt(k.shape[-1])
  e = np.exp(s - s.max(axis=1, keepdims=True))
  w = e / e.sum(axis=1, keepdims=True)
  return w, w @ v


def notebook_weights(key):
  """Uniform [0, 1) 4x4 matrices like np.random.rand, from an explicit key."""
  return jaxattn.SelfAttentionParams(*jax.random.uniform(key, (3, 4, 4)))


def _show(name, a):
  print(f"{name}:\n{np.array2string(np.asarray(a), precision=6, suppress_small=False)}")


def seed_demo():
  """Print the seed notebook's cells through `jaxattn.self_attention`, then its overflow case.

  Returns:
    The overflow case's max relative difference to a float64 stable reference.
  """
  print("== The seed notebook, through jaxattn.self_attention (fixed key, float32) ==")
  keys = jax.random.split(jax.random.key(0), len(NOTEBOOK_INPUTS))
  attend = jax.jit(lambda p, x: jaxattn.self_attention(p, x, return_weights=True))
  for i, (x, key) in enumerate(zip(NOTEBOOK_INPUTS, keys), start=1):
    params = notebook_weights(key)
    w_np, out_np = notebook_self_attention(x, *(np.asarray(p, np.float64) for p in params))
    out, w = attend(params, jnp.asarray(x, jnp.float32))
    print(f"\n-- cell {i}: x = {x.tolist()}")
    _show("attention weights (jaxattn)", w)
    _show("self-attention output (jaxattn)", out)
    diff = max(np.abs(np.asarray(w) - w_np).max(), np.abs(np.asarray(out) - out_np).max())
    print(f"max |jaxattn - NumPy notebook| = {diff:.2e}")

  print("\n== Overflow: cell 2's x scaled by 1000 ==")
  x = NOTEBOOK_INPUTS[1] * 1000
  params = notebook_weights(keys[1])
  p64 = [np.asarray(p, np.float64) for p in params]
  with np.errstate(over="ignore", invalid="ignore"):
    w_np, out_np = notebook_self_attention(x, *p64)
  out, w = attend(params, jnp.asarray(x, jnp.float32))
  w_ref, out_ref = stable_float64(x, *p64)
  print(f"NumPy notebook: weights contain nan: {bool(np.isnan(w_np).any())}, "
        f"output contains nan: {bool(np.isnan(out_np).any())}")
  _show("attention weights (jaxattn)", w)
  rel = np.abs(np.asarray(out) - out_ref).max() / np.abs(out_ref).max()
  print(f"jaxattn finite: {bool(np.isfinite(np.asarray(out)).all())}; "
        f"max relative difference to a float64 stable reference: {rel:.2e}")
  return rel


def _time(fn, *args, repeats=3):
  jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t0)
  return float(np.median(ts))


def head_to_head(T=2048, N=8, H=64):
  """Print time and temporary memory of jaxattn vs `jax.nn.dot_product_attention` (causal, B=1)."""
  backend = jax.default_backend()
  print(f"\n== Head-to-head on {backend}: B=1, T=S={T}, N={N}, H={H}, float32, causal ==")
  q, k, v = testing.random_qkv(jax.random.key(1), B=1, T=T, S=T, N=N, K=N, H=H)
  peers = {
      "jaxattn (implementation=None)": lambda q, k, v: jaxattn.dot_product_attention(q, k, v, is_causal=True),
      "jax.nn.dot_product_attention": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True),
  }
  rows = []
  for name, f in peers.items():
    compiled = jax.jit(f).lower(q, k, v).compile()
    mem = compiled.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", 0) / 2**20 if mem is not None else float("nan")
    rows.append((name, _time(compiled, q, k, v), temp))
  flops = 4 * N * T * T * H
  print(f"{'':32s} {'time':>9s} {'GFLOP/s*':>9s} {'temp MiB':>9s}")
  for name, t, mem in rows:
    print(f"{name:32s} {t * 1e3:7.1f}ms {flops / t / 1e9:9.1f} {mem:9.1f}")
  print("* dense-equivalent FLOPs (4 B N T S H) over time; `python -m bench` for the full comparison.")
  print(f"jaxattn is {rows[1][1] / rows[0][1]:.1f}x faster and uses "
        f"{rows[1][2] / max(rows[0][2], 1e-9):.0f}x less temporary memory here.")


def main():
  """Run `python -m jaxattn`: the seed demo, then the head-to-head; exit non-zero if overflow is off."""
  rel = seed_demo()
  head_to_head()
  if not rel < 1e-5:
    raise SystemExit(f"overflow case differs from the float64 reference by {rel}")


if __name__ == "__main__":
  main()
