"""Named benchmark cases and presets, their inputs and their masks.

A case is one attention problem (shapes B, T, S, N, K, H, a dtype, a mask kind)
in one mode: "fwd" (the output), "fwdbwd" (the output and the gradients of
query, key and value for a fixed random cotangent) or "jvp" (the output and
its forward-mode derivative along fixed random tangents of query, key and
value, `jax.jvp`).

Mask kinds, each a single concept so that peers can express it natively:
  none       every query sees every key.
  causal     query i sees keys j <= i (top-left aligned).
  window     causal sliding window: query i sees keys i - window <= j <= i.
  lengths    padded batch: example b sees keys j < key_value_seq_lengths[b].
  documents  packed documents (T == S): query i sees key j iff both lie in the
             same document; `documents` documents of equal length.
  causal_documents
             packed documents, causal within each (a packed training batch).
A case may also set `soft_cap` (logits_soft_cap, Gemma 2 style), e.g. 30.

causal_documents and soft_cap (the GPU cases of the long preset) are known to
jaxattn.* and to the GPU peers (`peers.gpu_peers`); bench/gpu.sh selects those.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

MASKS = ("none", "causal", "window", "lengths", "documents", "causal_documents")
MODES = ("fwd", "fwdbwd", "jvp")
# Errors against the float64 reference are computed up to this length.
REFERENCE_MAX_T = 1024


@dataclasses.dataclass(frozen=True)
class Case:
  """One benchmark problem: shapes, dtype, mask kind and mode."""
  mode: str
  mask: str
  T: int
  S: int | None = None  # defaults to T
  B: int = 1
  N: int = 8
  K: int = 8
  H: int = 64
  dtype: str = "float32"
  window: int = 256
  documents: int = 4
  compile_only: bool = False  # too large to run: compile and report memory only
  soft_cap: float | None = None  # logits_soft_cap

  def __post_init__(self):
    if self.S is None:
      object.__setattr__(self, "S", self.T)
    if self.mode not in MODES:
      raise ValueError(f"Case: mode must be one of {MODES}; got {self.mode!r}.")
    if self.mask not in MASKS:
      raise ValueError(f"Case: mask must be one of {MASKS}; got {self.mask!r}.")
    if self.mask in ("documents", "causal_documents") and self.S != self.T:
      raise ValueError(f"Case: documents need T == S; got T={self.T}, S={self.S}.")
    if self.N % self.K:
      raise ValueError(f"Case: K={self.K} must divide N={self.N}.")

  @property
  def name(self) -> str:
    """E.g. `fwd-causal-T4096`, with `-S..`, `-B..`, ... where not default."""
    parts = [self.mode, self.mask, f"T{self.T}"]
    if self.S != self.T:
      parts.append(f"S{self.S}")
    for field, default in (("B", 1), ("N", 8), ("K", 8), ("H", 64)):
      if getattr(self, field) != default:
        parts.append(f"{field}{getattr(self, field)}")
    if self.dtype != "float32":
      parts.append({"bfloat16": "bf16", "float16": "f16"}.get(self.dtype, self.dtype))
    if self.mask == "causal_documents":
      parts.append(f"docs{self.documents}")
    if self.soft_cap is not None:
      parts.append(f"cap{self.soft_cap:g}")
    return "-".join(parts)

  @property
  def family(self) -> str:
    """The name without the lengths: cases that differ only in T share a plot."""
    return "-".join(p for p in self.name.split("-") if p[0] not in "TS" or not p[1:].isdigit())

  @property
  def flops(self) -> float:
    """Dense-equivalent flops: 4*B*N*T*S*H forward (two matmuls), 3.5x that for
    fwd+bwd, 3x for the jvp (the forward's two matmuls, dS from two more, then
    P dS V and P dV: six)."""
    fwd = 4.0 * self.B * self.N * self.T * self.S * self.H
    return fwd * {"fwd": 1.0, "fwdbwd": 3.5, "jvp": 3.0}[self.mode]

  @property
  def small(self) -> bool:
    return self.T <= REFERENCE_MAX_T and self.S <= REFERENCE_MAX_T and not self.compile_only


class Inputs(NamedTuple):
  """Arrays of one case: query (B, T, N, H), key and value (B, S, K, H),
  the mask metadata `aux` and the cotangent `d_out` (query's shape)."""
  query: jax.Array
  key: jax.Array
  value: jax.Array
  aux: dict
  d_out: jax.Array


def make_inputs(case: Case, seed: int = 0) -> Inputs:
  """Random normal inputs (never zeros) and the case's mask metadata."""
  kq, kk, kv, kd = jax.random.split(jax.random.key(seed), 4)
  dtype = jnp.dtype(case.dtype)
  draw = lambda k, shape: jax.random.normal(k, shape, jnp.float32).astype(dtype)
  aux = {}
  if case.mask == "lengths":
    # 3/4 and 1/2 of S, alternating over the batch.
    b = np.arange(case.B)
    aux["key_value_seq_lengths"] = jnp.asarray(case.S * (3 - b % 2) // 4, jnp.int32)
  elif case.mask in ("documents", "causal_documents"):
    ids = np.arange(case.T) * case.documents // case.T
    aux["segment_ids"] = jnp.asarray(np.broadcast_to(ids, (case.B, case.T)), jnp.int32)
  return Inputs(draw(kq, (case.B, case.T, case.N, case.H)),
                draw(kk, (case.B, case.S, case.K, case.H)),
                draw(kv, (case.B, case.S, case.K, case.H)),
                aux, draw(kd, (case.B, case.T, case.N, case.H)))


def jaxattn_kwargs(case: Case, aux: dict) -> dict:
  """The case's mask as keyword arguments of `jaxattn.dot_product_attention`
  (and of `jaxattn.testing.reference_attention`)."""
  if case.soft_cap is not None:
    return dict(jaxattn_kwargs(dataclasses.replace(case, soft_cap=None), aux),
                logits_soft_cap=case.soft_cap)
  if case.mask == "causal":
    return dict(is_causal=True)
  if case.mask == "window":
    return dict(local_window_size=(case.window, 0))
  if case.mask == "lengths":
    return dict(key_value_seq_lengths=aux["key_value_seq_lengths"])
  if case.mask == "documents":
    return dict(query_segment_ids=aux["segment_ids"])
  if case.mask == "causal_documents":
    return dict(is_causal=True, query_segment_ids=aux["segment_ids"])
  return {}


def dense_mask(case: Case, aux: dict, xp):
  """The mask as a dense boolean (B or 1, 1, T, S), True = attend; None for none.

  `xp` is numpy, jax.numpy or torch (same indexing and broadcasting); `aux`
  must hold `xp` arrays. This is what a user of an API without the native
  argument would write.
  """
  if case.mask == "none":
    return None
  i = xp.arange(case.T)[:, None]
  j = xp.arange(case.S)[None, :]
  if case.mask == "causal":
    return (j <= i)[None, None]
  if case.mask == "window":
    return ((j <= i) & (j >= i - case.window))[None, None]
  if case.mask == "lengths":
    return (j < aux["key_value_seq_lengths"][:, None])[:, None, None, :]
  seg = aux["segment_ids"]
  same = seg[:, :, None] == seg[:, None, :]
  if case.mask == "causal_documents":
    same = same & (j <= i)[None]
  return same[:, None]


def attended_fraction(case: Case, aux: dict) -> float:
  """Fraction of the T x S logits the mask keeps, in O(T) (for effective flops)."""
  T, S = case.T, case.S
  i = np.arange(T)
  if case.mask == "causal":
    kept = np.minimum(i + 1, S)
  elif case.mask == "window":
    kept = np.maximum(0, np.minimum(i, S - 1) - np.maximum(0, i - case.window) + 1)
  elif case.mask == "lengths":
    return float(np.mean(np.asarray(aux["key_value_seq_lengths"]))) / S
  elif case.mask == "documents":
    counts = [np.unique(row, return_counts=True)[1] for row in np.asarray(aux["segment_ids"])]
    return float(np.mean([np.sum(c.astype(np.float64) ** 2) for c in counts])) / (T * S)
  elif case.mask == "causal_documents":
    counts = [np.unique(row, return_counts=True)[1].astype(np.float64)
              for row in np.asarray(aux["segment_ids"])]
    return float(np.mean([np.sum(c * (c + 1) / 2) for c in counts])) / (T * S)
  else:
    return 1.0
  return float(np.sum(kept)) / (T * S)


# ---------------------------------------------------------------------------
# presets


def _quick() -> list[Case]:
  small = dict(B=2, N=4, K=2, H=32)  # GQA, several batch rows, fast
  return [
      Case("fwd", "none", 512, **small),
      Case("fwd", "causal", 128, **small),
      Case("fwd", "causal", 512, **small),
      Case("fwd", "window", 512, window=64, **small),
      Case("fwd", "lengths", 512, **small),
      Case("fwd", "documents", 512, **small),
      Case("fwdbwd", "causal", 128, **small),
      Case("fwdbwd", "causal", 512, **small),
      Case("jvp", "causal", 128, **small),
  ]


def _default() -> list[Case]:
  return [
      *(Case("fwd", "none", t) for t in (1024, 4096)),
      *(Case("fwd", "causal", t) for t in (1024, 2048, 4096, 8192)),
      *(Case("fwdbwd", "causal", t) for t in (1024, 2048, 4096)),
      *(Case("jvp", "causal", t) for t in (1024, 4096)),
      Case("fwd", "window", 4096),
      Case("fwd", "documents", 4096),
      Case("fwd", "lengths", 2048),
      Case("fwd", "causal", 2048, K=2),  # GQA
  ]


def _long() -> list[Case]:
  # Lengths until materializing peers run out of memory; the largest are
  # compiled only, to report their memory.
  return [
      *_default(),
      *(Case("fwd", "causal", t) for t in (16384, 32768)),
      *(Case("fwd", "causal", t, compile_only=True) for t in (65536, 131072)),
      *(Case("fwdbwd", "causal", t) for t in (8192, 16384)),
      Case("fwdbwd", "causal", 32768, compile_only=True),
      # issue 9's GPU target (bench/gpu.sh): bf16, B=2, T=8192, N=16, H=128, causal
      *(Case(mode, "causal", 8192, B=2, N=16, K=16, H=128, dtype="bfloat16") for mode in ("fwd", "fwdbwd")),
      *gpu_cases(**_gpu_sizes()),
  ]


def _gpu_sizes() -> dict:
  """JAXATTN_BENCH_GPU_SIZES="T=128,N=2,K=2,H=64" shrinks the GPU cases (bench/gpu.sh --dry-run)."""
  spec = os.environ.get("JAXATTN_BENCH_GPU_SIZES", "")
  return {k.strip(): int(v) for k, v in (p.split("=") for p in spec.split(",") if p.strip())}


GPU_TARGET = dict(B=2, N=16, K=16, H=128, dtype="bfloat16")


def gpu_cases(T: int = 8192, **overrides) -> list[Case]:
  """Issue 12's GPU cases (bench/gpu.sh): the target shape bf16 B=2 T=S=8192
  N=K=16 H=128 dense forward (causal fwd and fwd+bwd are above), 8 packed
  causal documents and soft-capped (30) causal, forward and fwd+bwd.
  `T` and `overrides` shrink them for a dry run on CPU."""
  shape = dict(GPU_TARGET, **overrides)
  return [
      Case("fwd", "none", T, **shape),
      *(Case(mode, "causal_documents", T, documents=8, **shape) for mode in ("fwd", "fwdbwd")),
      *(Case(mode, "causal", T, soft_cap=30.0, **shape) for mode in ("fwd", "fwdbwd")),
  ]


PRESETS = {"quick": _quick, "default": _default, "long": _long}


def matches(name: str, patterns: str | None) -> bool:
  """True if `name` matches one of the comma-separated patterns (a glob, or
  a substring), or if there are none."""
  if not patterns:
    return True
  return any(fnmatch.fnmatchcase(name, p) or p in name
             for p in (p.strip() for p in patterns.split(",")) if p)


def select(preset: str, patterns: str | None = None) -> list[Case]:
  """The preset's cases whose names match `patterns`."""
  return [c for c in PRESETS[preset]() if matches(c.name, patterns)]
