"""Stage-by-stage access to fast-reid's ResNet, with modules inserted after any stage.

Papers need the outputs of layer1..layer4 (PAN, PFE, PMM), modules inserted between stages
(IANet, PFE) or copies of late stages (RMGL). :class:`StagedResNet` is fast-reid's own ResNet
(same parameters, same state-dict keys, same non-local placement) with a forward that exposes
each stage, so no paper re-implements ResNet.
"""

import logging
import os

from fastreid.modeling.backbones.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

from reidzoo.plugins import lookup
from reidzoo.registry import BACKBONE_REGISTRY, STAGE_MODULE_REGISTRY

logger = logging.getLogger(__name__)

STAGES = ("layer1", "layer2", "layer3", "layer4")

_BLOCKS = {
    "18x": (BasicBlock, [2, 2, 2, 2], [0, 0, 0, 0]),
    "34x": (BasicBlock, [3, 4, 6, 3], [0, 0, 0, 0]),
    "50x": (Bottleneck, [3, 4, 6, 3], [0, 2, 3, 0]),
    "101x": (Bottleneck, [3, 4, 23, 3], [0, 2, 9, 0]),
}


class Stage(nn.Sequential):
    """A ResNet stage (its residual blocks, keys "0", "1", ...) plus an optional module named
    ``inserted`` that runs after the last block.

    Because the insert is part of the stage, any code that uses ``backbone.layer2`` or slices
    ``backbone.layer3[1:]`` (fast-reid's MGN, branch copies) runs it too.
    """

    def blocks(self):
        """Returns:
        list[nn.Module]: the residual blocks, without the inserted module."""
        return [m for name, m in self._modules.items() if name != "inserted"]


