"""ONNX export: parity with PyTorch, dynamic batch, exit codes, atomic writes; eval builder."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from reidzoo import export
from reidzoo.checkpoint import default_file_mode
from reidzoo.config import get_cfg
from reidzoo.modeling.build import build_eval_model

PARITY_RE = re.compile(r"^parity max_abs_diff=(\S+) rel=(\S+)$")

TINY = [
    "MODEL.DEVICE", "cpu",
    "MODEL.BACKBONE.DEPTH", "18x",
    "MODEL.BACKBONE.PRETRAIN", "False",
    "MODEL.BACKBONE.FEAT_DIM", "512",  # ResNet-18's width (fastreid defaults to 2048)
    "MODEL.HEADS.NUM_CLASSES", "10",
    "MODEL.HEADS.NAME", "EmbeddingHead",
    "INPUT.SIZE_TEST", "[64, 32]",
]  # fmt: skip


def _tiny_cfg(*extra):
    cfg = get_cfg()
    cfg.merge_from_list(TINY + list(extra))
    return cfg


@pytest.fixture
def tiny_yaml(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(_tiny_cfg().dump())
    return str(path)


def _last_line(text):
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _temp_leftovers(folder):
    return [n for n in os.listdir(folder) if n.startswith(".tmp-")]


def test_export_parity_and_dynamic_batch(tiny_yaml, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    rc = export.main(["--config-file", tiny_yaml, "--output", str(out)])
    assert rc == 0
    match = PARITY_RE.match(_last_line(capsys.readouterr().out))
    assert match, "last line must be 'parity max_abs_diff=<x> rel=<y>'"
    assert float(match.group(2)) <= 1e-4
    assert out.is_file() and not _temp_leftovers(tmp_path)
    assert (os.stat(out).st_mode & 0o777) == default_file_mode()

    import onnx
    import onnxruntime as ort

    graph = onnx.load(str(out)).graph
    assert [i.name for i in graph.input] == ["images"]
    assert [o.name for o in graph.output] == ["features"]

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (1, 4):
        images = export.example_images(batch, (64, 32), seed=7)
        (feats,) = session.run(["features"], {"images": images.numpy()})
        assert feats.shape == (batch, 512)
        assert np.isfinite(feats).all()
    # A batch run gives the same rows as single-image runs (no batch size baked in the graph).
    images = export.example_images(4, (64, 32), seed=3).numpy()
    (full,) = session.run(["features"], {"images": images})
    (first,) = session.run(["features"], {"images": images[:1]})
    np.testing.assert_allclose(full[:1], first, rtol=1e-4, atol=1e-4)


def test_export_onnx_function_matches_model(tmp_path):
    model = build_eval_model(_tiny_cfg())
    out = tmp_path / "fn.onnx"
    result = export.export_onnx(model, str(out), (64, 32), batch=4, opset=17)
    assert set(result) >= {"max_abs_diff", "rel"}
    assert result["rel"] <= 1e-4 and result["batches"] == [4, 1]
    assert result["output_shape"] == [4, 512]

    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    images = export.example_images(3, (64, 32), seed=11)
    with torch.no_grad():
        ref = model(images).numpy()
    (feats,) = session.run(["features"], {"images": images.numpy()})
    assert np.abs(feats - ref).max() <= 1e-4 * np.abs(ref).max()


def test_export_cli_subprocess(tiny_yaml, tmp_path):
    out = tmp_path / "sub.onnx"
    proc = subprocess.run(
        [sys.executable, "-m", "reidzoo.export", "--config-file", tiny_yaml, "--output", str(out),
         "--batch", "1", "INPUT.SIZE_TEST", "[64, 32]"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    match = PARITY_RE.match(_last_line(proc.stdout))
    assert match, proc.stdout[-1000:]
    assert float(match.group(2)) <= 1e-4
    assert out.is_file()


def _perturbing_exporter(monkeypatch):
    """Export a graph whose weights differ from the PyTorch model's (a genuinely wrong graph)."""
    real = export._torch_onnx_export

    def wrong_export(model, images, path, opset):
        params = [p for p in model.parameters() if p.dim() == 4]  # conv weights
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p in params:
                p.mul_(1.05)
        try:
            real(model, images, path, opset)
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)

    monkeypatch.setattr(export, "_torch_onnx_export", wrong_export)


def test_export_parity_failure_exits_nonzero(tiny_yaml, tmp_path, capsys, monkeypatch):
    _perturbing_exporter(monkeypatch)
    out = tmp_path / "bad.onnx"
    out.write_bytes(b"previous good export")
    rc = export.main(["--config-file", tiny_yaml, "--output", str(out)])
    assert rc == 1
    match = PARITY_RE.match(_last_line(capsys.readouterr().out))
    assert match and float(match.group(2)) > 1e-4
    # A graph that failed the check is never installed; the previous file survives.
    assert out.read_bytes() == b"previous good export"
    assert not _temp_leftovers(tmp_path)


