"""Block sizes measured on this machine, stored in a small cache file.

The blocked implementations ("chunked", "pallas", ...) take `block_sizes=`;
without it they use defaults measured on one kind of machine. `tune` times a
grid of candidate block sizes for one problem on this machine and records the
fastest in a JSON cache file; `dot_product_attention(block_sizes=None)` then
reads that file at trace time and uses the recorded sizes for problems with
the same key. The key is (implementation, backend, device kind, dtype, head
dims, query heads per K/V head, mask family, query and key lengths rounded
up to powers of two); a problem whose key is not in the file keeps the
defaults, so the choice is deterministic given the file. Writers take a lock
and replace the file atomically, so concurrent `tune` runs keep each other's
entries and readers never see a partial file; a file that cannot be read or
parsed is ignored with a warning.

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

import contextlib
import inspect
import json
import os
import pathlib
import stat
import statistics
import tempfile
import time
import warnings
from typing import Any, Iterable, NamedTuple

try:  # POSIX: writers serialize their read-modify-write with an advisory lock
  import fcntl
except ImportError:  # pragma: no cover - Windows: atomic replace only
  fcntl = None  # type: ignore[assignment]

import jax

from jaxattn import _checks
from jaxattn._impl import common

CACHE_ENV = "JAXATTN_TUNING_CACHE"
_FORMAT = 2  # 2: query and key length buckets, value head dim, group size
# Implementations whose block sizes the cache may set.
TUNABLE = ("chunked", "pallas")


class TuningKey(NamedTuple):
  """What a recorded block-size choice applies to."""
  implementation: str
  backend: str
  device_kind: str
  dtype: str
  head_dim: int
  value_head_dim: int
  group: int  # query heads per K/V head
  mask_family: str
  query_bucket: int  # query length rounded up to a power of two
  key_bucket: int  # key length likewise


class TuneResult(NamedTuple):
  """What `tune` measured: the key, the winner, every candidate's time and
  the candidates the implementation refused for this problem (with why)."""
  key: TuningKey
  block_sizes: tuple[int, int]
  timings_ms: dict[tuple[int, int], float]
  skipped: dict[tuple[int, int], str]


def cache_path() -> pathlib.Path | None:
  """Where the cache file lives (None when disabled by an empty env var)."""
  env = os.environ.get(CACHE_ENV)
  if env is not None:
    return pathlib.Path(env).expanduser() if env else None
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(base) / "jaxattn" / "block_sizes.json"


def mask_family(inputs: common.AttentionInputs, config: common.AttentionConfig) -> str:
  """A coarse name for the mask structure, which decides the best block shape:
  "documents" or "masked" (a dense mask or mask_fn) if any, then the band of
  keys each query sees (is_causal and the window together, `common.band`):
  "causal", or "window-LEFT-RIGHT"; "dense" when nothing applies."""
  parts = []
  if inputs.query_segment_ids is not None:
    parts.append("documents")
  elif inputs.mask_fn is not None or inputs.mask is not None:
    parts.append("masked")
  band = common.band(config)
  if band == (None, 0):
    parts.append("causal")
  elif band is not None:
    parts.append("window-" + "-".join("inf" if b is None else str(b) for b in band))
  return "-".join(parts) or "dense"


def _bucket(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def key_for(name: str, inputs: common.AttentionInputs, config: common.AttentionConfig,
            backend: str | None = None) -> TuningKey:
  """The cache key of a normalized problem for implementation `name`."""
  backend = backend or jax.default_backend()
  devices = jax.devices(backend) if backend in ("cpu", "gpu", "tpu", "cuda", "rocm") else []
  kind = devices[0].device_kind if devices else backend
  _, T, N, H = inputs.query.shape
  _, S, K, Hv = inputs.value.shape
  return TuningKey(name, backend, kind, str(inputs.query.dtype), int(H), int(Hv), int(N // K),
                   mask_family(inputs, config), _bucket(T), _bucket(S))


_INT_FIELDS = ("head_dim", "value_head_dim", "group", "query_bucket", "key_bucket")
_FIELD_TYPES: dict[str, type] = {f: int if f in _INT_FIELDS else str for f in TuningKey._fields}


def _file_mode(path: pathlib.Path) -> int:
  """`path`'s permission bits if it exists, else those of a new file (0666 less the umask)."""
  try:
    return stat.S_IMODE(path.stat().st_mode)
  except OSError:
    return 0o666 & ~_umask()


