"""The "pallas" implementation's static side: the plan of a call, the layouts
its kernels read (rows of folded query heads, 5D bias and mask tiles), the
functions held by masks and score modifiers lifted into kernel inputs, and the
BlockSpecs of the calls. Plain JAX, outside the kernels (`jaxattn._impl.pallas`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from jaxattn import _checks
from jaxattn import masks as _masks
from jaxattn._impl import common


def _triton():
  """Pallas' Triton backend module, or None when this jax has none.

  Imported lazily: jax deprecates the Triton backend, and a jax without it
  must still import jaxattn and dispatch (compiled GPU kernels then raise
  NotImplementedError, so `implementation=None` falls back).
  """
  try:
    from jax.experimental.pallas import triton as pltriton  # noqa: PLC0415
  except Exception:  # ImportError, or whatever a half-removed backend raises
    return None
  return pltriton


def _check_triton(p) -> None:
  if not p.interpret and p.platform == "gpu" and _triton() is None:
    raise NotImplementedError("pallas: this jax has no Pallas Triton backend "
                              "(jax.experimental.pallas.triton), which the compiled GPU kernels need")

# Compiled (GPU) blocks: 128 query rows (query positions x folded heads) and
# 64 keys per step, FlashAttention-2's choice for H <= 128 on A100/H100.
# Untuned: no GPU was available when this was written (see bench/gpu.sh).
DEFAULT_BLOCK_ROWS = 128
DEFAULT_BLOCK_KV = 64
# Interpret mode runs each grid step as an XLA loop iteration: larger blocks.
INTERPRET_BLOCK_Q = 128
INTERPRET_BLOCK_KV = 128
# Triton's dot needs every dimension >= 16 and tensor sizes powers of 2.
_MIN_DIM = 16


@dataclasses.dataclass(frozen=True)
class _Plan(_masks.BlockGeometry):
  """Static description of one call (hashable: a custom_vjp static argument)."""
  config: common.AttentionConfig
  K: int
  G: int
  Gp: int  # G padded (a power of 2 when compiled); rows g >= G are dummies
  H: int
  Hv: int
  Hp: int
  Hvp: int
  interpret: bool
  platform: str  # "cpu", "gpu" or "tpu"
  bias_dims: tuple | None  # (Bb, Kb, Tb, Gb, Sb) of the 5D bias layout
  mask_dims: tuple | None  # the same for the dense boolean mask

  @property
  def rows(self) -> int:
    return self.bq * self.Gp


def _pow2(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


def _platform(backend: str | None = None) -> str:
  """The kernels' target for `backend` (default: JAX's): "gpu", "tpu", or "cpu" (interpret mode)."""
  platform = common.platform(backend)
  return platform if platform in ("gpu", "tpu") else "cpu"


def default_block_sizes(T: int, S: int, G: int = 1, compiled: bool = False) -> tuple[int, int]:
  """(query block, key block) in positions; a query block holds bq x G rows."""
  if not compiled:
    return min(T, INTERPRET_BLOCK_Q), min(S, INTERPRET_BLOCK_KV)
  Gp = _pow2(G)
  bq = max(1, DEFAULT_BLOCK_ROWS // Gp)
  bq = min(bq, max(_pow2(T), -(-_MIN_DIM // Gp)))
  bk = min(DEFAULT_BLOCK_KV, max(_pow2(S), _MIN_DIM))
  return bq, bk


def _bias_dims(x, plan_sizes, Gp, Tp, Sp):
  """5D layout (Bb, Kb, Tb, Gb, Sb) of a (B|1, N|1, T|1, S|1) array."""
  if x is None:
    return None
  B, N, T, S, K = plan_sizes
  b, n, t, s = x.shape
  return (b, K if n == N else 1, Tp if t == T and T > 1 else 1, Gp if n == N else 1,
          Sp if s == S and S > 1 else 1)


def _make_plan(inputs: common.AttentionInputs, config: common.AttentionConfig,
               block_sizes, interpret, backend=None, gpu_layout=None) -> _Plan:
  B, T, N, H = inputs.query.shape
  _, S, K, Hv = inputs.value.shape
  G = N // K
  platform = _platform(backend)
  if interpret is None:
    interpret = platform == "cpu"
  if jnp.dtype(inputs.query.dtype) == jnp.float64:
    raise NotImplementedError("pallas: float64 inputs are not supported (the kernels keep "
                              "float32 statistics); use implementation='xla' or 'chunked'.")
  if not interpret and platform == "tpu":
    # Mosaic needs (8, 128)-aligned trailing block dims, block tables in SMEM
    # and K/V as (B, K, S, H); these kernels are laid out for Triton.
    raise NotImplementedError("pallas: the kernels are laid out for GPU (Triton) and do not "
                              "lower for TPU (Mosaic) yet; use implementation='chunked'.")
  compiled = not interpret if gpu_layout is None else gpu_layout
  if block_sizes is None:
    bq, bk = default_block_sizes(T, S, G, compiled)
  else:
    bq, bk = min(block_sizes[0], T), min(block_sizes[1], S)
  Gp, Hp, Hvp = G, H, Hv
  if compiled:
    Gp = _pow2(G)
    Hp, Hvp = max(_pow2(H), _MIN_DIM), max(_pow2(Hv), _MIN_DIM)
    if block_sizes is not None:
      bq, bk = block_sizes
    rows = bq * Gp
    if rows != _pow2(rows) or rows < _MIN_DIM or bk != _pow2(bk) or bk < _MIN_DIM:
      raise NotImplementedError(
          f"pallas: compiled kernels need query block x padded group ({bq} x {Gp}) and key "
          f"block ({bk}) to be powers of 2 >= {_MIN_DIM}; got block_sizes={block_sizes}.")
  nq, nk = -(-T // bq), -(-S // bk)
  sizes = (B, N, T, S, K)
  return _Plan(B=B, N=N, T=T, S=S, bq=bq, bk=bk, config=config, K=K, G=G, Gp=Gp, H=H, Hv=Hv,
               Hp=Hp, Hvp=Hvp, interpret=bool(interpret), platform=platform,
               bias_dims=_bias_dims(inputs.bias, sizes, Gp, nq * bq, nk * bk),
               mask_dims=_bias_dims(inputs.mask, sizes, Gp, nq * bq, nk * bk))


# ---------------------------------------------------------------------------
# Layouts (plain JAX, outside the kernels).


_pad = common.pad_axis


def _to_rows(x, p: _Plan, width: int):
  """(B, T, N, D) -> (B, K, Tp*Gp, width): query-shaped data as kernel rows (t, g)."""
  B, T, N = x.shape[:3]
  rest = x.shape[3:]
  x = x.reshape((B, T, p.K, p.G) + rest)
  x = _pad(_pad(x, 1, p.Tp), 3, p.Gp)
  if rest:
    x = _pad(x, 4, width)
  x = jnp.moveaxis(x, 1, 2)
  return x.reshape((B, p.K, p.Tp * p.Gp) + x.shape[4:])


def _from_rows(x, p: _Plan, width: int | None):
  """Inverse of `_to_rows`: (B, K, Tp*Gp[, D]) -> (B, T, N[, width])."""
  rest = x.shape[3:]
  x = x.reshape((p.B, p.K, p.Tp, p.Gp) + rest)[:, :, :p.T, :p.G]
  if rest:
    x = x[..., :width]
  x = jnp.moveaxis(x, 2, 1)
  return x.reshape((p.B, p.T, p.N) + x.shape[4:])


def _to_keys(x, p: _Plan, width: int):
  """(B, S, K, D) -> (B, Sp, K, width), zero padded."""
  return _pad(_pad(x, 1, p.Sp), 3, width)


def _to_5d(x, dims, p: _Plan, value=0):
  """(B|1, N|1, T|1, S|1) -> (Bb, Kb, Tb, Gb, Sb), padded with `value`."""
  if x is None:
    return None
  b, n, t, s = x.shape
  _, _, Tb, Gb, Sb = dims
  if n == p.N:
    x = x.reshape(b, p.K, p.G, t, s).transpose(0, 1, 3, 2, 4)
  else:
    x = x.reshape(b, 1, t, 1, s)
  x = _pad(_pad(_pad(x, 2, Tb, value), 3, Gb, value), 4, Sb, value)
  return x


def _from_5d(x, bias_shape, p: _Plan):
  """(b, Kb, Tb, Gb, Sb) gradients (b already reduced) -> the bias's (b, N|1, T|1, S|1) shape."""
  b, n, t, s = bias_shape
  x = x[:, :, :t, :, :s]
  if n == p.N:
    return x[:, :, :, :p.G].transpose(0, 1, 3, 2, 4).reshape(b, n, t, s)
  return x.reshape(b, n, t, s)


