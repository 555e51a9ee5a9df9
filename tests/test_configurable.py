"""Paper components built from explicit arguments equal the ones our configs build.

One component per paper (PAN's head, IANet's IA block, PFE's TSAM, PMM's feature mix, RMGL's
ABP) is made twice: from keyword arguments alone, written out here as another team would, and
by the real model of the paper's CI config (``build_model``, so through the registry paths the
configs use). Same parameter names and shapes, and with the config-built one's state_dict
loaded (or the same seed), the same outputs on a fixed input. Wrong values are errors naming
the argument on the explicit path and the config key on the config path.
"""

import inspect
import os

import pytest
import torch
from fastreid.modeling.meta_arch import build_model
from reidzoo.projects.ianet.ia import IABlock
from reidzoo.projects.pan.heads import PANHead
from reidzoo.projects.pfe.modules import TSAM
from reidzoo.projects.pmm.modules import FeatureMix
from reidzoo.projects.rmgl.modules import ActivationBalancedPooling
from yacs.config import CfgNode

from reidzoo.config import setup_cfg
from reidzoo.modeling.arguments import ArgumentError, read_keys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CI = {
    "pan": "projects/PAN/configs/PAN_R18_synthetic_ci.yml",
    "ianet": "projects/IANet/configs/IANet_R18_synthetic_ci.yml",
    "pfe": "projects/PFE/configs/PFE_R18_synthetic_ci_stage1.yml",
    "pmm": "projects/PMM/configs/PMM_R18_synthetic_ci.yml",
    "rmgl": "projects/RMGL/configs/RMGL_R18_synthetic_ci.yml",
}


def _cfg(paper, *opts):
    return setup_cfg(os.path.join(REPO, CI[paper]), ["MODEL.HEADS.NUM_CLASSES", "5", *opts])


def _model(paper, *opts):
    torch.manual_seed(0)
    return build_model(_cfg(paper, *opts))


def _same_module(explicit, built):
    """Equal state_dict names and shapes; then ``built``'s tensors copied into ``explicit``."""
    a, b = explicit.state_dict(), built.state_dict()
    assert {k: tuple(v.shape) for k, v in a.items()} == {k: tuple(v.shape) for k, v in b.items()}
    assert len(a) > 0
    explicit.load_state_dict(b)


def test_pan_head_from_arguments_equals_the_config_built_head():
    built = _model("pan").heads  # PAN -> build_heads(cfg) -> PANHead(cfg)
    torch.manual_seed(1)  # another initialisation: equality below comes from the copied weights
    head = PANHead(feat_dim=512, num_classes=5, sa_dim=64, pam_dims=(64, 64, 64), embed_dim=64)
    _same_module(head, built)
    assert head.connected_stages == built.connected_stages == ("layer1", "layer2", "layer3")
    torch.manual_seed(2)
    sizes = {"layer1": (64, 32), "layer2": (128, 16), "layer3": (256, 8), "layer4": (512, 8)}
    feats = {s: torch.randn(3, c, h, 4) for s, (c, h) in sizes.items()}
    head.eval(), built.eval()
    with torch.no_grad():
        out, ref = head(feats), built(feats)
    assert out.shape == (3, 6 * 64)
    assert torch.equal(out, ref)
    head.train(), built.train()
    with torch.no_grad():
        out, ref = head(feats), built(feats)
    assert all(torch.equal(a, b) for a, b in zip(out["part_logits"], ref["part_logits"]))
    assert torch.equal(out["triplet_features"], ref["triplet_features"])


def test_pan_head_explicit_switches_change_the_head():
    # explicit arguments reach the head: a conv-connected PAN_a with stripes and no BNNeck
    head = PANHead(feat_dim=512, num_classes=5, parts="stripes", num_stripes=4,
                   connection="conv", connected_stages=["layer2"], fusion="add",
                   embed_dim=32, bnneck=False)  # fmt: skip
    assert head.num_parts == 4 and head.in_dim == 512 and head.out_dim == 4 * 32
    assert list(head.conv) == ["layer2"] and len(head.pam) == 0
    assert all(isinstance(b, torch.nn.Identity) for b in head.bnnecks)
    cfg = _cfg("pan", "MODEL.PAN.PARTS", "stripes", "MODEL.PAN.NUM_STRIPES", "4",
               "MODEL.PAN.CONNECTION", "conv", "MODEL.PAN.PAM_STAGES", "['layer2']",
               "MODEL.PAN.FUSION", "add", "MODEL.PAN.EMBED_DIM", "32",
               "MODEL.PAN.BNNECK", "False")  # fmt: skip
    _same_module(head, PANHead(cfg))


