"""benchmarks/real_data.py: the collector's table and the runner's commands (no training)."""

import importlib.util
import json
import os
import statistics

import pytest

from reidzoo.config import setup_cfg
from tests.helpers import REPO


def _load():
    spec = importlib.util.spec_from_file_location(
        "reidzoo_benchmarks_real_data", os.path.join(REPO, "benchmarks", "real_data.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rd = _load()


def _write_record(records, model, dataset, split, metrics, wall_s=None, stages=None):
    path = rd.record_path(records, model, dataset, split)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rec = {"model": model, "dataset": dataset, "split": split, "metrics": metrics}
    if wall_s is not None:
        rec["wall_s"] = wall_s
        rec["machine_start"] = {"nproc": 2, "cpu": "Fake CPU", "torch": "9", "loadavg": [1, 2, 3]}
        rec["git"] = {"rev": "abcdef0123456789", "dirty": split == 3}
        rec["started_utc"] = "2026-11-30 10:00"
    if stages is not None:
        rec["stages"] = stages
    with open(path, "w") as f:
        json.dump(rec, f)


def _m(r1, r5, r10, ap):
    return {"Rank-1": r1, "Rank-5": r5, "Rank-10": r10, "mAP": ap, "mINP": 1.0, "metric": 2.0}


def test_collect_mean_std_over_splits(tmp_path):
    records = str(tmp_path)
    _write_record(records, "baseline", "viper", 0, _m(10.0, 20.0, 30.0, 15.0), wall_s=60.0)
    _write_record(records, "baseline", "viper", 3, _m(14.0, 26.0, 33.0, 19.0), wall_s=120.0)
    _write_record(records, "baseline", "viper", 1, _m(12.0, 23.0, 36.0, 17.0), wall_s=180.0)
    _write_record(records, "baseline", "prid450s", 2, _m(5.0, 9.0, 11.0, 7.0))
    # stray files next to the records are ignored
    open(os.path.join(records, "baseline", "viper", "notes.txt"), "w").close()
    open(os.path.join(records, "baseline", "viper", "split_x.json"), "w").close()
    rows = rd.collect(records)
    assert [(r["model"], r["dataset"]) for r in rows] == [
        ("baseline", "viper"),
        ("baseline", "prid450s"),
    ]
    viper, prid = rows
    assert viper["splits"] == [0, 1, 3] and viper["n"] == 3
    assert viper["Rank-1_mean"] == pytest.approx(12.0)
    assert viper["Rank-1_std"] == pytest.approx(statistics.stdev([10.0, 14.0, 12.0]))
    assert viper["Rank-1_std"] == pytest.approx(2.0)  # sample std (ddof=1)
    assert viper["mAP_mean"] == pytest.approx(17.0)
    assert viper["Rank-10_std"] == pytest.approx(3.0)
    assert viper["wall_s"] == pytest.approx(120.0)
    assert viper["revisions"] == ["abcdef0", "abcdef0+dirty"]
    assert prid["n"] == 1 and prid["Rank-1_std"] == 0.0 and prid["mAP_mean"] == 7.0
    assert prid["wall_s"] is None and prid["machine"] is None

    table = rd.markdown(rows)
    lines = table.strip().splitlines()
    assert len(lines) == 4
    assert (
        "| 3 (0,1,3) | 12.0 +- 2.0 | 23.0 +- 3.0 | 33.0 +- 3.0 | 17.0 +- 2.0 | 2.0 min |"
        in lines[2]
    )
    assert "Fake CPU" in lines[2] and "VIPeRSingleShot" in lines[2]
    assert lines[2].endswith("| abcdef0, abcdef0+dirty |")
    assert "| 1 (2) | 5.0 +- 0.0 |" in lines[3] and lines[3].endswith("| n/a | n/a | n/a |")


def test_broken_record_names_the_file(tmp_path):
    _write_record(str(tmp_path), "pan", "viper", 0, {"Rank-1": 1.0})  # no mAP
    with pytest.raises(ValueError, match=r"pan/viper/split_0.json.*'mAP'"):
        rd.collect(str(tmp_path))


def test_runs_table_lists_every_evaluation(tmp_path):
    ev = [
        {"iteration": 170, "Rank-1": 13.25, "Rank-5": 0, "Rank-10": 0, "mAP": 24.9},
        {"iteration": 341, "Rank-1": 19.0, "Rank-5": 0, "Rank-10": 0, "mAP": 31.4},
    ]
    stages = [{"evaluations": ev[:1], "final": _m(15.0, 1, 2, 26.0)}, {"evaluations": ev}]
    _write_record(str(tmp_path), "pfe", "viper", 0, _m(20.0, 1, 2, 32.4), 600.0, stages)
    (line,) = rd.markdown_runs(rd.load_records(str(tmp_path))).strip().splitlines()[2:]
    assert (
        "| stage 1: 13.2 / 24.9 (170), final 15.0 / 26.0; "
        "stage 2: 13.2 / 24.9 (170), 19.0 / 31.4 (341), final 20.0 / 32.4 |"
    ) in line
    assert "| 10.0 min | 2026-11-30 10:00, 1.0/2.0/3.0 | abcdef0 |" in line
    block = rd.report(str(tmp_path))
    assert block.count("| PFE (stage I + II) | VIPeRSingleShot |") == 2


def test_evaluations_read_from_fastreid_metrics_json(tmp_path):
    lines = [
        {"iteration": 9, "loss_cls": 5.0},
        {"iteration": 18, "VIPeRSingleShot/Rank-1": 4.0, "VIPeRSingleShot/Rank-5": 9.0}
        | {"VIPeRSingleShot/Rank-10": 12.0, "VIPeRSingleShot/mAP": 6.0, "lr": 0.1},
        {"iteration": 27, "Rank-1": 5.0, "Rank-5": 10.0, "Rank-10": 13.0, "mAP": 7.0},
    ]
    with open(tmp_path / "metrics.json", "w") as f:
        f.write("\n".join(json.dumps(x) for x in lines) + "\n{broken\n")
    got = rd.evaluations(str(tmp_path))
    assert got == [
        {"iteration": 18, "Rank-1": 4.0, "Rank-5": 9.0, "Rank-10": 12.0, "mAP": 6.0},
        {"iteration": 27, "Rank-1": 5.0, "Rank-5": 10.0, "Rank-10": 13.0, "mAP": 7.0},
    ]
    assert rd.evaluations(str(tmp_path / "missing")) == []


def test_run_cell_writes_record_and_skips_it_next_time(tmp_path, monkeypatch):
    """A finished cell leaves run_info.json in its logs and a record in the records folder;
    the next run skips it; a failing stage writes no record."""
    logs, records = str(tmp_path / "logs"), str(tmp_path / "records")
    calls = []

    def fake_call(argv, cwd):
        calls.append(argv)
        out = argv[argv.index("OUTPUT_DIR") + 1]
        os.makedirs(out, exist_ok=True)
        for name in ("model_final.pth", "model_0001.pth"):
            with open(os.path.join(out, name), "wb") as f:
                f.write(b"weights")
        if "PRID450S" in argv[argv.index("DATASETS.NAMES") + 1]:
            return 3
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump({"results": {"VIPeRSingleShot": _m(1.0, 2.0, 3.0, 4.0)}}, f)
        return 0

    monkeypatch.setattr(rd.subprocess, "call", fake_call)
    assert rd.run_cell("pfe", "viper", 0, "/d", logs, records=records) == "done"
    assert len(calls) == 2  # both PFE stages
    with open(rd.record_path(records, "pfe", "viper", 0)) as f:
        rec = json.load(f)
    assert rec["metrics"] == {"Rank-1": 1.0, "Rank-5": 2.0, "Rank-10": 3.0, "mAP": 4.0}
    assert [s["rc"] for s in rec["stages"]] == [0, 0] and rec["status"] == "done"
    assert [s["final"]["mAP"] for s in rec["stages"]] == [4.0, 4.0]
    cell = os.path.join(logs, "pfe", "viper", "split_0")
    assert os.path.isfile(os.path.join(cell, "run_info.json"))
    # the done cell's checkpoints are gone (stage II read stage I's before), its results stay
    left = [os.path.relpath(os.path.join(d, f), cell) for d, _, fs in os.walk(cell) for f in fs]
    assert not [f for f in left if f.endswith(".pth")]
    assert "run_info.json" in left and any(f.endswith("results.json") for f in left)
    assert rd.run_cell("pfe", "viper", 0, "/d", logs, records=records) == "skipped"
    assert len(calls) == 2
    assert rd.run_cell("baseline", "prid450s", 1, "/d", logs, records=records) == "failed"
    assert not os.path.exists(rd.record_path(records, "baseline", "prid450s", 1))
    failed = os.path.join(logs, "baseline", "prid450s", "split_1")
    with open(os.path.join(failed, "run_info.json")) as f:
        assert json.load(f)["stages"][0]["rc"] == 3
    assert os.path.isfile(os.path.join(failed, "model_final.pth"))  # a failed cell keeps them
    # --keep-checkpoints keeps a done cell's
    rd.run_cell("baseline", "viper", 2, "/d", logs, records=records, keep_checkpoints=True)
    assert os.path.isfile(os.path.join(logs, "baseline", "viper", "split_2", "model_final.pth"))


def test_update_markdown_replaces_block(tmp_path):
    path = str(tmp_path / "REAL.md")
    with open(path, "w") as f:
        f.write(f"# title\n\n{rd.BEGIN_MARK}\nold\n{rd.END_MARK}\n\nafter\n")
    rd.update_markdown(path, "| new |\n")
    text = open(path).read()
    assert "old" not in text and "| new |" in text
    assert text.startswith("# title\n") and text.endswith("after\n")
    rd.update_markdown(str(tmp_path / "fresh.md"), "| t |\n")
    assert open(tmp_path / "fresh.md").read() == f"{rd.BEGIN_MARK}\n| t |\n{rd.END_MARK}\n"


def test_build_commands_single_and_two_stage():
    (cmd,) = rd.build_commands("baseline", "prid450s", 4, "/data", "logs/rd", python="py")
    argv, out = cmd
    assert out == os.path.join("logs/rd", "baseline", "prid450s", "split_4")
    assert argv[:5] == [
        "py", "train_net.py", "--config-file", "configs/RealData/baseline.yml", "--overwrite"
    ]  # fmt: skip
    opts = dict(zip(argv[5::2], argv[6::2]))
    assert opts == {
        "DATASETS.NAMES": '("PRID450S",)',
        "DATASETS.TESTS": '("PRID450S",)',
        "DATASETS.ROOT": "/data",
        "DATASETS.SPLIT_INDEX": "4",
        "OUTPUT_DIR": out,
    }
    (a1, o1), (a2, o2) = rd.build_commands(
        "pfe", "viper", 0, "/d", "L", python="py", extra=["SOLVER.MAX_EPOCH", "2"]
    )
    assert o1 == os.path.join("L", "pfe", "viper", "split_0", "stage1")
    assert o2 == os.path.join("L", "pfe", "viper", "split_0", "stage2")
    assert a1[3].endswith("PFE_stage1.yml") and a2[3].endswith("PFE_stage2.yml")
    assert "MODEL.WEIGHTS" not in a1
    assert a2[a2.index("MODEL.WEIGHTS") + 1] == os.path.join(o1, "model_final.pth")
    assert a1[-2:] == a2[-2:] == ["SOLVER.MAX_EPOCH", "2"]
    with pytest.raises(KeyError, match="unknown model"):
        rd.build_commands("nope", "viper", 0, "/d", "L")
    with pytest.raises(KeyError, match="unknown dataset"):
        rd.build_commands("baseline", "market", 0, "/d", "L")


def test_dry_run_prints_commands_and_trains_nothing(tmp_path, capsys):
    rc = rd.main(
        ["run", "--models", "baseline", "--datasets", "viper", "--splits", "0", "--dry-run"]
        + ["--logs", str(tmp_path / "l"), "--records", str(tmp_path / "r")]
        + ["--", "SOLVER.MAX_EPOCH", "1"]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "$ " in out and "configs/RealData/baseline.yml" in out
    assert "SOLVER.MAX_EPOCH 1" in out and "cell baseline/viper/split_0: dry-run" in out
    assert os.listdir(tmp_path) == []


_SHARED = ("SOLVER", "INPUT.SIZE_TRAIN", "INPUT.SIZE_TEST", "INPUT.FLIP", "DATALOADER")


@pytest.mark.parametrize("model", sorted(rd.MODELS))
def test_every_leaf_loads_and_shares_the_budget(model):
    """Each stage's leaf builds a config, and its solver, input size, flip and sampler are the
    shared recipe's (PFE stage II: only the learning rate differs, by the paper's factor)."""
    base = setup_cfg(os.path.join(REPO, rd.CONFIG_DIR, "Base-realdata.yml"), freeze=True)
    for stage in rd.MODELS[model][1]:
        cfg = setup_cfg(os.path.join(REPO, rd.CONFIG_DIR, stage.config), freeze=True)
        assert cfg.MODEL.BACKBONE.PRETRAIN is False
        assert cfg.MODEL.BACKBONE.DEPTH == base.MODEL.BACKBONE.DEPTH
        for key in _SHARED:
            a, b = cfg, base
            for part in key.split("."):
                a, b = a[part], b[part]
            if (
                key == "SOLVER"
                and cfg.MODEL.META_ARCHITECTURE == "PFE"
                and cfg.MODEL.PFE.STAGE == 2
            ):
                assert a.BASE_LR == pytest.approx(b.BASE_LR / 10)
                a, b = dict(a), dict(b)
                a.pop("BASE_LR"), b.pop("BASE_LR")
            if key == "SOLVER" and cfg.MODEL.META_ARCHITECTURE == "PAN":
                # PAN trains with its paper's optimiser (§4.1: SGD, 0.01 backbone / 0.1 new
                # layers; projects/PAN/README.md); the schedule is the shared one
                assert (a.OPT, a.BASE_LR, a.HEADS_LR_FACTOR, a.MOMENTUM) == ("SGD", 0.01, 10.0, 0.9)
                optimiser = ("OPT", "BASE_LR", "HEADS_LR_FACTOR", "MOMENTUM", "NESTEROV")
                a = {k: v for k, v in a.items() if k not in optimiser}
                b = {k: v for k, v in b.items() if k not in optimiser}
            if key.startswith("INPUT.SIZE") and cfg.MODEL.META_ARCHITECTURE == "PMM":
                # PMM's 8x4 block grid must divide the map to mix the paper's K / 32: 96x32
                # gives 6x2, 128x64 the smallest 8x4 (projects/PMM/README.md)
                assert list(a) == [128, 64], f"{stage.config}: {key} {list(a)}"
                continue
            assert a == b, f"{stage.config}: {key} differs from Base-realdata.yml"


def test_git_revision_dirty_only_for_code(tmp_path, monkeypatch):
    """A record is "dirty" when code or configs differ from HEAD, not when documentation (such
    as the table the runner rewrites after every cell) does."""
    import subprocess

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                       cwd=tmp_path, check=True, capture_output=True)  # fmt: skip

    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "a.yml").write_text("A: 1\n")
    (tmp_path / "REAL_DATA.md").write_text("table\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "init")
    monkeypatch.setattr(rd, "REPO", str(tmp_path))
    clean = rd.git_revision()
    assert len(clean["rev"]) == 40 and clean["dirty"] is False
    (tmp_path / "REAL_DATA.md").write_text("new table\n")
    assert rd.git_revision()["dirty"] is False
    (tmp_path / "configs" / "a.yml").write_text("A: 2\n")
    assert rd.git_revision() == {"rev": clean["rev"], "dirty": True}
    monkeypatch.setattr(rd, "REPO", str(tmp_path / "nowhere"))
    assert rd.git_revision() is None


def test_r50_variant_has_its_own_folders_overrides_and_table(tmp_path, capsys):
    rc = rd.main(
        ["run", "--models", "ianet", "--datasets", "prid450s", "--variant", "r50", "--dry-run"]
        + ["--logs", str(tmp_path / "l"), "--records", str(tmp_path / "r"), "--", "A.B", "1"]
    )
    assert rc == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("$ "))
    assert "MODEL.BACKBONE.DEPTH 50x MODEL.BACKBONE.FEAT_DIM 2048 A.B 1" in line
    assert os.path.join(str(tmp_path / "l"), "r50", "ianet", "prid450s", "split_0") in line
    records = str(tmp_path / "r")
    _write_record(records, "baseline", "viper", 0, _m(1.0, 2.0, 3.0, 4.0))
    assert "ResNet-50" not in rd.report(records)  # no R50 record yet: no R50 table
    _write_record(os.path.join(records, "r50"), "baseline", "viper", 0, _m(5.0, 6.0, 7.0, 8.0))
    block = rd.report(records)
    r18, r50 = block.split("**ResNet-50")
    assert "**ResNet-18" in r18 and "| 1.0 +- 0.0 |" in r18 and "5.0" not in r18
    assert "| 5.0 +- 0.0 |" in r50 and "| 1.0 +- 0.0 |" not in r50


# ---------------------------------------------------------------- the method-vs-own-base pairs

#: What each leaf may change against the cell it is compared with (COMPARISONS): the paper's
#: addition and nothing else (OUTPUT_DIR aside).
_ADDED = {
    ("ianet", "ianet-base"): {"MODEL.BACKBONE.INSERTS"},
    ("ianet-renorm", "ianet-base"): {"MODEL.BACKBONE.INSERTS", "MODEL.IANET.FUSION_NORM"},
    ("pan", "pan-base"): {"MODEL.PAN.PAM_STAGES", "MODEL.PAN.PAM_DIMS"},
    # a tried variant (not the paper's): the same pair with softplus masks in both cells
    ("pan-softplus", "pan-base-softplus"): {"MODEL.PAN.PAM_STAGES", "MODEL.PAN.PAM_DIMS"},
    ("pfe", "pfe-base"): {"MODEL.BACKBONE.INSERTS"},  # stage I
    # a tried variant of stage I (not the paper's): TSAM plus its initial gate bias
    ("pfe-init3", "pfe-base"): {"MODEL.BACKBONE.INSERTS", "MODEL.PFE.TSAM_INIT_BIAS"},
    ("pmm", "pmm-base"): {"MODEL.PMM.LAYOUT", "MODEL.PMM.MIX"},
    ("pmm", "pmm-no-mix"): {"MODEL.PMM.MIX"},
    ("rmgl", "rmgl-base"): {
        "MODEL.RMGL.PATHS",
        "MODEL.RMGL.ABP_TRAIN",
        "MODEL.RMGL.ABP_TEST",
        "INPUT.TRANSFORMS",
    },
}
#: PFE stage II against stage I: the stage, its learning rate (the paper's / 10) and its
#: shorter schedule, and the non-strict load of the new side branches.
_STAGE2 = {
    "MODEL.PFE.STAGE",
    "SOLVER.BASE_LR",
    "SOLVER.MAX_EPOCH",
    "SOLVER.STEPS",
    "REIDZOO.STRICT_LOAD",
}


def _flat(node, prefix=""):
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _pair_cfg(cell, stage=0):
    config = rd.PAIR_MODELS[cell][1][stage].config
    return setup_cfg(os.path.join(REPO, rd.PAIRS_CONFIG_DIR, config), freeze=True)


def _differs(a, b):
    fa, fb = _flat(a), _flat(b)
    return {k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k)} - {"OUTPUT_DIR"}


