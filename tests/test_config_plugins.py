"""Config hooks, registries, transform splicing and the two plugin routes."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torchvision.transforms as T

from reidzoo.config import add_node, add_reidzoo_config, get_cfg, setup_cfg
from reidzoo.data.transforms import build_transforms_with_registry
from reidzoo.registry import TRANSFORM_REGISTRY
from tests.helpers import REPO

TOY_MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn
    from reidzoo.config import add_node, register_config
    from reidzoo.registry import BACKBONE_REGISTRY, HEADS_REGISTRY, TRANSFORM_REGISTRY


    @register_config
    def add_toy_config(cfg):
        add_node(cfg, "MODEL.TOY", {"WIDTH": 4})


    @BACKBONE_REGISTRY.register()
    def build_toy_backbone(cfg):
        return nn.Conv2d(3, cfg.MODEL.TOY.WIDTH, 3, stride=4, padding=1)


    @HEADS_REGISTRY.register()
    class ToyHead(nn.Module):
        def __init__(self, cfg):
            super().__init__()
            self.width = cfg.MODEL.TOY.WIDTH

        def forward(self, features, targets=None):
            return features.mean((2, 3))


    @TRANSFORM_REGISTRY.register()
    class ToyTransform:
        stage = "pil"

        def __init__(self, cfg, is_train):
            self.is_train = is_train

        def __call__(self, img):
            return img
    """
)

CHECK = textwrap.dedent(
    """
    import sys, torch
    from fastreid.modeling.meta_arch import build_model
    from reidzoo.config import setup_cfg
    from reidzoo.data.transforms import build_transforms_with_registry
    cfg = setup_cfg(sys.argv[1], sys.argv[2:])
    model = build_model(cfg).eval()
    out = model(torch.rand(2, 3, 64, 32) * 255)
    names = [type(t).__name__ for t in build_transforms_with_registry(cfg, True).transforms]
    print("RESULT", type(model.backbone).__name__, type(model.heads).__name__,
          tuple(out.shape), names.index("ToyTransform") < names.index("ToTensor"))
    """
)

YAML = textwrap.dedent(
    """
    MODEL:
      DEVICE: cpu
      BACKBONE: {{NAME: build_toy_backbone}}
      HEADS: {{NAME: ToyHead, NUM_CLASSES: 3}}
      TOY: {{WIDTH: 7}}
    INPUT: {{TRANSFORMS: [ToyTransform], SIZE_TRAIN: [64, 32], SIZE_TEST: [64, 32]}}
    {extra}
    """
)


def _run(tmp_path, yaml_extra, env_extra):
    (tmp_path / "toy_plugin_mod.py").write_text(TOY_MODULE)
    (tmp_path / "check.py").write_text(CHECK)
    cfg_file = tmp_path / "toy.yml"
    cfg_file.write_text(YAML.format(extra=yaml_extra))
    env = dict(os.environ, PYTHONPATH=str(tmp_path), **env_extra)
    r = subprocess.run(
        [sys.executable, str(tmp_path / "check.py"), str(cfg_file)],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(tmp_path),
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.split("RESULT", 1)[1].split()


@pytest.mark.slow  # a fresh interpreter per check
def test_plugin_via_custom_imports(tmp_path):
    out = _run(tmp_path, "REIDZOO: {CUSTOM_IMPORTS: [toy_plugin_mod]}", {})
    assert out == ["Conv2d", "ToyHead", "(2,", "7)", "True"]


@pytest.mark.slow  # a fresh interpreter per check
def test_plugin_via_entry_point(tmp_path):
    dist = tmp_path / "toy_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[reidzoo.plugins]\ntoy = toy_plugin_mod\n")
    out = _run(tmp_path, "", {})
    assert out == ["Conv2d", "ToyHead", "(2,", "7)", "True"]


