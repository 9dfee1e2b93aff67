"""Issue 12's GPU target table: every row timed in one process, targets marked met/missed.

`python -m bench.gpu_targets` (bench/gpu.sh step 4) on a GPU: the target
shape bf16 B=2 T=S=8192 N=K=16 H=128 (causal fwd, causal fwd+bwd, dense fwd),
8 packed causal documents and soft-cap 30 causal (fwd, fwd+bwd), for
jaxattn's default / "cudnn" / "pallas" / "pallas" (128, 128) / "mosaic" /
"chunked", jax.nn cudnn and xla, tokamax mosaic / triton / cudnn and torch
SDPA where installed; the bf16 matmul rate; then the targets as same-run
ratios. `--dry-run` shrinks every shape so the script runs on CPU (mosaic in
Pallas' GPU interpreter, GPU-only rows reported as refused): a check of the
script, its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxattn
from bench import specs


def median_time(f, *args, reps):
  f = jax.jit(f)
  jax.block_until_ready(f(*args))  # compile and warm up
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def _case_kwargs(name, aux):
  if name == "causal":
    return dict(is_causal=True)
  if name == "dense":
    return {}
  if name == "documents":
    return dict(is_causal=True, query_segment_ids=aux["segment_ids"])
  return dict(is_causal=True, logits_soft_cap=30.0)


def _peer_kwargs(name, aux, T):
  """The same problem in jax.nn / tokamax arguments (documents as a dense mask)."""
  if name == "documents":
    seg = aux["segment_ids"]
    i = jnp.arange(T)
    mask = (seg[:, :, None] == seg[:, None, :]) & (i[None, None, :] <= i[None, :, None])
    return dict(mask=mask[:, None])
  kw = dict(is_causal=name != "dense")
  if name == "softcap":
    kw["logits_soft_cap"] = 30.0
  return kw


def attention_fns(T):
  """name -> (case name, q, k, v, aux) -> attention function, or raises."""
  fns = {}

  def jaxattn_fn(implementation, **opts):
    return lambda case, aux: (lambda q, k, v: jaxattn.dot_product_attention(
        q, k, v, implementation=implementation, **_case_kwargs(case, aux), **opts))

  fns["jaxattn default"] = jaxattn_fn(None)
  for name in ("cudnn", "pallas", "mosaic", "chunked"):
    fns[f"jaxattn {name}"] = jaxattn_fn(name)
  fns["jaxattn pallas (128, 128)"] = jaxattn_fn("pallas", block_sizes=(128, 128))

  def jax_nn(implementation):
    def make(case, aux):
      if case == "softcap":
        raise NotImplementedError("jax.nn has no logits soft-cap")
      kw = _peer_kwargs(case, aux, T)
      return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation=implementation, **kw)
    return make

  fns["jax.nn cudnn"] = jax_nn("cudnn")
  fns["jax.nn xla"] = jax_nn("xla")
  try:
    import tokamax  # noqa: PLC0415
    from absl import flags  # noqa: PLC0415
    if not flags.FLAGS.is_parsed():
      flags.FLAGS(["bench"])
    for impl in ("mosaic", "triton", "cudnn"):
      fns[f"tokamax {impl}"] = (lambda impl: lambda case, aux: (
          lambda q, k, v: tokamax.dot_product_attention(q, k, v, implementation=impl,
                                                        **_peer_kwargs(case, aux, T))))(impl)
  except ImportError as exc:
    print(f"tokamax not installed ({exc}): its rows are skipped")
  return fns


def torch_sdpa_time(case, arrays, mode, reps):
  """torch SDPA on CUDA, or raises (ImportError, NotImplementedError)."""
  import torch  # noqa: PLC0415
  if not torch.cuda.is_available():
    raise NotImplementedError("torch has no CUDA device")
  if case == "softcap":
    raise NotImplementedError("torch SDPA has no logits soft-cap")
  F = torch.nn.functional
  q, k, v, do, seg = (torch.from_numpy(np.asarray(x, np.float32)).cuda() for x in arrays)
  q, k, v, do = (x.to(torch.bfloat16).transpose(1, 2).contiguous() for x in (q, k, v, do))
  mask = None
  if case == "documents":
    T = q.shape[2]
    i = torch.arange(T, device="cuda")
    mask = ((seg[:, :, None] == seg[:, None, :]) & (i[None, None, :] <= i[None, :, None]))[:, None]

  def run():
    if mode == "fwd":
      with torch.no_grad():
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=case == "causal")
    else:
      qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
      out = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, is_causal=case == "causal")
      torch.autograd.grad(out, (qq, kk, vv), do)
    torch.cuda.synchronize()

  run()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m bench.gpu_targets", description=__doc__.splitlines()[0])
  parser.add_argument("--dry-run", action="store_true", help="tiny shapes, any backend: checks the script")
  parser.add_argument("--reps", type=int, default=10)
  args = parser.parse_args(argv)
  if args.dry_run:
    B, T, N, H, reps = 1, 128, 2, 64, 1
  else:
    B, T, N, H, reps = 2, 8192, 16, 128, args.reps
  dtype = jnp.bfloat16
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}; bf16 B={B} T=S={T} N=K={N} H={H}"
        + ("  (DRY RUN: numbers mean nothing)" if args.dry_run else ""))
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, do = (jax.random.normal(kk, (B, T, N, H), jnp.float32).astype(dtype) for kk in keys)
  case_docs = specs.Case("fwd", "causal_documents", T, B=B, N=N, K=N, H=H, documents=8)
  aux = specs.make_inputs(case_docs).aux
  causal_flops = 4.0 * B * N * T * T * H * (T + 1) / (2 * T)

  n = 1024 if args.dry_run else 8192
  a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
  rate = 2.0 * n ** 3 / median_time(
      lambda a: jnp.dot(a, a, preferred_element_type=jnp.float32).astype(dtype), a, reps=max(reps, 3))
  print(f"measured bf16 matmul rate: {rate / 1e12:.2f} TFLOP/s ({n}^3)")

  columns = [("causal", "fwd"), ("causal", "fwdbwd"), ("dense", "fwd"),
             ("documents", "fwd"), ("documents", "fwdbwd"), ("softcap", "fwd"), ("softcap", "fwdbwd")]
  fns = attention_fns(T)
  times: dict[str, dict] = {}
  for name, make in fns.items():
    row = times.setdefault(name, {})
    for case, mode in columns:
      try:
        f = make(case, aux)
        if mode == "fwdbwd":
          g = f
          f = lambda q, k, v, do, g=g: jax.vjp(g, q, k, v)[1](do)
          row[(case, mode)] = median_time(f, q, k, v, do, reps=reps)
        else:
          row[(case, mode)] = median_time(f, q, k, v, reps=reps)
      except Exception as exc:  # report and go on: one failure must not hide the others
        row[(case, mode)] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:90] if str(exc) else ''}"
  row = times.setdefault("torch SDPA", {})
  for case, mode in columns:
    try:
      row[(case, mode)] = torch_sdpa_time(case, (q, k, v, do, aux["segment_ids"]), mode, reps)
    except Exception as exc:
      row[(case, mode)] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:90] if str(exc) else ''}"

  print("\n| ms | " + " | ".join(f"{c} {m}" for c, m in columns) + " |")
  print("|---|" + "---:|" * len(columns))
  refusals = []
  for name, row in times.items():
    cells = []
    for col in columns:
      t = row.get(col)
      if isinstance(t, float):
        cells.append(f"{t * 1e3:.3g}")
      else:
        cells.append("-")
        refusals.append(f"{name} {col[0]} {col[1]}: {t}")
    print(f"| {name} | " + " | ".join(cells) + " |")
  print("\nnot run:\n  " + "\n  ".join(refusals) if refusals else "")

  def t(name, case, mode):
    x = times.get(name, {}).get((case, mode))
    return x if isinstance(x, float) else None

  cudnn = lambda case, mode: t("jax.nn cudnn", case, mode)
  # the documents' kept logits relative to plain causal (~1/8 for 8 documents)
  kept = (specs.attended_fraction(case_docs, {"segment_ids": np.asarray(aux["segment_ids"])})
          / specs.attended_fraction(specs.Case("fwd", "causal", T), {}))
  targets = [
      ("mosaic causal fwd >= 1.0x cuDNN", cudnn("causal", "fwd"), t("jaxattn mosaic", "causal", "fwd"), 1.0),
      ("mosaic causal fwd+bwd >= 0.9x cuDNN", cudnn("causal", "fwdbwd"), t("jaxattn mosaic", "causal", "fwdbwd"), 0.9),
      ("mosaic dense fwd >= 0.95x cuDNN", cudnn("dense", "fwd"), t("jaxattn mosaic", "dense", "fwd"), 0.95),
      ("mosaic causal fwd >= 60% of the matmul rate",
       causal_flops / rate, t("jaxattn mosaic", "causal", "fwd"), 0.6),
      ("documents (default) within 1.5x of cuDNN causal x kept fraction",
       None if cudnn("causal", "fwd") is None else cudnn("causal", "fwd") * kept * 1.5,
       t("jaxattn default", "documents", "fwd"), 1.0),
      ("soft-cap (default) fwd within 1.1x of plain causal on the same implementation",
       None if t("jaxattn default", "causal", "fwd") is None else 1.1 * t("jaxattn default", "causal", "fwd"),
       t("jaxattn default", "softcap", "fwd"), 1.0),
      ("soft-cap (default) fwd >= 1.0x tokamax mosaic", t("tokamax mosaic", "softcap", "fwd"),
       t("jaxattn default", "softcap", "fwd"), 1.0),
      ("soft-cap (default) fwd+bwd >= 1.0x tokamax mosaic", t("tokamax mosaic", "softcap", "fwdbwd"),
       t("jaxattn default", "softcap", "fwdbwd"), 1.0),
      ("pallas causal fwd >= 1.0x tokamax triton", t("tokamax triton", "causal", "fwd"),
       t("jaxattn pallas", "causal", "fwd"), 1.0),
      ("pallas causal fwd+bwd >= 1.0x tokamax triton", t("tokamax triton", "causal", "fwdbwd"),
       t("jaxattn pallas", "causal", "fwdbwd"), 1.0),
  ]
  print()
  for what, their, ours, want in targets:
    if their is None or ours is None:
      print(f"target {what}: UNMEASURED (a row did not run)")
    else:
      verdict = "(dry run)" if args.dry_run else ("MET" if their / ours >= want else "MISSED")
      print(f"target {what}: {their / ours:.2f} -> {verdict}")
  for case, mode in columns:  # "faster than every peer on the same case"
    ours = t("jaxattn default", case, mode)
    peers = {n: t(n, case, mode) for n in times if not n.startswith("jaxattn")}
    peers = {n: x for n, x in peers.items() if x is not None}
    if ours is not None and peers and case in ("documents", "softcap"):
      best = min(peers, key=peers.get)
      print(f"target {case} {mode} faster than every peer: best peer {best} {peers[best] * 1e3:.3g} ms "
            f"vs {ours * 1e3:.3g} ms -> {'(dry run)' if args.dry_run else 'MET' if ours <= peers[best] else 'MISSED'}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