def test_every_comparison_is_listed_with_its_addition():
    compared = {(m[0], b[0]) for _, _, m, b in rd.COMPARISONS if m[0] != b[0]}
    assert compared == set(_ADDED)
    assert set(rd.COST_MODELS) >= {c for _, _, m, b in rd.COMPARISONS for c in (m, b)}


@pytest.mark.parametrize("pair", sorted(_ADDED))
def test_pair_leaf_sets_only_the_papers_addition(pair):
    """Method and base differ exactly in the paper's addition (same budget, losses, test
    feature, input, schedule, seed), and every cell keeps the pairs' shared budget."""
    method, base = (_pair_cfg(c) for c in pair)
    assert _differs(method, base) == _ADDED[pair]
    shared = setup_cfg(os.path.join(REPO, rd.PAIRS_CONFIG_DIR, "Base-pairs.yml"), freeze=True)
    for cfg in (method, base):
        assert list(cfg.INPUT.SIZE_TRAIN) == list(cfg.INPUT.SIZE_TEST) == [192, 64]
        assert cfg.MODEL.BACKBONE.DEPTH == "18x" and cfg.MODEL.BACKBONE.PRETRAIN is False
        for key in ("MAX_EPOCH", "STEPS", "WARMUP_ITERS", "IMS_PER_BATCH"):
            assert cfg.SOLVER[key] == shared.SOLVER[key], key
        assert cfg.REIDZOO.SEED == shared.REIDZOO.SEED == 0


