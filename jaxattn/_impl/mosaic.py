"""A flash-attention forward kernel for Hopper GPUs with Pallas' Mosaic GPU backend.

FlashAttention-3 (Shah et al. 2024, arXiv 2407.08608) moves key/value blocks
into shared memory with the TMA and multiplies them with `wgmma` into
register accumulators. This kernel keeps that data path in its simplest
form, one program per (batch, key/value head, block of 64 query rows):

  Q block (64 rows)  --TMA-->  swizzled SMEM  (once)
  for each non-empty key block j, from a compacted list (full blocks first):
    K_j, V_j --TMA--> swizzled SMEM, two slots: block j+1 is copied while j
                      is computed
    S = Q K_j^T       wgmma into a float32 accumulator
    S = cap * tanh(S * scale / cap) (soft-cap) or S * scale, in base 2
        (log2(e) folded into the scale so the softmax uses exp2)
    masks             partial blocks only: causal/window band (both
                      alignments) from iota positions, query/key length
                      limits (and the key padding), segment ids
    online softmax    float32 running max and sum
    P -> SMEM, O += P V_j (wgmma)
  O / l and the logsumexp --TMA--> global memory.

The G query heads that share a key/value head are folded into the rows
(ordered (t, g), as in `jaxattn._impl.pallas`), so K/V are read once per
group. Block skipping uses the same block classification as
"chunked"/"pallas" (`jaxattn.masks`), compacted per query block into a list
of non-empty key blocks, full ones first: one loop over the full blocks
without mask arithmetic, one over the partial ones (no branch per block).

Not (yet) FlashAttention-3's full schedule: no producer warpgroup, no
ping-pong between two consumer warpgroups, P goes through shared memory
instead of being the register A operand of the second wgmma (the GPU
interpreter, which tests this kernel on CPU, takes wgmma operands from
memory only). None of it is tuned: no GPU was available when this was written.

The backward pass is the "chunked" implementation's (`chunked.backward`,
blocked XLA code that recomputes probabilities from this kernel's
logsumexp): gradients are exact and finite, but not a Mosaic kernel's speed.

Where it runs:
  GPU, compute capability >= 9.0: compiled by Mosaic GPU.
  CPU with jax >= 0.11: Pallas' GPU interpreter
      (`plgpu.InterpretGPUParams`), for tests; slow.
  Elsewhere: NotImplementedError (dispatch falls back).

Serves float16/bfloat16, H == Hv in {64, 128, 256}, GQA with N / K <= 64,
is_causal (top-left and bottom-right), local windows, query and key lengths,
segment ids and logits_soft_cap. Raises NotImplementedError at trace time
for the rest: bias, dense mask, mask_fn, score_fn, dropout, other dtypes and
head dims.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxattn import masks as _masks
from jaxattn._impl import chunked, common

_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))
_HEAD_DIMS = (64, 128, 256)
# One warpgroup's wgmma has M = 64 rows.
BLOCK_ROWS = 64
# Key block per head dim when compiled (shared memory: two K and two V slots,
# Q, P). Untuned: no GPU was available; bench/gpu.sh measures.
COMPILED_BLOCK_KV = {64: 128, 128: 128, 256: 64}
INTERPRET_BLOCK_KV = 64
_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)


def _plgpu():
  """The Mosaic GPU Pallas module, or None when this jax has none."""
  try:
    from jax.experimental.pallas import mosaic_gpu as plgpu  # noqa: PLC0415
  except Exception:  # pragma: no cover - depends on the installed jax
    return None
  return plgpu


def _load(plgpu, ref, layout):
  """plgpu.load of a whole ref: jax 0.10 takes an index argument, jax 0.12 none."""
  if "idx" in inspect.signature(plgpu.load).parameters:
    return plgpu.load(ref, (), layout=layout)
  return plgpu.load(ref, layout=layout)


def interpreter_available() -> bool:
  """Whether this jax has Pallas' GPU interpreter (jax >= 0.11)."""
  plgpu = _plgpu()
  return plgpu is not None and hasattr(plgpu, "InterpretGPUParams")


