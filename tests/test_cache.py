"""The recorded cache with an in-process teacher: round trips bit for bit, resuming by key, refusals.

The teacher is a real torch model (``InProcessTeacher``); every cached answer
is compared with the one the teacher gives for the same samples now.
"""

from __future__ import annotations

import json
import threading

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from student_client import (
    AnswerMissingError,
    CacheCorruptError,
    CacheError,
    CachedTeacher,
    CacheMismatchError,
    ConfigError,
    DistillReader,
    FallbackSource,
    InProcessTeacher,
    OutputSpec,
    SourceRequest,
    TeacherInfo,
    TopK,
    record,
)
from student_client.cache._shards import list_shards, read_meta
from student_client.outputs import Dense

N, FEATURES, CLASSES = 300, 16, 40


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(N, FEATURES, generator=gen), torch.randint(0, CLASSES, (N,), generator=gen)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, CLASSES)).eval()


def loader(data, *, shuffle=False, seed=0, batch_size=32, subset=None):
    """A DataLoader over the whole dataset (keys: its indices), or over the indices ``subset`` only."""
    ds = TensorDataset(*data)
    if subset is not None:  # a sampler drawing a part, as a DistributedSampler does
        return DataLoader(ds, batch_size=batch_size, sampler=subset)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(seed))


def live(net, spec, x):
    return InProcessTeacher(net, [spec]).submit(SourceRequest({"": x}, 0)).result()[spec.name]


def same(a, b) -> bool:
    """Equal bit for bit, with the same type, dtype and metadata."""
    if isinstance(a, TopK) or isinstance(b, TopK):
        return (type(a) is type(b) and torch.equal(a.values, b.values) and a.values.dtype == b.values.dtype
                and torch.equal(a.indices, b.indices) and a.indices.dtype == b.indices.dtype
                and a.dense_shape == b.dense_shape and (a.transform, a.temperature) == (b.transform, b.temperature))
    return (isinstance(a, Dense) and isinstance(b, Dense) and a.dtype == b.dtype and torch.equal(a, b)
            and (a.transform, a.temperature) == (b.transform, b.temperature))


@pytest.mark.parametrize("spec", [
    OutputSpec("logits"),
    OutputSpec("logits", "log_probs", temperature=4.0),
    OutputSpec("logits", "probs", temperature=2.0, dtype="float16"),
    OutputSpec("logits", "log_probs", temperature=2.0, top_k=5, dtype="bfloat16"),
    OutputSpec("logits", "probs", top_k=3),
], ids=["raw", "log_probs-T4", "probs-fp16", "topk-bf16", "topk-fp32"])
def test_cached_answers_equal_the_teachers_bit_for_bit(tmp_path, data, net, spec):
    result = record(loader(data, shuffle=True), InProcessTeacher(net, [spec]), tmp_path, shard_rows=100)
    assert (result.recorded, result.skipped, result.cached, result.dataset_size) == (N, 0, N, N)
    cache = CachedTeacher(tmp_path)
    assert cache.outputs == (spec,) and len(cache) == N
    keys = [7, 250, 3, 3, 128, 0, 299]  # several shards, out of order, a repeat
    got = cache.submit(SourceRequest({"": data[0][keys]}, "b", keys)).result()[spec.name]
    assert same(got, live(net, spec, data[0][keys]))


def test_reader_over_a_shuffled_loader_gets_each_samples_own_answer(tmp_path, data, net):
    spec = OutputSpec("logits", "log_probs", temperature=4.0)
    record(loader(data), InProcessTeacher(net, [spec]), tmp_path, shard_rows=64)
    with DistillReader(loader(data, shuffle=True, seed=5), CachedTeacher(tmp_path)) as reader:
        seen = 0
        for (x, _), teacher in reader:
            assert same(teacher["logits"], live(net, spec, x))
            seen += len(x)
    assert seen == N


def test_rerun_in_another_order_records_only_the_missing_keys(tmp_path, data, net):
    spec = OutputSpec("logits", "probs", temperature=2.0, top_k=4, dtype="float16")
    calls = []
    teacher = InProcessTeacher(lambda x: calls.append(len(x)) or net(x), [spec])
    first = record(loader(data, subset=list(range(0, N, 3))), teacher, tmp_path, shard_rows=50)
    assert first.recorded == len(range(0, N, 3)) and not first.complete
    calls.clear()
    second = record(loader(data, shuffle=True, seed=9), teacher, tmp_path, shard_rows=50)
    assert (second.recorded, second.skipped, second.cached) == (N - first.recorded, first.recorded, N)
    assert second.complete and sum(calls) == N - first.recorded  # the teacher saw only the missing samples
    keys = [k for s in list_shards(tmp_path) for k in read_meta(s)["keys"]]
    assert sorted(keys) == list(range(N))  # every key exactly once
    cache = CachedTeacher(tmp_path)
    got = cache.submit(SourceRequest({"": data[0]}, 0, list(range(N)))).result()["logits"]
    assert same(got, live(net, spec, data[0]))


