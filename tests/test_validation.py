"""Bad input: a clear ValueError or TypeError at trace time naming the argument and shapes."""

import inspect
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn import testing

B, T, S, N, K, H = 2, 5, 7, 6, 3, 11
q, k, v = testing.random_qkv(jax.random.key(0), B=B, T=T, S=S, N=N, K=K, H=H)
q3, k3, v3 = q[0], k[0], v[0]
i32 = jnp.int32

# (id, args, kwargs, error type, regex the message must match)
BAD = [
    ("query_rank", (q[0, 0], k, v), {}, ValueError,
     r"query must have shape \(B, T, N, H\) or \(T, N, H\); got rank 2 shape \(6, 11\)"),
    ("key_rank_mismatch", (q, k3, v), {}, ValueError,
     r"key must have shape \(B, S, K, H\), the rank of query \(2, 5, 6, 11\); got \(7, 3, 11\)"),
    ("batch_mismatch", (q, k[:1], v[:1]), {}, ValueError,
     r"key must have shape \(B, S, K, H\) = \(2, 7, 3, 11\) to match query \(2, 5, 6, 11\); got \(1, 7, 3, 11\)"),
    ("head_dim_mismatch", (q, jnp.ones((B, S, K, 12)), jnp.ones((B, S, K, 12))), {}, ValueError,
     r"key must have shape \(B, S, K, H\) = \(2, 7, 3, 11\) .*got \(2, 7, 3, 12\)"),
    ("value_shape", (q, k, v[:, :6]), {}, ValueError,
     r"value must have shape \(B, S, K, Hv\) with the key's leading dims \(2, 7, 3\); got \(2, 6, 3, 11\)"),
    ("heads_not_multiple", (q, jnp.ones((B, S, 4, H)), jnp.ones((B, S, 4, H))), {}, ValueError,
     r"key heads K=4 must divide the query heads N=6"),
    ("non_float_query", (q.astype(i32), k.astype(i32), v.astype(i32)), {}, TypeError,
     r"query must have a floating point dtype; got int32"),
    ("mixed_dtypes", (q, k.astype(jnp.bfloat16), v), {}, TypeError,
     r"query, key and value must share one dtype; got float32, bfloat16, float32"),
    ("bool_bias", (q, k, v, jnp.ones((B, N, T, S), bool)), {}, TypeError,
     r"bias must have a floating point dtype \(use mask= for boolean masks\); got bool"),
    ("bias_shape", (q, k, v, jnp.ones((B, N, T, 8))), {}, ValueError,
     r"bias must broadcast to \(B, N, T, S\) = \(2, 6, 5, 7\) \(each dim 1 or full\); got shape \(2, 6, 5, 8\)"),
    ("bias_rank", (q, k, v, jnp.ones((1, B, N, T, S))), {}, ValueError,
     r"bias must have rank at most 4 and broadcast to \(B, N, T, S\) = \(2, 6, 5, 7\); got shape \(1, 2, 6, 5, 7\)"),
    ("mask_not_bool", (q, k, v, None, jnp.ones((B, N, T, S))), {}, TypeError,
     r"mask must be boolean \(True = attend; pass additive masks as bias=\); got float32"),
    ("mask_shape", (q, k, v, None, jnp.ones((B, 4, T, S), bool)), {}, ValueError,
     r"mask must broadcast to \(B, N, T, S\) = \(2, 6, 5, 7\) .*got shape \(2, 4, 5, 7\)"),
    ("mask_shape_3d_layout", (q3, k3, v3, None, jnp.ones((N, T, 3), bool)), {}, ValueError,
     r"mask must broadcast to \(N, T, S\) = \(6, 5, 7\) .*got shape \(6, 5, 3\)"),
    ("negative_window", (q, k, v), dict(local_window_size=(-1, 2)), ValueError,
     r"local_window_size sides must be non-negative ints or None; got \(-1, 2\)"),
    ("window_type", (q, k, v), dict(local_window_size=2.5), ValueError,
     r"local_window_size must be an int or a \(left, right\) tuple"),
    ("unknown_implementation", (q, k, v), dict(implementation="flash"), ValueError,
     r"implementation must be None or one of 'chunked', 'chunked_jvp', 'cudnn', .*'xla'; got 'flash'"),
    ("lengths_shape", (q, k, v), dict(key_value_seq_lengths=jnp.array([3, 4, 5], i32)), ValueError,
     r"key_value_seq_lengths must have shape \(B,\) = \(2\); got \(3\)"),
    ("lengths_dtype", (q, k, v), dict(query_seq_lengths=jnp.array([3.0, 4.0])), TypeError,
     r"query_seq_lengths must have an integer dtype; got float32"),
    ("segment_shape", (q, k, v), dict(query_segment_ids=jnp.zeros((B, T + 1), i32),
                                      key_value_segment_ids=jnp.zeros((B, S), i32)), ValueError,
     r"query_segment_ids must have shape \(B, T\) = \(2, 5\); got \(2, 6\)"),
    ("segment_missing_kv", (q, k, v), dict(query_segment_ids=jnp.zeros((B, T), i32)), ValueError,
     r"key_value_segment_ids is required when T != S \(T=5, S=7\)"),
    ("causal_alignment", (q, k, v), dict(is_causal=True, causal_alignment="bottom"), ValueError,
     r"causal_alignment must be 'top_left' or 'bottom_right'; got 'bottom'"),
    ("soft_cap", (q, k, v), dict(logits_soft_cap=-1.0), ValueError,
     r"logits_soft_cap must be positive; got -1.0"),
    ("dropout_rate", (q, k, v), dict(dropout_rate=1.0, dropout_key=jax.random.key(0)), ValueError,
     r"dropout_rate must be in \[0, 1\); got 1.0"),
    ("dropout_without_key", (q, k, v), dict(dropout_rate=0.1), ValueError,
     r"dropout_key is required when dropout_rate > 0"),
    ("block_sizes", (q, k, v), dict(block_sizes=(0, 4)), ValueError,
     r"block_sizes must be a tuple of two positive ints; got \(0, 4\)"),
    ("block_sizes_bool", (q, k, v), dict(block_sizes=(True, 1)), ValueError,
     r"block_sizes must be a tuple of two positive ints; got \(True, 1\)"),
    ("scale_not_finite", (q, k, v), dict(scale=float("nan")), ValueError,
     r"scale must be a finite number; got nan"),
    ("scale_not_scalar", (q, k, v), dict(scale=jnp.array([0.5, 0.5])), ValueError,
     r"scale must be a scalar; got shape \(2,\)"),
    ("dropout_key_data_shape", (q, k, v), dict(dropout_rate=0.1, dropout_key=jnp.array([0, 1, 2], jnp.uint32)),
     ValueError, r"dropout_key as raw uint32 key data must have shape \(2,\) \(jax.random.PRNGKey\)"),
    ("is_causal_type", (q, k, v), dict(is_causal="yes"), TypeError,
     r"is_causal must be a Python bool \(static: it picks the block plan\); got str"),
    ("mask_fn_type", (q, k, v), dict(mask_fn=3), TypeError,
     r"mask_fn must be a jaxattn.masks.Mask or a function \(b, h, q_idx, kv_idx\) -> bool; got int"),
    ("score_fn_type", (q, k, v), dict(score_fn=3), TypeError,
     r"score_fn must be a jaxattn.scores.ScoreMod or a function .*; got int"),
]