def test_plugin_missing_module_is_named(tmp_path):
    cfg_file = tmp_path / "bad.yml"
    cfg_file.write_text("REIDZOO: {CUSTOM_IMPORTS: [no_such_plugin_module]}\n")
    with pytest.raises(ImportError, match="no_such_plugin_module"):
        setup_cfg(str(cfg_file))


def test_hooks_are_idempotent_and_never_overwrite():
    cfg = get_cfg()
    cfg.REIDZOO.STRICT_LOAD = False
    before = cfg.dump()
    add_reidzoo_config(cfg)
    assert cfg.dump() == before and cfg.REIDZOO.STRICT_LOAD is False
    with pytest.raises(KeyError, match="MODEL.DEVICE"):
        add_node(cfg, "MODEL.DEVICE", {"X": 1})
    node = add_node(cfg, "MODEL.NEWNODE", {"A": 1, "B": {"C": 2}})
    node.A = 5
    add_node(cfg, "MODEL.NEWNODE", {"A": 1, "B": {"C": 2, "D": 3}})
    assert cfg.MODEL.NEWNODE.A == 5 and cfg.MODEL.NEWNODE.B.D == 3


def test_unknown_config_key_is_named(tmp_path):
    f = tmp_path / "c.yml"
    f.write_text("MODEL:\n  BACKBONE:\n    DEPHT: 50x\n")
    with pytest.raises(KeyError, match="MODEL.BACKBONE.DEPHT"):
        setup_cfg(str(f))
    with pytest.raises(KeyError, match="SOLVER.NOPE"):
        setup_cfg("", ["SOLVER.NOPE", "1"])
    with pytest.raises(FileNotFoundError, match="missing.yml"):
        setup_cfg(str(tmp_path / "missing.yml"))


def test_unknown_component_names_list_registered():
    from reidzoo.modeling.build import build_model

    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.BACKBONE.NAME", "nope_backbone"])
    with pytest.raises(KeyError, match="MODEL.BACKBONE.NAME: .*build_staged_resnet_backbone"):
        build_model(cfg)
    cfg.INPUT.TRANSFORMS = ["NoSuchTransform"]
    with pytest.raises(KeyError, match="TRANSFORM"):
        build_transforms_with_registry(cfg, True)


class _AddOne:
    stage = "tensor"

    def __init__(self, cfg, is_train):
        pass

    def __call__(self, x):
        return x + 1


def test_tensor_stage_runs_after_to_tensor():
    if "ZooTestAddOne" not in TRANSFORM_REGISTRY._obj_map:
        TRANSFORM_REGISTRY._do_register("ZooTestAddOne", _AddOne)
    cfg = get_cfg()
    cfg.INPUT.SIZE_TEST = [8, 4]
    cfg.INPUT.TRANSFORMS = ["ZooTestAddOne"]
    pipe = build_transforms_with_registry(cfg, is_train=False)
    names = [type(t).__name__ for t in pipe.transforms]
    assert names == ["Resize", "ToTensor", "_AddOne"]
    from PIL import Image

    out = pipe(Image.new("RGB", (4, 8), (10, 20, 30)))
    assert torch.equal(out[:, 0, 0], torch.tensor([11.0, 21.0, 31.0]))
    assert isinstance(pipe, T.Compose)


def test_editable_install_imports_from_any_directory(tmp_path):
    r = subprocess.run(
        [sys.executable, "-c", "import reidzoo, reidzoo.projects; print(reidzoo.__file__)"],
        capture_output=True,
        text=True,
        cwd=str(tmp_path),
    )
    assert r.returncode == 0, r.stderr
    assert os.path.realpath(r.stdout.strip()).startswith(os.path.realpath(REPO))


def _shipped_configs():
    import glob

    patterns = [("configs", "**", "*.yml"), ("projects", "*", "configs", "**", "*.yml")]
    return sorted(f for p in patterns for f in glob.glob(os.path.join(REPO, *p), recursive=True))


