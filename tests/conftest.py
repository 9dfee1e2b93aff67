"""Test-wide JAX settings: 8 simulated CPU devices, silent broadcasting is an error."""

import os

# Before jax is imported: tests/test_parallel.py shards over 8 CPU devices.
# Single-device code still runs on device 0.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_addoption(parser):
  parser.addoption("--runslow", action="store_true", default=False,
                   help="also run tests marked slow (e.g. the Mosaic GPU interpreter's full base)")


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: long-running; skipped unless --runslow is given")


def pytest_collection_modifyitems(config, items):
  import pytest  # noqa: PLC0415

  if config.getoption("--runslow"):
    return
  skip = pytest.mark.skip(reason="slow: run with --runslow")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)
