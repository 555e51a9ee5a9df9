"""Feature extraction with a trained model: ``FeatureExtractor`` and registered model names."""

import glob
import logging
import os
import re
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

logger = logging.getLogger(__name__)

#: File name endings taken from folders and glob patterns (case-insensitive).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
#: Repository root, holding ``configs/`` and ``projects/`` (editable installs and checkouts).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: The shipped configs in a regular (non-editable) install, in the repository's layout:
#: ``setup.py``'s ``build_py`` copies them there (``PACKAGED_CONFIGS``); absent in a checkout.
PACKAGED_CONFIG_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shipped_configs")
_BACKBONE_TOKEN = re.compile(r"^r\d+$")  # "r18", "r50", "r101" in names like IANet_R50_Market1501


# --------------------------------------------------------------------------------------------
# Registered model names
# --------------------------------------------------------------------------------------------
def _config_files(repo_root):
    """Complete configs shipped with the repository, each with its base name: files under
    ``configs/`` are named by their path there (``configs/Demo/x.yml`` -> ``Demo-x``), files in
    ``projects/<Paper>/configs/`` by their stem, prefixed by the paper unless it starts with
    it. ``Base-*`` files (partial, only inherited) and ``ablations/`` variants are left out."""
    out = []
    top = os.path.join(repo_root, "configs")
    for path in glob.glob(os.path.join(top, "**", "*.yml"), recursive=True):
        out.append((os.path.splitext(os.path.relpath(path, top))[0].replace(os.sep, "-"), path))
    for path in glob.glob(os.path.join(repo_root, "projects", "*", "configs", "*.yml")):
        paper = os.path.basename(os.path.dirname(os.path.dirname(path)))
        stem = os.path.splitext(os.path.basename(path))[0]
        out.append((stem if stem.lower().startswith(paper.lower()) else f"{paper}-{stem}", path))
    return sorted(
        (name, path) for name, path in out if not os.path.basename(path).lower().startswith("base-")
    )


def config_root():
    """The folder whose ``configs/`` and ``projects/*/configs/`` hold the shipped configs.

    Returns:
        str: :data:`PACKAGED_CONFIG_ROOT` in a regular install (the copy made at build time;
        the site-packages folder above the package is no repository), else :data:`REPO_ROOT`
        (a checkout or an editable install, whose configs are read where they are edited).
    """
    return PACKAGED_CONFIG_ROOT if os.path.isdir(PACKAGED_CONFIG_ROOT) else REPO_ROOT


def registered_models(repo_root=None):
    """Model names for the configs shipped in ``configs/`` and ``projects/*/configs/``.

    A name is the config's base name (see below) lower-cased, with ``_`` replaced by ``-``:
    ``projects/IANet/configs/IANet_R50_Market1501.yml`` -> ``ianet-r50-market1501``,
    ``configs/Demo/bagtricks_R18_synthetic.yml`` -> ``demo-bagtricks-r18-synthetic``. The base
    name of a file under ``configs/`` is its path there; in ``projects/<Paper>/configs/`` it is
    the file name, prefixed by the paper's folder name unless it starts with it. Each name also
    has a short form without its backbone token (``r18``, ``r50``, ...), ``ianet-market1501``,
    unless two files would share it. ``Base-*`` files and ``ablations/`` are not listed.

    Args:
        repo_root (str | None): repository root; None: :func:`config_root` (the repository
            this package lives in, or the configs a regular install ships).
    Returns:
        dict[str, str]: name -> absolute config path, sorted by name.
    """
    root = repo_root or config_root()
    full, short = {}, {}
    for base, path in _config_files(root):
        name = base.lower().replace("_", "-")
        full.setdefault(name, path)
        alias = "-".join(t for t in name.split("-") if not _BACKBONE_TOKEN.match(t))
        if alias != name:
            short.setdefault(alias, set()).add(path)
    names = dict(full)
    for alias, paths in short.items():
        if len(paths) == 1 and alias not in names:
            names[alias] = next(iter(paths))
    return dict(sorted(names.items()))


