"""flax's own attention tests, run with jaxattn swapped in (the project's ground rules).

The harness downloads the sdist of the *installed* flax with pip (or reads the tarball
named by $JAXATTN_FLAX_SDIST, for offline runs), extracts only flax's attention test
files, writes a conftest.py next to them that swaps jaxattn in, runs them with pytest in
a subprocess, and compares the failures with EXPECTED: each entry is a difference that
README documents, or a test of flax's own details (its error wording) that cannot apply to
a swapped function.

The swap (see _CONFTEST): `flax.linen.dot_product_attention` and
`flax.nnx.dot_product_attention` (the package names and those in their attention
modules) become probes that run `jaxattn.flax_interop.attention_fn`, and so do the
`attention_fn` defaults of linen's `MultiHeadDotProductAttention` (and its subclasses
`SelfAttention`, `MultiHeadAttention`) and of `nnx.MultiHeadAttention`: flax binds them
when the class is defined (dataclass field defaults, `__init__` defaults), so patching
the module names alone would not reach the modules. What the adapter hands back to
flax (sow_weights, custom einsums, complex dtypes) reaches flax's original function
(the probe calls it when re-entered) and is counted apart; the harness asserts that
jaxattn itself served calls from both linen's and nnx's modules.
"""

import json
import os
import subprocess
import sys
import tarfile

import jax
import pytest

pytestmark = pytest.mark.interop

flax = pytest.importorskip("flax")

_FILES = ("tests/linen/linen_attention_test.py", "tests/nnx/nn/attention_test.py")

_NNX = "tests/nnx/nn/attention_test.py::"
_WORDING = ("flax's error wording: jaxattn raises a ValueError for the same shapes, worded its own "
            "way (the test's regex finds no match)", 'does not match "')
# Failing flax tests: {test id: (why, text its failure must show)}. The run's failures
# must be exactly these, each failing the way its reason says.
EXPECTED = {
    _NNX + "TestMultiHeadAttention::test_causal_mask_equivalence1":
        ("padding masks every key, so both query rows have no key: jaxattn gives 0, flax the "
         "mean of V (README, differences from jax.nn: 'a query row with no key to attend to')",
         "0.0 (ACTUAL)"),
    _NNX + "TestGQADotProductAttention::test_gqa_invalid_heads": _WORDING,
    _NNX + "TestDotProductAttentionValidation::test_invalid_shapes0": _WORDING,
    _NNX + "TestDotProductAttentionValidation::test_invalid_shapes2": _WORDING,
    _NNX + "TestDotProductAttentionValidation::test_invalid_shapes3": _WORDING,
}

_CONFTEST = r'''
"""Written by jaxattn's tests/test_flax_upstream.py: runs flax's tests on jaxattn."""
import functools
import inspect
import json
import os

import flax.linen as nn
import flax.linen.attention as linen_attention
import flax.nnx as nnx
import flax.nnx.nn.attention as nnx_attention

from jaxattn import flax_interop

# Calls per probe: all, served by jaxattn for a flax attention module, handed back to flax.
CALLS = {"linen": 0, "nnx": 0, "linen_module_jaxattn": 0, "nnx_module_jaxattn": 0,
         "linen_delegated": 0, "nnx_delegated": 0}
_depth = [0]
OUTCOMES = {}
FAILURES = {}


def _probe(kind, original):
  @functools.wraps(flax_interop.attention_fn)
  def probe(*args, **kwargs):
    if _depth[0]:  # the adapter handing a call back to flax's default
      CALLS[kind + "_delegated"] += 1
      return original(*args, **kwargs)
    CALLS[kind] += 1
    by_module, delegated = _called_by_module(), CALLS[kind + "_delegated"]
    _depth[0] += 1
    try:
      out = flax_interop.attention_fn(*args, **kwargs)
    finally:
      _depth[0] -= 1
    if by_module and CALLS[kind + "_delegated"] == delegated:
      CALLS[kind + "_module_jaxattn"] += 1
    return out
  return probe


def _called_by_module():
  frame = inspect.currentframe().f_back.f_back
  self = frame.f_locals.get("self")
  return isinstance(self, (linen_attention.MultiHeadDotProductAttention, nnx_attention.MultiHeadAttention))


def _swap_defaults(cls, old, new):
  """Replaces `old` by `new` where cls and its subclasses store attention_fn's default."""
  swapped = False
  if cls.__dict__.get("attention_fn") is old:
    type.__setattr__(cls, "attention_fn", new)
  for field in cls.__dict__.get("__dataclass_fields__", {}).values():
    if field.default is old:
      field.default = new
  if "__init__" in cls.__dict__:
    init = inspect.unwrap(cls.__dict__["__init__"])
    if init.__defaults__ and any(d is old for d in init.__defaults__):
      init.__defaults__ = tuple(new if d is old else d for d in init.__defaults__)
      swapped = True
    if init.__kwdefaults__ and any(d is old for d in init.__kwdefaults__.values()):
      init.__kwdefaults__ = {k: new if d is old else d for k, d in init.__kwdefaults__.items()}
      swapped = True
  if not swapped:
    raise RuntimeError(f"jaxattn swap: no attention_fn default found in {cls.__qualname__}.__init__")
  for sub in cls.__subclasses__():
    _swap_defaults(sub, old, new)


_linen_probe = _probe("linen", linen_attention.dot_product_attention)
_nnx_probe = _probe("nnx", nnx_attention.dot_product_attention)
_swap_defaults(linen_attention.MultiHeadDotProductAttention, linen_attention.dot_product_attention, _linen_probe)
_swap_defaults(nnx_attention.MultiHeadAttention, nnx_attention.dot_product_attention, _nnx_probe)
linen_attention.dot_product_attention = nn.dot_product_attention = _linen_probe
nnx_attention.dot_product_attention = nnx.dot_product_attention = _nnx_probe
assert nn.SelfAttention(num_heads=1).attention_fn is _linen_probe


def pytest_runtest_logreport(report):
  if report.when == "call" or report.outcome != "passed":
    OUTCOMES[report.nodeid] = report.outcome
    if report.failed:
      FAILURES[report.nodeid] = report.longreprtext[-3000:]


def pytest_sessionfinish(session):
  with open(os.environ["JAXATTN_FLAX_REPORT"], "w") as f:
    json.dump({"outcomes": OUTCOMES, "failures": FAILURES, "calls": CALLS}, f, indent=1)
'''


