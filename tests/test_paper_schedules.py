"""Every paper's Market-1501 config trains with its paper's schedule.

The learning rates come from :func:`reidzoo.schedule.schedule_table` (the tool behind
``python -m reidzoo.schedule``: the trainer's own model, optimizer, scheduler and learning-rate
hook run through fast-reid's training loop), read at each paper milestone and just before it;
the weight decays and head rates from the trainer's own optimizer param groups.
"""

import os

import pytest

from reidzoo.config import setup_cfg
from reidzoo.engine import ReidTrainer
from reidzoo.schedule import schedule_table
from tests.helpers import REPO

#: Training images of fast-reid's loaders (CUHK03: new 767/700 protocol, by box type).
TRAIN_IMAGES = {
    "Market1501": 12936,
    "DukeMTMC": 16522,
    "MSMT17": 32621,
    ("CUHK03", True): 7368,  # labeled boxes
    ("CUHK03", False): 7365,  # detected boxes
}


def _config(paper, name, *opts):
    return setup_cfg(
        os.path.join(REPO, "projects", paper, "configs", name), list(opts), freeze=False
    )


def _iters_per_epoch(cfg):
    """The trainer's ``len(train set) // IMS_PER_BATCH`` for the leaf's dataset."""
    (name,) = cfg.DATASETS.NAMES
    key = (name, bool(cfg.DATASETS.CUHK03.LABELED)) if name == "CUHK03" else name
    return TRAIN_IMAGES[key] // cfg.SOLVER.IMS_PER_BATCH


def _rates(cfg, iters_per_epoch):
    """``rate(unit)``: the base group's learning rate during epoch (or iteration) ``unit``,
    from the tool's table of changes."""
    table = schedule_table(cfg, iters_per_epoch)
    changes = table["lr"]

    def rate(unit):
        return changes[max(k for k in changes if k <= unit)]

    return table, rate


def _check(rate, expected):
    for unit, lr in expected.items():
        assert rate(unit) == pytest.approx(lr, rel=1e-9), (unit, rate(unit), lr)


