"""Codistillation: peers that train on their own data and distil from each other's stale snapshots.

Reference: R. Anil, G. Pereyra, A. Passos, R. Ormandi, G. E. Dahl, G. E.
Hinton, "Large scale distributed neural network training through online
distillation", ICLR 2018, arXiv:1804.03235.

Each peer ``i`` minimises, on its own shard, after ``burn_in`` steps::

    L_i = CE(s_i, y) + w · T² · KL( mean_{j≠i} q_j  ‖  softmax(s_i / T) )

where ``q_j`` is peer j's prediction from its latest published snapshot
(exchanged every ``exchange_every`` steps, so up to that many steps stale);
before ``burn_in`` it is plain training (``L_i = CE``). The paper exchanges
every 50 updates; a later study found intervals up to 2,500 steps robust.

How it runs here: every peer serves its own snapshot with a teacher server
in its process (:class:`~teacher_server.inprocess.BackgroundTeacher`),
registered in the registry under the *peer group* with the training step as
its model version; a new snapshot replaces the served one between forward
passes (:mod:`teacher_server.swap`, never a half-written set of weights). The
other peers' predictions arrive through an ordinary
:class:`~student_client.reader.DistillReader` over a
:class:`~student_client.recipes.peers.PeerSource`, which follows the group,
leaves this peer out, averages the others and survives peers that die or
join late. Peers can be processes on other machines (``host``/``advertise``)
or the ranks of a ``torchrun`` job (no process group needed: the registry
is the meeting point)::

    co = Codistillation(model, loader, CodistillConfig(registry=url, group="digits"))
    with co:
        for epoch in range(epochs):
            for (x, y), peers in co:          # peers: the others' mean prediction, or {}
                loss = co.loss(model(x), peers, y)
                opt.zero_grad(); loss.backward(); opt.step()
                co.step()                     # counts, publishes a snapshot every exchange_every
"""

from __future__ import annotations

import copy
import logging
import math
import os
import socket
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from protos.outputs import name_outputs

from ..errors import ConfigError
from ..losses import CELoss, KDLoss
from .peers import VERSION_OUTPUT, PeerSource, PeerSourceStats, encode_version

__all__ = ["CodistillConfig", "Codistillation", "Snapshot"]

logger = logging.getLogger(__name__)


