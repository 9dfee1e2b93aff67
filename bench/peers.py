"""Every implementation the benchmark runs: jaxattn's and the peers a user
would pick instead, each called the way its users would call it.

An `Impl` has a name, a framework ("jax", "torch" or "numpy") and a `load()`
that imports its package (ImportError: not installed) and returns
`(version, build)`. `build(case, inputs)` returns a `Runnable`, or raises
`Unsupported` for a case the implementation cannot express.

How each expresses the mask kinds (see `specs`):
  jaxattn.*  is_causal, local_window_size, key_value_seq_lengths, query_segment_ids.
  jax.nn     is_causal, local_window_size, key_value_seq_lengths; documents as
             a dense boolean mask. xla on CPU, cudnn where jax picks it.
  tokamax    as jax.nn; implementation "xla_chunked" on CPU, its own choice
             (GPU kernels) elsewhere.
  flax.nnx   is_causal; everything else as a dense boolean mask.
  torch      F.scaled_dot_product_attention: is_causal, else a boolean attn_mask;
             enable_gqa for K < N. Eager, on CPU (CUDA when JAX runs on GPU).
  numpy      the seed notebook's softmax(QK^T/sqrt(d))V per head (exp/sum, no
             max subtraction), masked with np.where; forward, float32, small T.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bench import specs


class Unsupported(Exception):
  """The implementation cannot run this case (reported, the run goes on)."""


class Runnable(NamedTuple):
  """A case ready to run: `step(*args)` gives native outputs, `to_numpy`
  turns them into float64 arrays [out] or [out, d_query, d_key, d_value] in
  the (B, T, N, H) / (B, S, K, H) layouts."""
  args: tuple
  step: Callable
  to_numpy: Callable


class Impl(NamedTuple):
  name: str
  framework: str
  load: Callable[[], tuple[str, Callable[[specs.Case, specs.Inputs], Runnable]]]
  # Runs in Pallas' interpreter here (a GPU/TPU kernel off its accelerator):
  # measured and marked, never ranked fastest (its time says nothing of the kernel).
  interpreted: bool = False

  @property
  def is_peer(self) -> bool:
    return not self.name.startswith("jaxattn.")


# jaxattn's kernel implementations and the backends they are compiled for; on any
# other backend they run in Pallas' interpreter.
KERNEL_BACKENDS = {"pallas": ("gpu", "tpu"), "mosaic": ("gpu",), "splash": ("tpu",)}


def interpreted(name: str, backend: str | None = None) -> bool:
  """Whether jaxattn implementation `name` runs in an interpreter on `backend` (default: JAX's)."""
  backends = KERNEL_BACKENDS.get(name)
  return backends is not None and (backend or jax.default_backend()) not in backends


def _as_list(outs) -> list[np.ndarray]:
  outs = outs if isinstance(outs, (tuple, list)) else [outs]
  return [np.asarray(x).astype(np.float64) for x in outs]


def _jax_runnable(case, inputs, attend) -> Runnable:
  """Wraps `attend(q, k, v, aux) -> out` into the case's mode."""
  if case.mode == "fwd":
    def step(q, k, v, aux, d_out):
      del d_out
      return attend(q, k, v, aux)
  elif case.mode == "jvp":
    def step(q, k, v, aux, d_out):
      # Fixed tangents of the right shapes: the cotangent array for q, k and v themselves.
      return jax.jvp(lambda q, k, v: attend(q, k, v, aux), (q, k, v), (d_out, k, v))
  else:
    def step(q, k, v, aux, d_out):
      out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, aux), q, k, v)
      return (out, *vjp(d_out))
  return Runnable(tuple(inputs), step, _as_list)


def _jax_nn_kwargs(case, aux) -> dict:
  """The mask in `jax.nn.dot_product_attention`'s (and tokamax's) arguments."""
  if case.mask == "causal":
    return dict(is_causal=True)
  if case.mask == "window":
    return dict(local_window_size=(case.window, 0))
  if case.mask == "lengths":
    return dict(key_value_seq_lengths=aux["key_value_seq_lengths"])
  if case.mask in ("documents", "causal_documents"):
    return dict(mask=specs.dense_mask(case, aux, jnp))
  if case.mask != "none":
    raise Unsupported(f"mask {case.mask!r} not expressed in jax.nn's arguments")
  return {}


def _jaxattn(name: str) -> Impl:
  def load():
    import jaxattn
    def build(case, inputs):
      def attend(q, k, v, aux):
        return jaxattn.dot_product_attention(
            q, k, v, implementation=name, **specs.jaxattn_kwargs(case, aux))
      return _jax_runnable(case, inputs, attend)
    return jaxattn.__version__, build
  return Impl(f"jaxattn.{name}", "jax", load, interpreted(name))


