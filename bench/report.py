"""The benchmark's outputs: a markdown table, JSON lines and a PNG plot.

Ratios are speedups, computed per case within one run: `vs <baseline>` is
baseline time / time (above 1: faster than the baseline) and `vs best peer`
is the fastest peer's time / time.
"""

from __future__ import annotations

import json
import os
import sys

NAMES = ("results.md", "results.jsonl", "results.png")


def _ok(rec) -> bool:
  return rec["status"] == "ok"


def _ranked(rec) -> bool:
  """Measured and comparable: an implementation run in Pallas' interpreter is not."""
  return _ok(rec) and not rec.get("interpreted", False)


def _by_case(records) -> dict[str, list[dict]]:
  cases: dict[str, list[dict]] = {}
  for rec in records:
    cases.setdefault(rec["case"], []).append(rec)
  return cases


def _note(rec) -> str:
  if not _ok(rec):
    return rec["status"]
  return "interpreter (not ranked)" if rec.get("interpreted") else ""


def _ratio(num, den) -> str:
  return f"{num / den:.2f}x" if num and den else "-"


def _g(x, fmt=".3g") -> str:
  return "-" if x is None else format(x, fmt)


def _mib(n) -> str:
  return "-" if n is None else f"{n / 2**20:.3g}"


def table(records: list[dict], machine: dict, baseline: str = "jax.nn") -> str:
  """Markdown: a header, one summary row per case, then every measurement."""
  missing = sorted({r["impl"] for r in records if r["status"].startswith("not installed")})
  lines = [
      f"Preset `{machine['preset']}`, {machine['date']}: {machine['cpu']} "
      f"({machine['cpu_count']} cores, {machine['memory_gib']} GiB), {machine['platform']}; "
      f"jax {machine['jax']} on {machine['device_kind']}; commit "
      f"{(machine['git_commit'] or '?')[:10]}{' (dirty)' if machine['git_dirty'] else ''}.",
  ]
  if missing:
    lines.append(f"Not installed: {', '.join(missing)} (`pip install -e '.[bench]'`).")
  interpreted = sorted({r["impl"] for r in records if r.get("interpreted")})
  if interpreted:
    lines.append(f"Run in Pallas' interpreter here (GPU/TPU kernels; marked, never ranked "
                 f"fastest): {', '.join(interpreted)}.")
  lines.append(f"Speedups: `vs {baseline}` = {baseline} time / time, `vs best peer` = fastest "
               "peer's time / time; above 1 is faster. GFLOP/s: dense-equivalent "
               "(4BNTSH, x3.5 for fwdbwd, x2.5 for jvp) and effective (masked logits not counted).")
  summary = ["", f"| case | fastest jaxattn | ms | vs {baseline} | fastest peer | ms | vs best peer |",
             "|---|---|---:|---:|---|---:|---:|"]
  detail = ["", f"| case | implementation | ms | vs {baseline} | vs best peer | lower s | compile s "
            "| GFLOP/s | eff. GFLOP/s | temp MiB | max abs err | note |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
  for case, recs in _by_case(records).items():
    done = [r for r in recs if _ranked(r)]
    base = next((r["time_s"] for r in done if r["impl"] == baseline), None)
    ours = min((r for r in done if not r["peer"]), key=lambda r: r["time_s"], default=None)
    peer = min((r for r in done if r["peer"]), key=lambda r: r["time_s"], default=None)
    best_peer = peer and peer["time_s"]
    summary.append(
        f"| {case} | {ours['impl'] if ours else '-'} | {_g(ours and ours['time_s'] * 1e3)} "
        f"| {_ratio(base, ours and ours['time_s'])} | {peer['impl'] if peer else '-'} "
        f"| {_g(best_peer and best_peer * 1e3)} | {_ratio(best_peer, ours and ours['time_s'])} |")
    for r in sorted(recs, key=lambda r: (not _ok(r), r.get("time_s", 0))):
      if r["status"].startswith("not installed"):
        continue
      t = r.get("time_s")
      detail.append(
          f"| {case} | {r['impl']} | {_g(t and t * 1e3)} | {_ratio(base, t)} | {_ratio(best_peer, t)} "
          f"| {_g(r.get('lower_s'), '.2f')} | {_g(r.get('compile_s'), '.2f')} | {_g(r.get('gflops'))} "
          f"| {_g(r.get('gflops_effective'))} | {_mib(r.get('temp_bytes'))} "
          f"| {_g(r.get('max_abs_err'), '.1e')} | {_note(r)} |")
  return "\n".join(lines + summary + detail) + "\n"


def plot(records: list[dict], path: str) -> bool:
  """Time and temp memory against T, log-log, one line per implementation.

  One row per family of cases that differ only in T (the families with at
  least two lengths, or all if none has). False if matplotlib is missing.
  """
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
  except ImportError:
    return False
  families: dict[str, list[dict]] = {}
  for rec in records:
    families.setdefault(rec["family"], []).append(rec)
  lengths = lambda recs: len({r["T"] for r in recs})
  shown = {f: r for f, r in families.items() if lengths(r) > 1} or families
  fig, axes = plt.subplots(len(shown), 2, figsize=(11, 3.6 * len(shown)), squeeze=False)
  for row, (family, recs) in zip(axes, shown.items()):
    for impl in dict.fromkeys(r["impl"] for r in recs):
      mine = sorted((r for r in recs if r["impl"] == impl), key=lambda r: r["T"])
      times = [(r["T"], r["time_s"] * 1e3) for r in mine if _ok(r)]
      mems = [(r["T"], r["temp_bytes"] / 2**20) for r in mine if r.get("temp_bytes")]
      label = impl + (" (interpreter)" if any(r.get("interpreted") for r in mine) else "")
      style = dict(marker="o", linestyle="-" if impl.startswith("jaxattn.") else "--", label=label)
      for ax, points in zip(row, (times, mems)):
        if points:
          ax.plot(*zip(*points), **style)
    for ax, what in zip(row, ("time (ms)", "temp memory (MiB)")):
      ax.set(xscale="log", yscale="log", xlabel="T (= S)", ylabel=what, title=f"{family}: {what}")
      ts = sorted({r["T"] for r in recs})
      ax.set_xticks(ts, [str(t) for t in ts])
      ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
      ax.grid(True, which="both", alpha=0.3)
    row[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return True


def write(records: list[dict], machine: dict, out_dir: str, baseline: str = "jax.nn") -> list[str]:
  """Writes the table, the JSON lines (one per measurement, with `machine`)
  and the plot into `out_dir`; returns the paths written."""
  os.makedirs(out_dir, exist_ok=True)
  md, jsonl, png = (os.path.join(out_dir, n) for n in NAMES)
  with open(md, "w") as f:
    f.write(table(records, machine, baseline))
  with open(jsonl, "w") as f:
    for rec in records:
      f.write(json.dumps(dict(rec, machine=machine)) + "\n")
  written = [md, jsonl]
  if plot(records, png):
    written.append(png)
  else:
    print("matplotlib is not installed: no plot written (it comes with the bench extra: "
          "pip install -e '.[bench]', or pip install matplotlib).", file=sys.stderr)
  return written