def test_ia_block_from_arguments_equals_the_inserted_block():
    model = _model("ianet")  # MODEL.BACKBONE.INSERTS: layer2 / layer3 -> IANetIABlock
    for stage, channels, sigma in (("layer2", 128, (10.0, 20.0)), ("layer3", 256, (5.0, 10.0))):
        built = getattr(model.backbone, stage).inserted
        torch.manual_seed(1)
        block = IABlock(channels, sigma=sigma)
        _same_module(block, built)
        assert block.sia.module.sigma == built.sia.module.sigma == sigma
        # non-zero BN weights, else both blocks are the identity at insertion (Eq. 9)
        for m in (block, built):
            torch.manual_seed(3)
            for bn in (m.sia.bn, m.cia.bn):
                torch.nn.init.normal_(bn.weight)
        x = torch.randn(2, channels, 6, 4)
        block.eval(), built.eval()
        with torch.no_grad():
            out, ref = block(x), built(x)
        assert not torch.allclose(out, x)
        assert torch.equal(out, ref)


def test_tsam_from_arguments_equals_the_inserted_tsam():
    model = _model("pfe")  # MODEL.BACKBONE.INSERTS: layer1..layer4 -> PFETSAM
    for stage, channels in (("layer1", 64), ("layer4", 512)):
        built = getattr(model.backbone, stage).inserted
        torch.manual_seed(1)
        tsam = TSAM(channels)
        _same_module(tsam, built)
        x = torch.randn(2, channels, 4, 3)
        with torch.no_grad():
            assert torch.equal(tsam(x), built(x))
    # the config path follows its keys (TSAM_MODE fab: no SEB)
    fab = TSAM(_cfg("pfe", "MODEL.PFE.TSAM_MODE", "fab"), 64)
    assert fab.seb is None and fab.fab is not None


def test_feature_mix_from_arguments_equals_the_model_mix():
    built = _model("pmm").mix  # PMM -> FeatureMix(cfg)
    mix = FeatureMix()  # the paper's attentive Hard-Mix, K = 3 of 8 x 4 blocks
    assert list(mix.state_dict()) == list(built.state_dict()) == []  # no parameters
    for name in ("mode", "block_choice", "block_grid", "topk", "bdb_ratios", "cutmix_alpha"):
        assert getattr(mix, name) == getattr(built, name), name
    torch.manual_seed(0)
    fmap, cam = torch.randn(6, 4, 16, 8), torch.rand(6, 16, 8)
    targets = torch.tensor([0, 0, 1, 1, 2, 2])
    outs = []
    for m in (mix, built):
        torch.manual_seed(5)  # the negatives are drawn at random: the same draw for both
        outs.append(m(fmap, cam, targets))
    assert torch.equal(outs[0]["features"], outs[1]["features"])
    assert torch.equal(outs[0]["index"], outs[1]["index"])
    assert not torch.equal(outs[0]["features"], fmap)  # it mixed something
    assert (outs[0]["mask"] == 0).sum() == 6 * 3 * (2 * 2)  # K 2x2 blocks per sample


def test_abp_from_arguments_equals_the_model_abp():
    model = _model("rmgl")  # GRANULARITIES [2, 3]: an ABP per branch
    built = [m for m in model.abp if isinstance(m, ActivationBalancedPooling)]
    assert [m.parts for m in built] == [2, 3]
    torch.manual_seed(0)
    x = torch.relu(torch.randn(4, 16, 12, 4))
    for ref in built:
        abp = ActivationBalancedPooling(ref.parts)
        assert (abp.mode, abp.ties) == (ref.mode, ref.ties) == ("max", "strict")
        assert torch.equal(abp(x), ref(x)) and abp(x).shape == (4, ref.parts, 16)
    avg = ActivationBalancedPooling(_cfg("rmgl", "MODEL.RMGL.ABP_POOL", "avg"), 3)
    assert torch.allclose(avg(x), ActivationBalancedPooling(3, mode="avg")(x))
    assert not torch.allclose(avg(x), built[1](x))


