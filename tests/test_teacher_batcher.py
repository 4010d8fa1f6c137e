"""DynamicBatcher on its own (no gRPC): merging, never splitting, failures, cancellation, drain."""

from __future__ import annotations

import asyncio

import pytest
import torch

from protos.edistill.v1 import teacher_pb2 as pb
from teacher_server import DynamicBatcher, InferenceFailed, LoadedModel, QueueFull, ServerClosing, zoo
from teacher_server.transforms import OutputPlan

RAW = (OutputPlan("logits", pb.RAW, 1.0, 0, torch.float32),)


def _ids(*ids: float) -> list[torch.Tensor]:
    x = torch.zeros(len(ids), 4)
    x[:, 0] = torch.tensor(ids)
    return [x]


def _batcher(model: LoadedModel, **kw) -> DynamicBatcher:
    opts = dict(max_batch_size=4, max_queue_delay_ms=20, max_queue_size=64)
    opts.update(kw)
    b = DynamicBatcher(model, **opts)
    b.start()
    return b


def test_requests_are_merged_whole_and_in_order() -> None:
    async def main():
        model = LoadedModel.from_module(zoo.latency(delay_ms=30))
        b = _batcher(model)
        records = []
        b.add_listener(records.append)
        sizes = [3, 1, 2, 2, 3]  # with max 4: [3,1] [2,2] [3]
        tasks = [asyncio.ensure_future(b.submit(_ids(*range(10 * i, 10 * i + n)), RAW, n))
                 for i, n in enumerate(sizes)]
        results = await asyncio.gather(*tasks)
        await b.close()
        return results, records, b.stats()

    results, records, stats = asyncio.run(main())
    assert [r.batch_size for r in records] == [4, 4, 3]
    assert [r.num_requests for r in records] == [2, 2, 1]
    for i, (res, n) in enumerate(zip(results, [3, 1, 2, 2, 3])):
        assert res.outputs[0].values[:, 0].tolist() == list(range(10 * i, 10 * i + n))
    assert stats.batch_sizes == {4: 2, 3: 1} and stats.samples == 11 and stats.max_batch_size_seen == 4


class Poisoned(torch.nn.Module):
    """Raises when any sample id is below -1000; otherwise echoes ids."""

    edistill_inputs = [("input", "float32", (4,))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x[:, 0] < -1000).any():
            raise RuntimeError("poisoned sample")
        return x[:, :1] * torch.ones(3)


def test_forward_failure_fails_only_the_culprit_and_batcher_continues() -> None:
    async def main():
        b = _batcher(LoadedModel.from_module(Poisoned()), max_queue_delay_ms=50)
        records = []
        b.add_listener(records.append)
        mixed = [asyncio.ensure_future(b.submit(_ids(v), RAW, 1)) for v in (1, -5000, 2)]
        done = await asyncio.gather(*mixed, return_exceptions=True)
        alone = await asyncio.gather(b.submit(_ids(-6000), RAW, 1), return_exceptions=True)
        after = await b.submit(_ids(5), RAW, 1)
        await b.close()
        return done, alone[0], after, records, b.stats()

    done, alone, after, records, stats = asyncio.run(main())
    assert records[0].num_requests == 3 and records[0].failed  # they did share the forward pass
    good1, bad, good2 = done
    assert isinstance(bad, InferenceFailed) and "poisoned sample" in str(bad)
    assert good1.outputs[0].values[0, 0].item() == 1 and good2.outputs[0].values[0, 0].item() == 2
    assert good1.batch_size == 1  # re-run on its own
    assert isinstance(alone, InferenceFailed) and "poisoned sample" in str(alone)
    assert after.outputs[0].values[0, 0].item() == 5
    assert stats.failed_batches == 2


class FreeLength(torch.nn.Module):
    """Free-length sequences: (B, L) -> (B, 3) holding each row's mean."""

    edistill_inputs = [("input", "float32", (-1,))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1, keepdim=True) * torch.ones(3)