@dataclasses.dataclass(frozen=True)
class _Plan(_masks.BlockGeometry):
  """Static description of one call (hashable); bq * Gp == BLOCK_ROWS."""
  config: common.AttentionConfig
  K: int
  G: int
  Gp: int  # G padded to a power of 2; rows g >= G are inert dummies
  H: int
  interpret: bool

  @property
  def rows(self) -> int:
    return self.bq * self.Gp


def _pow2(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


def unsupported_reason(inputs: common.AttentionInputs, config: common.AttentionConfig, *,
                       backend: str | None = None, interpret: bool | None = None,
                       compute_capability: str | None = None,
                       block_sizes: tuple[int, int] | None = None) -> str | None:
  """Why `mosaic_attention` would raise NotImplementedError here, or None.

  Static: reads shapes, dtypes, the static config and which arguments are set.
  `backend` ("cpu", "gpu", ...) and `compute_capability` override the
  detected ones (for tests and for dispatch on a named backend).
  """
  plgpu = _plgpu()
  if plgpu is None or not hasattr(plgpu, "wgmma"):
    return "mosaic: this jax has no Pallas Mosaic GPU backend (jax.experimental.pallas.mosaic_gpu)"
  if backend is None:
    cuda = common.cuda_gpu()[0]
    backend = "gpu" if cuda else jax.default_backend()
  if backend in ("gpu", "cuda") and compute_capability is None:
    compute_capability = common.cuda_gpu()[1]  # None when lowering on a CPU machine
  if interpret is None:
    interpret = backend == "cpu"
  if interpret:
    if not interpreter_available():
      return (f"mosaic: Pallas' GPU interpreter (plgpu.InterpretGPUParams) needs jax >= 0.11; "
              f"this is jax {jax.__version__}")
  else:
    if backend not in ("gpu", "cuda"):
      return f"mosaic: compiled kernels need a CUDA GPU (compute capability >= 9.0); backend is {backend}"
    if compute_capability is not None:
      major = int(str(compute_capability).split(".")[0])
      if major < 9:
        return (f"mosaic: needs compute capability >= 9.0 (wgmma, TMA); got {compute_capability}")
  B, T, N, H = inputs.query.shape
  _, S, K, Hv = inputs.value.shape
  dtype = jnp.dtype(inputs.query.dtype)
  if dtype not in _DTYPES:
    return f"mosaic: needs float16 or bfloat16 inputs; got {dtype}"
  if H not in _HEAD_DIMS or Hv != H:
    return f"mosaic: needs H == Hv in {_HEAD_DIMS}; got H={H}, Hv={Hv}"
  if _pow2(N // K) > BLOCK_ROWS:
    return f"mosaic: needs at most {BLOCK_ROWS} query heads per key/value head; got N/K={N // K}"
  for name, value in (("bias", inputs.bias), ("mask", inputs.mask), ("mask_fn", inputs.mask_fn),
                      ("score_fn", inputs.score_fn)):
    if value is not None:
      return f"mosaic: {name} is not served (use implementation='pallas' or 'chunked')"
  if config.dropout_rate > 0.0:
    return "mosaic: dropout is not served (use implementation='pallas' or 'chunked')"
  if block_sizes is not None:
    bq, bk = block_sizes
    if bq * _pow2(N // K) != BLOCK_ROWS or bk % 64 or bk <= 0:
      return (f"mosaic: block_sizes must be (query block, key block) with query block x "
              f"{_pow2(N // K)} (padded N/K) == {BLOCK_ROWS} rows and key block a multiple of 64; "
              f"got {block_sizes}")
  return None


def _make_plan(inputs, config, block_sizes, interpret) -> _Plan:
  B, T, N, H = inputs.query.shape
  _, S, K, _ = inputs.key.shape
  G = N // K
  Gp = _pow2(G)
  if block_sizes is None:
    bq = BLOCK_ROWS // Gp
    bk = INTERPRET_BLOCK_KV if interpret else COMPILED_BLOCK_KV[H]
  else:
    bq, bk = block_sizes
  return _Plan(B=B, N=N, T=T, S=S, bq=bq, bk=bk, config=config, K=K, G=G, Gp=Gp, H=H,
               interpret=bool(interpret))


# ---------------------------------------------------------------------------
# Outside the kernel: layouts, per-position vectors, the compacted block lists.


_pad = common.pad_axis


def _rows_of(x, p: _Plan):
  """(B, T, N, ...) -> (B, K, nq*bq*Gp, ...): rows ordered (t, g) per key/value head."""
  B, T = x.shape[:2]
  rest = x.shape[3:]
  x = x.reshape((B, T, p.K, p.G) + rest)
  x = _pad(_pad(x, 1, p.nq * p.bq), 3, p.Gp)
  x = jnp.moveaxis(x, 1, 2)
  return x.reshape((B, p.K, p.nq * p.rows) + rest)


def _from_rows(x, p: _Plan):
  """Inverse of `_rows_of`."""
  rest = x.shape[3:]
  x = x.reshape((p.B, p.K, p.nq * p.bq, p.Gp) + rest)[:, :, :p.T, :p.G]
  x = jnp.moveaxis(x, 2, 1)
  return x.reshape((p.B, p.T, p.N) + rest)



def _vectors(inputs: common.AttentionInputs, p: _Plan):
  """What the kernel masks with besides positions (which it computes from iota).

  q_limit, kv_limit (B,) int32: query rows at or past q_limit give 0 and lse
  -inf, keys at or past kv_limit are masked (lengths, and the padding of S to
  key blocks); q_seg (B, R) and kv_seg (B, Sp) int32: segment ids per row
  (rows ordered (t, g)) and per key, only with segment ids.
  """
  Tp, Sp = p.nq * p.bq, p.nk * p.bk
  q_limit = jnp.full((p.B,), p.T, jnp.int32)
  if inputs.query_seq_lengths is not None:
    q_limit = jnp.clip(inputs.query_seq_lengths, 0, p.T).astype(jnp.int32)
  kv_limit = jnp.full((p.B,), p.S, jnp.int32)
  if inputs.key_value_seq_lengths is not None:
    kv_limit = jnp.clip(inputs.key_value_seq_lengths, 0, p.S).astype(jnp.int32)
  out = {"q_limit": q_limit, "kv_limit": kv_limit}
  if inputs.query_segment_ids is not None:
    out["q_seg"] = jnp.repeat(_pad(inputs.query_segment_ids, 1, Tp), p.Gp, axis=1)
    out["kv_seg"] = _pad(inputs.key_value_segment_ids, 1, Sp)
  return out


def block_lists(inputs: common.AttentionInputs, p: _Plan):
  """Compacted non-empty key blocks per query block, full ones first.

  Returns (counts (nq,), full (nq,), blocks (nq, nk)) int32: query block i
  visits key blocks blocks[i, :counts[i]]; the first full[i] of them are
  full (every key visible to every row: no mask arithmetic), the rest
  partial; each group in increasing order. Classification as in
  "chunked"/"pallas" (`jaxattn.masks`: band, lengths, documents; the padded
  last key block is never full).
  """
  qb = jnp.asarray(np.arange(p.nq, dtype=np.int32))[:, None]
  kb = jnp.asarray(np.arange(p.nk, dtype=np.int32))[None, :]
  kinds = _masks.block_kinds(common.combined_mask(inputs, p.config), p, qb, kb)
  counts = jnp.sum(kinds > 0, axis=1).astype(jnp.int32)
  full = jnp.sum(kinds == 2, axis=1).astype(jnp.int32)
  # Stable sort: full blocks, then partial, then empty; increasing within each.
  order = jnp.argsort(2 - kinds, axis=1, stable=True).astype(jnp.int32)
  return counts, full, order


# ---------------------------------------------------------------------------
# The kernel.


def _kernel(p: _Plan, names: tuple[str, ...], *refs):
  plgpu = _plgpu()
  from jax.experimental import pallas as pl  # noqa: PLC0415
  n_in = len(names)
  ins = dict(zip(names, refs[:n_in]))
  out_ref, lse_ref = refs[n_in:n_in + 2]
  (q_smem, k_smem, v_smem, p_smem, lse_smem, qseg_smem, kvseg_smem,
   q_bar, k_bar, v_bar, seg_bar) = refs[n_in + 2:]
  R, bk, H = p.rows, p.bk, p.H
  c = p.config
  wgmma = plgpu.Layout.WGMMA
  rows_layout, cols_layout = wgmma.reduce(1), wgmma.reduce(0)
  segments = "q_seg" in ins

  b = lax.axis_index("b")
  kh = lax.axis_index("kh")
  i = lax.axis_index("q")
  row0 = i * R

  plgpu.copy_gmem_to_smem(ins["q"].at[b, kh, pl.ds(row0, R)], q_smem, q_bar.at[0])
  if segments:
    plgpu.copy_gmem_to_smem(ins["q_seg"].at[b, pl.ds(row0, R)], qseg_smem, q_bar.at[1])
  count = ins["counts"][i]
  n_full = ins["full"][i]
  q_limit = ins["q_limit"][b]
  kv_limit = ins["kv_limit"][b]

  def fetch(step):
    j = ins["blocks"][i, step]
    slot = lax.rem(step, 2)
    keys = pl.ds(j * bk, bk)
    plgpu.copy_gmem_to_smem(ins["k"].at[b, keys, kh], k_smem.at[slot], k_bar.at[slot])
    plgpu.copy_gmem_to_smem(ins["v"].at[b, keys, kh], v_smem.at[slot], v_bar.at[slot])
    if segments:
      plgpu.copy_gmem_to_smem(ins["kv_seg"].at[b, keys], kvseg_smem.at[slot], seg_bar.at[slot])

  @pl.when(count > 0)
  def _():
    fetch(0)

  # Query position of each row: rows are (t, g) with Gp a power of 2.
  shift = p.Gp.bit_length() - 1
  r_idx = plgpu.broadcasted_iota(jnp.int32, (R, bk), 0, layout=wgmma)
  c_idx = plgpu.broadcasted_iota(jnp.int32, (R, bk), 1, layout=wgmma)
  q_idx = lax.shift_right_logical(r_idx + row0, jnp.int32(shift)) if shift else r_idx + row0
  plgpu.barrier_wait(q_bar.at[0])
  if segments:
    plgpu.barrier_wait(q_bar.at[1])
    q_seg = _load(plgpu, qseg_smem, rows_layout)

  if c.logits_soft_cap is None:
    pre = jnp.float32(c.scale * _LOG2E)
  else:
    pre = jnp.float32(c.scale / c.logits_soft_cap)
    cap2 = jnp.float32(c.logits_soft_cap * _LOG2E)
  band = common.band(c)

  def rows(x, width):
    return lax.broadcast_in_dim(x, (R, width), [0])

  def body(step, carry, masked):
    m, l, acc = carry
    j = ins["blocks"][i, step]
    slot = lax.rem(step, 2)

    @pl.when(step + 1 < count)
    def _():
      fetch(step + 1)

    plgpu.barrier_wait(k_bar.at[slot])

    def qk(acc_ref):
      plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].T)
      return acc_ref[...]

    s = pl.run_scoped(qk, plgpu.ACC((R, bk), jnp.float32))
    # Logits in base 2: log2(e) is folded into the scale (or the cap).
    if c.logits_soft_cap is None:
      s = s * pre
    else:
      s = cap2 * jnp.tanh(s * pre)
    if masked:
      kv_idx = c_idx + j * bk
      keep = (kv_idx < kv_limit) & (q_idx < q_limit)
      if band is not None:
        left, right = band
        diff = kv_idx - q_idx  # key position - query position (in key coordinates below)
        if right is not None:
          keep = keep & (diff <= right + c.q_offset)
        if left is not None:
          keep = keep & (diff >= c.q_offset - left)
      if segments:
        plgpu.barrier_wait(seg_bar.at[slot])
        kv_seg = _load(plgpu, kvseg_smem.at[slot], cols_layout)
        keep = keep & (rows(q_seg, bk) == lax.broadcast_in_dim(kv_seg, (R, bk), [1]))
      s = jnp.where(keep, s, jnp.float32(-jnp.inf))
    elif segments:
      plgpu.barrier_wait(seg_bar.at[slot])  # keeps the barrier's phases in step with its copies
    m_new = jnp.maximum(m, s.max(axis=1))
    m_safe = jnp.where(m_new == -jnp.inf, jnp.float32(0), m_new)
    e = jnp.exp2(s - rows(m_safe, bk))
    alpha = jnp.exp2(m - m_safe)
    l = l * alpha + e.sum(axis=1)
    p_smem[...] = e.astype(p_smem.dtype)
    plgpu.commit_smem()
    plgpu.barrier_wait(v_bar.at[slot])

    def pv(acc_ref):
      plgpu.wgmma(acc_ref, p_smem, v_smem.at[slot])
      return acc_ref[...]

    o = pl.run_scoped(pv, plgpu.ACC((R, H), jnp.float32))
    acc = acc * rows(alpha, H) + o
    return m_new, l, acc

  m0 = plgpu.layout_cast(jnp.full((R,), -jnp.inf, jnp.float32), rows_layout)
  l0 = plgpu.layout_cast(jnp.full((R,), 0.0, jnp.float32), rows_layout)
  acc0 = plgpu.layout_cast(jnp.full((R, H), 0.0, jnp.float32), wgmma)
  # Full blocks without mask arithmetic, then the partial ones; the K/V
  # prefetch runs across the two loops (it follows the list index).
  carry = lax.fori_loop(0, n_full, functools.partial(body, masked=False), (m0, l0, acc0))
  m, l, acc = lax.fori_loop(n_full, count, functools.partial(body, masked=True), carry)
  # Rows that saw no key (every block masked or skipped): output 0, lse -inf.
  live = l > 0
  l_safe = jnp.where(live, l, jnp.float32(1))
  acc = acc / rows(l_safe, H)
  m_safe = jnp.where(m == -jnp.inf, jnp.float32(0), m)
  lse = jnp.where(live, (m_safe + jnp.log2(l_safe)) * jnp.float32(_LN2), jnp.float32(-jnp.inf))
  q_smem[...] = acc.astype(q_smem.dtype)
  lse_smem[...] = lse
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(q_smem, out_ref.at[b, kh, pl.ds(row0, R)])
  plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, kh, pl.ds(row0, R)])
  plgpu.wait_smem_to_gmem(0)