def _load_jax_nn():
  def build(case, inputs):
    if case.soft_cap is not None:
      raise Unsupported("jax.nn.dot_product_attention has no logits soft-cap")
    _jax_nn_kwargs(case, inputs.aux)  # refuses a mask it cannot express, before timing
    def attend(q, k, v, aux):
      return jax.nn.dot_product_attention(q, k, v, **_jax_nn_kwargs(case, aux))
    return _jax_runnable(case, inputs, attend)
  return jax.__version__, build


def _load_tokamax():
  import importlib.metadata
  import tokamax
  from absl import flags
  # tokamax reads absl flags and would parse our command line as its own.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(sys.argv[:1])
  # On CPU tokamax would pick plain xla; its blocked xla_chunked is the one to beat.
  implementation = "xla_chunked" if jax.default_backend() == "cpu" else None
  def build(case, inputs):
    _jax_nn_kwargs(case, inputs.aux)  # refuses a mask it cannot express, before timing
    extra = {} if case.soft_cap is None else dict(logits_soft_cap=case.soft_cap)
    def attend(q, k, v, aux):
      return tokamax.dot_product_attention(
          q, k, v, implementation=implementation, **_jax_nn_kwargs(case, aux), **extra)
    return _jax_runnable(case, inputs, attend)
  return f"{importlib.metadata.version('tokamax')} ({implementation or 'auto'})", build


def _load_flax():
  import flax
  from flax import nnx
  def build(case, inputs):
    if case.soft_cap is not None:
      raise Unsupported("flax's dot_product_attention has no logits soft-cap")
    def attend(q, k, v, aux):
      if case.mask == "causal":
        return nnx.dot_product_attention(q, k, v, is_causal=True)
      return nnx.dot_product_attention(q, k, v, mask=specs.dense_mask(case, aux, jnp))
    return _jax_runnable(case, inputs, attend)
  return flax.__version__, build


def _load_torch():
  # Keep the memory profiler's log lines off the progress output.
  os.environ.setdefault("KINETO_LOG_LEVEL", "6")
  os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
  import torch
  F = torch.nn.functional
  device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"

  def build(case, inputs):
    if case.mode == "jvp":
      raise Unsupported("jvp mode: JAX peers only (torch's forward-mode AD is not benchmarked)")
    if case.soft_cap is not None:
      raise Unsupported("torch scaled_dot_product_attention has no logits soft-cap")
    dtype = getattr(torch, case.dtype)
    def native(x):  # (B, L, heads, H) -> torch's (B, heads, L, H)
      x = torch.from_numpy(np.array(x, np.float32)).to(device=device, dtype=dtype)
      return x.transpose(1, 2).contiguous()
    q, k, v, d_out = (native(x) for x in (inputs.query, inputs.key, inputs.value, inputs.d_out))
    aux = {n: torch.from_numpy(np.array(a)).to(device) for n, a in inputs.aux.items()}
    causal = case.mask == "causal"

    def attend(q, k, v):
      mask = None if causal else specs.dense_mask(case, aux, torch)
      return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                            enable_gqa=case.K != case.N)

    def step(q, k, v, d_out):
      if case.mode == "fwd":
        with torch.no_grad():
          outs = (attend(q, k, v),)
      else:
        q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
        out = attend(q, k, v)
        outs = (out.detach(), *torch.autograd.grad(out, (q, k, v), d_out))
      if device == "cuda":
        torch.cuda.synchronize()
      return outs

    def to_numpy(outs):
      return [x.transpose(1, 2).float().cpu().numpy().astype(np.float64) for x in outs]
    return Runnable((q, k, v, d_out), step, to_numpy)
  return f"{torch.__version__} ({device}, {torch.get_num_threads()} threads)", build


def _load_numpy():
  def build(case, inputs):
    if case.mode != "fwd":
      raise Unsupported("forward only")
    if case.dtype != "float32":
      raise Unsupported(f"float32 only, got {case.dtype}")
    if case.T > specs.REFERENCE_MAX_T:
      raise Unsupported(f"small T only (T <= {specs.REFERENCE_MAX_T})")
    aux = {n: np.asarray(a) for n, a in inputs.aux.items()}
    mask = specs.dense_mask(case, aux, np)
    G = case.N // case.K

    def step(q, k, v):
      out = np.empty_like(q)
      for b in range(case.B):
        for n in range(case.N):
          Q, K, V = q[b, :, n], k[b, :, n // G], v[b, :, n // G]
          d_k = K.shape[-1]
          attention_scores = np.dot(Q, K.T) / np.sqrt(d_k)
          if mask is not None:
            attention_scores = np.where(mask[b % mask.shape[0], 0], attention_scores, -np.inf)
          attention_weights = np.exp(attention_scores) / np.sum(
              np.exp(attention_scores), axis=1, keepdims=True)
          out[b, :, n] = np.dot(attention_weights, V)
      return out
    args = tuple(np.asarray(x) for x in (inputs.query, inputs.key, inputs.value))
    return Runnable(args, step, _as_list)
  return np.__version__, build


# ---------------------------------------------------------------------------
# GPU peers (issue 12): one named kernel each, so the GPU table compares
# kernels, not each library's automatic choice. Each expresses every mask kind
# of `specs` (causal_documents as a dense mask, the peers' way) and refuses
# what its API lacks (soft-cap in jax.nn and torch SDPA).


def _gpu_mask_kwargs(case, aux, xp) -> dict:
  """is_causal for plain causal, a dense boolean mask for every other kind."""
  if case.mask == "causal":
    return dict(is_causal=True)
  if case.mask == "none":
    return {}
  return dict(mask=specs.dense_mask(case, aux, xp))


def _require_gpu():
  if jax.default_backend() != "gpu":
    raise Unsupported(f"GPU peer; the default backend is {jax.default_backend()}")


def _load_jax_nn_kernel(implementation: str):
  def load():
    def build(case, inputs):
      _require_gpu()
      if case.soft_cap is not None:
        raise Unsupported("jax.nn.dot_product_attention has no logits soft-cap")
      def attend(q, k, v, aux):
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation,
                                            **_gpu_mask_kwargs(case, aux, jnp))
      return _jax_runnable(case, inputs, attend)
    return jax.__version__, build
  return load


