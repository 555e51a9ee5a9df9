"""Parameter and multiply-add counts of a model at its test input size.

Usage::

    python -m reidzoo.complexity --config-file CFG [KEY VALUE ...]

Prints a per-module breakdown, then as its last line one JSON object
``{"params": <int>, "macs": <int>, "input": [H, W]}`` for the eval-mode model at
``INPUT.SIZE_TEST`` with batch 1.

* ``params`` counts every parameter of the model, including those only used in training
  (e.g. the classifier weight [NUM_CLASSES, D] of fastreid's ``EmbeddingHead``); buffers such as
  BatchNorm running statistics are not counted. The breakdown shows the heads separately.
* ``macs`` is fvcore's ``FlopCountAnalysis`` total, which counts one multiply-add as one flop
  (so it is MACs, not FLOPs = 2 x MACs). It includes convolutions, linear layers, matmuls and
  normalisation layers (fvcore's handles). Operators fvcore has no counter for are not counted:
  they are listed in a warning, never dropped silently.
"""

import argparse
import json
import logging
import sys

import torch

logger = logging.getLogger("reidzoo.complexity")  # not "__main__" under `python -m`


def count_params(module):
    """Number of parameters of ``module`` (shared parameters counted once).

    Args:
        module (nn.Module)
    Returns:
        int
    """
    return sum(p.numel() for p in module.parameters())


def count_complexity(model, input_size):
    """Count the parameters and multiply-adds of ``model`` for one image.

    Args:
        model (nn.Module): forward takes images [1, 3, H, W] (float, 0-255) and returns a
            Tensor (features [1, D] for a reid model, a feature map for a backbone). It is put
            in eval mode.
        input_size (Sequence[int]): (H, W).
    Returns:
        dict: ``params`` (int, all parameters), ``macs`` (int, fvcore total for batch 1),
        ``input`` ([H, W]), ``by_operator`` (dict[str, int] MACs per fvcore operator type),
        ``children`` (dict[str, dict] ``{"params": int, "macs": int}`` per top-level child
        module), ``unsupported_ops`` (dict[str, int] operator -> number of uncounted calls).
    """
    from fvcore.nn import FlopCountAnalysis

    model.eval()
    height, width = int(input_size[0]), int(input_size[1])
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    images = (torch.rand(1, 3, height, width, generator=gen) * 255.0).to(device)

    analysis = FlopCountAnalysis(model, (images,))
    # The counters below are filled whatever these switches say; the uncounted operators are
    # reported once by us, with their names and counts, instead of fvcore's one line each.
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    with torch.no_grad():
        total = int(analysis.total())
    unsupported = dict(sorted(analysis.unsupported_ops().items()))
    if unsupported:
        logger.warning(
            "fvcore cannot count %d operator type(s); their cost is NOT in macs: %s",
            len(unsupported),
            ", ".join(f"{op} (x{n})" for op, n in unsupported.items()),
        )
    uncalled = sorted(analysis.uncalled_modules())
    if uncalled:
        logger.info(
            "%d module(s) are not called in eval mode (counted in params, not macs): %s",
            len(uncalled),
            ", ".join(uncalled[:20]) + (" ..." if len(uncalled) > 20 else ""),
        )
    by_module = analysis.by_module()
    children = {
        name: {"params": count_params(child), "macs": int(by_module.get(name, 0))}
        for name, child in model.named_children()
    }
    return {
        "params": count_params(model),
        "macs": total,
        "input": [height, width],
        "by_operator": {k: int(v) for k, v in analysis.by_operator().items()},
        "children": children,
        "unsupported_ops": unsupported,
    }


def format_breakdown(result):
    """Human-readable lines for :func:`count_complexity`'s result.

    Args:
        result (dict)
    Returns:
        list[str]
    """
    h, w = result["input"]
    lines = [f"complexity at input 1x3x{h}x{w} (eval mode; macs = multiply-adds, fvcore)"]
    width = max([len(n) for n in result["children"]] + [len("total")])
    lines.append(f"  {'module':<{width}}  {'params':>14}  {'GMACs':>10}")
    for name, c in result["children"].items():
        lines.append(f"  {name:<{width}}  {c['params']:>14,}  {c['macs'] / 1e9:>10.4f}")
    lines.append(f"  {'total':<{width}}  {result['params']:>14,}  {result['macs'] / 1e9:>10.4f}")
    if result["by_operator"]:
        ops = ", ".join(f"{k} {v / 1e9:.4f}G" for k, v in sorted(result["by_operator"].items()))
        lines.append(f"  by operator: {ops}")
    if result["unsupported_ops"]:
        ops = ", ".join(f"{k} x{v}" for k, v in result["unsupported_ops"].items())
        lines.append(f"  not counted (no fvcore handle): {ops}")
    lines.append("  params include every parameter, also those used only in training (classifier)")
    return lines


def _parser():
    p = argparse.ArgumentParser(
        prog="python -m reidzoo.complexity",
        description="Count parameters and multiply-adds of the eval model at INPUT.SIZE_TEST.",
    )
    p.add_argument("--config-file", default="", metavar="FILE", help="config YAML")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return p


def main(argv=None):
    """Command-line entry point.

    Args:
        argv (list[str] | None): arguments without the program name; None reads ``sys.argv``.
    Returns:
        int: 0.
    """
    from reidzoo.config import setup_cfg
    from reidzoo.modeling.build import build_eval_model

    args = _parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Counts do not depend on weight values: no checkpoint, no ImageNet initialisation.
    overrides = ["MODEL.DEVICE", "cpu", "MODEL.BACKBONE.PRETRAIN", "False"]
    cfg = setup_cfg(args.config_file, list(args.opts) + overrides)
    model = build_eval_model(cfg, load_weights=False)
    result = count_complexity(model, cfg.INPUT.SIZE_TEST)
    for line in format_breakdown(result):
        print(line)
    sys.stderr.flush()
    summary = {"params": result["params"], "macs": result["macs"], "input": result["input"]}
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
