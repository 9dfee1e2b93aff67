"""`python -m bench`: time every implementation on every case of a preset.

For each case and implementation, in one process so the ratios are fair:
  JAX      jax.jit(step).lower(...) and .compile() timed separately, temp
           memory from compiled.memory_analysis(), then one warm-up call;
           each timed call ends in jax.block_until_ready.
  torch    eager; warm-up; temp memory = peak allocation of one extra call
           (torch.profiler memory events) minus its outputs.
  numpy    as torch, with tracemalloc (numpy reports its buffers to it).
A case's implementations are then timed in interleaved rounds (one call of
each per round; medians), so that load drifting on a shared machine hits
every one of them alike; each timed call follows an untimed call of the
same implementation (see `_rounds`). The first call's outputs are
compared with the float64 reference on small cases. Failures are recorded
and the run goes on.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
import tracemalloc

import jax
import jaxlib
import numpy as np

from bench import peers, report, specs
from jaxattn import testing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (min repeats, max repeats, seconds of repeats to aim for) per preset.
TIMING = {"quick": (3, 10, 0.2), "default": (3, 10, 1.0), "long": (2, 5, 5.0)}
# Don't run a compiled function whose buffers exceed this share of free memory.
MEMORY_SHARE = 0.8


def _git(*args) -> str | None:
  try:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                          check=True, timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None


def _meminfo(field: str) -> int | None:
  """A /proc/meminfo field in bytes (None off Linux)."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def machine_info() -> dict:
  cpu = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
  except OSError:
    pass
  total = _meminfo("MemTotal")
  status = _git("status", "--porcelain")
  return dict(
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      platform=platform.platform(), python=platform.python_version(), cpu=cpu,
      cpu_count=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
      memory_gib=round(total / 2**30, 1) if total else None,
      jax=jax.__version__, jaxlib=jaxlib.__version__, backend=jax.default_backend(),
      device_kind=jax.devices()[0].device_kind, device_count=jax.device_count(),
      git_commit=_git("rev-parse", "HEAD"), git_dirty=bool(status) if status is not None else None)


def _status(exc: BaseException) -> str:
  """One line saying why a measurement has no time."""
  msg = (str(exc).strip().splitlines() or [""])[0][:160]
  if isinstance(exc, (peers.Unsupported, NotImplementedError)):
    return f"unsupported: {msg}"
  low = str(exc).lower()
  if isinstance(exc, TypeError) and "forward-mode" in low:  # jvp of a custom-VJP implementation
    return f"unsupported: custom VJP, no forward mode ({msg})"
  if isinstance(exc, MemoryError) or any(s in low for s in (
      "resource_exhausted", "out of memory", "can't allocate memory", "not enough memory")):
    return f"OOM: {msg}"
  return f"error: {type(exc).__name__}: {msg}"


def _rounds(calls, timing) -> list[list[float]]:
  """Times `calls` in interleaved rounds (one timed call of each per round).
  Each runs at least min_r and at most max_r times, stopping once it has run
  for `budget` seconds in all (so a slow peer stops early and the rest go on
  alternating). Each timed call comes right after an untimed call of the same
  implementation: a call that follows another implementation's measured
  1.5-1.7x slower (torch right after jax.nn freed its GiBs of logits), and a
  pause instead made short multithreaded calls ~1.7x slower (threads parked).
  Returns each call's times."""
  min_r, max_r, budget = timing
  times: list[list[float]] = [[] for _ in calls]
  more = lambda t: len(t) < max_r and (len(t) < min_r or sum(t) < budget)
  while any(more(t) for t in times):
    for call, t in zip(calls, times):
      if more(t):
        call()  # settles what the previous implementation left behind
        t0 = time.perf_counter()
        call()
        t.append(time.perf_counter() - t0)
  return times


def _max_error(outs, reference) -> float:
  return max(float(np.max(np.abs(o - r))) for o, r in zip(outs, reference))


def _nbytes(xs) -> int:
  return sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(xs))


def _torch_temp_bytes(call) -> int:
  """Peak bytes allocated during one call, minus the outputs it returns."""
  from torch.profiler import ProfilerActivity, profile
  with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
    outs = call()
  events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                  if e.name() == "[memory]")
  live = peak = 0
  for _, n in events:
    live += n
    peak = max(peak, live)
  return max(0, peak - sum(x.numel() * x.element_size() for x in outs))


