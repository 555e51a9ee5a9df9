"""Retrieval over large galleries: features on disk in shards, faiss indexes, recall@k.

* :class:`FeatureShardWriter` writes ``[N, D]`` features (and a name per row) while they are
  extracted, ``shard_size`` rows per ``.npy`` file, so memory stays at one shard;
  :class:`FeatureShardReader` iterates the shards (memory-mapped).
* :class:`GalleryIndex` builds a faiss index from shards: exact ``"Flat"`` or an approximate one
  from a faiss factory string (``"IVF1024,Flat"``, ``"IVF1024,PQ32"``, ``"HNSW32"``), trains it
  on a sample, adds the shards batch by batch, searches top-k, and saves / loads atomically (one
  file: a JSON header, then faiss's own serialisation, streamed).
* :func:`recall_at_k` compares an approximate index's top-k with the exact one's.

Metrics: ``"cosine"`` (vectors L2-normalised, inner product; distances returned as ``1 - cos``,
fast-reid's cosine distance), ``"euclidean"`` (squared L2, fast-reid's Euclidean distance) and
``"ip"`` (raw inner product, returned as ``-ip`` so that smaller is closer everywhere).
"""

import json
import logging
import os
import struct

import faiss
import numpy as np
import torch

from reidzoo.checkpoint import atomic_write

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
INDEX_MAGIC = b"REIDZOO-FAISS\x00"
METRICS = ("cosine", "euclidean", "ip")


def _as_numpy(features):
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {features.shape}")
    return features


class FeatureShardWriter:
    """Append features while extracting; one ``.npy`` shard every ``shard_size`` rows.

    Files in ``directory``: ``shard_00000.npy`` ([n, D] features), ``shard_00000.json`` (its
    ``n`` names) and, written last by :meth:`close`, ``manifest.json``. Every file is written
    atomically; without a manifest the folder is an unfinished write and readers refuse it.

    Args:
        directory (str): output folder (created).
        shard_size (int): rows per shard; memory holds at most one shard.
        dtype (str): stored dtype (``"float32"`` or ``"float16"``).
        overwrite (bool): replace an existing shard set in ``directory``.
    """

    def __init__(self, directory, shard_size=100_000, dtype="float32", overwrite=False):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.directory = directory
        self.shard_size = int(shard_size)
        self.dtype = np.dtype(dtype)
        os.makedirs(directory, exist_ok=True)
        manifest = os.path.join(directory, MANIFEST)
        if os.path.exists(manifest):
            if not overwrite:
                raise FileExistsError(
                    f"'{directory}' already holds a shard set ({MANIFEST}); pass overwrite=True"
                )
            os.remove(manifest)
        for name in os.listdir(directory):
            if name.startswith("shard_") and name.endswith((".npy", ".json")):
                os.remove(os.path.join(directory, name))
        self.dim = None
        self.num_items = 0
        self.shards = []
        self._buf = None
        self._names = []
        self._fill = 0
        self._closed = False

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()

    def append(self, features, names=None):
        """Add rows.

        Args:
            features (Tensor | np.ndarray): [N, D].
            names (Sequence[str] | None): N names (e.g. image paths); None numbers the rows.
        """
        if self._closed:
            raise RuntimeError("append() after close()")
        x = _as_numpy(features)
        n = x.shape[0]
        if names is None:
            names = [str(i) for i in range(self.num_items, self.num_items + n)]
        names = [str(s) for s in names]
        if len(names) != n:
            raise ValueError(f"{n} feature rows but {len(names)} names")
        if self.dim is None:
            self.dim = int(x.shape[1])
            self._buf = np.empty((self.shard_size, self.dim), dtype=self.dtype)
        elif x.shape[1] != self.dim:
            raise ValueError(f"feature dimension {x.shape[1]} != {self.dim} of earlier rows")
        done = 0
        while done < n:
            take = min(n - done, self.shard_size - self._fill)
            self._buf[self._fill : self._fill + take] = x[done : done + take]
            self._names.extend(names[done : done + take])
            self._fill += take
            done += take
            if self._fill == self.shard_size:
                self._flush()
        self.num_items += n

    def _flush(self):
        if self._fill == 0:
            return
        stem = f"shard_{len(self.shards):05d}"
        rows = self._buf[: self._fill]
        atomic_write(os.path.join(self.directory, stem + ".npy"), lambda f: np.save(f, rows))
        names = json.dumps(self._names).encode()
        atomic_write(os.path.join(self.directory, stem + ".json"), lambda f: f.write(names))
        self.shards.append(
            {"features": stem + ".npy", "names": stem + ".json", "count": self._fill}
        )
        self._fill = 0
        self._names = []

    def close(self):
        """Write the last shard and the manifest.

        Returns:
            str: the manifest path.
        """
        path = os.path.join(self.directory, MANIFEST)
        if self._closed:
            return path
        self._flush()
        manifest = {
            "version": FORMAT_VERSION,
            "dim": self.dim,
            "dtype": self.dtype.name,
            "num_items": self.num_items,
            "shard_size": self.shard_size,
            "shards": self.shards,
        }
        data = json.dumps(manifest, indent=1).encode()
        atomic_write(path, lambda f: f.write(data))
        self._buf = None
        self._closed = True
        return path


