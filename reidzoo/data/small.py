"""Small real two-camera benchmarks, VIPeR and PRID 450S, under the single-shot protocol.

Both ship as one flat folder of PNG files and no split files:

* ``<root>/viper/PPPPCCCC.png``: 4-digit person id, 4-digit camera (``00010002.png``: person 1,
  camera 2), 632 ids x 2 cameras;
* ``<root>/prid450s/PPPPCCC.png``: 4-digit person id, 3-digit camera, 450 ids x 2 cameras.

Protocol (the usual one for both): split the identities at random into two halves, train on one
half (both cameras), test on the other with camera 1 as query and camera 2 as gallery, repeat for
:data:`NUM_SPLITS` seeded splits and report mean and standard deviation (:func:`summarize_splits`).

Split ``k`` is reproducible: the identities, sorted, are permuted by
``numpy.random.default_rng(k).permutation``; the first ``floor(n / 2)`` go to training and the
rest to test (VIPeR 316 / 316, PRID 450S 225 / 225).
"""

import os
import re

import numpy as np
from fastreid.data.datasets.bases import ImageDataset

from reidzoo.config import add_node, register_config
from reidzoo.registry import DATASET_REGISTRY

__all__ = [
    "NUM_SPLITS",
    "PRID450S",
    "VIPeRSingleShot",
    "add_split_config",
    "split_identities",
    "summarize_splits",
]

#: Number of standard random splits (split indices ``0 .. NUM_SPLITS - 1``).
NUM_SPLITS = 10


@register_config
def add_split_config(cfg):
    """``DATASETS.SPLIT_INDEX``: which random split the two-camera benchmarks use.

    Args:
        cfg (CfgNode): root config, modified in place.
    """
    # Split of every dataset that declares num_splits (VIPeRSingleShot / PRID450S: 0..9, the
    # seed of numpy.random.default_rng that halves the identities into train and test; a
    # plugin's own meaning for its datasets), passed to them as split_index.
    add_node(cfg, "DATASETS", {"SPLIT_INDEX": 0})


def split_identities(pids, split_index):
    """Seeded random half split of identities.

    Args:
        pids (Iterable[int]): all identities (any order; they are sorted first).
        split_index (int): split number >= 0; the seed of ``numpy.random.default_rng``.
    Returns:
        tuple[list[int], list[int]]: sorted train ids (``floor(n / 2)``) and sorted test ids
        (the rest); disjoint.
    """
    pids = np.asarray(sorted(pids))
    perm = np.random.default_rng(_check_split_index(split_index)).permutation(len(pids))
    n_train = len(pids) // 2
    train = sorted(int(p) for p in pids[perm[:n_train]])
    test = sorted(int(p) for p in pids[perm[n_train:]])
    return train, test


def _check_split_index(split_index):
    if isinstance(split_index, bool) or not isinstance(split_index, (int, np.integer)):
        raise TypeError(f"split_index must be an int, got {split_index!r}")
    if split_index < 0:
        raise ValueError(f"split_index must be >= 0, got {split_index}")
    return int(split_index)


