"""Smoke test of `python -m bench` and checks of its case specs.

The benchmark itself runs in a subprocess from the repository root, as users
run it, on one tiny case of the quick preset; tokamax is hidden from it so the
"not installed" path runs even where the peers are installed.
"""

import importlib.util
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench/ is a top-level folder of the repository, not installed

from bench import specs  # noqa: E402

HIDE_TOKAMAX = """
import sys
sys.modules["tokamax"] = None  # import tokamax now raises ImportError
from bench.runner import main
sys.exit(main(sys.argv[1:]))
"""


def test_quick_preset_writes_table_jsonl_and_plot(tmp_path):
  cmd = [sys.executable, "-c", HIDE_TOKAMAX, "--quick", "--cases", "fwd-causal-T128",
         "--impls", "jaxattn,jax.nn,tokamax,numpy", "--out", str(tmp_path)]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]

  table = (tmp_path / "results.md").read_text()
  assert "| case | implementation | ms | vs jax.nn |" in table
  assert "Not installed: tokamax" in table
  assert table in proc.stdout

  records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
  by_impl = {r["impl"]: r for r in records}
  assert {"jax.nn", "tokamax", "numpy"} <= set(by_impl)
  assert all(r["case"] == "fwd-causal-T128-B2-N4-K2-H32" for r in records)
  assert by_impl["tokamax"]["status"].startswith("not installed")
  for name, r in by_impl.items():
    if name == "tokamax":
      continue
    if name == "jaxattn.cudnn" and "needs a CUDA GPU backend" in r["status"]:
      assert r["status"].startswith("unsupported: "), r  # reported, not an error
      continue
    if name == "jaxattn.mosaic":  # float32 case; jax < 0.11 has no GPU interpreter
      assert r["status"].startswith("unsupported: mosaic:"), r
      continue
    assert r["status"] == "ok", r
    assert r["time_s"] > 0 and r["gflops_effective"] < r["gflops"]
    assert r["max_abs_err"] < 1e-4
    assert {"platform", "cpu_count", "jax", "device_kind", "git_commit"} <= set(r["machine"])
  for r in records:
    if r["framework"] == "jax" and r["status"] == "ok":
      assert r["lower_s"] > 0 and r["compile_s"] > 0 and r["temp_bytes"] > 0

  if importlib.util.find_spec("matplotlib"):
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("mask", specs.MASKS)
def test_attended_fraction_counts_the_dense_mask(mask):
  case = specs.Case("fwd", mask, T=37, B=3, N=4, K=2, H=8, window=5, documents=3)
  aux = {n: np.asarray(a) for n, a in specs.make_inputs(case).aux.items()}
  dense = specs.dense_mask(case, aux, np)
  expected = 1.0 if dense is None else np.broadcast_to(dense, (3, 1, 37, 37)).mean()
  assert specs.attended_fraction(case, aux) == pytest.approx(expected)


def test_case_names_filter_and_reject_bad_cases():
  names = [c.name for c in specs.select("default")]
  assert len(names) == len(set(names))
  assert "fwd-causal-T8192" in names and "fwdbwd-causal-T4096" in names
  assert [c.name for c in specs.select("default", "fwd-none-*")] == [
      "fwd-none-T1024", "fwd-none-T4096"]
  assert specs.select("default", "window,documents") == [
      specs.Case("fwd", "window", 4096), specs.Case("fwd", "documents", 4096)]
  with pytest.raises(ValueError, match="documents need T == S"):
    specs.Case("fwd", "documents", 8, S=16)


def _record(impl, time_s, *, peer=False, interpreted=False):
  return dict(case="fwd-causal-T128", family="fwd-causal", impl=impl, peer=peer, framework="jax",
              interpreted=interpreted, status="ok", time_s=time_s, T=128)


def test_interpreted_implementations_are_marked_and_never_ranked_fastest():
  from bench import report
  machine = dict(preset="quick", date="d", cpu="c", cpu_count=2, memory_gib=1, platform="p",
                 jax="j", device_kind="cpu", git_commit=None, git_dirty=None)
  records = [_record("jaxattn.pallas", 0.001, interpreted=True), _record("jaxattn.chunked", 0.004),
             _record("jax.nn", 0.008, peer=True)]
  text = report.table(records, machine)
  summary = next(line for line in text.splitlines() if line.startswith("| fwd-causal-T128 |"))
  assert summary.startswith("| fwd-causal-T128 | jaxattn.chunked | 4 | 2.00x | jax.nn |"), summary
  assert "Run in Pallas' interpreter here" in text and "interpreter (not ranked)" in text


def test_kernels_count_as_interpreted_only_off_their_accelerator():
  from bench import peers
  assert peers.interpreted("pallas", "cpu") and not peers.interpreted("pallas", "gpu")
  assert not peers.interpreted("chunked", "cpu") and not peers.interpreted("xla", "cpu")


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch, capsys):
  from bench import report
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
  machine = dict(preset="quick", date="d", cpu="c", cpu_count=2, memory_gib=1, platform="p",
                 jax="j", device_kind="cpu", git_commit=None, git_dirty=None)
  written = report.write([_record("jax.nn", 0.008, peer=True)], machine, str(tmp_path))
  assert not any(p.endswith(".png") for p in written)
  assert "pip install -e '.[bench]'" in capsys.readouterr().err


def test_compile_time_reports_both_sides_and_their_ratio(capsys):
  """`python -m bench.compile_time` at a tiny length: fresh processes for each side, a row
  per implementation with the trace/lower/compile split, and the ratio of medians."""
  from bench import compile_time
  assert compile_time.main(["--runs", "1", "--length", "64"]) == 0
  out = capsys.readouterr().out
  assert "| jax.nn |" in out and "| chunked |" in out
  rows = {line.split("|")[1].strip(): [float(x) for x in line.split("|")[2:6]]
          for line in out.splitlines() if line.startswith("| jax.nn") or line.startswith("| chunked")}
  for trace, lower, compile_, total in rows.values():
    assert 0 < compile_ < total and abs(trace + lower + compile_ - total) < 1e-2
  assert "chunked / jax.nn = " in out
