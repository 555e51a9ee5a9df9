"""Export a reidzoo/fast-reid model to ONNX or OpenVINO and check it against PyTorch.

Usage::

    python -m reidzoo.export --config-file CFG_OR_NAME --output model.onnx [--checkpoint PTH] \\
        [--format onnx|openvino] [--input-format raw255|imagenet] [--output-norm none|l2] \\
        [--batch 2] [--opset 17] [--tol 1e-4] [KEY VALUE ...]
    python -m reidzoo.export --inspect model.onnx | NAME_openvino_model/

``--config-file`` takes a YAML file or a registered model name. The weights are
``--checkpoint PTH`` or, the same, ``MODEL.WEIGHTS PTH`` (as in ``reidzoo.extract`` and
``reidzoo.visualize``), loaded by :func:`reidzoo.checkpoint.load_for_inference`: weights-only,
without ImageNet weights (``MODEL.BACKBONE.PRETRAIN`` is not applied), the classifier sized
from the checkpoint; neither: random weights, with a warning.

The graph takes ``images``: float32 RGB [N, 3, H, W] at ``INPUT.SIZE_TEST`` (N is a dynamic
axis) and returns ``features``: float32 [N, D]. ``--input-format`` says what ``images`` holds:

* ``raw255`` (default): pixel values 0-255; the model's own normalisation
  (``MODEL.PIXEL_MEAN/STD``) is inside the graph, as in PyTorch and ``FeatureExtractor``.
* ``imagenet``: values 0-1 already normalised with the config's mean and std, i.e.
  ``(x / 255 - PIXEL_MEAN / 255) / (PIXEL_STD / 255)``: what torchvision-style pipelines and
  BoxMOT feed (BoxMOT hard-codes ImageNet's mean and std, fast-reid's defaults).

``--output-norm l2`` L2-normalises each feature row inside the graph (default ``none``: the
values the evaluator receives). Flip averaging (``TEST.FLIP.ENABLED``) is not in the graph.

The parity check feeds the graph seeded images in the chosen input format and compares its
output with the PyTorch model's on the same pixels (as 0-255 values, the model's own input),
at the example batch and a second batch size. The output is written only once it has passed,
through a temporary file (folder) and a rename: a failed export leaves an existing output
untouched. The last line printed is ``parity max_abs_diff=<x> rel=<y>``; the exit status is 1
when ``rel`` exceeds ``--tol``.

The contract travels with the file. An ONNX file carries it in ``metadata_props``
(:data:`METADATA_KEYS`: input format, channel order, value range, mean, std, input size,
feature dimension, L2 or not, ``TEST.METRIC``, config and checkpoint SHA-256, versions), and
a BoxMOT sidecar ``<file>.onnx.metadata.json`` is written beside it (``{"schema_version": 1,
"model_kwargs_schema_version": 1, "model_kwargs": {"img_size": [H, W]}, ...}``, the schema
BoxMOT 25's ``boxmot.reid.core.artifacts`` reads). ``--format openvino`` writes a folder (name
it ``<name>_openvino_model``, the suffix BoxMOT recognises) with ``model.xml`` / ``model.bin``
(the contract in the IR's ``rt_info`` under ``reidzoo``), the same sidecar as
``manifest.json`` (what BoxMOT reads for a folder) and as ``model.xml.metadata.json`` (for the
``.xml`` path); it needs the optional ``openvino`` package (``pip install reidzoo[openvino]``).
``--inspect`` prints an export's contract and sidecar back as JSON.

The TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``) is used: it needs no
package beyond ``onnx``, whereas the torch.export-based default of torch >= 2.9 needs
``onnxscript``.
"""

import argparse
import hashlib
import inspect
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings

import torch
import torch.nn.functional as F

logger = logging.getLogger("reidzoo.export")  # not "__main__" under `python -m`

