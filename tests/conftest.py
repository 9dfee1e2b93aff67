"""Test-wide JAX settings: silent broadcasting is an error."""

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