@pytest.mark.slow  # a fresh interpreter per check
def test_fastreid_datasets_reaches_every_shipped_config(tmp_path, monkeypatch):
    """README: ``DATASETS.ROOT`` (or ``$FASTREID_DATASETS``, else ``./datasets``). A root set in
    a shipped config would hide the environment variable, so none sets one."""
    from reidzoo.config import dataset_root

    configs = _shipped_configs()
    assert len(configs) > 30  # configs/, every paper's leaves, bases and ablations
    env_root = str(tmp_path / "my_datasets")
    explicit = str(tmp_path / "explicit")
    for path in configs:
        monkeypatch.setenv("FASTREID_DATASETS", env_root)
        assert dataset_root(setup_cfg(path)) == env_root, path
        assert dataset_root(setup_cfg(path, ["DATASETS.ROOT", explicit])) == explicit, path
        monkeypatch.delenv("FASTREID_DATASETS")
        assert dataset_root(setup_cfg(path)) == "datasets", path


def test_setup_cfg_takes_registered_model_names(tmp_path):
    from reidzoo.inference import registered_models

    names = registered_models()
    demo = os.path.join(REPO, "configs", "Demo", "bagtricks_R18_synthetic.yml")
    by_name = setup_cfg("demo-bagtricks-synthetic", ["SOLVER.MAX_EPOCH", "3"])
    assert by_name.dump() == setup_cfg(demo, ["SOLVER.MAX_EPOCH", "3"]).dump()
    assert setup_cfg("rmgl-synthetic-ci").MODEL.META_ARCHITECTURE == "RMGL"
    with pytest.raises(ValueError, match="registered names: .*demo-bagtricks-synthetic") as err:
        setup_cfg("demo-bagtrick-synthetic")  # a typo: neither a file nor a name
    assert "'demo-bagtrick-synthetic'" in str(err.value) and len(names) > 20
    with pytest.raises(FileNotFoundError, match="nowhere/config.yml"):
        setup_cfg(str(tmp_path / "nowhere" / "config.yml"))


BROKEN_CHECK = textwrap.dedent(
    """
    import json, os, sys, warnings
    warnings.simplefilter("always")  # the plugin machinery itself must warn only once
    import reidzoo
    from reidzoo import plugins
    from reidzoo.config import get_cfg, setup_cfg
    from reidzoo.engine import default_argument_parser, main
    from fastreid.modeling.meta_arch import build_model

    out, data, tiny = sys.argv[1], sys.argv[2], sys.argv[3:]
    report = {"available": plugins.available_plugins()}
    # get_cfg imports no paper and no plugin
    cfg = get_cfg()
    report["after_get_cfg"] = sorted(m for m in sys.modules if m.startswith("reidzoo.projects."))
    report["nodes"] = sorted(k for k in ("IANET", "PAN", "PFE", "PMM", "RMGL") if k in cfg.MODEL)
    # the demo trains (and evaluates) with the broken entry point installed
    args = default_argument_parser().parse_args(
        ["--config-file", "demo-bagtricks-synthetic", *tiny, "SOLVER.MAX_ITER", "2",
         "OUTPUT_DIR", out, "DATASETS.ROOT", data, "MODEL.DEVICE", "cpu"])
    results = main(args)
    report["demo_metrics"] = sorted(results)
    report["after_demo"] = sorted(m for m in sys.modules if m.startswith("reidzoo.projects."))
    with open(os.path.join(out, "config.yaml")) as f:
        dumped = f.read()
    report["dumped_paper_nodes"] = [k for k in ("IANET:", "PAN:", "PFE:", "PMM:", "RMGL:")
                                    if f"  {k}" in dumped]
    # every other paper builds from its config
    built = {}
    for name in ("ianet-synthetic-ci", "pan-synthetic-ci", "pfe-synthetic-ci-stage1",
                 "pmm-synthetic-ci", "rmgl-synthetic-ci"):
        c = setup_cfg(name, ["MODEL.DEVICE", "cpu"])
        built[name] = type(build_model(c)).__name__
    report["built"] = built
    # asking for the broken plugin, by name or by its module, is an error naming it
    for spec in ("broken", "no_such_module_xyz"):
        try:
            get_cfg(imports=[spec])
            report["asked_" + spec] = "no error"
        except plugins.PluginImportError as e:
            report["asked_" + spec] = str(e)
    # a component nothing provides: every plugin is tried, the error names the broken one
    c = get_cfg()
    c.MODEL.META_ARCHITECTURE = "NoSuchArch"
    try:
        plugins.resolve_components(c)
    except KeyError as e:
        report["component"] = str(e)
    report["failed"] = plugins.failed_plugins()
    print("REPORT" + json.dumps(report))
    """
)


