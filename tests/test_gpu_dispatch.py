"""GPU dispatch when jax's Pallas Triton backend is gone (jax deprecates it).

Simulated by making `import jax.experimental.pallas.triton` fail: jaxattn
must still import, "pallas" must refuse compiled GPU kernels with
NotImplementedError (named reason, static check included), and
`implementation=None` must dispatch around it - statically, and through the
trace-time fallback when a kernel refuses anyway.
"""

import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import jaxattn
from jaxattn import _impl, testing
from jaxattn._impl import pallas

TRITON = "jax.experimental.pallas.triton"


@pytest.fixture
def no_triton(monkeypatch):
  import jax.experimental.pallas as pl  # noqa: PLC0415

  monkeypatch.setitem(sys.modules, TRITON, None)  # `import` now raises ImportError
  monkeypatch.delattr(pl, "triton", raising=False)  # and `from ... import triton` too


def _normalized(dtype=jnp.bfloat16, **kw):
  q, k, v = testing.random_qkv(jax.random.key(0), dtype=dtype, B=2, T=5, S=7, N=4, K=2, H=64)
  return jaxattn.attention.normalize(q, k, v, **kw)[:2]


def test_jaxattn_imports_without_the_triton_backend():
  code = (f"import sys; sys.modules[{TRITON!r}] = None\n"
          "import jax, jax.numpy as jnp, jaxattn\n"
          "q = jnp.ones((1, 4, 2, 8)) * jnp.arange(8.0)\n"
          "print(jaxattn.dot_product_attention(q, q, q, is_causal=True).shape)\n"
          "print('pallas' in jaxattn.implementations())\n")
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.split() == ["(1,", "4,", "2,", "8)", "True"]


def test_pallas_refuses_compiled_gpu_kernels_with_the_reason(no_triton):
  inputs, config = _normalized(logits_soft_cap=30.0)
  reason = pallas.unsupported_reason(inputs, config, backend="gpu", interpret=False)
  assert reason is not None and "no Pallas Triton backend" in reason
  with pytest.raises(NotImplementedError, match="no Pallas Triton backend"):
    pallas.pallas_attention(inputs, config, backend="gpu", interpret=False)
  # interpret mode does not need Triton
  assert pallas.unsupported_reason(inputs, config, interpret=True) is None


def test_static_gpu_dispatch_skips_pallas(no_triton):
  # cuDNN serves plain causal bf16; soft-cap it does not, and pallas is gone: chunked.
  inputs, config = _normalized(is_causal=True)
  assert jaxattn.attention.choose_implementation(inputs, config, backend="gpu") == "cudnn"
  inputs, config = _normalized(is_causal=True, logits_soft_cap=30.0)
  assert jaxattn.attention.choose_implementation(inputs, config, backend="gpu") in ("chunked", "xla")


def test_static_gpu_dispatch_with_triton_picks_pallas():
  if pallas._triton() is None:
    pytest.skip("this jax has no Pallas Triton backend")
  inputs, config = _normalized(is_causal=True, logits_soft_cap=30.0)
  assert jaxattn.attention.choose_implementation(inputs, config, backend="gpu") == "pallas"


def test_trace_time_refusal_falls_back(no_triton, monkeypatch):
  """A kernel chosen by dispatch that raises NotImplementedError while tracing is replaced by chunked/xla."""
  calls = []

  def gpu_pallas(inputs, config, **options):
    calls.append("pallas")
    return pallas.pallas_attention(inputs, config, backend="gpu", interpret=False, **options)

  monkeypatch.setitem(_impl._REGISTRY, "pallas", gpu_pallas)
  monkeypatch.setattr(jaxattn.attention, "choose_implementation", lambda *a, **k: "pallas")
  # Sizes used nowhere else, so no cached trace of `_run` answers instead.
  q, k, v = testing.random_qkv(jax.random.key(5), B=1, T=3, S=11, N=3, K=1, H=7)
  out = jaxattn.dot_product_attention(q, k, v, is_causal=True, logits_soft_cap=2.0)
  assert calls == ["pallas"]
  testing.assert_attention_close(out, testing.reference_attention(q, k, v, is_causal=True, logits_soft_cap=2.0))


def test_gpu_dispatch_gives_cudnn_the_compute_capability():
  # H = 256: cuDNN serves it on compute capability 9.0 (Hopper), not below.
  q, k, v = testing.random_qkv(jax.random.key(0), dtype=jnp.bfloat16, B=1, T=8, S=8, N=2, K=2, H=256)
  inputs, config = jaxattn.attention.normalize(q, k, v, is_causal=True)[:2]
  choose = jaxattn.attention.choose_implementation
  assert choose(inputs, config, backend="gpu", compute_capability=(9, 0)) == "cudnn"
  assert choose(inputs, config, backend="gpu", compute_capability=(8, 0)) != "cudnn"
  reason = _impl.unsupported_reason("cudnn", inputs, config, "gpu", "8.0")
  assert "<= 128 on compute capability 8.0" in reason
