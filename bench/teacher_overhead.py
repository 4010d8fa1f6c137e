"""Teacher serving overhead: gRPC-served vs in-process throughput, side by side.

Serves ``teacher_server.zoo:resnet18_cifar`` (ResNet-18 on 3x32x32) from a real
``python -m teacher_server serve`` subprocess and calls it at batch 64, one
batch at a time, in three modes interleaved round by round (the order
rotates), so machine noise hits all alike:

* ``inprocess``: the same model (same weights) called in this process under
  ``torch.inference_mode()``;
* ``served``: a :class:`student_client.TeacherPool` with default settings,
  i.e. what a student on the same machine gets: the same-host local
  transport (:mod:`student_client.local`; the batch, in private memory, is
  copied once into shared memory);
* ``served_grpc``: a plain gRPC client (request encoded per call with the
  codec), what a student on another machine pays.

Prints one JSON object per measured round, then a summary object whose
``ratio`` = the median over rounds of served / in-process throughput within
the round (``ratio_grpc`` the same for ``served_grpc``; ``ratio_of_medians``
the ratio of the modes' median throughputs). Target >= 0.95.

    python bench/teacher_overhead.py [--rounds 30] [--batches 1] [--width 64]

Findings on the 2-core dev box (shared with other jobs, so noisy):
* glibc malloc thresholds matter most: without them a conv forward is 2-4x
  slower in either mode; the server sets them itself (_malloc.py) and this
  script re-execs itself with the same env so the baseline is fair.
* Transport (encode, gRPC, decode) costs ~8 ms per 64x3x32x32 batch.
* The served forward used to be ~25-40% slower than in-process (ratio ~0.71
  with 2 torch threads, ~0.96 with 1). Not gRPC threads competing for the
  cores (per-thread CPU of the server: event loop and gRPC pollers ~1%), but
  malloc: the forward runs in a worker thread, whose glibc arena is made of
  64 MiB mmap'ed sub-heaps that are munmap'ed as soon as they are empty,
  whatever the trim threshold. strace showed 64 MiB munmaps and the server
  took ~20k minor page faults per batch (in-process: ~0). MALLOC_ARENA_MAX=1
  (now part of the server's tuning) brings it to ~0. Each line below reports
  ``minflt_per_batch`` for both modes so a regression is visible.
* OpenMP spin-waiting: libgomp spins at barriers only while a process has
  no more OpenMP threads than CPUs. The server has two teams (warm-up and
  forward thread) and waits passively; the in-process baseline spun, and
  when other jobs loaded the box it ran up to 2.8x slower than the served
  forward (ratio ~2). Both processes now run with the same
  ``OMP_WAIT_POLICY`` (PASSIVE by default, ``--omp-wait-policy``).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402
import torch  # noqa: E402

from protos import codec  # noqa: E402
from protos.edistill.v1 import teacher_pb2 as pb  # noqa: E402
from protos.edistill.v1 import teacher_pb2_grpc as pb_grpc  # noqa: E402
from teacher_server import DEFAULT_MAX_MESSAGE_BYTES, zoo  # noqa: E402
from student_client import SourceRequest, TeacherPool  # noqa: E402
from tests.helpers.teacher_proc import TeacherProcess  # noqa: E402

# glibc returns large freed blocks to the OS with munmap and gets fresh zeroed
# pages on the next malloc; the server tunes this itself (teacher_server/_malloc.py),
# and both processes here get the same settings as environment variables.
from teacher_server._malloc import MALLOC_ENV  # noqa: E402


def _emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--batches", type=int, default=1, help="batches per mode per round")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--width", type=int, default=64, help="ResNet base width (64 = ResNet-18)")
    p.add_argument("--no-malloc-env", action="store_true", help="leave glibc malloc thresholds at defaults")
    p.add_argument("--torch-threads", type=int, default=None, help="intra-op threads, both modes")
    p.add_argument("--malloc-arena-max", type=int, default=int(MALLOC_ENV["MALLOC_ARENA_MAX"]),
                   help="MALLOC_ARENA_MAX for both processes (0 = glibc default, which shows the old gap)")
    p.add_argument("--omp-wait-policy", default="PASSIVE",
                   help='OMP_WAIT_POLICY for both processes ("" = libgomp default; see bench/_common.py)')
    opts = p.parse_args(argv)
    MALLOC_ENV["MALLOC_ARENA_MAX"] = str(opts.malloc_arena_max)
    want = {} if opts.no_malloc_env else dict(MALLOC_ENV)
    want["OMP_WAIT_POLICY"] = opts.omp_wait_policy or os.environ.get("OMP_WAIT_POLICY", "")
    if any(os.environ.get(k, "") != v for k, v in want.items()):
        # glibc and libgomp read these at process start: re-exec so the in-process
        # baseline runs with the same settings as the server (a fair comparison).
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **want})

    if opts.torch_threads:
        torch.set_num_threads(opts.torch_threads)
    kwargs = json.dumps({"width": opts.width})
    net = zoo.resnet18_cifar(width=opts.width).eval()  # same seed -> same weights as the server's
    x = torch.randn(opts.batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    server_args = ["--model-kwargs", kwargs, "--max-batch-size", str(opts.batch_size),
                   "--max-queue-delay-ms", "0"]
    if opts.torch_threads:
        server_args += ["--torch-threads", str(opts.torch_threads)]
    # --no-malloc-env: both processes on glibc defaults (the server would
    # otherwise tune itself with mallopt, see teacher_server/_malloc.py).
    env = {"EDISTILL_MALLOC_TUNING": "0"} if opts.no_malloc_env else MALLOC_ENV
    config = {"model": "resnet18_cifar", "width": opts.width, "batch_size": opts.batch_size,
              "torch_threads": torch.get_num_threads(), "malloc_env": not opts.no_malloc_env,
              "malloc_arena_max": None if opts.no_malloc_env else opts.malloc_arena_max,
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
              "cpus": os.cpu_count(), "torch": torch.__version__}
    _emit({"config": config})

    with TeacherProcess("teacher_server.zoo:resnet18_cifar", *server_args, env=env) as proc, \
            grpc.insecure_channel(proc.address, options=[
                ("grpc.max_send_message_length", DEFAULT_MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE_BYTES)]) as channel, \
            TeacherPool([proc.address]) as pool:
        stub = pb_grpc.TeacherStub(channel)
        server_ms: list[float] = []  # forward + transforms, measured inside the server

        def served_batch() -> torch.Tensor:
            # Encode per call, as a student would for each new batch.
            req = pb.PredictRequest()
            codec.encode(x, req.inputs.add(), name="image")
            resp = stub.Predict(req, timeout=120)
            server_ms.append(resp.compute_ms)
            return codec.to_torch(resp.outputs[0].values)

        def pool_batch() -> torch.Tensor:
            return pool.submit(SourceRequest({"image": x}, None)).result(timeout=120)["logits"]

        def local_batch() -> torch.Tensor:
            with torch.inference_mode():
                return net(x)

        # Warm-up all, and check the served answers are the in-process answer.
        local = local_batch()
        max_diff = 0.0
        for fn in (served_batch, pool_batch):
            max_diff = max(max_diff, (fn() - local).abs().max().item())
        assert max_diff < 1e-3, f"served and in-process outputs differ by {max_diff}"
        deadline = time.monotonic() + 30
        while pool.stats().teachers[proc.address].transport != "local" and time.monotonic() < deadline:
            pool_batch()  # the pool switches to the local socket after its first answers
        transport = pool.stats().teachers[proc.address].transport
        local_batch(), served_batch(), pool_batch()

        def minflt() -> dict[str, int]:
            with open(f"/proc/{proc.pid}/stat") as f:
                server = int(f.read().rsplit(")", 1)[1].split()[7])  # field 10: minflt
            return {"inprocess": resource.getrusage(resource.RUSAGE_SELF).ru_minflt, "served": server,
                    "served_grpc": server}

        modes = ("inprocess", "served", "served_grpc")
        rates: dict[str, list[float]] = {m: [] for m in modes}
        fns = {"inprocess": local_batch, "served": pool_batch, "served_grpc": served_batch}
        for r in range(opts.rounds):
            for mode in modes[r % 3:] + modes[:r % 3]:
                del server_ms[:]
                f0 = minflt()[mode]  # page faults of the process doing the forward pass
                t0 = time.perf_counter()
                for _ in range(opts.batches):
                    fns[mode]()
                dt = time.perf_counter() - t0
                faults = minflt()[mode] - f0
                rate = opts.batches * opts.batch_size / dt
                rates[mode].append(rate)
                line = {"round": r, "mode": mode, "samples_per_s": round(rate, 2),
                        "ms_per_batch": round(1000 * dt / opts.batches, 2),
                        "minflt_per_batch": round(faults / opts.batches)}
                if mode == "served_grpc":
                    line["server_compute_ms"] = round(statistics.mean(server_ms), 2)
                _emit(line)

    inproc = statistics.median(rates["inprocess"])
    served_rate = statistics.median(rates["served"])
    grpc_rate = statistics.median(rates["served_grpc"])
    per_round = [s / i for s, i in zip(rates["served"], rates["inprocess"])]
    per_round_grpc = [s / i for s, i in zip(rates["served_grpc"], rates["inprocess"])]
    _emit({"summary": True, **config, "rounds": opts.rounds, "batches_per_round": opts.batches,
           "served_transport": transport,
           "inprocess_samples_per_s": round(inproc, 2), "served_samples_per_s": round(served_rate, 2),
           "served_grpc_samples_per_s": round(grpc_rate, 2),
           "ratio": round(statistics.median(per_round), 4), "ratio_of_medians": round(served_rate / inproc, 4),
           "ratio_per_round_min": round(min(per_round), 4), "ratio_per_round_max": round(max(per_round), 4),
           "ratio_grpc": round(statistics.median(per_round_grpc), 4),
           "ratio_grpc_of_medians": round(grpc_rate / inproc, 4),
           "max_abs_diff": max_diff, "target": 0.95})
    return 0


if __name__ == "__main__":
    sys.exit(main())
