"""Feature extraction: equality with the model run by hand and with the evaluation path, input
types, flip averaging, the .npz command line, registered names and clear errors."""

import glob
import logging
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import reidzoo
from reidzoo import extract
from reidzoo.checkpoint import CheckpointMismatchError
from reidzoo.inference import FeatureExtractor, registered_models
from reidzoo.modeling.build import build_eval_model
from tests.helpers import REPO, tiny_cfg, write_market

SIZE = (64, 32)  # INPUT.SIZE_TEST of tiny_cfg


def save_model(cfg, path, seed=0):
    """Save a randomly initialised model of ``cfg`` as a trainer checkpoint."""
    torch.manual_seed(seed)
    model = build_eval_model(cfg, load_weights=False)
    torch.save({"model": model.state_dict(), "iteration": 0}, path)
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Market-1501 folder, a config file, a checkpoint and a folder of 96x40 images."""
    tmp = tmp_path_factory.mktemp("extract")
    root = write_market(str(tmp / "data"), num_ids=3)
    cfg = tiny_cfg(root, str(tmp / "out"))
    cfg_file = str(tmp / "tiny.yaml")
    with open(cfg_file, "w") as f:
        f.write(cfg.dump())
    ckpt = str(tmp / "model.pth")
    model = save_model(cfg, ckpt)
    # other sizes than SIZE_TEST, so that the test transforms really resize
    images = tmp / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    for i in range(5):
        pixels = rng.integers(0, 256, (96, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"img_{i}.png")
    (images / "notes.txt").write_text("not an image")
    return {
        "root": root,
        "cfg": cfg,
        "cfg_file": cfg_file,
        "ckpt": ckpt,
        "model": model,
        "images": str(images),
        "tmp": tmp,
    }


@pytest.fixture(scope="module")
def extractor(setup):
    return FeatureExtractor(setup["cfg_file"], setup["ckpt"], batch_size=4)


def _image_files(folder):
    return sorted(glob.glob(os.path.join(folder, "*.png")))


def test_lazy_top_level_export():
    assert reidzoo.FeatureExtractor is FeatureExtractor


def test_matches_model_run_by_hand(setup, extractor):
    paths = _image_files(setup["images"])
    out = extractor.extract(paths)
    assert out.names == paths
    assert out.features.dtype == np.float32 and out.features.shape == (len(paths), 512)
    # reference: PIL bicubic resize to (W, H), float 0-255, the model on the batch, L2 rows
    batch = []
    for p in paths:
        img = Image.open(p).convert("RGB").resize((SIZE[1], SIZE[0]), Image.BICUBIC)
        batch.append(torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1))
    with torch.no_grad():
        ref = F.normalize(setup["model"].eval()(torch.stack(batch)), dim=1).numpy()
    np.testing.assert_allclose(out.features, ref, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out.features, axis=1), 1.0, atol=1e-6)


def test_matches_evaluation_path_with_flip(setup):
    """Raw features equal what fast-reid's inference_on_dataset hands the evaluator, with the
    trainer's test loader, the --eval-only weight loading and TEST.FLIP."""
    from fastreid.evaluation.evaluator import DatasetEvaluator, inference_on_dataset

    from reidzoo.checkpoint import load_weights
    from reidzoo.engine import ReidTrainer, build_dataset

    class Capture(DatasetEvaluator):
        def reset(self):
            self.feats, self.paths = [], []

        def process(self, inputs, outputs):
            self.feats.append(outputs.clone())
            self.paths += list(inputs["img_paths"])

        def evaluate(self):
            return {}

    cfg = setup["cfg"].clone()
    cfg.TEST.FLIP.ENABLED = True
    model = ReidTrainer.build_model(cfg)
    load_weights(model, setup["ckpt"], strict=True)
    loader, _ = ReidTrainer.build_test_loader(cfg, "Market1501")
    capture = Capture()
    inference_on_dataset(model, loader, capture, flip_test=True)
    ref = torch.cat(capture.feats).numpy()

    data = build_dataset(cfg, "Market1501")
    paths = [item[0] for item in data.query + data.gallery]
    assert paths == capture.paths
    fe = FeatureExtractor(cfg, setup["ckpt"], normalize=False)
    assert fe.flip and fe.batch_size == cfg.TEST.IMS_PER_BATCH
    out = fe.extract(paths)
    np.testing.assert_allclose(out.features, ref, rtol=0, atol=1e-5)
    fe.normalize = True
    normed = fe.extract(paths).features
    np.testing.assert_allclose(normed, F.normalize(torch.from_numpy(ref), dim=1), atol=1e-6)