def test_pfe_stage2_changes_only_the_stage_and_its_schedule():
    stage1, stage2 = _pair_cfg("pfe", 0), _pair_cfg("pfe", 1)
    assert _differs(stage2, stage1) == _STAGE2
    assert stage2.SOLVER.BASE_LR == pytest.approx(stage1.SOLVER.BASE_LR / 10)
    # 18 of the paper's 120 stage I epochs, 12 of its 80 stage II epochs: 15 % each
    assert stage1.SOLVER.MAX_EPOCH / 120 == pytest.approx(stage2.SOLVER.MAX_EPOCH / 80)


def test_pfe_tried_cell_starts_every_tsam_mask_near_one():
    """The tried PFE cell builds stage I's network with every FAB / SEB gate bias at +3 (masks
    about 0.95 at the start); the paper's stage I keeps them at 0 (masks 0.5)."""
    from reidzoo.modeling.build import build_model

    def gate_biases(cell):
        cfg = _pair_cfg(cell).clone()
        cfg.defrost()
        cfg.MODEL.HEADS.NUM_CLASSES = 8
        model = build_model(cfg)
        gates = [m.fc2.bias for n, m in model.named_modules() if type(m).__name__ in ("FAB", "SEB")]
        return len(gates), {round(float(v), 6) for b in gates for v in b}

    assert gate_biases("pfe-init3") == (8, {3.0})  # FAB + SEB after each of the 4 stages
    assert gate_biases("pfe") == (8, {0.0})


