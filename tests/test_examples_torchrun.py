"""``examples/train_student.py`` alone and under ``torchrun --nproc_per_node=2``.

Real parts throughout: a real redis-server (EmbeddedRedis), two real teacher
processes registered in it, ``python -m torch.distributed.run`` starting two
ranks that join a gloo process group on loopback, each with its own
DistillReader over the registry.

The teachers are ``teacher_server.zoo:latency``: ``logits[:, 0] == input[:, 0]``.
The script's synthetic data puts ``id / N`` in column 0 of sample ``id``, so the
per-rank records (``--record-samples``) show for every trained sample which
teacher answer it was trained with.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from registry import EmbeddedRedis
from tests.helpers.redis_proc import child_env
from tests.helpers.teacher_proc import REPO_ROOT, TeacherProcess

SCRIPT = REPO_ROOT / "examples" / "train_student.py"
SERVICE = "examples-latency"
FEATURES, CLASSES = 8, 4
# 2 ranks x batch 16 = 32 divides 128, so DistributedSampler needs no padding
# (it would otherwise repeat up to world_size - 1 samples to even out the
# shards) and every rank runs 4 full steps: each sample is trained on once.
SAMPLES, BATCH, WORLD = 128, 16, 2


@pytest.fixture(scope="module")
def teachers():
    """A real Redis and two latency teachers registered in it as SERVICE."""
    with EmbeddedRedis() as redis:
        model_kwargs = json.dumps({"delay_ms": 5, "features": FEATURES, "num_classes": CLASSES})
        procs = [TeacherProcess("teacher_server.zoo:latency", "--model-kwargs", model_kwargs,
                                "--registry", redis.url, "--service", SERVICE,
                                env={"OMP_NUM_THREADS": "1"}) for _ in range(2)]
        try:
            for p in procs:
                p.start()
            yield redis, procs
        finally:
            for p in procs:
                p.close()


def _run(argv: list[str], timeout_s: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, cwd=REPO_ROOT, env=child_env(), stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout_s)
    return proc


def _common(record_dir: Path, epochs: int = 1) -> list[str]:
    return ["--dataset", "synthetic", "--synthetic-samples", str(SAMPLES), "--synthetic-features", str(FEATURES),
            "--synthetic-classes", str(CLASSES), "--batch-size", str(BATCH), "--epochs", str(epochs),
            "--lr", "0.1", "--device", "cpu", "--wait-teachers-s", "30", "--record-samples", str(record_dir)]


def _check_trace(samples: list[list[float]]) -> list[int]:
    """Every answer belongs to its sample: teacher logits[0] == input[0] == id / N. Returns the ids."""
    ids = []
    for sid, x0, t0 in samples:
        assert t0 == x0, f"sample {sid:.0f} was trained with the teacher answer for input {t0} (its own: {x0})"
        assert math.isclose(x0 * SAMPLES, sid, abs_tol=1e-4), f"sample {sid:.0f} carried input {x0}"
        ids.append(int(sid))
    return ids


def test_torchrun_two_ranks_cover_epoch_once_and_agree(teachers, tmp_path):
    redis, procs = teachers
    record_dir, ckpt = tmp_path / "records", tmp_path / "student.pt"
    result = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
                   str(SCRIPT), "--registry", redis.url, "--service", SERVICE, "--save", str(ckpt),
                   *_common(record_dir)])
    assert result.returncode == 0, result.stdout + result.stderr

    records = sorted((json.loads((record_dir / f"rank{r}.json").read_text()) for r in range(WORLD)),
                     key=lambda r: r["rank"])
    assert [r["rank"] for r in records] == [0, 1] and {r["world_size"] for r in records} == {WORLD}

    # Exactly once across the ranks: disjoint shards that together are the epoch.
    per_rank = [_check_trace(r["samples"]) for r in records]
    assert [len(ids) for ids in per_rank] == [SAMPLES // WORLD] * WORLD
    assert sorted(per_rank[0] + per_rank[1]) == list(range(SAMPLES))

    # Both ranks used the registry's teachers and trained.
    for r in records:
        assert r["reader"]["batches"] == SAMPLES // WORLD // BATCH
        assert r["reader"]["teachers"] == 2, r["reader"]
        assert math.isfinite(r["epochs"][0]["loss"])

    # DDP kept the replicas identical; training moved them. Different shards
    # without gradient averaging would leave the ranks with different weights.
    w0, w1 = (r["final_weights"] for r in records)
    for key in ("sum", "abs_sum", "sq_sum"):
        assert math.isclose(w0[key], w1[key], rel_tol=1e-6, abs_tol=1e-6), (key, w0, w1)
    assert records[0]["initial_weights"]["sha256"] == records[1]["initial_weights"]["sha256"]
    assert w0["sha256"] != records[0]["initial_weights"]["sha256"]

    # Rank 0 saved those weights, loadable without pickle.
    state = torch.load(ckpt, weights_only=True)
    flat = torch.cat([t.double().reshape(-1) for t in state.values()])
    assert math.isclose(float(flat.sum()), w0["sum"], rel_tol=1e-9, abs_tol=1e-9)
    # Only rank 0 logs epochs.
    assert "rank0 INFO train_student: epoch 1/1" in result.stderr
    assert "rank1 INFO train_student: epoch" not in result.stderr


def test_single_process_with_teacher_list(teachers, tmp_path):
    _, procs = teachers
    record_dir = tmp_path / "records"
    result = _run([sys.executable, str(SCRIPT), "--teachers", ",".join(p.address for p in procs),
                   *_common(record_dir, epochs=2)])
    assert result.returncode == 0, result.stdout + result.stderr
    record = json.loads((record_dir / "rank0.json").read_text())
    assert record["world_size"] == 1
    ids = _check_trace(record["samples"])
    # Two epochs over the whole set, each sample once per epoch.
    assert sorted(ids[:SAMPLES]) == list(range(SAMPLES)) and sorted(ids[SAMPLES:]) == list(range(SAMPLES))
    assert [e["epoch"] for e in record["epochs"]] == [1, 2]
    assert "epoch 2/2" in result.stderr


@pytest.fixture
def dead_redis_url():
    """A Redis URL on a port nobody listens on (a stopped EmbeddedRedis's port)."""
    with EmbeddedRedis() as redis:
        url = redis.url
    return url


@pytest.mark.parametrize("case", ["no_teachers", "unreachable_registry", "empty_service", "outputs_do_not_fit"])
def test_bad_configuration_fails_with_one_clear_line(case, teachers, dead_redis_url, tmp_path):
    redis, _ = teachers
    wait_s = "1"
    args = {
        "no_teachers": [],
        "unreachable_registry": ["--registry", dead_redis_url, "--service", SERVICE],
        "empty_service": ["--registry", redis.url, "--service", "nobody-serves-this"],
        # The teachers answer 4 logits per sample; this dataset has 3 classes.
        "outputs_do_not_fit": ["--registry", redis.url, "--service", SERVICE, "--synthetic-features", str(FEATURES),
                               "--synthetic-classes", str(CLASSES - 1), "--batch-size", str(BATCH)],
    }[case]
    if case == "outputs_do_not_fit":
        wait_s = "30"  # the teachers are there: a generous wait for their health checks
    result = _run([sys.executable, str(SCRIPT), *args, "--dataset", "synthetic", "--wait-teachers-s", wait_s])
    assert result.returncode == 2, result.stdout + result.stderr
    expected = {
        "no_teachers": "give exactly one of --registry URL",
        "unreachable_registry": "is unreachable, so no teacher could be discovered",
        "empty_service": "lists no live teacher for service 'nobody-serves-this'",
        "outputs_do_not_fit": f"the teacher answered logits of shape ({BATCH}, {CLASSES}) for a batch of {BATCH} "
                              f"samples of {CLASSES - 1} classes; serve a model for this dataset",
    }[case]
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
