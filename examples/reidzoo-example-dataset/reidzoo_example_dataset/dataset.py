"""``ExampleFolderReID``: a dataset of one's own, following reidzoo's dataset contract.

Layout, under the dataset root (``DATASETS.ROOT``, else ``$FASTREID_DATASETS``, else
``./datasets``)::

    example_folder_reid/
        0001/c1_000.png  c1_001.png  c2_000.png ...   # <pid>/c<camera>_<any>.<png|jpg>
        0002/...

Every identity is in the training set of some splits and the test set of the others: split
``k`` (``DATASETS.SPLIT_INDEX``) tests on the identities whose rank (in sorted order) is ``k``
modulo :attr:`ExampleFolderReID.num_splits` and trains on the rest. Query: the first image of
each test identity in camera ``DATASETS.EXAMPLE_FOLDER.QUERY_CAMERA``; gallery: that
identity's images in the other cameras.
"""

import os
import re

from fastreid.data.datasets.bases import ImageDataset

from reidzoo.config import add_node, register_config
from reidzoo.registry import DATASET_REGISTRY  # fast-reid's registry, clashes named

_IMAGE = re.compile(r"c(\d+)_[^/]*\.(png|jpg|jpeg)", re.IGNORECASE)


@register_config
def add_example_folder_config(cfg):
    """``DATASETS.EXAMPLE_FOLDER``: this dataset's own options.

    Args:
        cfg (CfgNode): root config, modified in place.
    """
    # Camera whose first image of each test identity is the query.
    add_node(cfg, "DATASETS.EXAMPLE_FOLDER", {"QUERY_CAMERA": 1})


# Registry names are global (fast-reid already has PRID, VIPeR, GRID, iLIDS, ...): a name of
# one's own, else the registration is refused with an error naming both.
@DATASET_REGISTRY.register()
class ExampleFolderReID(ImageDataset):
    """A folder per identity, images named by camera.

    Args:
        root (str): the dataset root; the images are under ``<root>/example_folder_reid``.
        split_index (int): which of the :attr:`num_splits` splits (``DATASETS.SPLIT_INDEX``).
        query_camera (int): the query camera (``DATASETS.EXAMPLE_FOLDER.QUERY_CAMERA``).
        **kwargs: fast-reid's ``ImageDataset`` arguments (``mode``, ``combineall``, ...).
    """

    #: Folder under the dataset root.
    dataset_dir = "example_folder_reid"
    #: Prefix of the training ids, so that datasets trained together never share an id.
    dataset_name = "examplefolder"
    #: Declaring it makes reidzoo pass ``split_index`` and ``python -m reidzoo.splits`` run
    #: every split.
    num_splits = 2

    @classmethod
    def from_config(cls, cfg):
        """Constructor keywords from the config (reidzoo calls it; ``split_index`` it adds).

        Args:
            cfg (CfgNode): root config.
        Returns:
            dict: ``{"query_camera": int}``.
        """
        return {"query_camera": int(cfg.DATASETS.EXAMPLE_FOLDER.QUERY_CAMERA)}

    def __init__(self, root="datasets", split_index=0, query_camera=1, **kwargs):
        if not 0 <= int(split_index) < self.num_splits:
            raise ValueError(
                f"ExampleFolderReID: split_index {split_index} (DATASETS.SPLIT_INDEX); "
                f"expected 0..{self.num_splits - 1}"
            )
        self.split_index = int(split_index)
        folder = os.path.join(os.path.abspath(root), self.dataset_dir)
        self.check_before_run([folder])  # RuntimeError '"<folder>" is not found'
        images = self._scan(folder)
        pids = sorted(images)
        test_ids = {p for i, p in enumerate(pids) if i % self.num_splits == self.split_index}
        self.test_ids = sorted(test_ids)

        # Training items: string ids "<dataset_name>_<pid>" / "<dataset_name>_<camera>"; the
        # trainer relabels them 0..n-1. Query and gallery: integer pid and camera, compared
        # as they are by the evaluation (a gallery image of the query's identity and camera
        # does not count).
        name, qcam = self.dataset_name, int(query_camera)
        train, query, gallery = [], [], []
        for pid in pids:
            if pid not in test_ids:
                train += [(path, f"{name}_{pid}", f"{name}_{cam}") for cam, path in images[pid]]
                continue
            query += [(path, pid, cam) for cam, path in images[pid] if cam == qcam][:1]
            gallery += [(path, pid, cam) for cam, path in images[pid] if cam != qcam]
        super().__init__(train, query, gallery, **kwargs)

    @staticmethod
    def _scan(folder):
        """``{pid: [(camera, path), ...]}`` of every image, sorted by path."""
        images = {}
        for entry in sorted(os.listdir(folder)):
            sub = os.path.join(folder, entry)
            if not (entry.isdigit() and os.path.isdir(sub)):
                continue
            for name in sorted(os.listdir(sub)):
                m = _IMAGE.fullmatch(name)
                if m:
                    images.setdefault(int(entry), []).append(
                        (int(m.group(1)), os.path.join(sub, name))
                    )
        if not images:
            raise FileNotFoundError(
                f"ExampleFolderReID: no images in '{folder}': expected <pid>/c<camera>_<n>.png"
            )
        return images
