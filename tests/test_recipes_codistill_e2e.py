"""Codistillation end to end: real peer processes (examples/codistill.py), a real Redis, real signals.

Three peers on one registry: two start together, a third joins late and is
used by the first two; then one of the first two is SIGKILLed mid-run. The
two that remain must notice (log + stats), keep distilling from each other,
and finish cleanly. Progress is read from each peer's JSON lines; every wait
polls a condition with a deadline.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from registry import EmbeddedRedis
from tests.helpers.redis_proc import REPO_ROOT, child_env, wait_until

SCRIPT = REPO_ROOT / "examples" / "codistill.py"
DEADLINE_S = 90.0


class Peer:
    """One ``examples/codistill.py`` process; its JSON lines are collected by a thread."""

    def __init__(self, argv: list[str], log_path: Path) -> None:
        self.log_path = log_path
        self._stderr = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, str(SCRIPT), *argv], stdout=subprocess.PIPE,
                                     stderr=self._stderr, text=True, env=child_env(PYTHONUNBUFFERED="1"),
                                     cwd=REPO_ROOT)
        self.events: list[dict] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            if line.startswith("{"):
                self.events.append(json.loads(line))

    def last(self) -> dict:
        return self.events[-1] if self.events else {"peers": {}, "departed": [], "step": 0}

    def answered(self, name: str) -> int:
        """Batches the peer ``name`` contributed to this peer's targets, per its latest report."""
        return self.last()["peers"].get(name, {}).get("answered", 0)

    def stderr(self) -> str:
        return self.log_path.read_text()  # the child writes it directly; ours is only its handle

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._thread.join(10)
        self._stderr.close()


def _wait(what: str, cond, peers: list[Peer]) -> None:
    def check():
        for p in peers:
            if p.proc.poll() not in (None, 0):
                pytest.fail(f"{what}: a peer exited with {p.proc.returncode}; stderr:\n{p.stderr()[-3000:]}")
        return cond()
    wait_until(check, timeout_s=DEADLINE_S, what=what, interval_s=0.05)


def test_three_peers_a_late_joiner_and_a_sigkill(tmp_path: Path) -> None:
    stop = tmp_path / "stop"
    with EmbeddedRedis() as redis:
        def start(i: int, *extra: str) -> Peer:
            return Peer(["--registry", redis.url, "--group", "e2e", "--shard", f"{i}/3", "--steps", "1000000",
                         "--exchange-every", "20", "--burn-in", "20", "--report-every", "20", "--stop-file",
                         str(stop), "--heartbeat-s", "0.3", "--ttl-s", "1.0", *extra], tmp_path / f"peer{i}.log")

        a, b = start(0, "--wait-peers", "1"), start(1, "--wait-peers", "1")
        peers = [a, b]
        try:
            _wait("peer0 and peer1 distilling from each other",
                  lambda: a.answered("peer1") > 0 and b.answered("peer0") > 0, peers)
            c = start(2)  # the late joiner
            peers.append(c)
            _wait("the late joiner peer2 used by peer0 and peer1",
                  lambda: a.answered("peer2") > 0 and b.answered("peer2") > 0, peers)
            _wait("peer2 distilling from both", lambda: c.answered("peer0") > 0 and c.answered("peer1") > 0, peers)

            a.proc.send_signal(signal.SIGKILL)
            a.proc.wait(10)
            survivors = [b, c]
            _wait("peer1 and peer2 report peer0's departure",
                  lambda: all("peer0" in p.last()["departed"] for p in survivors), survivors)
            after = {id(p): (p.answered("peer2" if p is b else "peer1"),
                             p.last()["peers"]["peer2" if p is b else "peer1"]["version"]) for p in survivors}
            _wait("peer1 and peer2 keep distilling from each other after the departure",
                  lambda: b.answered("peer2") >= after[id(b)][0] + 40 and c.answered("peer1") >= after[id(c)][0] + 40,
                  survivors)
            before_stop = {id(p): p.last() for p in survivors}
            stop.touch()
            for p in survivors:
                assert p.proc.wait(DEADLINE_S) == 0, p.stderr()[-3000:]
                p._thread.join(10)
        finally:
            for p in peers:
                p.close()

    for p, other in ((b, "peer2"), (c, "peer1")):
        report = before_stop[id(p)]  # both still running: the other is live, peer0 is gone
        assert report["departed"] == ["peer0"] and report["peers"][other]["live"]
        assert report["peers"][other]["answered"] >= after[id(p)][0] + 40
        done = p.events[-1]
        assert done["event"] == "done", p.events[-3:]
        assert done["peers"]["peer0"]["live"] is False
        # Its snapshots kept coming (versions are its steps), and staleness = our step - its version;
        # the late joiner's is behind by about the steps it missed, so it may be large or negative.
        assert report["peers"][other]["version"] > after[id(p)][1]
        assert report["peers"][other]["staleness"] == report["step"] - report["peers"][other]["version"]
        assert isinstance(done["peers"][other]["mean_staleness"], float)
        assert done["accuracy"] > 0.5  # it learnt (a third of the digits, 10 classes)
        log = p.stderr()
        assert "codistillation peer peer0" in log and "left group 'e2e'" in log
        assert f"distilling from the 1 remaining peer(s): {other}" in log


def test_peers_as_torchrun_ranks(tmp_path: Path) -> None:
    """Two torchrun ranks are two peers (shards from RANK/WORLD_SIZE), each distilling from the other."""
    with EmbeddedRedis() as redis:
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT),
             "--registry", redis.url, "--group", "ranks", "--steps", "150", "--burn-in", "30", "--exchange-every",
             "30", "--wait-peers", "1", "--report-every", "1000"],
            cwd=REPO_ROOT, env=child_env(PYTHONUNBUFFERED="1"), stdin=subprocess.DEVNULL, capture_output=True,
            text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = [json.loads(line) for line in proc.stdout.splitlines() if '"event": "done"' in line]
    assert sorted(d["shard"] for d in done) == ["0/2", "1/2"]
    for d in done:
        other = "peer1" if d["name"] == "peer0" else "peer0"
        assert d["peers"][other]["answered"] > 0 and d["distilled"] > 0, d