class FeatureShardReader:
    """Read a shard set written by :class:`FeatureShardWriter`, one shard at a time.

    Args:
        directory (str): the folder holding ``manifest.json``.
    """

    def __init__(self, directory):
        path = os.path.join(directory, MANIFEST)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"no {MANIFEST} in '{directory}': not a shard set, or its writer was never "
                "closed (an unfinished write)"
            )
        with open(path) as f:
            self.manifest = json.load(f)
        if self.manifest.get("version") != FORMAT_VERSION:
            raise ValueError(f"'{path}': unsupported shard format {self.manifest.get('version')}")
        self.directory = directory
        self.dim = self.manifest["dim"]
        self.num_items = self.manifest["num_items"]
        self.shards = self.manifest["shards"]
        for s in self.shards:
            if not os.path.isfile(os.path.join(directory, s["features"])):
                raise FileNotFoundError(f"shard '{s['features']}' of '{directory}' is missing")

    def __len__(self):
        return self.num_items

    @property
    def num_shards(self):
        """int: number of shard files."""
        return len(self.shards)

    def shard(self, i):
        """One shard.

        Args:
            i (int): shard number.
        Returns:
            tuple[np.ndarray, list[str]]: memory-mapped features [n, D] and n names.
        """
        s = self.shards[i]
        feats = np.load(os.path.join(self.directory, s["features"]), mmap_mode="r")
        with open(os.path.join(self.directory, s["names"])) as f:
            names = json.load(f)
        if feats.shape != (s["count"], self.dim) or len(names) != s["count"]:
            raise ValueError(f"shard {i} of '{self.directory}' does not match its manifest")
        return feats, names

    def __iter__(self):
        """Yields:
        tuple[np.ndarray, list[str]]: features [n, D] (memory-mapped) and names, per shard."""
        for i in range(len(self.shards)):
            yield self.shard(i)

    def iter_batches(self, batch_size=65536):
        """Yields:
        tuple[int, np.ndarray]: global index of the first row and float32 rows [b, D],
        ``b <= batch_size``, in order."""
        start = 0
        for feats, _ in self:
            for a in range(0, len(feats), batch_size):
                rows = np.ascontiguousarray(feats[a : a + batch_size], dtype=np.float32)
                yield start + a, rows
            start += len(feats)

    def names(self):
        """Returns:
        list[str]: all names, in row order."""
        out = []
        for s in self.shards:
            with open(os.path.join(self.directory, s["names"])) as f:
                out.extend(json.load(f))
        return out

    def sample(self, n, seed=0):
        """Rows drawn uniformly without replacement (for training an index).

        Args:
            n (int): number of rows (all rows if n >= len(self)).
            seed (int): RNG seed.
        Returns:
            np.ndarray: [min(n, N), D] float32.
        """
        total = self.num_items
        rng = np.random.default_rng(seed)
        pick = np.arange(total) if n >= total else np.sort(rng.choice(total, n, replace=False))
        out = np.empty((len(pick), self.dim), dtype=np.float32)
        start, done = 0, 0
        for feats, _ in self:
            stop = start + len(feats)
            hi = np.searchsorted(pick, stop)
            local = pick[done:hi] - start
            out[done:hi] = feats[local]
            done, start = hi, stop
        return out


def _faiss_metric(metric):
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got '{metric}'")
    return faiss.METRIC_L2 if metric == "euclidean" else faiss.METRIC_INNER_PRODUCT


