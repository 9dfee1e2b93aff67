"""README's python code blocks run as written.

Every ```python block of README.md runs here (the API signature block is
compared with the real signature instead). The blocks are fragments: as the
README says, they assume `import functools, jax, jax.numpy as jnp, jaxattn` and
the example arrays their text names. FIXTURES gives those arrays per block (small
sizes); a block without an entry fails, so a new README block needs one here.
"""

import ast
import inspect
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import jaxattn

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
PREAMBLE = "import functools, jax, jax.numpy as jnp, jaxattn\n"
SIGNATURE = "out = jaxattn.dot_product_attention("


def _blocks() -> list[str]:
  return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def _normal(seed, shape):
  return jax.random.normal(jax.random.key(seed), shape)


def _qkv(B=2, T=16, N=4, K=2, H=8):
  return dict(q=_normal(0, (B, T, N, H)), k=_normal(1, (B, T, K, H)), v=_normal(2, (B, T, K, H)))


# The first line of each block -> the example values its text names.
FIXTURES = {
    "import jaxattn.masks as jm": lambda: dict(_qkv(), N=4, prefix_lengths=jnp.array([3, 5])),
    "params = jaxattn.init_self_attention": lambda: dict(
        key=jax.random.key(0), x=_normal(1, (5, 4)), xs=_normal(2, (3, 5, 4))),
    "from jaxattn import testing": lambda: dict(
        my_attention=lambda q, k, v: jaxattn.dot_product_attention(q, k, v, is_causal=True)),
    "params = jaxattn.init_multi_head_attention": lambda: dict(
        key=jax.random.key(0), xs=_normal(1, (2, 6, 512)), lengths=jnp.array([6, 4])),
    "cache = jaxattn.init_kv_cache": lambda: dict(
        _qkv(T=3), B=2, L=16, K=2, H=8, prompt_lengths=jnp.array([3, 2])),
    "# inside jax.shard_map": lambda: dict(
        _qkv(T=8), mesh=jax.make_mesh((2,), ("seq",), devices=jax.devices()[:2])),
    "x = jaxattn.to_balanced_layout": lambda: dict(x=_normal(0, (2, 8, 3)), out=_normal(1, (2, 8, 3)), P=2, T=8),
}


def _first_line(block):
  return block.splitlines()[0].strip()


def test_every_block_has_a_fixture():
  lines = [_first_line(b) for b in _blocks() if not b.startswith(SIGNATURE)]
  assert len(lines) >= 7, "README's python blocks were not found"
  missing = [line for line in lines if not any(line.startswith(f) for f in FIXTURES)]
  assert not missing, f"README blocks without a fixture in tests/test_readme.py: {missing}"


def test_signature_block_matches_dot_product_attention():
  (block,) = [b for b in _blocks() if b.startswith(SIGNATURE)]
  code = re.sub(r"#.*", "", block).replace(SIGNATURE, "def documented(").rstrip().rstrip(")")
  tree = ast.parse(code + "): pass")
  ns = {}
  exec(compile(tree, "README.md", "exec"), ns)
  documented = inspect.signature(ns["documented"]).parameters
  actual = inspect.signature(jaxattn.dot_product_attention).parameters
  assert [(p.name, p.kind, p.default) for p in documented.values()] == [
      (p.name, p.kind, p.default) for p in actual.values()]


def _run_in_shard_map(stmt, ns):
  """`stmt` (local shapes, inside shard_map over "seq") on the fixture's global arrays."""
  spec = PartitionSpec(None, "seq")
  mesh = ns["mesh"]

  def body(q, k, v):
    local = dict(ns, q=q, k=k, v=v)
    exec(stmt, local)
    return local["out"]

  args = [jax.device_put(ns[n], NamedSharding(mesh, spec)) for n in "qkv"]
  ns["out"] = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec))(*args)


@pytest.mark.parametrize("first_line", list(FIXTURES))
def test_block_runs(first_line):
  blocks = [b for b in _blocks() if _first_line(b).startswith(first_line)]
  assert len(blocks) == 1, f"README has {len(blocks)} python blocks starting {first_line!r}"
  ns = FIXTURES[first_line]()
  exec(PREAMBLE, ns)
  tree = ast.parse(blocks[0])
  for stmt in tree.body:
    code = compile(ast.Module([stmt], []), "README.md", "exec")
    if "inside jax.shard_map" in first_line and "sharded_" not in ast.unparse(stmt):
      _run_in_shard_map(code, ns)
    else:
      exec(code, ns)
  for value in ns.values():
    if isinstance(value, jax.Array) and jnp.issubdtype(value.dtype, jnp.floating):
      assert np.isfinite(np.asarray(value)).all()
