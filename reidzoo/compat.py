"""Make fastreid 1.4.0 work on today's torch, torchvision, numpy and Python, on CPU as well as GPU.

Only compatibility fixes live here: each one repairs something that breaks in fast-reid 1.4.0
under a newer torch/torchvision/Python or without CUDA, and is applied only when the installed
versions need it (:data:`FIX_TABLE`: fast-reid up to 1.4.0, plus the torch, torchvision or
Python version that broke it). None changes what a working fast-reid computes. reidzoo's own
behaviour (out-of-place normalisation, its image reader, refusing downloads, losses outside a
trainer, registry messages, small-gallery CMC, the metric printer) lives in reidzoo's own
classes and build paths instead, so importing reidzoo leaves stock fast-reid models alone.

:func:`apply` runs once, from ``reidzoo/__init__.py``, before anything imports fast-reid's
submodules (two fixes must precede fast-reid's imports).
"""

import collections
import collections.abc
import functools
import importlib
import logging
import re
import sys
import types
from importlib import metadata

import torch

logger = logging.getLogger(__name__)

_APPLIED = False

#: What each fix replaced, so tests can show what breaks without it: name -> object.
ORIGINALS = {}


def _parse(version):
    """``"2.14.1+cpu"`` -> (2, 14, 1)."""
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:3])


def installed_versions():
    """The versions the guards look at.

    Returns:
        dict[str, tuple[int, ...]]: ``fastreid``, ``torch``, ``torchvision``, ``python``.
    """
    import torchvision

    try:
        fastreid = metadata.version("fastreid")
    except metadata.PackageNotFoundError:  # a source checkout on sys.path
        import fastreid as _fr

        fastreid = getattr(_fr, "__version__", "1.4.0")
    return {
        "fastreid": _parse(fastreid),
        "torch": _parse(torch.__version__),
        "torchvision": _parse(torchvision.__version__),
        "python": tuple(sys.version_info[:3]),
    }


#: fast-reid releases with the breakages below (1.4.0 is the last release; a later one is
#: assumed to have fixed them until shown otherwise).
FASTREID_MAX = (1, 4, 0)

#: Every compatibility fix: name -> (the version that broke fast-reid: {package: minimum},
#: what breaks). A fix applies when fast-reid <= FASTREID_MAX and every minimum is reached.
FIX_TABLE = {
    "torch_six": ({"torch": (2, 0)}, "torch 2.0 removed torch._six, which fast-reid imports"),
    "collections_abc": (
        {"python": (3, 10)},
        "Python 3.10 removed collections.Mapping etc., which fast-reid imports",
    ),
    "dataloader_cpu": ({}, "DataLoaderX creates CUDA streams: 'Found no NVIDIA driver' on CPU"),
    "optimizer_contiguous": (
        {"torch": (2, 0)},
        "build_optimizer(contiguous=True) steps a flat copy on torch 2: the weights never change",
    ),
    "cython_rank": (
        {},
        "ReidEvaluator runs `make` in site-packages and exits the process when it fails",
    ),
    "rerank_cpu": ({}, "k-reciprocal re-ranking hard-codes .cuda() and GPU faiss"),
    "random_affine": (
        {"torchvision": (0, 13)},
        "torchvision 0.13 removed RandomAffine's resample= and fillcolor=, which INPUT.AFFINE uses",
    ),
    "launch_gloo": ({}, "launch's worker asserts CUDA and hard-codes NCCL"),
    "checkpoint_load": (
        {"torch": (2, 6)},
        "torch 2.6 made torch.load weights-only: fast-reid's Checkpointer cannot read its own "
        "checkpoints and names neither the file nor a way out",
    ),
}


def needed(name, versions=None):
    """Whether the fix ``name`` is needed with these versions.

    Args:
        name (str): a key of :data:`FIX_TABLE`.
        versions (dict | None): as :func:`installed_versions` returns; None: the installed ones.
    Returns:
        bool
    """
    versions = versions or installed_versions()
    minimums, _ = FIX_TABLE[name]
    if versions["fastreid"] > FASTREID_MAX:
        return False
    return all(versions[pkg] >= minimum for pkg, minimum in minimums.items())


#: Names of the fixes in force after :func:`apply`, in table order (the installed versions
#: need them). Tests check each one.
FIXES = tuple(name for name in FIX_TABLE if needed(name))
#: Fixes the installed versions do not need: name -> why it is not applied.
SKIPPED = {
    name: f"not needed with {installed_versions()}: {why}"
    for name, (_, why) in FIX_TABLE.items()
    if name not in FIXES
}