def _forward(p: _Plan, inputs: common.AttentionInputs):
  """(out (B, T, N, H) query dtype, lse (B, T, N) float32)."""
  plgpu = _plgpu()
  dtype = inputs.query.dtype
  Sp = p.nk * p.bk
  arrays = dict(_vectors(inputs, p))
  arrays["counts"], arrays["full"], arrays["blocks"] = block_lists(inputs, p)
  arrays["q"] = _rows_of(inputs.query, p)
  arrays["k"] = _pad(inputs.key, 1, Sp)
  arrays["v"] = _pad(inputs.value, 1, Sp)
  names = tuple(arrays)
  R = p.rows
  Rt = p.nq * R
  # Rows of H >= 64 and bk >= 64 half-precision elements are >= 128 bytes:
  # 128-byte swizzle, the one wgmma reads without bank conflicts.
  tr = (plgpu.TilingTransform((8, 128 // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(128))
  scratch = [
      plgpu.SMEM((R, p.H), dtype, transforms=tr),
      plgpu.SMEM((2, p.bk, p.H), dtype, transforms=tr),
      plgpu.SMEM((2, p.bk, p.H), dtype, transforms=tr),
      plgpu.SMEM((R, p.bk), dtype, transforms=tr),
      plgpu.SMEM((R,), jnp.float32),
      plgpu.SMEM((R,), jnp.int32),
      plgpu.SMEM((2, p.bk), jnp.int32),
      plgpu.Barrier(num_barriers=2),
      plgpu.Barrier(num_barriers=2),
      plgpu.Barrier(num_barriers=2),
      plgpu.Barrier(num_barriers=2),
  ]
  kwargs = {}
  if p.interpret:
    kwargs["interpret"] = plgpu.InterpretGPUParams()
  else:
    kwargs["compiler_params"] = plgpu.CompilerParams(approx_math=True)
  out_rows, lse_rows = plgpu.kernel(
      functools.partial(_kernel, p, names),
      out_type=(jax.ShapeDtypeStruct((p.B, p.K, Rt, p.H), dtype),
                jax.ShapeDtypeStruct((p.B, p.K, Rt), jnp.float32)),
      scratch_types=scratch,
      grid=(p.B, p.K, p.nq), grid_names=("b", "kh", "q"),
      **kwargs,
  )(*[arrays[n] for n in names])
  return _from_rows(out_rows, p), _from_rows(lse_rows, p)


# ---------------------------------------------------------------------------
# custom_vjp: the Mosaic forward, the "chunked" backward.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(p: _Plan, inputs: common.AttentionInputs):
  return _forward(p, inputs)


def _flash_fwd(p: _Plan, inputs):
  out, lse = _forward(p, inputs)
  return (out, lse), (inputs, out, lse)


def _flash_bwd(p: _Plan, res, cts):
  inputs, out, lse = res
  d_out, d_lse = cts
  dq, dk, dv, _, _ = chunked.backward(inputs, p.config, out, lse, d_out, d_lse)
  return (common.AttentionInputs(query=dq.astype(inputs.query.dtype), key=dk.astype(inputs.key.dtype),
                                 value=dv.astype(inputs.value.dtype)),)


_flash.defvjp(_flash_fwd, _flash_bwd)


def mosaic_attention(inputs: common.AttentionInputs, config: common.AttentionConfig, *,
                     block_sizes: tuple[int, int] | None = None, interpret: bool | None = None,
                     backend: str | None = None):
  """Returns (output (B, T, N, H) in the query dtype, lse (B, T, N) float32).

  Args:
    inputs, config: normalized arguments (see `jaxattn._impl.common`).
    block_sizes: (query positions, key block): query positions x N/K (padded
      to a power of 2) must be 64 rows, the key block a multiple of 64.
    interpret: run in Pallas' GPU interpreter; default: on CPU.
    backend: "gpu" lowers the compiled kernel whatever the default backend
      (with `jax.jit(...).trace(...).lower(lowering_platforms=("cuda",))` on
      a CPU machine, for tests); default: the detected one.

  Raises:
    NotImplementedError: see `unsupported_reason`.
  """
  if interpret is None:
    interpret = common.platform(backend) == "cpu"
  reason = unsupported_reason(inputs, config, backend=backend, interpret=interpret,
                              block_sizes=block_sizes)
  if reason is not None:
    raise NotImplementedError(reason)
  p = _make_plan(inputs, config, block_sizes, interpret)
  return _flash(p, inputs)