def stage_channels(layer):
    """Output channels of a ResNet stage (``nn.Sequential`` of blocks)."""
    last = layer.blocks()[-1] if isinstance(layer, Stage) else layer[-1]
    return (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features


def set_stage_stride(layer, stride):
    """Set the spatial stride of the first residual block of a ResNet stage, in place.

    The stride sits where fast-reid's blocks put it (the 3x3 ``conv2`` of a ``Bottleneck``,
    ``conv1`` of a ``BasicBlock``) and on the block's downsample, so that the identity path
    keeps the residual's size. Weights are untouched: a stride-1 copy of an ImageNet layer4
    (RMGL's branches, PMM's layer3) keeps its pretrained kernels.

    Args:
        layer (nn.Sequential): a ResNet stage (a :class:`Stage` or a slice of one).
        stride (int): the new stride, e.g. 1 to keep the input's resolution.
    """
    block = layer[0]
    conv = block.conv2 if hasattr(block, "conv3") else block.conv1
    conv.stride = (stride, stride)
    if block.downsample is not None:
        block.downsample[0].stride = (stride, stride)


class StagedResNet(ResNet):
    """fast-reid's ResNet whose stages can be run one at a time.

    Args:
        last_stride (int): stride of layer4 (1 for re-ID).
        bn_norm, with_ibn, with_se, with_nl: as fast-reid's ``ResNet``.
        depth (str): "18x", "34x", "50x" or "101x".
        inserts (dict[str, nn.Module] | None): stage name -> module applied to that stage's
            output, [N, C, H, W] -> [N, C, H, W]. Stored inside the stage (see :class:`Stage`).
    """

    def __init__(
        self,
        last_stride=1,
        bn_norm="BN",
        with_ibn=False,
        with_se=False,
        with_nl=False,
        depth="50x",
        inserts=None,
    ):
        if depth not in _BLOCKS:
            raise ValueError(f"MODEL.BACKBONE.DEPTH={depth!r}; expected one of {list(_BLOCKS)}")
        block, layers, nl_layers = _BLOCKS[depth]
        super().__init__(last_stride, bn_norm, with_ibn, with_se, with_nl, block, layers, nl_layers)
        self.depth = depth
        for name in STAGES:
            setattr(self, name, Stage(*getattr(self, name)))  # same keys: "0", "1", ...
        for name, module in (inserts or {}).items():
            self.set_insert(name, module)

    def set_insert(self, stage, module):
        """Run ``module`` after ``stage`` (replacing a previous insert).

        Args:
            stage (str): "layer1".."layer4".
            module (nn.Module): [N, C, H, W] -> [N, C, H, W]; its parameters are named
                ``<stage>.inserted.*``.
        """
        if stage not in STAGES:
            raise ValueError(f"cannot insert after '{stage}'; expected one of {STAGES}")
        getattr(self, stage).add_module("inserted", module)

    @property
    def inserts(self):
        """dict[str, nn.Module]: stage -> inserted module."""
        out = {}
        for s in STAGES:
            module = getattr(self, s)._modules.get("inserted")
            if module is not None:
                out[s] = module
        return out

    @property
    def channels(self):
        """dict[str, int]: output channels of each stage."""
        return {s: stage_channels(getattr(self, s)) for s in STAGES}

    def stem(self, x):
        """conv1, bn1, relu, maxpool.

        Args:
            x (Tensor): [N, 3, H, W] normalised images.
        Returns:
            Tensor: [N, 64, H/4, W/4]
        """
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def run_stage(self, name, x, insert=True):
        """Run one stage, its non-local blocks and (if ``insert``) its inserted module.

        Args:
            name (str): "layer1".."layer4".
            x (Tensor): the previous stage's output.
            insert (bool): apply ``self.inserts[name]`` if present.
        Returns:
            Tensor: [N, C_stage, H_stage, W_stage]
        """
        k = STAGES.index(name) + 1
        nl_idx = getattr(self, f"NL_{k}_idx")
        nl_blocks = getattr(self, f"NL_{k}", None)
        counter = 0
        layer = getattr(self, name)
        for i, blk in enumerate(layer.blocks()):
            x = blk(x)
            if counter < len(nl_idx) and i == nl_idx[counter]:
                x = nl_blocks[counter](x)
                counter += 1
        extra = layer._modules.get("inserted")
        if insert and extra is not None:
            x = extra(x)
        return x

    def forward_stages(self, x, stages=STAGES):
        """Run the network and return the requested stage outputs.

        Args:
            x (Tensor): [N, 3, H, W] normalised images.
            stages (Iterable[str]): names among "stem", "layer1".."layer4"; the network runs
                only as deep as the deepest one requested.
        Returns:
            dict[str, Tensor]: stage name -> output (after its inserted module).
        """
        wanted = set(stages)
        unknown = wanted - set(("stem",) + STAGES)
        if unknown:
            raise ValueError(f"unknown stages {sorted(unknown)}; expected stem or {STAGES}")
        out = {}
        x = self.stem(x)
        if "stem" in wanted:
            out["stem"] = x
        last = max((STAGES.index(s) for s in wanted if s in STAGES), default=-1)
        for name in STAGES[: last + 1]:
            x = self.run_stage(name, x)
            if name in wanted:
                out[name] = x
        return out

    def forward(self, x):
        """Args:
            x (Tensor): [N, 3, H, W] normalised images.
        Returns:
            Tensor: layer4 output [N, C, H/16 or H/32, ...]."""
        return self.forward_stages(x, ("layer4",))["layer4"]


def load_pretrained(model, path, trusted=False):
    """Load ImageNet weights (torchvision or fast-reid key names) from a local file.

    The file is read by :func:`reidzoo.checkpoint.load_file`: weights only, so that it cannot
    run code, unless ``trusted``.

    Args:
        model (nn.Module): a :class:`StagedResNet` (or fast-reid ResNet).
        path (str): ``MODEL.BACKBONE.PRETRAIN_PATH``.
        trusted (bool): unpickle the file completely (``REIDZOO.WEIGHTS_ONLY False``).
    Returns:
        dict: ``{"loaded": [...], "missing": [...], "unexpected": [...]}`` key lists.
    Raises:
        FileNotFoundError: no path, or no such file.
        reidzoo.checkpoint.UnsafeCheckpointError: the file needs Python objects outside the
            weights-only allow-list.
    """
    from reidzoo.checkpoint import load_file

    if not path:
        raise FileNotFoundError(
            "MODEL.BACKBONE.PRETRAIN is True but MODEL.BACKBONE.PRETRAIN_PATH is empty: no "
            "ImageNet weights can be downloaded here. Point PRETRAIN_PATH at a local "
            "torchvision ResNet checkpoint (e.g. resnet50-0676ba61.pth) or set PRETRAIN False."
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"MODEL.BACKBONE.PRETRAIN_PATH: ImageNet weights file not found: '{path}'"
        )
    state = load_file(path, trusted=trusted, what="MODEL.BACKBONE.PRETRAIN_PATH")
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    reshaped = sorted(k for k in state if k in own and k not in usable)
    result = model.load_state_dict(usable, strict=False)
    report = {
        "loaded": sorted(usable),
        "missing": sorted(result.missing_keys),
        "unexpected": sorted(k for k in state if k not in own) + reshaped,
    }
    logger.info(
        "Loaded %d tensors of ImageNet weights from %s; %d model keys not in the file "
        "(randomly initialised): %s; %d file keys skipped: %s",
        len(report["loaded"]),
        path,
        len(report["missing"]),
        report["missing"][:20],
        len(report["unexpected"]),
        report["unexpected"][:20],
    )
    if not report["loaded"]:
        raise ValueError(f"'{path}' holds no tensor that fits the backbone: is it a ResNet?")
    return report


def parse_inserts(cfg, channels):
    """Build the modules named in ``cfg.MODEL.BACKBONE.INSERTS`` (entries "layerK:Name").

    Args:
        cfg (CfgNode)
        channels (dict[str, int]): output channels of each stage.
    Returns:
        dict[str, nn.Module]: stage -> module (several per stage are chained in order).
    """
    per_stage = {}
    for entry in cfg.MODEL.BACKBONE.INSERTS:
        stage, sep, name = str(entry).partition(":")
        if not sep or stage not in STAGES:
            raise ValueError(
                f"MODEL.BACKBONE.INSERTS entry {entry!r}: expected 'layerK:Name' with layerK "
                f"in {STAGES}"
            )
        module = lookup(STAGE_MODULE_REGISTRY, name, "MODEL.BACKBONE.INSERTS")(
            cfg, stage, channels[stage]
        )
        per_stage.setdefault(stage, []).append(module)
    return {s: (m[0] if len(m) == 1 else nn.Sequential(*m)) for s, m in per_stage.items()}


def build_staged_resnet(cfg):
    """A :class:`StagedResNet` from ``cfg.MODEL.BACKBONE`` (DEPTH, LAST_STRIDE, NORM,
    WITH_IBN/SE/NL, PRETRAIN, PRETRAIN_PATH, INSERTS; ``REIDZOO.WEIGHTS_ONLY`` for reading
    PRETRAIN_PATH)."""
    from reidzoo.checkpoint import trusted_from_cfg

    bb = cfg.MODEL.BACKBONE
    model = StagedResNet(bb.LAST_STRIDE, bb.NORM, bb.WITH_IBN, bb.WITH_SE, bb.WITH_NL, bb.DEPTH)
    if bb.PRETRAIN:
        load_pretrained(model, bb.PRETRAIN_PATH, trusted=trusted_from_cfg(cfg))
    # Inserted modules are new: created after the ImageNet weights so that they keep their
    # own initialisation (e.g. zero-initialised residual BN making them the identity).
    for stage, module in parse_inserts(cfg, model.channels).items():
        model.set_insert(stage, module)
    return model


@BACKBONE_REGISTRY.register()
def build_staged_resnet_backbone(cfg):
    """Registered backbone builder: ``MODEL.BACKBONE.NAME: build_staged_resnet_backbone``.

    A drop-in for fast-reid's ``build_resnet_backbone`` (identical weights and output) that
    also honours ``MODEL.BACKBONE.INSERTS`` and exposes :meth:`StagedResNet.forward_stages`.
    """
    return build_staged_resnet(cfg)