def _umask() -> int:
  """The process umask: from /proc on Linux (reading it with os.umask sets it
  for a moment, racing other threads that create files), else via os.umask."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError):
    pass
  umask = os.umask(0)
  os.umask(umask)
  return umask


_LOADED: dict[Any, dict[TuningKey, tuple[int, int]]] = {}


def _entries(text: str) -> list[dict[str, Any]]:
  """A cache file's entries (as stored, timings included), each checked: a
  valid `TuningKey` and two positive int block sizes; ValueError otherwise."""
  data = json.loads(text)
  if not isinstance(data, dict) or data.get("format") != _FORMAT:
    found = data.get("format") if isinstance(data, dict) else type(data).__name__
    raise ValueError(f"format {found!r}, expected {_FORMAT}")
  if not isinstance(data.get("entries"), list):
    raise ValueError("no list of entries")
  for entry in data["entries"]:
    try:
      key = TuningKey(**entry["key"])
      sizes = entry["block_sizes"]
    except (KeyError, TypeError) as e:
      raise ValueError(f"malformed entry {entry!r}") from e
    for field, value in key._asdict().items():
      want = _FIELD_TYPES[field]
      if not (_checks.is_int(value) if want is int else isinstance(value, want)):
        raise ValueError(f"key field {field!r} must be {'an int' if want is int else 'a str'}; "
                         f"got {value!r}")
    if not (isinstance(sizes, list) and len(sizes) == 2
            and all(_checks.is_int(b) and b > 0 for b in sizes)):
      raise ValueError(f"block sizes must be two positive ints; got {sizes!r}")
  return data["entries"]


def _parse(text: str) -> dict[TuningKey, tuple[int, int]]:
  """The block sizes a cache file's text records, by key (`_entries` checks it)."""
  return {TuningKey(**e["key"]): (int(e["block_sizes"][0]), int(e["block_sizes"][1]))
          for e in _entries(text)}


def _read(path: pathlib.Path) -> dict[TuningKey, tuple[int, int]]:
  try:
    st = path.stat()
  except OSError:
    return {}
  stamp = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
  if stamp not in _LOADED:
    try:
      entries = _parse(path.read_text())
    # json.JSONDecodeError and UnicodeError are ValueErrors; absurdly nested JSON
    # raises RecursionError.
    except (OSError, ValueError, RecursionError) as e:
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


