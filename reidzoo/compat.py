"""Make fastreid 1.4.0 work on today's torch, numpy and Python, on CPU as well as GPU."""

import collections
import collections.abc
import functools
import importlib
import logging
import sys
import types

import torch

logger = logging.getLogger(__name__)

_APPLIED = False

#: What each fix replaced, so tests can show what breaks without it: name -> object.
ORIGINALS = {}

#: Names of the fixes applied by :func:`apply`, in order. Tests check each one.
FIXES = (
    "torch_six",
    "collections_abc",
    "dataloader_cpu",
    "optimizer_contiguous",
    "cython_rank",
    "rerank_cpu",
    "baseline_inplace",
    "random_affine",
    "read_image",
    "pretrained_download",
    "launch_gloo",
    "checkpoint_load",
    "event_storage",
    "registry_names",
    "small_gallery_cmc",
    "printer_same_iter",
)


def apply():
    """Apply every fix once. Safe to call many times; must run before fastreid is imported
    for the two import-time fixes (``torch._six`` and ``collections.Mapping``).

    Returns:
        tuple[str]: the names of the fixes that are in force.
    """
    global _APPLIED
    if _APPLIED:
        return FIXES
    _fix_import_time()
    _fix_dataloader()
    _fix_optimizer()
    _fix_cython_rank()
    _fix_rerank()
    _fix_baseline_inplace()
    _fix_random_affine()
    _fix_read_image()
    _fix_pretrained_download()
    _fix_launch()
    _fix_checkpoint_load()
    _fix_event_storage()
    _fix_registry_names()
    _fix_small_gallery_cmc()
    _fix_printer_same_iter()
    _APPLIED = True
    return FIXES


# --------------------------------------------------------------------------------------------
# import-time: torch._six (removed in torch 2.0) and collections.Mapping (removed in Py 3.10)
# --------------------------------------------------------------------------------------------
def _fix_import_time():
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
# Baseline/MGN normalise the caller's image tensor in place (`sub_`/`div_`): the caller's batch
# is corrupted, and fastreid's own flip test then normalises the flipped copy twice.
# --------------------------------------------------------------------------------------------
def preprocess_image(self, batched_inputs):
    """Out-of-place replacement for fastreid's ``Baseline.preprocess_image``.

    Args:
        batched_inputs (dict | Tensor): fastreid batch dict with "images", or images
            [N, 3, H, W] as float 0-255.
    Returns:
        Tensor: [N, 3, H, W] normalised by ``pixel_mean``/``pixel_std``.
    """
    if isinstance(batched_inputs, dict):
        images = batched_inputs["images"]
    elif isinstance(batched_inputs, torch.Tensor):
        images = batched_inputs
    else:
        raise TypeError(
            f"batched_inputs must be a dict or a Tensor, got {type(batched_inputs).__name__}"
        )
    return (images.to(self.pixel_mean.device) - self.pixel_mean) / self.pixel_std


def _fix_baseline_inplace():
    from fastreid.modeling.meta_arch import baseline, mgn

    ORIGINALS.setdefault("baseline_inplace", baseline.Baseline.preprocess_image)
    baseline.Baseline.preprocess_image = preprocess_image
    mgn.MGN.preprocess_image = preprocess_image


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
# A corrupt image raised PIL's error without a usable file name, an RGBA file gave 4 channels
# (a tensor-size error in collate) and a 16-bit one could not be converted: read every file
# with reidzoo's one reader (8-bit RGB by fixed rules, errors name the file).
# --------------------------------------------------------------------------------------------
def _fix_read_image():
    from fastreid.data import common, data_utils

    orig = data_utils.read_image
    if getattr(orig, "_reidzoo_patched", False):
        return

    @functools.wraps(orig)
    def read_image(file_name, format=None):
        import numpy as np
        from PIL import Image

        from reidzoo.data import images

        image = images.read_image(file_name)  # ImageReadError (an OSError) names the file
        if format is None or format == "RGB":
            return image
        if format == "BGR":  # fast-reid's convention: a PIL image holding BGR-ordered pixels
            return Image.fromarray(np.ascontiguousarray(np.asarray(image)[:, :, ::-1]))
        return image.convert(format)

    ORIGINALS["read_image"] = orig
    read_image._reidzoo_patched = True
    data_utils.read_image = read_image
    common.read_image = read_image