def test_two_recorders_fill_one_cache_with_disjoint_files(tmp_path, data, net):
    spec = OutputSpec("logits", "log_probs")
    halves = [list(range(r, N, 2)) for r in range(2)]  # what a DistributedSampler gives 2 ranks
    errors = []

    def rank(r):
        try:
            record(loader(data, subset=halves[r]), InProcessTeacher(net, [spec]), tmp_path, rank=r, shard_rows=40)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    shards = list_shards(tmp_path)
    assert {s.writer.split("-")[0] for s in shards} == {"r0", "r1"}
    assert sorted(k for s in shards for k in read_meta(s)["keys"]) == list(range(N))
    cache = CachedTeacher(tmp_path)
    assert len(cache) == N and cache.duplicates == 0
    assert same(cache.submit(SourceRequest({"": data[0]}, 0, list(range(N)))).result()["logits"],
                live(net, spec, data[0]))


def test_string_keys(tmp_path, data, net):
    keys_of = lambda batch: [f"img-{int(i)}" for i in batch[1]]  # noqa: E731
    ids = torch.arange(N)
    record(DataLoader(TensorDataset(data[0], ids), batch_size=50), InProcessTeacher(net, ["logits"]), tmp_path,
           sample_keys=keys_of)
    cache = CachedTeacher(tmp_path)
    got = cache.submit(SourceRequest({"": data[0][[9, 4]]}, 0, ["img-9", "img-4"])).result()["logits"]
    assert same(got, live(net, OutputSpec("logits"), data[0][[9, 4]]))
    assert "img-9" in cache and "img-999" not in cache