class GalleryIndex:
    """A faiss index over a gallery, with its metric and (optionally) row names.

    Args:
        index (faiss.Index): a trained, filled index.
        metric (str): ``"cosine"``, ``"euclidean"`` or ``"ip"``.
        spec (str): the faiss factory string it was built from.
        names (list[str] | None): one name per indexed row.
    """

    def __init__(self, index, metric="cosine", spec="Flat", names=None):
        _faiss_metric(metric)
        self.index = index
        self.metric = metric
        self.spec = spec
        self.names = names

    @property
    def ntotal(self):
        """int: indexed rows."""
        return int(self.index.ntotal)

    @property
    def dim(self):
        """int: feature dimension."""
        return int(self.index.d)

    def _prepare(self, x):
        if self.metric != "cosine":
            return np.ascontiguousarray(x, dtype=np.float32)
        x = np.array(x, dtype=np.float32, order="C", copy=True)  # never the caller's array
        faiss.normalize_L2(x)
        return x

    @classmethod
    def build(
        cls,
        source,
        spec="Flat",
        metric="cosine",
        train_size=100_000,
        seed=0,
        batch_size=65536,
        keep_names=True,
        gpu=False,
    ):
        """Build an index from shards (or an in-memory array).

        Args:
            source (FeatureShardReader | str | np.ndarray | Tensor): a shard set, its folder,
                or [N, D] features.
            spec (str): faiss factory string: ``"Flat"`` (exact), ``"IVF{nlist},Flat"``,
                ``"IVF{nlist},PQ{m}"``, ``"HNSW{M}"``, ...
            metric (str): ``"cosine"``, ``"euclidean"`` or ``"ip"``.
            train_size (int): rows sampled to train IVF / PQ.
            seed (int): sampling seed (faiss's k-means seed is fixed as well).
            batch_size (int): rows added per call.
            keep_names (bool): load the shard names into the index.
            gpu (bool): build and search on GPU when faiss has GPUs.
        Returns:
            GalleryIndex
        """
        if isinstance(source, str):
            source = FeatureShardReader(source)
        names = None
        if isinstance(source, FeatureShardReader):
            dim, total = source.dim, source.num_items
            batches = source.iter_batches(batch_size)
            sampler = source.sample
            names = source.names() if keep_names else None
        else:
            arr = _as_numpy(source).astype(np.float32, copy=False)
            dim, total = arr.shape[1], arr.shape[0]
            batches = ((a, arr[a : a + batch_size]) for a in range(0, total, batch_size))

            def sampler(n, seed):
                rng = np.random.default_rng(seed)
                pick = np.arange(total) if n >= total else rng.choice(total, n, replace=False)
                return arr[np.sort(pick)]

        index = faiss.index_factory(int(dim), spec, _faiss_metric(metric))
        _set_seed(index, seed)
        out = cls(index, metric, spec, names)
        if gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            out._res = faiss.StandardGpuResources()
            out.index = faiss.index_cpu_to_gpu(out._res, 0, index)
        if not out.index.is_trained:
            out.index.train(out._prepare(sampler(train_size, seed)))
        for _, rows in batches:
            out.index.add(out._prepare(rows))
        if out.ntotal != total:
            raise RuntimeError(f"indexed {out.ntotal} rows, expected {total}")
        return out

    def set_search_params(self, nprobe=None, ef_search=None, k_factor=None):
        """Search-time accuracy knobs (faiss's ``ParameterSpace``; reach wrapped indexes).

        Args:
            nprobe (int | None): IVF lists visited.
            ef_search (int | None): HNSW candidate list size.
            k_factor (int | None): ``RFlat`` refinement: ``k * k_factor`` candidates re-scored
                with exact distances.
        """
        space = faiss.ParameterSpace()
        for name, value in (("nprobe", nprobe), ("efSearch", ef_search), ("k_factor_rf", k_factor)):
            if value is not None:
                space.set_index_parameter(self.index, name, value)

    def search(self, queries, k=10, batch_size=4096, nprobe=None, ef_search=None, k_factor=None):
        """Top-k gallery rows for each query.

        Args:
            queries (Tensor | np.ndarray): [Q, D].
            k (int): neighbours per query.
            batch_size (int): queries per faiss call.
            nprobe (int | None): see :meth:`set_search_params`.
            ef_search (int | None): see :meth:`set_search_params`.
            k_factor (int | None): see :meth:`set_search_params`.
        Returns:
            tuple[np.ndarray, np.ndarray]: distances [Q, k] float32 (smaller is closer; see the
            module docstring) and gallery row indices [Q, k] int64 (-1 where fewer than k).
        """
        self.set_search_params(nprobe, ef_search, k_factor)
        q = _as_numpy(queries)
        if q.shape[1] != self.dim:
            raise ValueError(f"query dimension {q.shape[1]} != index dimension {self.dim}")
        dists = np.empty((len(q), k), dtype=np.float32)
        ids = np.empty((len(q), k), dtype=np.int64)
        for a in range(0, len(q), batch_size):
            d, i = self.index.search(self._prepare(q[a : a + batch_size]), k)
            dists[a : a + batch_size], ids[a : a + batch_size] = d, i
        if self.metric == "cosine":
            dists = 1 - dists
        elif self.metric == "ip":
            dists = -dists
        return dists, ids

    def save(self, path):
        """Write the index atomically (temporary file, fsync, rename): a crash leaves the
        previous file or the new one, never a mix.

        Args:
            path (str): destination file.
        """
        index = self.index
        if hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(index).__name__:
            index = faiss.index_gpu_to_cpu(index)
        header = json.dumps(
            {
                "version": FORMAT_VERSION,
                "metric": self.metric,
                "spec": self.spec,
                "ntotal": int(index.ntotal),
                "dim": int(index.d),
                "names": self.names,
            }
        ).encode()

        def write(f):
            f.write(INDEX_MAGIC)
            f.write(struct.pack("<Q", len(header)))
            f.write(header)
            writer = faiss.PyCallbackIOWriter(f.write)
            faiss.write_index(index, writer)
            del writer

        atomic_write(path, write)

    @classmethod
    def load(cls, path):
        """Read an index written by :meth:`save`.

        Args:
            path (str)
        Returns:
            GalleryIndex
        """
        with open(path, "rb") as f:
            if f.read(len(INDEX_MAGIC)) != INDEX_MAGIC:
                raise ValueError(f"'{path}' is not a reidzoo gallery index")
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
            reader = faiss.PyCallbackIOReader(f.read)
            index = faiss.read_index(reader)
            del reader
        if index.ntotal != header["ntotal"] or index.d != header["dim"]:
            raise ValueError(f"'{path}': index does not match its header")
        return cls(index, header["metric"], header["spec"], header["names"])