def _optimizer_groups(cfg):
    """(name, lr, weight decay) of every parameter group of the trainer's optimizer."""
    cfg = cfg.clone()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.PRETRAIN = False
    cfg.MODEL.HEADS.NUM_CLASSES = 751
    model = ReidTrainer.build_model(cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer, _ = ReidTrainer.build_optimizer(cfg, model)
    out = []
    for g in optimizer.param_groups:
        (p,) = g["params"]  # fast-reid: one group per parameter
        out.append((names[id(p)], g["lr"], g["weight_decay"]))
    return out


def _no_warmup_iters_per_epoch(cfg):
    """Without warmup the rate is a function of the epoch alone (``BASE_LR * GAMMA ** #{STEPS
    <= epoch}``), so one iteration per epoch gives the same per-epoch table as the dataset's
    hundreds, 400 x faster."""
    assert cfg.SOLVER.WARMUP_ITERS == 0 and cfg.SOLVER.SCHED == "MultiStepLR"
    return 1


def test_ianet_60_epochs_x01_at_20_and_40():
    # paper §4.1: Adam 3e-4; epochs and drops from the authors' later code
    # (docs/decisions/ianet.md#schedule)
    cfg = _config("IANet", "IANet_R50_Market1501.yml")
    assert cfg.SOLVER.OPT == "Adam" and cfg.SOLVER.MAX_EPOCH == 60
    table, rate = _rates(cfg, _no_warmup_iters_per_epoch(cfg))
    assert table["unit"] == "epoch" and sorted(table["lr"]) == [0, 20, 40]
    _check(rate, {0: 3e-4, 19: 3e-4, 20: 3e-5, 39: 3e-5, 40: 3e-6, 59: 3e-6})
    assert {wd for _, _, wd in _optimizer_groups(cfg)} == {5e-4}


def test_pan_10000_iterations_div10_at_5000_and_7500():
    # paper §4.1: SGD, 0.01 pretrained / 0.1 new layers, /10 after 5,000 and 7,500 iterations
    cfg = _config("PAN", "PAN_R50_Market1501.yml")
    assert cfg.SOLVER.OPT == "SGD" and cfg.SOLVER.MAX_ITER == 10000
    table, rate = _rates(cfg, _iters_per_epoch(cfg))
    assert table["unit"] == "iter" and sorted(table["lr"]) == [0, 5000, 7500]
    _check(rate, {0: 1e-2, 4999: 1e-2, 5000: 1e-3, 7499: 1e-3, 7500: 1e-4, 9999: 1e-4})
    groups = _optimizer_groups(cfg)
    heads = {lr for n, lr, _ in groups if n.startswith("heads.")}
    backbone = {lr for n, lr, _ in groups if n.startswith("backbone.")}
    assert heads == {0.1} and backbone == {0.01}
    assert {wd for _, _, wd in groups} == {5e-4}


@pytest.mark.parametrize(
    "name, expected, table_keys",
    [
        # §V-B stage I: Adam 3.5e-4, x0.1 at 40 and 70, 120 epochs
        (
            "PFE_R50_Market1501_stage1.yml",
            {0: 3.5e-4, 39: 3.5e-4, 40: 3.5e-5, 69: 3.5e-5, 70: 3.5e-6, 119: 3.5e-6},
            [0, 40, 70],
        ),
        # §V-B stage II: 3.5e-5, x0.1 at 30 and 60, 80 epochs
        (
            "PFE_R50_Market1501_stage2.yml",
            {0: 3.5e-5, 29: 3.5e-5, 30: 3.5e-6, 59: 3.5e-6, 60: 3.5e-7, 79: 3.5e-7},
            [0, 30, 60],
        ),
    ],
)
def test_pfe_stage_schedules(name, expected, table_keys):
    cfg = _config("PFE", name)
    assert cfg.SOLVER.MAX_EPOCH == max(expected) + 1
    table, rate = _rates(cfg, _no_warmup_iters_per_epoch(cfg))
    assert table["unit"] == "epoch" and sorted(table["lr"]) == table_keys
    _check(rate, expected)


def test_pmm_warmup_50_then_1e3_until_200_1e4_until_300_1e5_to_400():
    # §3.1 follows BDB's recipe (official code: 1e-4 -> 1e-3 over 50 epochs, 1e-3, 1e-4 from
    # epoch 200, 1e-5 from 300, 400 epochs); reidzoo warms up linearly per iteration
    cfg = _config("PMM", "PMM_R50_Market1501.yml")
    ipe = _iters_per_epoch(cfg)
    assert ipe == 202 and cfg.SOLVER.MAX_EPOCH == 400 and cfg.SOLVER.OPT == "Adam"
    table, rate = _rates(cfg, ipe)
    assert max(table["lr"]) == 300 and sorted(table["lr"])[-3:] == [50, 200, 300]
    # epoch 25 of 50: halfway from 0.1 x 1e-3 to 1e-3
    _check(rate, {0: 1e-4, 25: 5.5e-4, 49: 1e-4 + 9e-4 * 49 / 50, 50: 1e-3, 199: 1e-3})
    _check(rate, {200: 1e-4, 299: 1e-4, 300: 1e-5, 399: 1e-5})
    assert all(table["lr"][e] < table["lr"][e + 1] for e in range(50))  # warmup rises
    assert {wd for _, _, wd in _optimizer_groups(cfg)} == {5e-4}


def test_rmgl_exp_warmup_3_epochs_then_x01_at_30_and_50_and_bias_decay():
    # §IV-A: exponential warmup 1e-5 -> 1e-2 over 3 epochs, x0.1 after 30 and 50 epochs,
    # L2 weight decay 1e-3 (biases included), reductions and classifiers at 10x
    cfg = _config("RMGL", "RMGL_R50_Market1501.yml")
    ipe = _iters_per_epoch(cfg)
    assert ipe == 269 and cfg.SOLVER.MAX_EPOCH == 60
    table, rate = _rates(cfg, ipe)
    assert sorted(table["lr"]) == [0, 1, 2, 3, 30, 50]
    _check(rate, {0: 1e-5, 1: 1e-4, 2: 1e-3, 3: 1e-2, 29: 1e-2, 30: 1e-3})
    _check(rate, {49: 1e-3, 50: 1e-4, 59: 1e-4})
    groups = _optimizer_groups(cfg)
    biases = [(n, wd) for n, _, wd in groups if n.endswith(".bias")]
    assert len(biases) > 40 and {wd for _, wd in biases} == {1e-3}, biases[:3]
    assert {wd for _, _, wd in groups} == {1e-3}
    assert {lr for n, lr, _ in groups if n.startswith("heads.")} == {0.1}
    assert {lr for n, lr, _ in groups if not n.startswith("heads.")} == {0.01}


@pytest.mark.parametrize(
    "paper, epochs",
    [("PMM", 50), ("RMGL", 3)],
)
@pytest.mark.parametrize("dataset", ["Market1501", "DukeMTMC", "MSMT17", "CUHK03"])
def test_every_leaf_warms_up_over_its_own_dataset_epochs(paper, epochs, dataset):
    """Warmup is given in iterations: each leaf sets the paper's warmup epochs times its own
    dataset's iterations per epoch (a Market value on MSMT17 would warm up for 1.6 epochs)."""
    cfg = _config(paper, f"{paper}_R50_{dataset}.yml")
    assert cfg.SOLVER.WARMUP_ITERS == epochs * _iters_per_epoch(cfg)
