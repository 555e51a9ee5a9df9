"""Parameter and MAC counts: the CLI, the reference ResNet-50 numbers, scaling with input area."""

import json
import logging

import pytest

from reidzoo import complexity
from reidzoo.config import get_cfg
from reidzoo.modeling.build import build_eval_model
from tests.test_export import _tiny_cfg


@pytest.fixture(scope="module")
def resnet50():
    from fastreid.modeling.backbones import build_resnet_backbone

    cfg = get_cfg()
    cfg.merge_from_list(
        ["MODEL.DEVICE", "cpu", "MODEL.BACKBONE.DEPTH", "50x", "MODEL.BACKBONE.LAST_STRIDE", "1",
         "MODEL.BACKBONE.PRETRAIN", "False"]
    )  # fmt: skip
    return build_resnet_backbone(cfg).eval()


def test_cli_last_line_is_json(tmp_path, capsys):
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(_tiny_cfg().dump())
    assert complexity.main(["--config-file", str(cfg_file)]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.strip()]
    summary = json.loads(lines[-1])
    assert set(summary) == {"params", "macs", "input"}
    assert summary["input"] == [64, 32]
    assert isinstance(summary["params"], int) and isinstance(summary["macs"], int)
    assert summary["macs"] > 0
    # the breakdown comes first and names the top-level children
    assert any(line.strip().startswith("backbone") for line in lines[:-1])
    assert any(line.strip().startswith("heads") for line in lines[:-1])

    model = build_eval_model(_tiny_cfg(), load_weights=False)
    assert summary["params"] == sum(p.numel() for p in model.parameters())


def test_params_include_classifier_and_children_add_up():
    model = build_eval_model(_tiny_cfg(), load_weights=False)
    result = complexity.count_complexity(model, (64, 32))
    assert result["params"] == sum(p.numel() for p in model.parameters())
    assert sum(c["params"] for c in result["children"].values()) == result["params"]
    # EmbeddingHead's classifier weight [NUM_CLASSES, D] is counted although eval never uses it
    assert result["children"]["heads"]["params"] >= 10 * 512
    assert sum(c["macs"] for c in result["children"].values()) == result["macs"]


def test_resnet50_reference_numbers(resnet50):
    result = complexity.count_complexity(resnet50, (256, 128))
    assert result["params"] == 23_508_032
    assert result["macs"] == pytest.approx(4.053e9, rel=0.01)
    # the convolutions alone are 4.053 GMACs (docs/decisions/common.md#resnet-cost); BatchNorm
    # adds about 0.4%
    assert result["by_operator"]["conv"] == pytest.approx(4.053e9, rel=1e-3)


def test_macs_scale_with_input_area(resnet50):
    small = complexity.count_complexity(resnet50, (128, 64))["macs"]
    large = complexity.count_complexity(resnet50, (256, 128))["macs"]
    assert large / small == pytest.approx(4.0, rel=0.02)


def test_uncounted_ops_are_reported(resnet50, caplog):
    with caplog.at_level(logging.WARNING, logger="reidzoo.complexity"):
        result = complexity.count_complexity(resnet50, (64, 32))
    assert result["unsupported_ops"], "ResNet has ops fvcore does not count (max_pool2d)"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("aten::max_pool2d" in message for message in warnings)
