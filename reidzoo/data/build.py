"""Building registered datasets under the configured root, and checking them before training.

Everything here fails early with an error that names the files and numbers involved, where
fast-reid would fail late (an unreadable image at the first evaluation), obscurely (``'NoneType'
object has no attribute 'groups'`` for a badly named Market-1501 file) or never (its identity
samplers loop forever at 100 % CPU when a batch needs more identities than the data has).
"""

import glob
import logging
import os
import re

from fastreid.data.common import CommDataset
from fastreid.utils import comm

from reidzoo.config import dataset_root
from reidzoo.data.images import check_images, read_image
from reidzoo.plugins import lookup
from reidzoo.registry import DATASET_REGISTRY

logger = logging.getLogger(__name__)


class ReidDataset(CommDataset):
    """fast-reid's ``CommDataset`` reading every image with reidzoo's one reader.

    :func:`reidzoo.data.images.read_image` gives 8-bit RGB by fixed rules (alpha dropped,
    grayscale repeated, 16-bit reduced to its high byte) and an error naming the file, where
    fast-reid's reader gives 4 channels for RGBA (a collate error), fails on 16-bit files and
    raises PIL's error without a usable file name. fast-reid's ``CommDataset`` is left as is.

    Args:
        img_items (list[tuple]): ``(path, pid, camid)`` items.
        transform (callable | None): PIL image -> tensor.
        relabel (bool): map pids and camids to 0..n-1 (training).
    """

    def __getitem__(self, index):
        path, pid, camid = self.img_items[index][:3]
        image = read_image(path)  # ImageReadError (an OSError) names the file
        if self.transform is not None:
            image = self.transform(image)
        if self.relabel:
            pid, camid = self.pid_dict[pid], self.cam_dict[camid]
        return {"images": image, "targets": pid, "camids": camid, "img_paths": path}


__all__ = [
    "KNOWN_LAYOUTS",
    "IdentitySamplerError",
    "ReidDataset",
    "build_dataset",
    "check_dataset_images",
    "check_datasets",
    "check_identity_sampler",
]

#: Expected folder layouts, for the error raised when a dataset root is missing.
KNOWN_LAYOUTS = {
    "Market1501": "<root>/Market-1501-v15.09.15/{bounding_box_train,query,bounding_box_test}",
    "DukeMTMC": "<root>/DukeMTMC-reID/{bounding_box_train,query,bounding_box_test}",
    "MSMT17": "<root>/MSMT17_V2/{mask_train_v2,mask_test_v2,list_*.txt}",
    "CUHK03": "<root>/cuhk03/cuhk03_release/cuhk-03.mat (+ splits)",
}

#: fast-reid's loaders that parse ``<pid>_c<cam>`` out of ``*.jpg`` names: the folders they
#: try (first existing one), the pid range they assert (None: none), the camera range they
#: assert, and a correct name.
_MARKET_LIKE = {
    "Market1501": (("Market-1501-v15.09.15", ""), (0, 1501), (1, 6), "0002_c1s1_000451_03.jpg"),
    "DukeMTMC": (("DukeMTMC-reID",), None, (1, 8), "0001_c2_f0046182.jpg"),
}
_MARKET_SUBSETS = ("bounding_box_train", "query", "bounding_box_test")
_MARKET_PATTERN = re.compile(r"([-\d]+)_c(\d)")  # fast-reid's, searched in the name


def build_dataset(cfg, name):
    """Instantiate a registered dataset under the configured root (made absolute).

    For ``Market1501`` and ``DukeMTMC`` every ``*.jpg`` name is checked first against the
    pattern fast-reid parses, so a badly named file is an error naming it (all of them) and
    the expected pattern instead of fast-reid's ``AttributeError``.

    Args:
        cfg (CfgNode)
        name (str): registry name (``DATASETS.NAMES`` / ``DATASETS.TESTS`` entry).
    Returns:
        fastreid.data.datasets.bases.ImageDataset: its image paths are absolute.
    Raises:
        FileNotFoundError: the root or a required folder is missing (absolute paths and the
            expected layout in the message).
        ValueError: badly named Market-1501 / DukeMTMC files (each named).
    """
    from reidzoo.data.datasets import dataset_kwargs

    # Absolute, so that every path in the items, and so in every later error, is absolute.
    root = os.path.abspath(os.path.expanduser(dataset_root(cfg)))
    cls = lookup(DATASET_REGISTRY, name, "DATASETS.NAMES / DATASETS.TESTS")
    if not os.path.isdir(root) and name in KNOWN_LAYOUTS:
        raise FileNotFoundError(
            f"dataset root '{root}' does not exist (DATASETS.ROOT or $FASTREID_DATASETS); "
            f"{name} expects {KNOWN_LAYOUTS[name]}"
        )
    if name in _MARKET_LIKE and cls.__module__.startswith("fastreid."):
        _check_market_names(name, root)
    try:
        return cls(root=root, combineall=cfg.DATASETS.COMBINEALL, **dataset_kwargs(cfg, name))
    except RuntimeError as e:  # fast-reid's check_before_run: '"<dir>" is not found'
        if "is not found" in str(e):
            layout = KNOWN_LAYOUTS.get(name, "its documented layout")
            raise FileNotFoundError(f"{name}: {e} under root '{root}'; expected {layout}") from e
        raise


