"""Export a reidzoo/fast-reid model to ONNX and check it against PyTorch with onnxruntime.

Usage::

    python -m reidzoo.export --config-file CFG_OR_NAME --output model.onnx [--checkpoint PTH] \\
        [--batch 2] [--opset 17] [--tol 1e-4] [KEY VALUE ...]

``--config-file`` takes a YAML file or a registered model name. The weights are
``--checkpoint PTH`` or, the same, ``MODEL.WEIGHTS PTH`` (as in ``reidzoo.extract`` and
``reidzoo.visualize``), loaded by :func:`reidzoo.checkpoint.load_for_inference`: weights-only,
without ImageNet weights (``MODEL.BACKBONE.PRETRAIN`` is not applied), the classifier sized
from the checkpoint; neither: random weights, with a warning.

The graph takes ``images``: float32 [N, 3, H, W] with pixel values 0-255 (RGB, the model's
own normalisation is inside the graph) at ``INPUT.SIZE_TEST``, and returns ``features``:
float32 [N, D]; N is a dynamic axis. The file is written only once it has passed the parity
check, through a temporary file and ``os.replace``: a failed export leaves an existing output
untouched. The last line printed is ``parity max_abs_diff=<x> rel=<y>``; the exit status is 1
when ``rel`` exceeds ``--tol``.

The TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``) is used: it needs no
package beyond ``onnx``, whereas the torch.export-based default of torch >= 2.9 needs
``onnxscript``.
"""

import argparse
import inspect
import logging
import os
import sys
import warnings

import torch

logger = logging.getLogger("reidzoo.export")  # not "__main__" under `python -m`

DEFAULT_OPSET = 17
DEFAULT_TOL = 1e-4
INPUT_NAME = "images"
OUTPUT_NAME = "features"


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


def _compare(session, model, batch, input_size, device):
    """Run onnxruntime and PyTorch on the same images.

    Returns:
        tuple[float, float, tuple]: max abs difference, max abs PyTorch output, output shape.
    """
    import numpy as np

    images = example_images(batch, input_size)
    with torch.no_grad():
        ref = model(images.to(device))
    if not isinstance(ref, torch.Tensor):
        raise TypeError(f"the model's eval forward must return a Tensor, got {type(ref).__name__}")
    ref = ref.detach().float().cpu().numpy()
    (out,) = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})
    if out.shape != ref.shape:
        raise RuntimeError(
            f"onnxruntime output shape {out.shape} != PyTorch {ref.shape} at batch {batch}"
        )
    diff = float(np.max(np.abs(out.astype(np.float64) - ref.astype(np.float64))))
    return diff, float(np.max(np.abs(ref))), tuple(out.shape)


def export_onnx(model, path, input_size, batch=2, opset=DEFAULT_OPSET, tol=DEFAULT_TOL):
    """Export ``model`` to ONNX at ``path`` and check it against PyTorch with onnxruntime.

    The graph is exported with example batch ``batch``, then onnxruntime (CPU) and PyTorch run
    on the same seeded images at ``batch`` and at a second batch size (1, or 3 when ``batch``
    is 1) to check the dynamic axis. ``path`` is replaced only after the checks pass; on any
    failure an existing file is left as it was and no temporary file remains.

    Args:
        model (nn.Module): forward takes images [N, 3, H, W] (float, 0-255) and returns
            features [N, D]. It is put in eval mode.
        path (str): output ``.onnx`` file.
        input_size (Sequence[int]): (H, W), usually ``cfg.INPUT.SIZE_TEST``.
        batch (int): example batch size for the export and the main check.
        opset (int): ONNX opset version.
        tol (float | None): largest accepted ``rel``; None skips the test (the file is written
            whatever the numbers).
    Returns:
        dict: ``max_abs_diff`` (float, the largest over both batch sizes), ``rel`` (float,
        ``max_abs_diff`` / max abs PyTorch output), ``batches`` (list[int]), ``output_shape``
        (list[int], [batch, D]), ``opset`` (int).
    Raises:
        ParityError: ``rel > tol`` (``.result`` holds the dict above).
    """
    import onnx
    import onnxruntime as ort

    from reidzoo.checkpoint import atomic_path

    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    model.eval()
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")

    path = os.fspath(path)
    with atomic_path(path) as tmp:  # replaced only if every check below passes
        with torch.no_grad():
            _torch_onnx_export(model, example_images(batch, input_size).to(device), tmp, opset)
        onnx.checker.check_model(tmp)
        session = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
        second = 3 if batch == 1 else 1
        worst, scale, shape = 0.0, 0.0, None
        for b in (batch, second):
            diff, ref_max, out_shape = _compare(session, model, b, input_size, device)
            logger.info("batch %d: output %s, max |diff| %.3g", b, out_shape, diff)
            worst, scale = max(worst, diff), max(scale, ref_max)
            shape = shape or out_shape
        del session
        rel = worst / scale if scale > 0 else (0.0 if worst == 0 else float("inf"))
        result = {
            "max_abs_diff": worst,
            "rel": rel,
            "batches": [batch, second],
            "output_shape": list(shape),
            "opset": opset,
        }
        if tol is not None and not rel <= tol:
            raise ParityError(
                f"ONNX graph does not match PyTorch: rel {rel:.3g} > tol {tol:g} "
                f"(max abs diff {worst:.3g}); '{path}' was not written",
                result,
            )
    logger.info("wrote %s (input %s [N, 3, %d, %d])", path, INPUT_NAME, *input_size)
    return result


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
        description="Export a model to ONNX (dynamic batch) and check it with onnxruntime.",
    )
    p.add_argument(
        "--config-file", default="", metavar="FILE|NAME", help="config YAML or model name"
    )
    p.add_argument("--output", required=True, metavar="OUT.onnx", help="ONNX file to write")
    p.add_argument("--checkpoint", default=None, metavar="PTH", help="weights (MODEL.WEIGHTS)")
    p.add_argument("--batch", type=int, default=2, help="example batch size (default 2)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset version")
    p.add_argument(
        "--tol", type=float, default=DEFAULT_TOL, help="largest accepted relative difference"
    )
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return p


def main(argv=None):
    """Command-line entry point.

    Args:
        argv (list[str] | None): arguments without the program name; None reads ``sys.argv``.
    Returns:
        int: 0 when the graph was written and matches PyTorch, 1 when the parity check failed.
    """
    from reidzoo.config import setup_cfg
    from reidzoo.inference import checkpoint_opts
    from reidzoo.modeling.build import build_eval_model

    args = _parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    opts = checkpoint_opts(args.checkpoint, args.opts) + ["MODEL.DEVICE", "cpu"]
    cfg = setup_cfg(args.config_file, opts)
    model = build_eval_model(cfg)
    try:
        result = export_onnx(
            model,
            args.output,
            cfg.INPUT.SIZE_TEST,
            batch=args.batch,
            opset=args.opset,
            tol=args.tol,
        )
        status = 0
    except ParityError as e:
        logger.error("%s", e)
        result, status = e.result, 1
    sys.stderr.flush()
    print(format_parity(result), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
