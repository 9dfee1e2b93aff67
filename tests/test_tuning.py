"""Block-size tuning cache: round trip, lookup by key, and the effect on dispatch."""

import json
import os
import re
import stat

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
                                 H, H, 1, "causal", 256, 256)
  assert _key().mask_family == "dense"
  assert _key(local_window_size=(32, 0)).mask_family == "window-32-0"
  ids = np.zeros((B, T), np.int32)
  assert _key(query_segment_ids=ids).mask_family == "documents"
  assert _key(query_segment_ids=ids, is_causal=True).mask_family == "documents-causal"
  # The band each query sees decides: causal cuts a window's right side.
  assert _key(local_window_size=(8, 8)).mask_family == "window-8-8"
  assert _key(local_window_size=(8, 8), is_causal=True).mask_family == "window-8-0"
  assert _key(local_window_size=8, query_segment_ids=ids).mask_family == "documents-window-8-8"
  assert _key(mask=np.ones((T, T), bool), is_causal=True).mask_family == "masked-causal"
  # Decode-like and prefill problems, other head dims and groups get keys of their own.
  q = _q()
  k = testing.random_normal(jax.random.key(1), (B, 1000, 1, H))
  v = testing.random_normal(jax.random.key(2), (B, 1000, 1, 8))
  inputs, config, _ = attention.normalize(q[:, :1], k, v)
  key = tuning.key_for("chunked", inputs, config)
  assert (key.query_bucket, key.key_bucket, key.group, key.value_head_dim) == (1, 1024, 2, 8)


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


@pytest.mark.parametrize("text", [
    "{not json", "[]", '"x"', '{"format": 2, "entries": 5}', '{"format": 1, "entries": []}',
    '{"format": 2, "entries": [{"key": 1, "block_sizes": [8, 8]}]}',
    '{"format": 2, "entries": [{"key": {}, "block_sizes": [8, 8]}]}',
    '{"format": 2, "entries": [{"key": KEY, "block_sizes": [Infinity, 8]}]}',
    '{"format": 2, "entries": [{"key": KEY, "block_sizes": [8.5, 8]}]}',
    '{"format": 2, "entries": [{"key": KEY, "block_sizes": [8]}]}',
    '{"format": 2, "entries": [{"key": LISTKEY, "block_sizes": [8, 8]}]}',  # unhashable field
    '{"format": 2, "entries": [{"key": STRKEY, "block_sizes": [8, 8]}]}',  # "16" for 16
    '{"format": 2, "entries": ' + "[" * 100000 + "]" * 100000 + "}",  # RecursionError
    "directory"])
def test_a_bad_cache_is_ignored_with_a_warning(cache, text):
  """Whatever the file holds, attention calls keep their defaults (and their values)."""
  fields = _key(is_causal=True)._asdict()
  key = json.dumps(fields)
  listkey = json.dumps(dict(fields, head_dim=[fields["head_dim"]]))
  strkey = json.dumps(dict(fields, head_dim=str(fields["head_dim"])))
  if text == "directory":
    cache.mkdir()
  else:
    cache.write_text(text.replace("LISTKEY", listkey).replace("STRKEY", strkey)
                     .replace("KEY", key))
  q = _q()
  with pytest.warns(UserWarning, match="unreadable cache"):
    out = jaxattn.dot_product_attention(q, q, q, is_causal=True, implementation="chunked")
  plain = jaxattn.dot_product_attention(q, q, q, is_causal=True, block_sizes=(512, 512))
  np.testing.assert_array_equal(out, plain)


def test_record_keeps_the_files_mode_or_the_umask(cache):
  """mkstemp's 0600 is not kept: a cache shared through the env var stays readable."""
  key = _key(is_causal=True)
  old = os.umask(0o022)
  try:
    tuning.record(key, (64, 64))
    assert stat.S_IMODE(cache.stat().st_mode) == 0o644
    cache.chmod(0o640)
    tuning.record(key, (32, 32))
    assert stat.S_IMODE(cache.stat().st_mode) == 0o640
  finally:
    os.umask(old)


def test_tune_with_the_cache_off_returns_without_recording(cache, monkeypatch):
  monkeypatch.setenv(tuning.CACHE_ENV, "")
  q = _q()
  with pytest.warns(UserWarning, match="not recorded"):
    result = jaxattn.tune(q, q, q, is_causal=True, candidates=[(64, 64), (128, 128)], repeats=1,
                          include_backward=False)
  assert result.block_sizes in result.timings_ms and not cache.exists()


