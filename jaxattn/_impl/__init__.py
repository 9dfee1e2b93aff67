"""Implementation registry.

An implementation is a function `(inputs: AttentionInputs, config:
AttentionConfig, **options) -> (output, lse)` with output (B, T, N, H) in the
query dtype and lse (B, T, N) float32. It raises NotImplementedError for valid
input it cannot serve, so automatic dispatch can fall back. An implementation
may register `unsupported_reason(inputs, config, backend, compute_capability)
-> str | None`, a static check that dispatch asks before choosing it.
"""

from __future__ import annotations

from typing import Callable

_REGISTRY: dict[str, Callable] = {}
_REASONS: dict[str, Callable] = {}


def register(name: str, fn: Callable, unsupported_reason: Callable | None = None) -> None:
  """Registers (or replaces) the implementation called `name`."""
  _REGISTRY[name] = fn
  if unsupported_reason is None:
    _REASONS.pop(name, None)
  else:
    _REASONS[name] = unsupported_reason


def unsupported_reason(name: str, inputs, config, backend: str,
                       compute_capability: str | None = None) -> str | None:
  """Why implementation `name` can't serve these arguments on `backend` (a GPU of
  `compute_capability`, "major.minor", where given), or None."""
  check = _REASONS.get(name)
  return None if check is None else check(inputs, config, backend, compute_capability)


def get(name: str) -> Callable:
  return _REGISTRY[name]


def names() -> tuple[str, ...]:
  return tuple(sorted(_REGISTRY))


def _register_builtins():
  from jaxattn._impl import chunked, chunked_jvp, cudnn, mosaic, pallas, splash, xla
  register("xla", xla.xla_attention)
  register("chunked", chunked.chunked_attention)
  register("chunked_jvp", chunked_jvp.chunked_jvp_attention)
  register("pallas", pallas.pallas_attention,
           lambda i, c, backend, cc: pallas.unsupported_reason(i, c, backend=backend))
  register("cudnn", cudnn.cudnn_attention,
           lambda i, c, backend, cc: cudnn.unsupported_reason(i, c, backend=backend, compute_capability=cc))
  register("splash", splash.splash_attention,
           lambda i, c, backend, cc: splash.unsupported_reason(i, c, backend=backend))
  register("mosaic", mosaic.mosaic_attention,
           lambda i, c, backend, cc: mosaic.unsupported_reason(i, c, backend=backend))


_register_builtins()
