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