DEFAULT_OPSET = 17
DEFAULT_TOL = 1e-4
INPUT_NAME = "images"
OUTPUT_NAME = "features"
FORMATS = ("onnx", "openvino")
INPUT_FORMATS = ("raw255", "imagenet")
OUTPUT_NORMS = ("none", "l2")
#: BoxMOT's sidecar schema (boxmot.reid.core.artifacts, BoxMOT 25.0).
SIDECAR_SUFFIX = ".metadata.json"
SIDECAR_SCHEMA_VERSION = 1
MODEL_KWARGS_SCHEMA_VERSION = 1
#: What BoxMOT reads inside an artifact folder, and the IR files of ``--format openvino``.
MANIFEST_NAME = "manifest.json"
OPENVINO_XML = "model.xml"
OPENVINO_BIN = "model.bin"
#: ``rt_info`` section of the OpenVINO IR that holds the contract.
RT_INFO_SECTION = "reidzoo"
#: ImageNet's mean and std in 0-1, what BoxMOT and torchvision-style pipelines normalise with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Keys of the contract in an export's metadata (all values are strings; lists are JSON).
#: The first group is written by :func:`contract_metadata`, the second by :func:`run_metadata`.
METADATA_KEYS = (
    "input_name", "output_name", "input_format", "layout", "channel_order", "value_range",
    "mean", "std", "normalized_by", "input_height", "input_width", "batch", "feature_dim",
    "l2_normalized", "flip_averaged",
    "metric", "meta_architecture", "config_file", "config_sha256", "checkpoint",
    "checkpoint_sha256", "reidzoo_version", "fastreid_version", "torch_version",
)  # fmt: skip


class ExportModel(torch.nn.Module):
    """The model with the export's input convention and output normalisation around it.

    Args:
        model (nn.Module): forward takes images [N, 3, H, W] (float 0-255) and returns [N, D].
        input_format (str): ``raw255`` (fed as is) or ``imagenet`` (0-1 values normalised with
            ``pixel_mean / 255`` and ``pixel_std / 255``; turned back into 0-255 pixels, which
            the model then normalises as in training).
        pixel_mean (Sequence[float]): ``MODEL.PIXEL_MEAN``, 0-255 units.
        pixel_std (Sequence[float]): ``MODEL.PIXEL_STD``, 0-255 units.
        l2_normalize (bool): L2-normalise each output row.
    """

    def __init__(self, model, input_format="raw255", pixel_mean=None, pixel_std=None,
                 l2_normalize=False):  # fmt: skip
        super().__init__()
        if input_format not in INPUT_FORMATS:
            raise ValueError(f"input_format must be one of {INPUT_FORMATS}, got {input_format!r}")
        self.model = model
        self.input_format = input_format
        self.l2_normalize = bool(l2_normalize)
        mean, std = _mean_std(input_format, pixel_mean, pixel_std)
        self.register_buffer("pixel_mean", mean.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", std.view(1, -1, 1, 1), persistent=False)

    def forward(self, images):
        """Features of images in the export's input format.

        Args:
            images (Tensor): [N, 3, H, W] float32 in ``input_format``.
        Returns:
            Tensor: [N, D].
        """
        if self.input_format == "imagenet":
            # x = (p - mean) / std with p in 0-255; the model normalises p itself, so undo it
            # here rather than editing the model (its graph stays the one PyTorch runs).
            images = images * self.pixel_std + self.pixel_mean
        out = self.model(images)
        if self.l2_normalize:
            out = F.normalize(out, p=2, dim=1)
        return out


def _mean_std(input_format, pixel_mean, pixel_std):
    """``MODEL.PIXEL_MEAN/STD`` as float32 tensors [3] (0-255 units); required for imagenet."""
    if pixel_mean is None or pixel_std is None:
        if input_format == "imagenet":
            raise ValueError(
                "input_format 'imagenet' needs pixel_mean and pixel_std (MODEL.PIXEL_MEAN/STD)"
            )
        return torch.zeros(3), torch.ones(3)
    mean = torch.tensor([float(v) for v in pixel_mean], dtype=torch.float32)
    std = torch.tensor([float(v) for v in pixel_std], dtype=torch.float32)
    if mean.numel() != 3 or std.numel() != 3 or not bool((std > 0).all()):
        raise ValueError(
            f"MODEL.PIXEL_MEAN/STD must be 3 values each with std > 0, got {list(pixel_mean)} "
            f"and {list(pixel_std)}"
        )
    return mean, std


def to_input_format(images, input_format="raw255", pixel_mean=None, pixel_std=None):
    """Turn 0-255 RGB images into what an export of ``input_format`` takes.

    Args:
        images (Tensor): [N, 3, H, W] float, 0-255.
        input_format (str): ``raw255`` (returned as is) or ``imagenet``.
        pixel_mean (Sequence[float] | None): ``MODEL.PIXEL_MEAN`` (0-255 units).
        pixel_std (Sequence[float] | None): ``MODEL.PIXEL_STD`` (0-255 units).
    Returns:
        Tensor: [N, 3, H, W] float32: ``images`` or ``(images / 255 - mean / 255) /
        (std / 255)``.
    """
    if input_format not in INPUT_FORMATS:
        raise ValueError(f"input_format must be one of {INPUT_FORMATS}, got {input_format!r}")
    images = images.float()
    if input_format == "raw255":
        return images
    mean, std = _mean_std(input_format, pixel_mean, pixel_std)
    mean, std = mean.view(1, -1, 1, 1) / 255.0, std.view(1, -1, 1, 1) / 255.0
    return (images / 255.0 - mean.to(images.device)) / std.to(images.device)


class ParityError(RuntimeError):
    """The exported graph's outputs differ from PyTorch's by more than the tolerance.

    Attributes:
        result (dict): the parity numbers (see :func:`export_onnx`).
    """

    def __init__(self, message, result):
        super().__init__(message)
        self.result = result


def _torch_onnx_export(model, images, path, opset):
    """Run torch's TorchScript-based ONNX exporter with a dynamic batch axis.

    Args:
        model (nn.Module): in eval mode.
        images (Tensor): example input [N, 3, H, W].
        path (str): file to write.
        opset (int): ONNX opset version.
    """
    kwargs = dict(
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        opset_version=opset,
        do_constant_folding=True,
    )
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message="The feature will be removed.*")
        torch.onnx.export(model, (images,), path, **kwargs)