def test_input_types_give_the_same_features(setup, extractor):
    folder = setup["images"]
    paths = _image_files(folder)
    ref = extractor(paths)
    pils = [Image.open(p) for p in paths]
    arrays = [np.asarray(p.convert("RGB")) for p in pils]
    tensors = [torch.from_numpy(a.copy()).permute(2, 0, 1) for a in arrays]
    variants = {
        "folder": folder,
        "glob": os.path.join(folder, "img_*.png"),
        "single paths": [paths[0], *paths[1:]],
        "PIL": pils,
        "numpy list": arrays,
        "numpy batch": np.stack(arrays),
        "float numpy": [a.astype(np.float64) for a in arrays],
        "uint8 tensors": tensors,
        "float tensor batch": torch.stack(tensors).float(),
        "mixed": [paths[0], pils[1], arrays[2], tensors[3], tensors[4].float()],
    }
    for what, inputs in variants.items():
        out = extractor.extract(inputs)
        assert out.features.shape == ref.shape, what
        np.testing.assert_allclose(out.features, ref, rtol=0, atol=1e-6, err_msg=what)
    assert extractor.extract(folder).names == paths  # notes.txt is not an image
    assert extractor.extract(arrays).names == [f"<ndarray #{i}>" for i in range(5)]
    # one image alone, another batch size: the same rows
    single = FeatureExtractor(setup["cfg_file"], setup["ckpt"], batch_size=1)
    np.testing.assert_allclose(single(pils[2]), ref[2:3], rtol=0, atol=1e-5)
    as_tensor = extractor(arrays, as_tensor=True)
    assert isinstance(as_tensor, torch.Tensor) and as_tensor.dtype == torch.float32


def test_flip_is_the_mean_of_both_passes(setup):
    paths = _image_files(setup["images"])
    fe = FeatureExtractor(setup["cfg"], setup["ckpt"], flip=False, normalize=False)
    assert not fe.flip  # tiny_cfg leaves TEST.FLIP.ENABLED False
    batch = torch.stack([fe.preprocess(p) for p in paths])
    assert batch.shape == (len(paths), 3, *SIZE)
    with torch.no_grad():
        a = setup["model"](batch)
        b = setup["model"](batch.flip(dims=[3]))
    assert not torch.allclose(a, b, atol=1e-4)  # a mirrored image gives other features
    torch.testing.assert_close(fe.forward(batch), a, rtol=0, atol=1e-5)
    fe.flip = True
    torch.testing.assert_close(fe.forward(batch), (a + b) / 2, rtol=0, atol=1e-5)
    fe.normalize = True
    normed = fe.extract(paths).features
    np.testing.assert_allclose(normed, F.normalize((a + b) / 2, dim=1), rtol=0, atol=1e-5)


def test_cli_writes_features_and_names(setup, extractor, tmp_path):
    out = tmp_path / "feats.npz"
    pattern = os.path.join(setup["images"], "*.png")
    argv = ["--config-file", setup["cfg_file"], "--checkpoint", setup["ckpt"]]
    argv += ["--input", pattern, "--output", str(out), "TEST.IMS_PER_BATCH", "2"]
    assert extract.main(argv) == 0
    data = extract.load_features(str(out))
    paths = _image_files(setup["images"])
    assert data["names"] == paths
    np.testing.assert_allclose(data["features"], extractor(paths), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(data["features"], axis=1), 1.0, atol=1e-6)
    assert data["checkpoint"] == setup["ckpt"] and data["config_file"] == setup["cfg_file"]
    assert "IMS_PER_BATCH: 2" in data["config"] and data["normalized"] and not data["flip"]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]

    raw = tmp_path / "raw.npz"
    argv = ["--config-file", setup["cfg_file"], "--checkpoint", setup["ckpt"], "--flip"]
    argv += ["--input", paths[0], "--input", paths[1], "--output", str(raw), "--no-normalize"]
    assert extract.main(argv) == 0
    data = extract.load_features(str(raw))
    assert data["names"] == paths[:2] and data["flip"] and not data["normalized"]
    assert not np.allclose(np.linalg.norm(data["features"], axis=1), 1.0)


