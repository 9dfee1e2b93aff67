#!/usr/bin/env bash
# GPU checks and the GPU benchmark (issue 9), run by hand on a machine with an NVIDIA GPU.
#
# CI has no GPU: this script is how the compiled Pallas kernels (Triton) and the
# cuDNN path get tested and timed. From the repository root:
#
#   bench/gpu.sh                 # new venv build/venv-gpu, install, test, time (~10-20 min)
#   bench/gpu.sh --no-install    # use the active Python environment as it is
#   JAX_CUDA=cuda13 bench/gpu.sh # the CUDA 13 wheels (default cuda12)
#   VENV=path bench/gpu.sh       # another venv folder (build/ is git-ignored)
#
# Steps (each prints a header). Install and device problems stop the script;
# failing tests are reported and the timing steps still run; the exit status
# is 1 if tests or the benchmark's jaxattn rows failed. Performance targets
# are reported (PASS/MISS), not enforced.
#   1. install   python3 -m venv $VENV; pip install -e ".[test]" and
#                "jax[$JAX_CUDA]" at the installed jax version; ".[bench]" (tokamax,
#                torch, ...) if it installs.
#   2. device    nvidia-smi and jax.devices(): stops unless JAX's backend is GPU.
#   3. tests     python -m pytest tests/test_pallas.py tests/test_attention.py
#                tests/test_cudnn.py -q, with JAX_DEFAULT_MATMUL_PRECISION=highest
#                (XLA's float32 dots use TF32 on a GPU otherwise, too coarse for
#                the float64 comparisons). On a GPU the shared test base runs the
#                Pallas kernels compiled (blocks of 16), plus GPU-only tests:
#                Triton-compiled Pallas vs xla at T=1000 (bf16, float32: GQA,
#                causal, segments, lengths; values and gradients) and cuDNN vs xla.
#   4. targets   the issue's target case, bf16 B=2 T=S=8192 N=K=16 H=128 causal:
#                forward and forward+backward times of jaxattn.pallas, jax.nn
#                cudnn and jax.nn xla (median of 20 after warm-up), the GPU's
#                measured bf16 matmul rate, a few Pallas block sizes, and the
#                targets: forward >= 0.9x cuDNN and >= 50% of the matmul rate,
#                forward+backward >= 0.8x cuDNN.
#   5. bench     python -m bench --long --cases <the target case, fwd and fwdbwd>
#                against jax.nn, tokamax and torch; table on stdout, files in
#                bench/out/gpu/ (results.md, results.jsonl, results.png).
set -euo pipefail
cd "$(dirname "$0")/.."

INSTALL=1
for arg in "$@"; do
  case "$arg" in
    --no-install) INSTALL=0 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "bench/gpu.sh: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done
JAX_CUDA="${JAX_CUDA:-cuda12}"
VENV="${VENV:-build/venv-gpu}"
step() { printf '\n==== %s ====\n' "$*"; }

if [ "$INSTALL" = 1 ]; then
  step "1. install ($VENV, jax[$JAX_CUDA])"
  python3 -m venv "$VENV"
  . "$VENV/bin/activate"
  python -m pip install -q --upgrade pip
  pip install -q -e ".[test]"
  JAX_VERSION="$(python -c 'import jax; print(jax.__version__)')"
  pip install -q "jax[$JAX_CUDA]==$JAX_VERSION"
  pip install -q -e ".[bench]" || echo "bench extras did not install: step 5 runs without some peers"
fi

step "2. device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
python - <<'EOF'
import jax, sys
print("jax", jax.__version__, "devices", jax.devices())
if jax.default_backend() != "gpu":
  sys.exit(f"bench/gpu.sh: JAX's default backend is {jax.default_backend()!r}, not 'gpu': "
           "install the CUDA plugin (jax[cuda12] or jax[cuda13]) matching the driver.")
EOF

STATUS=0
step "3. tests"
JAX_DEFAULT_MATMUL_PRECISION=highest \
  python -m pytest tests/test_pallas.py tests/test_attention.py tests/test_cudnn.py -q -rs || STATUS=1

step "4. targets (bf16, B=2, T=S=8192, N=K=16, H=128, causal)"
python - <<'EOF' || STATUS=1
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxattn

