"""Test-wide JAX settings: 8 simulated CPU devices, silent broadcasting is an error,
LLVM backend optimization off, and a persistent compilation cache (the suite is
compile-bound).

`--xla_backend_optimization_level=0` only changes how long LLVM spends optimizing
the generated CPU code (XLA's HLO passes are the same, and so is what is tested); at
these tiny shapes compiling dominates, and it takes about 30% of it (for
jax.random's threefry, over 90%). Set XLA_FLAGS yourself to choose another level.

The cache lives in $JAX_COMPILATION_CACHE_DIR when set (CI gives each venv its own),
else in .jax_cache/py<X.Y>-jax<version> at the repository root, so two Pythons or two
jax versions never share entries. A rerun then skips most XLA compiles.
"""

import os
import pathlib
import sys

# Before jax is imported: tests/test_parallel.py shards over 8 CPU devices.
# Single-device code still runs on device 0.
_flags = os.environ.get("XLA_FLAGS", "")
if "--xla_backend_optimization_level" not in _flags:
  _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
  _root = pathlib.Path(__file__).resolve().parent.parent
  _tag = f"py{sys.version_info.major}.{sys.version_info.minor}-jax{jax.__version__}"
  jax.config.update("jax_compilation_cache_dir", str(_root / ".jax_cache" / _tag))
# Cache every compile: most take well under jax's default threshold of 1 s.
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# A user's block-size tuning cache must not change what the tests compile;
# tests/test_tuning.py points it at a temporary file where it needs one.
os.environ["JAXATTN_TUNING_CACHE"] = ""