@pytest.mark.slow  # a fresh interpreter per check
def test_broken_entry_point_breaks_only_what_asks_for_it(tmp_path):
    """A ``reidzoo.plugins`` entry point to a module that does not exist, visible to the
    process (a .dist-info on PYTHONPATH): get_cfg imports nothing, the demo trains and
    evaluates, every paper builds from its config, and asking for the broken plugin (by
    entry-point name or module) or for a name only a plugin could provide is an error naming
    the plugin and its import error; the plugin is reported by one warning."""
    import json

    from tests.helpers import TINY_SYNTH

    dist = tmp_path / "site" / "broken_plugin-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[reidzoo.plugins]\nbroken = no_such_module_xyz\n")
    (tmp_path / "check.py").write_text(BROKEN_CHECK)
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    r = subprocess.run(
        [sys.executable, str(tmp_path / "check.py"), str(tmp_path / "out"), str(tmp_path / "d")]
        + TINY_SYNTH,
        capture_output=True, text=True, env=env, cwd=REPO, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    report = json.loads(r.stdout.split("REPORT", 1)[1])
    assert report["available"]["broken"] == "no_such_module_xyz"
    assert report["available"]["pan"] == "reidzoo.projects.pan"
    assert report["after_get_cfg"] == [] and report["nodes"] == []
    assert report["after_demo"] == [] and report["dumped_paper_nodes"] == []
    assert "Rank-1" in report["demo_metrics"] and "mAP" in report["demo_metrics"]
    assert report["built"] == {
        "ianet-synthetic-ci": "Baseline",
        "pan-synthetic-ci": "PAN",
        "pfe-synthetic-ci-stage1": "PFE",
        "pmm-synthetic-ci": "PMM",
        "rmgl-synthetic-ci": "RMGL",
    }
    missing = "No module named 'no_such_module_xyz'"
    for spec in ("broken", "no_such_module_xyz"):
        assert "plugin 'broken'" in report["asked_" + spec] and missing in report["asked_" + spec]
    assert "MODEL.META_ARCHITECTURE" in report["component"] and "NoSuchArch" in report["component"]
    assert "'broken' (no_such_module_xyz)" in report["component"] and missing in report["component"]
    assert set(report["failed"]) == {"broken"}
    warned = [line for line in r.stderr.splitlines() if "PluginWarning" in line]
    assert len(warned) == 1 and "plugin 'broken'" in warned[0] and missing in warned[0], warned


@pytest.mark.slow  # a fresh interpreter per check
def test_paper_packages_do_not_import_the_visualisation_layer():
    """Importing a paper package registers its components but not reidzoo.visualize; the map
    producers register when reidzoo.visualize looks them up."""
    code = textwrap.dedent(
        """
        import sys
        pkgs = ["ianet", "pan", "pfe", "pmm", "rmgl"]
        for pkg in pkgs:
            __import__("reidzoo.projects." + pkg)
        print("VIS", sorted(m for m in sys.modules if m.startswith("reidzoo.visualize")))
        from reidzoo.visualize.overlay import MAP_REGISTRY
        print("MAPS", sorted(MAP_REGISTRY.names()))
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "VIS []" in r.stdout
    maps = ["IANetMaps", "PANMaps", "PFEMaps", "PMMMaps", "RMGLMaps"]
    assert f"MAPS {maps}" in r.stdout, r.stdout