def example_images(batch, input_size, seed=0):
    """A fixed, seeded batch of images.

    Args:
        batch (int): N.
        input_size (Sequence[int]): (H, W).
        seed (int): generator seed; the same seed gives the same images.
    Returns:
        Tensor: float32 [N, 3, H, W], uniform in [0, 255).
    """
    gen = torch.Generator().manual_seed(seed + batch)
    height, width = int(input_size[0]), int(input_size[1])
    return torch.rand(batch, 3, height, width, generator=gen) * 255.0


def _reference(model, images, device, l2_normalize):
    """PyTorch features of 0-255 ``images``: float64 numpy [N, D]."""
    import numpy as np

    with torch.no_grad():
        ref = model(images.to(device))
        if not isinstance(ref, torch.Tensor):
            raise TypeError(
                f"the model's eval forward must return a Tensor, got {type(ref).__name__}"
            )
        if l2_normalize:
            ref = F.normalize(ref.float(), p=2, dim=1)
    return np.asarray(ref.detach().float().cpu().numpy(), dtype=np.float64)


def _check_parity(run, model, device, spec, batch, tol, what, path):
    """Run an exported graph and PyTorch on the same seeded pixels at two batch sizes.

    Args:
        run (callable): ``run(images_numpy) -> features_numpy`` of the exported graph, fed in
            ``spec["input_format"]``.
        model (nn.Module): the PyTorch model (0-255 input).
        device (torch.device): the model's device.
        spec (dict): ``input_size``, ``input_format``, ``pixel_mean``, ``pixel_std``,
            ``l2_normalize``.
        batch (int): example batch size; the second one is 1 (3 when ``batch`` is 1).
        tol (float | None): largest accepted ``rel``; None accepts any.
        what (str): runtime name for messages ("onnxruntime", "OpenVINO").
        path (str): the output, for messages.
    Returns:
        dict: ``max_abs_diff``, ``rel``, ``batches``, ``output_shape``.
    Raises:
        ParityError: ``rel > tol``.
    """
    import numpy as np

    second = 3 if batch == 1 else 1
    worst, scale, shape = 0.0, 0.0, None
    for b in (batch, second):
        pixels = example_images(b, spec["input_size"])
        ref = _reference(model, pixels, device, spec["l2_normalize"])
        fed = to_input_format(pixels, spec["input_format"], spec["pixel_mean"], spec["pixel_std"])
        out = np.asarray(run(fed.numpy()))
        if out.shape != ref.shape:
            raise RuntimeError(
                f"{what} output shape {out.shape} != PyTorch {ref.shape} at batch {b}"
            )
        diff = float(np.max(np.abs(out.astype(np.float64) - ref)))
        logger.info("%s batch %d: output %s, max |diff| %.3g", what, b, tuple(out.shape), diff)
        worst, scale = max(worst, diff), max(scale, float(np.max(np.abs(ref))))
        shape = shape or tuple(out.shape)
    rel = worst / scale if scale > 0 else (0.0 if worst == 0 else float("inf"))
    result = {
        "max_abs_diff": worst,
        "rel": rel,
        "batches": [batch, second],
        "output_shape": list(shape),
    }
    if tol is not None and not rel <= tol:
        raise ParityError(
            f"{what} graph does not match PyTorch: rel {rel:.3g} > tol {tol:g} "
            f"(max abs diff {worst:.3g}); '{path}' was not written",
            result,
        )
    return result