def _load_tokamax_kernel(implementation: str):
  def load():
    import importlib.metadata
    import tokamax
    from absl import flags
    if not flags.FLAGS.is_parsed():
      flags.FLAGS(sys.argv[:1])
    def build(case, inputs):
      _require_gpu()
      extra = {} if case.soft_cap is None else dict(logits_soft_cap=case.soft_cap)
      def attend(q, k, v, aux):
        return tokamax.dot_product_attention(q, k, v, implementation=implementation,
                                             **_gpu_mask_kwargs(case, aux, jnp), **extra)
      return _jax_runnable(case, inputs, attend)
    return f"{importlib.metadata.version('tokamax')} ({implementation})", build
  return load


def _load_torch_sdpa():
  os.environ.setdefault("KINETO_LOG_LEVEL", "6")
  os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
  import torch
  F = torch.nn.functional

  def build(case, inputs):
    _require_gpu()
    if case.mode == "jvp":
      raise Unsupported("jvp mode: JAX peers only (torch's forward-mode AD is not benchmarked)")
    if not torch.cuda.is_available():
      raise Unsupported("torch has no CUDA device")
    if case.soft_cap is not None:
      raise Unsupported("torch scaled_dot_product_attention has no logits soft-cap")
    dtype = getattr(torch, case.dtype)
    def native(x):  # (B, L, heads, H) -> torch's (B, heads, L, H), on the GPU
      return torch.from_numpy(np.array(x, np.float32)).to("cuda", dtype).transpose(1, 2).contiguous()
    q, k, v, d_out = (native(x) for x in (inputs.query, inputs.key, inputs.value, inputs.d_out))
    aux = {n: torch.from_numpy(np.array(a)).to("cuda") for n, a in inputs.aux.items()}
    causal = case.mask == "causal"
    mask = None if causal or case.mask == "none" else specs.dense_mask(case, aux, torch)

    def attend(q, k, v):
      return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                            enable_gqa=case.K != case.N)

    def step(q, k, v, d_out):
      if case.mode == "fwd":
        with torch.no_grad():
          outs = (attend(q, k, v),)
      else:
        q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
        out = attend(q, k, v)
        outs = (out.detach(), *torch.autograd.grad(out, (q, k, v), d_out))
      torch.cuda.synchronize()
      return outs

    def to_numpy(outs):
      return [x.transpose(1, 2).float().cpu().numpy().astype(np.float64) for x in outs]
    return Runnable((q, k, v, d_out), step, to_numpy)
  return f"{torch.__version__} (cuda)", build


def gpu_peers() -> list[Impl]:
  """The GPU peers: listed when JAX runs on a GPU (or JAXATTN_BENCH_GPU_PEERS=1,
  to check the listing elsewhere; they refuse every case off a GPU)."""
  if jax.default_backend() != "gpu" and os.environ.get("JAXATTN_BENCH_GPU_PEERS") != "1":
    return []
  return [Impl("jax.nn.cudnn", "jax", _load_jax_nn_kernel("cudnn")),
          Impl("jax.nn.xla", "jax", _load_jax_nn_kernel("xla")),
          Impl("tokamax.mosaic", "jax", _load_tokamax_kernel("mosaic")),
          Impl("tokamax.triton", "jax", _load_tokamax_kernel("triton")),
          Impl("tokamax.cudnn", "jax", _load_tokamax_kernel("cudnn")),
          Impl("torch.sdpa", "torch", _load_torch_sdpa)]


def implementations() -> list[Impl]:
  """jaxattn's registered implementations first, then the peers."""
  import jaxattn
  return [*(_jaxattn(name) for name in jaxattn.implementations()),
          Impl("jax.nn", "jax", _load_jax_nn),
          Impl("tokamax", "jax", _load_tokamax),
          Impl("flax.nnx", "jax", _load_flax),
          Impl("torch", "torch", _load_torch),
          Impl("numpy", "numpy", _load_numpy),
          *gpu_peers()]
