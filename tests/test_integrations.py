"""reidzoo.integrations.BoxMOTReID: features of a frame's detections equal the model on the
crops computed by hand and FeatureExtractor.extract of the same crops; a BoxMOT tracker (when
boxmot is installed) runs on synthetic frames with it as its reid_model."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from reidzoo.inference import FeatureExtractor
from reidzoo.integrations import BoxMOTReID
from tests.helpers import tiny_cfg

SIZE = (64, 32)  # INPUT.SIZE_TEST of tiny_cfg


def _extractor(tmp_path, flip=False, batch_size=2):
    torch.manual_seed(0)
    cfg = tiny_cfg(str(tmp_path / "data"), str(tmp_path / "out"))
    return FeatureExtractor(cfg, allow_random_weights=True, flip=flip, batch_size=batch_size)


def _frame(seed=0, shape=(120, 160)):
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


def _by_hand(model, rgb_crops, flip):
    """PIL bicubic resize to (W, H), float 0-255, the eval model (mean with the mirror when
    flipping), L2 rows: the test transform and evaluation written out."""
    batch = []
    for crop in rgb_crops:
        img = Image.fromarray(np.ascontiguousarray(crop)).resize((SIZE[1], SIZE[0]), Image.BICUBIC)
        batch.append(torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1))
    x = torch.stack(batch)
    with torch.no_grad():
        out = model(x)
        if flip:
            out = (out + model(x.flip(dims=[3]))) / 2
    return F.normalize(out, dim=1).numpy()


@pytest.mark.parametrize("flip", [False, True], ids=["plain", "flip"])
def test_get_features_equals_crop_and_extract(tmp_path, flip):
    ex = _extractor(tmp_path, flip=flip)
    reid = BoxMOTReID(ex)
    frame = _frame()  # 120 x 160, BGR
    dets = np.array(
        [
            [10, 5, 50, 85, 0.9, 0],  # inside
            [60.4, 20.6, 95.6, 100.2, 0.8, 0],  # fractional: rounded to 60:96, 21:100
            [-10, -8, 30, 40, 0.7, 0],  # over the top-left corner: clipped to 0:30, 0:40
            [150, 100, 200, 150, 0.6, 0],  # over the bottom-right corner: 150:160, 100:120
            [30, 30, 50, 70, 0.5, 0],  # five boxes: three batches of batch_size 2
        ],
        dtype=np.float32,
    )
    slices = [(5, 85, 10, 50), (21, 100, 60, 96), (0, 40, 0, 30), (100, 120, 150, 160)]
    slices.append((30, 70, 30, 50))
    rgb = [frame[y1:y2, x1:x2, ::-1] for y1, y2, x1, x2 in slices]

    feats = reid.get_features(dets, frame)
    assert feats.dtype == np.float32 and feats.shape == (5, 512)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-6)
    ref = _by_hand(ex.model, rgb, flip)
    np.testing.assert_allclose(feats, ref, rtol=0, atol=1e-5)
    np.testing.assert_allclose(feats, ex.extract(rgb).features, rtol=0, atol=1e-6)
    # the rows differ by far more than the tolerance, so a box fed another's crop would fail
    gaps = np.linalg.norm(ref[:, None] - ref[None], axis=2)[np.triu_indices(5, 1)]
    assert gaps.min() > 1e-3
    # only the first four columns are geometry
    np.testing.assert_array_equal(reid.get_features(dets[:, :4], frame), feats)


def test_interface_and_edge_cases(tmp_path):
    ex = _extractor(tmp_path)
    reid = BoxMOTReID(ex)
    assert reid.device == torch.device("cpu")
    assert reid.input_shape == SIZE and reid.embedding_dim == 512
    frame = _frame(1)

    empty = reid.get_features(np.zeros((0, 6), np.float32), frame)
    assert empty.shape == (0, 512) and empty.dtype == np.float32
    # a box with nothing inside the frame still gets a row: that of a black crop
    outside = reid.get_features([[200, 10, 260, 90, 0.9, 0]], frame)
    black = ex.extract(np.zeros((*SIZE, 3), np.uint8)).features
    np.testing.assert_allclose(outside, black, rtol=0, atol=1e-6)

    with pytest.raises(ValueError, match="oriented boxes"):
        reid.get_features(np.array([[50, 50, 20, 40, 0.3]]), frame)
    with pytest.raises(ValueError, match="BGR frame"):
        reid.get_features([[0, 0, 10, 10]], frame[:, :, 0])
    with pytest.raises(TypeError, match="give one or the other"):
        BoxMOTReID(ex, device="cpu")


def _people_frames(num_frames):
    """Frames with three textured 80 x 36 'people' walking right on a grey background, and
    their detections [x1, y1, x2, y2, conf, cls]."""
    rng = np.random.default_rng(0)
    people = [rng.integers(0, 256, (80, 36, 3), dtype=np.uint8) for _ in range(3)]
    out = []
    for t in range(num_frames):
        img = np.full((160, 240, 3), 90, np.uint8)
        dets = []
        for i, person in enumerate(people):
            x, y = 20 + 70 * i + 3 * t, 40 + (i % 2) * 10
            img[y : y + 80, x : x + 36] = person
            dets.append([x, y, x + 36, y + 80, 0.9, 0])
        out.append((img, np.array(dets, np.float32)))
    return out


@pytest.mark.parametrize("tracker_name", ["BotSort", "StrongSort"])
def test_boxmot_tracker_with_adapter(tmp_path, tracker_name):
    boxmot = pytest.importorskip("boxmot", reason="boxmot is not installed (the [interop] extra)")
    ex = _extractor(tmp_path, batch_size=8)
    reid = BoxMOTReID(ex)
    calls = []
    get_features = reid.get_features

    def spy(boxes, image):
        feats = get_features(boxes, image)
        calls.append((np.array(boxes), image.copy(), feats))
        return feats

    reid.get_features = spy
    kwargs = {"use_cmc": False} if tracker_name == "BotSort" else {}
    tracker = getattr(boxmot, tracker_name)(reid_model=reid, **kwargs)
    ids = []  # per frame: track id of each detection index
    frames = _people_frames(5)
    for img, dets in frames:
        tracks = tracker.update(dets, img)  # rows: x1 y1 x2 y2 id conf cls det_index
        ids.append({int(r[7]): int(r[4]) for r in tracks})

    # the tracker asked the adapter for the features of every frame's detections ...
    assert len(calls) == len(frames)
    for (img, dets), (boxes, image, feats) in zip(frames, calls):
        np.testing.assert_array_equal(boxes[:, :4], dets[:, :4])
        np.testing.assert_array_equal(image, img)
        rgb = [img[int(y1) : int(y2), int(x1) : int(x2), ::-1] for x1, y1, x2, y2 in dets[:, :4]]
        np.testing.assert_allclose(feats, ex.extract(rgb).features, rtol=0, atol=1e-6)
    # ... and, once confirmed, each person keeps one track id of its own
    assert ids[-1].keys() == {0, 1, 2} and len(set(ids[-1].values())) == 3
    for frame_ids in ids:
        assert all(ids[-1][det] == track for det, track in frame_ids.items())