def test_different_free_dims_are_not_merged_and_order_is_kept() -> None:
    async def main():
        b = _batcher(LoadedModel.from_module(FreeLength()), max_batch_size=8, max_queue_delay_ms=50)
        records = []
        b.add_listener(records.append)
        lengths = [3, 3, 5, 3]  # -> [3, 3] [5] [3]: a mismatch ends the batch, nothing overtakes it
        tasks = [asyncio.ensure_future(b.submit([torch.full((1, n), float(i))], RAW, 1))
                 for i, n in enumerate(lengths)]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await b.close()
        return results, records

    results, records = asyncio.run(main())
    assert not [r for r in results if isinstance(r, BaseException)], results
    assert [r.outputs[0].values[0, 0].item() for r in results] == [0.0, 1.0, 2.0, 3.0]
    assert [r.num_requests for r in records] == [2, 1, 1] and not any(r.failed for r in records)


def test_cancelled_request_is_skipped() -> None:
    async def main():
        lat = zoo.latency(delay_ms=50)
        b = _batcher(LoadedModel.from_module(lat), max_batch_size=1, max_queue_delay_ms=0)
        calls0 = lat.forward_calls
        first = asyncio.ensure_future(b.submit(_ids(1), RAW, 1))
        second = asyncio.ensure_future(b.submit(_ids(2), RAW, 1))
        third = asyncio.ensure_future(b.submit(_ids(3), RAW, 1))
        await asyncio.sleep(0)  # let all three enqueue
        second.cancel()  # like a client that went away while queued
        r1, r3 = await first, await third
        await b.close()
        return lat.forward_calls - calls0, r1, r3

    calls, r1, r3 = asyncio.run(main())
    assert calls == 2  # the cancelled request never ran
    assert r1.outputs[0].values[0, 0] == 1 and r3.outputs[0].values[0, 0] == 3


def test_queue_full_and_close_semantics() -> None:
    async def main():
        b = _batcher(LoadedModel.from_module(zoo.latency(delay_ms=100)), max_batch_size=1,
                     max_queue_delay_ms=0, max_queue_size=1)
        running = asyncio.ensure_future(b.submit(_ids(1), RAW, 1))
        await asyncio.sleep(0)  # let it enqueue
        while b.queue_depth:  # wait until the first request is in the forward pass
            await asyncio.sleep(0.001)
        queued = asyncio.ensure_future(b.submit(_ids(2), RAW, 1))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull, match="queue is full"):
            await b.submit(_ids(3), RAW, 1)
        closing = asyncio.ensure_future(b.close())
        await asyncio.sleep(0)
        with pytest.raises(ServerClosing):
            await b.submit(_ids(4), RAW, 1)
        await closing  # drains: both accepted requests are answered
        return (await running).outputs[0].values[0, 0].item(), (await queued).outputs[0].values[0, 0].item()

    assert asyncio.run(main()) == (1.0, 2.0)


class WritesItsInput(torch.nn.Module):
    """Adds 1000 to its input in place (some real models do), then returns it."""

    edistill_inputs = [("input", "float32", (4,))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.add_(1000.0)
        return x[:, :3]


def test_lone_request_inputs_are_copied_so_the_request_bytes_are_never_written() -> None:
    import numpy as np

    from protos import codec

    msg = codec.encode(np.arange(8, dtype=np.float32).reshape(2, 4), name="input")
    before = bytes(msg.data)
    view = codec.to_torch(msg)  # zero-copy view of the message's immutable bytes, as the servicer decodes

    async def main():
        b = _batcher(LoadedModel.from_module(WritesItsInput()))
        res = await b.submit([view], RAW, 2)
        await b.close()
        return res

    res = asyncio.run(main())
    assert res.outputs[0].values[0].tolist() == [1000.0, 1001.0, 1002.0]
    assert msg.data == before and view[0, 0].item() == 0.0, "the model wrote into the request's bytes"
