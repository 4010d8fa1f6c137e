"""Replace a running teacher's model between forward passes (codistillation snapshots).

A codistillation peer serves a snapshot of its own weights and replaces it
every few hundred steps while students keep asking. Two steps, so no request
ever sees a half-written set of weights:

1. :func:`prepare_model` (any thread, off the event loop): wrap a *fresh*
   module (a copy of the trainer's weights, never the module being served)
   in a :class:`LoadedModel`, warm it up, and check that it takes and returns
   exactly what the served model does;
2. :func:`install_model` (on the server's event loop): swap the references
   the batcher, the servicer and the server hold, and bump the model version
   in ``config`` (Describe, every PredictResponse) and in the registry record
   (:class:`~teacher_server.registration.RegistryHook`, with its next heartbeat).

Why this is atomic: the batcher's worker thread calls ``self.model.run(batch)``
once per forward pass, which binds one ``LoadedModel`` (one module, one set of
weights) for the whole pass; rebinding ``batcher.model`` is a single reference
store. A pass already running finishes on the old module (which nobody writes
to), the next one starts on the new module. Loading new weights *into* the
served module (``load_state_dict`` in place) would instead let a running pass
read some layers old and some new; ``tests/test_teacher_swap.py`` shows both.

One thing is not exact: a PredictResponse names the version current when
it is *sent*, so a batch computed just before a swap and answered just after
it names the newer version (at most one swap ahead of its weights).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from teacher_server.errors import ConfigError, SignatureError
from teacher_server.model import LoadedModel

if TYPE_CHECKING:
    from teacher_server.server import TeacherServer

__all__ = ["install_model", "prepare_model", "swap_model"]

log = logging.getLogger(__name__)


def prepare_model(server: "TeacherServer", model: Any, *, source: str = "<swapped-in module>") -> LoadedModel:
    """``model`` (an ``nn.Module``/callable or a :class:`LoadedModel`) ready to replace ``server``'s.

    A module is wrapped with the served model's input signature, device and
    precision and warmed up (one forward pass). Pass a fresh module: the
    server keeps calling the one you hand over, so do not train it afterwards.

    Raises:
        SignatureError: the new model's inputs or outputs differ from the
            served model's (the message names both); students would break.
        ModelLoadError: its warm-up forward pass failed.
    """
    current = server.model
    if not isinstance(model, LoadedModel):
        if not callable(model):
            raise ConfigError(f"swap needs an nn.Module, a callable or a LoadedModel, got {type(model).__name__}")
        model = LoadedModel.from_module(model, current.inputs, device=str(current.device),
                                        precision=current.precision, source=source)
    if getattr(current, "tap", None) is not None and model.tap is None:  # keep answering the --features
        from teacher_server.features import attach_features

        attach_features(model, current.tap.paths)
    for what in ("inputs", "outputs"):
        old, new = getattr(current, what), getattr(model, what)
        if tuple(old) != tuple(new):
            raise SignatureError(
                f"cannot swap in {model.source}: its {what} are {', '.join(map(str, new)) or 'none'}, the served "
                f"model's are {', '.join(map(str, old)) or 'none'}; a swapped-in model must take and return the "
                "same tensors (same architecture), or start a new teacher for a different model")
    if model.device != current.device:
        raise SignatureError(f"cannot swap in {model.source} on {model.device}: the teacher serves on "
                             f"{current.device}; move the module there first")
    return model


def install_model(server: "TeacherServer", model: LoadedModel, version: str) -> None:
    """Serve ``model`` (from :func:`prepare_model`) as ``version`` from the next forward pass on.

    Call it on the server's event loop (``BackgroundTeacher.swap_model`` does),
    so the servicer never sees the new model with the old version between two
    of its steps. Raises ConfigError for an empty version or a server that
    is not started.
    """
    version = str(version)
    if not version:
        raise ConfigError("a swapped-in model needs a non-empty version (e.g. the training step)")
    if server.batcher is None:
        raise ConfigError("swap a teacher's model after TeacherServer.start(); before, pass the model to it")
    # Single reference stores; the batcher binds one model per forward pass.
    server.batcher.model = model
    servicer = getattr(server, "servicer", None)
    if servicer is not None:
        servicer.model = model
    server.model = model
    server.config.model_version = version  # shared by the servicer: Describe and every response
    hook = getattr(server, "registry_hook", None)
    if hook is not None:
        hook.set_model_version(version)  # never blocks: written with the next heartbeat
    log.debug("teacher %s now serves %s version %s", server.teacher_id, model.source, version)


async def swap_model(server: "TeacherServer", model: Any, version: str) -> LoadedModel:
    """Prepare (in a worker thread) and install ``model`` as ``version``; on the server's loop."""
    loaded = await asyncio.to_thread(prepare_model, server, model)
    install_model(server, loaded, version)
    return loaded