def resolve_config(spec, repo_root=None):
    """A config file path from a path or a registered model name.

    Args:
        spec (str): an existing YAML file, or a name from :func:`registered_models`.
        repo_root (str | None): see :func:`registered_models`.
    Returns:
        str: path of the config file.
    Raises:
        FileNotFoundError: ``spec`` looks like a path (has a folder or a ``.yml``/``.yaml``
            ending) and does not exist.
        ValueError: ``spec`` is neither a file nor a registered name; the message lists the
            registered names.
    """
    spec = os.fspath(spec)
    if os.path.isfile(spec):
        return spec
    names = registered_models(repo_root)
    if spec in names:
        return names[spec]
    if os.sep in spec or "/" in spec or spec.lower().endswith((".yml", ".yaml")):
        raise FileNotFoundError(f"config file not found: '{spec}'")
    listed = ", ".join(names) if names else "(none: configs/ and projects/ were not found)"
    raise ValueError(
        f"'{spec}' is neither a config file nor a registered model name; registered names: {listed}"
    )


def checkpoint_opts(checkpoint, opts=()):
    """``KEY VALUE`` overrides with a ``--checkpoint`` file as ``MODEL.WEIGHTS``: the one way
    ``reidzoo.extract``, ``reidzoo.export`` and ``reidzoo.visualize`` take weights.

    ``--checkpoint PTH`` and a ``MODEL.WEIGHTS PTH`` override mean the same; either replaces a
    ``MODEL.WEIGHTS`` set in the config file (PFE's stage II configs name stage I's result).

    Args:
        checkpoint (str | os.PathLike | None): the ``--checkpoint`` argument.
        opts (Sequence[str]): the ``KEY VALUE`` overrides.
    Returns:
        list[str]: the overrides, ending in ``MODEL.WEIGHTS <checkpoint>`` when it is given.
    Raises:
        ValueError: ``--checkpoint`` and a ``MODEL.WEIGHTS`` override name different files.
    """
    opts = list(opts or ())
    if not checkpoint:
        return opts
    checkpoint = os.fspath(checkpoint)
    for key, value in zip(opts[0::2], opts[1::2]):
        if key == "MODEL.WEIGHTS" and os.path.abspath(value) != os.path.abspath(checkpoint):
            raise ValueError(
                f"--checkpoint '{checkpoint}' and MODEL.WEIGHTS '{value}' name different "
                "files; give one of them"
            )
    return opts + ["MODEL.WEIGHTS", checkpoint]


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------
def _is_image_file(path):
    return os.path.isfile(path) and path.lower().endswith(IMAGE_EXTENSIONS)


def expand_path(spec):
    """Image files named by a file, a folder or a glob pattern.

    Args:
        spec (str | os.PathLike): an image file (read whatever its ending), a folder (its
            image files, not recursive) or a glob pattern (``**`` recurses); folders and
            patterns keep files ending in :data:`IMAGE_EXTENSIONS`.
    Returns:
        list[str]: paths, sorted within a folder or pattern.
    Raises:
        FileNotFoundError: nothing exists at ``spec``, or it holds / matches no image file.
    """
    spec = os.fspath(spec)
    if os.path.isfile(spec):
        return [spec]
    if os.path.isdir(spec):
        files = sorted(os.path.join(spec, n) for n in os.listdir(spec))
        where = f"folder '{spec}'"
    elif glob.has_magic(spec):
        files = sorted(glob.glob(spec, recursive=True))
        where = f"pattern '{spec}'"
    else:
        raise FileNotFoundError(f"input not found: '{spec}' (expected an image, folder or glob)")
    files = [f for f in files if _is_image_file(f)]
    if not files:
        raise FileNotFoundError(
            f"{where} holds no image file (looked for {', '.join(IMAGE_EXTENSIONS)})"
        )
    return files


def _split_batch(obj):
    """A 4-D array or tensor is a batch of images; anything else one item."""
    if isinstance(obj, (np.ndarray, torch.Tensor)) and obj.ndim == 4:
        return list(obj)
    return [obj]


def collect_inputs(inputs):
    """Flatten what :meth:`FeatureExtractor.extract` accepts into named items.

    Args:
        inputs: one item or a list / tuple of items; an item is a path (file, folder or glob,
            see :func:`expand_path`), a ``PIL.Image``, a numpy array ``[H, W]``, ``[H, W, C]``
            or a batch ``[N, H, W, C]``, or a tensor ``[C, H, W]`` or ``[N, C, H, W]``.
    Returns:
        list[tuple[str, object]]: (name, source) per image. A file's name is its path; an
        in-memory image is named ``"<kind #i>"``, with ``i`` its position in the result.
    """
    if isinstance(inputs, (list, tuple)):
        items = list(inputs)
    else:
        items = [inputs]
    out = []
    for item in items:
        if isinstance(item, (str, os.PathLike)):
            out.extend((p, p) for p in expand_path(item))
            continue
        for image in _split_batch(item):
            kind = type(image).__name__ if not isinstance(image, Image.Image) else "PIL.Image"
            out.append((f"<{kind} #{len(out)}>", image))
    return out


