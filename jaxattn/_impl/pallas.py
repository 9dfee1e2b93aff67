"""FlashAttention-2 as Pallas kernels: one source for GPU, TPU and CPU (interpret).

Dao 2023 (arXiv 2307.08691), with the block logic of `jaxattn._impl.chunked`.
Three `pl.pallas_call` kernels under one `jax.custom_vjp`:

  forward  grid (B, K, query blocks): a query block of the G query heads that
           share a key/value head, folded into rows ordered (t, g), walks the
           key blocks the masks leave non-empty with an online softmax
           (float32 running max and sum); writes the output and the
           logsumexp.
  dK, dV   grid (B, K, key blocks): walks the query blocks that see the key
           block, recomputing the probabilities from the logsumexp.
  dQ       grid (B, K, query blocks): walks the key blocks again.

The block map (query block x key block: 0 empty, 1 partial, 2 full) is
computed once per call outside the kernels from `jaxattn.masks`
classification, O(nq x nk) int32, together with the first and one-past-last
non-empty block of every row and column: loops run over that range only,
empty blocks inside it are skipped with a branch, and full blocks skip the
mask arithmetic. Masks are evaluated inside the kernels on index arrays
through `common.combined_mask` (causal, window, lengths, segment ids, the
caller's mask_fn), score modifiers through `common.combined_score`; the
arrays they hold are kernel inputs (a kernel cannot capture arrays), and
arrays a user function closes over are hoisted into inputs too. K and V are
never copied per query head: the key/value head of a program is its grid
index.

Where it runs:
  CPU  `interpret=True` (automatic): the same kernels, run by Pallas' HLO
       interpreter. Slow; for tests and for checking the kernels.
  GPU  lowered through Triton (`jax.experimental.pallas.triton`; chosen
       explicitly, jax 0.10 otherwise picks Mosaic GPU). Block rows, key
       blocks and head dims are padded to powers of two >= 16, as Triton's
       dot needs (padding is masked or zero, never visible); G is padded to a
       power of two with dummy rows. The lowering to Triton IR is tested on
       CPU (tests/test_pallas.py); compiling and running it needs a GPU
       (bench/gpu.sh).
  TPU  not yet: NotImplementedError (Mosaic wants other block layouts).

Also NotImplementedError on GPU (so `implementation=None` falls back):
score_fn/mask_fn functions that close over arrays, and score modifiers
holding arrays (ALiBi slopes, position tables): they index those arrays with
gathers Triton does not lower. In interpret mode everything runs, dropout
included (the same hash mask as every implementation).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from jaxattn import masks as _masks
from jaxattn._impl import common, softmax_state


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


def _lift(obj, example_args) -> _Lifted | None:
  # Not jax.closure_convert: it hoists only traced values, while a kernel must
  # receive every closed-over array (concrete ones too) as an input.
  if obj is None:
    return None
  leaves, treedef = jax.tree_util.tree_flatten(obj)
  leaves = [jnp.asarray(x) for x in leaves]
  closed = jax.make_jaxpr(lambda ls, *a: treedef.unflatten(ls)(*a))(leaves, *example_args)
  consts = [jnp.asarray(c) for c in closed.consts]
  return _Lifted(treedef, leaves, consts, closed.jaxpr if consts else None)


def _call_lifted(lifted: _Lifted, leaves, const_refs, args, leaves_are_refs: bool):
  """Calls a lifted mask or modifier inside a kernel on `args`."""
  if lifted.jaxpr is None:
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

  results = pl.pallas_call(
      body, grid=grid,
      in_specs=[in_specs[n] for n in in_names],
      out_specs=[outputs[n][1] for n in out_names],
      out_shape=[outputs[n][0] for n in out_names],
      interpret=p.interpret, compiler_params=_compiler_params(p),
      name=f"jaxattn_{name}")(*[inputs[n] for n in in_names])
  return dict(zip(out_names, results))


# ---------------------------------------------------------------------------
# Tiles, inside the kernels.


def _dot_nt(a, b):
  """a (m, d) . b (n, d)^T -> (m, n) float32."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_nn(a, b):
  """a (m, d) . b (d, n) -> (m, n) float32."""
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a, b):
  """a (d, m)^T . b (d, n) -> (m, n) float32."""
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _tile_index(p: _Plan, b, kh, i, j):
  """(b, h, q_idx, kv_idx) of tile (i, j): scalar, (rows, 1) or scalar, (rows, 1), (1, bk)."""
  r = jnp.arange(p.rows, dtype=jnp.int32)[:, None]
  if p.Gp == 1:
    h = kh
    t = r
  else:
    # dummy rows (g >= G) borrow the group's last head so index math stays in range
    h = kh * p.G + jnp.minimum(r % p.Gp, p.G - 1)
    t = r // p.Gp
  q_idx = i * p.bq + t
  kv_idx = j * p.bk + jnp.arange(p.bk, dtype=jnp.int32)[None, :]
  return b, h, q_idx, kv_idx


