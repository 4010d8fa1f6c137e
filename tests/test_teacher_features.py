"""Teacher-side feature taps: forward hooks on module paths capture activations in the forward pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from teacher_server.errors import ConfigError
from teacher_server.features import FeatureTap, parse_features


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
                         nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU()),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


def test_captures_the_named_activations_of_one_pass():
    model = net().eval()
    tap = FeatureTap(model, ["1", "2.0"])
    x = torch.randn(5, 1, 8, 8)
    with torch.inference_mode():
        logits = model(x)
        feats = tap.collect({"logits": logits})
        assert torch.equal(feats["1"], torch.relu(model[0](x)))  # what the module returned, bit for bit
        assert torch.equal(feats["2.0"], model[2][0](feats["1"]))
        assert feats["2.0"].shape == (5, 8, 4, 4)
        with pytest.raises(ConfigError, match="did not run"):
            tap.collect({"logits": logits})  # each pass's capture is taken once
    tap.close()
    model(x)
    assert tap._captured == {}  # hooks removed: nothing captured


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_bad_paths_and_models_are_named():
    with pytest.raises(ConfigError, match=r"no submodule 'layer9' .* top-level modules are 0, 1, 2, 3, 4, 5"):
        FeatureTap(net(), ["layer9"])
    scripted = torch.jit.script(net())
    with pytest.raises(ConfigError, match="needs a Python nn.Module"):
        FeatureTap(scripted, ["1"])
    tap = FeatureTap(net(), ["5"])
    with pytest.raises(ConfigError, match="has the name of a model output"):
        tap.collect({"5": torch.ones(1)})
    assert parse_features("layer3, layer4") == ("layer3", "layer4") and parse_features(None) == ()
    with pytest.raises(ConfigError, match="more than once"):
        parse_features("a,a")
    with pytest.raises(ConfigError, match="separated by commas"):
        parse_features("a,,b")


def test_load_model_names_a_bad_feature_path():
    from teacher_server.model import load_model

    with pytest.raises(ConfigError, match=r"no submodule 'layer3' .* top-level modules are 0, 1, 2"):
        load_model("teacher_server.zoo:mlp", features=["layer3"])
    model = load_model("teacher_server.zoo:mlp", features=["1"])
    assert [(s.name, s.shape) for s in model.outputs] == [("logits", (10,)), ("1", (128,))]  # Describe's list


def test_a_swapped_in_model_keeps_the_features():
    from types import SimpleNamespace

    from teacher_server.features import attach_features
    from teacher_server.model import LoadedModel
    from teacher_server.swap import prepare_model
    from teacher_server.zoo import mlp

    served = attach_features(LoadedModel.from_module(mlp()), ["1"])
    new = prepare_model(SimpleNamespace(model=served), mlp())
    assert [s.name for s in new.outputs] == ["logits", "1"] and new.tap.paths == ("1",)


def test_a_served_teacher_answers_features_by_name_and_a_cache_records_them(tmp_path):
    """A real teacher process with --features; answers by name, equal to the activation in-process; recorded."""
    from torch.utils.data import DataLoader, TensorDataset

    from protos.edistill.v1 import teacher_pb2 as pb
    from student_client import CachedTeacher, OutputSpec, SourceRequest, TeacherPool, record
    from teacher_server import zoo
    from tests.helpers.teacher_proc import TeacherProcess

    specs = [OutputSpec("logits"), OutputSpec("stages.3"), OutputSpec("stages.5", dtype="float16")]
    images = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with TeacherProcess("teacher_server.zoo:resnet18_cifar", "--model-kwargs", '{"width": 8}',
                        "--features", "stages.3,stages.5", "--max-batch-size", "32") as teacher:
        import grpc

        with grpc.insecure_channel(teacher.address) as ch:
            desc = ch.unary_unary("/edistill.v1.Teacher/Describe", request_serializer=pb.DescribeRequest.SerializeToString,
                                  response_deserializer=pb.DescribeResponse.FromString)(pb.DescribeRequest(), timeout=30)
        assert [(o.name, list(o.shape)) for o in desc.outputs] == [
            ("logits", [10]), ("stages.3", [16, 16, 16]), ("stages.5", [32, 8, 8])]
        with TeacherPool([teacher.address], specs) as pool:
            record(DataLoader(TensorDataset(images), batch_size=32), pool, tmp_path)
    net = zoo.resnet18_cifar(width=8).eval()
    tap = FeatureTap(net, ["stages.3", "stages.5"])
    cache = CachedTeacher(tmp_path)
    for rows in (range(0, 32), range(32, 64)):  # the batches the teacher saw
        with torch.inference_mode():
            logits = net(images[list(rows)])
            want = tap.collect({"logits": logits})
        got = cache.submit(SourceRequest({"": images[list(rows)]}, 0, list(rows))).result()
        assert torch.equal(got["logits"], logits) and torch.equal(got["stages.3"], want["stages.3"])
        assert got["stages.5"].dtype == torch.float16 and torch.equal(got["stages.5"], want["stages.5"].half())
