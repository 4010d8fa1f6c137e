"""Intermediate activations as teacher outputs: forward hooks on submodules named by module path.

A teacher served with ``--features layer3,layer4`` answers, besides its own
outputs, the activations of ``model.get_submodule("layer3")`` and
``...("layer4")`` under those names: they are listed in Describe with the
other outputs and requested like them (``OutputSpec("layer3")``, raw; any
transform, top-k and dtype apply as to logits). They are captured by forward
hooks inside the same batched forward pass, so a merged batch costs one
pass however many features it returns, and split back per request along
dim 0 like any output (a feature must be batch first).

Paths are those of ``model.named_modules()`` (``layer3``, ``layer3.1.conv2``,
``blocks.11``). Hooks need an ``nn.Module`` (a ``package.module:factory``
model, or an in-process module); TorchScript and ``torch.export`` programs
do not run Python hooks, so asking them for features is a clear error at
load time.

Threading: the batcher runs one forward pass at a time on its worker thread,
so one capture dict per tap is enough; :meth:`FeatureTap.collect` takes what
the pass left and clears it.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from teacher_server.errors import ConfigError

__all__ = ["FeatureTap", "attach_features", "parse_features"]


def parse_features(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"layer3,layer4"`` (or a list) -> ``("layer3", "layer4")``; duplicates and empty names refused."""
    if text is None or text == "":
        return ()
    items = [p.strip() for p in (text.split(",") if isinstance(text, str) else text)]
    if any(not p for p in items):
        raise ConfigError(f"--features takes module paths separated by commas (layer3,layer4), got {text!r}")
    dup = sorted({p for p in items if items.count(p) > 1})
    if dup:
        raise ConfigError(f"--features names {', '.join(dup)} more than once")
    return tuple(items)


def _submodule_names(module: torch.nn.Module, limit: int = 12) -> str:
    names = [n for n, _ in module.named_modules() if n and "." not in n]
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more or "(none)"


class FeatureTap:
    """Forward hooks capturing the outputs of ``paths`` (module paths) during each forward pass.

    Raises:
        ConfigError: the model is not an ``nn.Module`` (TorchScript/export), or
            a path names no submodule (the message lists the top-level ones).
    """

    def __init__(self, module: Any, paths: Sequence[str], *, where: str = "model") -> None:
        self.paths = tuple(paths)
        self._captured: dict[str, Any] = {}
        self._handles: list = []
        if not self.paths:
            return
        if not isinstance(module, torch.nn.Module) or isinstance(module, torch.jit.ScriptModule):
            raise ConfigError(f"{where}: --features needs a Python nn.Module (a package.module:factory model); "
                              f"a {type(module).__name__} runs no forward hooks. Serve the factory with "
                              "--checkpoint, or return the activations as outputs of the model")
        for path in self.paths:
            try:
                sub = module.get_submodule(path)
            except AttributeError:
                raise ConfigError(f"{where} has no submodule {path!r} for --features; its top-level modules are "
                                  f"{_submodule_names(module)} (paths as in model.named_modules())") from None
            self._handles.append(sub.register_forward_hook(self._hook(path)))

    def _hook(self, path: str):
        def capture(_module, _inputs, output) -> None:
            self._captured[path] = output

        return capture

    def collect(self, outputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The features the last forward pass produced, checked (tensors, no name clash with ``outputs``)."""
        got, self._captured = self._captured, {}
        out = {}
        for path in self.paths:
            if path in outputs:
                raise ConfigError(f"feature {path!r} has the name of a model output; the model already "
                                  "returns it (drop it from --features)")
            value = got.get(path)
            if value is None:
                raise ConfigError(f"submodule {path!r} (--features) did not run in the forward pass")
            if not isinstance(value, torch.Tensor):
                raise ConfigError(f"submodule {path!r} (--features) returns a {type(value).__name__}, not a "
                                  "tensor; pick a module whose output is one tensor")
            out[path] = value
        return out

    def close(self) -> None:
        """Remove the hooks (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()


def attach_features(model: Any, paths: Sequence[str]) -> Any:
    """Make a :class:`~teacher_server.model.LoadedModel` answer the activations of ``paths`` too; returns it.

    The tap's hooks fire inside ``LoadedModel.run``'s forward pass, which adds
    what they captured to the named outputs. The warm-up pass runs again, so
    Describe lists the features with the model's own outputs (and a feature
    that is not batch first, or not a tensor, fails at load time).
    """
    if not paths:
        return model
    if model.tap is not None:
        model.tap.close()
    model.tap = FeatureTap(model.module, paths, where=model.source)
    model.warm_up()
    return model
