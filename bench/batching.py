"""Dynamic batching: 8 concurrent clients x batch 8, served, vs batch 64 in-process.

A real CNN teacher (``teacher_server.zoo:resnet18_cifar``, ``--width`` scales
it) runs in a ``teacher_server`` process with ``--max-batch-size 64``. Eight
client threads in this process each send batches of 8 images (keeping
``--in-flight`` requests outstanding, as a DistillReader window would), so
the server's batcher must merge 8 requests into each forward pass to keep
up. The baseline is the same model (same weights) called in-process at batch
64 with the same torch thread count. Modes alternate per round.

Lines: one per mode per round (samples/s; for served rounds the mean batch
size the server formed). Summary: ``ratio`` = median over rounds of served /
in-process samples/s within the round (short rounds, so both modes of a pair
see the same load on a shared machine; ``ratio_of_medians`` too), target >= 0.9.

    python bench/batching.py [--rounds 8] [--seconds 2] [--width 64] [--max-queue-delay-ms 20]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

import _common
from _common import emit, median

import grpc  # noqa: E402
import torch  # noqa: E402

from protos import codec  # noqa: E402
from protos.edistill.v1 import teacher_pb2 as pb  # noqa: E402
from protos.edistill.v1 import teacher_pb2_grpc as pb_grpc  # noqa: E402
from teacher_server import DEFAULT_MAX_MESSAGE_BYTES, zoo  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--client-batch", type=int, default=8)
    p.add_argument("--in-flight", type=int, default=2, help="outstanding requests per client")
    p.add_argument("--width", type=int, default=64, help="ResNet base width (64 = ResNet-18)")
    p.add_argument("--max-queue-delay-ms", type=float, default=20.0)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--seconds", type=float, default=2.0, help="per mode per round")
    _common.add_env_args(p)
    opts = p.parse_args(argv)
    _common.reexec_with_env(opts.omp_wait_policy)
    full = opts.clients * opts.client_batch  # 64: the in-process batch and the server's max batch

    net = zoo.resnet18_cifar(width=opts.width).eval()  # same seed -> same weights as the server's
    gen = torch.Generator().manual_seed(0)
    x_full = torch.randn(full, 3, 32, 32, generator=gen)
    chunks = [x_full[i * opts.client_batch:(i + 1) * opts.client_batch].clone() for i in range(opts.clients)]
    config = {"bench": "batching", "width": opts.width, "clients": opts.clients, "client_batch": opts.client_batch,
              "in_flight": opts.in_flight, "inprocess_batch": full, "max_queue_delay_ms": opts.max_queue_delay_ms,
              **_common.machine()}
    emit({"config": config})
    serve_args = ["--model-kwargs", json.dumps({"width": opts.width}), "--max-batch-size", str(full),
                  "--max-queue-delay-ms", str(opts.max_queue_delay_ms)]

    with _common.teachers(1, "teacher_server.zoo:resnet18_cifar", *serve_args) as (proc,):
        channels = [grpc.insecure_channel(proc.address, options=[
            ("grpc.max_send_message_length", DEFAULT_MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE_BYTES),
            ("grpc.use_local_subchannel_pool", 1)])  # one connection per client, like separate students
            for _ in range(opts.clients)]
        stubs = [pb_grpc.TeacherStub(c) for c in channels]
        requests = []
        for i, chunk in enumerate(chunks):
            req = pb.PredictRequest(request_id=f"client{i}")
            codec.encode(chunk, req.inputs.add(), name="image")
            requests.append(req)

        def served(seconds: float) -> tuple[float, float]:
            """(samples/s, mean server batch size) with every client busy for ``seconds``."""
            stop = threading.Event()
            counts = [0] * opts.clients
            sizes: list[int] = []
            started = threading.Barrier(opts.clients + 1)

            def client(i: int) -> None:
                started.wait()
                futs = [stubs[i].Predict.future(requests[i], timeout=120) for _ in range(opts.in_flight)]
                while True:
                    resp = futs.pop(0).result()
                    counts[i] += opts.client_batch
                    sizes.append(resp.batch_size)
                    if stop.is_set():
                        break
                    futs.append(stubs[i].Predict.future(requests[i], timeout=120))
                for f in futs:
                    f.result()

            threads = [threading.Thread(target=client, args=(i,)) for i in range(opts.clients)]
            for t in threads:
                t.start()
            started.wait()
            # Count from the first answer on: the start-up (first batches forming) is not steady state.
            base, t0 = 0, None
            while t0 is None:
                time.sleep(0.005)
                if sum(counts):
                    base, t0 = sum(counts), time.perf_counter()
            time.sleep(seconds)
            done, dt = sum(counts) - base, time.perf_counter() - t0
            stop.set()
            for t in threads:
                t.join()
            return done / dt, sum(sizes) / max(1, len(sizes))

        def inprocess(seconds: float) -> float:
            n, t0 = 0, time.perf_counter()
            with torch.inference_mode():
                while time.perf_counter() - t0 < seconds:
                    net(x_full)
                    n += full
            return n / (time.perf_counter() - t0)

        # Warm-up, and check the served answer is the in-process answer.
        got = codec.to_torch(stubs[0].Predict(requests[0], timeout=120).outputs[0].values)
        with torch.inference_mode():
            max_diff = (got - net(chunks[0])).abs().max().item()
        assert max_diff < 1e-3, f"served and in-process outputs differ by {max_diff}"
        served(1.0), inprocess(1.0)

        rates: dict[str, list[float]] = {"inprocess": [], "served": []}
        for r in range(opts.rounds):
            for mode in (("inprocess", "served") if r % 2 == 0 else ("served", "inprocess")):
                if mode == "served":
                    rate, mean_batch = served(opts.seconds)
                    line = {"mean_server_batch": round(mean_batch, 2)}
                else:
                    rate, line = inprocess(opts.seconds), {}
                rates[mode].append(rate)
                emit({"round": r, "mode": mode, "samples_per_s": round(rate, 2), **line})
        for c in channels:
            c.close()
    inproc, served_rate = median(rates["inprocess"]), median(rates["served"])
    per_round = [s / i for s, i in zip(rates["served"], rates["inprocess"])]
    emit({"summary": True, **config, "rounds": opts.rounds, "seconds_per_mode": opts.seconds,
          "inprocess_samples_per_s": round(inproc, 2), "served_samples_per_s": round(served_rate, 2),
          "ratio": round(median(per_round), 4), "ratio_of_medians": round(served_rate / inproc, 4),
          "ratio_per_round_min": round(min(per_round), 4), "ratio_per_round_max": round(max(per_round), 4),
          "max_abs_diff": max_diff, "target": 0.9})
    return 0


if __name__ == "__main__":
    sys.exit(main())
