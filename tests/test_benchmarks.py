"""The cost harness (benchmarks/run.py) on a tiny model: every field present and sane.

No speed is asserted: the numbers are recorded in BENCHMARKS.md, never tested.
"""

import importlib.util
import math
import os

import pytest

from tests.helpers import REPO


def _load_run():
    spec = importlib.util.spec_from_file_location(
        "reidzoo_benchmarks_run", os.path.join(REPO, "benchmarks", "run.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run = _load_run()

TINY = (
    "MODEL.BACKBONE.DEPTH", "18x",
    "MODEL.BACKBONE.FEAT_DIM", "512",
    "MODEL.HEADS.NUM_CLASSES", "10",
) + run.size(64, 32)  # fmt: skip

ROW_KEYS = {
    "model", "config", "opts", "input", "input_train", "batch", "pk", "params", "macs",
    "uncounted_ops", "train_step_s", "train_step_times", "losses", "eager_img_s",
    "eager_batch_times", "onnx_img_s", "onnx_batch_times", "onnx_parity_rel", "threads",
    "peak_rss_mib",
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_row():
    opts = run.COMMON_OPTS + TINY
    return run.measure(
        os.path.join(REPO, run.BAGTRICKS), opts, batch=8, steps=1, warmup=0, name="tiny"
    ), opts


def test_measure_row_fields_are_sane(tiny_row):
    from reidzoo.config import setup_cfg
    from reidzoo.modeling.build import build_eval_model

    row, opts = tiny_row
    assert ROW_KEYS <= set(row)
    assert row["model"] == "tiny" and row["config"] == run.BAGTRICKS
    assert row["input"] == [64, 32] and row["input_train"] == [64, 32]
    assert row["batch"] == 8 and row["pk"] == [2, 4]

    model = build_eval_model(setup_cfg(os.path.join(REPO, run.BAGTRICKS), opts), False)
    assert row["params"] == sum(p.numel() for p in model.parameters())
    assert row["macs"] > 0

    assert len(row["train_step_times"]) == 1 and row["train_step_s"] > 0
    assert len(row["eager_batch_times"]) == 1 and len(row["onnx_batch_times"]) == 1
    for key in ("eager_img_s", "onnx_img_s", "peak_rss_mib"):
        assert row[key] > 0 and math.isfinite(row[key]), key
    assert set(row["losses"]) == {"loss_cls", "loss_triplet"}
    assert all(math.isfinite(v) for v in row["losses"].values())
    assert 0 <= row["onnx_parity_rel"] <= 1e-4
    assert row["threads"] >= 1


def test_ratios_and_markdown(tiny_row):
    row, _ = tiny_row
    base = dict(row, model=run.BASE_256)
    other = dict(row, model="ianet-256x128", train_step_s=2 * row["train_step_s"])
    rows = run.add_ratios([base, other])
    assert rows[0]["baseline"] == run.BASE_256 and rows[0]["ratio_macs"] == pytest.approx(1.0)
    assert rows[1]["baseline"] == run.BASE_256
    assert rows[1]["ratio_train_step_s"] == pytest.approx(2.0)
    assert rows[1]["ratio_eager_img_s"] == pytest.approx(1.0)

    report = {
        "command": "python benchmarks/run.py --markdown", "date": "today",
        "machine": run.machine_info(), "load_before": [0, 0, 0], "load_after": [0, 0, 0],
        "wall_s": 1.0, "batch": 8, "steps": 1, "warmup": 0, "rows": rows,
    }  # fmt: skip
    text = run.format_markdown(report)
    header = text.splitlines()[0]
    for column in ("model", "params (M)", "MACs (G)", "ratio MACs", "train step s (batch 8)",
                   "eager img/s", "ONNX img/s", "peak RSS MiB"):  # fmt: skip
        assert column in header
    assert "| ianet-256x128 | 64x32 |" in text and "nproc" in text


def _test_size(name):
    from reidzoo.config import setup_cfg

    spec = run.MODELS[name]
    cfg = setup_cfg(os.path.join(REPO, spec.config), list(run.COMMON_OPTS + spec.opts))
    return list(cfg.INPUT.SIZE_TEST)


def test_registry_baselines_and_resolution():
    for name, spec in run.MODELS.items():
        assert spec.baseline in run.MODELS, name
        assert os.path.isfile(os.path.join(REPO, spec.config)), spec.config
        assert len(spec.opts) % 2 == 0, name
    sizes = {n: _test_size(n) for n in run.MODELS}
    for name, spec in run.MODELS.items():  # ratios need the same input size (add_ratios)
        assert sizes[name] == sizes[spec.baseline], name
    assert run.resolve_models(["ianet-256x128"]) == ["ianet-256x128", run.BASE_256]
    with pytest.raises(KeyError, match="registered"):
        run.resolve_models(["no-such-model"])
    with pytest.raises(ValueError, match="multiple"):
        run.pk_labels(6, 4)


def test_openvino_column_only_when_measured(tiny_row):
    import importlib.util

    row, _ = tiny_row
    if importlib.util.find_spec("openvino") is None:
        assert row["openvino_img_s"] is None and row["openvino_parity_rel"] is None
    else:  # the [openvino] extra: the IR was exported, checked and timed
        assert row["openvino_img_s"] > 0 and len(row["openvino_batch_times"]) == 1
        assert 0 <= row["openvino_parity_rel"] <= 1e-4

    def report(rows):
        return {
            "command": "c", "date": "d", "machine": dict(run.machine_info(), openvino=None),
            "load_before": [0, 0, 0], "load_after": [0, 0, 0], "wall_s": 1.0, "batch": 8,
            "steps": 1, "warmup": 0, "rows": rows,
        }  # fmt: skip

    absent = dict(row, model=run.BASE_256, openvino_img_s=None)
    text = run.format_markdown(report(run.add_ratios([absent])))
    assert "OpenVINO" not in text.splitlines()[0]
    assert absent["ratio_openvino_img_s"] is None
    base = dict(row, model=run.BASE_256, openvino_img_s=10.0)
    other = dict(row, model="ianet-256x128", openvino_img_s=5.0)
    text = run.format_markdown(report(run.add_ratios([base, other])))
    header, rule = text.splitlines()[:2]
    assert "| ONNX img/s | OpenVINO img/s | peak RSS MiB |" in header
    assert header.count("|") == rule.count("|")
    assert other["ratio_openvino_img_s"] == pytest.approx(0.5)
    assert "| 5.0 (0.50x) |" in text
