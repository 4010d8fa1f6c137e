"""Loading teacher models and running their forward pass.

Three formats, none of which unpickles arbitrary objects:

* **TorchScript** files (``torch.jit.save``),
* **torch.export archives** (``.pt2``, ``torch.export.save``),
* **factories** ``package.module:function`` returning an ``nn.Module``, with an
  optional state-dict checkpoint read by ``torch.load(weights_only=True)`` and
  keyword arguments given as JSON.

The input signature (per-sample shape and dtype of each input) comes from, in
order: explicit ``input_specs`` (CLI ``--input-spec``), JSON embedded by
:func:`save_torchscript` / :func:`save_exported`, the exported program's own
input specs, or an ``edistill_inputs`` attribute of the factory's module.

Output names come from a warm-up forward pass at load time (which also proves
the model runs): one tensor is ``logits``, a tuple gives ``output0``,
``output1``..., a dict keeps its keys (see docs/internals.md;
:func:`protos.outputs.name_outputs`, which the student's in-process teacher
uses too).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import re
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from protos.outputs import name_outputs  # re-exported: the one output naming, shared with the student
from teacher_server.errors import ConfigError, ModelLoadError, SignatureError
from teacher_server.signature import (TensorSpec, coerce_specs, free_where_changed, signature_from_json,
                                      signature_to_json)

__all__ = ["LoadedModel", "load_model", "name_outputs", "save_exported", "save_torchscript"]

log = logging.getLogger(__name__)

#: Name of the signature JSON inside TorchScript / export archives.
SIGNATURE_FILE = "edistill_signature.json"

_FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}
# Batch used by the warm-up pass: 2, not 1, so a model that squeezes the batch
# dim or an export specialised to batch 1 is caught at startup.
_WARMUP_BATCH = 2
# Size given to free (-1) non-batch dims in the warm-up pass, then in a second pass that finds the
# output dims following them (shorter: within a position limit that allowed 8; odd: L // 2 differs too).
_WARMUP_FREE_DIM, _WARMUP_OTHER_FREE_DIM = 8, 5


@dataclass
class LoadedModel:
    """A model ready to serve: the callable plus its input and output signature.

    ``run`` is called from the batcher's worker thread, one batch at a time.
    """

    module: Callable[..., Any]
    inputs: tuple[TensorSpec, ...]
    source: str
    format: str  # "torchscript" | "export" | "factory" | "module"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"
    # Filled by warm_up(): per-sample shapes and raw dtypes of the outputs.
    outputs: tuple[TensorSpec, ...] = ()
    load_s: float = 0.0
    # teacher_server.hf.SequenceInfo for sequence models (mixed-length batching, token checks); else None.
    sequence: Any = None
    # teacher_server.features.FeatureTap: submodule activations answered as outputs (--features); else None.
    tap: Any = field(default=None, repr=False)

    @classmethod
    def from_module(
        cls,
        module: Callable[..., Any],
        inputs: Sequence[Any] | None = None,
        *,
        device: str = "cpu",
        precision: str = "fp32",
        source: str = "<in-process module>",
    ) -> "LoadedModel":
        """Wrap an in-process module (tests, codistillation) and warm it up.

        ``inputs`` defaults to the module's ``edistill_inputs`` attribute.
        """
        if inputs is None:
            inputs = getattr(module, "edistill_inputs", None)
            if inputs is None:
                raise SignatureError(f"{source}: pass inputs=[...] or set an edistill_inputs attribute")
        dev = _device(device)
        if isinstance(module, torch.nn.Module):
            module = module.to(dev).eval()
        model = cls(module, coerce_specs(inputs, where=source), source, "module", dev, precision)
        model.warm_up()
        return model

    @property
    def input_names(self) -> tuple[str, ...]:
        """Input names in signature order (the model's positional arguments)."""
        return tuple(s.name for s in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        """Output names, as discovered by the warm-up pass."""
        return tuple(s.name for s in self.outputs)

    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = _AUTOCAST.get(self.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def run(self, batch: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """One forward pass on host tensors ``batch`` (in input order, batch first).

        Returns the named outputs, still on the model's device.
        """
        if self.device.type == "cuda":
            # Pinned staging lets the H2D copy run async with the host thread.
            batch = [t.pin_memory().to(self.device, non_blocking=True) for t in batch]
        with torch.inference_mode(), self._autocast():
            outputs = name_outputs(self.module(*batch))
            if self.tap is not None:  # activations the hooks captured in this same pass
                outputs.update(self.tap.collect(outputs))
            return outputs

    def example_batch(self, batch_size: int = _WARMUP_BATCH, free_dim: int = _WARMUP_FREE_DIM) -> list[torch.Tensor]:
        """Synthetic inputs matching the signature (seeded, for warm-up and benchmarks)."""
        gen = torch.Generator().manual_seed(0)
        out = []
        for spec in self.inputs:
            shape = (batch_size, *(free_dim if d == -1 else d for d in spec.shape))
            if spec.dtype.is_floating_point:
                out.append(torch.randn(shape, generator=gen).to(spec.dtype))
            else:
                out.append(torch.zeros(shape, dtype=spec.dtype))
        return out

    def warm_up(self) -> None:
        """Run one forward pass to prove the model works and discover its outputs (free dims: -1)."""
        try:
            outs = self.run(self.example_batch())
        except Exception as exc:  # any model failure is a load failure here
            raise ModelLoadError(
                f"{self.source}: warm-up forward pass failed with inputs "
                f"{', '.join(f'{s.name}{s.describe_shape()} {s.dtype_name}' for s in self.inputs)}: "
                f"{type(exc).__name__}: {_first_line(exc)}; check the input signature (--input-spec)"
            ) from exc
        specs = []
        for name, t in outs.items():
            if t.dim() == 0 or t.shape[0] != _WARMUP_BATCH:
                raise ModelLoadError(
                    f"{self.source}: output {name!r} has shape {list(t.shape)} for a batch of "
                    f"{_WARMUP_BATCH}; every output must keep the batch as its first dimension"
                )
            # Float outputs are answered as float32 by default, whatever autocast produced.
            dtype = torch.float32 if t.dtype.is_floating_point else t.dtype
            try:
                specs.append(TensorSpec(name, dtype, tuple(t.shape[1:])))
            except ConfigError as exc:
                raise ModelLoadError(f"{self.source}: output {name!r}: {exc}") from None
        self.outputs = tuple(specs)
        if any(-1 in s.shape for s in self.inputs):  # the output dims that follow them are free, not 8
            try:
                outs = self.run(self.example_batch(free_dim=_WARMUP_OTHER_FREE_DIM))
                self.outputs = free_where_changed(specs, {n: t.shape[1:] for n, t in outs.items()})
            except Exception as exc:  # the first pass ran: serve with the shapes it saw
                log.warning("model %s: warm-up with free dims of %d failed (%s); outputs declared as seen at %d",
                            self.source, _WARMUP_OTHER_FREE_DIM, _first_line(exc), _WARMUP_FREE_DIM)
        log.info("model %s ready: inputs %s -> outputs %s", self.source,
                 ", ".join(map(str, self.inputs)), ", ".join(map(str, self.outputs)))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _device(device: str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r} does not exist; this host has {torch.cuda.device_count()} GPU(s)")
    return dev


# ----------------------------------------------------------------- saving


@contextlib.contextmanager
def _quiet_jit_deprecation():
    # torch >= 2.10 deprecates TorchScript but still loads it; serving a
    # TorchScript file is the user's explicit choice, so don't nag at startup.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated", category=DeprecationWarning)
        yield


def save_torchscript(model: torch.nn.Module, path: str | os.PathLike, inputs: Sequence[Any]) -> None:
    """Script (or trace, if scripting fails) ``model`` and save it with its signature embedded.

    Args:
        inputs: the input signature, e.g. ``[("image", "float32", (3, 32, 32))]``.
    """
    specs = coerce_specs(inputs, where=str(path))
    model = model.eval()
    with _quiet_jit_deprecation():
        _save_torchscript(model, path, specs)


def _save_torchscript(model: torch.nn.Module, path: str | os.PathLike, specs: tuple[TensorSpec, ...]) -> None:
    if isinstance(model, torch.jit.ScriptModule):
        scripted = model
    else:
        try:
            scripted = torch.jit.script(model)
        except Exception:  # not scriptable (dynamic Python): fall back to tracing
            example = LoadedModel(model, specs, str(path), "module").example_batch()
            with torch.no_grad():
                scripted = torch.jit.trace(model, tuple(example))
    torch.jit.save(scripted, os.fspath(path), _extra_files={SIGNATURE_FILE: signature_to_json(specs)})


def save_exported(model: torch.nn.Module, path: str | os.PathLike, inputs: Sequence[Any]) -> None:
    """``torch.export`` ``model`` with a dynamic batch dim and save it (``.pt2``) with its signature."""
    specs = coerce_specs(inputs, where=str(path))
    model = model.eval()
    example = LoadedModel(model, specs, str(path), "module").example_batch()
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    dynamic = tuple({0: batch} for _ in specs)
    ep = torch.export.export(model, tuple(example), dynamic_shapes=dynamic)
    torch.export.save(ep, os.fspath(path), extra_files={SIGNATURE_FILE: signature_to_json(specs)})


# ----------------------------------------------------------------- loading


def load_model(
    spec: str,
    *,
    device: str = "cpu",
    precision: str = "fp32",
    checkpoint: str | None = None,
    model_kwargs: Mapping[str, Any] | str | None = None,
    input_specs: Sequence[Any] | None = None,
    trust_model_file: bool = False,
    trust_remote_code: bool = False,
    features: Sequence[str] = (),
) -> LoadedModel:
    """Load ``spec`` (a file path or ``package.module:factory``), move it to ``device``, warm it up.

    Raises:
        ModelLoadError: missing/corrupt/unsupported file, failing factory or warm-up.
        SignatureError: no input signature could be determined.
        ConfigError: inconsistent options (e.g. ``checkpoint`` with a file model).

    ``trust_model_file=True`` (CLI ``--trust-model-file``) additionally accepts a
    pickled ``torch.save(model)`` file. Unpickling runs arbitrary code from the
    file, so this is refused by default (SECURITY.md).

    A directory with a ``config.json`` is a Hugging Face causal LM
    (:mod:`teacher_server.hf`; ``trust_remote_code`` only for its own code).

    ``features`` (``--features``): module paths whose activations are answered
    as outputs too (:mod:`teacher_server.features`).
    """
    from teacher_server import hf  # here: hf imports this module
    from teacher_server.features import attach_features

    if hf.is_hf_dir(spec):
        hf.check_options({"--checkpoint": checkpoint, "--model-kwargs": model_kwargs, "--input-spec": input_specs})
        model = hf.load_hf_model(spec, device=device, precision=precision, trust_remote_code=trust_remote_code)
        return attach_features(model, features)
    t0 = time.perf_counter()
    dev = _device(device)
    explicit = coerce_specs(input_specs, where="--input-spec") if input_specs else None
    if _FACTORY_RE.match(spec) and not os.path.exists(spec):
        kwargs = _parse_kwargs(model_kwargs)
        module, embedded = _load_factory(spec, kwargs, checkpoint)
        module = module.to(dev).eval()
        fmt = "factory"
    else:
        if checkpoint is not None or model_kwargs:
            raise ConfigError("--checkpoint and --model-kwargs apply only to package.module:factory models, "
                              f"not to the model file {spec!r}")
        fmt = _sniff_format(spec, trust_model_file)
        if fmt == "pickle":
            module, embedded = _load_pickled_module(spec, dev)
        elif fmt == "torchscript":
            module, embedded = _load_torchscript(spec, dev)
        else:
            module, embedded = _load_exported(spec, dev)
    inputs = explicit or embedded
    if not inputs:
        raise SignatureError(
            f"{spec}: cannot tell the model's inputs; pass --input-spec NAME:DTYPE:D1,D2,... "
            "(e.g. --input-spec image:float32:3,32,32), or save the model with "
            "teacher_server.save_torchscript/save_exported(..., inputs=[...])"
        )
    model = LoadedModel(module, inputs, spec, fmt, dev, precision)
    model.warm_up()
    attach_features(model, features)
    model.load_s = time.perf_counter() - t0
    return model


def _parse_kwargs(model_kwargs: Mapping[str, Any] | str | None) -> dict[str, Any]:
    if model_kwargs is None or model_kwargs == "":
        return {}
    if isinstance(model_kwargs, str):
        try:
            model_kwargs = json.loads(model_kwargs)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--model-kwargs must be a JSON object, got {model_kwargs!r} ({exc})") from None
    if not isinstance(model_kwargs, Mapping):
        raise ConfigError(f"--model-kwargs must be a JSON object, got {model_kwargs!r}")
    return dict(model_kwargs)


def _load_factory(spec: str, kwargs: dict[str, Any], checkpoint: str | None) -> tuple[torch.nn.Module, tuple]:
    mod_name, attr = spec.split(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ModelLoadError(f"cannot import {mod_name!r} for --model {spec}: {exc}; "
                             "is the package installed or on PYTHONPATH?") from exc
    except Exception as exc:  # the module's own code raised (SyntaxError, RuntimeError at import, ...)
        where = f" ({exc.filename}:{exc.lineno})" if isinstance(exc, SyntaxError) and exc.filename else ""
        raise ModelLoadError(f"importing {mod_name!r} for --model {spec} raised {type(exc).__name__}{where}: "
                             f"{_first_line(exc)}") from exc
    factory = getattr(mod, attr, None)
    if not callable(factory):
        raise ModelLoadError(f"--model {spec}: {mod_name} has no callable {attr!r}")
    try:
        module = factory(**kwargs)
    except TypeError as exc:
        raise ModelLoadError(f"--model {spec}: factory rejected --model-kwargs {kwargs}: {exc}") from exc
    except Exception as exc:
        raise ModelLoadError(f"--model {spec}: factory raised {type(exc).__name__}: {_first_line(exc)}") from exc
    if not isinstance(module, torch.nn.Module):
        raise ModelLoadError(f"--model {spec}: factory returned {type(module).__name__}, not a torch.nn.Module")
    if checkpoint is not None:
        _load_checkpoint(module, checkpoint)
    declared = getattr(module, "edistill_inputs", None) or getattr(factory, "edistill_inputs", None)
    return module, coerce_specs(declared, where=spec) if declared else ()


def _load_checkpoint(module: torch.nn.Module, path: str) -> None:
    if not os.path.isfile(path):
        raise ModelLoadError(f"checkpoint {path!r} does not exist; check --checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, zip errors, ...
        raise ModelLoadError(
            f"checkpoint {path!r} cannot be read as a state dict with weights_only=True "
            f"({type(exc).__name__}: {_first_line(exc)}); save it with torch.save(model.state_dict(), path)"
        ) from exc
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]  # Lightning-style wrapper
    if not isinstance(state, Mapping):
        raise ModelLoadError(f"checkpoint {path!r} holds a {type(state).__name__}, not a state dict")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"checkpoint {path!r} does not fit the model: {_state_dict_mismatch(module, state, exc)}; "
                             "check --model-kwargs and that the checkpoint is this model's") from exc


# Keys named per list in a checkpoint mismatch message; the rest are counted.
_MAX_KEYS_SHOWN = 5


def _key_list(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:_MAX_KEYS_SHOWN])
    return shown + (f" ... and {len(keys) - _MAX_KEYS_SHOWN} more" if len(keys) > _MAX_KEYS_SHOWN else "")


def _state_dict_mismatch(module: torch.nn.Module, state: Mapping[str, Any], exc: Exception) -> str:
    """One line saying how ``state`` differs from ``module``'s own state dict (keys, then shapes)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {_key_list(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {_key_list(unexpected)}")
    shapes = [f"{k} {list(state[k].shape)} vs model {list(v.shape)}" for k, v in own.items()
              if k in state and isinstance(state[k], torch.Tensor) and isinstance(v, torch.Tensor)
              and state[k].shape != v.shape]
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es): {_key_list(shapes)}")
    if not parts:  # something else load_state_dict refused: its own text, on one line
        text = " ".join(str(exc).split())
        parts.append(text if len(text) <= 300 else text[:300] + " ...")
    return "; ".join(parts)


def _sniff_format(path: str, trust_model_file: bool = False) -> str:
    if not os.path.exists(path):
        raise ModelLoadError(f"model file {path!r} does not exist; give a TorchScript file, a .pt2 "
                             "torch.export archive or package.module:factory")
    if os.path.isfile(path) and trust_model_file and not zipfile.is_zipfile(path):
        return "pickle"  # legacy (non-zip) torch.save format
    if not os.path.isfile(path) or not zipfile.is_zipfile(path):
        raise ModelLoadError(
            f"model file {path!r} is not a TorchScript or torch.export archive (not a zip file); "
            "it may be corrupt or a pickled torch.save() checkpoint: re-save it with "
            "teacher_server.save_torchscript or serve it as package.module:factory --checkpoint FILE"
        )
    try:
        names = zipfile.ZipFile(path).namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelLoadError(f"model file {path!r} is a corrupt archive ({exc}); re-save or re-download it") from exc
    if any(n.endswith("/archive_format") or n == "archive_format" for n in names):
        return "export"
    if any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names):
        return "torchscript"
    if any(n.endswith("/data.pkl") for n in names):
        if trust_model_file:
            return "pickle"
        raise ModelLoadError(
            f"model file {path!r} is a torch.save() checkpoint, which would need unpickling (runs code from "
            "the file); serve it as package.module:factory --checkpoint FILE (state dict), re-save it with "
            "save_torchscript, or pass --trust-model-file if you made this file yourself"
        )
    raise ModelLoadError(f"model file {path!r} is a zip archive but neither TorchScript nor torch.export")


def _load_pickled_module(path: str, dev: torch.device) -> tuple[Any, tuple]:
    """``torch.save(model)`` file, only with --trust-model-file: unpickling runs the file's code."""
    log.warning("unpickling model file %s (--trust-model-file): this runs code from the file", path)
    try:
        obj = torch.load(path, map_location=dev, weights_only=False)
    except Exception as exc:
        if isinstance(exc, AttributeError) and "__main__" in str(exc):
            # torch.save(model) from a script stores the class as __main__.Name, which only that script defines.
            raise ModelLoadError(
                f"model file {path!r} was pickled from a script: its model class lives in that script's "
                f"__main__ ({_first_line(exc)}), which the teacher cannot import; export it with "
                "teacher_server.save_torchscript(model, path, ...) (or torch.export), or move the class into "
                "a module and serve it as package.module:factory --checkpoint state_dict.pt") from exc
        raise ModelLoadError(f"model file {path!r} cannot be unpickled ({type(exc).__name__}: "
                             f"{_first_line(exc)}); it may be corrupt or need modules that are not installed") from exc
    if not isinstance(obj, torch.nn.Module):
        raise ModelLoadError(f"model file {path!r} holds a {type(obj).__name__}, not a torch.nn.Module; "
                             "a state dict is served as package.module:factory --checkpoint FILE")
    declared = getattr(obj, "edistill_inputs", None)
    return obj.to(dev).eval(), coerce_specs(declared, where=path) if declared else ()


def _load_torchscript(path: str, dev: torch.device) -> tuple[Any, tuple]:
    extra = {SIGNATURE_FILE: ""}
    try:
        with _quiet_jit_deprecation():
            module = torch.jit.load(path, map_location=dev, _extra_files=extra)
    except Exception as exc:
        raise ModelLoadError(f"TorchScript file {path!r} cannot be loaded ({type(exc).__name__}: "
                             f"{_first_line(exc)}); it may be corrupt or from a newer torch: re-save it") from exc
    module.eval()
    text = extra[SIGNATURE_FILE]
    return module, signature_from_json(text, where=path) if text else ()


def _load_exported(path: str, dev: torch.device) -> tuple[Any, tuple]:
    extra = {SIGNATURE_FILE: ""}
    try:
        ep = torch.export.load(path, extra_files=extra)
    except Exception as exc:
        raise ModelLoadError(f"torch.export archive {path!r} cannot be loaded ({type(exc).__name__}: "
                             f"{_first_line(exc)}); it may be corrupt or from a newer torch: re-export it") from exc
    text = extra[SIGNATURE_FILE]
    specs = signature_from_json(text, where=path) if text else _exported_input_specs(ep, path)
    return ep.module().to(dev), specs


def _exported_input_specs(ep: "torch.export.ExportedProgram", path: str) -> tuple[TensorSpec, ...]:
    """Signature from the exported graph's user-input placeholders (batch = dim 0)."""
    user = set(ep.graph_signature.user_inputs)
    specs = []
    for node in ep.graph.nodes:
        if node.op != "placeholder" or node.name not in user:
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dim() == 0:
            raise SignatureError(f"{path}: input {node.name!r} is not a batched tensor; pass --input-spec")
        shape = tuple(d if isinstance(d, int) else -1 for d in val.shape[1:])
        specs.append(TensorSpec(node.name, val.dtype, shape))
    return tuple(specs)
