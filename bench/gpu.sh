#!/usr/bin/env bash
# GPU checks and the GPU benchmark (issues 9 and 12), run by hand on a machine with an NVIDIA GPU.
#
# CI has no GPU: this script is how the compiled Pallas kernels (Triton, Mosaic GPU)
# and the cuDNN path get tested and timed. From the repository root:
#
#   bench/gpu.sh                 # new venv build/venv-gpu, install, test, time (~10-20 min)
#   bench/gpu.sh --no-install    # use the active Python environment as it is (no network needed)
#   bench/gpu.sh --dry-run       # no install, any backend, tiny shapes: checks the script itself
#   JAX_CUDA=cuda13 bench/gpu.sh # the CUDA 13 wheels (default cuda12)
#   VENV=path bench/gpu.sh       # another venv folder (build/ is git-ignored)
#
# Steps (each prints a header). Install and device problems stop the script
# (not with --dry-run); failing tests are reported and the timing steps still
# run; the exit status is 1 if tests or the benchmark's jaxattn rows failed.
# Performance targets are reported (MET/MISSED), not enforced.
#   1. install   python3 -m venv $VENV; pip install -e ".[test]" and
#                "jax[$JAX_CUDA]" at the installed jax version; ".[bench]" (tokamax,
#                torch, ...) if it installs. Skipped with --no-install / --dry-run.
#   2. device    nvidia-smi and jax.devices(): stops unless JAX's backend is GPU.
#   3. tests     python -m pytest tests/test_pallas.py tests/test_attention.py
#                tests/test_cudnn.py tests/test_mosaic.py tests/test_gpu_dispatch.py,
#                with JAX_DEFAULT_MATMUL_PRECISION=highest (XLA's float32 dots use
#                TF32 on a GPU otherwise, too coarse for the float64 comparisons).
#                On a GPU the shared test base runs the Pallas kernels compiled
#                (blocks of 16), plus GPU-only tests: Triton-compiled Pallas vs xla,
#                cuDNN vs xla, and the compiled Mosaic GPU kernel vs the float64
#                reference (compute capability >= 9.0). --dry-run: only
#                tests/test_gpu_dispatch.py.
#   4. targets   python -m bench.gpu_targets: issue 12's table in one process - the
#                target shape bf16 B=2 T=S=8192 N=K=16 H=128 (causal fwd, causal
#                fwd+bwd, dense fwd), 8 packed causal documents and soft-cap 30
#                causal, for jaxattn (default, cudnn, pallas, pallas (128, 128),
#                mosaic, chunked), jax.nn cudnn/xla, tokamax mosaic/triton/cudnn and
#                torch SDPA where installed; the bf16 matmul rate; every target
#                MET/MISSED as a same-run ratio.
#   5. bench     python -m bench --long --cases <the GPU cases> against the GPU peers
#                (jax.nn.cudnn/xla, tokamax.mosaic/triton/cudnn, torch.sdpa); table on
#                stdout, files in bench/out/gpu/ (results.md, results.jsonl, results.png).
set -euo pipefail
cd "$(dirname "$0")/.."

INSTALL=1
DRY=0
for arg in "$@"; do
  case "$arg" in
    --no-install) INSTALL=0 ;;
    --dry-run) INSTALL=0; DRY=1 ;;
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
DRY="$DRY" python - <<'EOF'
import jax, os, sys
print("jax", jax.__version__, "devices", jax.devices())
if jax.default_backend() != "gpu" and os.environ["DRY"] != "1":
  sys.exit(f"bench/gpu.sh: JAX's default backend is {jax.default_backend()!r}, not 'gpu': "
           "install the CUDA plugin (jax[cuda12] or jax[cuda13]) matching the driver.")
EOF

STATUS=0
step "3. tests"
if [ "$DRY" = 1 ]; then
  python -m pytest tests/test_gpu_dispatch.py -q -rs || STATUS=1
else
  JAX_DEFAULT_MATMUL_PRECISION=highest \
    python -m pytest tests/test_pallas.py tests/test_attention.py tests/test_cudnn.py \
      tests/test_mosaic.py tests/test_gpu_dispatch.py -q -rs || STATUS=1
fi

step "4. targets (issue 12's table: bf16, B=2, T=S=8192, N=K=16, H=128)"
if [ "$DRY" = 1 ]; then
  python -m bench.gpu_targets --dry-run || STATUS=1
else
  python -m bench.gpu_targets || STATUS=1
fi

step "5. bench (the GPU cases against the GPU peers)"
if [ "$DRY" = 1 ]; then
  export JAXATTN_BENCH_GPU_SIZES="T=128,N=2,K=2,H=64" JAXATTN_BENCH_GPU_PEERS=1
  GPU_CASES="*-T128-B2-N2-K2-bf16*"
  IMPLS="jaxattn.chunked,jaxattn.mosaic,jaxattn.cudnn,jax.nn.xla,jax.nn.cudnn,tokamax.,torch.sdpa"
  OUT=bench/out/gpu-dry-run
else
  GPU_CASES="*-T8192-B2-N16-K16-H128-bf16*"
  IMPLS="jaxattn.cudnn,jaxattn.pallas,jaxattn.mosaic,jaxattn.chunked,jax.nn.,tokamax.,torch.sdpa"
  OUT=bench/out/gpu
fi
python -m bench --long --cases "$GPU_CASES" --impls "$IMPLS" --baseline jax.nn.xla --out "$OUT" || STATUS=1

step "done"
[ "$STATUS" = 0 ] && echo "tests and benchmark ran cleanly" || echo "some tests or jaxattn benchmark rows failed (see above)"
exit "$STATUS"
