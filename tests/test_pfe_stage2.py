"""PFE stage II: the frozen main branch loads strictly (or training refuses to start), the
evaluation ranks F_5 alone (stage I's feature, exactly), the side features alone and their
concatenation, and the region-overlap loss's pixel reduction switch with its gradient probe."""

import os

import pytest
import torch
from fastreid.modeling.meta_arch import build_model
from reidzoo.projects.pfe import region_overlap_loss

from reidzoo.config import setup_cfg
from tests.helpers import REPO, TINY_SYNTH, cpu_cfg, fix_batch, run_steps

CONFIGS = os.path.join(REPO, "projects", "PFE", "configs")
CI1 = os.path.join(CONFIGS, "PFE_R18_synthetic_ci_stage1.yml")
CI2 = os.path.join(CONFIGS, "PFE_R18_synthetic_ci_stage2.yml")


def _cfg(config, *opts):
    return cpu_cfg(config, *opts, weights="")


def _stage1_checkpoint(tmp_path, *opts):
    """A stage-I CI trainer (untrained) and its checkpoint ``tmp_path/s1/model_final.pth``."""
    from reidzoo.engine import ReidTrainer

    base = TINY_SYNTH + ["DATASETS.ROOT", str(tmp_path / "data"), "SOLVER.MAX_EPOCH", "1"]
    torch.manual_seed(0)
    t1 = ReidTrainer(setup_cfg(CI1, base + ["OUTPUT_DIR", str(tmp_path / "s1"), *opts]))
    t1.checkpointer.save("model_final")
    return t1, str(tmp_path / "s1" / "model_final.pth"), base


def test_stage2_refuses_a_main_branch_it_cannot_load_fully(tmp_path):
    from reidzoo.checkpoint import CheckpointMismatchError
    from reidzoo.engine import ReidTrainer, default_argument_parser, main
    from reidzoo.engine.run_folder import run_files

    t1, ckpt, base = _stage1_checkpoint(tmp_path)

    def stage2(name, weights, *opts):
        cfg = setup_cfg(CI2, base + ["OUTPUT_DIR", str(tmp_path / name), "MODEL.WEIGHTS", weights,
                                     *opts])  # fmt: skip
        return ReidTrainer(cfg)

    # MODEL.WEIGHTS "": train_net.py's main stops before any step, nothing trained or written
    out = tmp_path / "empty"
    args = default_argument_parser().parse_args(
        ["--config-file", CI2, *base, "OUTPUT_DIR", str(out), "MODEL.WEIGHTS", ""]
    )
    with pytest.raises(CheckpointMismatchError, match="MODEL.WEIGHTS is empty") as err:
        main(args)
    assert "backbone.conv1.weight" in str(err.value) and "FREEZE_MAIN False" in str(err.value)
    assert run_files(str(out)) == []  # no checkpoint, no logged iteration: a rerun may start

    # a stage-I model of another TSAM setting: FAB only (no SEB), or another reduction ratio
    for opts, title, key in [
        (["MODEL.PFE.TSAM_MODE", "fab"], "missing main-branch keys",
         "backbone.layer1.inserted.seb.fc1.weight"),
        (["MODEL.PFE.TSAM_REDUCTION", "8"], "main-branch shape mismatches",
         "backbone.layer1.inserted.fab.fc1.weight: checkpoint (8, 64, 1, 1) vs model (4, 64, "
         "1, 1)"),
    ]:  # fmt: skip
        other = build_model(_cfg(CI1, "MODEL.HEADS.NUM_CLASSES", "8", *opts))
        path = str(tmp_path / f"other_{opts[0][-4:]}.pth")
        torch.save({"model": other.state_dict()}, path)
        with pytest.raises(CheckpointMismatchError, match=title) as err:
            stage2("other" + opts[0][-4:], path).resume_or_load(resume=False)
        assert key in str(err.value) and path in str(err.value), str(err.value)
    # the reverse (a TSAM checkpoint for a FAB-only model): SEB tensors the model lacks
    with pytest.raises(CheckpointMismatchError, match="unexpected main-branch keys") as err:
        stage2("fab", ckpt, "MODEL.PFE.TSAM_MODE", "fab").resume_or_load(resume=False)
    assert "backbone.layer4.inserted.seb.fc2.bias" in str(err.value)

    # one main-branch tensor (F_5's BN statistics) missing from an otherwise full checkpoint
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    del state["model"]["heads.main_neck.running_var"]
    partial = str(tmp_path / "partial.pth")
    torch.save(state, partial)
    with pytest.raises(CheckpointMismatchError, match=r"missing main-branch keys \(1\)") as err:
        stage2("partial", partial).resume_or_load(resume=False)
    assert "heads.main_neck.running_var" in str(err.value)

    # the stage-I checkpoint itself: the main branch loads, the side branches are new
    t2 = stage2("ok", ckpt)
    t2.resume_or_load(resume=False)
    s1 = t1.model.state_dict()
    assert all(torch.equal(v, s1[k]) for k, v in t2.model.state_dict().items()
               if k.startswith(("backbone.", "heads.main_")))  # fmt: skip
    # joint training (main branch not frozen) may start from scratch
    stage2("joint", "", "MODEL.PFE.FREEZE_MAIN", "False").resume_or_load(resume=False)


class _Recorder:
    """A stand-in evaluator that keeps what it is given."""

    def __init__(self):
        self.seen = []

    def reset(self):
        self.seen = []

    def process(self, inputs, outputs):
        self.seen.append(outputs)

    def evaluate(self):
        return {"dim": self.seen[0].shape[1], "sum": float(torch.cat(self.seen).sum())}