def contract_metadata(spec, feature_dim):
    """The input/output contract of an export, as metadata strings.

    Args:
        spec (dict): ``input_size``, ``input_format``, ``pixel_mean``, ``pixel_std``,
            ``l2_normalize``.
        feature_dim (int): D.
    Returns:
        dict[str, str]: ``input_name``, ``output_name``, ``input_format``, ``layout`` (NCHW),
        ``channel_order`` (RGB), ``value_range`` ("0-255" or "0-1"), ``mean`` and ``std``
        (JSON lists in the units of ``value_range``), ``normalized_by`` ("graph": feed raw
        pixels; "caller": subtract ``mean`` and divide by ``std`` first), ``input_height``,
        ``input_width``, ``batch`` ("dynamic"), ``feature_dim``, ``l2_normalized`` and
        ``flip_averaged`` ("true"/"false").
    """
    fmt = spec["input_format"]
    mean, std = _mean_std(fmt, spec["pixel_mean"], spec["pixel_std"])
    unit = 255.0 if fmt == "imagenet" else 1.0
    height, width = (int(v) for v in spec["input_size"])
    return {
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "input_format": fmt,
        "layout": "NCHW",
        "channel_order": "RGB",
        "value_range": "0-1" if fmt == "imagenet" else "0-255",
        "mean": json.dumps([round(float(v) / unit, 8) for v in mean]),
        "std": json.dumps([round(float(v) / unit, 8) for v in std]),
        "normalized_by": "caller" if fmt == "imagenet" else "graph",
        "input_height": str(height),
        "input_width": str(width),
        "batch": "dynamic",
        "feature_dim": str(int(feature_dim)),
        "l2_normalized": "true" if spec["l2_normalize"] else "false",
        "flip_averaged": "false",
    }


