"""Would a long-lived stream pay? Client CPU per 768 KiB request: unary ``.future()`` vs one bidi stream per server.

DESIGN.md: "Stream RPCs only if a measurement shows they pay". This measures
the transport alone, without the teacher server or the pool: ``--servers``
grpc.aio server processes on loopback, each answering every message (unary
call or stream message) with 2.6 KB after ``--delay-ms`` (no CPU), and a
grpcio sync client in this process keeping 2 requests in flight per server
with the same 768 KiB payload in both modes, so the request rate is the same.
Unary: ``unary_unary(...).future()``, as TeacherPool sends. Stream: one
``stream_stream`` call per server, requests fed from a queue, answers read
by one thread per stream that resolves a future per request (what a
``PredictStream`` client would have to do). Modes alternate per round.

    python bench/stream_vs_unary.py [--servers 16] [--rounds 3] [--requests 300]

Prints one JSON line per measurement and a summary with
``unary_cpu_us_per_request``, ``stream_cpu_us_per_request`` (medians) and
``stream_over_unary``.
"""
import asyncio, os, sys, time, json, queue, threading, subprocess, collections
import grpc

from _common import emit, median  # noqa: E402  (also puts the repo on sys.path)

def serve(port_file, delay):
    async def main():
        async def unary(req, ctx):
            await asyncio.sleep(delay); return b"x" * 2600
        async def bidi(it, ctx):
            q = asyncio.Queue()
            async def one(r):
                await asyncio.sleep(delay); await q.put(b"x" * 2600)
            async def pump():
                async for r in it: asyncio.ensure_future(one(r))
            asyncio.ensure_future(pump())
            while True:
                yield await q.get()
        h = grpc.method_handlers_generic_handler("x", {
            "U": grpc.unary_unary_rpc_method_handler(unary),
            "S": grpc.stream_stream_rpc_method_handler(bidi)})
        opts = [("grpc.max_receive_message_length", 2**28), ("grpc.max_send_message_length", 2**28)]
        s = grpc.aio.server(options=opts); s.add_generic_rpc_handlers((h,))
        port = s.add_insecure_port("127.0.0.1:0"); await s.start()
        open(port_file, "w").write(str(port)); await s.wait_for_termination()
    asyncio.run(main())

def client(ports, mode, n_req, per=2):
    payload = os.urandom(786432)
    opts = [("grpc.max_receive_message_length", 2**28), ("grpc.max_send_message_length", 2**28)]
    chans = [grpc.insecure_channel(f"127.0.0.1:{p}", options=opts) for p in ports]
    if mode == "unary":
        calls = [c.unary_unary("/x/U") for c in chans]
        send = lambda i: calls[i].future(payload, timeout=60)
        wait = lambda f: f.result()
    else:
        qs, resq, streams = [], [], []
        for c in chans:
            q = queue.SimpleQueue(); rq = collections.deque(); qs.append(q); resq.append(rq)
            it = c.stream_stream("/x/S")(iter(q.get, None))
            def rd(it=it, rq=rq):
                for m in it:
                    rq.popleft().set_result(m)  # answers come back in order per stream here
            threading.Thread(target=rd, daemon=True).start()
        from concurrent.futures import Future
        def send(i):
            f = Future(); resq[i].append(f); qs[i].put(payload); return f
        wait = lambda f: f.result()
    pend = collections.deque((i, send(i)) for _ in range(per) for i in range(len(chans)))
    def go(k):
        for _ in range(k):
            i, f = pend.popleft(); wait(f); pend.append((i, send(i)))
    go(3 * len(pend))
    c0, w0 = time.process_time(), time.perf_counter(); go(n_req)
    c1, w1 = time.process_time(), time.perf_counter()
    return (c1 - c0) / n_req * 1e6, n_req / (w1 - w0)

def main() -> int:
    import argparse
    import tempfile

    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(sys.argv[2], float(sys.argv[3]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--servers", type=int, default=16)
    p.add_argument("--delay-ms", type=float, default=200.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=300)
    opts = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="edistill-stream-")
    files = [os.path.join(tmp, f"port{k}") for k in range(opts.servers)]
    procs = [subprocess.Popen([sys.executable, __file__, "serve", f, str(opts.delay_ms / 1000)]) for f in files]
    cpu = {"unary": [], "stream": []}
    try:
        ports = []
        deadline = time.monotonic() + 60
        for f in files:
            while not (os.path.exists(f) and open(f).read()):
                if time.monotonic() > deadline:
                    raise RuntimeError("servers did not start within 60 s")
                time.sleep(0.05)
            ports.append(int(open(f).read()))
        emit({"config": {"bench": "stream_vs_unary", "servers": opts.servers, "delay_ms": opts.delay_ms,
                         "request_bytes": 786432, "grpc": grpc.__version__}})
        for r in range(opts.rounds):
            for mode in (("unary", "stream") if r % 2 == 0 else ("stream", "unary")):
                us, rps = client(ports, mode, opts.requests)
                cpu[mode].append(us)
                emit({"round": r, "mode": mode, "client_cpu_us_per_request": round(us, 1),
                      "requests_per_s": round(rps, 1)})
    finally:
        for proc in procs:
            proc.kill()
    u, st = median(cpu["unary"]), median(cpu["stream"])
    emit({"summary": True, "servers": opts.servers, "rounds": opts.rounds, "unary_cpu_us_per_request": round(u, 1),
          "stream_cpu_us_per_request": round(st, 1), "stream_over_unary": round(st / u, 3)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