def test_feature_groups_evaluator_gives_each_group_its_columns():
    from reidzoo.projects.pfe.evaluation import FeatureGroupsEvaluator

    made = []
    ev = FeatureGroupsEvaluator(lambda: made.append(_Recorder()) or made[-1], side_dim=6)
    ev.reset()
    out = torch.arange(2 * 10, dtype=torch.float32).view(2, 10)
    ev.process({}, out)
    ev.process({}, out + 100)
    res = ev.evaluate()
    assert list(res) == ["dim", "sum", "F5/dim", "F5/sum", "side/dim", "side/sum"]
    both = torch.cat([out, out + 100])
    assert (res["dim"], res["F5/dim"], res["side/dim"]) == (10, 4, 6)
    assert res["sum"] == float(both.sum()) and res["F5/sum"] == float(both[:, 6:].sum())
    assert res["side/sum"] == float(both[:, :6].sum())
    with pytest.raises(ValueError, match="no F_5 after the 6 side columns"):
        ev.process({}, out[:, :6])


@pytest.mark.slow
def test_stage2_evaluation_reports_f5_equal_to_stage1_side_and_concat(tmp_path):
    from fastreid.evaluation import ReidEvaluator, inference_on_dataset

    from reidzoo.engine import ReidTrainer

    t1, ckpt, base = _stage1_checkpoint(tmp_path)
    fix_batch(t1)
    t1.model.train()
    run_steps(t1, 2)  # a main branch that differs from its initialisation (BN statistics too)
    t1.checkpointer.save("model_final")
    r1 = ReidTrainer.test(t1.cfg, t1.model)
    cfg2 = setup_cfg(CI2, base + ["OUTPUT_DIR", str(tmp_path / "s2"), "MODEL.WEIGHTS", ckpt])
    t2 = ReidTrainer(cfg2)
    t2.resume_or_load(resume=False)
    r2 = ReidTrainer.test(t2.cfg, t2.model)
    # F5/: stage I's evaluation exactly (same features, same ranking)
    assert set(r2) == {g + k for g in ("", "F5/", "side/") for k in r1}, sorted(r2)
    for k, v in r1.items():
        assert r2["F5/" + k] == v, k
    loader, num_query = ReidTrainer.build_test_loader(t2.cfg, "SyntheticReID")
    batch = next(iter(loader))
    t1.model.eval(), t2.model.eval()
    with torch.no_grad():
        f1, f2 = t1.model(batch), t2.model(batch)
    side = 3 * t2.cfg.MODEL.PFE.SIDE_DIM
    assert f2.shape[1] == side + f1.shape[1] and torch.equal(f2[:, side:], f1)
    # side/ and the unprefixed metrics: fast-reid's evaluator on those columns
    for cols, prefix in ((slice(0, side), "side/"), (slice(None), "")):

        class Part(torch.nn.Module):
            def __init__(self, model, cols):
                super().__init__()
                self.model, self.cols = model, cols

            def forward(self, x):
                return self.model(x)[:, self.cols]

        part = Part(t2.model, cols)
        ref = inference_on_dataset(part, loader, ReidEvaluator(t2.cfg, num_query))
        assert all(r2[prefix + k] == v for k, v in ref.items()), (prefix, ref, r2)
    # the switch: the test feature alone
    t2.cfg.defrost()
    t2.cfg.MODEL.PFE.EVAL_GROUPS = False
    assert set(ReidTrainer.test(t2.cfg, t2.model)) == set(r1)


def test_region_overlap_reduction_switch_and_gradient_probe(capsys):
    import json

    from reidzoo.projects.pfe import ro_gradient

    torch.manual_seed(0)
    acts = [torch.rand(2, 16, 8), torch.rand(2, 8, 4), torch.rand(2, 4, 2), torch.rand(2, 4, 2)]
    total = region_overlap_loss(acts)  # default: the L1 norm (sum over A_2's 128 positions)
    assert torch.allclose(region_overlap_loss(acts, "mean"), total / 128, rtol=1e-6)
    with pytest.raises(ValueError, match="RO_REDUCTION='max'"):
        region_overlap_loss(acts, "max")
    with pytest.raises(ValueError, match="MODEL.PFE.RO_REDUCTION"):
        build_model(_cfg(CI2, "MODEL.PFE.RO_REDUCTION", "median"))
    # in the model: loss_ro with "mean" is the "sum" one over H_2 * W_2 (16 x 8 at 64x32)
    images, targets = torch.rand(4, 3, 64, 32) * 255, torch.tensor([0, 0, 1, 1])
    ro = {}
    for red in ("sum", "mean"):
        torch.manual_seed(0)
        model = build_model(_cfg(CI2, "MODEL.HEADS.NUM_CLASSES", "5", "MODEL.PFE.RO_REDUCTION",
                                 red)).train()  # fmt: skip
        ro[red] = model({"images": images, "targets": targets})["loss_ro"]
    assert torch.allclose(ro["mean"], ro["sum"] / 128, rtol=1e-5)
    # the README's measurement script, at two resolutions: the summed loss's gradient is the
    # mean's times H_2 * W_2, so its ratio to the cascade gradient grows with the input size
    assert ro_gradient.main(["--config-file", CI2, "--sizes", "64x32", "128x64", "--batch", "8",
                             "--num-classes", "4"]) == 0  # fmt: skip
    recs = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["records"]
    assert [r["pixels"] for r in recs] == [128, 512]
    for r in recs:
        assert all(c > 0 for c in r["cascade"]) and all(g > 0 for g in r["ro_sum"])
        for s, m in zip(r["ro_sum"], r["ro_mean"]):
            assert s == pytest.approx(m * r["pixels"], rel=1e-4)
    ratio = [[s / c for s, c in zip(r["ro_sum"], r["cascade"])] for r in recs]
    assert sum(ratio[1]) > 2 * sum(ratio[0]), ratio