def _numpy_temp_bytes(call) -> int:
  tracemalloc.start()
  try:
    outs = call()
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  return max(0, peak - _nbytes(outs))


def prepare(impl: peers.Impl, build, case: specs.Case, inputs: specs.Inputs, reference):
  """(record, call): `impl` built, compiled and run once on `case` (compile
  time, memory and error in the record), and the call to time; call is None
  when it cannot run (the record's status says why)."""
  rec = {}
  try:
    runnable = build(case, inputs)
    args = runnable.args
    if impl.framework == "jax":
      t0 = time.perf_counter()
      lowered = jax.jit(runnable.step).lower(*args)
      t1 = time.perf_counter()
      compiled = lowered.compile()
      rec.update(lower_s=t1 - t0, compile_s=time.perf_counter() - t1)
      mem = compiled.memory_analysis()
      if mem is not None:
        rec["temp_bytes"] = int(mem.temp_size_in_bytes)
      if case.compile_only:
        return dict(rec, status="compile-only"), None
      free = _meminfo("MemAvailable")
      need = (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
              if mem is not None else 0)
      if free and need > MEMORY_SHARE * free:
        return dict(rec, status=f"skipped: needs {need / 2**30:.1f} GiB, "
                    f"{free / 2**30:.1f} GiB available"), None
      call = lambda: jax.block_until_ready(compiled(*args))
    else:
      if case.compile_only:
        return dict(rec, status="skipped: compile-only case"), None
      call = lambda: runnable.step(*args)
    outs = call()  # warm-up
    if reference is not None:
      rec["max_abs_err"] = _max_error(runnable.to_numpy(outs), reference)
    del outs
    if impl.framework == "torch":
      rec["temp_bytes"] = _torch_temp_bytes(call)
    elif impl.framework == "numpy":
      rec["temp_bytes"] = _numpy_temp_bytes(call)
  except Exception as exc:  # a peer failing must not end the run
    return dict(rec, status=_status(exc)), None
  return rec, call


def timed(rec: dict, times: list[float], case: specs.Case, inputs: specs.Inputs) -> dict:
  """`rec` with its median time and rates."""
  median = float(np.median(times))
  fraction = specs.attended_fraction(case, inputs.aux)
  return dict(rec, status="ok", time_s=median, times_s=times,
              gflops=case.flops / median / 1e9, gflops_effective=case.flops * fraction / median / 1e9,
              attended_fraction=fraction)


def _reference(case: specs.Case, inputs: specs.Inputs):
  if not case.small or case.mode == "jvp":  # jvp: compared in tests/test_chunked_jvp.py
    return None
  q, k, v, aux, d_out = inputs
  kwargs = specs.jaxattn_kwargs(case, aux)
  out = testing.reference_attention(q, k, v, **kwargs)
  if case.mode == "fwd":
    return [out]
  grads = testing.reference_attention_vjp(q, k, v, d_out=d_out, **kwargs)
  return [out, grads["query"], grads["key"], grads["value"]]


class Progress:
  """A one-line progress bar on stderr (a line per step when not a terminal)."""

  def __init__(self, total: int):
    self.total, self.done, self.start = total, 0, time.perf_counter()
    self.tty = sys.stderr.isatty()

  def show(self, text: str, step: bool = False):
    self.done += step
    filled = 20 * self.done // max(self.total, 1)
    elapsed = int(time.perf_counter() - self.start)
    line = (f"[{'#' * filled}{'.' * (20 - filled)}] {self.done}/{self.total} "
            f"{elapsed // 60}:{elapsed % 60:02d} {text}")
    if self.tty:
      sys.stderr.write("\r" + line[:150].ljust(150))
    elif step:
      sys.stderr.write(line + "\n")
    sys.stderr.flush()

  def close(self):
    if self.tty:
      sys.stderr.write("\n")


def _describe(rec: dict) -> str:
  if rec["status"] != "ok":
    return rec["status"][:70]
  err = f", err {rec['max_abs_err']:.1e}" if "max_abs_err" in rec else ""
  return f"{rec['time_s'] * 1e3:.3g} ms{err}"


