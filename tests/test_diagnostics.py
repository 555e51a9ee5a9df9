"""Training diagnostics (REIDZOO.DIAGNOSTICS): what the real trainer logs into metrics.json equals
a direct computation on the step's batch and weights, and a diagnosed run trains bit-identically
to one without diagnostics."""

import copy
import json
import math
import os

import pytest
import torch
from fastreid.utils.events import EventStorage
from torch.distributions import Categorical

from reidzoo.config import setup_cfg
from reidzoo.engine.diagnostics import TrainingDiagnostics
from reidzoo.modeling.diagnostics import entropy_rows, mean_feature_norm, reduce_record
from tests.helpers import REPO, TINY_SYNTH

PAN_CI = os.path.join(REPO, "projects", "PAN", "configs", "PAN_R18_synthetic_ci.yml")
IANET_CI = os.path.join(REPO, "projects", "IANet", "configs", "IANet_R18_synthetic_ci.yml")
PMM_CI = os.path.join(REPO, "projects", "PMM", "configs", "PMM_R18_synthetic_ci.yml")
#: PMM's 8 x 4 block grid needs a map of 8 x 4 or more; 64 x 32 inputs give 4 x 2: a 4 x 2 grid.
PMM_SIZE = ["MODEL.PMM.BLOCK_GRID", "[4, 2]", "MODEL.PMM.TOPK", "1"]


def _run(tmp_path, config, iters, period=None, opts=()):
    """Train ``iters`` iterations of a paper's CI config on a tiny SyntheticReID with the real
    trainer (hooks, writers, final checkpoint), diagnostics on every ``period`` iterations
    (None: off).

    Returns:
        dict: ``cfg``, ``trainer``, ``model0`` (a copy of the initial model), ``batch`` (the first
        step's batch), ``diag`` ({iteration: {key: value}} of the diag/ keys in metrics.json),
        ``final`` (model_final.pth's state dict).
    """
    from fastreid.utils.env import seed_all_rng

    from reidzoo.engine import ReidTrainer

    out = tmp_path / ("diag" if period else "plain")
    switch = ["REIDZOO.DIAGNOSTICS.ENABLED", str(period is not None)]
    if period:
        switch += ["REIDZOO.DIAGNOSTICS.PERIOD", str(period)]
    cfg = setup_cfg(config, [*TINY_SYNTH, "DATASETS.ROOT", str(tmp_path / "data"),
                             "OUTPUT_DIR", str(out), "SOLVER.MAX_ITER", str(iters),
                             "SOLVER.CHECKPOINT_PERIOD", str(iters), "TEST.EVAL_PERIOD",
                             str(iters), "REIDZOO.SEED", "0", *switch, *opts])  # fmt: skip
    seed_all_rng(0)
    trainer = ReidTrainer(cfg)
    model0 = copy.deepcopy(trainer.model)
    batches = []
    trainer.model.register_forward_pre_hook(
        lambda m, args: batches.append(args[0]) if m.training and not batches else None
    )
    trainer.resume_or_load(resume=False)
    trainer.train()
    diag = {}
    with open(out / "metrics.json") as f:
        for line in f:
            rec = json.loads(line)
            keys = {k: v for k, v in rec.items() if k.startswith("diag/")}
            if keys:
                diag.setdefault(rec["iteration"], {}).update(keys)
    final = torch.load(out / "model_final.pth", weights_only=True)["model"]
    return {"cfg": cfg, "trainer": trainer, "model0": model0.train(), "batch": batches[0],
            "diag": diag, "final": final}  # fmt: skip


def _entropy(w):
    """Normalised entropy by hand: torch's Categorical over the last axis, / log(support)."""
    w = w.detach().double()
    return (Categorical(probs=w / w.sum(-1, keepdim=True)).entropy() / math.log(w.shape[-1])).mean()


def _grad_norm(loss, x):
    (g,) = torch.autograd.grad(loss, x, retain_graph=True)
    return g.norm().item()


def _close(a, b):
    return a == pytest.approx(float(b), rel=1e-5, abs=1e-8)


def test_definitions_on_a_hand_made_map():
    """Normalised entropy: 1 for a uniform row, 0 for one position, log 2 / log 4 for two of
    four; a zero row is dead and left out of the mean; feature norm = mean L2 norm."""
    w = torch.tensor([[1.0, 1, 1, 1], [0, 3, 0, 0], [2, 2, 0, 0], [0, 0, 0, 0]])
    h, alive = entropy_rows(w)
    assert alive.tolist() == [True, True, True, False]
    assert torch.allclose(h, torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64))
    assert reduce_record("entropy", w) == pytest.approx(0.5)
    assert reduce_record("dead", w) == pytest.approx(0.25)
    assert reduce_record("entropy", torch.zeros(2, 3)) is None  # every row dead: not logged
    assert reduce_record("entropy", torch.ones(4, 1)) is None  # one position: 0 / 0
    assert mean_feature_norm(torch.tensor([[[3.0, 4.0], [0.0, 0.0]]])) == pytest.approx(2.5)
    with pytest.raises(ValueError, match="non-negative"):
        entropy_rows(torch.tensor([[1.0, -1.0]]))
    with pytest.raises(ValueError, match="REIDZOO.DIAGNOSTICS.PERIOD=0"):
        TrainingDiagnostics(0)