def apply():
    """Apply every needed fix (:data:`FIXES`) once. Safe to call many times; must run before
    fast-reid's submodules are imported for the two import-time fixes (``torch._six`` and
    ``collections.Mapping``). ``reidzoo/__init__.py`` calls it; nothing else does.

    Returns:
        tuple[str]: the names of the fixes that are in force.
    """
    global _APPLIED
    if _APPLIED:
        return FIXES
    fixers = {
        "torch_six": _fix_torch_six,
        "collections_abc": _fix_collections_abc,
        "dataloader_cpu": _fix_dataloader,
        "optimizer_contiguous": _fix_optimizer,
        "cython_rank": _fix_cython_rank,
        "rerank_cpu": _fix_rerank,
        "random_affine": _fix_random_affine,
        "launch_gloo": _fix_launch,
        "checkpoint_load": _fix_checkpoint_load,
    }
    for name in FIXES:
        fixers[name]()
    for name, why in SKIPPED.items():
        logger.debug("compat fix %s skipped: %s", name, why)
    _APPLIED = True
    return FIXES


# --------------------------------------------------------------------------------------------
# import-time: torch._six (removed in torch 2.0) and collections.Mapping (removed in Py 3.10)
# --------------------------------------------------------------------------------------------
def _fix_torch_six():
    if "torch._six" not in sys.modules:
        try:
            importlib.import_module("torch._six")
        except ImportError:
            six = types.ModuleType("torch._six")
            six.string_classes = (str, bytes)
            six.int_classes = int
            six.inf = float("inf")
            six.nan = float("nan")
            sys.modules["torch._six"] = six
            torch._six = six


def _fix_collections_abc():
    # fastreid does `from collections import Mapping`; only add the aliases that are missing.
    for name in ("Mapping", "Sequence", "Iterable", "MutableMapping"):
        if not hasattr(collections, name):
            setattr(collections, name, getattr(collections.abc, name))


# --------------------------------------------------------------------------------------------
# DataLoaderX creates CUDA streams unconditionally: "Found no NVIDIA driver" on CPU.
# --------------------------------------------------------------------------------------------
def _fix_dataloader():
    from fastreid.data import data_utils

    cls = data_utils.DataLoaderX
    if getattr(cls, "_reidzoo_patched", False):
        return
    orig_init, orig_iter, orig_next = cls.__init__, cls.__iter__, cls.__next__
    ORIGINALS["dataloader_cpu"] = orig_init
    orig_shutdown = cls._shutdown_background_thread
    base = torch.utils.data.DataLoader

    def __init__(self, local_rank, **kwargs):
        self._reidzoo_cuda = torch.cuda.is_available()
        if self._reidzoo_cuda:
            orig_init(self, local_rank, **kwargs)
        else:
            # pin_memory needs an accelerator; without one it only warns and wastes time.
            kwargs["pin_memory"] = False
            base.__init__(self, **kwargs)
            self.local_rank = local_rank

    def __iter__(self):
        if self._reidzoo_cuda:
            return orig_iter(self)
        return base.__iter__(self)

    def __next__(self):  # only reached on the CUDA path: on CPU __iter__ returns a plain iterator
        return orig_next(self)

    def _shutdown_background_thread(self):
        if self._reidzoo_cuda and hasattr(self, "iter"):
            orig_shutdown(self)

    cls.__init__ = __init__
    cls.__iter__ = __iter__
    cls.__next__ = __next__
    cls._shutdown_background_thread = _shutdown_background_thread
    cls._reidzoo_patched = True


# --------------------------------------------------------------------------------------------
# build_optimizer(contiguous=True) makes the optimizer step a flat copy of the parameters on
# torch 2.x: training logs losses while the weights never change.
# --------------------------------------------------------------------------------------------
def _fix_optimizer():
    from fastreid.solver import build as solver_build

    fn = solver_build.build_optimizer
    ORIGINALS.setdefault("optimizer_contiguous", fn.__defaults__)
    # Changing the default on the function object reaches every name it was imported under.
    if fn.__defaults__ != (False,):
        fn.__defaults__ = (False,)


# --------------------------------------------------------------------------------------------
# ReidEvaluator runs `make` inside site-packages on first use and sys.exit(1)s on failure.
# We never depend on the Cython build: fastreid's numpy ranking gives the same numbers.
# --------------------------------------------------------------------------------------------
def _fix_cython_rank():
    import warnings

    warnings.filterwarnings("ignore", message="Cython rank evaluation", category=UserWarning)
    from fastreid.evaluation import rank, reid_evaluation

    def _compile_dependencies(self):
        if not rank.IS_CYTHON_AVAI:
            logger.debug("fastreid Cython ranking not built; using its numpy implementation")

    cls = reid_evaluation.ReidEvaluator
    ORIGINALS.setdefault("cython_rank", cls._compile_dependencies)
    cls._compile_dependencies = _compile_dependencies