# --------------------------------------------------------------------------------------------
# PRETRAIN=True without PRETRAIN_PATH tries to download weights; nothing can be downloaded here.
# --------------------------------------------------------------------------------------------
def _fix_pretrained_download():
    from fastreid.modeling.backbones import resnet

    def init_pretrained_weights(key):
        raise FileNotFoundError(
            f"MODEL.BACKBONE.PRETRAIN is True but MODEL.BACKBONE.PRETRAIN_PATH is empty, and "
            f"ImageNet weights ({key}) cannot be downloaded. Set MODEL.BACKBONE.PRETRAIN_PATH "
            f"to a local torchvision-style checkpoint, or MODEL.BACKBONE.PRETRAIN False."
        )

    ORIGINALS.setdefault("pretrained_download", resnet.init_pretrained_weights)
    resnet.init_pretrained_weights = init_pretrained_weights


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


# --------------------------------------------------------------------------------------------
# The losses log accuracy to the current EventStorage and assert when there is none, so a
# training-mode forward outside the trainer (a test, a notebook, a benchmark) fails.
# --------------------------------------------------------------------------------------------
def _fix_event_storage():
    from fastreid.modeling.losses import cross_entroy_loss
    from fastreid.utils import events

    def get_event_storage():
        if events._CURRENT_STORAGE_STACK:
            return events._CURRENT_STORAGE_STACK[-1]
        return events.EventStorage()  # discarded: nobody is recording outside a trainer

    ORIGINALS.setdefault("event_storage", cross_entroy_loss.get_event_storage)
    cross_entroy_loss.get_event_storage = get_event_storage


# --------------------------------------------------------------------------------------------
# Registry.get's KeyError names the missing entry but not what exists; list the choices.
# --------------------------------------------------------------------------------------------
def _fix_registry_names():
    from fastreid.utils.registry import Registry

    def get(self, name):
        ret = self._obj_map.get(name)
        if ret is None:
            known = ", ".join(sorted(self._obj_map)) or "(none)"
            raise KeyError(
                f"No object named '{name}' found in '{self._name}' registry! "
                f"Registered names: {known}"
            )
        return ret

    ORIGINALS.setdefault("registry_names", Registry.get)
    Registry.get = get


# --------------------------------------------------------------------------------------------
# With fewer than 10 gallery images the CMC curve is cut at the gallery size and ReidEvaluator's
# `cmc[r - 1]` for Rank-5/10 raises IndexError. Past the gallery size the CMC is flat, so pad it
# with its last value up to max_rank.
# --------------------------------------------------------------------------------------------
def _fix_small_gallery_cmc():
    import numpy as np
    from fastreid.evaluation import rank

    orig = rank.evaluate_rank
    if getattr(orig, "_reidzoo_patched", False):
        return

    @functools.wraps(orig)
    def evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50, **kwargs):
        out = orig(distmat, q_pids, g_pids, q_camids, g_camids, max_rank, **kwargs)
        cmc = np.asarray(out[0])
        if 0 < len(cmc) < max_rank:
            cmc = np.concatenate([cmc, np.full(max_rank - len(cmc), cmc[-1], dtype=cmc.dtype)])
            out = (cmc, *out[1:])
        return out

    ORIGINALS["small_gallery_cmc"] = orig
    evaluate_rank._reidzoo_patched = True
    rank.evaluate_rank = evaluate_rank


# --------------------------------------------------------------------------------------------
# CommonMetricPrinter estimates the ETA from the previous write while the iteration timer is
# still warming up (< 3 iterations); a second write at the same iteration (end of step, then end
# of epoch) divides by zero. A repeated write at the same iteration has nothing new to print.
# --------------------------------------------------------------------------------------------
def _fix_printer_same_iter():
    from fastreid.utils import events

    cls = events.CommonMetricPrinter
    if getattr(cls.write, "_reidzoo_patched", False):
        return
    orig = cls.write

    @functools.wraps(orig)
    def write(self):
        last = getattr(self, "_last_write", None)
        if last is not None and last[0] == events.get_event_storage().iter:
            return
        return orig(self)

    ORIGINALS["printer_same_iter"] = orig
    write._reidzoo_patched = True
    cls.write = write
