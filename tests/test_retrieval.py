"""Sharded gallery features, faiss indexes (exact and approximate), atomic save/load, recall@k."""

import json
import os

import faiss
import numpy as np
import pytest
import torch
from fastreid.utils.compute_dist import build_dist

from reidzoo.checkpoint import TEMP_PREFIX
from reidzoo.evaluation import (
    FeatureShardReader,
    FeatureShardWriter,
    GalleryIndex,
    extract_to_shards,
    recall_at_k,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _clustered(n, dim=32, centres=50, noise=0.3, seed=0):
    """[n, dim] float32 features around ``centres`` identity centres (re-ID-like)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, dim)).astype(np.float32)
    x = c[rng.integers(0, centres, n)] + noise * rng.standard_normal((n, dim)).astype(np.float32)
    return x.astype(np.float32)


def _write(tmp_path, x, shard_size=64, chunks=(3, 10, 1, 100)):
    """Append ``x`` in uneven chunks, as an extraction loop would."""
    folder = str(tmp_path / "shards")
    names = [f"img_{i}.jpg" for i in range(len(x))]
    with FeatureShardWriter(folder, shard_size=shard_size) as w:
        a, k = 0, 0
        while a < len(x):
            b = min(len(x), a + chunks[k % len(chunks)])
            w.append(torch.from_numpy(x[a:b]), names[a:b])
            a, k = b, k + 1
        assert w._buf.shape == (shard_size, x.shape[1])  # memory: one shard
    return folder, names


def test_shards_roundtrip(tmp_path):
    x = _clustered(300)
    folder, names = _write(tmp_path, x, shard_size=64)
    r = FeatureShardReader(folder)
    assert (len(r), r.dim, r.num_shards) == (300, 32, 5)
    counts = [len(f) for f, _ in r]
    assert counts == [64, 64, 64, 64, 44]
    assert np.array_equal(np.concatenate([np.asarray(f) for f, _ in r]), x)
    assert r.names() == names
    starts = [s for s, _ in r.iter_batches(50)]
    assert starts == [0, 50, 64, 114, 128, 178, 192, 242, 256]
    assert np.array_equal(np.concatenate([b for _, b in r.iter_batches(50)]), x)
    pick = r.sample(40, seed=1)
    assert pick.shape == (40, 32)
    assert all(any(np.array_equal(p, row) for row in x) for p in pick[:5])


def test_shard_writer_refuses_and_reader_detects_unfinished(tmp_path):
    folder = str(tmp_path / "s")
    w = FeatureShardWriter(folder, shard_size=4)
    w.append(np.ones((6, 3), np.float32))  # one shard flushed, no manifest yet
    with pytest.raises(FileNotFoundError, match="unfinished"):
        FeatureShardReader(folder)
    with pytest.raises(ValueError, match="dimension 2"):
        w.append(np.ones((1, 2), np.float32))
    with pytest.raises(ValueError, match="names"):
        w.append(np.ones((2, 3), np.float32), ["a"])
    w.close()
    assert len(FeatureShardReader(folder)) == 6
    with pytest.raises(FileExistsError):
        FeatureShardWriter(folder)
    FeatureShardWriter(folder, overwrite=True).close()
    assert len(FeatureShardReader(folder)) == 0
    assert sorted(os.listdir(folder)) == ["manifest.json"]


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_flat_index_is_exact(tmp_path, metric):
    """Flat search = brute force with fast-reid's distances."""
    x = _clustered(400, seed=1)
    q = _clustered(20, seed=2)
    folder, names = _write(tmp_path, x)
    index = GalleryIndex.build(folder, "Flat", metric)
    assert index.ntotal == 400 and index.names == names
    d, i = index.search(torch.from_numpy(q), k=10)
    ref = build_dist(torch.from_numpy(q), torch.from_numpy(x), metric)
    ref_i = np.argsort(ref, axis=1, kind="stable")[:, :10]
    assert recall_at_k(i, ref_i, 10) == 1.0
    np.testing.assert_allclose(d, np.take_along_axis(ref, i, 1), atol=1e-4)
    assert np.all(np.diff(d, axis=1) >= -1e-6)  # sorted, smaller is closer


def test_search_does_not_touch_caller_queries(tmp_path):
    x = _clustered(100)
    index = GalleryIndex.build(x, "Flat", "cosine")
    q = x[:5].copy()
    index.search(q, k=3)
    assert np.array_equal(q, x[:5])


@pytest.mark.parametrize(
    "spec, params, min_recall",
    [
        ("IVF16,Flat", {"nprobe": 16}, 1.0),  # every list probed: exact
        ("IVF16,Flat", {"nprobe": 4}, 0.6),
        ("IVF16,PQ8x4", {"nprobe": 16}, 0.15),  # 4-bit codes; random: 0.005
        ("IVF16,PQ8x4,RFlat", {"nprobe": 16, "k_factor": 32}, 0.95),  # exact re-scoring
        ("HNSW16", {"ef_search": 64}, 0.9),
    ],
)
def test_approximate_indexes_recall(tmp_path, spec, params, min_recall):
    x = _clustered(2000, seed=3)
    q = _clustered(100, seed=4)
    folder, _ = _write(tmp_path, x, shard_size=512)
    exact = GalleryIndex.build(folder, "Flat", "cosine")
    approx = GalleryIndex.build(folder, spec, "cosine", train_size=1000)
    _, ei = exact.search(q, 10)
    _, ai = approx.search(q, 10, **params)
    r = recall_at_k(ai, ei, 10)
    assert min_recall <= r <= 1.0, r


def test_save_load_roundtrip_and_atomic(tmp_path, monkeypatch):
    x = _clustered(500, seed=5)
    folder, names = _write(tmp_path, x)
    index = GalleryIndex.build(folder, "IVF8,PQ4x4", "euclidean", train_size=500)
    path = str(tmp_path / "gallery.index")
    index.save(path)
    loaded = GalleryIndex.load(path)
    assert (loaded.metric, loaded.spec, loaded.ntotal) == ("euclidean", "IVF8,PQ4x4", 500)
    assert loaded.names == names
    d0, i0 = index.search(x[:7], 5, nprobe=8)
    d1, i1 = loaded.search(x[:7], 5, nprobe=8)
    assert np.array_equal(i0, i1) and np.array_equal(d0, d1)

    # a crash while saving leaves the previous file whole and no temporary file behind
    before = open(path, "rb").read()

    def boom(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(faiss, "write_index", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        GalleryIndex.build(x[:50], "Flat", "ip").save(path)
    assert open(path, "rb").read() == before
    assert [f for f in os.listdir(tmp_path) if f.startswith(TEMP_PREFIX)] == []
    with open(tmp_path / "bad.index", "wb") as f:
        f.write(b"not an index")
    with pytest.raises(ValueError, match="not a reidzoo gallery index"):
        GalleryIndex.load(str(tmp_path / "bad.index"))


def test_shards_and_index_get_the_usual_file_mode(tmp_path):
    # The one atomic write gives every file the mode a plain open() would (0666 less the
    # umask), not mkstemp's 0600: shards and indexes are meant to be shared.
    old = os.umask(0o022)
    try:
        folder, _ = _write(tmp_path, _clustered(100, seed=1))
        path = str(tmp_path / "gallery.index")
        GalleryIndex.build(folder, "Flat", "cosine").save(path)
    finally:
        os.umask(old)
    written = [os.path.join(folder, f) for f in os.listdir(folder)] + [path]
    assert any(p.endswith(".npy") for p in written) and any(p.endswith(".json") for p in written)
    modes = {os.path.basename(p): os.stat(p).st_mode & 0o777 for p in written}
    assert set(modes.values()) == {0o644}, modes


def test_recall_at_k():
    exact = np.array([[1, 2, 3], [4, 5, 6]])
    assert recall_at_k(exact, exact, 3) == 1.0
    assert recall_at_k(np.array([[3, 9, 1], [7, 8, -1]]), exact, 3) == pytest.approx(2 / 6)
    assert recall_at_k(np.array([[1, 9, 9], [4, 9, 9]]), exact, 1) == 1.0


def test_extract_to_shards(tmp_path):
    """Features go to disk batch by batch while the model runs."""

    class Model(torch.nn.Module):  # fast-reid's models take the batch dict
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(12, 5)

        def forward(self, batch):
            x = batch["images"] if isinstance(batch, dict) else batch
            return self.fc(x.flatten(1))

    model = Model()
    images = torch.randn(23, 3, 2, 2)
    loader = [
        {"images": images[a : a + 4], "img_paths": [f"p{i}" for i in range(a, min(a + 4, 23))]}
        for a in range(0, 23, 4)
    ]
    reader = extract_to_shards(model, loader, str(tmp_path / "g"), shard_size=10)
    assert (len(reader), reader.num_shards, reader.dim) == (23, 3, 5)
    assert reader.names() == [f"p{i}" for i in range(23)]
    with torch.no_grad():
        expected = model(images).numpy()
    got = np.concatenate([b for _, b in reader.iter_batches()])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    manifest = json.load(open(tmp_path / "g" / "manifest.json"))
    assert [s["count"] for s in manifest["shards"]] == [10, 10, 3]