def _pixels_to_uint8(array, what):
    """8-bit pixels from an array of 0-255 values (any numeric dtype)."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool or not np.issubdtype(array.dtype, np.number):
        raise TypeError(f"{what}: expected 0-255 pixel values, got dtype {array.dtype}")
    lo, hi = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if lo < 0 or hi > 255 or not np.array_equal(array, np.round(array)):
        raise ValueError(
            f"{what}: expected whole 0-255 pixel values (8-bit RGB, as read from an image "
            f"file), got {array.dtype} values in [{lo:g}, {hi:g}]; for images in [0, 1] pass "
            "(x * 255).round()"
        )
    return array.astype(np.uint8)


def to_pil(image, name="image"):
    """An RGB ``PIL.Image`` from a path or an in-memory image.

    Files are read with :func:`reidzoo.data.images.read_image` (EXIF orientation applied; an
    unreadable file raises an error naming it), exactly as the data loaders do. Arrays are
    ``[H, W]``, ``[H, W, 1|3|4]`` (RGB order); tensors are ``[1|3|4, H, W]``; both hold whole
    0-255 values (any dtype). PIL images of other modes (16-bit, alpha, palette, ...) are
    converted by the same rules as files.

    Args:
        image (str | os.PathLike | PIL.Image.Image | np.ndarray | Tensor)
        name (str): used in error messages.
    Returns:
        PIL.Image.Image: mode "RGB".
    Raises:
        OSError: an unreadable image file (the message names it).
        TypeError, ValueError: an unsupported type, shape or pixel range (named).
    """
    from reidzoo.data.images import read_image, to_rgb

    if isinstance(image, (str, os.PathLike)):
        pil = read_image(image)  # the data loaders' reader: same pixels; errors name the file
    elif isinstance(image, Image.Image):
        pil = image
    elif isinstance(image, (np.ndarray, torch.Tensor)):
        if isinstance(image, torch.Tensor):
            if image.ndim != 3 or image.shape[0] not in (1, 3, 4):
                raise ValueError(
                    f"{name}: a tensor image must be [C, H, W] with C in (1, 3, 4), "
                    f"got shape {tuple(image.shape)}"
                )
            image = image.detach().cpu().permute(1, 2, 0).numpy()
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise ValueError(
                f"{name}: an array image must be [H, W] or [H, W, C] with C in (1, 3, 4), "
                f"got shape {tuple(image.shape)}"
            )
        pil = Image.fromarray(np.ascontiguousarray(_pixels_to_uint8(image, name)))
    else:
        raise TypeError(
            f"{name}: unsupported input type {type(image).__name__}; expected a path, "
            "PIL.Image, numpy array or torch.Tensor"
        )
    return to_rgb(pil, name)


class _Unreadable:
    """An image that could not be read, returned by a loader worker as a value: an exception
    raised in a worker reaches the caller wrapped in the worker's traceback, where the user
    needs the one message that names the file."""

    def __init__(self, error):
        # The message and the base class only: an exception class with its own __init__
        # arguments (an ImageReadError) does not survive the trip back from a worker.
        self.kind = next(c for c in (OSError, ValueError, TypeError) if isinstance(error, c))
        self.message = str(error)

    def error(self):
        return self.kind(self.message)


def _stack(tensors):
    failed = next((t for t in tensors if isinstance(t, _Unreadable)), None)
    return failed if failed is not None else torch.stack(tensors, dim=0)


class _ImageList(torch.utils.data.Dataset):
    """Named images through the test transforms, one ``[3, H, W]`` tensor each (or an
    :class:`_Unreadable` for an image that cannot be read)."""

    def __init__(self, items, transforms):
        self.items = items
        self.transforms = transforms

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        name, source = self.items[index]
        try:
            return self.transforms(to_pil(source, name))
        except (OSError, ValueError, TypeError) as e:  # what to_pil raises, naming the image
            return _Unreadable(e)


# --------------------------------------------------------------------------------------------
# The extractor
# --------------------------------------------------------------------------------------------
@dataclass
class Features:
    """Features of a set of images.

    Attributes:
        features (np.ndarray | Tensor): [N, D] float32, rows in input order.
        names (list[str]): N names: file paths, or ``"<kind #i>"`` for in-memory images.
    """

    features: object
    names: list


def _resolve_device(requested, configured):
    """The device to run on: ``requested`` if given (an error if it is CUDA and none is
    available), else ``configured`` (``MODEL.DEVICE``), falling back to the CPU with a warning
    when that names CUDA on a machine without it."""
    if requested:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device '{requested}' was requested but CUDA is not available")
        return device
    device = torch.device(configured or "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        logger.warning("MODEL.DEVICE is '%s' but CUDA is not available: using the CPU", configured)
        return torch.device("cpu")
    return device


def load_config(config, opts=()):
    """A config from a config object, a YAML file or a registered model name.

    Args:
        config (str | CfgNode): a file (read with :func:`reidzoo.config.setup_cfg`, custom
            imports included), a name from :func:`registered_models`, or a config (cloned).
        opts (Sequence[str]): ``KEY VALUE`` overrides.
    Returns:
        CfgNode: a new, unfrozen config.
    Raises:
        FileNotFoundError, ValueError: see :func:`resolve_config`.
        KeyError: an unknown key in ``opts``.
    """
    from fastreid.config import CfgNode

    from reidzoo.config import setup_cfg

    if isinstance(config, CfgNode):
        cfg = config.clone()
        cfg.defrost()
        if opts:
            cfg.merge_from_list(list(opts))
        return cfg
    return setup_cfg(resolve_config(config), list(opts or ()), freeze=False)


class FeatureExtractor:
    """Re-ID features of images with a trained model, exactly as its evaluation computes them.

    The model is built from the config by :func:`reidzoo.modeling.build.build_eval_model` (the
    builder ``reidzoo.export`` uses; ``MODEL.WEIGHTS`` is loaded as ``train_net.py
    --eval-only`` loads it, strictly when ``REIDZOO.STRICT_LOAD``). Each image is read with
    fast-reid's ``read_image`` and goes through the test transforms the evaluation loader uses
    (fast-reid's ``build_transforms(cfg, is_train=False)`` with ``INPUT.TRANSFORMS`` spliced in),
    images are stacked in batches and passed to the model as ``{"images": [N, 3, H, W]}``
    (float 0-255; the model normalises). With flip averaging (``TEST.FLIP.ENABLED``) the
    features are the mean of the outputs for the batch and its horizontal mirror, as fast-reid's
    ``inference_on_dataset``. Finally rows are L2-normalised (``normalize``); without that they
    are the very values the evaluator receives.

    Args:
        config (str | CfgNode): a config file, a registered model name (see
            :func:`registered_models`) or a config.
        checkpoint (str | None): weights file; None uses ``MODEL.WEIGHTS``.
        opts (Sequence[str]): ``KEY VALUE`` config overrides.
        device (str | None): e.g. "cpu", "cuda:0"; None: ``MODEL.DEVICE``, or the CPU when
            that is CUDA and none is available.
        batch_size (int | None): images per forward pass; None: ``TEST.IMS_PER_BATCH``.
        flip (bool | None): average with mirrored images; None: ``TEST.FLIP.ENABLED``.
        normalize (bool): L2-normalise feature rows.
        num_workers (int | None): image-loading processes; None: ``DATALOADER.NUM_WORKERS``.
        allow_random_weights (bool): build without any checkpoint (the features are then
            meaningless; for tests and timing only).

    Attributes:
        cfg (CfgNode): the frozen config used (``MODEL.WEIGHTS`` = the checkpoint,
            ``MODEL.DEVICE`` = the device).
        model (nn.Module): the model, in eval mode.
        checkpoint (str): the weights file loaded ("" with random weights).
        device (torch.device)
        batch_size, flip, normalize, num_workers: as the arguments, resolved; they may be
            changed between calls.
    Raises:
        ValueError: no checkpoint and ``allow_random_weights`` is False; an unknown model
            name (listing the registered ones).
        FileNotFoundError: the config file or the checkpoint does not exist.
        reidzoo.checkpoint.CheckpointMismatchError: the checkpoint does not fit the model the
            config builds (missing, unexpected and reshaped keys listed).

    Example::

        extractor = FeatureExtractor("ianet-market1501", "logs/ianet/model_final.pth")
        out = extractor.extract("query_dir/")   # out.features [N, D], out.names
    """

    def __init__(
        self,
        config,
        checkpoint=None,
        opts=(),
        device=None,
        batch_size=None,
        flip=None,
        normalize=True,
        num_workers=None,
        allow_random_weights=False,
    ):
        from reidzoo.data.transforms import build_transforms_with_registry
        from reidzoo.modeling.build import build_eval_model

        cfg = load_config(config, opts)
        weights = cfg.MODEL.WEIGHTS if checkpoint is None else os.fspath(checkpoint)
        if not weights and not allow_random_weights:
            raise ValueError(
                "no checkpoint: pass one (checkpoint= / --checkpoint) or set MODEL.WEIGHTS"
            )
        self.device = _resolve_device(device, cfg.MODEL.DEVICE)
        cfg.MODEL.WEIGHTS = weights or ""
        cfg.MODEL.DEVICE = str(self.device)
        cfg.freeze()
        self.cfg = cfg
        self.checkpoint = cfg.MODEL.WEIGHTS
        self.model = build_eval_model(cfg)
        self.transforms = build_transforms_with_registry(cfg, is_train=False)
        self.batch_size = int(batch_size or cfg.TEST.IMS_PER_BATCH)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        self.flip = bool(cfg.TEST.FLIP.ENABLED) if flip is None else bool(flip)
        self.normalize = bool(normalize)
        workers = cfg.DATALOADER.NUM_WORKERS if num_workers is None else num_workers
        self.num_workers = max(int(workers), 0)

    @property
    def input_size(self):
        """tuple[int, int]: (H, W) the test transforms resize to (``INPUT.SIZE_TEST``)."""
        return tuple(int(s) for s in self.cfg.INPUT.SIZE_TEST)

    def preprocess(self, image):
        """One image through the test transforms.

        Args:
            image: a path or an in-memory image (see :func:`to_pil`).
        Returns:
            Tensor: [3, H, W] float32, 0-255, at ``INPUT.SIZE_TEST``.
        """
        return self.transforms(to_pil(image))

    @torch.no_grad()
    def forward(self, images):
        """Model features of a batch that is already preprocessed (no normalisation).

        Args:
            images (Tensor): [N, 3, H, W] float 0-255, as :meth:`preprocess` returns them.
        Returns:
            Tensor: [N, D] float32 on the CPU; the mean over the batch and its mirror when
            ``self.flip``.
        """
        images = images.to(self.device, torch.float32)
        out = self._run(images)
        if self.flip:
            out = (out + self._run(images.flip(dims=[3]))) / 2
        return out.float().cpu()

    def _run(self, images):
        out = self.model({"images": images})
        if not isinstance(out, torch.Tensor) or out.ndim != 2:
            raise TypeError(
                f"{self.cfg.MODEL.META_ARCHITECTURE} in eval mode must return a [N, D] Tensor, "
                f"got {type(out).__name__}"
            )
        return out

    def extract(self, inputs, as_tensor=False):
        """Features of images given as paths, folders, globs or in-memory images.

        Args:
            inputs: an item or a list of items, see :func:`collect_inputs`.
            as_tensor (bool): return a Tensor instead of a numpy array.
        Returns:
            Features: ``features`` [N, D] float32 in input order (L2-normalised rows when
            ``self.normalize``) and their ``names``.
        Raises:
            FileNotFoundError: a path that does not exist, or a folder / pattern without
                images.
            OSError: an unreadable image file (named).
        """
        items = collect_inputs(inputs)
        if not items:
            raise ValueError("no input images")
        loader = torch.utils.data.DataLoader(
            _ImageList(items, self.transforms),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=_stack,
        )
        tic = time.perf_counter()
        chunks = []
        for batch in loader:
            if isinstance(batch, _Unreadable):
                raise batch.error()
            chunks.append(self.forward(batch))
        feats = torch.cat(chunks, dim=0)
        if self.normalize:
            feats = F.normalize(feats, p=2, dim=1)
        logger.info(
            "extracted %d features of dimension %d in %.2f s",
            feats.shape[0],
            feats.shape[1],
            time.perf_counter() - tic,
        )
        return Features(feats if as_tensor else feats.numpy(), [n for n, _ in items])

    def __call__(self, inputs, as_tensor=False):
        """Features only: ``extract(inputs, as_tensor).features``."""
        return self.extract(inputs, as_tensor=as_tensor).features