def _rows_tile(ref, dims, p: _Plan, i, j, over: str):
  """The (rows, bk) tile (i, j) of a 5D bias/mask block."""
  _, _, Tb, Gb, Sb = dims
  if over == "q":  # block (tb, Gb, Sp|1): slice keys
    x = ref[:, :, pl.ds(j * p.bk, p.bk)] if Sb > 1 else ref[...]
  else:  # block (Tp|1, Gb, bk|1): slice queries
    x = ref[pl.ds(i * p.bq, p.bq), :, :] if Tb > 1 else ref[...]
  x = jnp.broadcast_to(x, (p.bq, p.Gp, p.bk))
  return x.reshape(p.rows, p.bk)


class _Ctx(NamedTuple):
  """What the tile functions of one kernel invocation share."""
  p: _Plan
  refs: dict
  prep: _Prepared
  over: str  # "q" (grid over query blocks) or "k" (over key blocks)
  b: Any
  kh: Any


def _leaf_refs(ctx: _Ctx, kind: str, n: int):
  return [ctx.refs[f"{kind}_leaf{m}"] for m in range(n)]


def _const_refs(ctx: _Ctx, kind: str, n: int):
  return [ctx.refs[f"{kind}_const{m}"] for m in range(n)]


def _score_leaf_values(ctx: _Ctx):
  s = ctx.prep.score
  return [r[...] for r in _leaf_refs(ctx, "score", len(s.leaves))] if s else []


def _post(ctx: _Ctx, i, j, raw, score_leaves, masked: bool):
  """Raw scaled logits -> logits: score modifiers, bias, and for partial tiles the masks."""
  p, refs = ctx.p, ctx.refs
  idx = _tile_index(p, ctx.b, ctx.kh, i, j)
  s = raw
  if ctx.prep.score is not None:
    lifted = ctx.prep.score
    s = _call_lifted(lifted, score_leaves, _const_refs(ctx, "score", len(lifted.consts)),
                     (raw,) + idx, leaves_are_refs=False)
    s = jnp.broadcast_to(s, raw.shape).astype(jnp.float32)
  if "bias" in refs:
    s = s + _rows_tile(refs["bias"], p.bias_dims, p, i, j, ctx.over).astype(jnp.float32)
  if masked:
    keep = None
    if ctx.prep.mask is not None:
      lifted = ctx.prep.mask
      leaves = _leaf_refs(ctx, "mask", len(lifted.leaves))
      keep = _call_lifted(lifted, leaves, _const_refs(ctx, "mask", len(lifted.consts)), idx,
                          leaves_are_refs=True)
      keep = jnp.broadcast_to(jnp.asarray(keep, bool), raw.shape)
    if "dmask" in refs:
      user = _rows_tile(refs["dmask"], p.mask_dims, p, i, j, ctx.over) != 0
      keep = user if keep is None else keep & user
    if p.S % p.bk:
      pad = jnp.broadcast_to(idx[3] < p.S, raw.shape)
      keep = pad if keep is None else keep & pad
    if p.T % p.bq:
      pad = jnp.broadcast_to(idx[2] < p.T, raw.shape)
      keep = pad if keep is None else keep & pad
    if keep is not None:
      s = jnp.where(keep, s, -jnp.inf)
  return s