def _check_market_names(name, root):
    """Raise ValueError naming every ``*.jpg`` that fast-reid's ``process_dir`` cannot parse."""
    candidates, pids, cams, example = _MARKET_LIKE[name]
    folders = [os.path.join(root, c) if c else root for c in candidates]
    base = next((f for f in folders if os.path.isdir(f)), None)
    if base is None:
        return  # fast-reid's check_before_run reports the missing folder
    bad = []
    for sub in _MARKET_SUBSETS:
        for path in sorted(glob.glob(os.path.join(base, sub, "*.jpg"))):  # fast-reid's glob
            reason = _market_name_problem(os.path.basename(path), pids, cams)
            if reason:
                bad.append(f"  {path}: {reason}")
    if bad:
        pid_rule = f"pid -1 (junk) or {pids[0]}..{pids[1]}" if pids else "pid an integer"
        raise ValueError(
            f"{name}: {len(bad)} file name(s) under '{base}' do not follow the "
            f"'<pid>_c<camera>...jpg' naming (e.g. {example}; fast-reid reads the pid and "
            f"camera with the regex '{_MARKET_PATTERN.pattern}': {pid_rule}, camera "
            f"{cams[0]}..{cams[1]}); rename or remove them:\n" + "\n".join(bad)
        )


def _market_name_problem(basename, pids, cams):
    m = _MARKET_PATTERN.search(basename)
    if m is None:
        return "no '<pid>_c<camera>' in the name"
    try:
        pid, cam = int(m.group(1)), int(m.group(2))
    except ValueError:
        return f"'{m.group(1)}' is not an integer pid"
    if pids is not None and pid != -1 and not pids[0] <= pid <= pids[1]:
        return f"pid {pid} outside {pids[0]}..{pids[1]}"
    if not cams[0] <= cam <= cams[1]:
        return f"camera {cam} outside {cams[0]}..{cams[1]}"
    return None


# --------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------
def check_dataset_images(cfg, groups):
    """Decode every image of ``groups`` once (cached) unless ``DATASETS.CHECK_IMAGES`` is off.

    Args:
        cfg (CfgNode)
        groups (dict[str, Iterable[str]]): label -> image paths.
    Raises:
        reidzoo.data.images.UnreadableImagesError: one error naming every unreadable file.
    """
    if not cfg.DATASETS.get("CHECK_IMAGES", True):
        return
    check_images(groups, progress=comm.is_main_process())


def check_datasets(cfg, train_items):
    """Check, before training, every image the run will read: the training items of
    ``DATASETS.NAMES`` and the query and gallery of every ``DATASETS.TESTS`` dataset.

    Args:
        cfg (CfgNode)
        train_items (list[tuple]): ``(path, pid, camid)`` of the training set.
    Raises:
        reidzoo.data.images.UnreadableImagesError: one error naming every unreadable file of
            all splits together, with its split and the reason.
    """
    if not cfg.DATASETS.get("CHECK_IMAGES", True):
        return
    groups = {f"train {'+'.join(cfg.DATASETS.NAMES)}": [item[0] for item in train_items]}
    for name in cfg.DATASETS.TESTS:
        data = build_dataset(cfg, name)
        groups[f"{name} query"] = [item[0] for item in data.query]
        groups[f"{name} gallery"] = [item[0] for item in data.gallery]
    check_dataset_images(cfg, groups)


# --------------------------------------------------------------------------------------------
# identity samplers
# --------------------------------------------------------------------------------------------
class IdentitySamplerError(ValueError):
    """The training sampler can never fill a batch from this training set."""