class _TwoCameraSingleShot(ImageDataset):
    """Base class: a flat folder of ``<pid><cam>.png`` files, two cameras, one image each.

    Train items use fast-reid's training convention (``"<dataset_name>_<pid>"``,
    ``"<dataset_name>_<cam-1>"``); query items are camera 1 (camid 0), gallery items camera 2
    (camid 1), with ``int`` pids.
    """

    #: Folder name under the dataset root.
    dataset_dir = ""
    #: Prefix of training pids and camids.
    dataset_name = ""
    #: Full-match pattern of a file name; groups: pid, camera.
    file_pattern = None
    #: Human description of the expected files, used in error messages.
    layout = ""
    #: Standard random splits: declaring it makes reidzoo pass ``split_index`` from
    #: ``DATASETS.SPLIT_INDEX`` and ``python -m reidzoo.splits`` run 0..num_splits-1.
    num_splits = NUM_SPLITS

    def __init__(self, root="datasets", split_index=0, **kwargs):
        self.root = root
        self.split_index = _check_split_index(split_index)
        self.dataset_dir = self._find_dir(root)
        images = self._scan(self.dataset_dir)
        self.train_ids, self.test_ids = split_identities(images, self.split_index)
        name = self.dataset_name
        train = [
            (images[pid][cam], f"{name}_{pid}", f"{name}_{cam - 1}")
            for pid in self.train_ids
            for cam in (1, 2)
        ]
        query = [(images[pid][1], pid, 0) for pid in self.test_ids]
        gallery = [(images[pid][2], pid, 1) for pid in self.test_ids]
        super().__init__(train, query, gallery, **kwargs)

    @classmethod
    def _find_dir(cls, root):
        """``<root>/<dataset_dir>``, or ``root`` itself if it directly holds the images
        (absolute, so that item paths and error messages are)."""
        root = os.path.abspath(root)
        candidate = os.path.join(root, cls.dataset_dir)
        if os.path.isdir(candidate):
            folder = candidate
        elif os.path.isdir(root) and any(cls.file_pattern.fullmatch(n) for n in os.listdir(root)):
            folder = root
        else:
            raise FileNotFoundError(
                f"{cls.__name__}: dataset folder not found: expected {cls.layout} in "
                f"'{candidate}' (or directly in '{root}')"
            )
        if not any(cls.file_pattern.fullmatch(n) for n in os.listdir(folder)):
            raise FileNotFoundError(
                f"{cls.__name__}: no images in '{folder}': expected {cls.layout} in '{folder}'"
            )
        return folder

    @classmethod
    def _scan(cls, folder):
        """All images of ``folder``: ``{pid: {cam: path}}`` with cameras 1 and 2.

        Hidden files and sub-folders are skipped; any other file must be named as
        :attr:`layout` says.
        """
        images = {}
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if name.startswith(".") or os.path.isdir(path):
                continue
            m = cls.file_pattern.fullmatch(name)
            if m is None:
                raise ValueError(
                    f"{cls.__name__}: cannot parse file name '{path}': expected {cls.layout}"
                )
            pid, cam = int(m.group(1)), int(m.group(2))
            if cam not in (1, 2):
                raise ValueError(f"{cls.__name__}: camera {cam} in '{path}' is not 1 or 2")
            images.setdefault(pid, {})[cam] = path
        incomplete = sorted(pid for pid, cams in images.items() if len(cams) != 2)
        if incomplete:
            raise ValueError(
                f"{cls.__name__}: {len(incomplete)} identities in '{folder}' lack an image in "
                f"camera 1 or 2 (single-shot needs both), e.g. ids {incomplete[:5]}"
            )
        if len(images) < 2:
            raise ValueError(f"{cls.__name__}: '{folder}' holds fewer than 2 identities")
        return images


@DATASET_REGISTRY.register()
class VIPeRSingleShot(_TwoCameraSingleShot):
    """VIPeR (Gray et al., PETS 2007), 632 ids x 2 cameras, single-shot half split.

    Args:
        root (str): dataset root holding ``viper/`` (or the ``viper`` folder itself).
        split_index (int): random split, 0..9 for the standard ones (seed of the split).
        **kwargs: passed to fast-reid's ``ImageDataset`` (``mode``, ``transform``, ...).
    """

    dataset_dir = "viper"
    dataset_name = "viperss"
    file_pattern = re.compile(r"(\d{4})(\d{4})\.png", re.IGNORECASE)
    layout = "PNG files named PPPPCCCC.png (4-digit person id, 4-digit camera 0001/0002)"


@DATASET_REGISTRY.register()
class PRID450S(_TwoCameraSingleShot):
    """PRID 450S (Roth et al., 2014), 450 ids x 2 cameras, single-shot half split.

    Args:
        root (str): dataset root holding ``prid450s/`` (or the ``prid450s`` folder itself).
        split_index (int): random split, 0..9 for the standard ones (seed of the split).
        **kwargs: passed to fast-reid's ``ImageDataset`` (``mode``, ``transform``, ...).
    """

    dataset_dir = "prid450s"
    dataset_name = "prid450s"
    file_pattern = re.compile(r"(\d{4})(\d{3})\.png", re.IGNORECASE)
    layout = "PNG files named PPPPCCC.png (4-digit person id, 3-digit camera 001/002)"


def _flatten(result, prefix=""):
    out = {}
    for key, value in result.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}/"))
        elif isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
            value, bool
        ):
            out[name] = float(value)
    return out


def summarize_splits(results):
    """Mean and standard deviation of every metric over the splits.

    Args:
        results (list[dict]): one result per split, ``{metric: number}`` as fast-reid's
            evaluator returns (e.g. ``{"Rank-1": 41.2, "mAP": 30.5, ...}``); nested dicts
            (``{dataset: {metric: number}}``) are flattened to ``"dataset/metric"``.
            Non-numeric values are ignored.
    Returns:
        dict[str, dict[str, float]]: ``{metric: {"mean": m, "std": s, "n": n}}``, metrics in
        first-seen order; ``std`` is the sample standard deviation (``ddof=1``), 0.0 for a
        single split.
    Raises:
        ValueError: ``results`` is empty, or a metric is missing from some split.
    """
    if not results:
        raise ValueError("summarize_splits needs at least one result")
    flat = [_flatten(r) for r in results]
    names = list(flat[0])
    for i, r in enumerate(flat):
        if set(r) != set(names):
            diff = sorted(set(r) ^ set(names))
            raise ValueError(f"split {i} does not report the same metrics as split 0: {diff}")
    summary = {}
    for name in names:
        values = np.array([r[name] for r in flat], dtype=np.float64)
        std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        summary[name] = {"mean": float(values.mean()), "std": std, "n": len(values)}
    return summary
