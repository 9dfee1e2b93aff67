"""Block sizes measured on this machine, stored in a small cache file.

The blocked implementations ("chunked", "pallas", ...) take `block_sizes=`;
without it they use defaults measured on one kind of machine. `tune` times a
grid of candidate block sizes for one problem on this machine and records the
fastest in a JSON cache file; `dot_product_attention(block_sizes=None)` then
reads that file at trace time and uses the recorded sizes for problems with
the same key. The key is (implementation, backend, device kind, dtype, head
dim, mask family, length bucket); a problem whose key is not in the file
keeps the defaults, so the choice is deterministic given the file.

The file lives at `$JAXATTN_TUNING_CACHE` if set, else
`$XDG_CACHE_HOME/jaxattn/block_sizes.json` (`~/.cache/...` by default).
Set `JAXATTN_TUNING_CACHE` to an empty string to ignore any cache.
Functions already traced keep the block sizes they were traced with.

>>> import jax, jaxattn.tuning as tuning
>>> q = jax.random.normal(jax.random.key(0), (1, 64, 2, 16))
>>> result = tuning.tune(q, q, q, is_causal=True, candidates=[(32, 32), (64, 64)],
...                      repeats=1, path=None)
>>> result.block_sizes in [(32, 32), (64, 64)]
True
"""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import time
import warnings
from typing import Any, Iterable, NamedTuple

import jax

from jaxattn import _checks
from jaxattn._impl import common

CACHE_ENV = "JAXATTN_TUNING_CACHE"
_FORMAT = 1
# Implementations whose block sizes the cache may set.
TUNABLE = ("chunked", "pallas")


class TuningKey(NamedTuple):
  """What a recorded block-size choice applies to."""
  implementation: str
  backend: str
  device_kind: str
  dtype: str
  head_dim: int
  mask_family: str
  length_bucket: int


class TuneResult(NamedTuple):
  """What `tune` measured: the key, the winner and every candidate's time."""
  key: TuningKey
  block_sizes: tuple[int, int]
  timings_ms: dict[tuple[int, int], float]


def cache_path() -> pathlib.Path | None:
  """Where the cache file lives (None when disabled by an empty env var)."""
  env = os.environ.get(CACHE_ENV)
  if env is not None:
    return pathlib.Path(env) if env else None
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(base) / "jaxattn" / "block_sizes.json"


def mask_family(inputs: common.AttentionInputs, config: common.AttentionConfig) -> str:
  """A coarse name for the mask structure, which decides the best block shape."""
  if config.window is not None:
    left, right = config.window
    return f"window-{'inf' if left is None else left}-{'inf' if right is None else right}"
  if inputs.query_segment_ids is not None:
    return "documents"
  if inputs.mask_fn is not None or inputs.mask is not None:
    return "masked"
  return "causal" if config.is_causal else "dense"


def _bucket(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def key_for(name: str, inputs: common.AttentionInputs, config: common.AttentionConfig,
            backend: str | None = None) -> TuningKey:
  """The cache key of a normalized problem for implementation `name`."""
  backend = backend or jax.default_backend()
  devices = jax.devices(backend) if backend in ("cpu", "gpu", "tpu", "cuda", "rocm") else []
  kind = devices[0].device_kind if devices else backend
  T, S = inputs.query.shape[1], inputs.key.shape[1]
  return TuningKey(name, backend, kind, str(inputs.query.dtype), int(inputs.query.shape[3]),
                   mask_family(inputs, config), _bucket(max(T, S)))


_LOADED: dict[Any, dict[TuningKey, tuple[int, int]]] = {}


def _read(path: pathlib.Path) -> dict[TuningKey, tuple[int, int]]:
  try:
    stamp = (str(path), path.stat().st_mtime_ns)
  except OSError:
    return {}
  if stamp not in _LOADED:
    entries: dict[TuningKey, tuple[int, int]] = {}
    try:
      data = json.loads(path.read_text())
      if data.get("format") != _FORMAT:
        raise ValueError(f"format {data.get('format')!r}, expected {_FORMAT}")
      for entry in data["entries"]:
        bq, bk = (int(b) for b in entry["block_sizes"])
        if bq <= 0 or bk <= 0:
          raise ValueError(f"non-positive block sizes {entry['block_sizes']}")
        entries[TuningKey(**entry["key"])] = (bq, bk)
    except (ValueError, KeyError, TypeError) as e:
      warnings.warn(f"jaxattn.tuning: ignoring the unreadable cache {path} ({e}); "
                    f"delete it or run jaxattn.tuning.tune again.", stacklevel=3)
      entries = {}
    _LOADED.clear()
    _LOADED[stamp] = entries
  return _LOADED[stamp]


def lookup(key: TuningKey, path: pathlib.Path | None | str = "default") -> tuple[int, int] | None:
  """The recorded block sizes for `key`, or None (use the defaults)."""
  path = cache_path() if path == "default" else path
  if path is None:
    return None
  return _read(pathlib.Path(path)).get(key)


def block_sizes_for(name: str, inputs: common.AttentionInputs,
                    config: common.AttentionConfig) -> tuple[int, int] | None:
  """What the cache says for this problem on the default backend, or None."""
  path = cache_path()
  if name not in TUNABLE or path is None or not path.exists():
    return None
  return lookup(key_for(name, inputs, config), path)


def record(key: TuningKey, block_sizes: tuple[int, int],
           timings_ms: dict[tuple[int, int], float] | None = None,
           path: pathlib.Path | None | str = "default") -> pathlib.Path:
  """Stores `block_sizes` for `key` in the cache file (replacing an older entry)."""
  path = cache_path() if path == "default" else path
  if path is None:
    raise ValueError(f"record: no cache file: {CACHE_ENV} is set to an empty string.")
  path = pathlib.Path(path)
  bq, bk = _checks.block_sizes("record", block_sizes, optional=False)
  entries = []
  if path.exists():
    try:
      entries = [e for e in json.loads(path.read_text())["entries"]
                 if TuningKey(**e["key"]) != key]
    except (ValueError, KeyError, TypeError):
      entries = []  # an unreadable file is replaced
  entry: dict[str, Any] = {"key": key._asdict(), "block_sizes": [bq, bk],
                           "jax": jax.__version__}
  if timings_ms:
    entry["timings_ms"] = {f"{a}x{b}": round(t, 4) for (a, b), t in sorted(timings_ms.items())}
  entries.append(entry)
  entries.sort(key=lambda e: tuple(str(v) for v in e["key"].values()))
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps({"format": _FORMAT, "entries": entries}, indent=1))
  tmp.replace(path)
  return path


