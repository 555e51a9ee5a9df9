"""PAN: PLM, PAM, L_orth against direct formulas, Table 2 parameter deltas, export, training."""

import math
import os

import pytest
import torch
import torch.nn.functional as F
from fastreid.modeling.meta_arch import build_model
from reidzoo.projects.pan import PAM, PLM, NonLocal, PANHead, StripeParts, orthogonal_loss
from reidzoo.projects.pan.modules import ConvConnection, grid_resampler, pool_with_masks

from reidzoo import complexity
from reidzoo.config import get_cfg, setup_cfg
from tests.helpers import (
    REPO,
    TINY_SYNTH,
    cpu_cfg,
    evaluate_on_training_ids,
    fix_batch,
    run_steps,
    train_then_eval_only,
    write_training_ids_testset,
)

CONFIGS = os.path.join(REPO, "projects", "PAN", "configs")
MARKET = os.path.join(CONFIGS, "PAN_R50_Market1501.yml")
CI = os.path.join(CONFIGS, "PAN_R18_synthetic_ci.yml")


def _pam_reference(pam, parts, x):
    """Eq. 1-3 literally: theta(P_i, X_j) = phi(P_i)^T psi(X_j) for every (part, position),
    then Z_i = sum_j theta_ij f(X_j) / M, with explicit loops over parts and positions."""
    n, c, h, w = x.shape
    m = h * w
    wphi, bphi = pam.phi.weight.flatten(1).double(), pam.phi.bias.double()
    wpsi, bpsi = pam.psi.weight.flatten(1).double(), pam.psi.bias.double()
    wf, bf = pam.f.weight.flatten(1).double(), pam.f.bias.double()
    xs = x.double().flatten(2)  # [N, C, M]
    out = torch.zeros(n, parts.shape[1], wf.shape[0], dtype=torch.float64)
    for b in range(n):
        psi = wpsi @ xs[b] + bpsi[:, None]  # [D, M]
        fx = wf @ xs[b] + bf[:, None]  # [O, M]
        for i in range(parts.shape[1]):
            q = wphi @ parts[b, i].double() + bphi  # [D]
            theta = torch.stack([q @ psi[:, j] for j in range(m)])  # [M] compatibility map
            out[b, i] = (fx * theta[None]).sum(1) / m
    return out


def test_pam_equals_eq1_to_3_reference():
    torch.manual_seed(0)
    pam = PAM(in_channels=12, part_dim=20, inner_dim=8, out_dim=12)
    parts, x = torch.randn(2, 6, 20), torch.randn(2, 12, 5, 3)
    z = pam(parts, x)
    assert z.shape == (2, 6, 12) and z.dtype == torch.float32
    ref = _pam_reference(pam, parts, x)
    assert torch.allclose(z.double(), ref, atol=1e-5, rtol=0), (z.double() - ref).abs().max()
    # compatibility() is theta of Eq. 2 for every part and position
    theta = pam.compatibility(parts, x)
    assert theta.shape == (2, 6, 15)
    fx = pam.f(x).flatten(2)
    assert torch.allclose(torch.bmm(theta, fx.transpose(1, 2)) / 15, z, atol=1e-5)
    # PAN_a: f maps C_l to the part width
    assert PAM(12, 20, 8, out_dim=20)(parts, x).shape == (2, 6, 20)


def test_pam_never_projects_every_position(monkeypatch):
    """The re-associated PAM: every product has the K part rows on one side, psi and f are never
    applied to X (no [D, M] or [O, M] tensor), and the bias terms are kept (checked against the
    reference with large biases)."""
    torch.manual_seed(1)
    pam = PAM(in_channels=10, part_dim=16, inner_dim=4, out_dim=10)
    with torch.no_grad():
        pam.psi.bias.add_(3.0)
        pam.f.bias.sub_(2.0)
    parts, x = torch.randn(3, 6, 16), torch.randn(3, 10, 9, 7)  # M = 63
    shapes, real_bmm, real_matmul = [], torch.bmm, torch.matmul

    def recording(real):
        def op(a, b, *args, **kw):
            out = real(a, b, *args, **kw)
            shapes.append(tuple(out.shape))
            return out

        return op

    monkeypatch.setattr(torch, "bmm", recording(real_bmm))
    monkeypatch.setattr(torch, "matmul", recording(real_matmul))
    pam.psi.register_forward_hook(lambda *a: pytest.fail("psi applied to X"))
    pam.f.register_forward_hook(lambda *a: pytest.fail("f applied to X"))
    z = pam(parts, x)
    assert len(shapes) == 5 and all(s[:2] == (3, 6) for s in shapes)  # K rows in every product
    assert [s for s in shapes if 63 in s] == [(3, 6, 63)]  # only theta has an M axis
    monkeypatch.setattr(torch, "bmm", real_bmm)
    monkeypatch.setattr(torch, "matmul", real_matmul)
    ref = _pam_reference(pam, parts, x)
    assert torch.allclose(z.double(), ref, atol=1e-4, rtol=1e-6), (z.double() - ref).abs().max()


