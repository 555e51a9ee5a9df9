"""Explanatory maps: registration with the input, each paper's producer on a small random
model (input-dependent, in the model's geometry), the registry and the ``maps`` command."""

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from reidzoo.config import setup_cfg
from reidzoo.modeling.build import build_eval_model
from reidzoo.visualize import maps as maps_cli
from reidzoo.visualize.overlay import (
    MAP_REGISTRY,
    MapPanel,
    MapProducer,
    cell_center,
    colorize,
    draw_rows,
    marker_pixel,
    normalize_map,
    render_kind,
    render_panel,
    select_producers,
    upsample_map,
)
from tests.helpers import REPO

PROJECTS = os.path.join(REPO, "projects")
IANET_CI = os.path.join(PROJECTS, "IANet", "configs", "IANet_R18_synthetic_ci.yml")
PAN_CI = os.path.join(PROJECTS, "PAN", "configs", "PAN_R18_synthetic_ci.yml")
PFE_CI1 = os.path.join(PROJECTS, "PFE", "configs", "PFE_R18_synthetic_ci_stage1.yml")
PFE_CI2 = os.path.join(PROJECTS, "PFE", "configs", "PFE_R18_synthetic_ci_stage2.yml")
RMGL_CI = os.path.join(PROJECTS, "RMGL", "configs", "RMGL_R18_synthetic_ci.yml")
PMM_CI = os.path.join(PROJECTS, "PMM", "configs", "PMM_R18_synthetic_ci.yml")
SMALL = ["INPUT.SIZE_TEST", "[64, 32]"]


def _write_images(folder):
    """Two 100x40 images (not the test size): noise with a bright block high or low."""
    rng = np.random.default_rng(0)
    paths = []
    for i, rows in enumerate(((5, 40), (60, 95))):
        a = rng.integers(0, 120, (100, 40, 3)).astype(np.uint8)
        a[rows[0] : rows[1], 8:32] = (250, 240, 60)
        paths.append(os.path.join(folder, f"person{i}.png"))
        Image.fromarray(a).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory):
    return _write_images(str(tmp_path_factory.mktemp("inputs")))