def default_peer_name() -> str:
    """``rank<RANK>@<host>`` under torchrun, else ``<host>-<pid>``."""
    rank = os.environ.get("RANK")
    return f"rank{rank}@{socket.gethostname()}" if rank is not None else f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class CodistillConfig:
    """Settings of one codistillation peer (every peer of a group should use the same ones).

    Raises:
        ConfigError: at construction, naming the field and the bad value.
    """

    # Redis URL of the registry the peers meet in.
    registry: str
    # The peer group: the registry service every peer of this job registers under.
    group: str
    # This peer's name in logs and stats (its record's model_name); None: default_peer_name().
    name: str | None = None
    # Steps between published snapshots. The paper exchanges every 50 updates.
    exchange_every: int = 50
    # Steps of plain training before distilling; other peers also ignore our
    # snapshots until they are this old, since an untrained peer teaches noise.
    burn_in: int = 100
    # w, the weight of the distillation term beside the label CE.
    distill_weight: float = 1.0
    # T of the distillation term (the paper distils the plain predictions, T=1).
    temperature: float = 1.0
    # Batches in flight to the peers: 2 hides a peer's answer latency behind
    # one training step without making the targets much staler.
    window: int = 2
    # Where this peer's teacher server listens; "0.0.0.0" plus advertise= for other machines.
    host: str = "127.0.0.1"
    advertise: str | None = None
    # Registry heartbeat and entry TTL: a SIGKILLed peer is dropped within ttl_s.
    heartbeat_s: float = 0.5
    ttl_s: float = 1.5
    # How long one peer may take to answer a batch before it is left out of it.
    peer_timeout_s: float = 5.0
    # Device of the served snapshot (a copy of the model; "cpu" keeps the GPU for training).
    serve_device: str = "cpu"

    def __post_init__(self) -> None:
        if not isinstance(self.registry, str) or not self.registry:
            raise ConfigError(f"registry must be a Redis URL such as 'redis://host:6379/0', got {self.registry!r}")
        if not isinstance(self.group, str) or not self.group:
            raise ConfigError(f"group must be a non-empty peer group name, got {self.group!r}")
        for name in ("exchange_every", "window"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {v!r}")
        if isinstance(self.burn_in, bool) or not isinstance(self.burn_in, int) or self.burn_in < 0:
            raise ConfigError(f"burn_in must be an int >= 0, got {self.burn_in!r}")
        for name, low in (("distill_weight", 0.0), ("temperature", 0.0), ("peer_timeout_s", 0.0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < low \
                    or (name != "distill_weight" and v == 0):
                raise ConfigError(f"{name} must be a finite number {'>= 0' if name == 'distill_weight' else '> 0'}"
                                  f", got {v!r}")
        if not self.ttl_s > self.heartbeat_s > 0:
            raise ConfigError(f"need ttl_s > heartbeat_s > 0, got ttl_s={self.ttl_s} heartbeat_s={self.heartbeat_s}")


class Snapshot(torch.nn.Module):
    """A frozen copy of a peer's model that also answers the step it was taken at.

    Outputs the model's own (named as a teacher names them) plus ``version``
    (``(B, 2)``, :func:`~student_client.recipes.peers.encode_version`),
    computed in the same forward pass, so every answer names the weights
    that produced it.
    """

    def __init__(self, model: torch.nn.Module, step: int) -> None:
        super().__init__()
        self.model = model
        self.step = int(step)

    def forward(self, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        named = dict(name_outputs(self.model(*inputs)))
        named[VERSION_OUTPUT] = encode_version(self.step, inputs[0].shape[0])  # (B, 2)
        return named


class Codistillation:
    """One peer of a codistillation group: serves its snapshots, distils from the others.

    Args:
        model: the peer's model (trained by the caller's loop).
        loader: this peer's shard, as any iterable of batches (a DataLoader).
        config: the peer's :class:`CodistillConfig`.
        inputs: the model's input signature for serving, e.g.
            ``[("x", "float32", (64,))]``; default ``model.edistill_inputs``.
        teacher_input: ``batch -> inputs`` for the reader (default: the first
            element of a tuple batch).

    ``start()`` (or ``with``) serves the first snapshot (version 0) and joins
    the group; iterate it for epochs of ``(batch, peers)``; call :meth:`step`
    after each optimizer step; :meth:`stats` has every peer's staleness.
    """

    def __init__(self, model: Any, loader: Any, config: CodistillConfig, *, inputs: Any = None,
                 teacher_input: Callable[[Any], Any] | None = None) -> None:
        if not isinstance(config, CodistillConfig):
            raise ConfigError(f"config must be a CodistillConfig, got {type(config).__name__}")
        inputs = inputs if inputs is not None else getattr(model, "edistill_inputs", None)
        if inputs is None:
            raise ConfigError("Codistillation serves the model to its peers and needs its input signature: "
                              "pass inputs=[('x', 'float32', (features,))] (per-sample shape) or set "
                              "model.edistill_inputs")
        self.model = model
        self.config = config
        self.name = config.name or default_peer_name()
        self._loader = loader
        self._inputs = inputs
        self._teacher_input = teacher_input
        self._kd = KDLoss(temperature=config.temperature)  # needs log_probs of "logits" at T
        self._ce = CELoss()
        self._step = 0
        self._published = -1
        self.teacher = None  # the BackgroundTeacher serving our snapshot
        self.source: PeerSource | None = None
        self.reader = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> "Codistillation":
        """Serve snapshot 0, register in the group, and start following the other peers."""
        from teacher_server import BackgroundTeacher, LoadedModel, TeacherConfig
        from teacher_server.registration import RegistryHook

        from ..reader import DistillReader

        cfg = self.config
        loaded = LoadedModel.from_module(self._snapshot(0), self._inputs, device=cfg.serve_device,
                                         source=f"codistillation peer {self.name}")
        tcfg = TeacherConfig(model_name=self.name, model_version="0", host=cfg.host, port=0,
                             advertise=cfg.advertise, device=cfg.serve_device)

        def configure(server) -> None:
            RegistryHook(server, cfg.registry, cfg.group, heartbeat_s=cfg.heartbeat_s, ttl_s=cfg.ttl_s)

        self.teacher = BackgroundTeacher(tcfg, loaded, configure=configure).start()
        self._published = 0
        try:
            self.source = PeerSource(cfg.registry, cfg.group, self._kd, self_id=self.teacher.server.teacher_id,
                                     min_version=cfg.burn_in, peer_timeout_s=cfg.peer_timeout_s,
                                     poll_s=cfg.heartbeat_s)
            self.source.active = cfg.burn_in == 0
            self.reader = DistillReader(self._loader, self.source, window=cfg.window,
                                        teacher_input=self._teacher_input)
        except BaseException:
            self.close()
            raise
        logger.info("codistillation peer %s serving at %s in group %r (exchange every %d steps, burn-in %d)",
                    self.name, self.teacher.address, cfg.group, cfg.exchange_every, cfg.burn_in)
        return self

    def close(self) -> None:
        """Leave the group: stop the reader and the peer pools, deregister and stop serving."""
        for part in (self.reader, self.source):
            if part is not None:
                part.close()
        if self.teacher is not None:
            self.teacher.close()
            self.teacher = None

    def __enter__(self) -> "Codistillation":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------- training

    def __iter__(self) -> Iterator[tuple[Any, dict]]:
        """One epoch of ``(batch, peers)`` over this peer's shard (``peers`` is ``{}`` with no peer)."""
        if self.reader is None:
            raise ConfigError("call start() (or use `with Codistillation(...)`) before iterating")
        return iter(self.reader)

    @property
    def steps(self) -> int:
        """Optimizer steps counted by :meth:`step` so far."""
        return self._step

    def loss(self, logits: Any, peers: Any, labels: Any) -> Any:
        """``CE(logits, labels) + w · T²·KL(peers' mean ‖ softmax(logits/T))``; CE alone when ``peers`` is empty."""
        loss = self._ce(logits, None, labels)
        if peers and "logits" in peers and self.config.distill_weight > 0:
            loss = loss + self.config.distill_weight * self._kd(logits, peers)
        return loss

    def step(self) -> None:
        """Count one optimizer step; publish a snapshot every ``exchange_every`` steps; end burn-in."""
        self._step += 1
        assert self.source is not None, "call start() first"
        self.source.set_step(self._step)
        if self._step >= self.config.burn_in:
            self.source.active = True
        if self._step % self.config.exchange_every == 0 or self._step == self.config.burn_in:
            self.publish()  # at burn-in too, so the others can use us from then on

    def publish(self) -> None:
        """Serve a snapshot of the current weights, versioned with the current step."""
        if self.teacher is None:
            raise ConfigError("call start() first")
        if self._published == self._step:
            return
        self.teacher.swap_model(self._snapshot(self._step), str(self._step),
                                source=f"codistillation peer {self.name} step {self._step}")
        self._published = self._step

    def _snapshot(self, step: int) -> Any:
        """A fresh copy of the weights at ``step``, for serving (the trained module itself is never served)."""
        snap = copy.deepcopy(self.model).to(self.config.serve_device).eval()
        return Snapshot(snap, step)

    def wait_for_peers(self, n: int = 1, timeout_s: float = 60.0) -> list[str]:
        """Block until ``n`` other peers have joined the group (NoTeacherAvailableError after ``timeout_s``)."""
        if self.source is None:
            raise ConfigError("call start() first")
        return self.source.wait_for_peers(n, timeout_s)

    def stats(self) -> PeerSourceStats:
        """Our step, every peer seen (version, staleness = our step - its version, answered), departures."""
        if self.source is None:
            raise ConfigError("call start() first")
        return self.source.stats()