def test_disabled_cache_and_home_in_the_path(cache, monkeypatch, tmp_path):
  monkeypatch.setenv(tuning.CACHE_ENV, "")
  assert tuning.cache_path() is None
  assert tuning.lookup(_key(is_causal=True)) is None
  monkeypatch.setenv("HOME", str(tmp_path))
  monkeypatch.setenv(tuning.CACHE_ENV, "~/tuned.json")
  assert tuning.cache_path() == tmp_path / "tuned.json"


def _record_many(args):
  path, worker, n = args
  key = tuning.TuningKey("chunked", "cpu", "test", "float32", 8, 8, 1, "dense", 16, 16)
  for i in range(n):
    tuning.record(key._replace(device_kind=f"w{worker}-{i}"), (8, 8), path=path)


def test_concurrent_writers_keep_every_entry(tmp_path):
  """Writers serialize on a lock and replace the file atomically: nothing is lost."""
  import multiprocessing
  path = tmp_path / "block_sizes.json"
  with multiprocessing.get_context("spawn").Pool(3) as pool:
    pool.map(_record_many, [(path, w, 25) for w in range(3)])
  assert len(tuning._parse(path.read_text())) == 75
  assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


def test_tune_records_the_fastest(cache):
  q = _q()
  result = tuning.tune(q, q, q, is_causal=True, candidates=[(64, 32), (128, 128)], repeats=1,
                       include_backward=False)
  assert set(result.timings_ms) == {(64, 32), (128, 128)}
  assert result.block_sizes == min(result.timings_ms, key=result.timings_ms.get)
  assert tuning.lookup(result.key) == result.block_sizes
  assert tuple(map(str, result.block_sizes)) in _tile_shapes(is_causal=True)


def test_tune_skips_candidates_the_implementation_refuses(cache, monkeypatch):
  """A pair the implementation refuses (NotImplementedError, as a compiled Pallas
  plan does for blocks that are not powers of two) is skipped and reported."""
  real = attention.dot_product_attention

  def picky(*args, block_sizes=None, **kwargs):
    if block_sizes == (96, 96):
      raise NotImplementedError("blocks must be powers of two")
    return real(*args, block_sizes=block_sizes, **kwargs)

  monkeypatch.setattr(attention, "dot_product_attention", picky)
  q = _q()
  result = tuning.tune(q, q, q, candidates=[(96, 96), (64, 64)], repeats=1, include_backward=False)
  assert result.block_sizes == (64, 64) and set(result.timings_ms) == {(64, 64)}
  assert result.skipped == {(96, 96): "blocks must be powers of two"}
  with pytest.raises(ValueError, match=r"^tune: 'chunked' refused every candidate for this "
                                       r"problem: \(96, 96\): blocks must be powers of two$"):
    tuning.tune(q, q, q, candidates=[(96, 96)], repeats=1, path=None)


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(implementation="xla"), ValueError, r"implementation must be one of"),
    (dict(repeats=0), ValueError, r"repeats must be a positive int; got 0"),
    (dict(repeats=True), ValueError, r"repeats must be a positive int; got True"),
    (dict(path=5), TypeError, r"path must be a str, a path, None or 'default'; got int"),
    (dict(candidates=5), TypeError, r"candidates must be an iterable of \(query block, key block\) "
                                    r"pairs of positive ints; got int"),
    (dict(candidates="ab"), TypeError, r"candidates must be .*; got str"),
    (dict(candidates=[(32,)]), ValueError, r"candidates must be .*; got the entry \(32,\)"),
    (dict(candidates=[(32, 32, 7)]), ValueError, r".*got the entry \(32, 32, 7\)"),
    (dict(candidates=[(32.7, 32)]), ValueError, r".*got the entry \(32.7, 32\)"),
    (dict(candidates=[(True, 32)]), ValueError, r".*got the entry \(True, 32\)"),
    (dict(candidates=[(0, 32)]), ValueError, r".*got the entry \(0, 32\)"),
    (dict(candidates=[]), ValueError, r"candidates is empty"),
    (dict(block_sizes=(32, 32)), TypeError, r"unexpected keyword argument 'block_sizes' \(tune chooses it\)"),
    (dict(return_residual=True), TypeError, r".*'return_residual' \(tune times the output\)"),
    (dict(causal=True), TypeError, r".*'causal' \(not a dot_product_attention argument\)"),
])
def test_tune_rejects_bad_arguments_before_timing(kwargs, error, message):
  q = _q()
  with pytest.raises(error, match=r"^tune: " + message):
    tuning.tune(q, q, q, **kwargs)


def test_record_rejects_bad_block_sizes():
  with pytest.raises(ValueError, match="block_sizes"):
    tuning.record(_key(), (0, 4), path="/tmp/unused-jaxattn.json")
