"""`python -m bench.masks`: block skipping against its ideal (issue targets).

For a masked case, the ideal time is the dense (unmasked) time of the same
implementation times the fraction of logits the mask keeps. The ratio
masked / ideal shows how much of the skipped work is really saved (1.0 is
perfect; block granularity and the mask arithmetic on partial blocks cost the
rest). jax.nn with the equivalent dense mask runs alongside where it fits.

  python -m bench.masks            # documents (8 in T=8192), window 512 at T=16384
  python -m bench.masks --quick    # small shapes, a smoke test
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import numpy as np

import jaxattn
from bench import specs


def _time(fn, args, repeats):
  compiled = jax.jit(fn).lower(*args).compile()
  jax.block_until_ready(compiled(*args))
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    ts.append(time.perf_counter() - t0)
  return float(np.median(ts))


def run(cases, repeats=3, jax_nn_max_t=8192):
  rows = []
  for case in cases:
    inputs = specs.make_inputs(case)
    q, k, v = inputs.query, inputs.key, inputs.value
    kw = specs.jaxattn_kwargs(case, inputs.aux)
    frac = specs.attended_fraction(case, inputs.aux)
    dense = _time(lambda q, k, v: jaxattn.dot_product_attention(q, k, v, implementation="chunked"),
                  (q, k, v), repeats)
    masked = _time(lambda q, k, v: jaxattn.dot_product_attention(q, k, v, implementation="chunked", **kw),
                   (q, k, v), repeats)
    nn = None
    if case.T <= jax_nn_max_t:
      mask = specs.dense_mask(case, inputs.aux, jax.numpy)
      nn = _time(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask), (q, k, v), repeats)
    rows.append(dict(case=case.name, detail=f"window={case.window}" if case.mask == "window"
                     else f"documents={case.documents}", fraction=frac, dense_s=dense,
                     masked_s=masked, ideal_s=dense * frac, vs_ideal=masked / (dense * frac),
                     jax_nn_s=nn, speedup_vs_jax_nn=None if nn is None else nn / masked))
    print(_row(rows[-1]), file=sys.stderr, flush=True)
  return rows


def _row(r):
  nn = "n/a" if r["jax_nn_s"] is None else f"{r['jax_nn_s'] * 1e3:.0f} ms ({r['speedup_vs_jax_nn']:.1f}x)"
  return (f"| {r['case']} ({r['detail']}) | {r['fraction']:.3f} | {r['dense_s'] * 1e3:.0f} ms | "
          f"{r['masked_s'] * 1e3:.0f} ms | {r['ideal_s'] * 1e3:.0f} ms | {r['vs_ideal']:.2f} | {nn} |")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true")
  args = ap.parse_args(argv)
  if args.quick:
    cases = [specs.Case("fwd", "documents", 1024, documents=8, N=2, K=2),
             specs.Case("fwd", "window", 2048, window=128, N=2, K=2)]
  else:
    cases = [specs.Case("fwd", "documents", 8192, documents=8),
             specs.Case("fwd", "window", 16384, window=512)]
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, chunked block skipping vs ideal")
  print("| case | kept fraction | chunked dense | chunked masked | ideal | masked / ideal | jax.nn dense mask (speedup) |")
  print("|---|---|---|---|---|---|---|")
  for r in run(cases, repeats=2 if args.quick else 3, jax_nn_max_t=2048 if args.quick else 8192):
    print(_row(r))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
