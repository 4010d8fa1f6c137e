"""``edistill record`` against a real teacher process, killed with SIGKILL mid-run and run again.

The teacher is ``teacher_server.zoo:latency`` served by a real server process
(it answers ``logits[:, j] = id + j / 10`` after a delay, so the recording
takes seconds); the recorder is the real CLI in its own process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from student_client import CachedTeacher, ConfigError, InProcessTeacher, OutputSpec, SourceRequest, TeacherInfo
from student_client.cache._shards import list_shards, read_meta, read_shard
from teacher_server import zoo
from tests.helpers.cache_data import SIZE_ENV
from tests.helpers.datasets import IdDataset
from tests.helpers.redis_proc import wait_until
from tests.helpers.teacher_proc import REPO_ROOT, TeacherProcess

N = 1200
SPEC = OutputSpec("logits", "log_probs", temperature=2.0)
SERVE = ["--model-kwargs", '{"delay_ms": 60, "features": 4}', "--max-batch-size", "32",
         "--max-queue-delay-ms", "0"]


def recorder(address: str, out: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "student_client.cli", "record", "--data", "tests.helpers.cache_data:id_dataset",
           "--out", out, "--teachers", address, "--output", "logits,transform=log_probs,temperature=2",
           "--batch-size", "32", "--shard-rows", "96", "--window", "2"]
    env = {**os.environ, SIZE_ENV: str(N), "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_recorder_killed_mid_run_and_rerun_records_every_key_once(tmp_path):
    out = str(tmp_path / "cache")
    with TeacherProcess("teacher_server.zoo:latency", *SERVE) as teacher:
        first = recorder(teacher.address, out)
        try:
            wait_until(lambda: os.path.isdir(out) and len(list_shards(tmp_path / "cache")) >= 3 or first.poll(),
                       timeout_s=120, what="three shards on disk")
            assert first.poll() is None, f"the recorder finished before it could be killed:\n{first.stdout.read()}"
            first.send_signal(signal.SIGKILL)
        finally:
            first.wait(timeout=30)
        assert first.returncode == -signal.SIGKILL
        killed_at = list_shards(tmp_path / "cache")
        for shard in killed_at:  # no torn shard: every file on disk is complete and matches its checksum
            read_shard(shard)
        recorded_before = sum(len(read_meta(s)["keys"]) for s in killed_at)
        assert 0 < recorded_before < N

        second = recorder(teacher.address, out)
        text, _ = second.communicate(timeout=240)
        assert second.returncode == 0, text
        assert f"{N - recorded_before} samples recorded, {recorded_before} already there" in text
        assert f"holds {N} of {N} samples from latency version" in text  # the model name Describe gives

    keys = [k for s in list_shards(tmp_path / "cache") for k in read_meta(s)["keys"]]
    assert sorted(keys) == list(range(N))  # every key exactly once
    cache = CachedTeacher(out, [SPEC])
    assert cache.teacher.model_name == "latency" and isinstance(cache.teacher, TeacherInfo)
    data = IdDataset(N, features=4)  # what the recorder loaded
    x = torch.stack([data[i][0] for i in range(N)])
    got = cache.submit(SourceRequest({"": x}, 0, list(range(N)))).result()["logits"]
    want = InProcessTeacher(zoo.latency(delay_ms=0, features=4), [SPEC]).submit(SourceRequest({"": x}, 0)).result()
    assert torch.equal(got, want["logits"]) and got.temperature == 2.0  # each value is the teacher's answer


def test_record_cli_takes_every_output_spec_field_by_its_type():
    from student_client.record_cli import parse_output

    assert parse_output("logits,transform=log_probs,top_k=8,tail=true,mask=attention_mask") == OutputSpec(
        "logits", "log_probs", top_k=8, tail=True, mask="attention_mask")
    assert parse_output("logits,transform=probs,sample=12,seed=3") == OutputSpec("logits", "probs", sample=12, seed=3)
    with pytest.raises(ConfigError, match="tail must be true or false, got 'maybe'"):
        parse_output("logits,tail=maybe")
    with pytest.raises(ConfigError, match="sample must be a number, got 'x'"):
        parse_output("logits,sample=x")


def test_record_cli_refuses_bad_arguments_in_one_line(capsys):
    from student_client.cli import main
    from student_client.record_cli import parse_output

    assert parse_output("logits,transform=probs,temperature=2,top_k=5,dtype=float16") == OutputSpec(
        "logits", "probs", 2.0, 5, "float16")
    assert main(["record", "--data", "tests.helpers.cache_data:id_dataset", "--out", "x",
                 "--output", "logits,temp=2", "--teachers", "127.0.0.1:1"]) == 2
    assert "expected NAME[,transform=...,temperature=...,top_k=...,dtype=...], got 'temp=2'" in capsys.readouterr().err
    assert main(["record", "--data", "tests.helpers.cache_data:id_dataset", "--out", "x"]) == 2
    assert "give the teachers with --teachers HOST:PORT ... or --registry URL --service NAME" in capsys.readouterr().err
    assert main(["record", "--data", "no_such_module:fn", "--out", "x", "--teachers", "127.0.0.1:1"]) == 2
    assert "--data no_such_module:fn: cannot import it" in capsys.readouterr().err