def _dropout_scale(ctx: _Ctx, i, j):
  """(rows, bk) multiplier 0 or 1/(1-rate), or None without dropout."""
  c = ctx.p.config
  if "dropout_key" not in ctx.refs:
    return None
  b, h, q_idx, kv_idx = _tile_index(ctx.p, ctx.b, ctx.kh, i, j)
  keep = common.dropout_keep(ctx.refs["dropout_key"], c.dropout_rate, b, h, q_idx, kv_idx)
  keep = jnp.broadcast_to(keep, (ctx.p.rows, ctx.p.bk))
  return jnp.where(keep, jnp.float32(1.0 / (1.0 - c.dropout_rate)), jnp.float32(0.0))


def _visit(kind, step, carry):
  """Runs step(carry, masked) for a partial (1) or full (2) block, skips empty (0)."""
  return lax.cond(kind == 2, lambda c: step(c, False),
                  lambda c: lax.cond(kind == 1, lambda c2: step(c2, True), lambda c2: c2, c),
                  carry)


# ---------------------------------------------------------------------------
# Forward kernel.


def _forward_kernel(refs, p: _Plan, prep: _Prepared):
  b, kh, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  ctx = _Ctx(p, refs, prep, "q", b, kh)
  q = refs["q"][...]
  score_leaves = _score_leaf_values(ctx)
  scale = jnp.float32(p.config.scale)

  def step(j, state, masked):
    k = refs["k"][pl.ds(j * p.bk, p.bk), :]
    v = refs["v"][pl.ds(j * p.bk, p.bk), :]
    s = _post(ctx, i, j, _dot_nt(q, k) * scale, score_leaves, masked)
    drop = _dropout_scale(ctx, i, j)

    def weighted_values(e):
      if drop is not None:
        e = e * drop
      return _dot_nn(e.astype(v.dtype), v)

    return softmax_state.update(state, s, weighted_values)

  def body(j, carry):
    return _visit(refs["kinds"][i, j], functools.partial(step, j), carry)

  init = softmax_state.init(jnp.zeros((p.rows,), jnp.float32),
                            jnp.zeros((p.rows, p.Hvp), jnp.float32))
  state = lax.fori_loop(refs["row_lo"][i], refs["row_hi"][i], body, init)
  # lse = hi + lo exactly: the backward's exp((s - hi) - lo) stays accurate at
  # logits ~ 1e4, where hi alone is rounded by ~1e-3.
  out, lse, lse_lo = softmax_state.finalize(state)
  refs["out"][...] = out.astype(refs["out"].dtype)
  refs["lse"][...] = lse
  refs["lse_lo"][...] = lse_lo


def _forward(p: _Plan, inputs: common.AttentionInputs):
  """(out rows (B, K, Tp*Gp, Hvp) query dtype, lse rows (B, K, Tp*Gp) float32)."""
  prep = _prepare(inputs, p)
  ins = dict(prep.arrays, q=_to_rows(inputs.query, p, p.Hp))
  specs = _common_specs(prep, p, "q")
  specs["q"] = pl.BlockSpec((None, None, p.rows, p.Hp), lambda b, h, i: (b, h, i, 0))
  R = p.Tp * p.Gp
  outs = {
      "out": (jax.ShapeDtypeStruct((p.B, p.K, R, p.Hvp), inputs.query.dtype),
              pl.BlockSpec((None, None, p.rows, p.Hvp), lambda b, h, i: (b, h, i, 0))),
      "lse": (jax.ShapeDtypeStruct((p.B, p.K, R), jnp.float32),
              pl.BlockSpec((None, None, p.rows), lambda b, h, i: (b, h, i))),
      "lse_lo": (jax.ShapeDtypeStruct((p.B, p.K, R), jnp.float32),
                 pl.BlockSpec((None, None, p.rows), lambda b, h, i: (b, h, i))),
  }
  res = _call(functools.partial(_forward_kernel, p=p, prep=prep), p, "forward",
              (p.B, p.K, p.nq), ins, specs, outs)
  return res["out"], res["lse"], res["lse_lo"]


