"""Export and complexity on the demo baseline config itself (random weights)."""

import json
import os
import re

from reidzoo import complexity, export
from tests.helpers import REPO

DEMO = os.path.join(REPO, "configs", "Demo", "bagtricks_R18_synthetic.yml")


def test_demo_complexity(capsys):
    assert complexity.main(["--config-file", DEMO]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["input"] == [128, 64]
    # ResNet-18 trunk (11,176,512) + BNNeck (1,024) + classifier sized by NUM_CLASSES (0 here)
    assert out["params"] == 11_176_512 + 1_024
    assert 0.4e9 < out["macs"] < 0.8e9


def test_demo_export_parity(tmp_path, capsys):
    path = str(tmp_path / "demo.onnx")
    assert export.main(["--config-file", DEMO, "--output", path, "--batch", "4"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    m = re.fullmatch(r"parity max_abs_diff=(\S+) rel=(\S+)", last)
    assert m and float(m.group(2)) <= 1e-4
    assert os.path.getsize(path) > 1_000_000