def _model(config, *opts):
    cfg = setup_cfg(config, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", *opts])
    torch.manual_seed(0)
    return build_eval_model(cfg), cfg


def _produce(model, cfg, paths, **options):
    images = maps_cli.load_images(paths, cfg)
    assert images.shape[-2:] == tuple(cfg.INPUT.SIZE_TEST)  # the model's test geometry
    ((tag, per_image),) = maps_cli.produce_maps(model, cfg, images, options=options)
    assert len(per_image) == len(paths)
    return images, tag, per_image


def _differ(per_image, kind):
    """Some panel of ``kind`` differs between the two images."""
    a, b = per_image[0][kind], per_image[1][kind]
    return any(not torch.allclose(p.values, q.values, atol=1e-6) for p, q in zip(a, b))


def _box(index, cells, pixels):
    """Pixel range [lo, hi) whose pixel centres lie in cell ``index`` of ``cells``."""
    return (math.ceil(index * pixels / cells - 0.5), math.ceil((index + 1) * pixels / cells - 0.5))


# ----------------------------------------------------------------------------- registration


@pytest.mark.parametrize("hw,size", [((4, 2), (64, 32)), ((6, 2), (96, 32)), ((5, 3), (64, 32))])
def test_single_hot_cell_lands_on_its_image_region(hw, size):
    h, w = hw
    height, width = size
    for i, j in ((0, 0), (h - 1, w - 1), (h // 2, w // 2)):
        cell = torch.zeros(h, w)
        cell[i, j] = 3.0
        rows, cols = _box(i, h, height), _box(j, w, width)
        near = upsample_map(cell, size, "nearest")
        hot = (near == near.max()).nonzero()
        assert near.shape == size
        assert hot[:, 0].min() == rows[0] and hot[:, 0].max() == rows[1] - 1
        assert hot[:, 1].min() == cols[0] and hot[:, 1].max() == cols[1] - 1
        # bilinear: the peak lies inside the cell's pixels, and so does the cell's marker
        lin = upsample_map(cell, size, "bilinear")
        py, px = divmod(int(lin.argmax()), width)
        assert rows[0] <= py < rows[1] and cols[0] <= px < cols[1]
        my, mx = marker_pixel((cell_center(i, h), cell_center(j, w)), size)
        assert rows[0] <= my < rows[1] and cols[0] <= mx < cols[1]
        # the blended overlay is hottest (reddest) at the same place, at any display scale
        for scale in (1, 3):
            image = np.full((3, height, width), 128.0, dtype=np.float32)
            out = render_panel(image, MapPanel("t", cell), alpha=0.7, scale=scale)
            assert out.shape == (height * scale, width * scale, 3)
            red = out[..., 0].astype(int) - out[..., 2].astype(int)
            ry, rx = divmod(int(red.argmax()), width * scale)
            assert rows[0] * scale <= ry < rows[1] * scale
            assert cols[0] * scale <= rx < cols[1] * scale


def test_blend_rows_and_markers():
    torch.manual_seed(0)
    image = torch.rand(3, 32, 16) * 255
    values = torch.rand(4, 2)
    base = render_panel(image, MapPanel("a", values), alpha=0.0)
    assert np.array_equal(base, image.round().permute(1, 2, 0).numpy().astype(np.uint8))
    full = render_panel(image, MapPanel("a", values), alpha=1.0)
    assert np.array_equal(full, colorize(upsample_map(normalize_map(values), (32, 16))))
    # a stripe boundary after map row 1 of 4 is input row 8 (x2 when enlarged twice)
    lined = draw_rows(np.zeros((64, 32, 3), np.uint8), [1 / 4])
    assert (lined[16] == 255).all() and lined.sum() == 32 * 3 * 255
    tiles = render_kind(image, [MapPanel("m", values, markers=((0.9, 0.1),))], scale=2)
    assert [t for t, _ in tiles] == ["input", "m"] and tiles[0][1].shape == (64, 32, 3)
    y, x = marker_pixel((0.9, 0.1), (64, 32))
    assert (tiles[0][1][y, x] == 255).all()  # the cross's centre on the input tile
    with pytest.raises(ValueError, match=r"\[h, w\]"):
        MapPanel("bad", torch.zeros(2, 3, 4))


# ------------------------------------------------------------------------------- producers


def test_ianet_receptive_fields_and_channels(image_paths):
    model, cfg = _model(IANET_CI, *SMALL)
    _, tag, per_image = _produce(model, cfg, image_paths)
    assert tag == "ianet"
    kinds = per_image[0]
    assert list(kinds) == ["sia_layer2", "cia_layer2", "sia_layer3", "cia_layer3"]
    assert [p.values.shape for p in kinds["sia_layer2"]] == [(8, 4)] * 5  # stride 8 at 64x32
    assert [p.values.shape for p in kinds["sia_layer3"]] == [(4, 2)] * 5  # stride 16
    assert [p.title for p in kinds["cia_layer3"]] == ["CIA ch 4", "CIA ch 24", "CIA ch 120"]
    for p in kinds["sia_layer3"]:  # relation rows are distributions over positions
        assert p.values.sum().item() == pytest.approx(1.0, abs=1e-5)
    for kind in kinds:
        assert _differ(per_image, kind), kind
    with pytest.raises(ValueError, match="--channels"):
        _produce(model, cfg, image_paths, channels=[300])


def test_ianet_location_field_peaks_at_the_chosen_position(image_paths):
    opts = ["INPUT.SIZE_TEST", "[128, 64]", "MODEL.IANET.RELATION", "location",
            "MODEL.IANET.SIGMA_LAYER3", "[0.7, 1.4]"]  # fmt: skip
    model, cfg = _model(IANET_CI, *opts)
    positions = [(0.2, 0.25), (0.55, 0.9), (0.99, 0.0)]
    images, _, per_image = _produce(model, cfg, image_paths[:1], positions=positions)
    h, w = 8, 4  # layer3 at 128x64
    for (fy, fx), panel in zip(positions, per_image[0]["sia_layer3"]):
        assert panel.values.shape == (h, w)
        i, j = min(int(fy * h), h - 1), min(int(fx * w), w - 1)
        assert divmod(int(panel.values.argmax()), w) == (i, j)
        rows, cols = _box(i, h, 128), _box(j, w, 64)
        (my, mx) = marker_pixel(panel.markers[0], (128, 64))
        assert rows[0] <= my < rows[1] and cols[0] <= mx < cols[1]
        lin = upsample_map(panel.values, (128, 64))
        py, px = divmod(int(lin.argmax()), 64)
        assert rows[0] <= py < rows[1] and cols[0] <= px < cols[1]


def test_pan_part_masks_and_compatibility(image_paths):
    model, cfg = _model(PAN_CI, "MODEL.HEADS.NUM_CLASSES", "5", *SMALL)
    _, tag, per_image = _produce(model, cfg, image_paths)
    kinds = per_image[0]
    assert tag == "pan" and list(kinds) == ["plm", "pam", "pam_layer1", "pam_layer2", "pam_layer3"]
    titles = ["l1 p1", "l2 p1", "l2 p2", "l3 p1", "l3 p2", "l3 p3"]
    assert [p.title for p in kinds["plm"]] == [f"PLM {t}" for t in titles]
    assert {p.values.shape for p in kinds["plm"]} == {(4, 2)}  # layer4, last stride 1
    assert all((p.values >= 0).all() for p in kinds["plm"])  # ReLU masks
    assert [p.values.shape for p in kinds["pam"]] == [(16, 8), (8, 4), (4, 2)]  # blocks 1-3
    assert [p.values.shape for p in kinds["pam_layer3"]] == [(4, 2)] * 6
    # Fig. 5 is the first-scale part's row of each block's compatibility map
    assert torch.equal(kinds["pam"][2].values, kinds["pam_layer3"][0].values)
    for kind in kinds:
        assert _differ(per_image, kind), kind


@pytest.mark.parametrize("stage", [1, 2])
def test_pfe_activations_and_mfa_masks(image_paths, stage):
    from reidzoo.projects.pfe import mask_count

    if stage == 2:
        model, cfg = _model(PFE_CI2, *SMALL)
    else:
        model, cfg = _model(PFE_CI1, *SMALL)
    _, tag, per_image = _produce(model, cfg, image_paths)
    kinds = per_image[0]
    shapes = [(16, 8), (8, 4), (4, 2), (4, 2)]  # layer1-4 at 64x32, last stride 1
    assert tag == "pfe" and [p.values.shape for p in kinds["activations"]] == shapes
    assert _differ(per_image, "activations")
    if stage == 1:
        assert list(kinds) == ["activations"]
        return
    alpha = cfg.MODEL.PFE.ALPHA
    for a, m in zip(kinds["activations"], kinds["masks"]):
        assert m.interpolation == "nearest" and set(m.values.unique().tolist()) <= {0.0, 1.0}
        k = mask_count(*a.values.shape, alpha)
        assert int(m.values.sum()) == k  # the top-alpha positions of A_s, masked out (Eq. 12)
        assert a.values[m.values.bool()].min() >= a.values[~m.values.bool()].max()
    assert _differ(per_image, "masks")


def test_rmgl_responses_and_abp_split(image_paths):
    from reidzoo.projects.rmgl import abp_split_points
    from reidzoo.projects.rmgl.maps import branch_final_maps

    model, cfg = _model(RMGL_CI, "MODEL.HEADS.NUM_CLASSES", "5")
    images, tag, per_image = _produce(model, cfg, image_paths)
    kinds = per_image[0]
    assert tag == "rmgl" and list(kinds) == ["responses", "abp"]
    assert [p.title for p in kinds["responses"]] == ["O-2", "RP-2", "O-3", "RP-3"]
    assert {p.values.shape for p in kinds["responses"]} == {(6, 2)}  # 96x32 / 16
    assert kinds["responses"][1].rows == (0.5,)
    assert kinds["responses"][3].rows == pytest.approx((1 / 3, 2 / 3))
    # the maps are the model's own: their GMP is the model's pooled global features
    with torch.no_grad():
        x = model.preprocess_image(images)
        branches = branch_final_maps(model, x)
        pooled = dict(zip(model.feature_names(), model.pooled_features(x)))
    for br, tagk in zip(branches, ("local2", "local3")):
        assert torch.allclose(br["original"].amax((2, 3)), pooled[f"{tagk}_orig_global"])
        assert torch.allclose(br["rp"].amax((2, 3)), pooled[f"{tagk}_rp_global"])
    for b, (k, panel) in enumerate(zip((2, 3), kinds["abp"])):
        bounds = abp_split_points(branches[b]["original"], k)[0, 1:-1]
        assert panel.rows == pytest.approx(tuple((bounds / 6.0).tolist()))
        assert kinds["responses"][2 * b].rows == panel.rows  # O-K drawn with ABP's split
        # every channel with a unique maximum counted once, a tied one nowhere (Eq. 8)
        y = branches[b]["original"][0].flatten(1)
        assert panel.values.sum() == (y == y.amax(1, keepdim=True)).sum(1).eq(1).sum()
        # a split after map row r is drawn on input row 16 r
        out = render_panel(images[0], panel, alpha=0.5)
        for r in bounds.tolist():
            assert (out[16 * r] == 255).all()
    for kind in kinds:
        assert _differ(per_image, kind), kind


def test_pmm_stage_grad_cams(image_paths):
    model, cfg = _model(PMM_CI, "MODEL.HEADS.NUM_CLASSES", "5")
    images, tag, per_image = _produce(model, cfg, image_paths)
    panels = per_image[0]["gradcam"]
    assert tag == "pmm" and [p.title.split(" id")[0] for p in panels] == [
        "stage I", "stage II", "stage III"]  # fmt: skip
    assert {p.values.shape for p in panels} == {(8, 4)}  # layer4 stride 1 at 128x64
    assert all((p.values >= 0).all() for p in panels)
    assert _differ(per_image, "gradcam")
    # stage II against a full Grad-CAM: gradient of the predicted score w.r.t. x_part
    with torch.no_grad():
        _, xp = model.trunk(model.preprocess_image(images))
    xp = xp.detach().requires_grad_()
    logits = model.heads.classifiers[1](model.heads.reductions[1](xp.amax(dim=(2, 3))))
    score = logits.gather(1, logits.argmax(1, keepdim=True)).sum()
    (g,) = torch.autograd.grad(score, xp)
    ref = torch.relu((g.mean(dim=(2, 3))[:, :, None, None] * xp.detach()).sum(1))
    for i in range(2):
        assert torch.allclose(per_image[i]["gradcam"][1].values, ref[i], atol=1e-5, rtol=1e-4)
    no_cls, cfg0 = _model(PMM_CI)
    with pytest.raises(ValueError, match="MODEL.HEADS.NUM_CLASSES"):
        _produce(no_cls, cfg0, image_paths)


# ----------------------------------------------------------------------- registry and CLI


def test_registry_matches_models_and_accepts_third_party_producers():
    ianet, cfg = _model(IANET_CI, *SMALL)
    assert [c.__name__ for c in select_producers(ianet, cfg)] == ["IANetMaps"]
    plain, plain_cfg = _model("", "MODEL.BACKBONE.PRETRAIN", "False", "MODEL.BACKBONE.DEPTH",
                              "18x", "MODEL.BACKBONE.FEAT_DIM", "512")  # fmt: skip
    with pytest.raises(ValueError, match="no explanatory-map producer"):
        select_producers(plain, plain_cfg)
    with pytest.raises(KeyError, match="IANetMaps"):  # the error lists the registered ones
        select_producers(plain, plain_cfg, ["NoSuchMaps"])

    class ThirdPartyStemMaps(MapProducer):
        TAG = "stem"
        MODULE_TYPES = (torch.nn.MaxPool2d,)

        def produce(self, images):
            return [{"mean": [MapPanel("mean", im.mean(0))]} for im in images]

    MAP_REGISTRY.register(ThirdPartyStemMaps)
    try:
        names = [c.__name__ for c in select_producers(plain, plain_cfg)]
        assert names == ["ThirdPartyStemMaps"]
    finally:
        MAP_REGISTRY._obj_map.pop("ThirdPartyStemMaps")


def test_cli_writes_decodable_pngs(image_paths, tmp_path):
    model, _ = _model(IANET_CI, *SMALL)
    ckpt = str(tmp_path / "ianet.pth")
    torch.save({"model": model.state_dict()}, ckpt)
    out = str(tmp_path / "maps")
    argv = ["--config-file", IANET_CI, "--input", *image_paths, "--checkpoint", ckpt,
            "--output", out, "--positions", "0.3,0.5", "0.7,0.5", "--scale", "2",
            "MODEL.DEVICE", "cpu", *SMALL]  # fmt: skip
    assert maps_cli.main(argv) == 0
    files = sorted(os.listdir(out))
    kinds = ["cia_layer2", "cia_layer3", "sia_layer2", "sia_layer3"]
    assert files == sorted(f"person{i}_ianet_{k}.png" for i in (0, 1) for k in kinds)
    for name in files:
        with Image.open(os.path.join(out, name)) as im:
            im.load()
            assert im.mode == "RGB" and im.height >= 2 * 64 and im.width >= 3 * 2 * 32
    with Image.open(os.path.join(out, "person0_ianet_sia_layer3.png")) as im:
        assert im.width >= 3 * 2 * 32  # input + two receptive fields, each 64 wide
    # the sub-command of `python -m reidzoo.visualize`, on a folder, one image per batch
    from reidzoo.visualize.__main__ import main as visualize_main

    out2 = str(tmp_path / "folder")
    argv = ["maps", "--config-file", PAN_CI, "--input", os.path.dirname(image_paths[0]),
            "--output", out2, "--batch", "1", "MODEL.DEVICE", "cpu",
            "MODEL.HEADS.NUM_CLASSES", "5", *SMALL]  # fmt: skip
    assert visualize_main(argv) == 0
    assert len([f for f in os.listdir(out2) if f.endswith(".png")]) == 2 * 5
    with pytest.raises(FileNotFoundError, match="missing.png"):
        maps_cli.main(["--config-file", IANET_CI, "--input", str(tmp_path / "missing.png")])