def test_plm_masks_parts_and_formula():
    torch.manual_seed(2)
    plm = PLM(32, scales=(1, 2, 3), hidden=16, ca_reduction=4).eval()
    x = torch.randn(2, 32, 6, 4)
    parts, masks = plm(x)
    assert parts.shape == (2, 6, 32) and plm.num_parts == 6
    assert [tuple(m.shape) for m in masks] == [(2, 1, 24), (2, 2, 24), (2, 3, 24)]
    assert all(bool((m >= 0).all()) for m in masks)  # ReLU masks
    # P_j^l = AvgPool((c^l (x) s_j^l) . X^4), with the C x H x W mask m_j^l materialised
    s = plm.masks(x)
    gap = x.mean((2, 3))
    k = 0
    for i, scale in enumerate((1, 2, 3)):
        c = plm.channel[i](gap)
        assert bool(((c > 0) & (c < 1)).all())  # sigmoid channel attention
        for _ in range(scale):
            m = c[:, :, None, None] * s[:, k].reshape(2, 1, 6, 4)  # [N, C, H, W]
            ref = (m * x).mean((2, 3))
            assert torch.allclose(parts[:, k], ref, atol=1e-5)
            k += 1
    relu_ca = PLM(32, scales=(1, 2), hidden=16, ca_reduction=4, ca_act="relu")
    assert isinstance(relu_ca.channel[0].act, torch.nn.ReLU)


def test_softplus_masks_cannot_die_where_relu_masks_do():
    """MASK_ACT: with the spatial attention's last BN shifted far below zero (what a dead mask
    is), ReLU masks are all zero and pass no gradient; softplus masks stay positive and do."""
    torch.manual_seed(0)
    x = torch.randn(2, 32, 6, 4)
    for act in ("relu", "softplus"):
        plm = PLM(32, scales=(1, 2), hidden=16, ca_reduction=4, mask_act=act).train()
        with torch.no_grad():
            plm.spatial[4].bias.fill_(-30.0)  # the BN before the mask activation
        masks = plm.masks(x)
        masks.sum().backward()
        grad = plm.spatial[3].weight.grad.abs().sum()
        if act == "relu":
            assert isinstance(plm.spatial[-1], torch.nn.ReLU)
            assert bool((masks == 0).all()) and float(grad) == 0.0
        else:
            assert isinstance(plm.spatial[-1], torch.nn.Softplus)
            assert bool((masks > 0).all()) and float(grad) > 0.0
    head = _ci_head("MODEL.PAN.MASK_ACT", "softplus")
    assert isinstance(head.parts.spatial[-1], torch.nn.Softplus)
    assert isinstance(_ci_head().parts.spatial[-1], torch.nn.ReLU)  # the paper's default
    with pytest.raises(ValueError, match="MODEL.PAN.MASK_ACT='sigmoid'"):
        _ci_head("MODEL.PAN.MASK_ACT", "sigmoid")


def test_stripes_are_horizontal_average_pooling():
    x = torch.randn(2, 8, 6, 4)
    parts, masks = StripeParts(3)(x)
    assert parts.shape == (2, 3, 8) and masks == []
    assert torch.allclose(parts[:, 1], x[:, :, 2:4].mean((2, 3)), atol=1e-6)


def _orth_direct(masks, normalize=False):
    total = 0.0
    for m in masks:
        per = []
        for b in range(m.shape[0]):
            mm = m[b].double()
            if normalize:
                mm = mm / mm.norm(dim=1, keepdim=True)
            g = mm @ mm.T - torch.eye(mm.shape[0], dtype=torch.float64)
            per.append(math.sqrt(float((g**2).sum())))
        total += sum(per) / len(per)
    return total / len(masks)


def test_orthogonal_loss_formula_and_zero_for_orthonormal_masks():
    torch.manual_seed(3)
    masks = [torch.rand(2, s, 12) for s in (1, 2, 3)]
    for normalize in (False, True):
        got = orthogonal_loss(masks, normalize)
        assert got.item() == pytest.approx(_orth_direct(masks, normalize), rel=1e-5)
    # disjoint unit-norm masks (one-hot rows) are orthonormal: L_orth = 0
    eye = torch.eye(12)
    ortho = [eye[:1].expand(2, 1, 12), eye[1:3].expand(2, 2, 12), eye[3:6].expand(2, 3, 12)]
    assert orthogonal_loss(ortho).item() == pytest.approx(0.0, abs=1e-7)
    # disjoint but not unit norm: raw (literal) penalises the energy, normalised does not
    scaled = [3 * m for m in ortho]
    assert orthogonal_loss(scaled).item() > 1 and orthogonal_loss(scaled, True).item() < 1e-6


