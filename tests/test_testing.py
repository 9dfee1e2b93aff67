"""`jaxattn.testing`'s random helpers keep their documented contracts."""

import jax
import numpy as np
import pytest

from jaxattn import testing


@pytest.mark.parametrize("L,n", [(16, 3), (2, 5), (1, 3), (10, 1), (8, 8), (0, 3)])
@pytest.mark.parametrize("traced", [False, True])
def test_random_segment_ids_hold_exactly_the_documents_asked_for(L, n, traced):
  """min(num_segments, L) documents per row, ids 0 .. n - 1 in order, none empty
  (it used to draw each cut independently: 1 to 6 documents for 3, ids from 1)."""
  make = lambda key: testing.random_segment_ids(key, 5, L, n)
  ids = np.asarray((jax.jit(make) if traced else make)(jax.random.key(2)))
  assert ids.shape == (5, L) and ids.dtype == np.int32
  for row in ids:
    assert sorted(set(row.tolist())) == list(range(min(n, L)))
  assert np.all(np.diff(ids, axis=1) >= 0) and np.all(np.diff(ids, axis=1) <= 1)


def test_random_helpers_refuse_what_they_cannot_do():
  with pytest.raises(ValueError, match="random_qkv: layout must be 'BTNH' or 'TNH'; got 'BNTH'"):
    testing.random_qkv(jax.random.key(0), layout="BNTH")
  for bad in (0, True, 2.0):
    with pytest.raises(ValueError, match="random_segment_ids: num_segments must be a positive int"):
      testing.random_segment_ids(jax.random.key(0), 2, 8, bad)
  assert testing.random_segment_ids(jax.random.key(0), 2, 8, np.int64(3)).max() == 2