def test_pan_tried_pair_has_softplus_masks_in_both_cells():
    acts = {c: _pair_cfg(c).MODEL.PAN.MASK_ACT for c in rd.PAIR_MODELS if c.startswith("pan")}
    assert acts == {
        "pan-base": "relu",
        "pan": "relu",
        "pan-base-softplus": "softplus",
        "pan-softplus": "softplus",
    }


@pytest.mark.parametrize("cell", sorted(rd.PAIR_MODELS))
def test_pair_cell_final_map_has_twelve_rows(cell):
    """At the pairs' 192x64 every model's last map (each branch's layer4 output) has at least
    12 rows, and PMM's is the paper's 24 x 8, so that its 8 x 4 grid mixes 3 x 2 blocks."""
    import torch

    from reidzoo.modeling.build import build_model

    cfg = _pair_cfg(cell, len(rd.PAIR_MODELS[cell][1]) - 1).clone()
    cfg.defrost()
    cfg.MODEL.HEADS.NUM_CLASSES = 8
    model = build_model(cfg).eval()
    shapes = []
    # the last block of every layer4 (staged backbones run the blocks one by one); RMGL: the
    # last stage of each granularity branch
    last = [list(m.children())[-1] for n, m in model.named_modules() if n.endswith("layer4")]
    last += [branch[-1] for branch in getattr(model, "branches", [])]
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape))) for m in last
    ]
    with torch.no_grad():
        model(torch.rand(1, 3, 192, 64) * 255)
    for h in hooks:
        h.remove()
    assert shapes, f"{cell}: no layer4 ran"
    # RMGL's receptive-partitioned path runs each of the k stripes as its own sample: k x
    # (12 / k rows) of the one image
    assert min(s[0] * s[2] for s in shapes) >= 12, shapes
    if cell.startswith("pmm"):
        assert {s[2:] for s in shapes} == {(24, 8)}, shapes


