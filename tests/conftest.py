"""Test-wide JAX settings: 8 simulated CPU devices, silent broadcasting is an error."""

import os

# Before jax is imported: tests/test_parallel.py shards over 8 CPU devices.
# Single-device code still runs on device 0.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

# A user's block-size tuning cache must not change what the tests compile;
# tests/test_tuning.py points it at a temporary file where it needs one.
os.environ["JAXATTN_TUNING_CACHE"] = ""