def file_sha256(path):
    """SHA-256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _version(dist, module=None):
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return str(getattr(module, "__version__", "unknown"))


def run_metadata(cfg, config_file=""):
    """What the export was made from, as metadata strings.

    Args:
        cfg (CfgNode): the config the model was built with.
        config_file (str): the ``--config-file`` argument (file or model name).
    Returns:
        dict[str, str]: ``metric`` (``TEST.METRIC``), ``meta_architecture``, ``config_file``,
        ``config_sha256`` (SHA-256 of ``cfg.dump()`` with ``MODEL.WEIGHTS`` and
        ``MODEL.DEVICE`` blanked, so it names the model, not where its weights lie),
        ``checkpoint`` and ``checkpoint_sha256`` (of the file's bytes; both "" with random
        weights), ``reidzoo_version``, ``fastreid_version``, ``torch_version``.
    """
    import reidzoo

    blank = cfg.clone()
    blank.defrost()
    blank.MODEL.WEIGHTS = ""
    blank.MODEL.DEVICE = ""
    weights = str(cfg.MODEL.WEIGHTS or "")
    return {
        "metric": str(cfg.TEST.METRIC),
        "meta_architecture": str(cfg.MODEL.META_ARCHITECTURE),
        "config_file": os.fspath(config_file),
        "config_sha256": hashlib.sha256(blank.dump().encode("utf-8")).hexdigest(),
        "checkpoint": weights,
        "checkpoint_sha256": file_sha256(weights) if weights else "",
        "reidzoo_version": _version("reidzoo", reidzoo),
        "fastreid_version": _version("fastreid"),
        "torch_version": torch.__version__,
    }


def boxmot_sidecar(metadata, artifact_format, artifact_sha256=None):
    """BoxMOT's artifact metadata (``boxmot.reid.core.artifacts``, schema version 1).

    BoxMOT reads ``model_kwargs.img_size`` for the crop size (its OpenCV-DNN and OpenVINO
    paths have no other source and would feed 256x128). It always feeds RGB 0-1 crops
    normalised with ImageNet's mean/std, whatever the sidecar says; the full contract is kept
    under ``reidzoo`` for people and tools.

    Args:
        metadata (dict[str, str]): the export's metadata (:data:`METADATA_KEYS`).
        artifact_format (str): "onnx" or "openvino".
        artifact_sha256 (str | None): SHA-256 of the ONNX file.
    Returns:
        dict: JSON-ready.
    """
    out = {
        "schema_version": SIDECAR_SCHEMA_VERSION,
        "model_kwargs_schema_version": MODEL_KWARGS_SCHEMA_VERSION,
        "model_kwargs": {"img_size": [int(metadata["input_height"]), int(metadata["input_width"])]},
        "preprocess": "resize",
        "format": artifact_format,
        "input_name": INPUT_NAME,
        "output_names": [OUTPUT_NAME],
        "dynamic_batch": True,
        "precision": "float32",
        "reidzoo": dict(metadata),
    }
    if artifact_sha256:
        out["artifact_sha256"] = artifact_sha256
    return out


def sidecar_path(path):
    """``<file>.metadata.json`` beside an ONNX (or ``.xml``) file, as BoxMOT names it."""
    return os.fspath(path) + SIDECAR_SUFFIX


def _write_json(path, obj):
    from reidzoo.checkpoint import atomic_write

    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n"), "w")


def _prepare(model, input_size, input_format, pixel_mean, pixel_std, l2_normalize, batch):
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if input_format == "imagenet" and pixel_mean is not None and pixel_std is not None:
        mean01 = [float(v) / 255.0 for v in pixel_mean]
        std01 = [float(v) / 255.0 for v in pixel_std]
        close = all(abs(a - b) < 1e-4 for a, b in zip(mean01 + std01, IMAGENET_MEAN + IMAGENET_STD))
        if not close:
            logger.warning(
                "MODEL.PIXEL_MEAN/STD %s / %s are not ImageNet's: BoxMOT always normalises with "
                "ImageNet's mean %s and std %s, so it will not feed this export correctly",
                list(pixel_mean), list(pixel_std), list(IMAGENET_MEAN), list(IMAGENET_STD),
            )  # fmt: skip
    model.eval()
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    spec = {
        "input_size": [int(v) for v in input_size],
        "input_format": input_format,
        "pixel_mean": pixel_mean,
        "pixel_std": pixel_std,
        "l2_normalize": bool(l2_normalize),
    }
    graph = ExportModel(model, input_format, pixel_mean, pixel_std, l2_normalize).to(device).eval()
    example = to_input_format(
        example_images(batch, input_size), input_format, pixel_mean, pixel_std
    )
    feature_dim = _reference(model, example_images(1, input_size), device, False).shape[1]
    return spec, graph, example.to(device), device, feature_dim


def export_onnx(model, path, input_size, batch=2, opset=DEFAULT_OPSET, tol=DEFAULT_TOL,
                input_format="raw255", pixel_mean=None, pixel_std=None, l2_normalize=False,
                metadata=None, sidecar=True):  # fmt: skip
    """Export ``model`` to ONNX at ``path`` and check it against PyTorch with onnxruntime.

    The graph (:class:`ExportModel`: the model with the input convention and optional L2
    normalisation) is exported with example batch ``batch``; then onnxruntime (CPU) runs it on
    seeded images in ``input_format`` and PyTorch runs ``model`` on the same pixels as 0-255
    values, at ``batch`` and at a second batch size (1, or 3 when ``batch`` is 1) to check the
    dynamic axis. The contract (:func:`contract_metadata`, plus ``metadata``) is written in
    the file's ``metadata_props``. ``path`` is replaced only after the checks pass; on any
    failure an existing file is left as it was and no temporary file remains. With
    ``sidecar``, BoxMOT's ``<path>.metadata.json`` (:func:`boxmot_sidecar`) is written after.

    Args:
        model (nn.Module): forward takes images [N, 3, H, W] (float, 0-255) and returns
            features [N, D]. It is put in eval mode.
        path (str): output ``.onnx`` file.
        input_size (Sequence[int]): (H, W), usually ``cfg.INPUT.SIZE_TEST``.
        batch (int): example batch size for the export and the main check.
        opset (int): ONNX opset version.
        tol (float | None): largest accepted ``rel``; None skips the test (the file is written
            whatever the numbers).
        input_format (str): ``raw255`` or ``imagenet`` (see the module docstring).
        pixel_mean (Sequence[float] | None): ``MODEL.PIXEL_MEAN`` (0-255); needed for
            ``imagenet``, recorded in the metadata.
        pixel_std (Sequence[float] | None): ``MODEL.PIXEL_STD`` (0-255).
        l2_normalize (bool): L2-normalise each output row in the graph.
        metadata (dict[str, str] | None): more ``metadata_props`` (e.g. :func:`run_metadata`).
        sidecar (bool): write BoxMOT's sidecar beside the file.
    Returns:
        dict: ``max_abs_diff`` (float, the largest over both batch sizes), ``rel`` (float,
        ``max_abs_diff`` / max abs PyTorch output), ``batches`` (list[int]), ``output_shape``
        (list[int], [batch, D]), ``opset`` (int), ``metadata`` (dict[str, str]) and
        ``sidecar`` (its path, or None).
    Raises:
        ParityError: ``rel > tol`` (``.result`` holds the dict above).
    """
    import onnx
    import onnxruntime as ort

    from reidzoo.checkpoint import atomic_path

    spec, graph, example, device, dim = _prepare(
        model, input_size, input_format, pixel_mean, pixel_std, l2_normalize, batch
    )
    props = {**contract_metadata(spec, dim), **{k: str(v) for k, v in (metadata or {}).items()}}
    path = os.fspath(path)
    with atomic_path(path) as tmp:  # replaced only if every check below passes
        with torch.no_grad():
            _torch_onnx_export(graph, example, tmp, opset)
        proto = onnx.load(tmp)
        del proto.metadata_props[:]
        for key, value in props.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(proto, tmp)
        onnx.checker.check_model(tmp)
        session = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])

        def run(images, session=session):
            return session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]

        result = _check_parity(run, model, device, spec, batch, tol, "onnxruntime", path)
        del session, run  # release the file before it is renamed
        digest = file_sha256(tmp)
    result.update(opset=opset, metadata=props, sidecar=None)
    if sidecar:
        result["sidecar"] = sidecar_path(path)
        _write_json(result["sidecar"], boxmot_sidecar(props, "onnx", digest))
    logger.info("wrote %s (input %s [N, 3, %d, %d], %s)", path, INPUT_NAME, *input_size,
                input_format)  # fmt: skip
    return result


def _default_dir_mode():
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def _check_replaceable(path):
    """Raise FileExistsError when ``path`` exists and is not an OpenVINO export folder."""
    if os.path.lexists(path) and not (
        os.path.isdir(path) and os.path.isfile(os.path.join(path, OPENVINO_XML))
    ):
        raise FileExistsError(
            f"'{path}' exists and is not an OpenVINO export folder (no {OPENVINO_XML}); "
            "choose another --output or remove it"
        )


def _install_folder(tmp, path):
    """Rename the finished folder ``tmp`` to ``path``, replacing an earlier OpenVINO export.

    Raises:
        FileExistsError: ``path`` exists and is not a folder holding an OpenVINO export
            (``model.xml``), which is never replaced.
    """
    old = None
    if os.path.lexists(path):
        _check_replaceable(path)
        old = tempfile.mkdtemp(prefix=".tmp-old-", dir=os.path.dirname(tmp))
        os.rmdir(old)
        os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        if old is not None:
            os.rename(old, path)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_openvino(model, path, input_size, batch=2, opset=DEFAULT_OPSET, tol=DEFAULT_TOL,
                    input_format="raw255", pixel_mean=None, pixel_std=None, l2_normalize=False,
                    metadata=None):  # fmt: skip
    """Export ``model`` as an OpenVINO IR folder and check it against PyTorch with OpenVINO.

    The graph of :func:`export_onnx` is converted with ``openvino.convert_model`` (dynamic
    batch kept, fp32 weights) and saved as ``path/model.xml`` + ``model.bin``, the contract in
    the IR's ``rt_info`` section ``reidzoo``. OpenVINO's CPU plugin (fp32 inference, accuracy
    mode, as BoxMOT compiles it) and PyTorch then run the same pixels as in
    :func:`export_onnx`. BoxMOT's sidecar is written inside as ``manifest.json`` (read when
    the folder is given) and ``model.xml.metadata.json`` (read when ``model.xml`` is given).
    Everything is built in a temporary folder beside ``path`` and renamed into place only
    after the check passes; an earlier export at ``path`` is replaced, anything else refused.

    Args:
        model, input_size, batch, opset, tol, input_format, pixel_mean, pixel_std,
            l2_normalize, metadata: as :func:`export_onnx`.
        path (str): the output folder (BoxMOT recognises ``*_openvino_model``).
    Returns:
        dict: as :func:`export_onnx`, plus ``openvino`` (its version); ``sidecar`` is the
        manifest's path.
    Raises:
        ParityError: ``rel > tol``.
        ImportError: openvino is not installed (``pip install reidzoo[openvino]``).
    """
    try:
        import openvino as ov
    except ImportError as e:
        raise ImportError(
            "--format openvino needs the optional openvino package: "
            "pip install 'reidzoo[openvino]' (or pip install openvino)"
        ) from e

    spec, graph, example, device, dim = _prepare(
        model, input_size, input_format, pixel_mean, pixel_std, l2_normalize, batch
    )
    props = {**contract_metadata(spec, dim), **{k: str(v) for k, v in (metadata or {}).items()}}
    path = os.fspath(path).rstrip("/\\") or os.fspath(path)
    _check_replaceable(path)  # before the work; checked again when the folder is renamed
    if not os.path.basename(path).endswith("_openvino_model"):
        logger.warning(
            "BoxMOT recognises an OpenVINO folder by the suffix '_openvino_model'; "
            "give it %s/%s instead, or name the folder <name>_openvino_model",
            path, OPENVINO_XML,
        )  # fmt: skip
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", suffix="_openvino_model", dir=parent)
    try:
        onnx_tmp = os.path.join(tmp, "graph.onnx")
        with torch.no_grad():
            _torch_onnx_export(graph, example, onnx_tmp, opset)
        ov_model = ov.convert_model(onnx_tmp)
        for key, value in props.items():
            ov_model.set_rt_info(value, [RT_INFO_SECTION, key])
        xml = os.path.join(tmp, OPENVINO_XML)
        ov.save_model(ov_model, xml, compress_to_fp16=False)
        os.remove(onnx_tmp)
        compiled = ov.Core().compile_model(
            xml, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "EXECUTION_MODE_HINT": "ACCURACY"}
        )
        output = compiled.output(0)

        def run(images, compiled=compiled):
            return compiled([images])[output]

        result = _check_parity(run, model, device, spec, batch, tol, "OpenVINO", path)
        del compiled, run
        manifest = boxmot_sidecar(props, "openvino")
        for name in (MANIFEST_NAME, OPENVINO_XML + SIDECAR_SUFFIX):
            with open(os.path.join(tmp, name), "w") as f:
                f.write(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        from reidzoo.checkpoint import default_file_mode

        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), default_file_mode())
        os.chmod(tmp, _default_dir_mode())  # mkdtemp makes 0700
        _install_folder(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result.update(
        opset=opset,
        metadata=props,
        sidecar=os.path.join(path, MANIFEST_NAME),
        openvino=str(ov.__version__),
    )
    logger.info("wrote %s/%s (input %s [N, 3, %d, %d], %s)", path, OPENVINO_XML, INPUT_NAME,
                *input_size, input_format)  # fmt: skip
    return result


def _read_json(path):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _openvino_rt_info(xml):
    """The ``rt_info/reidzoo`` entries of an IR ``.xml``, read without openvino."""
    import xml.etree.ElementTree as ET

    root = ET.parse(xml).getroot()
    section = root.find(f"rt_info/{RT_INFO_SECTION}")
    if section is None:
        return {}
    return {child.tag: child.get("value", "") for child in section}


def inspect_export(path):
    """The contract an export carries, read back.

    Args:
        path (str): an ``.onnx`` file, an OpenVINO folder or its ``.xml``.
    Returns:
        dict: ``format`` ("onnx" / "openvino"), ``file``, ``metadata`` (dict[str, str]: the
        ONNX ``metadata_props`` or the IR's ``rt_info`` section ``reidzoo``), ``sidecar`` (its
        path or None) and ``sidecar_content`` (the parsed JSON or None); for ONNX also
        ``inputs`` and ``outputs`` (name and shape, a dynamic axis by its name).
    Raises:
        FileNotFoundError: ``path`` does not exist, or a folder has no ``model.xml``.
        ValueError: neither an ONNX file nor an OpenVINO IR.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such export: '{path}'")
    if os.path.isdir(path) or path.endswith(".xml"):
        xml = os.path.join(path, OPENVINO_XML) if os.path.isdir(path) else path
        if not os.path.isfile(xml):
            raise FileNotFoundError(f"'{path}' holds no {OPENVINO_XML} (not an OpenVINO export)")
        side = os.path.join(path, MANIFEST_NAME) if os.path.isdir(path) else sidecar_path(xml)
        return {
            "format": "openvino",
            "file": xml,
            "metadata": _openvino_rt_info(xml),
            "sidecar": side if os.path.isfile(side) else None,
            "sidecar_content": _read_json(side),
        }
    if not path.endswith(".onnx"):
        raise ValueError(f"'{path}': expected an .onnx file, an OpenVINO folder or its .xml")
    import onnx

    proto = onnx.load(path, load_external_data=False)

    def shape(value):
        dims = value.type.tensor_type.shape.dim
        return [d.dim_param if d.dim_param else int(d.dim_value) for d in dims]

    side = sidecar_path(path)
    return {
        "format": "onnx",
        "file": path,
        "inputs": [{"name": i.name, "shape": shape(i)} for i in proto.graph.input],
        "outputs": [{"name": o.name, "shape": shape(o)} for o in proto.graph.output],
        "metadata": {p.key: p.value for p in proto.metadata_props},
        "sidecar": side if os.path.isfile(side) else None,
        "sidecar_content": _read_json(side),
    }