BAD = [
    # (explicit call, its error, config path: paper, opts, build, its error)
    (lambda: PANHead(feat_dim=512, num_classes=5, connection="mlp"),
     "PANHead: connection='mlp'; expected one of ('pam', 'conv', 'identity')",
     "pan", ["MODEL.PAN.CONNECTION", "mlp"], PANHead,
     "MODEL.PAN.CONNECTION='mlp'; expected one of ('pam', 'conv', 'identity')"),
    (lambda: PANHead(feat_dim=512, num_classes=5, connected_stages=["layer2"]),
     "PANHead: pam_dims=(256, 256, 256), connected_stages=['layer2']; pam_dims needs one D "
     "per stage of connected_stages",
     "pan", ["MODEL.PAN.PAM_STAGES", "['layer2']"], PANHead,
     "MODEL.PAN.PAM_DIMS=[64, 64, 64], MODEL.PAN.PAM_STAGES=['layer2']; MODEL.PAN.PAM_DIMS "
     "needs one D per stage of MODEL.PAN.PAM_STAGES"),
    (lambda: IABlock(8, arrangement="diagonal"),
     "IABlock: arrangement='diagonal'; expected one of",
     "ianet", ["MODEL.IANET.ARRANGEMENT", "diagonal"], lambda cfg: IABlock(cfg, "layer2", 128),
     "MODEL.IANET.ARRANGEMENT='diagonal'; expected one of"),
    (lambda: IABlock(8, sigma=(1.0,)),
     "IABlock: sigma=(1.0,); expected (sigma_1, sigma_2), both > 0",
     "ianet", ["MODEL.IANET.SIGMA_LAYER3", "[5.0, 0.0]"], lambda cfg: IABlock(cfg, "layer3", 8),
     "MODEL.IANET.SIGMA_LAYER3=[5.0, 0.0]; expected (sigma_1, sigma_2), both > 0"),
    (lambda: TSAM(8, mode="cbam"),
     "TSAM: mode='cbam'; expected one of ('tsam', 'fab', 'seb')",
     "pfe", ["MODEL.PFE.TSAM_MODE", "cbam"], lambda cfg: TSAM(cfg, 8),
     "MODEL.PFE.TSAM_MODE='cbam'; expected one of ('tsam', 'fab', 'seb')"),
    (lambda: FeatureMix(topk=40),
     "FeatureMix: topk=40; expected 0..32 blocks",
     "pmm", ["MODEL.PMM.TOPK", "40"], FeatureMix,
     "MODEL.PMM.TOPK=40; expected 0..32 blocks"),
    (lambda: ActivationBalancedPooling(3, ties="last"),
     "ActivationBalancedPooling: ties='last'; expected one of ('strict', 'first')",
     "rmgl", ["MODEL.RMGL.ABP_TIES", "last"], lambda cfg: ActivationBalancedPooling(cfg, 3),
     "MODEL.RMGL.ABP_TIES='last'; expected one of ('strict', 'first')"),
]  # fmt: skip


@pytest.mark.parametrize("explicit, message, paper, opts, build, key_message", BAD)
def test_bad_values_name_the_argument_or_the_key(explicit, message, paper, opts, build,
                                                 key_message):  # fmt: skip
    with pytest.raises(ArgumentError) as e:
        explicit()
    assert str(e.value).startswith(message), str(e.value)
    with pytest.raises(ValueError) as e:
        build(_cfg(paper, *opts))
    assert str(e.value).startswith(key_message), str(e.value)
    assert not isinstance(e.value, ArgumentError)  # names keys, not arguments


def test_bad_value_through_the_model_names_the_key():
    # the registry path of a paper config (PAN -> build_heads -> PANHead(cfg))
    with pytest.raises(ValueError, match=r"^MODEL\.PAN\.FUSION='sum'; expected one of"):
        build_model(_cfg("pan", "MODEL.PAN.FUSION", "sum"))


def test_read_keys_names_a_missing_key():
    cfg = CfgNode({"MODEL": {"PAN": {"PARTS": "plm"}}})
    assert read_keys(cfg, {"parts": "MODEL.PAN.PARTS"}) == {"parts": "plm"}
    with pytest.raises(KeyError, match="config has no key MODEL.PAN.FUSION"):
        read_keys(cfg, {"parts": "MODEL.PAN.PARTS", "fusion": "MODEL.PAN.FUSION"})


def _defaults(cls):
    sig = inspect.signature(cls.__init__)
    return {k: p.default for k, p in sig.parameters.items() if p.default is not p.empty}


@pytest.mark.parametrize(
    "config, build",
    [
        ("projects/PAN/configs/PAN_R50_Market1501.yml", lambda cfg: PANHead.from_config(cfg)),
        ("projects/IANet/configs/IANet_R50_Market1501.yml",
         lambda cfg: IABlock.from_config(cfg, "layer3", 1024)),
        ("projects/PFE/configs/PFE_R50_Market1501_stage1.yml",
         lambda cfg: TSAM.from_config(cfg, 1024)),
        ("projects/PMM/configs/PMM_R50_Market1501.yml", lambda cfg: FeatureMix.from_config(cfg)),
        ("projects/RMGL/configs/RMGL_R50_Market1501.yml",
         lambda cfg: ActivationBalancedPooling.from_config(cfg, 3)),
    ],
)  # fmt: skip
def test_explicit_defaults_are_the_paper_config(config, build):
    # what a team gets without naming an argument is what our Market-1501 config trains
    args = build(setup_cfg(os.path.join(REPO, config), []))
    cls = {"PAN": PANHead, "IANet": IABlock, "PFE": TSAM, "PMM": FeatureMix,
           "RMGL": ActivationBalancedPooling}[config.split("/")[1]]  # fmt: skip
    defaults = _defaults(cls)
    required = {"feat_dim", "num_classes", "channels", "parts"}  # no default: the model's
    assert set(args) - set(defaults) <= required and len(set(args) & set(defaults)) >= 2
    for name in set(args) & set(defaults):  # not IABlock's fused (a speed switch, no key)
        value = tuple(args[name]) if isinstance(args[name], list) else args[name]
        assert value == defaults[name], (name, value, defaults[name])
