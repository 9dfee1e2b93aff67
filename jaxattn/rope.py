r"""Rotary position embeddings (RoPE).

RoPE (Su et al., 2021, "RoFormer", arXiv:2104.09864) rotates pairs of
query/key features by an angle proportional to the token's position, so the
logit of query i and key j depends on their positions only through i - j:

.. math:: \langle R(p_i) q, R(p_j) k \rangle = \langle q, R(p_j - p_i) k \rangle

Pairing. By default the head is split in halves and feature ``d`` is paired
with feature ``d + R/2`` (the "half-split" or "rotate_half" layout of
GPT-NeoX, Hugging Face Llama/Mistral/Qwen and most checkpoints on the hub).
Read as complex numbers, ``z_d = x_d + i x_{d + R/2}`` becomes
``z_d * exp(i p theta_d)``. ``interleaved=True`` pairs ``(x_{2d}, x_{2d+1})``
instead, as the original RoFormer, GPT-J and Meta's own Llama code do; the two
layouts differ only by a fixed permutation of the query/key projection
columns.

Frequencies are ``theta_d = base^(-2d / R)`` for ``d < R/2``, where ``R`` is
the rotary dimension (the head dim H unless only part of the head rotates,
as in GPT-NeoX's ``rotary_pct``); features past ``R`` pass through unchanged.
Two context-extension scalings are built in: "linear" position interpolation
(Chen et al., 2023, arXiv:2306.15595) divides every frequency by the factor,
and "ntk" ("NTK-aware" scaling, bloc97 2023; Hugging Face's "dynamic" rule at
a fixed length) raises the base to ``base * factor^(R / (R - 2))``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Scaling = Literal["linear", "ntk"] | None


def _check_rotary_dim(fn: str, rotary_dim) -> int:
  if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, (int, np.integer)):
    raise TypeError(f"{fn}: rotary_dim must be an int; got {type(rotary_dim).__name__}.")
  if rotary_dim <= 0 or rotary_dim % 2:
    raise ValueError(f"{fn}: rotary_dim must be a positive even number (features "
                     f"rotate in pairs); got {rotary_dim}.")
  return int(rotary_dim)


def rope_frequencies(rotary_dim: int, *, base: float = 10000.0,
                     scaling: Scaling = None,
                     scaling_factor: float = 1.0, dtype=jnp.float32) -> jax.Array:
  r"""Computes the RoPE angular frequencies of one head.

  .. math:: \theta_d = b^{-2d/R},\quad d = 0, \dots, R/2 - 1

  Args:
    rotary_dim: R, the number of rotated features (even); usually the head
      dim H.
    base: b, 10000 in RoFormer and Llama 2, 500000 in Llama 3.
    scaling: None, "linear" (position interpolation: theta / factor) or
      "ntk" (NTK-aware: b -> b * factor^(R / (R - 2))).
    scaling_factor: the context-extension factor (> 0), e.g. 4.0 to run a
      model trained on 2k tokens on 8k.
    dtype: the result's dtype: float32, or float64 for float64 models.

  Returns:
    (R/2,) frequencies in radians per position, computed in float64 and
    rounded to `dtype`.

  Raises:
    ValueError: rotary_dim odd or not positive, base or factor not positive,
      unknown scaling.

  >>> import jaxattn.rope as rope
  >>> rope.rope_frequencies(4, base=100.0)
  Array([1. , 0.1], dtype=float32)
  """
  fn = "rope_frequencies"
  R = _check_rotary_dim(fn, rotary_dim)
  base, scaling_factor = float(base), float(scaling_factor)
  if not base > 0:
    raise ValueError(f"{fn}: base must be positive; got {base}.")
  if not scaling_factor > 0:
    raise ValueError(f"{fn}: scaling_factor must be positive; got {scaling_factor}.")
  if scaling not in (None, "linear", "ntk"):
    raise ValueError(f"{fn}: scaling must be None, 'linear' or 'ntk'; got {scaling!r}.")
  if scaling == "ntk" and R > 2:
    base = base * scaling_factor ** (R / (R - 2))
  freqs = base ** (-np.arange(0, R, 2, dtype=np.float64) / R)
  if scaling == "linear":
    freqs = freqs / scaling_factor
  return jnp.asarray(freqs, dtype)


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  """Static RoPE settings for `multi_head_attention(rope=...)`.

  Hashable, so it can be a jit static argument; it never enters a parameter
  pytree.

  Attributes:
    base: frequency base b (see `rope_frequencies`).
    scaling: None, "linear" or "ntk".
    scaling_factor: context-extension factor for `scaling`.
    rotary_dim: number of rotated features per head; None rotates all H.
    interleaved: pair (x_{2d}, x_{2d+1}) instead of (x_d, x_{d+R/2}).
  """
  base: float = 10000.0
  scaling: Scaling = None
  scaling_factor: float = 1.0
  rotary_dim: int | None = None
  interleaved: bool = False

  def frequencies(self, head_dim: int, dtype=jnp.float32) -> jax.Array:
    """(R/2,) frequencies for a head of width `head_dim` (H), in `dtype`."""
    R = head_dim if self.rotary_dim is None else self.rotary_dim
    if self.rotary_dim is None and head_dim % 2:
      raise ValueError(f"RopeConfig: the head dim H = {head_dim} is odd and RoPE rotates "
                       f"feature pairs: set rotary_dim to an even number <= H (e.g. "
                       f"{head_dim - 1}) to rotate part of the head.")
    if R > head_dim:
      raise ValueError(f"RopeConfig: rotary_dim must be at most the head dim "
                       f"H = {head_dim}; got {R}.")
    return rope_frequencies(R, base=self.base, scaling=self.scaling,
                            scaling_factor=self.scaling_factor, dtype=dtype)

  def apply(self, x, positions) -> jax.Array:
    """Rotates x (..., T, N, H) at `positions`; see `apply_rope`."""
    dtype = jnp.promote_types(jnp.result_type(x), jnp.float32)  # float64 x: float64 angles
    return apply_rope(x, positions, self.frequencies(x.shape[-1], dtype),
                      interleaved=self.interleaved)


def apply_rope(x, positions, frequencies=None, *, interleaved: bool = False) -> jax.Array:
  r"""Rotates query or key features by their positions.

  Half-split pairing (default), for d < R/2 and angle a = p * theta_d:

  .. math::
     y_d = x_d \cos a - x_{d+R/2} \sin a,\qquad
     y_{d+R/2} = x_{d+R/2} \cos a + x_d \sin a

  i.e. ``(x_d + i x_{d+R/2}) * exp(i a)``; features from R on are unchanged.

  Args:
    x: (..., T, N, H) queries or keys, e.g. (T, N, H) for one example or
      (B, T, N, H); any floating dtype.
    positions: (T,) or any shape that broadcasts to x.shape[:-2], integer or
      float positions (floats allow fractional positions).
    frequencies: (R/2,) from `rope_frequencies`, R <= H; default
      `rope_frequencies(H)` (in float64 for float64 x).
    interleaved: pair (x_{2d}, x_{2d+1}) (RoFormer, GPT-J) instead.

  Returns:
    x rotated, same shape and dtype; the angles and products are computed in
    float32 (float64 for float64 x).

  Raises:
    ValueError: H odd, R > H, positions not broadcastable to x.shape[:-2].
    TypeError: x not floating point.

  >>> import jax.numpy as jnp, jaxattn.rope as rope
  >>> x = jnp.array([[[1.0, 0.0]]])          # (T=1, N=1, H=2)
  >>> rope.apply_rope(x, jnp.array([1]), jnp.array([jnp.pi / 2])).round(6) + 0.0
  Array([[[0., 1.]]], dtype=float32)
  """
  fn = "apply_rope"
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{fn}: x must have a floating point dtype; got {x.dtype}.")
  if x.ndim < 3:
    raise ValueError(f"{fn}: x must have shape (..., T, N, H); got {tuple(x.shape)}.")
  H = x.shape[-1]
  if frequencies is None:
    if H % 2:
      raise ValueError(f"{fn}: x's head dim H = {H} is odd and RoPE rotates feature pairs: "
                       f"pass frequencies for an even R < H (e.g. rope_frequencies({H - 1})) "
                       f"to rotate part of the head; got x {tuple(x.shape)}.")
    frequencies = rope_frequencies(_check_rotary_dim(fn, H),
                                   dtype=jnp.promote_types(x.dtype, jnp.float32))
  frequencies = jnp.asarray(frequencies)
  if frequencies.ndim != 1 or 2 * frequencies.shape[0] > H or frequencies.shape[0] == 0:
    raise ValueError(f"{fn}: frequencies must have shape (R/2,) with 0 < R <= H = {H}; "
                     f"got {tuple(frequencies.shape)}.")
  R = 2 * frequencies.shape[0]
  positions = jnp.asarray(positions)
  lead = x.shape[:-2]
  try:
    ok = jnp.broadcast_shapes(positions.shape, lead) == lead
  except ValueError:
    ok = False
  if not ok:
    raise ValueError(f"{fn}: positions must broadcast to x.shape[:-2] = {tuple(lead)} "
                     f"(one position per token); got {tuple(positions.shape)}.")
  compute = jnp.promote_types(x.dtype, jnp.float32)
  positions = jnp.broadcast_to(positions.astype(compute), lead)
  freqs = frequencies.astype(compute).reshape((1,) * len(lead) + (R // 2,))
  angles = positions[..., None] * freqs                          # (..., T, R/2)
  cos = jnp.cos(angles)[..., None, :]                            # (..., T, 1, R/2)
  sin = jnp.sin(angles)[..., None, :]
  xr, rest = x[..., :R].astype(compute), x[..., R:]
  if interleaved:
    x1, x2 = xr[..., 0::2], xr[..., 1::2]
  else:
    x1, x2 = xr[..., : R // 2], xr[..., R // 2:]
  y1 = x1 * cos - x2 * sin
  y2 = x2 * cos + x1 * sin
  if interleaved:
    y = jnp.stack([y1, y2], axis=-1).reshape(xr.shape)
  else:
    y = jnp.concatenate([y1, y2], axis=-1)
  return jnp.concatenate([y.astype(x.dtype), rest], axis=-1)
