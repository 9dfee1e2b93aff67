"""Test-wide JAX settings: 8 simulated CPU devices, silent broadcasting is an error."""

import os

# Before jax is imported: tests/test_parallel.py shards over 8 CPU devices.
# Single-device code still runs on device 0.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_configure(config):
  # Registered here too in case pyproject's [tool.pytest.ini_options] lacks it.
  config.addinivalue_line("markers", "slow: long property sweeps; run with `-m slow`")


def pytest_collection_modifyitems(config, items):
  """Without a -m expression, slow tests are skipped (`-m slow` runs them)."""
  if config.getoption("markexpr", ""):
    return
  import pytest  # noqa: PLC0415
  skip = pytest.mark.skip(reason="slow: run with `pytest -m slow`")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)
