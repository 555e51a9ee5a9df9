"""Exports read by the real clients: BoxMOT's own re-ID backends (ONNX Runtime and OpenVINO).

These tests need the optional extra ``pip install -e '.[interop]'`` (boxmot, openvino and the
onnxruntime BoxMOT pins) and skip without it. Each builds a tiny ResNet-18 whose BatchNorm
statistics are taken from person-like crops (with the initial statistics every crop embeds
to nearly the same vector, and a wrong input convention would go unseen), exports it with
``python -m reidzoo.export``'s entry point, loads the file with BoxMOT's ``ReID`` runtime (the
class its trackers use for ``reid_weights``) and compares BoxMOT's features of boxes in a frame
with ``python -m reidzoo.extract`` on the same crops cut and resized as BoxMOT does (cv2,
bilinear), saved as PNG.
"""

import os
import shutil

import numpy as np
import pytest
import torch

from reidzoo import export, extract
from reidzoo.config import get_cfg
from reidzoo.modeling.build import build_eval_model
from tests.helpers import perturbing_exporter

boxmot = pytest.importorskip("boxmot", reason="needs the [interop] extra (boxmot)")
cv2 = pytest.importorskip("cv2", reason="needs the [interop] extra (opencv, from boxmot)")

HW = (64, 32)
TINY = [
    "MODEL.DEVICE", "cpu",
    "MODEL.BACKBONE.DEPTH", "18x",
    "MODEL.BACKBONE.PRETRAIN", "False",
    "MODEL.BACKBONE.FEAT_DIM", "512",
    "MODEL.HEADS.NUM_CLASSES", "10",
    "MODEL.HEADS.NAME", "EmbeddingHead",
    "INPUT.SIZE_TEST", f"[{HW[0]}, {HW[1]}]",
    "TEST.FLIP.ENABLED", "False",  # BoxMOT does not flip
]  # fmt: skip