def _ranges(nonempty, axis):
  """First and one-past-last True index along `axis` (0, 0 where none)."""
  n = nonempty.shape[axis]
  any_ = jnp.any(nonempty, axis)
  first = jnp.argmax(nonempty, axis)
  last = n - jnp.argmax(jnp.flip(nonempty, axis), axis)
  return (jnp.where(any_, first, 0).astype(jnp.int32), jnp.where(any_, last, 0).astype(jnp.int32))


def block_map(inputs: common.AttentionInputs, p: _Plan):
  """(nq, nk) int32 block kinds: 0 empty (skipped), 1 partial (masked), 2 full.

  Padding rows make their block partial too, so they stay finite and inert.
  """
  # Block indices as array constants, not iota: XLA:CPU (jax 0.10.2) miscompiles
  # this classification when it is built from iota alone (a block of the
  # bottom-right causal map came out empty; see tests/test_pallas.py).
  qb = jnp.asarray(np.arange(p.nq, dtype=np.int32))[:, None]
  kb = jnp.asarray(np.arange(p.nk, dtype=np.int32))[None, :]
  return _masks.block_kinds(common.combined_mask(inputs, p.config), p, qb, kb,
                            dense_mask=inputs.mask is not None, pad_queries=True)


# ---------------------------------------------------------------------------
# Functions held by masks and score modifiers: their arrays become inputs.