@contextlib.contextmanager
def _locked(path: pathlib.Path):
  """An exclusive advisory lock on `path` + ".lock" (POSIX), held for a
  read-modify-write of the cache file."""
  path.parent.mkdir(parents=True, exist_ok=True)
  if fcntl is None:  # pragma: no cover
    yield
    return
  with open(path.with_name(path.name + ".lock"), "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def record(key: TuningKey, block_sizes: tuple[int, int],
           timings_ms: dict[tuple[int, int], float] | None = None,
           path: pathlib.Path | None | str = "default") -> pathlib.Path:
  """Stores `block_sizes` for `key` in the cache file (replacing an older entry).

  Concurrent writers (several `tune` runs) serialize on a lock file beside it
  and each replaces the file atomically, so no entry is lost and readers
  never see a partial file.
  """
  path = cache_path() if path == "default" else path
  if path is None:
    raise ValueError(f"record: no cache file: {CACHE_ENV} is set to an empty string.")
  path = pathlib.Path(path)
  bq, bk = _checks.block_sizes("record", block_sizes, optional=False)
  entry: dict[str, Any] = {"key": key._asdict(), "block_sizes": [bq, bk],
                           "jax": jax.__version__}
  if timings_ms:
    entry["timings_ms"] = {f"{a}x{b}": round(t, 4) for (a, b), t in sorted(timings_ms.items())}
  with _locked(path):
    entries = []
    if path.exists():
      try:
        entries = [e for e in _entries(path.read_text()) if TuningKey(**e["key"]) != key]
      except (OSError, ValueError, RecursionError) as e:
        warnings.warn(f"jaxattn.tuning: replacing the unreadable cache {path} ({e}).",
                      stacklevel=2)
    entries.append(entry)
    entries.sort(key=lambda e: tuple(str(v) for v in e["key"].values()))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
      # mkstemp makes the file private (0600); give it the mode a new file would
      # have (or the old file's), so a cache shared through CACHE_ENV stays readable.
      os.chmod(tmp, _file_mode(path))
      with os.fdopen(fd, "w") as f:
        f.write(json.dumps({"format": _FORMAT, "entries": entries}, indent=1))
      os.replace(tmp, path)
    except BaseException:
      with contextlib.suppress(OSError):
        os.unlink(tmp)
      raise
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
      A pair the implementation refuses for this problem (NotImplementedError,
      e.g. a compiled Pallas plan's power-of-two blocks) is skipped and
      reported in `TuneResult.skipped`; if it refuses them all, ValueError.
    include_backward: time forward + backward (the training step) rather
      than the forward alone.
    repeats: timed calls per candidate after one warm-up; the median counts.
    path: the cache file; "default" is `cache_path()`, None times without
      recording.
    **attention_kwargs: any other `dot_product_attention` argument
      (is_causal, local_window_size, segment ids ...); they decide the key.

  Returns:
    A `TuneResult` with the key, the fastest block sizes, all timings and
    the skipped pairs.

  Raises:
    ValueError, TypeError: bad arguments, named, before anything is timed.
  """
  from jaxattn import attention  # local: attention imports this module

  if implementation not in TUNABLE:
    raise ValueError(f"tune: implementation must be one of {TUNABLE}; got {implementation!r}.")
  if not (_checks.is_int(repeats) and repeats > 0):
    raise ValueError(f"tune: repeats must be a positive int; got {repeats!r}.")
  if not (path is None or isinstance(path, (str, os.PathLike))):
    raise TypeError(f"tune: path must be a str, a path, None or 'default'; got "
                    f"{type(path).__name__}.")
  allowed = set(inspect.signature(attention.dot_product_attention).parameters)
  reasons = {"block_sizes": "tune chooses it", "return_residual": "tune times the output"}
  allowed -= {"query", "key", "value", "implementation", *reasons}
  for name in attention_kwargs:
    if name not in allowed:
      why = reasons.get(name, "not a dot_product_attention argument")
      raise TypeError(f"tune: unexpected keyword argument {name!r} ({why}).")
  inputs, config, _ = attention.normalize(query, key, value, **attention_kwargs)
  T, S = inputs.query.shape[1], inputs.key.shape[1]
  pairs = default_candidates(T, S) if candidates is None else _candidates(candidates)
  if isinstance(path, str) and path == "default":
    path = cache_path()
    if path is None:
      warnings.warn(f"tune: {CACHE_ENV} is set to an empty string (the cache is off): the "
                    f"result is returned, not recorded.", stacklevel=2)

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
  skipped: dict[tuple[int, int], str] = {}
  for pair in pairs:
    fn = run(pair)
    try:  # e.g. a compiled Pallas plan that needs power-of-two blocks
      jax.block_until_ready(fn(query, key, value))
    except NotImplementedError as e:
      skipped[pair] = str(e)
      continue
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(fn(query, key, value))
      times.append(1e3 * (time.perf_counter() - start))
    timings[pair] = statistics.median(times)
  if not timings:
    raise ValueError(f"tune: {implementation!r} refused every candidate for this problem: "
                     + "; ".join(f"{p}: {why}" for p, why in skipped.items()))
  best = min(timings, key=lambda p: (timings[p], p))
  tkey = key_for(implementation, inputs, config)
  if path is not None:
    record(tkey, best, timings, path=path)
  return TuneResult(tkey, best, timings, skipped)


def _candidates(candidates) -> list[tuple[int, int]]:
  """`tune`'s candidates as sorted distinct pairs of positive ints, or a clear error."""
  what = "an iterable of (query block, key block) pairs of positive ints"
  if isinstance(candidates, (str, bytes)) or not isinstance(candidates, Iterable):
    raise TypeError(f"tune: candidates must be {what}; got {type(candidates).__name__}.")
  pairs = set()
  for pair in candidates:
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2
            and all(_checks.is_int(b) and b > 0 for b in pair)):
      raise ValueError(f"tune: candidates must be {what}; got the entry {pair!r}.")
    pairs.add((int(pair[0]), int(pair[1])))
  if not pairs:
    raise ValueError("tune: candidates is empty.")
  return sorted(pairs)