def synthetic_frame(seed, height=240, width=320):
    """A BGR frame with four person-like figures (two-coloured, striped, a head) on noise.

    Returns:
        tuple[np.ndarray, np.ndarray]: uint8 [H, W, 3] BGR, float32 boxes [4, 4] (x1 y1 x2 y2).
    """
    rng = np.random.default_rng(seed)
    img = (rng.random((height, width, 3)) * 60 + 60).astype(np.uint8)
    boxes = []
    for x in range(10, width - 60, 75):
        y, h, w = int(rng.integers(10, 60)), int(rng.integers(120, 170)), 50
        img[y : y + h // 2, x : x + w] = rng.integers(0, 256, 3)
        img[y + h // 2 : y + h, x : x + w] = rng.integers(0, 256, 3)
        img[y : y + h : int(rng.integers(2, 9)), x : x + w] //= 2
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        cv2.circle(img, (x + w // 2, y + 8), 8, colour, -1)
        boxes.append([x + 0.4, y - 0.3, x + w + 0.2, y + h + 0.6])  # sub-pixel, as detectors give
    return img, np.array(boxes, dtype=np.float32)


def boxmot_style_crops(img, boxes, hw=HW):
    """Crops as BoxMOT 25 cuts them (rounded, clipped) and resizes them (cv2 bilinear), BGR."""
    height, width = img.shape[:2]
    crops = []
    for box in boxes:
        x1, y1, x2, y2 = np.asarray(box[:4]).round().astype(int)
        x1, y1, x2, y2 = max(0, x1), max(0, y1), min(width, x2), min(height, y2)
        crop = img[y1:y2, x1:x2]
        crops.append(cv2.resize(crop, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR))
    return crops


@pytest.fixture(scope="module")
def trained_like(tmp_path_factory):
    """A tiny config file and a checkpoint with BatchNorm statistics of person-like crops."""
    root = tmp_path_factory.mktemp("interop")
    cfg = get_cfg()
    cfg.merge_from_list(TINY)
    yaml = root / "tiny.yaml"
    yaml.write_text(cfg.dump())
    model = build_eval_model(cfg, load_weights=False)
    crops = [c for s in range(1, 5) for c in boxmot_style_crops(*synthetic_frame(s))]
    pixels = torch.stack([torch.from_numpy(c[:, :, ::-1].copy()).permute(2, 0, 1) for c in crops])
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:  # cumulative statistics of these crops, in one pass
        m.reset_running_stats()
        m.momentum = None
        m.train()
    with torch.no_grad():
        model(pixels.float())
    model.eval()
    ckpt = root / "model_final.pth"
    torch.save({"model": model.state_dict()}, str(ckpt))
    return root, str(yaml), str(ckpt)


@pytest.fixture(autouse=True)
def _no_runtime_installs(monkeypatch):
    """BoxMOT pip-installs a runtime it finds missing or at another version; never here."""
    from boxmot.utils.checks import RequirementsChecker

    def refuse(self, packages, *args, **kwargs):
        raise AssertionError(f"BoxMOT tried to install {packages}: the [interop] extra lacks it")

    monkeypatch.setattr(RequirementsChecker, "_install_packages", refuse)


@pytest.fixture(scope="module")
def frame_and_reidzoo_features(trained_like):
    """The test frame, its boxes and reidzoo.extract's features of BoxMOT-style crops."""
    root, yaml, ckpt = trained_like
    img, boxes = synthetic_frame(0)
    folder = root / "crops"
    folder.mkdir()
    for i, crop in enumerate(boxmot_style_crops(img, boxes)):
        assert cv2.imwrite(str(folder / f"{i:02d}.png"), crop)  # lossless, BGR on disk
    out = root / "reidzoo.npz"
    argv = ["--config-file", yaml, "--checkpoint", ckpt, "--input", str(folder),
            "--output", str(out), "--no-flip", "--num-workers", "0"]  # fmt: skip
    assert extract.main(argv) == 0
    data = extract.load_features(str(out))
    names = [os.path.basename(n) for n in data["names"]]
    assert names == [f"{i:02d}.png" for i in range(len(boxes))]
    return img, boxes, np.asarray(data["features"], dtype=np.float64)


def _export(trained_like, name, *flags):
    root, yaml, ckpt = trained_like
    out = root / name
    argv = ["--config-file", yaml, "--checkpoint", ckpt, "--output", str(out), *flags]
    assert export.main(argv) == 0
    return out


def _boxmot_features(weights, img, boxes):
    from boxmot.reid.core.runtime import ReID

    runtime = ReID(weights, device="cpu")  # the backend is chosen from the artifact's suffix
    feats = np.asarray(runtime.model.get_features(boxes, img), dtype=np.float64)
    return runtime.model, feats


def _cosines(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.sum(a * b, axis=1)


def test_boxmot_onnx_backend_matches_reidzoo_extract(trained_like, frame_and_reidzoo_features):
    from boxmot.reid.core.registry import ReIDModelRegistry

    img, boxes, ours = frame_and_reidzoo_features
    onnx_file = _export(trained_like, "tiny_imagenet.onnx", "--input-format", "imagenet")
    # BoxMOT reads the crop size from our sidecar with its own parser
    assert ReIDModelRegistry.get_checkpoint_model_kwargs(onnx_file)["img_size"] == HW
    backend, theirs = _boxmot_features(onnx_file, img, boxes)
    assert type(backend).__name__ == "ONNXBackend" and tuple(backend.input_shape) == HW
    assert theirs.shape == ours.shape == (4, 512)
    cos = _cosines(theirs, ours)
    assert cos.min() >= 0.9999, cos
    # the crops are told apart, so the match above is not that of near-constant vectors
    unit = ours / np.linalg.norm(ours, axis=1, keepdims=True)
    off_diagonal = (unit @ unit.T)[~np.eye(len(unit), dtype=bool)]
    assert off_diagonal.max() < 0.95, off_diagonal


def test_boxmot_on_a_raw255_export_gives_wrong_features(trained_like, frame_and_reidzoo_features):
    """The failure the imagenet format fixes: BoxMOT feeds 0-1 normalised crops to a graph
    that expects 0-255, and every crop embeds to nearly the same vector."""
    img, boxes, ours = frame_and_reidzoo_features
    onnx_file = _export(trained_like, "tiny_raw255.onnx")  # the default format
    _, theirs = _boxmot_features(onnx_file, img, boxes)
    assert _cosines(theirs, ours).min() < 0.99
    unit = theirs / np.linalg.norm(theirs, axis=1, keepdims=True)
    assert (unit @ unit.T).min() > 0.99  # collapsed


def test_boxmot_openvino_backend_matches_reidzoo_extract(trained_like, frame_and_reidzoo_features):
    pytest.importorskip("openvino", reason="needs the [interop] extra (openvino)")
    img, boxes, ours = frame_and_reidzoo_features
    folder = _export(trained_like, "tiny_openvino_model", "--format", "openvino",
                     "--input-format", "imagenet")  # fmt: skip
    assert sorted(os.listdir(folder)) == sorted(
        [export.OPENVINO_XML, export.OPENVINO_BIN, export.MANIFEST_NAME,
         export.OPENVINO_XML + export.SIDECAR_SUFFIX]
    )  # fmt: skip
    backend, theirs = _boxmot_features(folder, img, boxes)
    # an OpenVINO IR has no graph-side crop size for BoxMOT: it comes from our manifest
    assert type(backend).__name__ == "OpenVinoBackend" and tuple(backend.input_shape) == HW
    cos = _cosines(theirs, ours)
    assert cos.min() >= 0.9999, cos
    # the same through the .xml path, whose sidecar is model.xml.metadata.json
    backend, by_xml = _boxmot_features(folder / export.OPENVINO_XML, img, boxes)
    assert tuple(backend.input_shape) == HW
    np.testing.assert_allclose(by_xml, theirs, atol=1e-6)


def test_openvino_export_parity_metadata_and_atomic_replace(trained_like, monkeypatch, capsys):
    ov = pytest.importorskip("openvino", reason="needs the [interop] extra (openvino)")
    root, yaml, ckpt = trained_like
    folder = root / "l2_openvino_model"
    model = build_eval_model(_tiny_cfg(ckpt))
    result = export.export_openvino(
        model, str(folder), HW, batch=3, input_format="imagenet",
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375],
        l2_normalize=True,
    )  # fmt: skip
    assert result["rel"] <= 1e-4 and result["batches"] == [3, 1]
    assert result["output_shape"] == [3, 512]
    # OpenVINO runs the IR with a batch it was not checked at; rows have norm 1 (l2 in graph)
    # fp32 as BoxMOT compiles it: on a CPU with bf16 OpenVINO's default drifts ~1e-2 relative
    xml = str(folder / export.OPENVINO_XML)
    compiled = ov.Core().compile_model(xml, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    pixels = export.example_images(5, HW, seed=9)
    fed = export.to_input_format(pixels, "imagenet", [123.675, 116.28, 103.53],
                                 [58.395, 57.12, 57.375]).numpy()  # fmt: skip
    out = compiled([fed])[compiled.output(0)]
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    with torch.no_grad():
        ref = torch.nn.functional.normalize(model(pixels), dim=1).numpy()
    assert np.abs(out - ref).max() <= 1e-4

    info = export.inspect_export(str(folder))
    assert info["format"] == "openvino"
    assert info["metadata"]["l2_normalized"] == "true"
    assert info["metadata"]["input_format"] == "imagenet"
    assert info["sidecar_content"]["model_kwargs"] == {"img_size": list(HW)}

    # a graph that fails the check replaces nothing and leaves no temporary folder
    before = {n: (folder / n).read_bytes() for n in os.listdir(folder)}
    perturbing_exporter(monkeypatch)
    with pytest.raises(export.ParityError, match="OpenVINO graph does not match"):
        export.export_openvino(model, str(folder), HW)
    assert {n: (folder / n).read_bytes() for n in os.listdir(folder)} == before
    assert not [n for n in os.listdir(root) if n.startswith(".tmp-")]
    # a folder that is not an export is never replaced
    other = root / "not_an_export_openvino_model"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    monkeypatch.undo()
    with pytest.raises(FileExistsError, match="not an OpenVINO export folder"):
        export.export_openvino(model, str(other), HW)
    argv = ["--config-file", yaml, "--output", str(other), "--format", "openvino"]
    assert export.main(argv) == 1
    assert "not an OpenVINO export folder" in capsys.readouterr().err
    assert sorted(os.listdir(other)) == ["keep.txt"] and (other / "keep.txt").read_text() == "mine"
    assert not [n for n in os.listdir(root) if n.startswith(".tmp-")]
    shutil.rmtree(other)


def _tiny_cfg(ckpt):
    cfg = get_cfg()
    cfg.merge_from_list(TINY + ["MODEL.WEIGHTS", ckpt])
    return cfg