class _Lifted(NamedTuple):
  """A mask or score modifier split into kernel inputs and a way to call it."""
  treedef: Any
  leaves: list  # the pytree's arrays
  consts: list  # arrays its functions close over
  jaxpr: Any  # set when consts is non-empty: the function traced on (leaves, *args)
  loads: bool = False  # its functions compute with every leaf (a `_checks.Hoisted`): load them


def _lift(obj, example_args) -> _Lifted | None:
  # Not jax.closure_convert: it hoists only traced values, while a kernel must
  # receive every closed-over array (concrete ones too) as an input.
  if obj is None:
    return None
  leaves, treedef = jax.tree_util.tree_flatten(obj)
  leaves = [jnp.asarray(x) for x in leaves]
  closed = jax.make_jaxpr(lambda ls, *a: jax.tree_util.tree_unflatten(treedef, ls)(*a))(leaves, *example_args)
  consts = [jnp.asarray(c) for c in closed.consts]
  # A function whose traced constants were hoisted by tracing it evaluates a
  # jaxpr of its arguments: array leaves must arrive as values, not Refs.
  return _Lifted(treedef, leaves, consts, closed.jaxpr if consts else None,
                 _checks.holds_hoisted(obj))


def _call_lifted(lifted: _Lifted, leaves, const_refs, args, leaves_are_refs: bool):
  """Calls a lifted mask or modifier inside a kernel on `args`."""
  if lifted.jaxpr is None:
    if leaves_are_refs:  # scalars as values (a Ref is indexed, not computed with); arrays stay Refs
      leaves = [x[...] if x.shape == () or lifted.loads else x for x in leaves]
    return lifted.treedef.unflatten(list(leaves))(*args)
  vals = [x[...] for x in leaves] if leaves_are_refs else list(leaves)
  flat = jax.tree_util.tree_leaves((vals, args))
  return jax.core.eval_jaxpr(lifted.jaxpr, [c[...] for c in const_refs], *flat)[0]


def _example_index_args(p: _Plan):
  i32 = jnp.int32
  h = jax.ShapeDtypeStruct((), i32) if p.Gp == 1 else jax.ShapeDtypeStruct((p.rows, 1), i32)
  return (jax.ShapeDtypeStruct((), i32), h, jax.ShapeDtypeStruct((p.rows, 1), i32),
          jax.ShapeDtypeStruct((1, p.bk), i32))


# ---------------------------------------------------------------------------
# Everything a kernel needs, as named inputs.


def _lift_functions(inputs: common.AttentionInputs, p: _Plan):
  """The combined mask and score modifier, lifted; raises what compiled kernels refuse."""
  idx = _example_index_args(p)
  mask = _lift(common.combined_mask(inputs, p.config), idx)
  score = _lift(common.combined_score(inputs, p.config),
                (jax.ShapeDtypeStruct((p.rows, p.bk), jnp.float32),) + idx)
  if not p.interpret:
    if (mask is not None and mask.consts) or (score is not None and score.consts):
      raise NotImplementedError(
          "pallas: a mask_fn or score_fn that closes over arrays needs in-kernel gathers, "
          "which the compiled kernels do not lower; hold the arrays in a jaxattn.masks.Mask "
          "/ jaxattn.scores.ScoreMod pytree, or use implementation='chunked'.")
    if score is not None and score.leaves:
      raise NotImplementedError(
          "pallas: score modifiers holding arrays (ALiBi slopes, position tables) index them "
          "with gathers the compiled kernels do not lower; use implementation='chunked'.")
  return mask, score


class _Prepared(NamedTuple):
  arrays: dict  # name -> array (kernel inputs that are the same in every kernel)
  mask: _Lifted | None
  score: _Lifted | None