def test_what_differs_from_the_recording_is_named(tmp_path, data, net):
    record(loader(data), InProcessTeacher(net, [OutputSpec("logits", "log_probs", temperature=4.0)]), tmp_path,
           teacher=TeacherInfo("mlp", "3"))
    with pytest.raises(CacheMismatchError, match=r"temperature recorded 4\.0, asked 2\.0") as err:
        CachedTeacher(tmp_path, [OutputSpec("logits", "log_probs", temperature=2.0, top_k=5)])
    assert "top_k recorded 0, asked 5" in str(err.value)
    with pytest.raises(CacheMismatchError, match=r"output 'features' was not recorded \(recorded: logits\)"):
        CachedTeacher(tmp_path, ["features"])
    with pytest.raises(CacheMismatchError, match=r"model version: recorded '3' \(mlp\), asked '4'"):
        CachedTeacher(tmp_path, model_version=4)
    assert CachedTeacher(tmp_path, model_version="3").teacher == TeacherInfo("mlp", "3")
    # recording something else into the same directory is refused, naming the difference
    with pytest.raises(CacheMismatchError, match=r"teacher: recorded mlp version 3, now mlp version 4"):
        record(loader(data), InProcessTeacher(net, [OutputSpec("logits", "log_probs", temperature=4.0)]), tmp_path,
               teacher=TeacherInfo("mlp", "4"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CacheError, match="holds no manifest.json"):
        CachedTeacher(tmp_path / "empty")


def test_a_request_for_fewer_draws_than_recorded_is_refused_naming_sample(tmp_path):
    torch.manual_seed(0)
    per_token = nn.Linear(FEATURES, CLASSES).eval()  # (B, L, FEATURES) -> (B, L, CLASSES): sampled answers
    seqs = DataLoader(TensorDataset(torch.randn(64, 5, FEATURES)), batch_size=32)
    recorded = OutputSpec("logits", "probs", sample=12)
    record(seqs, InProcessTeacher(per_token, [recorded]), tmp_path, teacher=TeacherInfo("lm", "1"))
    with pytest.raises(CacheMismatchError, match=r"output 'logits': sample recorded 12, asked 4"):
        CachedTeacher(tmp_path, [OutputSpec("logits", "probs", sample=4)])
    assert CachedTeacher(tmp_path, [recorded]).outputs == (recorded,)


def test_a_bad_token_codec_is_refused_before_anything_is_written(tmp_path, data, net):
    out = tmp_path / "cache"
    with pytest.raises(ConfigError, match="token_codec must be 'exact' or 'compact', got 'zip'"):
        record(loader(data), InProcessTeacher(net, [OutputSpec("logits")]), out, token_codec="zip")
    assert not (out / "manifest.json").exists()
    record(loader(data), InProcessTeacher(net, [OutputSpec("logits")]), out)  # the directory is still free to use


def test_a_missing_key_falls_through_to_the_live_source(tmp_path, data, net):
    spec = OutputSpec("logits", "log_probs", temperature=4.0)
    record(loader(data, subset=list(range(100))), InProcessTeacher(net, [spec]), tmp_path)
    cache = CachedTeacher(tmp_path)
    keys = [5, 150, 6, 151]
    with pytest.raises(AnswerMissingError, match="2 of 4 samples of batch b") as err:
        cache.submit(SourceRequest({"": data[0][keys]}, "b", keys)).result()
    assert err.value.keys == [150, 151]
    live_teacher = InProcessTeacher(net, [spec])
    chain = FallbackSource([cache, live_teacher])
    assert same(chain.submit(SourceRequest({"": data[0][keys]}, "b", keys)).result()["logits"],
                live(net, spec, data[0][keys]))
    assert live_teacher.stats().completed == 1


def test_write_back_asks_only_the_missing_rows_and_keeps_them(tmp_path, data, net):
    spec = OutputSpec("logits", "probs", temperature=2.0, top_k=5)
    record(loader(data, subset=list(range(100))), InProcessTeacher(net, [spec]), tmp_path)
    rows_asked = []
    fallback = InProcessTeacher(lambda x: rows_asked.append(len(x)) or net(x), [spec])
    keys = [5, 150, 6, 151, 299]
    with CachedTeacher(tmp_path, fallback=fallback, write_back=True, shard_rows=2) as cache:
        got = cache.submit(SourceRequest({"": data[0][keys]}, 0, keys)).result()["logits"]
        assert same(got, live(net, spec, data[0][keys])) and rows_asked == [3]
        assert (cache.hits, cache.misses) == (2, 3)
    again = CachedTeacher(tmp_path)  # written back: no fallback needed now
    assert len(again) == 103
    assert same(again.submit(SourceRequest({"": data[0][keys]}, 0, keys)).result()["logits"],
                live(net, spec, data[0][keys]))


def test_a_flipped_byte_is_an_error_naming_the_shard(tmp_path, data, net):
    record(loader(data), InProcessTeacher(net, ["logits"]), tmp_path, shard_rows=100)
    shard = list_shards(tmp_path)[1]
    raw = bytearray(shard.path.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one bit in the middle of the values
    shard.path.write_bytes(bytes(raw))
    cache = CachedTeacher(tmp_path)
    first_rows = read_meta(list_shards(tmp_path)[0])["keys"][:3]
    assert cache.submit(SourceRequest({"": data[0][first_rows]}, 0, first_rows)).result()  # other shards still serve
    bad = read_meta(shard)["keys"][:2]
    with pytest.raises(CacheCorruptError, match=rf"cache shard {shard.path} is damaged \(its BLAKE2b checksum"):
        cache.submit(SourceRequest({"": data[0][bad]}, 0, bad)).result()
    with pytest.raises(CacheCorruptError) as err:
        cache.verify()
    assert err.value.path == shard.path


def test_a_damaged_manifest_or_header_is_named(tmp_path, data, net):
    record(loader(data), InProcessTeacher(net, ["logits"]), tmp_path, shard_rows=100)
    manifest = tmp_path / "manifest.json"
    doc = json.loads(manifest.read_text())
    doc["teacher"]["model_version"] = "9"
    manifest.write_text(json.dumps(doc))
    with pytest.raises(CacheCorruptError, match="manifest.json is damaged"):
        CachedTeacher(tmp_path)


def test_misuse_is_a_clear_error(tmp_path, data, net):
    record(loader(data), InProcessTeacher(net, ["logits"]), tmp_path)
    cache = CachedTeacher(tmp_path)
    with pytest.raises(ConfigError, match="sample_keys="):
        cache.submit(SourceRequest({"": data[0][:2]}, 0, None))
    with pytest.raises(ConfigError, match="write_back=True stores the fallback's answers"):
        CachedTeacher(tmp_path, write_back=True)
    with pytest.raises(ConfigError, match="sample_keys="):
        record([(data[0][:4], data[1][:4])], InProcessTeacher(net, ["logits"]), tmp_path / "other")
    with pytest.raises(CacheError, match="does not exist"):
        CachedTeacher(tmp_path / "nowhere")
