"""Packaging for reidzoo: the core package plus one package per paper under projects/."""

import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def discover_projects(root=os.path.join(HERE, "projects")):
    """Map ``reidzoo.projects.<pkg>`` to ``projects/<Paper>/<pkg>`` for every paper package.

    A paper package is a lower-case folder with an ``__init__.py`` directly inside a
    ``projects/<Paper>/`` folder (detectron2's project anatomy).

    Returns:
        dict[str, str]: package name -> folder, relative to this file.
    """
    mapping = {}
    if not os.path.isdir(root):
        return mapping
    for paper in sorted(os.listdir(root)):
        paper_dir = os.path.join(root, paper)
        if not os.path.isdir(paper_dir):
            continue
        for pkg in sorted(os.listdir(paper_dir)):
            pkg_dir = os.path.join(paper_dir, pkg)
            if re.fullmatch(r"[a-z_][a-z0-9_]*", pkg) and os.path.isfile(
                os.path.join(pkg_dir, "__init__.py")
            ):
                name = f"reidzoo.projects.{pkg}"
                if name in mapping:
                    raise RuntimeError(f"two paper packages are named '{pkg}': {mapping[name]}")
                mapping[name] = os.path.relpath(pkg_dir, HERE).replace(os.sep, "/")
    return mapping


PROJECTS = discover_projects()

packages = find_packages(include=["reidzoo", "reidzoo.*"])
package_dir = {}
for name, folder in PROJECTS.items():
    package_dir[name] = folder
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_packages(where=os.path.join(HERE, folder))]

setup(
    packages=packages,
    package_dir=package_dir,
    # Each paper package registers itself through the same plugin group third parties use.
    entry_points={
        "reidzoo.plugins": [f"{name.rsplit('.', 1)[1]} = {name}" for name in PROJECTS],
    },
)
