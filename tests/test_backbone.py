"""Multi-stage access to fast-reid's ResNet, inserted modules and local ImageNet weights."""

import pytest
import torch
from fastreid.modeling.backbones import build_resnet_backbone
from fastreid.modeling.meta_arch import build_model
from torch import nn

from reidzoo.modeling import StagedResNet, build_staged_resnet, load_pretrained, set_stage_stride
from reidzoo.registry import STAGE_MODULE_REGISTRY
from tests.helpers import cpu_cfg


class _Scale(nn.Module):
    def __init__(self, cfg, stage, channels):
        super().__init__()
        self.stage, self.channels = stage, channels
        self.gain = nn.Parameter(torch.full((1, channels, 1, 1), 2.0))

    def forward(self, x):
        return x * self.gain


if "ZooTestScale" not in STAGE_MODULE_REGISTRY._obj_map:
    STAGE_MODULE_REGISTRY._do_register("ZooTestScale", _Scale)


@pytest.mark.parametrize("with_nl", [False, True])
def test_same_weights_same_output_as_fastreid(with_nl):
    cfg = cpu_cfg(**{"MODEL.BACKBONE.WITH_NL": with_nl})
    torch.manual_seed(0)
    ref = build_resnet_backbone(cfg).eval()
    ours = build_staged_resnet(cfg).eval()
    ours.load_state_dict(ref.state_dict())  # identical key names
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        assert torch.equal(ref(x), ours(x))
        outs = ours.forward_stages(x)
    shapes = {k: tuple(v.shape) for k, v in outs.items()}
    assert shapes == {
        "layer1": (2, 256, 16, 8),
        "layer2": (2, 512, 8, 4),
        "layer3": (2, 1024, 4, 2),
        "layer4": (2, 2048, 4, 2),  # last stride 1
    }


def test_partial_forward_stops_early():
    m = StagedResNet(depth="18x").eval()
    calls = []
    m.layer3.register_forward_hook(lambda *a: calls.append(1))
    out = m.forward_stages(torch.randn(1, 3, 64, 32), ("stem", "layer2"))
    assert set(out) == {"stem", "layer2"} and calls == []
    assert m.channels == {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512}


def test_inserts_by_config_inside_fastreid_baseline():
    cfg = cpu_cfg(
        **{
            "MODEL.BACKBONE.NAME": "build_staged_resnet_backbone",
            "MODEL.BACKBONE.DEPTH": "18x",
            "MODEL.BACKBONE.FEAT_DIM": 512,
            "MODEL.HEADS.NUM_CLASSES": 5,
            "MODEL.BACKBONE.INSERTS": ["layer2:ZooTestScale", "layer3:ZooTestScale"],
        }
    )
    model = build_model(cfg).eval()
    bb = model.backbone
    assert bb.inserts["layer2"].channels == 128 and bb.inserts["layer3"].channels == 256
    x = torch.randn(1, 3, 64, 32)
    with torch.no_grad():
        y = bb.forward_stages(x, ("layer2",))["layer2"]
        y_plain = bb.run_stage("layer2", bb.run_stage("layer1", bb.stem(x)), insert=False)
    assert torch.allclose(y, 2 * y_plain)
    assert model(torch.rand(2, 3, 64, 32) * 255).shape == (2, 512)
    bad = cfg.clone()
    bad.MODEL.BACKBONE.INSERTS = ["layer9:ZooTestScale"]
    with pytest.raises(ValueError, match="layer9"):
        build_model(bad)


def test_pretrained_from_local_path(tmp_path, caplog):
    src = StagedResNet(depth="18x")
    state = {k: v.clone() for k, v in src.state_dict().items()}
    state["fc.weight"] = torch.zeros(1000, 512)  # torchvision checkpoints carry the classifier
    path = tmp_path / "r18.pth"
    torch.save(state, path)
    dst = StagedResNet(depth="18x")
    with caplog.at_level("INFO"):
        report = load_pretrained(dst, str(path))
    assert report["unexpected"] == ["fc.weight"] and report["missing"] == []
    assert torch.equal(dst.conv1.weight, src.conv1.weight)
    assert "fc.weight" in caplog.text
    cfg = cpu_cfg(**{"MODEL.BACKBONE.PRETRAIN": True, "MODEL.BACKBONE.DEPTH": "18x"})
    cfg.MODEL.BACKBONE.PRETRAIN_PATH = str(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_staged_resnet(cfg)
    cfg.MODEL.BACKBONE.PRETRAIN_PATH = ""
    with pytest.raises(FileNotFoundError, match="PRETRAIN_PATH"):
        build_staged_resnet(cfg)


@pytest.mark.parametrize("depth", ["18x", "50x"])
def test_set_stage_stride_equals_building_with_that_stride(depth):
    # RMGL's branch copies and PMM's layer3 change a built stage's stride: the result must be
    # the network fast-reid builds with that stride, same weights, same output.
    torch.manual_seed(0)
    model = StagedResNet(last_stride=2, depth=depth).eval()
    ref = StagedResNet(last_stride=1, depth=depth).eval()
    ref.load_state_dict(model.state_dict())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        assert model(x).shape[-2:] == (2, 1)
        set_stage_stride(model.layer4, 1)
        out = model(x)
        assert out.shape[-2:] == (4, 2)
        torch.testing.assert_close(out, ref(x))
        set_stage_stride(model.layer3, 1)  # a middle stage too (PMM's LAYER3_STRIDE 1)
        assert model(x).shape[-2:] == (8, 4)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