# ---------------------------------------------------------------------------
# Backward kernels.


def _tile_grads(ctx: _Ctx, i, j, q, k, v, do, lse, lse_lo, delta, score_leaves, masked, want_leaves):
  """Recomputes tile (i, j); returns (p_dropped, dS at the logits, dS at raw * scale, d leaves)."""
  p = ctx.p
  scale = jnp.float32(p.config.scale)
  raw = _dot_nt(q, k) * scale
  d_leaves = None
  if ctx.prep.score is not None:
    if want_leaves:
      s, pull = jax.vjp(lambda r, ls: _post(ctx, i, j, r, ls, masked), raw, score_leaves)
    else:
      s, pull1 = jax.vjp(lambda r: _post(ctx, i, j, r, score_leaves, masked), raw)
      pull = lambda ds: (pull1(ds)[0], None)
  else:
    s = _post(ctx, i, j, raw, score_leaves, masked)
    pull = None
  dead = lse == -jnp.inf
  prob = jnp.exp((s - jnp.where(dead, jnp.inf, lse)[:, None]) - jnp.where(dead, 0.0, lse_lo)[:, None])
  drop = _dropout_scale(ctx, i, j)
  pd = prob if drop is None else prob * drop
  dp = _dot_nt(do, v)
  if drop is not None:
    dp = dp * drop
  ds_logits = prob * (dp - delta[:, None])
  ds_raw = ds_logits
  if pull is not None:
    ds_raw, d_leaves = pull(ds_logits)
  return pd, ds_logits, ds_raw * scale, d_leaves


def _dkv_kernel(refs, p: _Plan, prep: _Prepared):
  b, kh, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  ctx = _Ctx(p, refs, prep, "k", b, kh)
  k = refs["k"][...]
  v = refs["v"][...]
  dt = k.dtype
  score_leaves = _score_leaf_values(ctx)
  want_leaves = bool(prep.score is not None and common.inexact_leaves(prep.score.leaves))
  fl = common.inexact_leaves(prep.score.leaves) if want_leaves else []
  bias_tiles = "dbias" in refs and p.bias_dims[2] > 1
  if bias_tiles:  # written tile by tile; blocks the loop skips stay 0
    refs["dbias"][...] = jnp.zeros(refs["dbias"].shape, jnp.float32)

  def step(i, carry, masked):
    dk, dv, dbias, dleaves = carry
    rs = pl.ds(i * p.rows, p.rows)
    q = refs["q"][rs, :]
    do = refs["do"][rs, :]
    pd, ds_logits, ds, d_l = _tile_grads(ctx, i, j, q, k, v, do, refs["lse"][rs], refs["lse_lo"][rs],
                                         refs["delta"][rs], score_leaves, masked, want_leaves)
    dv = dv + _dot_tn(pd.astype(dt), do)
    dk = dk + _dot_tn(ds.astype(dt), q)
    if "dbias" in refs:
      g = _reduce_bias_tile(ds_logits, p)
      if bias_tiles:
        refs["dbias"][pl.ds(i * p.bq, p.bq), :, :] = g
      else:
        dbias = dbias + g
    if want_leaves:
      dleaves = tuple(a + d_l[n].astype(jnp.float32) for a, n in zip(dleaves, fl))
    return dk, dv, dbias, dleaves

  def body(i, carry):
    return _visit(refs["kinds"][i, j], functools.partial(step, i), carry)

  dbias0 = jnp.zeros((1,) + tuple(refs["dbias"].shape[1:]), jnp.float32) \
      if "dbias" in refs and not bias_tiles else jnp.zeros((), jnp.float32)
  dleaves0 = tuple(jnp.zeros(prep.score.leaves[n].shape, jnp.float32) for n in fl)
  init = (jnp.zeros((p.bk, p.Hp), jnp.float32), jnp.zeros((p.bk, p.Hvp), jnp.float32), dbias0, dleaves0)
  dk, dv, dbias, dleaves = lax.fori_loop(refs["col_lo"][j], refs["col_hi"][j], body, init)
  refs["dk"][...] = dk.astype(refs["dk"].dtype)
  refs["dv"][...] = dv.astype(refs["dv"].dtype)
  if "dbias" in refs and not bias_tiles:
    refs["dbias"][...] = dbias
  for n, d in zip(fl, dleaves):
    refs[f"dscore{n}"][...] = d


