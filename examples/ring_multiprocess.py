"""Ring attention across two processes: 2 x 4 CPU devices on localhost.

Starts two copies of itself; each calls `jax.distributed.initialize` with the
coordinator at 127.0.0.1 on a free port and brings 4 CPU devices, so the mesh
has 8 devices in two processes and every `lax.ppermute` of the ring crosses
between processes at two of its 8 hops (CPU collectives through gloo, the
default `jax_cpu_collectives_implementation`). Each process builds its half of
a causal problem in the zigzag layout, runs `sharded_ring_attention` forward
and backward over the 8 devices, and checks its half of the output and
gradients against the same problem on one local device
(`dot_product_attention`).

    python examples/ring_multiprocess.py            # launches both processes
    python examples/ring_multiprocess.py --check    # same, exit status 1 on mismatch

The exit status is 0 when both processes agree with the single-device result
to 1e-5 (float32).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

NUM_PROCESSES = 2
LOCAL_DEVICES = 4
# (B, T, N, K, H): batch, global sequence, query heads, key/value heads, head dim.
SHAPE = (2, 128, 4, 2, 16)
TOLERANCE = 1e-5


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(timeout: float) -> int:
  """Starts the processes, relays their output, returns the worst exit status."""
  port = _free_port()
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # each process sets its own device count
  procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--process-id", str(i),
                             "--port", str(port)], env=env)
           for i in range(NUM_PROCESSES)]
  deadline = time.monotonic() + timeout
  codes = []
  for p in procs:
    try:
      codes.append(p.wait(timeout=max(deadline - time.monotonic(), 1)))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      print(f"ring_multiprocess: no answer after {timeout:.0f} s; processes killed", file=sys.stderr)
      return 124
  return max(codes, key=abs)


def worker(process_id: int, port: int) -> int:
  import jax

  jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=NUM_PROCESSES, process_id=process_id,
                             initialization_timeout=120)
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec

  import jaxattn
  from jaxattn.parallel import from_balanced_layout, sharded_ring_attention, to_balanced_layout

  P = jax.device_count()
  # One write per line: both processes share the parent's pipe, and print's
  # separate writes of prefix and text interleaved ("[process 1] [process 0]OK").
  def say(*a):
    sys.stdout.write(" ".join([f"[process {process_id}]", *map(str, a)]) + "\n")
    sys.stdout.flush()
  say(f"{jax.local_device_count()} local of {P} devices in {jax.process_count()} processes")
  B, T, N, K, H = SHAPE
  # Every process draws the same global problem from the same key (cheap at
  # this size) and keeps the rows its devices hold.
  keys = jax.random.split(jax.random.key(0), 5)
  cpu = jax.local_devices()[0]
  with jax.default_device(cpu):
    q = np.asarray(jax.random.normal(keys[0], (B, T, N, H)))
    k = np.asarray(jax.random.normal(keys[1], (B, T, K, H)))
    v = np.asarray(jax.random.normal(keys[2], (B, T, K, H)))
    d_out = np.asarray(jax.random.normal(keys[3], (B, T, N, H)))
    segments = np.sort(np.asarray(jax.random.randint(keys[4], (B, T), 0, 3)), axis=1)

    def single_device(q, k, v, seg):
      return jaxattn.dot_product_attention(q, k, v, is_causal=True, query_segment_ids=seg)
    ref, vjp = jax.vjp(lambda q, k, v: single_device(q, k, v, segments), q, k, v)
    ref_grads = vjp(d_out)

  mesh = jax.make_mesh((P,), ("seq",))
  layout = "zigzag"

  def global_array(x):
    """The laid-out global array, each process supplying its devices' rows."""
    x = to_balanced_layout(x, P, layout=layout)
    sharding = NamedSharding(mesh, PartitionSpec(None, "seq"))
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  qg, kg, vg, dg, sg = map(global_array, (q, k, v, d_out, segments))

  @jax.jit
  def ring(q, k, v, seg, d_out):
    f = lambda q, k, v: sharded_ring_attention(q, k, v, mesh=mesh, axis_name="seq",
                                               is_causal=True, layout=layout,
                                               query_segment_ids=seg)
    out, vjp = jax.vjp(f, q, k, v)
    return (out,) + vjp(d_out)

  results = ring(qg, kg, vg, sg, dg)
  worst = 0.0
  for name, got, want in zip(("output", "dq", "dk", "dv"), results, (ref,) + tuple(ref_grads)):
    want = to_balanced_layout(np.asarray(want), P, layout=layout)
    err = 0.0
    for shard in got.addressable_shards:  # this process's rows only
      err = max(err, float(np.max(np.abs(np.asarray(shard.data) - want[shard.index]))))
    worst = max(worst, err)
    say(f"{name}: max |ring - single device| over local shards = {err:.2e}")
  # The full output, back in token order, gathered to every process.
  from jax.experimental import multihost_utils
  out = from_balanced_layout(np.asarray(multihost_utils.process_allgather(results[0], tiled=True)),
                             P, layout=layout)
  say(f"gathered output {out.shape}, max |ring - single device| = "
      f"{float(np.max(np.abs(out - np.asarray(ref)))):.2e}")
  ok = worst <= TOLERANCE
  say("OK" if ok else f"MISMATCH (tolerance {TOLERANCE})")
  jax.distributed.shutdown()
  return 0 if ok else 1


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--process-id", type=int, default=None, help=argparse.SUPPRESS)
  p.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
  p.add_argument("--check", action="store_true", help="exit status 1 on mismatch (the default too)")
  p.add_argument("--timeout", type=float, default=300.0, help="seconds before the processes are killed")
  args = p.parse_args(argv)
  if args.process_id is None:
    return launch(args.timeout)
  return worker(args.process_id, args.port)


if __name__ == "__main__":
  sys.exit(main())