B, T, N, H = 2, 8192, 16, 128
dtype = jnp.bfloat16
keys = jax.random.split(jax.random.key(0), 4)
q, k, v, do = (jax.random.normal(kk, (B, T, N, H), jnp.float32).astype(dtype) for kk in keys)
# Causal flops: half of the 4 B N T S H of dense attention (+ the diagonal); fwd+bwd 3.5x.
FWD_FLOPS = 4.0 * B * N * T * T * H * (T + 1) / (2 * T)


def median_time(f, *args, reps=20):
  f = jax.jit(f)
  jax.block_until_ready(f(*args))  # compile and warm up
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def matmul_rate():
  n = 8192
  a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
  t = median_time(lambda a: jnp.dot(a, a, preferred_element_type=jnp.float32).astype(dtype), a)
  return 2.0 * n ** 3 / t


def attention(name, **kw):
  if name == "jaxattn.pallas":
    return lambda q, k, v: jaxattn.dot_product_attention(q, k, v, is_causal=True, implementation="pallas", **kw)
  return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=name.split()[-1])


def fwdbwd(f):
  def g(q, k, v, do):
    out, vjp = jax.vjp(f, q, k, v)
    return vjp(do)
  return g


rate = matmul_rate()
print(f"measured bf16 matmul rate: {rate / 1e12:.1f} TFLOP/s (8192^3)")
results = {}
for name in ("jaxattn.pallas", "jax.nn cudnn", "jax.nn xla"):
  try:
    t_fwd = median_time(attention(name), q, k, v)
    t_bwd = median_time(fwdbwd(attention(name)), q, k, v, do)
    results[name] = (t_fwd, t_bwd)
  except Exception as exc:  # report and go on: one failing implementation must not hide the others
    print(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")

ref = jax.jit(attention("jax.nn cudnn" if "jax.nn cudnn" in results else "jax.nn xla"))(q, k, v)
if "jaxattn.pallas" in results:
  err = float(jnp.max(jnp.abs(jax.jit(attention("jaxattn.pallas"))(q, k, v).astype(jnp.float32) - ref.astype(jnp.float32))))
  print(f"max |pallas - reference| on the output: {err:.3g}")

print(f"\n| implementation | fwd ms | fwd TFLOP/s | % matmul | fwd+bwd ms | fwd+bwd TFLOP/s |")
print(f"|---|---|---|---|---|---|")
for name, (tf, tb) in results.items():
  print(f"| {name} | {tf * 1e3:.2f} | {FWD_FLOPS / tf / 1e12:.1f} | {100 * FWD_FLOPS / tf / rate:.0f}% "
        f"| {tb * 1e3:.2f} | {3.5 * FWD_FLOPS / tb / 1e12:.1f} |")

print("\nPallas block sizes (query, key), forward ms:")
for bs in ((64, 64), (128, 32), (128, 64), (128, 128), (64, 128)):
  try:
    print(f"  {bs}: {median_time(attention('jaxattn.pallas', block_sizes=bs), q, k, v) * 1e3:.2f}")
  except Exception as exc:
    print(f"  {bs}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")

if "jaxattn.pallas" in results and "jax.nn cudnn" in results:
  (pf, pb), (cf, cb) = results["jaxattn.pallas"], results["jax.nn cudnn"]
  checks = [("forward >= 0.9x cuDNN", cf / pf, 0.9),
            ("forward >= 50% of the bf16 matmul rate", FWD_FLOPS / pf / rate, 0.5),
            ("forward+backward >= 0.8x cuDNN", cb / pb, 0.8)]
  print()
  for what, got, want in checks:
    print(f"target {what}: {got:.2f} -> {'PASS' if got >= want else 'MISS'}")
EOF

step "5. bench (the target case against jax.nn, tokamax, torch)"
python -m bench --long --cases "fwd-causal-T8192-B2-N16-K16-H128-bf16,fwdbwd-causal-T8192-B2-N16-K16-H128-bf16" \
  --impls "jaxattn.pallas,jaxattn.cudnn,jaxattn.chunked,jax.nn,tokamax,torch" --out bench/out/gpu || STATUS=1

step "done"
[ "$STATUS" = 0 ] && echo "tests and benchmark ran cleanly" || echo "some tests or jaxattn benchmark rows failed (see above)"
exit "$STATUS"