def _reduce_bias_tile(ds, p: _Plan):
  """(rows, bk) dS -> the bias block's tile shape (bq|1, Gb, bk|1), summed over broadcast dims."""
  _, _, Tb, Gb, Sb = p.bias_dims
  g = ds.reshape(p.bq, p.Gp, p.bk)
  if Gb == 1:
    g = jnp.sum(g, axis=1, keepdims=True)
  if Sb == 1:
    g = jnp.sum(g, axis=2, keepdims=True)
  if Tb == 1:
    g = jnp.sum(g, axis=0, keepdims=True)
  return g


def _dq_kernel(refs, p: _Plan, prep: _Prepared):
  b, kh, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  ctx = _Ctx(p, refs, prep, "q", b, kh)
  q = refs["q"][...]
  do = refs["do"][...]
  lse = refs["lse"][...]
  lse_lo = refs["lse_lo"][...]
  delta = refs["delta"][...]
  score_leaves = _score_leaf_values(ctx)

  def step(j, dq, masked):
    k = refs["k"][pl.ds(j * p.bk, p.bk), :]
    v = refs["v"][pl.ds(j * p.bk, p.bk), :]
    _, _, ds, _ = _tile_grads(ctx, i, j, q, k, v, do, lse, lse_lo, delta, score_leaves, masked, False)
    return dq + _dot_nn(ds.astype(k.dtype), k)

  def body(j, dq):
    return _visit(refs["kinds"][i, j], functools.partial(step, j), dq)

  dq = lax.fori_loop(refs["row_lo"][i], refs["row_hi"][i], body,
                     jnp.zeros((p.rows, p.Hp), jnp.float32))
  refs["dq"][...] = dq.astype(refs["dq"].dtype)