def test_pairs_are_paired_by_split_with_views_and_cost_ratios(tmp_path):
    """Differences are method - base on the splits both have; PFE's views read stage I's
    results and stage II's metric groups; ratios come from benchmarks/run.py's JSON."""
    records = str(tmp_path)
    for split, (m, b) in enumerate([(20.0, 10.0), (15.0, 16.0), (30.0, 21.0)]):
        _write_record(records, "pan", "viper", split, _m(m, 0, 0, m + 5))
        _write_record(records, "pan-base", "viper", split, _m(b, 0, 0, b + 1))
    _write_record(records, "pan", "viper", 7, _m(99.0, 0, 0, 99.0))  # no base: not paired
    groups = {"F5": _m(12.0, 0, 0, 20.0), "side": _m(9.0, 0, 0, 15.0)}
    stages = [{"final": _m(12.0, 0, 0, 20.0)}, {"final": _m(14.0, 0, 0, 23.0), "groups": groups}]
    _write_record(records, "pfe", "prid450s", 0, _m(14.0, 0, 0, 23.0), stages=stages)
    _write_record(records, "pfe-base", "prid450s", 0, _m(11.0, 0, 0, 21.0))
    with open(os.path.join(records, "costs.json"), "w") as f:
        json.dump(
            {
                "rows": [
                    {"model": "pairs-pan", "train_step_s": 3.0, "macs": 30},
                    {"model": "pairs-pan-base", "train_step_s": 2.0, "macs": 20},
                ]
            },
            f,
        )
    rows = {(r["added"], r["dataset"]): r for r in rd.pair_rows(records, rd.load_costs(
        os.path.join(records, "costs.json")))}  # fmt: skip
    pan = rows[("PAM", "viper")]
    assert pan["splits"] == [0, 1, 2]
    assert pan["Rank-1_diffs"] == [10.0, -1.0, 9.0]
    assert pan["Rank-1_diff_mean"] == pytest.approx(6.0) and pan["Rank-1_wins"] == 2
    assert pan["mAP_diffs"] == [14.0, 3.0, 13.0] and pan["mAP_wins"] == 3
    assert pan["Rank-1_method"] == (
        pytest.approx(statistics.mean([20, 15, 30])),
        pytest.approx(statistics.stdev([20, 15, 30])),
    )
    assert pan["step_ratio"] == pytest.approx(1.5) and pan["macs_ratio"] == pytest.approx(1.5)
    assert rows[("TSAM (stage I)", "prid450s")]["Rank-1_diffs"] == [1.0]
    assert rows[("stage I + II, concatenation", "prid450s")]["Rank-1_diffs"] == [3.0]
    assert rows[("stage II over stage I", "prid450s")]["mAP_diffs"] == [3.0]
    assert rows[("stage II: F5 alone vs stage I", "prid450s")]["mAP_diffs"] == [0.0]
    assert rows[("stage II: side alone vs stage I", "prid450s")]["Rank-1_diffs"] == [-3.0]
    assert rows[("TSAM (stage I)", "prid450s")]["step_ratio"] is None  # no cost rows
    assert ("IA blocks", "viper") not in rows  # nothing recorded
    block = rd.report_pairs(records)
    assert "| PAN | PAM | VIPeRSingleShot | 0,1,2 |" in block
    assert "+10.0, -1.0, +9.0 | +6.0 | 2 of 3 |" in block and "| 1.50 | 1.50 |" in block
    assert "PFE (stage I + II): F5 alone" in block and "PFE (stage I + II): side alone" in block


