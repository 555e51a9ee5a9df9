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
from tests.helpers import perturbing_exporter

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


@pytest.mark.slow  # a fresh interpreter per check
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


def test_export_parity_failure_exits_nonzero(tiny_yaml, tmp_path, capsys, monkeypatch):
    perturbing_exporter(monkeypatch)
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
    perturbing_exporter(monkeypatch)
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


# --- input conventions, output norm, metadata, sidecar, --inspect (issue 18) ---------------

IMAGENET_MEAN_255 = [123.675, 116.28, 103.53]  # fast-reid's MODEL.PIXEL_MEAN default
IMAGENET_STD_255 = [58.395, 57.12, 57.375]


def _sha256(path):
    import hashlib

    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture
def tiny_ckpt(tmp_path):
    path = tmp_path / "weights" / "model_final.pth"
    path.parent.mkdir()
    state = build_eval_model(_tiny_cfg(), load_weights=False).state_dict()
    torch.save({"model": state}, str(path))
    return str(path)


def test_export_imagenet_input_and_l2_output(tiny_yaml, tiny_ckpt, tmp_path, capsys):
    import onnxruntime as ort

    out = tmp_path / "imagenet.onnx"
    argv = ["--config-file", tiny_yaml, "--checkpoint", tiny_ckpt, "--output", str(out),
            "--input-format", "imagenet", "--output-norm", "l2"]  # fmt: skip
    assert export.main(argv) == 0
    assert float(PARITY_RE.match(_last_line(capsys.readouterr().out)).group(2)) <= 1e-4

    model = build_eval_model(_tiny_cfg("MODEL.WEIGHTS", tiny_ckpt))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    pixels = export.example_images(4, (64, 32), seed=21)  # 0-255
    # what a torchvision-style consumer feeds: ToTensor (0-1), Normalize(ImageNet mean/std)
    fed = ((pixels / 255.0 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
           / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))  # fmt: skip
    np.testing.assert_allclose(
        fed.numpy(), export.to_input_format(pixels, "imagenet", IMAGENET_MEAN_255,
                                            IMAGENET_STD_255).numpy(), atol=1e-5
    )  # fmt: skip
    (feats,) = session.run(["features"], {"images": fed.numpy()})
    with torch.no_grad():
        ref = torch.nn.functional.normalize(model(pixels), dim=1).numpy()
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    assert np.abs(feats - ref).max() <= 1e-4
    # the graph really takes the imagenet convention: 0-255 pixels give other features
    (wrong,) = session.run(["features"], {"images": pixels.numpy()})
    assert np.abs(wrong - ref).max() > 1e-2