def _assert_same_training(on, off):
    """Diagnosed and plain runs: bit-identical final weights and buffers, which training moved;
    the plain run builds no diagnostics hook and logs no diag/ key."""
    assert on["diag"] and not off["diag"]
    assert not any(isinstance(h, TrainingDiagnostics) for h in off["trainer"]._hooks)
    assert on["final"].keys() == off["final"].keys()
    for k, v in on["final"].items():
        assert torch.equal(v, off["final"][k]), k
    initial = on["model0"].state_dict()
    assert any(not torch.equal(v, initial[k]) for k, v in on["final"].items())


@pytest.mark.slow
def test_pan_logged_values_equal_direct_computation(tmp_path):
    """PAN: at iteration 0 every logged value equals the direct computation on the first batch
    and the initial weights: each loss term's and the total's gradient norm w.r.t. X^4, the
    norms of P and every Z^l, the PLM mask and PAM compatibility entropies; diagnosed iterations
    are 0 and the last of every PERIOD (0, 1, 3 of 4 with PERIOD 2); the same run without
    diagnostics ends with the same weights."""
    r = _run(tmp_path, PAN_CI, 4, period=2)
    assert sorted(r["diag"]) == [0, 1, 3]
    _assert_same_training(r, _run(tmp_path, PAN_CI, 4))
    got = r["diag"][0]
    model, batch = r["model0"], r["batch"]
    head = model.heads
    images = model.preprocess_image(batch)
    targets = batch["targets"]
    feats = model.extract(images)
    x4 = feats["layer4"]
    with EventStorage(0):  # fast-reid's log_accuracy
        losses = model.losses(head(feats, targets), targets)
    terms = {f"cls_p{k}" for k in range(6)} | {"triplet", "orth"}
    assert set(losses) == {f"loss_{t}" for t in terms}
    assert {k for k in got if k.startswith("diag/grad/")} == {
        f"diag/grad/{t}" for t in terms | {"total"}
    }
    for name, loss in losses.items():
        assert _close(got[f"diag/grad/{name[5:]}"], _grad_norm(loss, x4)), name
    assert _close(got["diag/grad/total"], _grad_norm(sum(losses.values()), x4))
    # the measurement that motivated MODEL.PAN.PAM_NORM / TRI.NORM_FEAT: triplet >> part CEs
    assert got["diag/grad/triplet"] > 10 * got["diag/grad/cls_p0"]
    with torch.no_grad():
        parts, masks = head.parts(x4)
        assert _close(got["diag/feat_norm/heads.parts/P"], parts.norm(dim=-1).mean())
        assert _close(got["diag/feat_norm/last_stage"], x4.mean(dim=(2, 3)).norm(dim=1).mean())
        for scale, m in zip(head.parts.scales, masks):
            assert _close(got[f"diag/entropy/heads.parts/mask_l{scale}"], _entropy(m))
            assert got[f"diag/dead/heads.parts/mask_l{scale}"] == 0.0
        for s in head.pam_stages:
            z = head.pam[s](parts, feats[s])
            theta = head.pam[s].compatibility(parts, feats[s])
            assert _close(got[f"diag/feat_norm/heads.pam.{s}/Z"], z.norm(dim=-1).mean())
            assert _close(got[f"diag/entropy/heads.pam.{s}/compat"], _entropy(theta.abs()))
    assert set(r["diag"][3]) == set(got)


def test_ianet_relation_entropies_equal_direct_computation(tmp_path):
    """IANet: the SIA and CIA relation-map entropies, the head feature norm and the CE gradient
    norm logged at iteration 0 equal the direct computation (CIA's map softmax(F F^T) by hand)."""
    from reidzoo.projects.ianet import CIA, SIA

    r = _run(tmp_path, IANET_CI, 1, period=1)
    got = r["diag"][0]
    model, batch = r["model0"], r["batch"]
    inputs = {}
    for path, m in model.named_modules():
        if isinstance(m, (SIA, CIA)):
            m.register_forward_hook(lambda mod, i, o, path=path: inputs.__setitem__(path, i[0]))
    x4 = model.backbone(model.preprocess_image(batch))
    outputs = model.heads(x4, batch["targets"])
    with EventStorage(0):
        losses = model.losses(outputs, batch["targets"])
    assert _close(got["diag/grad/cls"], _grad_norm(losses["loss_cls"], x4))
    assert _close(got["diag/feat_norm/heads/features"], outputs["features"].norm(dim=-1).mean())
    assert len(inputs) == 4  # SIA and CIA after layer2 and layer3
    for path, x in inputs.items():
        m = model.get_submodule(path)
        with torch.no_grad():
            if isinstance(m, CIA):
                f = x.double().flatten(2)  # [N, C, M]
                rel = torch.softmax(f @ f.transpose(1, 2), dim=-1)  # Eq. 7
            else:
                rel = m.relation_map(x)
                assert torch.allclose(rel.sum(-1), torch.ones(()), atol=1e-5)
        assert _close(got[f"diag/entropy/{path}/relation"], _entropy(rel)), path


@pytest.mark.slow
def test_diagnostics_do_not_change_pmm_training(tmp_path):
    """PMM diagnosed at every iteration (random mixing partners and an autograd.grad Grad-CAM
    inside its forward) trains bit-identically to the same run without diagnostics."""
    on = _run(tmp_path, PMM_CI, 3, period=1, opts=PMM_SIZE)
    assert sorted(on["diag"]) == [0, 1, 2]
    assert {"diag/entropy/mix/cam", "diag/entropy/mix/cam/call2"} <= set(on["diag"][0])
    _assert_same_training(on, _run(tmp_path, PMM_CI, 3, opts=PMM_SIZE))
