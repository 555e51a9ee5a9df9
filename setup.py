"""Packaging for reidzoo: the core package plus one package per paper under projects/."""

import glob
import os
import re

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
#: Where a regular install keeps the shipped configs, in the repository's layout (``configs/``,
#: ``projects/<Paper>/configs/``) so that relative ``_BASE_`` chains resolve unchanged; must
#: match ``reidzoo.inference.PACKAGED_CONFIG_ROOT``.
PACKAGED_CONFIGS = "reidzoo/shipped_configs"


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


def shipped_config_files(root=HERE):
    """The YAML configs a regular install ships: ``configs/**`` and ``projects/*/configs/**``.

    Registered model names (``reidzoo.inference.registered_models``) are derived from these
    files; ``Base-*`` files and ``ablations/`` are shipped too, as configs inherit from them.

    Returns:
        list[str]: paths relative to ``root``, with ``/`` separators, sorted.
    """
    patterns = [("configs", "**", "*.yml"), ("projects", "*", "configs", "**", "*.yml")]
    found = [p for parts in patterns for p in glob.glob(os.path.join(root, *parts), recursive=True)]
    return sorted(os.path.relpath(p, root).replace(os.sep, "/") for p in found)


class BuildPyWithConfigs(build_py):
    """``build_py`` that also copies :func:`shipped_config_files` under ``PACKAGED_CONFIGS``.

    The configs live outside the ``reidzoo`` package folder, where ``package_data`` cannot
    reach. An editable install reads them from the repository and copies nothing.
    """

    def _config_mapping(self):
        files = shipped_config_files()
        if not files:
            # a wheel without them would install with no model names (an sdist that lost them)
            raise RuntimeError(
                f"no configs under {HERE}/configs or {HERE}/projects/*/configs to ship "
                "(MANIFEST.in must include them in an sdist)"
            )
        dst = os.path.join(self.build_lib, *PACKAGED_CONFIGS.split("/"))
        return {os.path.join(dst, *rel.split("/")): os.path.join(HERE, rel) for rel in files}

    def run(self):
        super().run()
        if self.editable_mode:
            return
        for target, source in self._config_mapping().items():
            self.mkpath(os.path.dirname(target))
            self.copy_file(source, target)

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        if self.editable_mode:
            return outputs
        return outputs + list(self._config_mapping())


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
    cmdclass={"build_py": BuildPyWithConfigs},
    # Each paper package registers itself through the same plugin group third parties use.
    entry_points={
        "reidzoo.plugins": [f"{name.rsplit('.', 1)[1]} = {name}" for name in PROJECTS],
    },
)
