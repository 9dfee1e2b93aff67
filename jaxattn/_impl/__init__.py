"""Implementation registry.

An implementation is a function `(inputs: AttentionInputs, config:
AttentionConfig, **options) -> (output, lse)` with output (B, T, N, H) in the
query dtype and lse (B, T, N) float32. It raises NotImplementedError for valid
input it cannot serve, so automatic dispatch can fall back.
"""

from __future__ import annotations

from typing import Callable

_REGISTRY: dict[str, Callable] = {}


def register(name: str, fn: Callable) -> None:
  """Registers (or replaces) the implementation called `name`."""
  _REGISTRY[name] = fn


def get(name: str) -> Callable:
  return _REGISTRY[name]


def names() -> tuple[str, ...]:
  return tuple(sorted(_REGISTRY))


def _register_builtins():
  from jaxattn._impl import chunked, pallas, xla
  register("xla", xla.xla_attention)
  register("chunked", chunked.chunked_attention)
  register("pallas", pallas.pallas_attention)


_register_builtins()
