"""RMGL: RP / ABP / RSA against slow references, paper properties and numbers, export, training."""

import copy
import math
import os
import random

import pytest
import torch
from fastreid.modeling.meta_arch import build_model
from PIL import Image
from reidzoo.projects.rmgl import (
    RMGL,
    ActivationBalancedPooling,
    CropResizeShift,
    RandomShift,
    abp_split_points,
    channel_peaks,
    masked_stripe_pool,
    receptive_field,
    receptive_partition,
    stripe_masks,
)
from reidzoo.projects.rmgl.maps import argmax_counts

from reidzoo import complexity
from reidzoo.config import get_cfg, setup_cfg
from tests.helpers import (
    REPO,
    TINY_SYNTH,
    cpu_cfg,
    evaluate_on_training_ids,
    fix_batch,
    run_steps,
    train_then_eval_only,
    write_training_ids_testset,
)

CONFIGS = os.path.join(REPO, "projects", "RMGL", "configs")
MARKET = os.path.join(CONFIGS, "RMGL_R50_Market1501.yml")
CI = os.path.join(CONFIGS, "RMGL_R18_synthetic_ci.yml")


# ----------------------------------------------------------------------------- ABP (Eq. 8-10)


def _slow_split_points(x, parts, ties="strict"):
    """Per sample, per channel, with Python loops: Eq. 8 (strict: I = 1 where every other
    position is strictly smaller; first: the first maximum), Eq. 9 (1-indexed cumulative
    histogram), Eq. 10 (h_k = max{h : Hx(h) <= k C / n_s}), then >= 1 row each."""
    n, c, h, w = x.shape
    out = []
    for i in range(n):
        cnt = [0] * h
        for ch in range(c):
            flat = x[i, ch].flatten().tolist()
            if ties == "first":
                best = max(range(h * w), key=lambda j: (flat[j], -j))  # first maximum
                cnt[best // w] += 1
                continue
            for j, v in enumerate(flat):  # Eq. 8, literally
                if all(o < v for k, o in enumerate(flat) if k != j):
                    cnt[j // w] += 1
        hx = [sum(cnt[:r]) for r in range(h + 1)]  # hx[r] = Hx(r), Hx(0) = 0
        bounds = [0]
        for k in range(1, parts):
            hk = max(r for r in range(h + 1) if hx[r] * parts <= k * c)
            hk = min(max(hk, bounds[-1] + 1), h - (parts - k))
            bounds.append(hk)
        out.append(bounds + [h])
    return out


def _peaked(n, c, h, w, rows, seed):
    """Random maps whose channel maxima sit in the given rows (to force clamping)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, c, h, w, generator=g)
    for ch in range(c):
        r = rows[ch % len(rows)]
        x[:, ch, r, ch % w] += 10.0
    return x


@pytest.mark.parametrize("ties", ["strict", "first"])
@pytest.mark.parametrize("parts", [2, 3, 4])
def test_abp_split_points_equal_slow_reference(parts, ties):
    g = torch.Generator().manual_seed(10 + parts)
    cases = [
        torch.randn(4, 24, 8, 3, generator=torch.Generator().manual_seed(parts)),
        _peaked(3, 24, 8, 3, [0], seed=1),  # every maximum in row 0: clamping
        _peaked(3, 24, 8, 3, [7], seed=2),  # every maximum in the last row
        _peaked(3, 24, 8, 3, [1, 5], seed=3),
        torch.zeros(2, 24, 8, 3),  # all ties: strict -> counted nowhere, first -> row 0
        torch.randint(0, 3, (3, 24, 8, 3), generator=g).float(),  # many tied maxima
        torch.relu(torch.randn(3, 24, 4, 2, generator=g) - 1.5),  # dead (all-zero) channels
    ]
    for x in cases:
        got = abp_split_points(x, parts, ties)
        assert got.dtype == torch.int64 and got.shape == (x.shape[0], parts + 1)
        assert got.tolist() == _slow_split_points(x, parts, ties)


def _tied_map():
    """[1, 8, 6, 2]: channels 0-4 peak once, at rows 5, 4, 3, 5, 2; channel 5 reaches its
    maximum at (1, 1) and (4, 0); channels 6 and 7 are all zero."""
    x = torch.full((1, 8, 6, 2), 0.5)
    x[0, 6:] = 0.0
    for ch, (r, col) in enumerate([(5, 0), (4, 1), (3, 0), (5, 1), (2, 1)]):
        x[0, ch, r, col] = 2.0
    x[0, 5, 1, 1] = x[0, 5, 4, 0] = 3.0
    return x


@pytest.mark.parametrize(
    "ties, counts, splits",
    [
        # Eq. 8: channels 5-7 have no strict maximum. Histogram per row [0, 0, 1, 1, 1, 2],
        # Hx = [0, 0, 1, 2, 3, 5] against k C / n_s with C = 8: n_s = 2: Hx <= 4 on rows 0-4
        # -> h_1 = 5; n_s = 3: Hx <= 8/3 on rows 0-3 -> 4, Hx <= 16/3 on all 6 rows -> 6,
        # clamped to H - 1 = 5 so that the last stripe keeps a row.
        ("strict", [0, 0, 1, 1, 1, 2], {2: [0, 5, 6], 3: [0, 4, 5, 6]}),
        # first maximum: channel 5 at row 1 ((1, 1) precedes (4, 0)), channels 6-7 at row 0.
        # Histogram [2, 1, 1, 1, 1, 2], Hx = [2, 3, 4, 5, 6, 8]: n_s = 2: Hx <= 4 on rows 0-2
        # -> 3; n_s = 3: Hx <= 8/3 on row 0 -> 1, Hx <= 16/3 on rows 0-3 -> 4.
        ("first", [2, 1, 1, 1, 1, 2], {2: [0, 3, 6], 3: [0, 1, 4, 6]}),
    ],
)
def test_abp_tied_and_zero_channels(ties, counts, splits):
    x = _tied_map()
    index, counted = channel_peaks(x, ties)
    assert index[0, :5].tolist() == [10, 9, 6, 11, 5] and index[0, 5].item() == 3
    assert counted[0].tolist() == ([True] * 5 + [False] * 3 if ties == "strict" else [True] * 8)
    assert argmax_counts(x, ties)[0].sum(dim=1).tolist() == counts
    for parts, expected in splits.items():
        assert abp_split_points(x, parts, ties)[0].tolist() == expected
        # the stripes the module pools are those rows (max over each stripe)
        got = ActivationBalancedPooling(parts, "max", ties)(x)[0]
        ref = [x[0, :, a:b].amax(dim=(1, 2)) for a, b in zip(expected[:-1], expected[1:])]
        assert torch.equal(got, torch.stack(ref))


def test_abp_ties_switch_reaches_the_model():
    for ties in ("strict", "first"):
        cfg = setup_cfg(CI, ["MODEL.RMGL.ABP_TIES", ties])
        model = build_model(cfg)
        assert [m.ties for m in model.abp if isinstance(m, ActivationBalancedPooling)] == [ties] * 2
    assert get_cfg().MODEL.RMGL.ABP_TIES == "strict"
    with pytest.raises(ValueError, match="ABP_TIES='last'"):
        build_model(setup_cfg(CI, ["MODEL.RMGL.ABP_TIES", "last"]))


def test_abp_stripes_as_balanced_as_eq10_allows():
    torch.manual_seed(0)
    c, h, parts = 48, 12, 3
    x = torch.randn(6, c, h, 4) + torch.linspace(0, 2, h).view(1, 1, h, 1)  # skewed
    bounds = abp_split_points(x, parts)
    rows = x.flatten(2).argmax(2) // 4
    for i in range(x.shape[0]):
        b = bounds[i].tolist()
        assert all(b[k + 1] - b[k] >= 1 for k in range(parts))  # >= 1 row each
        cnt = torch.bincount(rows[i], minlength=h)
        cum = torch.cat([torch.zeros(1, dtype=cnt.dtype), cnt.cumsum(0)])  # Hx(0..H)
        for k in range(1, parts):
            hk = b[k]
            # unclamped split points are the largest h with Hx(h) <= kC/n_s: one row more
            # would exceed the balanced share, so no finer balance is possible on rows
            if b[k - 1] + 1 < hk < h - (parts - k):
                assert cum[hk] * parts <= k * c < cum[hk + 1] * parts
        # the stripes' argmax counts never exceed the balanced share by more than a row holds
        for k in range(parts):
            share = cnt[b[k] : b[k + 1]].sum().item()
            assert share <= math.ceil(c / parts) + cnt.max().item()


@pytest.mark.parametrize("mode", ["max", "avg"])
def test_abp_pooling_equals_slicing(mode):
    torch.manual_seed(1)
    x = torch.randn(3, 10, 9, 4)
    abp = ActivationBalancedPooling(3, mode)
    got = abp(x)
    bounds = abp_split_points(x, 3).tolist()
    for i in range(3):
        for k in range(3):
            s = x[i, :, bounds[i][k] : bounds[i][k + 1]]
            ref = s.amax(dim=(1, 2)) if mode == "max" else s.mean(dim=(1, 2))
            assert torch.allclose(got[i, k], ref, atol=1e-6)
    m = stripe_masks(abp_split_points(x, 3), 9)
    assert m.sum(1).eq(1).all()  # the stripes tile the rows
    assert torch.equal(masked_stripe_pool(x, m, mode), got)


# ---------------------------------------------------------------------------- RP (§III-B)


def _branch():
    """A ResNet-18 layer2-4 chain in eval mode (BN then treats stripes independently)."""
    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.BACKBONE.DEPTH", "18x", "MODEL.BACKBONE.PRETRAIN", False])
    from reidzoo.modeling.backbone import build_staged_resnet

    bb = build_staged_resnet(cfg).eval()
    return torch.nn.Sequential(*(copy.deepcopy(getattr(bb, s)) for s in ("layer2", "layer3")))


@pytest.mark.parametrize("parts", [2, 3])
def test_rp_equals_running_each_stripe_separately(parts):
    torch.manual_seed(2)
    branch = _branch()
    x = torch.randn(2, 64, 12 * parts, 8)
    with torch.no_grad():
        got = receptive_partition(x, branch, parts)
        h = x.shape[2] // parts
        ref = torch.cat([branch(x[:, :, k * h : (k + 1) * h]) for k in range(parts)], dim=2)
        whole = branch(x)
    assert got.shape == ref.shape == whole.shape
    assert torch.allclose(got, ref, atol=1e-5)
    assert not torch.allclose(got, whole, atol=1e-3)  # the partition cuts the connectivity


# ---------------------------------------------------------------------------- RSA (§III-D)


def _image(h=96, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr)


def test_rsa_keeps_size_and_is_identity_at_zero_probability():
    img = _image()
    random.seed(0)
    rsa = RandomShift(prob=1.0, crop_prob=1.0, rc_min=0.7, rh_min=0.5, rw_min=0.5)
    greys = 0
    for _ in range(30):
        out = rsa(img)
        assert out.size == img.size and out.mode == img.mode
        greys += (torch.tensor(list(out.getdata())) == 127).all(1).any().item()
    assert greys > 0  # the 127-grey canvas shows around the shifted patch
    rcrs = CropResizeShift(prob=1.0)
    assert all(rcrs(img).size == img.size for _ in range(10))
    off = RandomShift(prob=0.0, crop_prob=0.0)
    for _ in range(10):
        assert list(off(img).getdata()) == list(img.getdata())


def test_rsa_inside_fastreid_pipeline_for_baseline(tmp_path):
    from fastreid.data.transforms import ToTensor

    from reidzoo.data.transforms import build_transforms_with_registry
    from reidzoo.engine import ReidTrainer

    opts = TINY_SYNTH + ["DATASETS.ROOT", str(tmp_path / "data"), "OUTPUT_DIR", str(tmp_path)]
    opts += ["INPUT.TRANSFORMS", '["RMGLRandomShift"]', "INPUT.RSA.PROB", "1.0"]
    cfg = setup_cfg(os.path.join(REPO, "configs", "Demo", "bagtricks_R18_synthetic.yml"), opts)
    assert cfg.MODEL.META_ARCHITECTURE == "Baseline"
    ops = build_transforms_with_registry(cfg, is_train=True).transforms
    i = next(j for j, t in enumerate(ops) if isinstance(t, RandomShift))
    assert isinstance(ops[i + 1], ToTensor)  # a PIL transform, just before ToTensor
    test_ops = build_transforms_with_registry(cfg, is_train=False).transforms
    assert not any(isinstance(t, RandomShift) for t in test_ops)  # training only
    batch = next(iter(ReidTrainer.build_train_loader(cfg)))
    assert batch["images"].shape[1:] == (3, 64, 32)


# ----------------------------------------------------------------------- model and numbers


@pytest.fixture(scope="module")
def market_model():
    cfg = cpu_cfg(MARKET)
    # backbone + reductions, no classifiers (docs/decisions/rmgl.md#numbers)
    cfg.MODEL.HEADS.NUM_CLASSES = 0
    torch.manual_seed(0)
    return build_model(cfg).eval()


def test_receptive_field_is_363(market_model):
    assert isinstance(market_model, RMGL)
    for b in range(len(market_model.granularities)):
        assert receptive_field(market_model.path_modules(b)) == (363, 16)
    cfg = cpu_cfg(MARKET, "MODEL.RMGL.BRANCH_LAST_STRIDE", "2")
    assert receptive_field(build_model(cfg).path_modules(0)) == (427, 32)


def test_complexity_matches_spec_row3(market_model):
    res = complexity.count_complexity(market_model, (384, 128))
    assert abs(res["params"] - 54.14e6) <= 0.02 * 54.14e6, res["params"]
    assert abs(res["macs"] - 22.0e9) <= 0.05 * 22.0e9, res["macs"]
    heads = sum(p.numel() for p in market_model.heads.parameters())
    assert heads == 14 * (2048 * 256 + 2 * 256)  # 14 separate 1x1 conv + BN reductions
    mgn = build_model(cpu_cfg(MARKET, "MODEL.RMGL.SPLIT_AFTER", "layer3_0", num_classes=0))
    backbone = sum(p.numel() for n, p in mgn.named_parameters() if not n.startswith("heads."))
    assert abs(backbone - 44.06e6) <= 0.01e6 * 2  # docs/decisions/rmgl.md#numbers: MGN split


def test_eval_feature_and_height_check():
    cfg = cpu_cfg(CI, "MODEL.HEADS.NUM_CLASSES", "5")
    model = build_model(cfg).eval()
    assert len(model.feature_names()) == 14
    images = torch.rand(2, 3, 96, 32) * 255
    keep = images.clone()
    with torch.no_grad():
        out = model(images)
    assert out.shape == (2, 14 * 64) and torch.equal(images, keep)  # not normalised in place
    with pytest.raises(ValueError, match="not divisible by 3 stripes"):
        model(torch.rand(1, 3, 64, 32) * 255)


@pytest.mark.parametrize(
    "opts,count",
    [
        (["MODEL.RMGL.PATHS", "original", "MODEL.RMGL.ABP_TEST", "False"], 7),
        (["MODEL.RMGL.PATHS", "rp"], 7),
        (["MODEL.RMGL.GRANULARITIES", "[2, 3, 4]", "INPUT.SIZE_TEST", "[192, 16]"], 24),
        (["MODEL.RMGL.GRANULARITIES", "[1, 2, 3]"], 15),
        (["MODEL.RMGL.SPLIT_AFTER", "layer3_0", "MODEL.RMGL.ABP_POOL", "avg"], 14),
        (["MODEL.RMGL.RP_POSITION", "layer3", "MODEL.RMGL.REDUCTION_RELU", "True"], 14),
    ],
)
def test_switches(opts, count):
    cfg = cpu_cfg(CI, "MODEL.HEADS.NUM_CLASSES", "5", "INPUT.SIZE_TEST", "[96, 16]", *opts)
    model = build_model(cfg).eval()
    h, w = cfg.INPUT.SIZE_TEST
    with torch.no_grad():
        out = model(torch.rand(2, 3, h, w) * 255)
    assert out.shape == (2, count * 64)


def test_rp_position_input_equals_per_stripe_network():
    cfg = cpu_cfg(CI, "MODEL.HEADS.NUM_CLASSES", "5", "MODEL.RMGL.PATHS", "rp",
                  "MODEL.RMGL.RP_POSITION", "input", "MODEL.RMGL.GRANULARITIES", "[2]")  # fmt: skip
    model = build_model(cfg).eval()
    x = torch.randn(2, 3, 96, 32)
    with torch.no_grad():
        feats = model.pooled_features(x)
        maps = [model._run(0, x[:, :, 48 * k : 48 * (k + 1)], 0, 5) for k in range(2)]
    for k in range(2):
        assert torch.allclose(feats[1 + k], maps[k].amax(dim=(2, 3)), atol=1e-5)


def test_rp_position_stem_equals_per_stripe_network():
    """Fig. 9 "res2": the map fed into res_conv2 (stem output) is cut; each stripe then runs
    layer1 and the branch on its own."""
    cfg = cpu_cfg(CI, "MODEL.HEADS.NUM_CLASSES", "5", "MODEL.RMGL.PATHS", "rp",
                  "MODEL.RMGL.RP_POSITION", "stem", "MODEL.RMGL.GRANULARITIES", "[2]")  # fmt: skip
    model = build_model(cfg).eval()
    assert model.rp_index == 1  # after the stem segment
    x = torch.randn(2, 3, 96, 32)
    with torch.no_grad():
        feats = model.pooled_features(x)
        stem = model.trunk[0](x)  # [2, 64, 24, 8]
        maps = [model._run(0, stem[:, :, 12 * k : 12 * (k + 1)], 1, 5) for k in range(2)]
        whole = model._run(0, stem, 1, 5)
    for k in range(2):
        assert torch.allclose(feats[1 + k], maps[k].amax(dim=(2, 3)), atol=1e-5)
    assert not torch.allclose(feats[1], whole[:, :, :3].amax(dim=(2, 3)), atol=1e-3)


# ------------------------------------------------------------------ ablation configs (§IV-D)

ABLATIONS = os.path.join(CONFIGS, "ablations")
ABLATION_FILES = sorted(f for f in os.listdir(ABLATIONS) if f.endswith(".yml"))
# Fig. 9 axis "res_x" = the map fed into res_conv_x (caption) -> RP_POSITION
FIG9_POSITIONS = {"input": "input", "res2": "stem", "res3": "layer1", "res4": "layer2",
                  "res5": "layer3", "output": "layer4"}  # fmt: skip
TINY_RMGL = ["MODEL.BACKBONE.DEPTH", "18x", "MODEL.BACKBONE.FEAT_DIM", "512",
             "MODEL.RMGL.REDUCTION_DIM", "16", "MODEL.HEADS.NUM_CLASSES", "5"]  # fmt: skip


def _flat(node, prefix=""):
    out = {}
    for k, v in node.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
    return out


def _ablation(name):
    return _flat(cpu_cfg(os.path.join(ABLATIONS, name)))


def test_every_ablation_config_loads_and_builds_its_model():
    from reidzoo.registry import TRANSFORM_REGISTRY

    assert any(f.startswith("fig8_") for f in ABLATION_FILES)
    assert any(f.startswith("fig9_") for f in ABLATION_FILES)
    built = {}  # configs that differ only outside MODEL (e.g. Tab. VI's augmentations) share one
    for name in ABLATION_FILES:
        cfg = cpu_cfg(os.path.join(ABLATIONS, name), *TINY_RMGL)
        assert cfg.MODEL.META_ARCHITECTURE == "RMGL", name
        for t in cfg.INPUT.TRANSFORMS:
            TRANSFORM_REGISTRY.get(t)  # KeyError naming the transform if it is not registered
        key = tuple(sorted(_flat(cfg.MODEL).items()))
        model = built[key] = built[key] if key in built else build_model(cfg)
        r = cfg.MODEL.RMGL
        assert isinstance(model, RMGL), name
        assert model.granularities == list(r.GRANULARITIES) and model.paths == r.PATHS, name
        assert (["input", *model.segment_names])[model.rp_index] == r.RP_POSITION, name
        per_path = {"dual": 2, "rp": 1, "original": 1}[r.PATHS]
        count = sum(1 if k == 1 else per_path * (1 + k) for k in r.GRANULARITIES)
        assert len(model.heads.reductions) == count, name
    # one forward: the new partition position (stem) with the finest Fig. 9 K
    cfg = cpu_cfg(os.path.join(ABLATIONS, "fig9_k6_res2.yml"), *TINY_RMGL)
    model = build_model(cfg).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 96, 32) * 255)  # 96 = 16 x 6: six aligned stripes
    assert out.shape == (2, 2 * (1 + 6) * 16)


def _assert_only_swept_keys_differ(configs, swept):
    names = sorted(configs)
    ref = configs[names[0]]
    for name in names[1:]:
        diff = {k for k in ref.keys() | configs[name].keys()
                if ref.get(k) != configs[name].get(k)}  # fmt: skip
        assert diff <= set(swept) | {"OUTPUT_DIR"}, (name, sorted(diff - set(swept)))
    outs = [configs[n]["OUTPUT_DIR"] for n in names]
    assert len(set(outs)) == len(outs)  # every run writes its own folder


def test_fig8_fig9_sweeps_vary_what_their_names_say():
    import re

    fig8 = {f: _ablation(f) for f in ABLATION_FILES if f.startswith("fig8_")}
    seen = []
    for name, c in fig8.items():
        k = int(re.fullmatch(r"fig8_s(\d+)\.yml", name).group(1))
        assert c["MODEL.RMGL.GRANULARITIES"] == (k,), name
        seen.append(k)
        # "single-branch dual-path networks with RP and RSA"
        assert c["MODEL.RMGL.PATHS"] == "dual" and "RMGLRandomShift" in c["INPUT.TRANSFORMS"]
        assert c["MODEL.RMGL.RP_POSITION"] == "layer1"
    assert len(seen) >= 4 and all(384 % (16 * k) == 0 for k in seen)  # stripes tile 384 rows
    _assert_only_swept_keys_differ(fig8, ["MODEL.RMGL.GRANULARITIES"])

    fig9 = {f: _ablation(f) for f in ABLATION_FILES if f.startswith("fig9_")}
    grid = set()
    for name, c in fig9.items():
        m = re.fullmatch(r"fig9_k(\d+)_(\w+)\.yml", name)
        k, pos = int(m.group(1)), m.group(2)
        assert c["MODEL.RMGL.GRANULARITIES"] == (k,), name
        assert c["MODEL.RMGL.RP_POSITION"] == FIG9_POSITIONS[pos], name
        grid.add((k, pos))
    # "K = 2, 3, 6" x every split position of the figure's axis
    assert grid == {(k, p) for k in (2, 3, 6) for p in FIG9_POSITIONS}
    _assert_only_swept_keys_differ(fig9, ["MODEL.RMGL.GRANULARITIES", "MODEL.RMGL.RP_POSITION"])


def test_tab5_names_match_their_switches():
    import re

    for name in (f for f in ABLATION_FILES if f.startswith("tab5_")):
        m = re.fullmatch(r"tab5_s(23|2|3)_(\w+)\.yml", name)
        c, tokens = _ablation(name), set(m.group(2).split("_"))
        assert c["MODEL.RMGL.GRANULARITIES"] == tuple(int(d) for d in m.group(1)), name
        paths = "rp" if "rponly" in tokens else ("dual" if "rp" in tokens else "original")
        assert c["MODEL.RMGL.PATHS"] == paths, name
        if "rponly" not in tokens:  # without the original path ABP has nothing to act on
            abp = "abp" in tokens
            assert c["MODEL.RMGL.ABP_TRAIN"] == c["MODEL.RMGL.ABP_TEST"] == abp, name
        assert ("RMGLRandomShift" in c["INPUT.TRANSFORMS"]) == ("rsa" in tokens), name


@pytest.mark.slow
def test_export_parity_paper_config(tmp_path, capsys):
    from reidzoo import export

    out = str(tmp_path / "rmgl.onnx")
    opts = ["MODEL.BACKBONE.PRETRAIN", "False", "MODEL.DEVICE", "cpu",
            "MODEL.HEADS.NUM_CLASSES", "751"]  # fmt: skip
    args = ["--config-file", MARKET, "--output", out, "--batch", "4", *opts]
    assert export.main(args) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("parity ") and float(last.rsplit("rel=", 1)[1]) <= 1e-4


# --------------------------------------------------------------------------------- training


@pytest.mark.slow
def test_trains_on_demo_data_and_eval_only(tmp_path):
    """Four steps on one batch lower the loss; 40 real iterations (train_net's main, hooks and
    all) retrieve the training identities across cameras, and ``--eval-only`` on the saved
    ``model_final.pth`` gives exactly the training-time ``results.json``."""
    from reidzoo.engine import ReidTrainer

    opts = TINY_SYNTH + ["INPUT.SIZE_TRAIN", "[96, 32]", "INPUT.SIZE_TEST", "[96, 32]",
                         "DATASETS.ROOT", str(tmp_path / "data"), "OUTPUT_DIR", str(tmp_path),
                         "SOLVER.WARMUP_ITERS", "0"]  # fmt: skip
    cfg = setup_cfg(CI, opts + ["SOLVER.MAX_EPOCH", "1"])
    assert write_training_ids_testset(cfg) == (16, 16)
    torch.manual_seed(0)
    trainer = ReidTrainer(cfg)
    model = trainer.model
    # 10x learning rate exactly for the parameters under `heads`
    head_ids = {id(p) for p in model.heads.parameters()}
    base = cfg.SOLVER.BASE_LR
    for group in trainer.optimizer.param_groups:
        is_head = all(id(p) in head_ids for p in group["params"])
        assert any(id(p) in head_ids for p in group["params"]) == is_head
        assert group["initial_lr"] == pytest.approx(base * (10.0 if is_head else 1.0))
    untrained = evaluate_on_training_ids(trainer.cfg, model)
    batch = fix_batch(trainer)
    names = set(model(batch))
    ce = {n for n in names if n.startswith("loss_cls_")}
    assert len(ce) == 14 and names - ce == {"loss_triplet_local2", "loss_triplet_local3"}
    losses, terms = run_steps(trainer, 4, names)
    assert all(math.isfinite(v) for t in terms for v in t.values())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses

    # the CI recipe, batches of all 8 identities (P = 8 x K = 2): with 4 the batch-hard
    # triplets see too few negatives to learn in a few dozen iterations
    real = opts + ["SOLVER.IMS_PER_BATCH", "16"]
    trained, evaluated = train_then_eval_only(CI, real, tmp_path / "real", 40)
    assert evaluated == trained
    # measured (REIDZOO.SEED 0): untrained 9.7 (it ranks by camera; a random ranking scores
    # 22.1), after 35 / 40 / 45 iterations 41.1 / 72.4 / 28.4
    assert untrained["mAP"] < 15 and trained["mAP"] > 25, (untrained, trained)