@pytest.mark.parametrize("args,kwargs,error,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_raises_clear_error(args, kwargs, error, message):
  with pytest.raises(error, match=r"^dot_product_attention: " + message):
    jaxattn.dot_product_attention(*args, **kwargs)


def test_errors_are_raised_at_trace_time_under_jit():
  f = jax.jit(lambda q, k, v: jaxattn.dot_product_attention(q, k, v[:, :6]))
  with pytest.raises(ValueError, match="value must have shape"):
    f.lower(q, k, v)


def test_every_argument_has_a_bad_input_case():
  """Each argument of dot_product_attention is checked by at least one case above
  (return_residual takes any truth value, as in jax.nn)."""
  names = set(inspect.signature(jaxattn.dot_product_attention).parameters) - {"return_residual"}
  named = {n for n in names for case in BAD if re.search(rf"\b{n}\b", case[4])}
  assert names - named == set()


def test_symbolic_sequence_lengths_export_on_the_default_path():
  """jax.export shape polymorphism: with symbolic T and S the default picks "xla"
  (it raised JAX's InconclusiveDimensionOperation from the dispatch's size
  test), and the blocked implementations say why they cannot, naming it."""
  from jax import export
  b, t = export.symbolic_shape("b, t")
  spec = lambda n: jax.ShapeDtypeStruct((b, t, n, 8), jnp.float32)
  f = lambda impl: jax.jit(lambda q, k, v: jaxattn.dot_product_attention(
      q, k, v, is_causal=True, implementation=impl))
  exported = export.export(f(None))(spec(4), spec(2), spec(2))
  for T_ in (5, 300):  # both sides of the default's xla/chunked size switch
    q, k, v = testing.random_qkv(jax.random.key(T_), B=2, T=T_, S=T_, N=4, K=2, H=8)
    np.testing.assert_allclose(exported.call(q, k, v), f(None)(q, k, v), atol=2e-6, rtol=2e-6)
  # Symbolic heads, at a size where the default would pick "chunked": "xla" too.
  n, = export.symbolic_shape("n")
  heads = jax.ShapeDtypeStruct((1, 256, n, 8), jnp.float32)
  exported = export.export(f(None))(heads, heads, heads)
  q, k, v = testing.random_qkv(jax.random.key(1), B=1, T=256, S=256, N=3, K=3, H=8)
  np.testing.assert_allclose(exported.call(q, k, v), f(None)(q, k, v), atol=2e-6, rtol=2e-6)
  for impl in ("chunked", "chunked_jvp"):
    with pytest.raises(NotImplementedError, match=r"plan their blocks from concrete sizes; got "
                       r"T=t, S=t.*use implementation='xla'"):
      export.export(f(impl))(spec(4), spec(2), spec(2))


def test_jax_nn_argument_forms_are_accepted():
  """A window as a list (a JSON config) and is_causal as a concrete jnp.bool_: jax.nn
  takes both; they raised here. A traced is_causal is refused, naming why."""
  q, k, v = testing.random_qkv(jax.random.key(3), B=1, T=8, S=8, N=2, K=2, H=4)
  got = jaxattn.dot_product_attention(q, k, v, is_causal=jnp.bool_(True), local_window_size=[2, 1])
  want = jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=(2, 1))
  np.testing.assert_allclose(got, want, atol=2e-6, rtol=2e-6)
  with pytest.raises(TypeError, match=r"is_causal must be a Python bool \(static: it picks the "
                     r"block plan\); got DynamicJaxprTracer"):
    jax.jit(lambda c: jaxattn.dot_product_attention(q, k, v, is_causal=c))(True)
