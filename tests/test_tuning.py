"""Block-size tuning cache: round trip, lookup by key, and the effect on dispatch."""

import json
import re

import jax
import numpy as np
import pytest

import jaxattn
from jaxattn import attention, testing, tuning

B, T, N, H = 1, 256, 2, 16


@pytest.fixture
def cache(tmp_path, monkeypatch):
  path = tmp_path / "block_sizes.json"
  monkeypatch.setenv(tuning.CACHE_ENV, str(path))
  return path


def _q():
  return testing.random_normal(jax.random.key(0), (B, T, N, H))


def _tile_shapes(**kwargs):
  q = _q()
  text = jax.jit(lambda q: jaxattn.dot_product_attention(
      q, q, q, implementation="chunked", **kwargs)).lower(q).as_text()
  return set(re.findall(r"tensor<1x2x(\d+)x(\d+)xf32>", text))


def _key(**kwargs):
  q = _q()
  inputs, config, _ = attention.normalize(q, q, q, **kwargs)
  return tuning.key_for("chunked", inputs, config)


def test_key_fields():
  key = _key(is_causal=True)
  assert key == tuning.TuningKey("chunked", "cpu", jax.devices()[0].device_kind, "float32",
                                 H, "causal", 256)
  assert _key().mask_family == "dense"
  assert _key(local_window_size=(32, 0)).mask_family == "window-32-0"
  ids = np.zeros((B, T), np.int32)
  assert _key(query_segment_ids=ids).mask_family == "documents"


def test_record_lookup_round_trip(cache):
  key = _key(is_causal=True)
  assert tuning.lookup(key) is None
  tuning.record(key, (64, 32), {(64, 32): 1.0, (128, 128): 2.0})
  other = key._replace(mask_family="dense")
  tuning.record(other, (128, 64))
  assert tuning.lookup(key) == (64, 32)
  assert tuning.lookup(other) == (128, 64)
  tuning.record(key, (32, 32))  # replaces, keeps the other entry
  assert tuning.lookup(key) == (32, 32)
  data = json.loads(cache.read_text())
  assert len(data["entries"]) == 2


def test_cache_changes_the_chosen_block_sizes(cache):
  assert ("64", "32") not in _tile_shapes(is_causal=True)
  tuning.record(_key(is_causal=True), (64, 32))
  assert ("64", "32") in _tile_shapes(is_causal=True)
  # Other mask families keep the defaults; an explicit block_sizes wins.
  assert ("64", "32") not in _tile_shapes()
  assert ("64", "32") not in _tile_shapes(is_causal=True, block_sizes=(128, 128))
  # Same values whatever the blocks.
  q = _q()
  tuned = jaxattn.dot_product_attention(q, q, q, is_causal=True)
  plain = jaxattn.dot_product_attention(q, q, q, is_causal=True, block_sizes=(256, 256))
  np.testing.assert_allclose(tuned, plain, atol=1e-5)


def test_disabled_and_corrupt_cache(cache, monkeypatch):
  cache.write_text("{not json")
  with pytest.warns(UserWarning, match="unreadable cache"):
    assert tuning.lookup(_key(is_causal=True)) is None
  monkeypatch.setenv(tuning.CACHE_ENV, "")
  assert tuning.cache_path() is None
  assert tuning.lookup(_key(is_causal=True)) is None


def test_tune_records_the_fastest(cache):
  q = _q()
  result = tuning.tune(q, q, q, is_causal=True, candidates=[(64, 32), (128, 128)], repeats=1,
                       include_backward=False)
  assert set(result.timings_ms) == {(64, 32), (128, 128)}
  assert result.block_sizes == min(result.timings_ms, key=result.timings_ms.get)
  assert tuning.lookup(result.key) == result.block_sizes
  assert tuple(map(str, result.block_sizes)) in _tile_shapes(is_causal=True)


def test_tune_rejects_bad_arguments():
  q = _q()
  with pytest.raises(ValueError, match="implementation"):
    tuning.tune(q, q, q, implementation="xla")
  with pytest.raises(ValueError, match="repeats"):
    tuning.tune(q, q, q, repeats=0)
  with pytest.raises(ValueError, match="block_sizes"):
    tuning.record(_key(), (0, 4), path="/tmp/unused-jaxattn.json")