def format_parity(result):
    """The parity line: ``parity max_abs_diff=<x> rel=<y>``.

    Args:
        result (dict): from :func:`export_onnx`.
    Returns:
        str
    """
    return f"parity max_abs_diff={result['max_abs_diff']:.6g} rel={result['rel']:.6g}"


def _parser():
    p = argparse.ArgumentParser(
        prog="python -m reidzoo.export",
        description="Export a model to ONNX or OpenVINO (dynamic batch) and check it against "
        "PyTorch; or print an export's metadata (--inspect).",
    )
    p.add_argument(
        "--config-file", default="", metavar="FILE|NAME", help="config YAML or model name"
    )
    p.add_argument(
        "--output", default="", metavar="OUT",
        help="ONNX file, or folder for --format openvino (e.g. NAME_openvino_model)",
    )  # fmt: skip
    p.add_argument("--checkpoint", default=None, metavar="PTH", help="weights (MODEL.WEIGHTS)")
    p.add_argument("--format", choices=FORMATS, default="onnx", help="output (default onnx)")
    p.add_argument(
        "--input-format", choices=INPUT_FORMATS, default="raw255",
        help="raw255 (default): RGB 0-255, normalised inside the graph; imagenet: RGB 0-1 "
        "normalised with MODEL.PIXEL_MEAN/STD / 255 by the caller (BoxMOT, torchvision)",
    )  # fmt: skip
    p.add_argument(
        "--output-norm", choices=OUTPUT_NORMS, default="none",
        help="l2: L2-normalise the features in the graph (default none)",
    )  # fmt: skip
    p.add_argument("--batch", type=int, default=2, help="example batch size (default 2)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset version")
    p.add_argument(
        "--tol", type=float, default=DEFAULT_TOL, help="largest accepted relative difference"
    )
    p.add_argument(
        "--inspect", default=None, metavar="EXPORT",
        help="print the metadata of an .onnx file or OpenVINO folder as JSON, export nothing",
    )  # fmt: skip
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return p