def test_fp32_under_autocast():
    torch.manual_seed(4)
    pam = PAM(16, 24, 8)
    plm = PLM(24, (1, 2), hidden=8, ca_reduction=4)
    nl = NonLocal(16)
    torch.nn.init.ones_(nl.bn.weight)
    parts, x, x4 = torch.randn(2, 3, 24), torch.randn(2, 16, 6, 4) * 8, torch.randn(2, 24, 3, 2)
    ref_z, ref_p, ref_nl = pam(parts, x), plm(x4)[0], nl(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, (p, masks), y = pam(parts, x), plm(x4), nl(x)
        loss = orthogonal_loss(masks)
    assert z.dtype == p.dtype == loss.dtype == torch.float32
    assert torch.equal(z, ref_z)
    assert torch.allclose(p, ref_p, rtol=0.05, atol=0.05)  # masks come from bf16 convs
    assert y.dtype == torch.float32 and y.shape == ref_nl.shape


def _cfg(config, *opts):
    return cpu_cfg(config, *opts, num_classes=751)


def test_full_model_shapes_and_heads_lr():
    from reidzoo.engine import ReidTrainer

    cfg = _cfg(MARKET, "INPUT.SIZE_TEST", "[96, 32]")
    model = build_model(cfg).eval()
    assert isinstance(model.heads, PANHead) and model.heads.in_dim == 3840  # 2048+256+512+1024
    images = torch.rand(2, 3, 96, 32) * 255
    keep = images.clone()
    with torch.no_grad():
        out = model(images)
        assert torch.equal(model({"images": images}), out)
    assert out.shape == (2, 1536) and torch.equal(images, keep)  # normalised out of place
    # every parameter outside the backbone is under `heads` and gets 10x the base LR
    names = [n for n, _ in model.named_parameters()]
    assert all(n.startswith(("backbone.", "heads.")) for n in names)
    assert any(n.startswith("heads.pam.layer1.psi") for n in names)
    assert any(n.startswith("heads.parts.spatial") for n in names)
    optimizer, _ = ReidTrainer.build_optimizer(cfg, model)
    lr_of = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            lr_of[id(p)] = group["lr"]
    for n, p in model.named_parameters():
        if p.requires_grad:
            want = 0.1 if n.startswith("heads.") else 0.01
            assert lr_of[id(p)] == pytest.approx(want), n


# Table 2 totals (M); the check is the increase over the PLM baseline (docs/decisions/pan.md#table2)
TABLE2 = {
    "t2_pan_c_d128.yml": 33.0, "t2_pan_c_d256.yml": 33.9, "t2_pan_c_d256_512_1024.yml": 37.0,
    "t2_pan_a_d128.yml": 32.5, "t2_pan_a_d256.yml": 33.5, "t2_pan_a_d256_512_1024.yml": 36.6,
    "t2_nl.yml": 30.5, "t2_pan_c_nl.yml": 36.7, "t2_conv_a.yml": 35.2, "t2_conv_c.yml": 32.3,
}  # fmt: skip
TABLE2_BASELINE = 27.8


def _params(name):
    return complexity.count_params(build_model(_cfg(os.path.join(CONFIGS, "ablations", name))))


def _conv_cascade_params(widen):
    """Conv_a / Conv_c blocks counted by hand: per stage l = 1..3 one 1x1 conv (no bias) + BN
    (weight, bias) per later stage, channels doubling (widen) or kept, from C_l = 256, 512, 1024."""
    total = 0
    for c, blocks in ((256, 3), (512, 2), (1024, 1)):
        for _ in range(blocks):
            out = 2 * c if widen else c
            total += c * out + 2 * out
            c = out
    return total


def test_table2_parameter_deltas_through_complexity():
    base = _params("t2_baseline.yml")
    deltas = {}
    for name, total in TABLE2.items():
        deltas[name] = _params(name) - base
        assert abs(deltas[name] / 1e6 - (total - TABLE2_BASELINE)) <= 0.15, (name, deltas[name])
    # 6 stripes + 6 embeddings 2048->256 + 6 classifiers = the paper's 27.8 M baseline count
    assert _params("t1_stripes_6.yml") / 1e6 == pytest.approx(27.8, abs=0.05)
    # Conv_a / Conv_c: exactly the cascades (+ for Conv_c the 6 embeddings widened from 2048 to
    # 2048 + 256 + 512 + 1024 inputs), i.e. our reading of §4.2 is what was built
    assert deltas["t2_conv_a.yml"] == _conv_cascade_params(widen=True)  # 7,488,512
    assert deltas["t2_conv_c.yml"] == _conv_cascade_params(widen=False) + 6 * 1792 * 256
    # Baseline_w: the paper's +1.4 M (29.2 - 27.8) does not follow from any reading with textual
    # support (README); ours adds the layer3 part vectors (1024-d) to each of the 6 embeddings'
    # inputs and nothing else: 6 x 1024 x 256 = 1,572,864, 0.17 M above the paper
    assert _params("t2_baseline_w.yml") - base == 6 * 1024 * 256


def test_conv_connection_cascade_follows_section_4_2():
    # Conv_a from X^1: 256 -> 512 -> 1024 -> 2048, all stride 2; Conv_c from X^2: 512 -> 512 x 2
    add1 = ConvConnection(256, 3, widen=True, stride=2, last_stride=2)
    convs = [m for m in add1.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(m.in_channels, m.out_channels) for m in convs] == [(256, 512), (512, 1024),
                                                               (1024, 2048)]  # fmt: skip
    assert all(m.kernel_size == (1, 1) and m.stride == (2, 2) and m.bias is None for m in convs)
    cat2 = ConvConnection(512, 2, widen=False, stride=2, last_stride=1)
    convs = [m for m in cat2.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(m.in_channels, m.out_channels, m.stride) for m in convs] == [
        (512, 512, (2, 2)), (512, 512, (1, 1))]  # fmt: skip
    x = torch.randn(2, 16, 24, 8)
    y = ConvConnection(16, 3, widen=True).eval()(x)
    assert y.shape == (2, 128, 3, 1) and bool((y >= 0).all())  # ReLU output
    with pytest.raises(ValueError, match="at least one block"):
        ConvConnection(16, 0, widen=True)


def test_pool_with_masks_equals_direct_masked_average():
    """Z_j = mean over X^4's grid of s_j[p] * up(y)[:, p], with an explicit loop; and the same
    as pooling the coarse map with 2x2-averaged masks (why nearest upsampling is the natural
    bridge from a stride-2 cascade to last-stride-1 X^4)."""
    from fractions import Fraction

    torch.manual_seed(6)
    masks = [torch.rand(2, s, 6 * 4) for s in (1, 2, 3)]
    y = torch.randn(2, 5, 3, 2)  # half of X^4's 6 x 4 grid
    z = pool_with_masks(grid_resampler(Fraction(2))(y), masks)
    assert z.shape == (2, 6, 5) and z.dtype == torch.float32
    s = torch.cat(masks, 1)
    ref = torch.zeros(2, 6, 5, dtype=torch.float64)
    for b in range(2):
        for j in range(6):
            for h in range(6):
                for w in range(4):
                    ref[b, j] += s[b, j, h * 4 + w].double() * y[b, :, h // 2, w // 2].double()
    assert torch.allclose(z.double(), ref / 24, atol=1e-6)
    coarse = F.avg_pool2d(s.reshape(2, 6, 6, 4), 2).flatten(2)  # [N, K, 6]
    assert torch.allclose(z, torch.bmm(coarse, y.flatten(2).transpose(1, 2)) / 6, atol=1e-6)
    # a map already on X^4's grid is pooled as it is (Baseline_w's identity connection) ...
    x3 = torch.randn(2, 7, 6, 4)
    assert isinstance(grid_resampler(Fraction(1)), torch.nn.Identity)
    want = torch.bmm(s, x3.flatten(2).transpose(1, 2)) / 24
    assert torch.allclose(pool_with_masks(x3, masks), want, atol=1e-6)
    # ... a finer one is average-pooled onto it, and a map off the grid is a clear error
    fine = grid_resampler(Fraction(1, 2))(x3.repeat_interleave(2, 2).repeat_interleave(2, 3))
    assert torch.allclose(fine, x3, atol=1e-6)
    with pytest.raises(ValueError, match="positions but the part masks"):
        pool_with_masks(y, masks)


def _ci_head(*opts):
    cfg = _cfg(CI, "MODEL.HEADS.NUM_CLASSES", "5", *opts)
    return PANHead(cfg).eval()


def test_conv_and_identity_fusion_match_a_hand_wired_reference():
    torch.manual_seed(7)
    feats = {"layer1": torch.randn(2, 64, 32, 16), "layer2": torch.randn(2, 128, 16, 8),
             "layer3": torch.randn(2, 256, 8, 4), "layer4": torch.randn(2, 512, 8, 4)}  # fmt: skip
    for fusion in ("concat", "add"):
        head = _ci_head("MODEL.PAN.CONNECTION", "conv", "MODEL.PAN.FUSION", fusion)
        assert head.pam_stages == () and len(head.pam) == 0
        assert head.connected_stages == ("layer1", "layer2", "layer3")
        with torch.no_grad():
            e, masks = head.fuse(feats)
            parts, _ = head.parts(feats["layer4"])
            s = torch.cat(masks, 1)  # [N, 6, 32]
            zs = []
            for st in ("layer1", "layer2", "layer3"):
                y = head.conv[st](feats[st])  # [N, C, 4, 2]: stride 2 everywhere
                assert y.shape[-2:] == (4, 2)
                up = y.repeat_interleave(2, 2).repeat_interleave(2, 3).flatten(2)
                zs.append(torch.einsum("nkp,ncp->nkc", s, up) / 32)
        ref = torch.cat([parts] + zs, 2) if fusion == "concat" else parts + sum(zs)
        assert e.shape == ref.shape and torch.allclose(e, ref, atol=1e-5)
    # CONV_LAST_STRIDE 1: every cascade ends on X^4's grid (last stride 1), no resampling
    head = _ci_head("MODEL.PAN.CONNECTION", "conv", "MODEL.PAN.CONV_LAST_STRIDE", "1")
    for st in ("layer1", "layer2", "layer3"):
        assert isinstance(head.resample[st], torch.nn.Identity)
        assert head.conv[st](feats[st]).shape[-2:] == (8, 4)
    # Baseline_w: X^3 itself pooled with the masks, concatenated
    head = _ci_head("MODEL.PAN.CONNECTION", "identity", "MODEL.PAN.PAM_STAGES", "['layer3']")
    assert head.in_dim == 512 + 256 and len(head.conv) == 0 and len(head.pam) == 0
    with torch.no_grad():
        e, masks = head.fuse(feats)
        parts, _ = head.parts(feats["layer4"])
    z3 = torch.einsum("nkp,ncp->nkc", torch.cat(masks, 1), feats["layer3"].flatten(2)) / 32
    assert torch.allclose(e, torch.cat([parts, z3], 2), atol=1e-5)


def test_connection_switch_errors_name_the_key():
    with pytest.raises(ValueError, match="MODEL.PAN.CONNECTION='mlp'"):
        _ci_head("MODEL.PAN.CONNECTION", "mlp")
    with pytest.raises(ValueError, match="only stages before layer4"):
        _ci_head("MODEL.PAN.CONNECTION", "conv", "MODEL.PAN.PAM_STAGES", "['layer3', 'layer4']")
    with pytest.raises(ValueError, match="FUSION 'concat'"):
        _ci_head("MODEL.PAN.CONNECTION", "identity", "MODEL.PAN.FUSION", "add")


T2_CONNECTION_VARIANTS = ("t2_conv_a.yml", "t2_conv_c.yml", "t2_baseline_w.yml")


def _variant_opts(name):
    """The ablation config's connection keys, applied to the CI-sized model."""
    pc = _cfg(os.path.join(CONFIGS, "ablations", name)).MODEL.PAN
    return ["MODEL.PAN.CONNECTION", pc.CONNECTION, "MODEL.PAN.FUSION", pc.FUSION,
            "MODEL.PAN.PAM_STAGES", str(list(pc.PAM_STAGES)),
            "MODEL.PAN.CONV_LAST_STRIDE", str(pc.CONV_LAST_STRIDE),
            "MODEL.PAN.BNNECK", str(pc.BNNECK)]  # fmt: skip


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("pan_synth"))


@pytest.mark.slow
@pytest.mark.parametrize("name", T2_CONNECTION_VARIANTS)
def test_table2_connection_variants_train_and_export(name, synth_root, tmp_path, capsys):
    from reidzoo import export
    from reidzoo.engine import ReidTrainer

    variant = _variant_opts(name)
    assert variant[1] in ("conv", "identity")
    opts = [*TINY_SYNTH, "DATASETS.ROOT", synth_root, "OUTPUT_DIR", str(tmp_path),
            "SOLVER.MAX_ITER", "2", "INPUT.REA.ENABLED", "False", *variant]  # fmt: skip
    torch.manual_seed(0)
    trainer = ReidTrainer(setup_cfg(CI, opts))
    head = trainer.model.heads
    assert head.connection == variant[1] and len(head.pam) == 0
    watched = {n: p.detach().clone() for n, p in head.named_parameters()
               if n.startswith(("conv.", "embeddings."))}  # fmt: skip
    assert any(n.startswith("conv.") for n in watched) == (variant[1] == "conv")
    fix_batch(trainer)
    expected = {f"loss_cls_p{k}" for k in range(6)} | {"loss_triplet", "loss_orth"}
    totals, terms = run_steps(trainer, 1, expected)
    assert all(math.isfinite(v) for v in totals + list(terms[0].values()))
    moved = {n for n, p in head.named_parameters() if n in watched and
             not torch.equal(p.detach(), watched[n])}  # fmt: skip
    assert moved == set(watched), sorted(set(watched) - moved)  # every block was trained
    out = str(tmp_path / "pan_variant.onnx")
    args = ["--config-file", CI, "--output", out, "--batch", "4", "MODEL.DEVICE", "cpu",
            "MODEL.HEADS.NUM_CLASSES", "5", "INPUT.SIZE_TEST", "[64, 32]", *variant]  # fmt: skip
    assert export.main(args) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("parity ") and float(last.rsplit("rel=", 1)[1]) <= 1e-4


def test_complexity_counts_every_pan_op():
    cfg = _cfg(CI, "INPUT.SIZE_TEST", "[64, 32]")
    res = complexity.count_complexity(build_model(cfg), (64, 32))
    assert res["params"] > 0 and "bmm" in res["by_operator"]
    assert not any("bmm" in op or "matmul" in op for op in res["unsupported_ops"])


@pytest.mark.slow
def test_export_parity_paper_config(tmp_path, capsys):
    from reidzoo import export

    out = str(tmp_path / "pan.onnx")
    opts = ["MODEL.BACKBONE.PRETRAIN", "False", "MODEL.DEVICE", "cpu",
            "MODEL.HEADS.NUM_CLASSES", "751"]  # fmt: skip
    assert export.main(["--config-file", MARKET, "--output", out, "--batch", "4", *opts]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("parity ") and float(last.rsplit("rel=", 1)[1]) <= 1e-4


def test_pan_components_in_other_models_by_config():
    from reidzoo.modeling.build import build_model as reidzoo_build_model

    # the PLM head (PANHead without PAM) inside fast-reid's Baseline ...
    cfg = get_cfg()
    cfg.merge_from_list(
        ["MODEL.DEVICE", "cpu", "MODEL.BACKBONE.PRETRAIN", False, "MODEL.HEADS.NUM_CLASSES", 5,
         "MODEL.META_ARCHITECTURE", "Baseline", "MODEL.HEADS.NAME", "PANHead",
         "MODEL.PAN.PAM_STAGES", [], "MODEL.PAN.PAM_DIMS", [],
         "MODEL.LOSSES.NAME", ("CrossEntropyLoss", "TripletLoss"),
         # ... with PAN's non-local block inserted after layer2 of the staged ResNet
         "MODEL.BACKBONE.NAME", "build_staged_resnet_backbone",
         "MODEL.BACKBONE.INSERTS", ["layer2:PANNonLocal"]]
    )  # fmt: skip
    model = reidzoo_build_model(cfg)  # reidzoo's build path: the training forward runs alone
    assert type(model).__name__ == "Baseline" and isinstance(model.heads, PANHead)
    assert isinstance(model.backbone.inserts["layer2"], NonLocal)
    images = torch.rand(4, 3, 64, 32) * 255
    losses = model({"images": images, "targets": torch.tensor([0, 0, 1, 1])})
    assert set(losses) == {"loss_cls", "loss_triplet"}
    assert all(torch.isfinite(v) for v in losses.values())
    with torch.no_grad():
        assert model.eval()(images).shape == (4, 1536)
    # PAM needs stage outputs: asking Baseline for it is a clear error
    cfg.MODEL.PAN.PAM_STAGES, cfg.MODEL.PAN.PAM_DIMS = ["layer3"], [32]
    with pytest.raises(ValueError, match="PAM_STAGES"), torch.no_grad():
        build_model(cfg).eval()(images)


@pytest.mark.slow
def test_trains_on_demo_data_and_eval_only(tmp_path):
    """Six steps on one batch lower every loss; 50 real iterations (train_net's main, hooks and
    all) retrieve the training identities across cameras, and ``--eval-only`` on the saved
    ``model_final.pth`` gives exactly the training-time ``results.json``."""
    from reidzoo.engine import ReidTrainer

    opts = TINY_SYNTH + ["DATASETS.ROOT", str(tmp_path / "data"), "OUTPUT_DIR", str(tmp_path)]
    cfg = setup_cfg(
        CI, opts + ["SOLVER.MAX_ITER", "6", "INPUT.REA.ENABLED", "False", "SOLVER.BASE_LR", "1e-4"]
    )
    assert write_training_ids_testset(cfg) == (16, 16)
    torch.manual_seed(0)
    trainer = ReidTrainer(cfg)
    assert trainer.max_iter == 6  # iteration-based schedule
    untrained = evaluate_on_training_ids(trainer.cfg, trainer.model)
    batch = fix_batch(trainer)
    expected = {f"loss_cls_p{k}" for k in range(6)} | {"loss_triplet", "loss_orth"}
    assert set(trainer.model(batch)) == expected
    totals, terms = run_steps(trainer, 6, expected)
    assert all(math.isfinite(v) for v in totals) and totals[-1] < totals[0], totals
    assert all(math.isfinite(v) for t in terms for v in t.values())
    assert sum(terms[-1][f"loss_cls_p{k}"] for k in range(6)) < sum(
        terms[0][f"loss_cls_p{k}"] for k in range(6)
    )

    # the CI recipe (SGD 0.01 / 0.1 for the heads); batches of all 8 identities (P = 8 x K = 2):
    # with 4 the batch-hard triplet sees too few negatives to learn in a few dozen iterations
    real = opts + ["SOLVER.IMS_PER_BATCH", "16"]
    trained, evaluated = train_then_eval_only(CI, real, tmp_path / "real", 50)
    assert evaluated == trained
    # measured (REIDZOO.SEED 0): untrained 10.9 (it ranks by camera; a random ranking scores
    # 22.1); after 40 / 45 / 50 iterations 11.0 / 55.8 / 49.1 on the earlier sittings' VM, while
    # 50 gave 29.6 on the AVX2-only VM of 2026-12-02 (same code and seed: the machines round
    # differently). The curve is that steep here, so the floor is "clearly above a random
    # ranking and the untrained model", not a level.
    assert untrained["mAP"] < 15, untrained
    assert trained["mAP"] > 25 and trained["mAP"] > untrained["mAP"] + 15, (untrained, trained)


def test_iteration_schedule_of_the_paper():
    cfg = _cfg(MARKET)
    assert cfg.SOLVER.MAX_ITER == 10000 and list(cfg.SOLVER.STEPS) == [5000, 7500]
    assert cfg.SOLVER.BASE_LR == 0.01 and cfg.SOLVER.HEADS_LR_FACTOR == 10
    assert cfg.SOLVER.IMS_PER_BATCH == 32 and cfg.DATALOADER.NUM_INSTANCE == 4
    assert list(cfg.INPUT.SIZE_TRAIN) == [384, 128] and cfg.MODEL.PAN.ORTH_WEIGHT == 1e-3
    from fastreid.solver import build_lr_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    sched = build_lr_scheduler(cfg, opt, 1)["lr_sched"]
    lrs = {}
    for it in range(10000):
        lrs[it] = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
    assert lrs[4999] == pytest.approx(0.01) and lrs[5000] == pytest.approx(0.001)
    assert lrs[7500] == pytest.approx(0.0001)


def test_nonlocal_is_identity_at_init_and_matches_reference():
    torch.manual_seed(5)
    nl = NonLocal(8, reduction=2, subsample=True).eval()
    x = torch.randn(2, 8, 6, 4)
    assert torch.equal(nl(x), x)
    torch.nn.init.normal_(nl.bn.weight)
    t = nl.theta(x).flatten(2)
    p = F.max_pool2d(nl.phi(x), 2).flatten(2)
    g = F.max_pool2d(nl.g(x), 2).flatten(2)
    a = torch.einsum("nim,nij->nmj", t, p) / p.shape[-1]
    y = torch.einsum("nmj,nij->nim", a, g).reshape(2, 4, 6, 4)
    assert torch.allclose(nl(x), x + nl.bn(nl.W(y)), atol=1e-5)


#: Bound on the mean per-part L2 norm of the part features P and of every PAM output Z^l during
#: the paper-recipe run below. At initialisation they are ~4-13; with PAM_NORM BN each Z^l row
#: has an RMS norm of about sqrt(C_l) (8-16 here); with the literal PAM (PAM_NORM "") Z^3's mean
#: norm passes 1,600 after 3 steps and 10^6 after 18.
NORM_BOUND = 100.0


def _paper_recipe_run(tmp_path, steps, *opts):
    """Train the CI config (the paper's optimiser) ``steps`` steps on one fixed tiny batch with
    the real trainer, recording every step's part cross-entropies and, by forward hooks on the
    head's PLM and PAM modules, the mean part / Z^l norm and the number of dead PLM masks
    (zero at every position of every sample).

    Returns:
        tuple: (list of dicts of the part CE per step, dict of the per-step norm / dead-mask
        lists, or None for a run that stopped on a non-finite loss, cfg).
    """
    from fastreid.utils.env import seed_all_rng

    from reidzoo.engine import ReidTrainer

    opts = [*TINY_SYNTH, "DATASETS.ROOT", str(tmp_path / "data"), "OUTPUT_DIR",
            str(tmp_path / "run"), "SOLVER.MAX_ITER", str(steps), "INPUT.REA.ENABLED", "False",
            "REIDZOO.SEED", "0", *opts]  # fmt: skip
    cfg = setup_cfg(CI, opts)
    seed_all_rng(cfg.REIDZOO.SEED)
    trainer = ReidTrainer(cfg)
    head = trainer.model.heads
    rec = {"parts": [], "dead": [], **{s: [] for s in head.pam_stages}}

    def on_parts(module, args, out):
        parts, masks = out
        rec["parts"].append(parts.detach().norm(dim=-1).mean().item())
        rec["dead"].append(int((torch.cat(masks, 1).detach().amax(-1) <= 0).all(0).sum()))

    head.parts.register_forward_hook(on_parts)
    for s in head.pam_stages:
        head.pam[s].register_forward_hook(
            lambda m, a, z, s=s: rec[s].append(z.detach().norm(dim=-1).mean().item())
        )
    fix_batch(trainer)
    ce = [f"loss_cls_p{k}" for k in range(head.num_parts)]
    try:
        _, values = run_steps(trainer, steps, ce)
    except FloatingPointError:  # fast-reid stops a run on a non-finite loss
        values = None
    return values, rec, cfg


@pytest.mark.slow
def test_paper_recipe_trains_from_random_init(tmp_path):
    """§4.1's optimiser from random initialisation (SGD, LR 0.01 backbone / 0.1 new layers,
    momentum 0.9, wd 5e-4, pre-BN triplet, no warmup): every part CE falls, far below its
    initial ln(8), the PLM masks stay alive and P and Z^l stay within NORM_BOUND."""
    values, rec, cfg = _paper_recipe_run(tmp_path, 15)
    s = cfg.SOLVER
    assert (s.OPT, s.BASE_LR, s.HEADS_LR_FACTOR, s.MOMENTUM, s.WEIGHT_DECAY) == (
        "SGD", 0.01, 10.0, 0.9, 5e-4)  # fmt: skip
    assert s.WARMUP_ITERS == 0 and cfg.MODEL.PAN.TRIPLET_FEAT == "before"
    assert cfg.MODEL.PAN.PAM_NORM == "BN" and cfg.MODEL.LOSSES.TRI.NORM_FEAT
    assert values is not None, "the paper recipe stopped on a non-finite loss"
    first, last = values[0], values[-1]
    for k, v in first.items():
        assert v == pytest.approx(math.log(8), abs=0.02)  # chance, 8 identities
        assert last[k] < 0.25 * v, (k, v, last[k])
    assert max(rec["dead"]) == 0, rec["dead"]
    for name in ("parts", "layer1", "layer2", "layer3"):
        assert len(rec[name]) == 15 and max(rec[name]) <= NORM_BOUND, (name, rec[name])


@pytest.mark.slow
@pytest.mark.parametrize(
    "switch_off",
    [("MODEL.PAN.PAM_NORM", ""), ("MODEL.LOSSES.TRI.NORM_FEAT", "False")],
    ids=["literal_pam", "unnormalised_triplet"],
)
def test_paper_recipe_fails_without_the_switches(tmp_path, switch_off):
    """Each switch of the test above is needed: the literal PAM's Z^l leaves NORM_BOUND within a
    few steps; with the triplet on un-normalised features PLM's ReLU masks die (an all-zero mask
    gives its part a zero feature, a constant ln(C) loss and no gradient)."""
    values, rec, _ = _paper_recipe_run(tmp_path, 8, *switch_off)
    if switch_off[0] == "MODEL.PAN.PAM_NORM":
        assert max(max(rec[s]) for s in ("layer1", "layer2", "layer3")) > 10 * NORM_BOUND
    else:
        assert max(rec["dead"]) >= 2, rec["dead"]


def test_pam_norm_is_bn_of_eq3_over_batch_and_parts():
    """PAM_NORM BN: Eq. 3's Z, standardised per output channel over the N x K rows (training
    mode), hence unchanged by any rescaling of f; the module default is the literal block."""
    torch.manual_seed(2)
    literal = PAM(12, 20, 8, 12)
    assert literal.norm is None
    normed = PAM(12, 20, 8, 12, norm="BN").train()
    missing, unexpected = normed.load_state_dict(literal.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("norm.") for k in missing)
    parts, x = torch.randn(3, 6, 20), torch.randn(3, 12, 5, 3)
    z = literal(parts, x).reshape(-1, 12)  # [N*K, O]
    ref = (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5)
    zn = normed(parts, x)
    assert zn.shape == (3, 6, 12)
    assert torch.allclose(zn.reshape(-1, 12), ref, atol=1e-4)
    with torch.no_grad():
        normed.f.weight.mul_(1000.0)
        normed.f.bias.mul_(1000.0)
    # equal up to BN's eps (1e-5 against Z's small variance before the rescaling)
    assert torch.allclose(normed(parts, x), zn, atol=1e-2)
    with torch.no_grad():  # while the literal block's Z scales with f
        literal.f.weight.mul_(1000.0)
        literal.f.bias.mul_(1000.0)
    assert torch.allclose(literal(parts, x).reshape(-1, 12), 1000.0 * z, rtol=1e-4, atol=1e-2)


def test_from_scratch_configs_use_the_paper_optimiser():
    """The CI and real-data configs train with §4.1's optimiser and the pre-BN triplet, plus the
    two documented from-scratch switches; the paper configs keep the literal triplet."""
    real = os.path.join(REPO, "configs", "RealData", "PAN.yml")
    for path in (CI, real):
        cfg = setup_cfg(path, freeze=False)
        s = cfg.SOLVER
        assert (s.OPT, s.BASE_LR, s.HEADS_LR_FACTOR, s.MOMENTUM, s.WEIGHT_DECAY) == (
            "SGD", 0.01, 10.0, 0.9, 5e-4), path  # fmt: skip
        assert cfg.MODEL.PAN.TRIPLET_FEAT == "before" and cfg.MODEL.PAN.PAM_NORM == "BN", path
        assert cfg.MODEL.LOSSES.TRI.NORM_FEAT is True, path
    paper = _cfg(MARKET)
    assert paper.MODEL.PAN.PAM_NORM == "BN" and paper.MODEL.LOSSES.TRI.NORM_FEAT is False
