"""How hard each stage-II loss pulls on PFE's side branches at initialisation.

For every input size it builds the stage-II model of a config (random initialisation, or the
main branch of ``--checkpoint``), runs one batch and prints, for the four 1x1 convolutions
T_2..T_5 = Conv1x1(X_s) of the side branches (``heads.mfa.reduce``), the gradient norm of

* the cascade loss, sum over s of L_s (Eq. 7),
* w_ro * L_ro (Eq. 8) with L_ro summed over A_2's pixels (the L1 norm, ``RO_REDUCTION sum``),
* w_ro * L_ro averaged over the pixels (``RO_REDUCTION mean``),

and the ratio of each region-overlap gradient to the cascade one. The last line is one JSON
record. Used for the README section "Region-overlap loss: sum or mean"::

    python -m reidzoo.projects.pfe.ro_gradient \\
        --config-file projects/PFE/configs/PFE_R50_Market1501_stage2.yml \\
        --sizes 384x192 256x128 --batch 16 --num-classes 751 [KEY VALUE ...]
"""

import argparse
import json
import sys

import torch

from .losses import region_overlap_loss


def _size(text):
    h, w = text.lower().split("x")
    return int(h), int(w)


def measure(cfg, size, batch, num_instance, seed, checkpoint=None):
    """Gradient norms of the stage-II losses on the side branches' 1x1 convolutions.

    Args:
        cfg (CfgNode): a PFE stage-II config (not modified).
        size (tuple[int, int]): input H, W.
        batch (int): images per batch, ``batch // num_instance`` identities.
        num_instance (int): images per identity.
        seed (int): seeds the weights and the random images (uniform 0-255).
        checkpoint (str | None): a stage-I or stage-II checkpoint for the main branch.
    Returns:
        dict: ``size``, ``pixels`` (H_2 * W_2), ``losses`` (cascade, ro_sum, ro_mean: the
        weighted loss values) and, per loss, the gradient norm on T_2..T_5's weights.
    """
    from fastreid.modeling.meta_arch import build_model

    from reidzoo.checkpoint import load_weights

    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.PRETRAIN = False
    cfg.INPUT.SIZE_TRAIN = list(size)
    torch.manual_seed(seed)
    model = build_model(cfg)
    if checkpoint:
        load_weights(model, checkpoint, strict=False)
    model.train()
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, *size, generator=gen) * 255.0
    targets = torch.arange(batch) // num_instance
    out = model.features(model.preprocess_image(images))
    losses = model.losses(out, targets)
    w_ro = float(cfg.MODEL.PFE.RO_WEIGHT)
    terms = {
        "cascade": sum(v for k, v in losses.items() if k.startswith("loss_cascade")),
        "ro_sum": w_ro * region_overlap_loss(out["acts"], "sum"),
        "ro_mean": w_ro * region_overlap_loss(out["acts"], "mean"),
    }
    weights = [conv.weight for conv in model.heads.mfa.reduce]
    record = {
        "size": list(size),
        "pixels": int(out["acts"][0].shape[-2] * out["acts"][0].shape[-1]),
        "losses": {k: float(v.detach()) for k, v in terms.items()},
    }
    for name, loss in terms.items():
        grads = torch.autograd.grad(loss, weights, retain_graph=True, allow_unused=True)
        record[name] = [0.0 if g is None else float(g.norm()) for g in grads]
    return record


def main(argv=None):
    """Print the table and the JSON record; returns 0."""
    from reidzoo.config import setup_cfg

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config-file", default="projects/PFE/configs/PFE_R50_Market1501_stage2.yml"
    )
    parser.add_argument("--sizes", nargs="+", type=_size, default=[(384, 192), (256, 128)])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--num-instance", type=int, default=4)
    parser.add_argument("--num-classes", type=int, default=751)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", default=None, help="main branch weights (default: random)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    opts = ["MODEL.WEIGHTS", "", "MODEL.HEADS.NUM_CLASSES", str(args.num_classes), *args.opts]
    cfg = setup_cfg(args.config_file, opts, freeze=False)
    if int(cfg.MODEL.PFE.STAGE) != 2:
        raise ValueError(f"{args.config_file}: MODEL.PFE.STAGE must be 2 (the side branches)")
    records = []
    print("size      H2*W2  loss         |grad| on T_2..T_5 weights           ro / cascade")
    for size in args.sizes:
        rec = measure(cfg, size, args.batch, args.num_instance, args.seed, args.checkpoint)
        records.append(rec)
        for name in ("cascade", "ro_sum", "ro_mean"):
            norms = " ".join(f"{g:9.3g}" for g in rec[name])
            ratio = ""
            if name != "cascade":
                ratio = " ".join(
                    f"{r / c:7.3g}" if c > 0 else "    inf"
                    for r, c in zip(rec[name], rec["cascade"])
                )
            print(f"{size[0]}x{size[1]:<5} {rec['pixels']:6d}  {name:<8} {norms}   {ratio}")
    print(json.dumps({"config": args.config_file, "batch": args.batch, "records": records}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