def main(argv=None):
    """Command-line entry point.

    Args:
        argv (list[str] | None): arguments without the program name; None reads ``sys.argv``.
    Returns:
        int: 0 when the export was written and matches PyTorch (or ``--inspect`` printed its
        metadata), 1 when the parity check failed, the export to inspect cannot be read,
        openvino is missing for ``--format openvino`` or ``--output`` is a folder that is not
        an earlier OpenVINO export (each an ``error:`` line).
    """
    from reidzoo.config import setup_cfg
    from reidzoo.inference import checkpoint_opts
    from reidzoo.modeling.build import build_eval_model

    parser = _parser()
    args = parser.parse_args(argv)
    if args.inspect:
        try:
            info = inspect_export(args.inspect)
        except (OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 1
        print(json.dumps(info, indent=2, sort_keys=True), flush=True)
        return 0
    if not args.output:
        parser.error("--output is required (or --inspect EXPORT)")
    if args.format == "openvino":
        import importlib.util

        if importlib.util.find_spec("openvino") is None:  # say so before building the model
            print(
                "error: --format openvino needs the optional openvino package: "
                "pip install 'reidzoo[openvino]' (or pip install openvino)",
                file=sys.stderr,
                flush=True,
            )
            return 1
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    opts = checkpoint_opts(args.checkpoint, args.opts) + ["MODEL.DEVICE", "cpu"]
    cfg = setup_cfg(args.config_file, opts)
    model = build_eval_model(cfg)
    exporter = export_openvino if args.format == "openvino" else export_onnx
    if args.input_format == "raw255":
        logger.info(
            "input format raw255 (RGB 0-255): BoxMOT and torchvision-style pipelines feed "
            "ImageNet-normalised 0-1 input; export for them with --input-format imagenet"
        )
    try:
        result = exporter(
            model,
            args.output,
            cfg.INPUT.SIZE_TEST,
            batch=args.batch,
            opset=args.opset,
            tol=args.tol,
            input_format=args.input_format,
            pixel_mean=list(cfg.MODEL.PIXEL_MEAN),
            pixel_std=list(cfg.MODEL.PIXEL_STD),
            l2_normalize=args.output_norm == "l2",
            metadata=run_metadata(cfg, args.config_file),
        )
        status = 0
    except ParityError as e:
        logger.error("%s", e)
        result, status = e.result, 1
    except FileExistsError as e:  # an --output folder that is not an earlier export
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    sys.stderr.flush()
    print(format_parity(result), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
