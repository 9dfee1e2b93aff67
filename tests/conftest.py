"""Test-wide JAX settings: 8 simulated CPU devices, silent broadcasting is an error."""

import os

# Before jax is imported: tests/test_parallel.py shards over 8 CPU devices.
# Single-device code still runs on device 0.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_addoption(parser):
  parser.addoption("--run-slow", action="store_true", default=False,
                   help="also run tests marked slow (e.g. the full splash interpret-mode grid)")


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: heavy tests, skipped unless --run-slow (or JAXATTN_RUN_SLOW=1)")


def pytest_collection_modifyitems(config, items):
  import pytest  # noqa: PLC0415
  if config.getoption("--run-slow") or os.environ.get("JAXATTN_RUN_SLOW") == "1":
    return
  skip = pytest.mark.skip(reason="slow: run with --run-slow or JAXATTN_RUN_SLOW=1")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)