def test_export_tol_is_configurable(tiny_yaml, tmp_path, capsys, monkeypatch):
    _perturbing_exporter(monkeypatch)
    out = tmp_path / "loose.onnx"
    rc = export.main(["--config-file", tiny_yaml, "--output", str(out), "--tol", "10"])
    assert rc == 0 and out.is_file()
    assert PARITY_RE.match(_last_line(capsys.readouterr().out))


def test_export_failure_keeps_existing_file(tmp_path, monkeypatch):
    out = tmp_path / "keep.onnx"
    out.write_bytes(b"old model bytes")

    def broken_export(model, images, path, opset):
        with open(path, "wb") as f:
            f.write(b"half a graph")
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(export, "_torch_onnx_export", broken_export)
    model = build_eval_model(_tiny_cfg())
    with pytest.raises(RuntimeError, match="exporter crashed"):
        export.export_onnx(model, str(out), (64, 32))
    assert out.read_bytes() == b"old model bytes"
    assert not _temp_leftovers(tmp_path)


def test_build_eval_model_loads_weights_and_is_eval(tmp_path, caplog):
    model = build_eval_model(_tiny_cfg())
    assert not model.training
    assert any("MODEL.WEIGHTS is empty" in r.getMessage() for r in caplog.records)

    ckpt = tmp_path / "model_final.pth"
    torch.save({"model": model.state_dict(), "iteration": 3}, str(ckpt))
    other = build_eval_model(_tiny_cfg("MODEL.WEIGHTS", str(ckpt)))
    assert not other.training
    for key, value in model.state_dict().items():
        torch.testing.assert_close(other.state_dict()[key], value)


def test_build_eval_model_sizes_classifier_from_checkpoint_but_rejects_other_misfits(tmp_path):
    from reidzoo.checkpoint import CheckpointMismatchError

    model = build_eval_model(_tiny_cfg())  # NUM_CLASSES 10
    ckpt = tmp_path / "ten.pth"
    torch.save({"model": model.state_dict()}, str(ckpt))
    # only the classifier differs (12 in the config, 10 in the file): it follows the file
    other = build_eval_model(_tiny_cfg("MODEL.HEADS.NUM_CLASSES", "12", "MODEL.WEIGHTS", str(ckpt)))
    assert tuple(other.heads.weight.shape) == (10, 512)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(other.state_dict()[key], value)
    # another backbone (ResNet-34's extra blocks) is still an error naming the keys
    deeper = tmp_path / "r34.pth"
    r34 = build_eval_model(_tiny_cfg("MODEL.BACKBONE.DEPTH", "34x"), load_weights=False)
    torch.save({"model": r34.state_dict()}, str(deeper))
    cfg = _tiny_cfg("MODEL.HEADS.NUM_CLASSES", "12", "MODEL.WEIGHTS", str(deeper))
    with pytest.raises(CheckpointMismatchError) as info:
        build_eval_model(cfg)
    message = str(info.value)
    assert "r34.pth" in message and "unexpected keys" in message
    assert "backbone.layer1.2.conv1.weight" in message


def test_build_eval_model_missing_weights_file(tmp_path):
    cfg = _tiny_cfg("MODEL.WEIGHTS", str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_eval_model(cfg)


def test_trained_weights_need_no_imagenet_weights(tmp_path, tiny_yaml, capsys):
    """IANet's paper config says PRETRAIN True with an ImageNet file that is not here: with a
    trained checkpoint given, export (and extract) must not look for it."""
    from reidzoo.inference import FeatureExtractor

    ckpt = str(tmp_path / "trained.pth")
    state = build_eval_model(_tiny_cfg(), load_weights=False).state_dict()
    torch.save({"model": state}, ckpt)
    imagenet = ["MODEL.BACKBONE.NAME", "build_staged_resnet_backbone",
                "MODEL.BACKBONE.PRETRAIN", "True",
                "MODEL.BACKBONE.PRETRAIN_PATH", str(tmp_path / "resnet18-absent.pth")]  # fmt: skip
    out = str(tmp_path / "model.onnx")
    with pytest.raises(FileNotFoundError, match="resnet18-absent.pth"):  # no weights: needed
        export.main(["--config-file", tiny_yaml, "--output", out, *imagenet])
    assert export.main(["--config-file", tiny_yaml, "--output", out, "--checkpoint", ckpt,
                        *imagenet]) == 0  # fmt: skip
    assert PARITY_RE.match(_last_line(capsys.readouterr().out))
    loaded = FeatureExtractor(tiny_yaml, ckpt, opts=imagenet).model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