def check_identity_sampler(cfg, train_items, world_size=None):
    """Refuse a sampler configuration under which fast-reid's sampler never yields a batch.

    fast-reid 1.4.0's identity samplers (``fastreid/data/samplers/triplet_sampler.py``) build
    each process's mini-batch of ``M = IMS_PER_BATCH // W`` images (W: world size) from
    ``P = M // K`` identities x ``K = NUM_INSTANCE`` images, and the global batch of ``B = M x W``
    indices; a batch they cannot fill makes them loop forever without yielding:

    * ``NaiveIdentitySampler``: per pass over the data it draws rounds of P distinct identities
      (an identity with ``n`` images can be drawn ``max(1, n // K)`` times) until fewer than P
      remain, and yields when ``B / (P x K)`` rounds have accumulated. It hangs when ``P = 0``,
      when ``P x K`` does not divide ``B``, or when no pass can hold ``r = B / (P x K)`` rounds,
      i.e. ``sum_i min(c_i, r) < r x P`` (with W = 1 and K dividing M: fewer than P identities).
    * ``BalancedIdentitySampler``: per pass it keeps ``N - N % (P x W)`` of the N identities and
      adds K indices for each; it hangs when ``K`` does not divide ``B`` or when the kept
      identities give fewer than ``B / K`` (with K dividing M: fewer than ``P x W`` identities);
      ``P = 0`` is a ``ZeroDivisionError``.
    * ``SetReWeightSampler``: a pass holds ``sum(SET_WEIGHT) x K`` indices and yields only when
      that equals B, but its constructor asserts ``B > sum(SET_WEIGHT) x K``: it never yields
      (with numpy >= 2 it fails earlier, adding an array to a list), so it is refused.
    * ``TrainingSampler`` and ``ImbalancedDatasetSampler`` stream single images and have no
      identity requirement.

    Args:
        cfg (CfgNode): reads ``DATALOADER.SAMPLER_TRAIN``, ``DATALOADER.NUM_INSTANCE``,
            ``SOLVER.IMS_PER_BATCH``, ``DATASETS.NAMES``.
        train_items (list[tuple]): ``(path, pid, camid)`` of the training set.
        world_size (int | None): number of training processes; default the current one.
    Raises:
        IdentitySamplerError (ValueError): the message names the identities found, the batch
            size, K, the identities needed and the world size.
    """
    name = cfg.DATALOADER.SAMPLER_TRAIN
    if name not in ("NaiveIdentitySampler", "BalancedIdentitySampler", "SetReWeightSampler"):
        return
    world = int(world_size or comm.get_world_size())
    batch, k = int(cfg.SOLVER.IMS_PER_BATCH), int(cfg.DATALOADER.NUM_INSTANCE)
    counts = {}
    for item in train_items:
        counts[item[1]] = counts.get(item[1], 0) + 1
    n_ids = len(counts)
    data = f"DATASETS.NAMES {tuple(cfg.DATASETS.NAMES)}"
    setting = f"SOLVER.IMS_PER_BATCH {batch}, DATALOADER.NUM_INSTANCE {k}" + (
        f", world size {world}" if world > 1 else ""
    )
    hang = f"fast-reid's {name} would loop forever without producing a batch"
    if k < 1:
        raise IdentitySamplerError(f"DATALOADER.NUM_INSTANCE must be >= 1 for {name}, got {k}")
    mini = batch // world
    p = mini // k
    total = mini * world
    per_batch = (
        f"IMS_PER_BATCH {batch} / NUM_INSTANCE {k} = {p} identities per batch"
        if world == 1
        else f"IMS_PER_BATCH {batch} / world size {world} = {mini} images per process, / "
        f"NUM_INSTANCE {k} = {p} identities per process"
    )
    if name == "SetReWeightSampler":
        weights = list(cfg.DATALOADER.SET_WEIGHT)
        raise IdentitySamplerError(
            f"{name} cannot produce a batch in fast-reid 1.4.0: a pass holds "
            f"sum(DATALOADER.SET_WEIGHT {weights}) x NUM_INSTANCE {k} indices and it yields "
            f"only when that equals the batch of {total}, which its own assertion forbids; use "
            "NaiveIdentitySampler or BalancedIdentitySampler"
        )
    if p == 0:
        raise IdentitySamplerError(
            f"{name} needs at least one identity per batch, but {setting} gives "
            f"{mini} images per process // {k} = 0 identities: {hang}. Lower NUM_INSTANCE or "
            "raise IMS_PER_BATCH"
        )
    if name == "NaiveIdentitySampler":
        if total % (p * k):
            raise IdentitySamplerError(
                f"{name}: {setting} gives batches of {p} identities x {k} images = {p * k}, "
                f"which never add up to the batch of {total} images: {hang}. Make "
                "IMS_PER_BATCH a multiple of NUM_INSTANCE"
            )
        rounds = total // (p * k)  # draws of P identities per global batch (W when K | M)
        caps = [max(1, n // k) for n in counts.values()]  # draws each identity allows per pass
        if sum(min(c, rounds) for c in caps) < rounds * p:
            need = (
                f"at least {p} training identities"
                if rounds == 1
                else f"{rounds} draws of {p} distinct identities per pass over the data (an "
                f"identity with n images allows max(1, n // {k}) draws)"
            )
            raise IdentitySamplerError(
                f"{name} needs {need} for one batch ({per_batch}), but {data} hold {n_ids} "
                "identities "
                f"({len(train_items)} images): {hang}. Use more identities, or lower "
                "IMS_PER_BATCH or raise NUM_INSTANCE"
            )
    else:  # BalancedIdentitySampler
        if total % k:
            raise IdentitySamplerError(
                f"{name}: {setting}: it adds {k} images per identity, which never add up to "
                f"the batch of {total} images: {hang}. Make IMS_PER_BATCH a multiple of "
                "NUM_INSTANCE"
            )
        kept = n_ids - n_ids % (p * world)
        if kept * k < total:
            need = -(-total // k)  # ceil
            need = -(-need // (p * world)) * p * world  # whole groups of P x W identities
            raise IdentitySamplerError(
                f"{name} needs at least {need} training identities for one batch "
                f"({per_batch}), but {data} hold {n_ids} identities ({len(train_items)} "
                f"images): {hang}. "
                "Use more identities, or lower IMS_PER_BATCH or raise NUM_INSTANCE"
            )
