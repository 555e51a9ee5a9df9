"""Retrieval visualisation: rank-list PNGs decoded (size from the layout, content, border
colours from the labels), ranking and CMC against fast-reid's protocol, precomputed features,
the sub-command dispatch."""

import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from reidzoo import extract
from reidzoo.modeling.build import build_eval_model
from reidzoo.visualize import common, ranks
from reidzoo.visualize.__main__ import build_parser, main
from tests.helpers import tiny_cfg

TOPK = 5
NUM_QUERIES = 3


def _pid(path):
    return int(os.path.basename(path)[:4])  # Market-1501 names: <pid>_c<cam>s1_...


def _cam(path):
    return int(os.path.basename(path).split("_c")[1][0])


def write_confusable_market(root, num_ids=6, seed=0):
    """A tiny Market-1501 layout whose identities come in pairs of near colours under strong
    noise, so that rankings make mistakes (6 queries, 18 gallery images, cameras 1 and 2)."""
    rng = np.random.default_rng(seed)
    base = os.path.join(root, "Market-1501-v15.09.15")
    for sub in ("bounding_box_train", "query", "bounding_box_test"):
        os.makedirs(os.path.join(base, sub), exist_ok=True)
    pair_colours = rng.integers(40, 215, (num_ids // 2 + 1, 3))
    for pid in range(1, num_ids + 1):
        colour = pair_colours[pid // 2] + rng.integers(-12, 13, 3)
        for cam in (1, 2):
            for k in range(2):
                img = np.clip(colour + rng.normal(0, 45, (64, 32, 3)), 0, 255).astype(np.uint8)
                name = f"{pid:04d}_c{cam}s1_{k:06d}_00.jpg"
                sub = "query" if (cam == 1 and k == 0) else "bounding_box_test"
                Image.fromarray(img).save(os.path.join(base, sub, name))
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One `ranks` run on a tiny Market-1501 (6 queries, 18 gallery images)."""
    tmp = tmp_path_factory.mktemp("ranks")
    root = write_confusable_market(str(tmp / "data"))
    cfg = tiny_cfg(root, str(tmp / "logs"))
    cfg_file = str(tmp / "tiny.yaml")
    with open(cfg_file, "w") as f:
        f.write(cfg.dump())
    torch.manual_seed(0)
    ckpt = str(tmp / "model.pth")
    torch.save({"model": build_eval_model(cfg, load_weights=False).state_dict()}, ckpt)
    out = str(tmp / "vis")
    argv = ["ranks", "--config-file", cfg_file, "--checkpoint", ckpt, "--output", out]
    argv += ["--topk", str(TOPK), "--num-queries", str(NUM_QUERIES), "TEST.IMS_PER_BATCH", "8"]
    assert main(argv) == 0
    folder = os.path.join(out, "Market1501")
    with open(os.path.join(folder, "ranks.json")) as f:
        summary = json.load(f)
    return {"cfg": cfg, "cfg_file": cfg_file, "ckpt": ckpt, "folder": folder, "summary": summary}


def _png(run, query):
    with Image.open(os.path.join(run["folder"], query["png"])) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB"))


def test_grid_size_follows_the_layout_and_queries_differ(run):
    queries = run["summary"]["queries"]
    assert [q["index"] for q in queries] == [0, 2, 5]  # evenly spaced over the 6 queries
    lay = ranks.RankLayout()
    cell_w = lay.cell_size[1] + 2 * lay.border
    cell_h = lay.cell_size[0] + 2 * lay.border + lay.caption_height
    width = lay.pad + cell_w + lay.query_gap + TOPK * cell_w + (TOPK - 1) * lay.pad + lay.pad
    height = lay.title_height + lay.pad + cell_h + lay.pad
    images = [_png(run, q) for q in queries]
    for q, img in zip(queries, images):
        assert len(q["topk"]) == TOPK
        assert img.shape == (height, width, 3)
        assert lay.figure_size(TOPK) == (width, height)
    # the query cells show different images, and the figures differ
    x0, y0 = lay.pad + lay.border, lay.title_height + lay.pad + lay.border
    h, w = lay.cell_size
    crops = [img[y0 : y0 + h, x0 : x0 + w].astype(int) for img in images]
    assert np.abs(crops[0] - crops[1]).mean() > 5
    assert not np.array_equal(images[0], images[1])
    assert not [n for n in os.listdir(run["folder"]) if n.startswith(".tmp-")]


def test_border_colours_follow_the_labels(run):
    lay = ranks.RankLayout()
    cell_w = lay.cell_size[1] + 2 * lay.border
    y = lay.title_height + lay.pad + lay.border + lay.cell_size[0] // 2  # middle of the frame
    seen = set()
    for q in run["summary"]["queries"]:
        img = _png(run, q)
        assert tuple(img[y, lay.pad + lay.border // 2]) == common.QUERY
        for j, item in enumerate(q["topk"]):
            correct = _pid(item["name"]) == _pid(q["name"])
            assert item["correct"] == correct
            left = lay.pad + cell_w + lay.query_gap + j * (cell_w + lay.pad)
            for x in (left + lay.border // 2, left + cell_w - 1 - lay.border // 2):
                assert tuple(img[y, x]) == (common.CORRECT if correct else common.WRONG)
            seen.add(correct)
    assert seen == {True, False}  # both colours were checked


def test_ranking_and_cmc_follow_the_reid_protocol(run):
    """Top-k lists equal an independent ranking that drops same-identity same-camera gallery
    images, and the CMC / mAP are fast-reid's eval_market1501 on the evaluator's distances."""
    from fastreid.evaluation.rank import eval_market1501
    from fastreid.utils.compute_dist import build_dist

    from reidzoo.engine import build_dataset
    from reidzoo.inference import FeatureExtractor

    cfg = run["cfg"]
    data = build_dataset(cfg, "Market1501")
    items = data.query + data.gallery
    nq = len(data.query)
    fe = FeatureExtractor(cfg, run["ckpt"], normalize=False)
    feats = torch.from_numpy(fe([it[0] for it in items]))
    dist = build_dist(feats[:nq], feats[nq:], cfg.TEST.METRIC)
    pids = np.array([it[1] for it in items])
    cams = np.array([it[2] for it in items])
    summary = run["summary"]
    for q in summary["queries"]:
        i = q["index"]
        assert items[i][0] == q["name"]
        keep = [g for g in range(len(data.gallery)) if not (
            pids[nq + g] == pids[i] and cams[nq + g] == cams[i])]  # fmt: skip
        keep.sort(key=lambda g: dist[i, g])
        want = [items[nq + g][0] for g in keep[:TOPK]]
        got = [t["name"] for t in q["topk"]]
        assert got == want
        dists = [t["distance"] for t in q["topk"]]
        np.testing.assert_allclose(dists, dist[i, keep[:TOPK]], rtol=0, atol=1e-6)
        assert all(not (_pid(t) == _pid(q["name"]) and _cam(t) == _cam(q["name"])) for t in got)
    cmc, all_ap, _ = eval_market1501(
        dist, pids[:nq], pids[nq:], cams[:nq], cams[nq:], max_rank=len(data.gallery)
    )
    # fast-reid cuts its numpy curve at the gallery size less the removed images
    np.testing.assert_allclose(summary["cmc"][: len(cmc)], cmc, atol=1e-6)
    assert 0 < cmc[0] < 1 and 0 < np.mean(all_ap) < 1  # a ranking with mistakes
    assert summary["mAP"] == pytest.approx(float(np.mean(all_ap)), abs=1e-6)
    assert (summary["num_query"], summary["num_gallery"]) == (nq, len(data.gallery))


def test_cmc_png(run):
    with Image.open(os.path.join(run["folder"], "cmc.png")) as img:
        assert img.format == "PNG"
        expected = tuple(round(s * ranks.CMC_DPI) for s in ranks.CMC_FIGSIZE)
        assert img.size == expected
        pixels = np.asarray(img.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10  # a drawn figure, not blank


def test_precomputed_features_give_the_same_ranks(run, tmp_path):
    market = os.path.join(run["cfg"].DATASETS.ROOT, "Market-1501-v15.09.15")
    npz = str(tmp_path / "feats.npz")
    argv = ["--config-file", run["cfg_file"], "--checkpoint", run["ckpt"], "--no-normalize"]
    argv += ["--input", os.path.join(market, "query"), "--input"]
    argv += [os.path.join(market, "bounding_box_test"), "--output", npz]
    assert extract.main(argv) == 0
    out = str(tmp_path / "vis")
    argv = ["ranks", "--config-file", run["cfg_file"], "--features", npz, "--output", out]
    assert main(argv + ["--topk", str(TOPK), "--num-queries", str(NUM_QUERIES)]) == 0
    with open(os.path.join(out, "Market1501", "ranks.json")) as f:
        again = json.load(f)
    first = run["summary"]
    np.testing.assert_allclose(again["cmc"], first["cmc"], atol=1e-6)
    for a, b in zip(again["queries"], first["queries"]):
        assert [t["name"] for t in a["topk"]] == [t["name"] for t in b["topk"]]
        np.testing.assert_allclose(
            [t["distance"] for t in a["topk"]], [t["distance"] for t in b["topk"]], atol=1e-5
        )


def test_errors_are_reported(run, tmp_path, capsys):
    npz = str(tmp_path / "few.npz")
    extract.save_features(npz, np.ones((1, 4)), ["elsewhere.jpg"])
    argv = ["ranks", "--config-file", run["cfg_file"], "--output", str(tmp_path / "v")]
    assert main(argv + ["--features", npz]) == 1
    assert "has no row for" in capsys.readouterr().err
    assert main(["ranks", "--config-file", "no-such-model", "--output", str(tmp_path)]) == 1
    assert "registered names" in capsys.readouterr().err


def test_maps_dispatch_is_guarded(monkeypatch, capsys):
    """`ranks` works without reidzoo.visualize.maps; `maps` then says why it is unavailable."""
    import reidzoo.visualize

    monkeypatch.setitem(sys.modules, "reidzoo.visualize.maps", None)  # import fails
    monkeypatch.delattr(reidzoo.visualize, "maps", raising=False)
    parser = build_parser()
    args = parser.parse_args(["ranks", "--config-file", "c.yml", "--output", "o"])
    assert args.func is ranks.main_from_args
    assert main(["maps", "--anything"]) == 1
    assert "maps sub-command is unavailable" in capsys.readouterr().err
