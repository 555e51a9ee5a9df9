"""setup.py maps projects/<Paper>/<pkg> to reidzoo.projects.<pkg>, for regular and editable
installs, and registers each paper package as a plugin."""

import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from tests.helpers import REPO, bare_venv, purelib

# pip wheel / pip install of a copy of the repository.
pytestmark = pytest.mark.slow

PROBE = (
    "import importlib.metadata as m, reidzoo, reidzoo.projects.toy_pkg as t, "
    "reidzoo.projects.toy_pkg.sub as s;"
    "eps = [e.value for e in m.entry_points(group='reidzoo.plugins')];"
    "print('FILE', reidzoo.__file__); print('TOY', t.MARK, s.MARK); print('EPS', eps)"
)


@pytest.fixture(scope="module")
def repo_with_toy_project(tmp_path_factory):
    dst = tmp_path_factory.mktemp("repo") / "reidzoo_src"
    ignore = shutil.ignore_patterns(".venv", ".git", "*.egg-info", "build", "__pycache__", "logs")
    shutil.copytree(REPO, dst, ignore=ignore)
    pkg = dst / "projects" / "Toy" / "toy_pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("MARK = 'toy'\n")
    (pkg / "sub" / "__init__.py").write_text("MARK = 'sub'\n")
    (dst / "projects" / "Toy" / "configs").mkdir()
    return dst


def _pip(*args, python=sys.executable):
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    if python != sys.executable:
        cmd += ["--python", python]
    r = subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def _probe(py, cwd):
    r = subprocess.run([py, "-c", PROBE], capture_output=True, text=True, cwd=cwd, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_wheel_contains_mapped_project(repo_with_toy_project, tmp_path):
    _pip(
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        str(tmp_path),
        str(repo_with_toy_project),
    )
    (wheel,) = [f for f in os.listdir(tmp_path) if f.endswith(".whl")]
    names = zipfile.ZipFile(tmp_path / wheel).namelist()
    assert "reidzoo/projects/toy_pkg/__init__.py" in names
    assert "reidzoo/projects/toy_pkg/sub/__init__.py" in names
    assert not any(n.startswith("projects/") for n in names)
    ep = [n for n in names if n.endswith("entry_points.txt")]
    text = zipfile.ZipFile(tmp_path / wheel).read(ep[0]).decode()
    assert "[reidzoo.plugins]" in text and "toy_pkg = reidzoo.projects.toy_pkg" in text


@pytest.mark.parametrize("editable", [False, True], ids=["regular", "editable"])
def test_install_imports_from_any_directory(repo_with_toy_project, tmp_path, editable):
    py = bare_venv(tmp_path / "venv")
    src = str(repo_with_toy_project)
    _pip(
        "install",
        "--no-deps",
        "--no-build-isolation",
        *(["-e", src] if editable else [src]),
        python=py,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = _probe(py, str(elsewhere))
    file_line = out.split("FILE ", 1)[1].split("\n", 1)[0]
    if editable:
        assert file_line.startswith(src)
    else:
        assert str(tmp_path / "venv") in file_line
    assert "TOY toy sub" in out
    assert "reidzoo.projects.toy_pkg" in out
    # model names: an editable install reads the repository's configs where they are edited,
    # a regular one the copy it ships (see test_wheel_install_resolves_model_names)
    listed = _list_models(py, str(elsewhere))
    root = src if editable else os.path.join(purelib(py), "reidzoo", "shipped_configs")
    assert listed["ianet-market1501"] == os.path.join(
        root, "projects", "IANet", "configs", "IANet_R50_Market1501.yml"
    )


def _list_models(py, cwd):
    """``python -m reidzoo.extract --list-models`` of an interpreter, as {name: path}."""
    r = subprocess.run(
        [py, "-m", "reidzoo.extract", "--list-models"],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return dict(line.split("\t") for line in r.stdout.splitlines())


# Every registered name's merged config (its _BASE_ chain followed), and features from a name.
CONFIG_PROBE = """
import hashlib, json, sys
import numpy as np
from reidzoo import FeatureExtractor
from reidzoo.config import setup_cfg
from reidzoo.inference import registered_models
dumps = {n: hashlib.sha256(setup_cfg(n).dump().encode()).hexdigest() for n in registered_models()}
ex = FeatureExtractor("ianet-market1501", allow_random_weights=True, num_workers=0,
                      opts=["MODEL.BACKBONE.PRETRAIN", "False"])
feats = ex.extract(np.zeros((64, 32, 3), np.uint8)).features
print(json.dumps({"dumps": dumps, "backbone": ex.cfg.MODEL.BACKBONE.NAME,
                  "shape": list(feats.shape)}))
"""


def test_wheel_install_resolves_model_names(repo_with_toy_project, tmp_path):
    """A wheel ships configs/ and projects/*/configs/ (Base files and ablations included), so a
    regular install used from another folder lists the same model names as the source tree and
    resolves each to the same merged config, _BASE_ chains included."""

    from reidzoo.inference import registered_models

    src = str(repo_with_toy_project)
    dist = tmp_path / "dist"
    _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), src)
    (wheel,) = [str(dist / f) for f in os.listdir(dist) if f.endswith(".whl")]
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = "reidzoo/shipped_configs/"
    for rel in (
        "configs/Base-bagtricks.yml",
        "configs/Demo/bagtricks_R18_synthetic.yml",
        "projects/IANet/configs/Base-IANet.yml",
        "projects/IANet/configs/IANet_R50_Market1501.yml",
        "projects/RMGL/configs/ablations/tab6_none.yml",
    ):
        assert shipped + rel in names, rel

    py = bare_venv(tmp_path / "venv")
    _pip("install", "--no-deps", "--no-build-isolation", wheel, python=py)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    listed = _list_models(py, str(elsewhere))
    expected = registered_models(src)
    assert listed.keys() == expected.keys() and "ianet-market1501" in listed
    root = os.path.join(purelib(py), "reidzoo", "shipped_configs")
    for name, path in listed.items():
        assert os.path.isfile(path), name
        assert os.path.relpath(path, root) == os.path.relpath(expected[name], src), name

    r = subprocess.run(
        [py, "-c", CONFIG_PROBE], capture_output=True, text=True, cwd=str(elsewhere), timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    probe = json.loads(r.stdout.strip().splitlines()[-1])
    assert probe["backbone"] == "build_ianet_backbone" and probe["shape"] == [1, 2048]
    # In a fresh process too, in the same (name) order: a config holds the nodes of every
    # package imported so far in its process (reidzoo.config.get_cfg), so dumps made in this
    # test process, which has imported every paper, would differ from a fresh one's.
    digests = (
        "import hashlib, json, sys\n"
        "from reidzoo.config import setup_cfg\n"
        "from reidzoo.inference import registered_models\n"
        "print(json.dumps({n: hashlib.sha256(setup_cfg(p).dump().encode()).hexdigest()\n"
        "                  for n, p in registered_models(sys.argv[1]).items()}))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", digests, src], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    source = json.loads(r.stdout.strip().splitlines()[-1])
    assert source.keys() == expected.keys()
    for name in expected:
        assert probe["dumps"][name] == source[name], name