# --------------------------------------------------------------------------------------------
# k-reciprocal re-ranking hard-codes `.cuda()` and GPU faiss (search_option=0).
# --------------------------------------------------------------------------------------------
def _fix_rerank():
    from fastreid.utils import compute_dist

    orig = compute_dist.compute_jaccard_distance
    if getattr(orig, "_reidzoo_patched", False):
        return

    @functools.wraps(orig)
    def compute_jaccard_distance(features, k1=20, k2=6, search_option=0, fp16=False):
        import faiss

        if not torch.cuda.is_available() or not hasattr(faiss, "StandardGpuResources"):
            search_option = 3  # fastreid's CPU faiss path
        return orig(features, k1=k1, k2=k2, search_option=search_option, fp16=fp16)

    ORIGINALS["rerank_cpu"] = orig
    compute_jaccard_distance._reidzoo_patched = True
    compute_dist.compute_jaccard_distance = compute_jaccard_distance


# --------------------------------------------------------------------------------------------
# INPUT.AFFINE builds RandomAffine(resample=, fillcolor=): both removed from torchvision.
# --------------------------------------------------------------------------------------------
def _fix_random_affine():
    import torchvision.transforms as T
    from fastreid.data.transforms import build as tbuild

    if getattr(tbuild.T, "_reidzoo_proxy", False):
        return

    class RandomAffine(T.RandomAffine):
        def __init__(self, *args, resample=None, fillcolor=None, **kwargs):
            if fillcolor is not None and "fill" not in kwargs:
                kwargs["fill"] = fillcolor
            if resample not in (None, False, 0) and "interpolation" not in kwargs:
                kwargs["interpolation"] = T.InterpolationMode.BILINEAR
            super().__init__(*args, **kwargs)

    ORIGINALS.setdefault("random_affine", tbuild.T)
    proxy = types.ModuleType("torchvision.transforms")
    proxy.__dict__.update(T.__dict__)
    proxy.RandomAffine = RandomAffine
    proxy._reidzoo_proxy = True
    tbuild.T = proxy  # only fastreid's transform builder sees the compatible class


# --------------------------------------------------------------------------------------------
# launch(): the worker asserts CUDA and hard-codes NCCL. Use gloo on CPU.
# --------------------------------------------------------------------------------------------
def _distributed_worker(
    local_rank, main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args
):
    """Drop-in for fastreid's ``launch._distributed_worker`` that also runs on CPU (gloo)."""
    import torch.distributed as dist
    from fastreid.utils import comm

    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= num_gpus_per_machine
    global_rank = machine_rank * num_gpus_per_machine + local_rank
    dist.init_process_group(
        backend="nccl" if use_cuda else "gloo",
        init_method=dist_url,
        world_size=world_size,
        rank=global_rank,
    )
    if use_cuda:
        torch.cuda.set_device(local_rank)
    comm.synchronize()
    num_machines = world_size // num_gpus_per_machine
    for i in range(num_machines):
        ranks_on_i = list(range(i * num_gpus_per_machine, (i + 1) * num_gpus_per_machine))
        pg = dist.new_group(ranks_on_i)
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = pg
    try:
        main_func(*args)
    finally:
        dist.destroy_process_group()


def _fix_launch():
    launch = importlib.import_module("fastreid.engine.launch")  # the module, not the function

    ORIGINALS.setdefault("launch_gloo", launch._distributed_worker)
    launch._distributed_worker = _distributed_worker


# --------------------------------------------------------------------------------------------
# fastreid's Checkpointer calls torch.load with torch's defaults: weights_only=True on torch
# >= 2.6 (older: unpickle everything), with an error that names neither the file nor a way out.
# Read through reidzoo.checkpoint.load_file: weights only plus the objects fast-reid
# checkpoints hold (SAFE_GLOBALS), never a process-wide allow-list; a checkpointer whose
# `trusted` attribute is True (REIDZOO.WEIGHTS_ONLY False) unpickles completely.
# --------------------------------------------------------------------------------------------
def _fix_checkpoint_load():
    from fastreid.utils import checkpoint

    def _load_file(self, f):
        from reidzoo.checkpoint import load_file

        return load_file(f, trusted=bool(getattr(self, "trusted", False)))

    ORIGINALS.setdefault("checkpoint_load", checkpoint.Checkpointer._load_file)
    checkpoint.Checkpointer._load_file = _load_file