def test_record_keeps_first_and_last_diagnostics_and_report_averages_them(tmp_path, monkeypatch):
    """A cell trained with REIDZOO.DIAGNOSTICS.ENABLED keeps the first and last logged diag/
    values of each stage; the pairs report averages the last ones over the cell's splits."""
    logs, records = str(tmp_path / "logs"), str(tmp_path / "records")

    def fake_call(argv, cwd):
        out = argv[argv.index("OUTPUT_DIR") + 1]
        split = int(out.rstrip("/").split("split_")[1])
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump({"results": {"VIPeRSingleShot": _m(1.0, 2.0, 3.0, 4.0)}}, f)
        lines = [
            {"iteration": 0, "diag/grad/cls": 9.0, "diag/entropy/PAM/theta": 1.0, "loss": 5.0},
            {"iteration": 10, "total_loss": 4.0},  # no diag/ keys: not a diagnostics line
            {"iteration": 19, "diag/grad/cls": 2.0 + split, "diag/entropy/PAM/theta": 0.5,
             "diag/dead/PLM/mask": 0.25},
        ]  # fmt: skip
        with open(os.path.join(out, "metrics.json"), "w") as f:
            f.write("\n".join(json.dumps(x) for x in lines) + "\n{broken\n")
        return 0

    monkeypatch.setattr(rd.subprocess, "call", fake_call)
    for split in (0, 1):
        assert (
            rd.run_cell("pan", "viper", split, "/d", logs, records=records, suite="pairs") == "done"
        )
    with open(rd.record_path(records, "pan", "viper", 0)) as f:
        diag = json.load(f)["stages"][0]["diagnostics"]
    assert diag["first"] == {"iteration": 0, "diag/grad/cls": 9.0, "diag/entropy/PAM/theta": 1.0}
    assert diag["last"]["iteration"] == 19 and diag["last"]["diag/dead/PLM/mask"] == 0.25
    block = rd.report_pairs(records)
    assert "**Training diagnostics at the last logged iteration" in block
    assert (
        "| PAN | VIPeRSingleShot | 0,1 | 19 | cls 2.5 | - | PAM/theta 0.5 | PLM/mask 0.25 |"
        in block
    )
    assert rd.diagnostics(str(tmp_path / "nowhere")) == {}