def run(preset: str, case_patterns=None, impl_patterns=None) -> list[dict]:
  """Runs the preset's matching cases on the matching implementations."""
  cases = specs.select(preset, case_patterns)
  impls = [i for i in peers.implementations() if specs.matches(i.name, impl_patterns)]
  loaded = {}
  for impl in impls:
    try:
      loaded[impl.name] = impl.load()
    except ImportError as exc:
      loaded[impl.name] = f"not installed ({exc.name or exc})"
    except Exception as exc:
      loaded[impl.name] = _status(exc)
  records = []
  progress = Progress(len(cases) * len(impls))
  for case in cases:
    progress.show(f"{case.name}: inputs and float64 reference")
    inputs = specs.make_inputs(case)
    reference = _reference(case, inputs)
    case_recs, calls = [], []
    for impl in impls:
      base = dict(case=case.name, family=case.family, impl=impl.name, peer=impl.is_peer,
                  framework=impl.framework, interpreted=impl.interpreted, **{f: getattr(case, f) for f in (
                      "mode", "mask", "B", "T", "S", "N", "K", "H", "dtype")},
                  flops=case.flops)
      call = None
      if isinstance(loaded[impl.name], str):
        rec = dict(base, status=loaded[impl.name])
      else:
        version, build = loaded[impl.name]
        progress.show(f"{case.name} {impl.name}: compiling ...")
        rec, call = prepare(impl, build, case, inputs, reference)
        rec = dict(base, version=version, **rec)
      case_recs.append(rec)
      calls.append(call)
    runnable = [i for i, c in enumerate(calls) if c is not None]
    progress.show(f"{case.name}: timing {len(runnable)} in interleaved rounds ...")
    errors: dict[int, Exception] = {}

    def guarded(i, f):
      def call():  # a peer failing in a timed call is recorded; the others go on
        if i not in errors:
          try:
            f()
          except Exception as exc:
            errors[i] = exc
      return call

    times = _rounds([guarded(i, calls[i]) for i in runnable], TIMING[preset])
    for i, t in zip(runnable, times):
      rec = case_recs[i]
      case_recs[i] = (dict(rec, status=_status(errors[i])) if i in errors
                      else timed(rec, t, case, inputs))
    for rec in case_recs:
      records.append(rec)
      progress.show(f"{case.name} {rec['impl']}: {_describe(rec)}", step=True)
    del inputs, reference, calls
  progress.close()
  return records


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
  size = parser.add_mutually_exclusive_group()
  size.add_argument("--quick", action="store_const", dest="preset", const="quick",
                    help="small shapes, under a minute on 2 CPU cores (smoke test)")
  size.add_argument("--long", action="store_const", dest="preset", const="long",
                    help="the default cases plus lengths until peers run out of memory")
  parser.set_defaults(preset="default")
  parser.add_argument("--cases", help="comma-separated names, globs or substrings of cases")
  parser.add_argument("--impls",
                      help="comma-separated names, globs or substrings of implementations")
  parser.add_argument("--baseline", default="jax.nn",
                      help="implementation the speedups are relative to (default jax.nn)")
  parser.add_argument("--out", default=os.path.join(ROOT, "bench", "out"), help="output folder")
  parser.add_argument("--list", action="store_true",
                      help="list the cases and implementations, run nothing")
  args = parser.parse_args(argv)

  if args.list:
    for case in specs.select(args.preset, args.cases):
      print(case.name)
    for impl in peers.implementations():
      if specs.matches(impl.name, args.impls):
        print(impl.name)
    return 0
  names = [impl.name for impl in peers.implementations()]
  if args.baseline not in names:
    parser.error(f"--baseline must be one of {', '.join(names)}; got {args.baseline!r}.")
  if not specs.select(args.preset, args.cases):
    parser.error(f"no case of the {args.preset} preset matches --cases {args.cases!r}; see --list.")
  records = run(args.preset, args.cases, args.impls)
  machine = dict(machine_info(), preset=args.preset)
  for path in report.write(records, machine, args.out, args.baseline):
    print(f"wrote {path}", file=sys.stderr)
  print(report.table(records, machine, args.baseline))
  failed = [r for r in records if not r["peer"] and r["status"].startswith(("error", "OOM"))]
  return 1 if failed else 0