def _backward(p: _Plan, inputs: common.AttentionInputs, out_rows, lse_rows, lo_rows, d_out, d_lse):
  """Gradients (dq, dk, dv, dbias, d score leaves) in the inputs' own layouts."""
  prep = _prepare(inputs, p)
  do_rows = _to_rows(d_out.astype(inputs.query.dtype), p, p.Hvp)
  # dS = P * (dP - D) with D = rowsum(dO * O) - dlse (the lse cotangent adds P * dlse).
  delta = jnp.sum(do_rows.astype(jnp.float32) * out_rows.astype(jnp.float32), axis=-1)
  if d_lse is not None:
    delta = delta - _to_rows(d_lse.astype(jnp.float32), p, 0)
  q_rows = _to_rows(inputs.query, p, p.Hp)
  R = p.Tp * p.Gp
  shared = dict(prep.arrays, q=q_rows, do=do_rows, lse=lse_rows, lse_lo=lo_rows, delta=delta)

  # dK, dV (and dbias, d score leaves): grid over key blocks.
  specs = _common_specs(prep, p, "k")
  for name, width in (("q", p.Hp), ("do", p.Hvp)):
    specs[name] = pl.BlockSpec((None, None, R, width), lambda b, h, j: (b, h, 0, 0))
  for name in ("lse", "lse_lo", "delta"):
    specs[name] = pl.BlockSpec((None, None, R), lambda b, h, j: (b, h, 0))
  outs = {
      "dk": (jax.ShapeDtypeStruct((p.B, p.Sp, p.K, p.Hp), inputs.key.dtype),
             pl.BlockSpec((None, p.bk, None, p.Hp), lambda b, h, j: (b, j, h, 0))),
      "dv": (jax.ShapeDtypeStruct((p.B, p.Sp, p.K, p.Hvp), inputs.value.dtype),
             pl.BlockSpec((None, p.bk, None, p.Hvp), lambda b, h, j: (b, j, h, 0))),
  }
  if inputs.bias is not None:
    _, _, Tb, Gb, Sb = p.bias_dims
    # Per (b, h) program partials (and per key block when the bias broadcasts
    # over keys), summed below: programs never write the same block.
    npart = p.nk if Sb == 1 else 1
    outs["dbias"] = (
        jax.ShapeDtypeStruct((p.B, p.K, npart, Tb, Gb, Sb), jnp.float32),
        pl.BlockSpec((None, None, None, Tb, Gb, p.bk if Sb > 1 else 1),
                     lambda b, h, j: (b, h, j if Sb == 1 else 0, 0, 0, j if Sb > 1 else 0)))
  fl = common.inexact_leaves(prep.score.leaves) if prep.score is not None else []
  for n in fl:
    shape = prep.score.leaves[n].shape
    zeros = (0,) * len(shape)
    outs[f"dscore{n}"] = (jax.ShapeDtypeStruct((p.B, p.K, p.nk) + shape, jnp.float32),
                          pl.BlockSpec((None, None, None) + shape, lambda b, h, j, z=zeros: (b, h, j) + z))
  kv = _call(functools.partial(_dkv_kernel, p=p, prep=prep), p, "backward_dkv",
             (p.B, p.K, p.nk), shared, specs, outs)

  # dQ: grid over query blocks.
  specs = _common_specs(prep, p, "q")
  specs["q"] = pl.BlockSpec((None, None, p.rows, p.Hp), lambda b, h, i: (b, h, i, 0))
  specs["do"] = pl.BlockSpec((None, None, p.rows, p.Hvp), lambda b, h, i: (b, h, i, 0))
  for name in ("lse", "lse_lo", "delta"):
    specs[name] = pl.BlockSpec((None, None, p.rows), lambda b, h, i: (b, h, i))
  outs = {"dq": (jax.ShapeDtypeStruct((p.B, p.K, R, p.Hp), inputs.query.dtype),
                 pl.BlockSpec((None, None, p.rows, p.Hp), lambda b, h, i: (b, h, i, 0)))}
  dq = _call(functools.partial(_dq_kernel, p=p, prep=prep), p, "backward_dq",
             (p.B, p.K, p.nq), shared, specs, outs)["dq"]

  dq = _from_rows(dq, p, p.H)
  dk = kv["dk"][:, :p.S, :, :p.H]
  dv = kv["dv"][:, :p.S, :, :p.Hv]
  dbias = None
  if inputs.bias is not None:
    Bb, Kb = p.bias_dims[:2]
    part = jnp.sum(kv["dbias"], axis=2)  # (B, K, Tb, Gb, Sb)
    if Bb == 1:
      part = jnp.sum(part, axis=0, keepdims=True)
    if Kb == 1:
      part = jnp.sum(part, axis=1, keepdims=True)
    dbias = _from_5d(part, inputs.bias.shape, p).astype(inputs.bias.dtype)
  dleaves = {n: jnp.sum(kv[f"dscore{n}"], axis=(0, 1, 2)) for n in fl}
  return dq, dk, dv, dbias, dleaves


# ---------------------------------------------------------------------------
# custom_vjp wiring.