def test_each_paper_readme_quotes_only_its_own_pair_lines(tmp_path):
    records = str(tmp_path / "records")
    for split, (m, b) in enumerate([(20.0, 10.0), (15.0, 16.0)]):
        _write_record(records, "pan", "viper", split, _m(m, 0, 0, m + 5))
        _write_record(records, "pan-base", "viper", split, _m(b, 0, 0, b + 1))
    _write_record(records, "rmgl", "prid450s", 0, _m(30.0, 0, 0, 40.0))
    _write_record(records, "rmgl-base", "prid450s", 0, _m(25.0, 0, 0, 35.0))
    readmes = {}
    for paper in ("IANet", "PAN", "PFE", "PMM", "RMGL"):
        readmes[paper] = tmp_path / f"{paper}.md"
        readmes[paper].write_text(
            f"# {paper}\n<!-- pairs:begin -->\nold\n<!-- pairs:end -->\nend\n"
        )
    written = rd.update_readmes(records, readme=lambda p: str(readmes[p]))
    assert len(written) == 5
    pan = readmes["PAN"].read_text()
    assert "| PAN | PAM | VIPeRSingleShot | 0,1 |" in pan and "+10.0, -1.0 | +4.5 | 1 of 2 |" in pan
    assert "RMGL" not in pan and "old" not in pan and pan.endswith("<!-- pairs:end -->\nend\n")
    assert "| RMGL | RP + ABP + RSA | PRID450S | 0 |" in readmes["RMGL"].read_text()
    assert "(no finished pair yet)" in readmes["IANet"].read_text()
    readmes["PMM"].write_text("# PMM, no markers\n")
    with pytest.raises(ValueError, match=r"PMM\.md: expected the markers <!-- pairs:begin -->"):
        rd.update_readmes(records, readme=lambda p: str(readmes[p]))