def _prepare(inputs: common.AttentionInputs, p: _Plan) -> _Prepared:
  arrays = {}
  kinds = block_map(inputs, p)
  arrays["kinds"] = kinds
  arrays["row_lo"], arrays["row_hi"] = _ranges(kinds > 0, 1)
  arrays["col_lo"], arrays["col_hi"] = _ranges(kinds > 0, 0)
  arrays["k"] = _to_keys(inputs.key, p, p.Hp)
  arrays["v"] = _to_keys(inputs.value, p, p.Hvp)
  if inputs.bias is not None:
    arrays["bias"] = _to_5d(inputs.bias, p.bias_dims, p)
  if inputs.mask is not None:
    arrays["dmask"] = _to_5d(inputs.mask.astype(jnp.int8), p.mask_dims, p)
  if inputs.dropout_key is not None and p.config.dropout_rate > 0.0:
    arrays["dropout_key"] = inputs.dropout_key
  mask, score = _lift_functions(inputs, p)
  for n, x in enumerate(mask.leaves if mask else ()):
    arrays[f"mask_leaf{n}"] = x
  for n, x in enumerate(mask.consts if mask else ()):
    arrays[f"mask_const{n}"] = x
  for n, x in enumerate(score.leaves if score else ()):
    arrays[f"score_leaf{n}"] = x
  for n, x in enumerate(score.consts if score else ()):
    arrays[f"score_const{n}"] = x
  return _Prepared(arrays, mask, score)


def _full_spec(x):
  zeros = (0,) * x.ndim
  return pl.BlockSpec(x.shape, lambda *_: zeros)


def _bias_spec(dims, p: _Plan, over: str):
  """BlockSpec of the 5D bias/mask for a grid over query blocks ("q") or key blocks ("k")."""
  Bb, Kb, Tb, Gb, Sb = dims
  if over == "q":
    shape = (None, None, p.bq if Tb > 1 else 1, Gb, Sb)
    return pl.BlockSpec(shape, lambda b, h, i: (b if Bb > 1 else 0, h if Kb > 1 else 0,
                                                 i if Tb > 1 else 0, 0, 0))
  shape = (None, None, Tb, Gb, p.bk if Sb > 1 else 1)
  return pl.BlockSpec(shape, lambda b, h, j: (b if Bb > 1 else 0, h if Kb > 1 else 0, 0, 0,
                                               j if Sb > 1 else 0))


def _common_specs(prep: _Prepared, p: _Plan, over: str) -> dict:
  """BlockSpecs of the shared inputs: a program over a query block ("q") sees all of K/V
  (it walks the key blocks), one over a key block ("k") sees that block."""
  specs = {}
  for name, x in prep.arrays.items():
    if name in ("k", "v"):
      width = p.Hp if name == "k" else p.Hvp
      if over == "q":
        specs[name] = pl.BlockSpec((None, p.Sp, None, width), lambda b, h, i: (b, 0, h, 0))
      else:
        specs[name] = pl.BlockSpec((None, p.bk, None, width), lambda b, h, j: (b, j, h, 0))
    elif name == "bias":
      specs[name] = _bias_spec(p.bias_dims, p, over)
    elif name == "dmask":
      specs[name] = _bias_spec(p.mask_dims, p, over)
    else:
      specs[name] = _full_spec(x)
  return specs


def _compiler_params(p: _Plan):
  if p.interpret or p.platform != "gpu":
    return None
  pltriton = _triton()
  if pltriton is None:
    raise NotImplementedError("pallas: this jax has no Pallas Triton backend")
  return pltriton.CompilerParams(num_warps=4 if max(p.Hp, p.Hvp) <= 64 else 8, num_stages=2)


def _call(kernel, p: _Plan, name: str, grid, inputs: dict, in_specs: dict, outputs: dict):
  """pallas_call with named inputs and outputs; `outputs` maps name -> (ShapeDtypeStruct, spec)."""
  in_names = list(inputs)
  out_names = list(outputs)

  def body(*refs):
    named = dict(zip(in_names + out_names, refs))
    kernel(named)

  # Inside shard_map (check_vma), every input is cast to vary over the mesh
  # axes any of them varies over, and so do the outputs (pallas_call needs
  # that stated on its output types; the queries' axes alone would claim an
  # output the same on devices where a bias or the keys differ).
  inputs = common.vary_alike(inputs)
  varying = jax.ShapeDtypeStruct.like(inputs[in_names[0]]).manual_axis_type
  if varying is None and jax.sharding.get_abstract_mesh().manual_axes:
    varying = jax.sharding.ManualAxisType(varying=frozenset())  # inside a shard_map, replicated
  results = pl.pallas_call(
      body, grid=grid,
      in_specs=[in_specs[n] for n in in_names],
      out_specs=[outputs[n][1] for n in out_names],
      out_shape=[outputs[n][0].update(manual_axis_type=varying) for n in out_names],
      interpret=p.interpret, compiler_params=_compiler_params(p),
      name=f"jaxattn_{name}")(*[inputs[n] for n in in_names])
  return dict(zip(out_names, results))