def _set_seed(index, seed):
    """Fix faiss's k-means seed (IVF coarse quantiser, PQ) for reproducible builds."""
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return
    ivf.cp.seed = int(seed)
    sub = faiss.downcast_index(ivf)
    if hasattr(sub, "pq"):
        sub.pq.cp.seed = int(seed)


def recall_at_k(approx_ids, exact_ids, k=10):
    """Mean fraction of the exact top-k found in the approximate top-k.

    Args:
        approx_ids (np.ndarray): [Q, >=k] indices from the approximate index.
        exact_ids (np.ndarray): [Q, >=k] indices from the exact index.
        k (int)
    Returns:
        float: in [0, 1].
    """
    a = np.asarray(approx_ids)[:, :k]
    e = np.asarray(exact_ids)[:, :k]
    if a.shape != e.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {e.shape}")
    hits = 0
    for row_a, row_e in zip(a, e):
        hits += np.intersect1d(row_a[row_a >= 0], row_e[row_e >= 0]).size
    return hits / float(e.size)


@torch.no_grad()
def extract_to_shards(model, data_loader, directory, shard_size=100_000, flip_test=False):
    """Run ``model`` over ``data_loader`` and write the features to shards as they come.

    Args:
        model (nn.Module): returns [N, D] features in eval mode.
        data_loader (Iterable[dict]): fast-reid batches with "images" (and "img_paths").
        directory (str): shard folder (overwritten).
        shard_size (int): rows per shard.
        flip_test (bool): average with horizontally flipped images, as fast-reid.
    Returns:
        FeatureShardReader
    """
    from fastreid.evaluation.evaluator import inference_context

    with inference_context(model), FeatureShardWriter(directory, shard_size, overwrite=True) as w:
        for batch in data_loader:
            out = model(batch)
            if flip_test:
                flipped = dict(batch, images=batch["images"].flip(dims=[3]))
                out = (out + model(flipped)) / 2
            w.append(out.float(), batch.get("img_paths"))
    return FeatureShardReader(directory)
