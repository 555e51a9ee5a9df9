"""setup.py maps projects/<Paper>/<pkg> to reidzoo.projects.<pkg>, for regular and editable
installs, and registers each paper package as a plugin."""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

from tests.conftest import REPO

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


def _site_packages():
    return sysconfig.get_paths()["purelib"]


def _pip(*args, python=sys.executable):
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    if python != sys.executable:
        cmd += ["--python", python]
    r = subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def _bare_venv(path):
    """A venv that sees this environment's third-party packages (torch, fastreid) but not
    its editable reidzoo: its .pth adds the site-packages folder without processing it."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    py = str(path / "bin" / "python")
    purelib = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    with open(os.path.join(purelib, "zz_parent_env.pth"), "w") as f:
        f.write(_site_packages() + "\n")
    return py


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
    py = _bare_venv(tmp_path / "venv")
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