def _finish(p: _Plan, out_rows, lse_rows):
  return _from_rows(out_rows, p, p.Hv), _from_rows(lse_rows, p, None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(p: _Plan, inputs: common.AttentionInputs):
  out_rows, lse_rows, _ = _forward(p, inputs)
  return _finish(p, out_rows, lse_rows)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _forward_in_vjp(p: _Plan, inputs):
  return _forward(p, inputs)


@_forward_in_vjp.defjvp
def _forward_in_vjp_jvp(p: _Plan, primals, tangents):
  # Reached only when the forward of the VJP is itself differentiated:
  # second-order reverse mode (jax.grad of a function of jax.grad).
  raise NotImplementedError(
      "dot_product_attention: implementation='pallas' does not support second-order "
      "differentiation (jax.grad of a function of its jax.grad): its kernels have "
      "first-order rules only; use implementation='xla'.")


def _flash_fwd(p: _Plan, inputs):
  out_rows, lse_rows, lo_rows = _forward_in_vjp(p, inputs)
  return _finish(p, out_rows, lse_rows), (inputs, out_rows, lse_rows, lo_rows)


def _flash_bwd(p: _Plan, res, cts):
  inputs, out_rows, lse_rows, lo_rows = res
  d_out, d_lse = cts
  dq, dk, dv, dbias, dleaves = _backward(p, inputs, out_rows, lse_rows, lo_rows, d_out, d_lse)
  d_score = None
  if inputs.score_fn is not None:
    # The soft-cap holds no arrays, so the combined modifier's leaves are the caller's.
    d_score = common.leaf_cotangents(inputs.score_fn, dleaves)
  return (common.AttentionInputs(query=dq, key=dk, value=dv, bias=dbias, score_fn=d_score),)


_flash.defvjp(_flash_fwd, _flash_bwd)


def unsupported_reason(inputs: common.AttentionInputs, config: common.AttentionConfig, *,
                       block_sizes: tuple[int, int] | None = None, interpret: bool | None = None,
                       backend: str | None = None) -> str | None:
  """Why `pallas_attention` would raise NotImplementedError for these arguments, or None.

  Static and cheap (it traces the mask and score functions, runs nothing), so
  dispatch can choose without trying.
  """
  try:
    p = _make_plan(inputs, config, block_sizes, interpret, backend)
    _check_triton(p)
    _lift_functions(inputs, p)
  except NotImplementedError as exc:
    return str(exc)
  return None


def pallas_attention(inputs: common.AttentionInputs, config: common.AttentionConfig, *,
                     block_sizes: tuple[int, int] | None = None, interpret: bool | None = None,
                     backend: str | None = None, gpu_layout: bool | None = None):
  """Returns (output (B, T, N, Hv) in query dtype, lse (B, T, N) float32).

  Args:
    inputs, config: normalized arguments (see `jaxattn._impl.common`).
    block_sizes: (query block, key block) in positions; a program holds the
      query block's rows for all G query heads of a key/value head. Compiled
      kernels need bq x G (G padded to a power of 2) and the key block to be
      powers of 2 >= 16.
    interpret: run the kernels in Pallas' interpreter; default: on CPU only.
    backend: "gpu" (or "cuda") or "tpu": the compiler the kernels are
      lowered for (default: the default backend's); set it to lower for
      another platform, e.g. with `jax.export` on a CPU machine.
    gpu_layout: pad blocks and head dims as the compiled kernels do
      (default: when not interpreting); True runs that layout in interpret
      mode, for tests.

  Raises:
    NotImplementedError: see the module docstring.
  """
  B, T, N, _ = inputs.query.shape
  Hv = inputs.value.shape[-1]
  if B == 0:  # nothing to compute; the same empty results as every implementation
    return (jnp.zeros((0, T, N, Hv), inputs.query.dtype), jnp.zeros((0, T, N), jnp.float32))
  if Hv == 0:  # the logsumexp is still defined: run with one zero value column
    one = inputs._replace(value=jnp.pad(inputs.value, ((0, 0), (0, 0), (0, 0), (0, 1))))
    out, lse = pallas_attention(one, config, block_sizes=block_sizes, interpret=interpret,
                                backend=backend, gpu_layout=gpu_layout)
    return out[..., :0], lse
  p = _make_plan(inputs, config, block_sizes, interpret, backend, gpu_layout)
  _check_triton(p)
  return _flash(p, inputs)