def test_unreadable_image_is_named(setup, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.open(_image_files(setup["images"])[0]).save(folder / "good.png")
    (folder / "broken.jpg").write_bytes(b"\x00not a jpeg at all" * 8)
    fe = FeatureExtractor(setup["cfg"], setup["ckpt"])
    with pytest.raises(OSError, match=r"broken\.jpg"):
        fe.extract(str(folder))

    out = tmp_path / "feats.npz"
    out.write_bytes(b"previous content")
    argv = ["--config-file", setup["cfg_file"], "--checkpoint", setup["ckpt"]]
    rc = extract.main(argv + ["--input", str(folder), "--output", str(out)])
    assert rc == 1
    assert "broken.jpg" in capsys.readouterr().err
    assert out.read_bytes() == b"previous content"  # an existing output is left as it was
    assert sorted(os.listdir(tmp_path)) == ["feats.npz", "imgs"]


def test_checkpoint_that_does_not_match_the_config(setup, tmp_path, capsys):
    other = setup["cfg"].clone()
    other.MODEL.HEADS.EMBEDDING_DIM = 128  # adds a bottleneck: other keys and shapes
    bad = str(tmp_path / "other.pth")
    save_model(other, bad)
    with pytest.raises(CheckpointMismatchError, match=r"other\.pth") as err:
        FeatureExtractor(setup["cfg_file"], bad)
    assert "unexpected keys" in str(err.value) or "shape mismatches" in str(err.value)

    out = tmp_path / "feats.npz"
    argv = ["--config-file", setup["cfg_file"], "--checkpoint", bad]
    assert extract.main(argv + ["--input", setup["images"], "--output", str(out)]) == 1
    assert "does not match the model" in capsys.readouterr().err
    assert not out.exists()


def test_registered_model_names(setup, tmp_path, capsys):
    names = registered_models()
    ianet = os.path.join(REPO, "projects", "IANet", "configs", "IANet_R50_Market1501.yml")
    assert os.path.samefile(names["ianet-market1501"], ianet)
    assert os.path.samefile(names["ianet-r50-market1501"], ianet)
    for name, path in names.items():
        assert os.path.isfile(path), name
        assert not os.path.basename(path).startswith("Base-"), name
        assert f"{os.sep}ablations{os.sep}" not in path, name
    # every shipped leaf config is reachable by its derived full name
    leaves = glob.glob(os.path.join(REPO, "projects", "*", "configs", "[!B]*.yml"))
    assert leaves
    for path in leaves:
        full = os.path.splitext(os.path.basename(path))[0].lower().replace("_", "-")
        assert os.path.samefile(names[full], path)

    with pytest.raises(ValueError, match="ianet-market1501") as err:
        FeatureExtractor("no-such-model", setup["ckpt"])
    assert "no-such-model" in str(err.value)
    with pytest.raises(FileNotFoundError, match="missing/config.yml"):
        FeatureExtractor("missing/config.yml", setup["ckpt"])
    rc = extract.main(["--config-file", "no-such-model", "--input", "x", "--output", "y.npz"])
    assert rc == 1 and "registered names" in capsys.readouterr().err
    assert extract.main(["--list-models"]) == 0
    assert "ianet-market1501" in capsys.readouterr().out

    # a registered name builds its model and loads a checkpoint of that model
    opts = ["MODEL.DEVICE", "cpu", "INPUT.SIZE_TEST", "[64, 32]"]
    from reidzoo.config import setup_cfg

    demo_ckpt = str(tmp_path / "demo.pth")
    save_model(setup_cfg(names["demo-bagtricks-synthetic"], opts), demo_ckpt)
    fe = FeatureExtractor("demo-bagtricks-synthetic", demo_ckpt, opts=opts)
    assert fe.cfg.MODEL.WEIGHTS == demo_ckpt
    assert fe(_image_files(setup["images"])[:2]).shape == (2, 512)


def test_clear_errors_for_bad_inputs(setup, extractor, tmp_path):
    with pytest.raises(ValueError, match="no checkpoint"):
        FeatureExtractor(setup["cfg_file"])
    with pytest.raises(FileNotFoundError, match="nowhere.jpg"):
        extractor.extract(str(tmp_path / "nowhere.jpg"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no image"):
        extractor.extract(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"0-255"):
        extractor.extract(np.full((64, 32, 3), 0.5))  # an image in [0, 1]
    with pytest.raises(ValueError, match=r"\[C, H, W\]"):
        extractor.extract(torch.zeros(64, 32, 3, dtype=torch.uint8))  # HWC tensor
    with pytest.raises(TypeError, match="unsupported input type"):
        extractor.extract([3.14])


def test_text_file_input_is_one_error_line_even_with_workers(setup, capsys):
    """README: an unreadable image is one ``error:`` line. With loader workers the reading
    error happens in another process; it must not arrive as a worker traceback."""
    notes = os.path.join(setup["images"], "notes.txt")
    out = setup["tmp"] / "notes.npz"
    argv = ["--config-file", setup["cfg_file"], "--checkpoint", setup["ckpt"], "--input", notes,
            "--output", str(out), "--num-workers", "1"]  # fmt: skip
    assert extract.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot read image file"), err
    assert "notes.txt" in err[0] and "DataLoader worker" not in err[0]
    assert not out.exists()
    fe = FeatureExtractor(setup["cfg"], setup["ckpt"], num_workers=1)
    with pytest.raises(OSError, match=r"notes\.txt") as info:
        fe.extract(notes)
    assert "Traceback" not in str(info.value)


def test_classifier_of_a_trained_checkpoint_is_said_once_quietly(setup, tmp_path, caplog):
    """A trained checkpoint holds a 6-way classifier that the config (NUM_CLASSES 0) does not
    size: no "Skip loading parameter" warning, one INFO line, and the whole file loads."""
    trained = setup["cfg"].clone()
    trained.MODEL.HEADS.NUM_CLASSES = 6
    ckpt = str(tmp_path / "trained.pth")
    model = save_model(trained, ckpt, seed=4)
    argv = ["--config-file", setup["cfg_file"], "--checkpoint", ckpt, "--input",
            setup["images"], "--output", str(tmp_path / "f.npz")]  # fmt: skip
    checkpoint_logger = logging.getLogger("fastreid.utils.checkpoint")  # does not propagate
    checkpoint_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO):
            assert extract.main(argv) == 0
    finally:
        checkpoint_logger.removeHandler(caplog.handler)
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "Skip loading" in m], messages
    said = [r for r in caplog.records if "not needed for features" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], messages
    fe = FeatureExtractor(setup["cfg_file"], ckpt)
    assert all(torch.equal(v, fe.model.state_dict()[k]) for k, v in model.state_dict().items())


def test_checkpoint_argument_and_model_weights_are_the_same(setup, tmp_path):
    from reidzoo.inference import checkpoint_opts

    ckpt = setup["ckpt"]
    assert checkpoint_opts(None, ["A", "1"]) == ["A", "1"]
    assert checkpoint_opts(ckpt, ["MODEL.WEIGHTS", ckpt])[-2:] == ["MODEL.WEIGHTS", ckpt]
    with pytest.raises(ValueError, match="different files"):
        checkpoint_opts(ckpt, ["MODEL.WEIGHTS", str(tmp_path / "other.pth")])
    images = _image_files(setup["images"])[:2]
    base = ["--config-file", setup["cfg_file"], "--input", images[0], "--input", images[1]]
    a_file, b_file = str(tmp_path / "a.npz"), str(tmp_path / "b.npz")
    assert extract.main(base + ["--checkpoint", ckpt, "--output", a_file]) == 0
    assert extract.main(base + ["--output", b_file, "MODEL.WEIGHTS", ckpt]) == 0
    a, b = extract.load_features(a_file), extract.load_features(b_file)
    np.testing.assert_array_equal(a["features"], b["features"])
    assert a["checkpoint"] == b["checkpoint"] == ckpt


def test_in_memory_16bit_image_is_converted_as_a_file_would_be(tmp_path):
    """A 16-bit PIL image passed in memory gets the readers' high-byte rule, not clipping."""
    import numpy as np
    from PIL import Image

    from reidzoo.data.images import read_image
    from reidzoo.inference import to_pil

    values = np.array([[0, 256, 32768, 65535]], dtype=np.uint16)
    img = Image.fromarray(values)  # mode I;16
    path = tmp_path / "deep.png"
    img.save(path)
    from_file = np.asarray(read_image(str(path)))
    in_memory = np.asarray(to_pil(Image.open(path)))
    assert in_memory.tolist() == from_file.tolist()
    assert in_memory[0, :, 0].tolist() == [0, 1, 128, 255]
