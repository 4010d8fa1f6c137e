"""The other peers of a codistillation group, as one knowledge source.

:class:`PeerSource` follows a registry *peer group* (a service name) with a
:class:`~registry.TeacherWatcher`, keeps one single-endpoint
:class:`~student_client.pool.TeacherPool` per other peer (never itself), sends
every batch to each of them and answers with the mean of their predictions
(:func:`~student_client.compose.mean_answer`, as :class:`EnsembleSource`
averages: the log of the mean probability for ``log_probs``).

Peers come and go. A peer that joins is used from the next batch once its
snapshot is mature (its model version, the training step it was taken at, is
at least ``min_version``: a peer still in its burn-in would teach noise). A
peer that leaves (deregistered, or SIGKILLed: its registry entry expires
within one TTL) is logged at WARNING with the peers that remain, its pool is
closed (its pending answers are left out of the mean) and it stays in
``stats().peers`` with ``live=False``. A peer that fails to answer one batch
(timeout, a dying process) is left out of that batch's mean and counted.

With no usable peer (before our own burn-in, alone in the group, every
other peer gone) a batch is answered at once with ``{}``: the training loop
then trains on its labels alone, as codistillation does before burn-in.

Versions: a peer's snapshot answers, beside its predictions, an output
``version`` (``(B, 2)`` float32: the step as ``[step // 2**20, step % 2**20]``,
exact to 2**44 steps) computed in the same forward pass as the predictions,
so each answer names exactly the weights that produced it (see
:class:`~student_client.recipes.codistill.Snapshot`). Answers older than
``min_version`` are left out of the mean; staleness is measured per answer.
A peer that answers no version is judged by its registry record's
``model_version`` (written with its next heartbeat, so up to one heartbeat late).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

from ..compose import _Chained, mean_answers, when_all  # _Chained: a future whose cancel() cancels its parts
from ..config import PoolConfig
from ..errors import ConfigError, NoTeacherAvailableError, SourceClosedError, StudentError
from ..futures import settle
from ..outputs import OutputSpec, TeacherValue, normalize_outputs
from ..sources import KnowledgeSource, SourceRequest, check_request
from ..stats import SourceStats

__all__ = ["VERSION_OUTPUT", "PeerSource", "PeerSourceStats", "PeerStats", "decode_version", "encode_version"]

logger = logging.getLogger(__name__)

#: The output a peer snapshot answers its version (training step) in.
VERSION_OUTPUT = "version"


@dataclass(frozen=True)
class PeerStats:
    """One other peer of the group, as this peer saw it.

    Attributes:
        name: the peer's name (its registry record's ``model_name``).
        endpoint: where its snapshot is served.
        version: the training step of its latest snapshot we know of (from
            its last answer, else its registry record; None if not a number).
        staleness: our step minus ``version``: how many steps old its
            predictions are from where we stand (None without a version).
        answered: batches it contributed to our targets.
        failed: batches it was asked for and did not answer.
        immature: answers left out because their version was below ``min_version``.
        mean_staleness: over the answers used, our step when the batch was
            submitted minus the answer's version (None before any).
        live: still in the group.
        joined_step / left_step: our step when it was first seen / when it left.
    """

    name: str
    endpoint: str
    version: int | None
    staleness: int | None
    answered: int
    failed: int
    live: bool
    joined_step: int
    left_step: int | None = None
    immature: int = 0
    mean_staleness: float | None = None


@dataclass(frozen=True)
class PeerSourceStats(SourceStats):
    """A :class:`PeerSource`'s counters; ``peers`` by teacher id, departed peers included.

    ``distilled`` counts batches answered with at least one peer's
    predictions, ``alone`` those answered ``{}`` (no usable peer).
    """

    kind: str = "peers"
    step: int = 0
    distilled: int = 0
    alone: int = 0
    peers: dict[str, PeerStats] = field(default_factory=dict)

    @property
    def live_peers(self) -> list[str]:
        """Names of the peers in the group now."""
        return sorted(p.name for p in self.peers.values() if p.live)

    @property
    def departed(self) -> list[str]:
        """Names of the peers that left."""
        return sorted(p.name for p in self.peers.values() if not p.live)

    def summary(self) -> str:
        """One line: live peers with their staleness, departed peers, distilled batches."""
        live = ", ".join(f"{p.name} (staleness {p.staleness})" for p in self.peers.values() if p.live) or "none"
        line = f"step {self.step}: peers {live}; {self.distilled}/{self.submitted} batches distilled"
        return line + (f"; departed: {', '.join(self.departed)}" if self.departed else "")


class _Peer:
    """Mutable state of one peer (under PeerSource._lock)."""

    def __init__(self, record: Any, pool: Any, step: int) -> None:
        self.record = record
        self.pool = pool
        self.answer_version: int | None = None  # from its latest answer
        self.staleness_sum = 0  # over used answers with a version: our step at submit - their version
        self.staleness_n = 0
        self.stats = PeerStats(record.model_name, record.endpoint, _version(record.model_version), None, 0, 0,
                               True, step)

    def version(self) -> int | None:
        return self.answer_version if self.answer_version is not None else self.stats.version


def encode_version(step: int, rows: int) -> Any:
    """``(rows, 2)`` float32 ``[step // 2**20, step % 2**20]``: a step exactly, on the float-only wire."""
    import torch

    return torch.tensor([[float(step >> 20), float(step & 0xFFFFF)]]).expand(rows, 2)


def decode_version(value: Any) -> int:
    """The step in an answer's ``version`` output (row 0)."""
    hi, lo = (int(v) for v in value[0].tolist())
    return (hi << 20) + lo


def _version(text: str) -> int | None:
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


class PeerSource(KnowledgeSource):
    """The mean prediction of the other live peers of a registry peer group.

    Args:
        registry: Redis URL of the registry the peers share.
        group: the peer group (the service name every peer registers under).
        outputs: what to ask each peer for (names, OutputSpec, or a loss with
            ``needs``); default ``log_probs`` of ``logits`` at T=1.
        self_id: this peer's own teacher id, never asked.
        min_version: a peer is used once it serves a snapshot of at least
            this step (its burn-in is over).
        peer_timeout_s: how long one peer may take to answer a batch before
            it is left out of it (also the pool's wait for a silent peer).
        poll_s: registry re-read interval (events make joins/leaves faster).
        pool_config: a base :class:`PoolConfig` for the per-peer pools
            (``timeout_s``/``wait_timeout_s``/hedging are set from the above).

    The training step (for staleness and ``joined_step``) is set with
    :meth:`set_step`; :attr:`active` False answers every batch ``{}``.
    """

    kind = "peers"

    def __init__(self, registry: str, group: str, outputs: Any = None, *, self_id: str | None = None,
                 min_version: int = 0, peer_timeout_s: float = 5.0, poll_s: float = 0.5,
                 pool_config: PoolConfig | None = None, version_output: str | None = VERSION_OUTPUT) -> None:
        from registry import TeacherWatcher

        if not (isinstance(peer_timeout_s, (int, float)) and peer_timeout_s > 0):
            raise ConfigError(f"peer_timeout_s must be a number > 0, got {peer_timeout_s!r}")
        # log_probs at T=1 by default: the mean is the log of the peers' mean probability.
        self._outputs = normalize_outputs(outputs if outputs is not None else [OutputSpec("logits", "log_probs")])
        self._version_output = version_output
        if version_output is not None and version_output not in {o.name for o in self._outputs}:
            self._outputs = (*self._outputs, OutputSpec(version_output, "raw"))
        self._group = group
        self._self_id = self_id
        self._min_version = int(min_version)
        self._pool_config = replace(pool_config or PoolConfig(), timeout_s=float(peer_timeout_s),
                                    wait_timeout_s=float(peer_timeout_s), hedge_after_s=None)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._peers: dict[str, _Peer] = {}  # teacher_id -> peer, departed ones too
        self._step = 0
        self._closed = False
        self.active = True
        self._n = {"submitted": 0, "completed": 0, "failed": 0, "cancelled": 0, "distilled": 0, "alone": 0}
        self._watcher = TeacherWatcher(registry, group, on_change=self._on_change, poll_s=poll_s)
        self._watcher.start()

    # ------------------------------------------------------------ membership

    def _on_change(self, snapshot: dict) -> None:
        """Watcher thread: open pools for new peers, close those of peers that left."""
        from ..pool import TeacherPool

        current = {r.teacher_id: r for r in snapshot.values() if r.teacher_id != self._self_id}
        joined, left = [], []
        with self._lock:
            if self._closed:
                return
            for tid, record in current.items():
                peer = self._peers.get(tid)
                if peer is None or not peer.stats.live:
                    pool = TeacherPool([record.endpoint], self._outputs, config=self._pool_config, trust_env=True)
                    self._peers[tid] = peer = _Peer(record, pool, self._step)
                    joined.append(peer)
                peer.record = record
                peer.stats = replace(peer.stats, version=_version(record.model_version))
            for tid, peer in self._peers.items():
                if peer.stats.live and tid not in current:
                    peer.stats = replace(peer.stats, live=False, left_step=self._step)
                    left.append(peer)
            remaining = sorted(p.stats.name for p in self._peers.values() if p.stats.live)
            step = self._step
            self._changed.notify_all()
        for peer in joined:
            logger.info("codistillation peer %s joined group %r at %s (version %s; our step %d)",
                        peer.stats.name, self._group, peer.record.endpoint, peer.record.model_version, step)
        for peer in left:
            logger.warning("codistillation peer %s (%s) left group %r at our step %d; %s", peer.stats.name,
                           peer.record.endpoint, self._group, step,
                           f"distilling from the {len(remaining)} remaining peer(s): {', '.join(remaining)}"
                           if remaining else "no peer left: training on labels alone until one joins")
            peer.pool.close()  # its pending answers fail now and are left out of their batches' means

    def set_step(self, step: int) -> None:
        """This peer's training step (staleness = step - a peer's version)."""
        with self._lock:
            self._step = int(step)

    def wait_for_peers(self, n: int = 1, timeout_s: float = 60.0, *, mature: bool = False) -> list[str]:
        """Block until ``n`` other peers are in the group (``mature``: serving version >= min_version).

        Returns their names. Raises NoTeacherAvailableError naming the group
        and who is there after ``timeout_s``.
        """
        def ready() -> list[str]:
            return [p.stats.name for p in self._peers.values()
                    if p.stats.live and (not mature or (p.stats.version or 0) >= self._min_version)]

        with self._changed:
            if not self._changed.wait_for(lambda: len(ready()) >= n, timeout=timeout_s):
                raise NoTeacherAvailableError(
                    f"waited {timeout_s:.0f} s for {n} other peer(s) in group {self._group!r}, found "
                    f"{', '.join(ready()) or 'none'}; start the other peers with the same registry and group")
            return ready()

    # ----------------------------------------------------------------- source

    def _usable(self) -> list[_Peer]:
        """Live peers that may serve a mature snapshot (a registry version lags; answers tell exactly)."""
        return [p for p in self._peers.values() if p.stats.live
                and (self._version_output is not None or (p.version() or -1) >= self._min_version)]

    def submit(self, request: SourceRequest) -> "Future[dict[str, TeacherValue]]":
        """Ask every usable peer; resolve to the mean of those that answer, or ``{}`` with none."""
        check_request(request)
        with self._lock:
            if self._closed:
                raise SourceClosedError("PeerSource is closed; create a new one to submit more batches")
            self._n["submitted"] += 1
            peers = self._usable() if self.active else []
            step = self._step
        out = _Chained()
        if not peers:
            self._resolve(out, [], {})
            return out
        parts: list[tuple[_Peer, Future]] = []
        for peer in peers:
            try:
                parts.append((peer, peer.pool.submit(request)))
                out.parts.append(parts[-1][1])
            except StudentError:  # its pool closed under us: it just left
                self._count_failure(peer)
        if not parts:
            self._resolve(out, [], {})
            return out
        when_all([f for _, f in parts], lambda: self._combine(request, out, parts, step))
        return out

    def _combine(self, request: SourceRequest, out: Future, parts: list[tuple[_Peer, Future]], step: int) -> None:
        answers, used = [], []
        for peer, f in parts:
            if not f.cancelled() and f.exception() is None:
                answer = dict(f.result())
                version = self._note_version(peer, answer)
                if version is not None and version < self._min_version:
                    continue  # still in its burn-in: it would teach noise
                answers.append(answer)
                used.append((peer, version))
            else:
                self._count_failure(peer)
                logger.debug("batch %s: peer %s gave no answer (%s)", request.batch_id, peer.stats.name,
                             "cancelled" if f.cancelled() else f.exception())
        try:
            result = mean_answers(answers, [1.0] * len(answers))
        except StudentError as exc:
            with self._lock:
                self._n["failed"] += 1
            settle(out, exc=exc)
            return
        self._resolve(out, used, result, step)

    def _resolve(self, out: Future, used: list[tuple[_Peer, int | None]], result: dict, step: int = 0) -> None:
        delivered = settle(out, result)
        with self._lock:
            if not delivered:  # the reader withdrew the batch
                self._n["cancelled"] += 1
                return
            for peer, version in used:
                mean = peer.stats.mean_staleness
                if version is not None:
                    peer.staleness_n += 1
                    peer.staleness_sum += step - version
                    mean = peer.staleness_sum / peer.staleness_n
                peer.stats = replace(peer.stats, answered=peer.stats.answered + 1, mean_staleness=mean)
            self._n["completed"] += 1
            self._n["distilled" if used else "alone"] += 1

    def _note_version(self, peer: _Peer, answer: dict) -> int | None:
        """Pop the answer's version output; record it and this answer's staleness."""
        raw = answer.pop(self._version_output, None) if self._version_output is not None else None
        with self._lock:
            if raw is None:
                return peer.version()
            version = decode_version(raw)
            peer.answer_version = version
            if version < self._min_version:
                peer.stats = replace(peer.stats, immature=peer.stats.immature + 1)
            return version

    def _count_failure(self, peer: _Peer) -> None:
        with self._lock:
            peer.stats = replace(peer.stats, failed=peer.stats.failed + 1)

    def stats(self) -> PeerSourceStats:
        """Batches answered and every peer seen, with its staleness from our current step."""
        with self._lock:
            n, step = dict(self._n), self._step
            peers = {tid: replace(p.stats, version=p.version(),
                                  staleness=None if p.version() is None else step - p.version())
                     for tid, p in self._peers.items()}
        return PeerSourceStats(step=step, peers=peers, **n)

    def close(self) -> None:
        """Stop watching the group and close every peer's pool (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pools = [p.pool for p in self._peers.values()]
        self._watcher.close()
        for pool in pools:
            pool.close()