def _sdist(tmp):
  """flax's sdist for the installed version: $JAXATTN_FLAX_SDIST, else pip download."""
  local = os.environ.get("JAXATTN_FLAX_SDIST")
  if local:
    return local
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
         "--disable-pip-version-check", f"flax=={flax.__version__}", "-d", str(tmp)]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
  except subprocess.TimeoutExpired:
    pytest.skip(f"pip download of flax=={flax.__version__}'s sdist timed out (no network?); "
                f"set JAXATTN_FLAX_SDIST to a local flax-{flax.__version__}.tar.gz")
  found = sorted(tmp.glob("flax-*.tar.gz"))
  if proc.returncode != 0 or not found:
    pytest.skip(f"could not download flax=={flax.__version__}'s sdist (no network?); set "
                f"JAXATTN_FLAX_SDIST to a local tarball. pip said: {proc.stderr.strip()[-300:]}")
  return found[0]


@pytest.fixture(scope="module")
def upstream_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("flax_upstream")
  sdist = _sdist(tmp)
  root = tmp / "src"
  with tarfile.open(sdist) as tar:
    top = tar.next().name.split("/")[0]  # flax-<version>/
    for name in _FILES:
      try:
        data = tar.extractfile(f"{top}/{name}").read()
      except KeyError:
        pytest.fail(f"{sdist} has no {top}/{name}: update _FILES for flax {flax.__version__}")
      (root / name).parent.mkdir(parents=True, exist_ok=True)
      (root / name).write_bytes(data)
  (root / "pytest.ini").write_text("[pytest]\n")  # pins rootdir: no ini from above applies
  (root / "tests" / "conftest.py").write_text(_CONFTEST)
  env = dict(os.environ, JAXATTN_FLAX_REPORT=str(tmp / "report.json"))
  # The child shares the suite's persistent compilation cache, if any.
  cache = jax.config.jax_compilation_cache_dir
  if cache and "JAX_COMPILATION_CACHE_DIR" not in env:
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                         "-rfE", *_FILES], cwd=root, env=env, capture_output=True, text=True,
                        timeout=600)
  report = tmp / "report.json"
  assert report.exists(), f"flax's tests did not run:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
  return json.loads(report.read_text()), proc


def test_jaxattn_is_swapped_in(upstream_run):
  data, _ = upstream_run
  calls = data["calls"]
  assert calls["linen_module_jaxattn"] > 0 and calls["nnx_module_jaxattn"] > 0, calls


def test_flax_attention_tests_pass_except_documented(upstream_run):
  data, proc = upstream_run
  outcomes = data["outcomes"]
  assert len(outcomes) > 50, f"too few flax tests collected: {len(outcomes)}\n{proc.stdout[-3000:]}"
  failed = {k for k, v in outcomes.items() if v == "failed"}
  unexpected, fixed = sorted(failed - EXPECTED.keys()), sorted(EXPECTED.keys() - failed)
  assert not unexpected and not fixed, (
      f"flax tests failing that EXPECTED does not list: {unexpected}\n"
      f"EXPECTED tests that no longer fail (remove them): {fixed}\n{proc.stdout[-6000:]}")
  for test_id, (reason, evidence) in EXPECTED.items():
    text = data["failures"][test_id]
    assert evidence in text, f"{test_id} fails otherwise than EXPECTED says ({reason}):\n{text}"
