"""Model loading: TorchScript, torch.export archives, factories; signatures; bad files."""

from __future__ import annotations

import pathlib

import pytest
import torch
from torch import nn

from teacher_server import (
    ConfigError,
    LoadedModel,
    ModelLoadError,
    SignatureError,
    TensorSpec,
    load_model,
    parse_input_spec,
    save_exported,
    save_torchscript,
    zoo,
)

MLP_INPUTS = [("input", "float32", (64,))]


class TwoHeads(nn.Module):
    """Tuple output, no declared signature (tests --input-spec and output naming)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor):
        y = self.lin(x) * mask.unsqueeze(-1)  # (B, 3)
        return y, y.sum(-1, keepdim=True)  # (B, 3), (B, 1)


def two_heads() -> nn.Module:
    return TwoHeads()


class DictOut(nn.Module):
    edistill_inputs = [("tokens", "int64", (-1,))]

    def forward(self, tokens: torch.Tensor):
        emb = tokens.float().unsqueeze(-1) * torch.ones(4)  # (B, T, 4)
        return {"features": emb, "pooled": emb.mean(1)}  # (B, T, 4), (B, 4)


def dict_out() -> nn.Module:
    return DictOut()


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return zoo.mlp(hidden=32).eval()


def _x(n: int = 5) -> torch.Tensor:
    return torch.randn(n, 64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("saver", [save_torchscript, save_exported], ids=["torchscript", "export"])
def test_saved_file_roundtrip(tmp_path: pathlib.Path, saver) -> None:
    net = _mlp()
    path = tmp_path / "mlp.pt2"
    saver(net, path, inputs=MLP_INPUTS)
    model = load_model(str(path))
    assert model.format == ("torchscript" if saver is save_torchscript else "export")
    assert model.inputs == (TensorSpec("input", torch.float32, (64,)),)
    assert model.outputs == (TensorSpec("logits", torch.float32, (10,)),)
    x = _x()
    for n in (1, 5):  # batch 1 works too (export uses a dynamic batch dim)
        torch.testing.assert_close(model.run([x[:n]])["logits"], net(x[:n]))


def test_plain_export_archive_signature_from_input_specs(tmp_path: pathlib.Path) -> None:
    net = _mlp()
    ep = torch.export.export(net, (_x(4),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(ep, tmp_path / "plain.pt2")
    model = load_model(str(tmp_path / "plain.pt2"))
    assert [(s.dtype, s.shape) for s in model.inputs] == [(torch.float32, (64,))]


def test_factory_with_checkpoint_and_kwargs(tmp_path: pathlib.Path) -> None:
    torch.manual_seed(3)
    net = zoo.mlp(hidden=16, num_classes=5)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    model = load_model("teacher_server.zoo:mlp", checkpoint=str(tmp_path / "w.pt"),
                       model_kwargs='{"hidden": 16, "num_classes": 5}')
    assert model.format == "factory" and model.outputs[0].shape == (5,)
    x = _x()
    torch.testing.assert_close(model.run([x])["logits"], net.eval()(x))


def test_factory_signature_from_input_spec_and_tuple_outputs() -> None:
    specs = ["x:float32:8", "mask:float32:"]
    model = load_model("tests.test_teacher_model:two_heads", input_specs=specs)
    assert model.input_names == ("x", "mask")
    assert model.outputs == (TensorSpec("output0", torch.float32, (3,)), TensorSpec("output1", torch.float32, (1,)))


def test_dict_outputs_and_free_dims() -> None:
    model = load_model("tests.test_teacher_model:dict_out")
    assert model.inputs == (TensorSpec("tokens", torch.int64, (-1,)),)
    assert model.output_names == ("features", "pooled")
    assert model.run([torch.ones(2, 7, dtype=torch.int64)])["features"].shape == (2, 7, 4)


def test_input_spec_overrides_embedded(tmp_path: pathlib.Path) -> None:
    save_torchscript(_mlp(), tmp_path / "m.ts", inputs=MLP_INPUTS)
    model = load_model(str(tmp_path / "m.ts"), input_specs=["features:float32:64"])
    assert model.input_names == ("features",)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("image:float32:3,32,32", TensorSpec("image", torch.float32, (3, 32, 32))),
        ("tokens:int64:-1", TensorSpec("tokens", torch.int64, (-1,))),
        ("flag:bool:", TensorSpec("flag", torch.bool, ())),
    ],
)
def test_parse_input_spec(text: str, expected: TensorSpec) -> None:
    assert parse_input_spec(text) == expected
    assert str(expected) == text


@pytest.mark.parametrize("text, needle", [
    ("image", "must look like NAME:DTYPE"),
    ("image:float64:3", "unknown dtype 'float64'"),
    ("image:float32:3,x", "dims must be integers"),
    ("image:float32:0", "dims must be positive or -1"),
])
def test_parse_input_spec_errors(text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        parse_input_spec(text)


def test_no_signature_is_a_clear_error() -> None:
    with pytest.raises(SignatureError, match="--input-spec"):
        load_model("tests.test_teacher_model:two_heads")


def _write(path: pathlib.Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _bad_files(tmp: pathlib.Path) -> dict[str, tuple[str, str]]:
    """case -> (model spec, expected message fragment)."""
    save_torchscript(_mlp(), tmp / "good.ts", inputs=MLP_INPUTS)
    good = (tmp / "good.ts").read_bytes()
    torch.save(_mlp(), tmp / "pickled.pt")  # full-model pickle: refused
    return {
        "missing": (str(tmp / "nope.pt"), "does not exist"),
        "garbage": (_write(tmp / "garbage.pt", b"not a model" * 100), "not a zip file"),
        "truncated": (_write(tmp / "trunc.ts", good[: len(good) // 2]), "not a zip file"),
        "pickled-full-model": (str(tmp / "pickled.pt"), r"torch\.save\(\) checkpoint"),
        "bad-factory-module": ("no_such_pkg.models:build", "cannot import 'no_such_pkg.models'"),
        "bad-factory-attr": ("teacher_server.zoo:nope", "no callable 'nope'"),
    }


@pytest.mark.parametrize("case", ["missing", "garbage", "truncated", "pickled-full-model",
                                  "bad-factory-module", "bad-factory-attr"])
def test_bad_model_files(tmp_path: pathlib.Path, case: str) -> None:
    spec, needle = _bad_files(tmp_path)[case]
    with pytest.raises(ModelLoadError, match=needle) as info:
        load_model(spec)
    msg = str(info.value)
    assert "\n" not in msg  # one line for the CLI
    assert spec.split(":")[0] in msg or spec in msg  # names the file / module


def test_bad_checkpoints(tmp_path: pathlib.Path) -> None:
    torch.save({"wrong.weight": torch.zeros(2)}, tmp_path / "wrong.pt")
    with pytest.raises(ModelLoadError, match="does not fit the model"):
        load_model("teacher_server.zoo:mlp", checkpoint=str(tmp_path / "wrong.pt"))
    torch.save({"state": _mlp()}, tmp_path / "objects.pt")  # pickled module inside: weights_only refuses
    with pytest.raises(ModelLoadError, match="weights_only=True"):
        load_model("teacher_server.zoo:mlp", checkpoint=str(tmp_path / "objects.pt"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("teacher_server.zoo:mlp", checkpoint=str(tmp_path / "absent.pt"))


def test_option_errors(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ConfigError, match="--model-kwargs must be a JSON object"):
        load_model("teacher_server.zoo:mlp", model_kwargs="{hidden: 3")
    with pytest.raises(ModelLoadError, match="factory rejected --model-kwargs"):
        load_model("teacher_server.zoo:mlp", model_kwargs='{"colour": 3}')
    save_torchscript(_mlp(), tmp_path / "m.ts", inputs=MLP_INPUTS)
    with pytest.raises(ConfigError, match="apply only to package.module:factory"):
        load_model(str(tmp_path / "m.ts"), checkpoint="w.pt")


def test_wrong_input_spec_fails_warm_up() -> None:
    with pytest.raises(ModelLoadError, match="warm-up forward pass failed"):
        load_model("teacher_server.zoo:mlp", input_specs=["input:float32:63"])


def test_from_module_uses_edistill_inputs() -> None:
    model = LoadedModel.from_module(zoo.latency(delay_ms=0))
    assert model.input_names == ("input",) and model.output_names == ("logits",)
    out = model.run([torch.tensor([[7.0, 0, 0, 0]])])["logits"]
    assert out[0, 0].item() == 7.0


@pytest.mark.parametrize("body,kind", [
    ("raise RuntimeError('CUDA driver too old')\n", "RuntimeError"),
    ("def build(:\n    pass\n", "SyntaxError"),
    ("import no_such_dependency_xyz\n", "No module named 'no_such_dependency_xyz'"),
    ("X = 1 / 0\n", "ZeroDivisionError"),
])
def test_factory_module_failing_at_import_is_one_line(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
                                                      body: str, kind: str) -> None:
    name = f"edistill_badfactory_{abs(hash(body)) % 10**8}"
    (tmp_path / f"{name}.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModelLoadError) as info:
        load_model(f"{name}:build")
    msg = str(info.value)
    assert "\n" not in msg and name in msg and kind in msg, msg


def test_factory_module_failing_at_import_cli_prints_one_line(tmp_path: pathlib.Path) -> None:
    import os
    import subprocess
    import sys

    (tmp_path / "edistill_importboom.py").write_text("raise RuntimeError('boom at import')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(pathlib.Path(__file__).parents[1])]))
    proc = subprocess.run([sys.executable, "-m", "teacher_server", "serve", "--model", "edistill_importboom:build"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "edistill_importboom" in lines[0] and "boom at import" in lines[0], proc.stderr


def test_checkpoint_mismatch_names_the_keys(tmp_path: pathlib.Path) -> None:
    state = _mlp().state_dict()  # keys 0.*, 2.*, 4.* (Sequential of Linear/ReLU)
    del state["4.bias"]
    state["head.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "keys.pt")
    with pytest.raises(ModelLoadError) as info:
        load_model("teacher_server.zoo:mlp", checkpoint=str(tmp_path / "keys.pt"))
    msg = str(info.value)
    assert "\n" not in msg
    assert "1 missing key(s): 4.bias" in msg and "1 unexpected key(s): head.weight" in msg, msg

    many = {f"extra{i}.weight": torch.zeros(1) for i in range(20)} | _mlp().state_dict()
    torch.save(many, tmp_path / "many.pt")
    with pytest.raises(ModelLoadError, match=r"20 unexpected key\(s\): extra0\.weight, .* and 15 more"):
        load_model("teacher_server.zoo:mlp", checkpoint=str(tmp_path / "many.pt"))

    torch.save(zoo.mlp(hidden=32).state_dict(), tmp_path / "narrow.pt")
    with pytest.raises(ModelLoadError, match=r"shape mismatch\(es\): 0\.weight \[32, 64\] vs model \[128, 64\]"):
        load_model("teacher_server.zoo:mlp", checkpoint=str(tmp_path / "narrow.pt"))