def test_every_paper_readme_has_the_pairs_markers():
    for paper in dict.fromkeys(c[0] for c in rd.COMPARISONS):
        text = open(rd.readme_path(paper)).read()
        assert all(m in text for m in rd.README_MARKS), paper


def test_pairs_suite_runs_its_own_cells_into_its_own_folders(tmp_path, capsys):
    rc = rd.main(
        ["run", "--suite", "pairs", "--models", "pfe", "--datasets", "viper", "--dry-run"]
        + ["--logs", str(tmp_path / "l"), "--records", str(tmp_path / "r")]
    )
    assert rc == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("$ ")]
    assert len(lines) == 2
    assert "configs/Pairs/PFE/stage1.yml" in lines[0] and "configs/Pairs/PFE/stage2.yml" in lines[1]
    stage1 = os.path.join(str(tmp_path / "l"), "pairs", "pfe", "viper", "split_0", "stage1")
    assert f"OUTPUT_DIR {stage1}" in lines[0]
    assert f"MODEL.WEIGHTS {os.path.join(stage1, 'model_final.pth')}" in lines[1]
    with pytest.raises(SystemExit, match="not cells of --suite pairs"):
        rd.main(["run", "--suite", "pairs", "--models", "baseline", "--dry-run"])


def test_pairs_record_keeps_stage2_metric_groups_apart(tmp_path, monkeypatch):
    """PFE stage II's results.json and metrics.json carry F5/ and side/ groups next to the
    paper's feature: the record keeps them as groups and never mistakes them for it."""
    logs, records = str(tmp_path / "logs"), str(tmp_path / "records")

    def fake_call(argv, cwd):
        out = argv[argv.index("OUTPUT_DIR") + 1]
        os.makedirs(out, exist_ok=True)
        res = {f"{g}{k}": v for g, m in (("", 5.0), ("F5/", 3.0), ("side/", 1.0))
               for k, v in _m(m, m, m, m).items()}  # fmt: skip
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump({"results": {"VIPeRSingleShot": res}}, f)
        with open(os.path.join(out, "metrics.json"), "w") as f:
            f.write(
                json.dumps({"iteration": 9, **{f"VIPeRSingleShot/{k}": v for k, v in res.items()}})
            )
        return 0

    monkeypatch.setattr(rd.subprocess, "call", fake_call)
    assert rd.run_cell("pfe", "viper", 0, "/d", logs, records=records, suite="pairs") == "done"
    with open(rd.record_path(records, "pfe", "viper", 0)) as f:
        rec = json.load(f)
    assert rec["suite"] == "pairs" and rec["metrics"]["Rank-1"] == 5.0
    assert rec["stages"][1]["groups"]["F5"]["mAP"] == 3.0
    assert rec["stages"][1]["groups"]["side"]["Rank-1"] == 1.0
    paper = {m: 5.0 for m in rd.METRICS}
    assert rec["stages"][1]["evaluations"] == [{"iteration": 9, **paper}]


def _between(text, marks, where):
    begin, end = marks
    assert begin in text and end in text, f"{where}: markers {marks} missing"
    return text.split(begin, 1)[1].split(end, 1)[0]


def test_tracked_pair_tables_are_what_the_records_give():
    """benchmarks/REAL_DATA.md's pairs block and every paper README's lines are exactly what
    `real_data.py collect --suite pairs` writes from the tracked records: a record added or
    changed without regenerating the tables (or a hand edit inside the markers) fails here."""
    records = os.path.join(REPO, "benchmarks", "real_data", "pairs")
    marks = rd.SUITES["pairs"][4]
    with open(os.path.join(REPO, "benchmarks", "REAL_DATA.md")) as f:
        tracked = _between(f.read(), marks, "benchmarks/REAL_DATA.md")
    assert tracked == "\n" + rd.report_pairs(records)
    for paper, table in rd.readme_tables(records).items():
        path = rd.readme_path(paper)
        with open(path) as f:
            quoted = _between(f.read(), rd.README_MARKS, path)
        assert "no finished pair" not in table, f"{paper}: no pair rows from the tracked records"
        assert quoted == "\n" + table, path