def test_export_metadata_sidecar_and_inspect(tiny_yaml, tiny_ckpt, tmp_path, capsys):
    import json

    import onnx

    import reidzoo

    out = tmp_path / "meta.onnx"
    argv = ["--config-file", tiny_yaml, "--checkpoint", tiny_ckpt, "--output", str(out),
            "--input-format", "imagenet"]  # fmt: skip
    assert export.main(argv) == 0
    capsys.readouterr()
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert set(props) == set(export.METADATA_KEYS)
    assert props["input_format"] == "imagenet" and props["value_range"] == "0-1"
    assert props["channel_order"] == "RGB" and props["layout"] == "NCHW"
    assert props["normalized_by"] == "caller"
    np.testing.assert_allclose(json.loads(props["mean"]), [0.485, 0.456, 0.406], atol=1e-6)
    np.testing.assert_allclose(json.loads(props["std"]), [0.229, 0.224, 0.225], atol=1e-6)
    assert (props["input_height"], props["input_width"]) == ("64", "32")
    assert props["feature_dim"] == "512" and props["l2_normalized"] == "false"
    assert props["metric"] == get_cfg().TEST.METRIC
    assert props["meta_architecture"] == "Baseline"
    assert props["checkpoint"] == tiny_ckpt and props["checkpoint_sha256"] == _sha256(tiny_ckpt)
    assert props["fastreid_version"] == "1.4.0"
    assert props["reidzoo_version"] == reidzoo.__version__
    assert props["torch_version"] == torch.__version__

    # BoxMOT's sidecar, in the schema boxmot.reid.core.artifacts reads
    sidecar = json.loads((tmp_path / "meta.onnx.metadata.json").read_text())
    assert sidecar["schema_version"] == 1 and sidecar["model_kwargs_schema_version"] == 1
    assert sidecar["model_kwargs"] == {"img_size": [64, 32]}
    assert sidecar["artifact_sha256"] == _sha256(out)
    assert sidecar["reidzoo"] == props

    # --inspect prints the same back
    assert export.main(["--inspect", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["metadata"] == props and info["sidecar_content"] == sidecar
    assert info["inputs"] == [{"name": "images", "shape": ["batch", 3, 64, 32]}]
    assert info["outputs"] == [{"name": "features", "shape": ["batch", 512]}]

    # the config hash names the config, not where the weights lie; the checkpoint hash the bytes
    moved = tmp_path / "elsewhere.pth"
    moved.write_bytes(open(tiny_ckpt, "rb").read())
    again = tmp_path / "again.onnx"
    assert export.main(["--config-file", tiny_yaml, "--checkpoint", str(moved),
                        "--output", str(again)]) == 0  # fmt: skip
    props2 = {p.key: p.value for p in onnx.load(str(again)).metadata_props}
    assert props2["config_sha256"] == props["config_sha256"]
    assert props2["checkpoint_sha256"] == props["checkpoint_sha256"]
    other = tmp_path / "other.onnx"
    assert export.main(["--config-file", tiny_yaml, "--output", str(other),
                        "TEST.METRIC", "euclidean"]) == 0  # fmt: skip
    props3 = {p.key: p.value for p in onnx.load(str(other)).metadata_props}
    assert props3["config_sha256"] != props["config_sha256"]
    assert props3["metric"] == "euclidean"
    assert props3["checkpoint"] == "" and props3["checkpoint_sha256"] == ""


def test_export_raw255_metadata(tmp_path):
    import json

    import onnx

    model = build_eval_model(_tiny_cfg())
    out = tmp_path / "raw.onnx"
    export.export_onnx(model, str(out), (64, 32), pixel_mean=IMAGENET_MEAN_255,
                       pixel_std=IMAGENET_STD_255)  # fmt: skip
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props["input_format"] == "raw255" and props["value_range"] == "0-255"
    assert props["normalized_by"] == "graph"
    np.testing.assert_allclose(json.loads(props["mean"]), IMAGENET_MEAN_255, atol=1e-4)


def test_parity_check_runs_in_the_chosen_input_format(tiny_yaml, tmp_path, capsys, monkeypatch):
    """A graph that forgets to turn imagenet input back into pixels fails the check."""
    monkeypatch.setattr(export.ExportModel, "forward", lambda self, images: self.model(images))
    out = tmp_path / "forgot.onnx"
    out.write_bytes(b"previous export")
    rc = export.main(["--config-file", tiny_yaml, "--output", str(out),
                      "--input-format", "imagenet"])  # fmt: skip
    assert rc == 1
    assert float(PARITY_RE.match(_last_line(capsys.readouterr().out)).group(2)) > 1e-4
    assert out.read_bytes() == b"previous export"
    assert not (tmp_path / "forgot.onnx.metadata.json").exists()
    assert not _temp_leftovers(tmp_path)


def test_inspect_and_openvino_errors(tiny_yaml, tmp_path, capsys):
    import importlib.util

    assert export.main(["--inspect", str(tmp_path / "absent.onnx")]) == 1
    assert "absent.onnx" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("x")
    assert export.main(["--inspect", str(tmp_path / "notes.txt")]) == 1
    assert "expected an .onnx file" in capsys.readouterr().err
    if importlib.util.find_spec("openvino") is None:
        folder = str(tmp_path / "x_openvino_model")
        rc = export.main(["--config-file", tiny_yaml, "--output", folder, "--format", "openvino"])
        assert rc == 1
        assert "pip install 'reidzoo[openvino]'" in capsys.readouterr().err
        assert not (tmp_path / "x_openvino_model").exists()