def default_candidates(T: int, S: int) -> list[tuple[int, int]]:
  """Block-size pairs worth timing for T queries and S keys."""
  sizes = (64, 128, 256, 512, 1024)
  pairs = {(min(bq, T), min(bk, S)) for bq in sizes for bk in sizes
           if bq // 4 <= bk <= bq * 4}
  return sorted(pairs)


def tune(query, key, value, *, implementation: str = "chunked",
         candidates: Iterable[tuple[int, int]] | None = None,
         include_backward: bool = True, repeats: int = 5,
         path: pathlib.Path | None | str = "default", **attention_kwargs) -> TuneResult:
  """Times candidate block sizes for one problem; records and returns the fastest.

  Args:
    query, key, value: example arrays with the shapes and dtype to tune for
      (random values are fine: the time does not depend on them).
    implementation: a blocked implementation, one of `TUNABLE`.
    candidates: (query block, key block) pairs; default `default_candidates`.
    include_backward: time forward + backward (the training step) rather
      than the forward alone.
    repeats: timed calls per candidate after one warm-up; the median counts.
    path: the cache file; "default" is `cache_path()`, None times without
      recording.
    **attention_kwargs: any other `dot_product_attention` argument
      (is_causal, local_window_size, segment ids ...); they decide the key.

  Returns:
    A `TuneResult` with the key, the fastest block sizes and all timings.
  """
  from jaxattn import attention  # local: attention imports this module

  if implementation not in TUNABLE:
    raise ValueError(f"tune: implementation must be one of {TUNABLE}; got {implementation!r}.")
  if not (isinstance(repeats, int) and repeats > 0):
    raise ValueError(f"tune: repeats must be a positive int; got {repeats!r}.")
  inputs, config, _ = attention.normalize(query, key, value, **attention_kwargs)
  T, S = inputs.query.shape[1], inputs.key.shape[1]
  pairs = sorted(set(candidates)) if candidates is not None else default_candidates(T, S)
  if not pairs:
    raise ValueError("tune: candidates is empty.")

  def run(block_sizes):
    def fwd(q, k, v):
      return attention.dot_product_attention(
          q, k, v, implementation=implementation, block_sizes=block_sizes, **attention_kwargs)
    if not include_backward:
      return jax.jit(fwd)
    def loss(q, k, v):
      return fwd(q, k, v).astype(jax.numpy.float32).sum()
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

  timings: dict[tuple[int, int], float] = {}
  for pair in pairs:
    pair = (int(pair[0]), int(pair[1]))
    fn = run(pair)
    jax.block_until_ready(fn(query, key, value))
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(fn(query, key, value))
      times.append(1e3 * (time.perf_counter() - start))
    timings[pair] = statistics.median(times)
  best = min(timings, key=lambda p: (timings[p], p))
  tkey = key_for(implementation, inputs, config)
  if path is not None:
    record(tkey, best, timings, path=path)
  return TuneResult(tkey, best, timings)
