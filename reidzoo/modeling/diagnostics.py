"""What a model declares for the training diagnostics, and the quantities they log.

The hook (:class:`reidzoo.engine.diagnostics.TrainingDiagnostics`) is paper-agnostic. A paper
declares what it wants measured in its package's ``diagnostics`` module, which the hook imports
only when ``REIDZOO.DIAGNOSTICS.ENABLED`` is set (nothing here runs, or is imported, otherwise):

* :func:`register_probe`: a function called, through a forward hook, on every module of the given
  types during a diagnosed step; it returns the feature groups and attention maps of that call.
* :func:`register_last_stages`: where a meta-architecture's last backbone stage is, when it is
  not ``model.backbone.layer4`` (RMGL's per-branch copies).

Definitions (also in the README, "Training diagnostics"):

* feature norm of a group ``[..., D]``: the L2 norm of every D-vector, averaged over the rest;
* normalised entropy of a map ``[..., M]`` of non-negative weights: each row ``w`` becomes
  ``p = w / sum(w)`` and ``H(p) / log M`` (0: all weight on one position, 1: uniform), averaged
  over the rows with positive mass;
* dead fraction of such a map: the fraction of rows whose weights are all zero.
"""

import math

import torch

#: Kinds of records a probe returns, each ``{label: Tensor}`` (see :func:`reduce_record`).
KINDS = ("feat_norm", "entropy", "dead")

_PROBES = {}
_LAST_STAGES = {}


def _key(fn):
    return f"{fn.__module__}.{fn.__qualname__}"


def register_probe(*module_types):
    """Decorator registering ``fn(module, inputs, output) -> dict`` for modules of these types.

    During a diagnosed training step ``fn`` runs after each forward of every such module (with
    the forward's positional inputs and its output, under ``torch.no_grad``) and returns
    ``{kind: {label: Tensor}}`` with ``kind`` in :data:`KINDS`:

    * ``"feat_norm"``: a feature group ``[..., D]`` (e.g. PAN's parts P ``[N, K, C]``);
    * ``"entropy"`` and ``"dead"``: a map of non-negative weights ``[..., M]`` over its support
      (last axis), e.g. a relation map ``[N, M, M]``.

    Registering the same function again (a re-import) replaces it.

    Args:
        *module_types (type): ``nn.Module`` subclasses.
    Returns:
        callable: the decorator (returns ``fn`` unchanged).
    """
    if not module_types or not all(isinstance(t, type) for t in module_types):
        raise TypeError(f"register_probe needs module classes, got {module_types!r}")

    def deco(fn):
        _PROBES[_key(fn)] = (tuple(module_types), fn)
        return fn

    return deco


def register_last_stages(*model_types):
    """Decorator registering ``fn(model) -> list[nn.Module]``: the last backbone stage(s) of a
    meta-architecture whose last stage is not ``model.backbone.layer4`` (see
    :func:`last_stage_modules`).

    Args:
        *model_types (type): meta-architecture classes.
    Returns:
        callable: the decorator.
    """
    if not model_types or not all(isinstance(t, type) for t in model_types):
        raise TypeError(f"register_last_stages needs model classes, got {model_types!r}")

    def deco(fn):
        _LAST_STAGES[_key(fn)] = (tuple(model_types), fn)
        return fn

    return deco


def probes_for(module):
    """list[callable]: the registered probes whose types ``module`` is an instance of."""
    return [fn for types, fn in _PROBES.values() if isinstance(module, types)]


def last_stage_modules(model):
    """The modules whose outputs are "the last backbone stage" of ``model``.

    A registered :func:`register_last_stages` function of the model's class decides; otherwise
    ``model.backbone.layer4`` (fast-reid's ResNet, reidzoo's ``StagedResNet``), or nothing.

    Args:
        model (nn.Module): an unwrapped meta-architecture.
    Returns:
        list[nn.Module]
    """
    for types, fn in _LAST_STAGES.values():
        if isinstance(model, types):
            return list(fn(model))
    layer4 = getattr(getattr(model, "backbone", None), "layer4", None)
    return [layer4] if layer4 is not None else []


def stage_output_module(stage):
    """The module whose output is a stage's output, whichever way the stage is run.

    ``StagedResNet.run_stage`` calls a stage's blocks one by one (a forward hook on the stage
    itself would never fire), while RMGL's branch copies and fast-reid call the whole
    ``nn.Sequential``; both call the stage's last child: its ``inserted`` module if it has one,
    else its last block.

    Args:
        stage (nn.Module): e.g. ``backbone.layer4``.
    Returns:
        nn.Module
    """
    inserted = stage._modules.get("inserted")
    if inserted is not None:
        return inserted
    children = list(stage.children())
    return children[-1] if isinstance(stage, torch.nn.Sequential) and children else stage


def mean_feature_norm(x):
    """Mean L2 norm of the feature vectors of a group.

    Args:
        x (Tensor): [..., D].
    Returns:
        float
    """
    return x.detach().float().norm(dim=-1).mean().item()


def entropy_rows(w):
    """Normalised entropy of each row of a non-negative map, and which rows have mass.

    Args:
        w (Tensor): [..., M] non-negative weights over M >= 2 positions.
    Returns:
        tuple[Tensor, Tensor]: H(p) / log M of every row with positive mass [R'] (float64) and
        the mask of those rows over all R rows [R] (bool).
    """
    m = w.shape[-1]
    if m < 2:
        raise ValueError(f"an entropy needs 2 or more positions; got a map {tuple(w.shape)}")
    rows = w.detach().double().reshape(-1, m)
    if (rows < 0).any():
        raise ValueError("entropy maps must be non-negative (pass |theta| for a signed map)")
    mass = rows.sum(-1)
    alive = mass > 0
    p = rows[alive] / mass[alive, None]
    h = -torch.where(p > 0, p * p.clamp_min(1e-300).log(), torch.zeros_like(p)).sum(-1)
    return h / math.log(m), alive


def reduce_record(kind, value):
    """The scalar one probe record logs.

    Args:
        kind (str): one of :data:`KINDS`.
        value (Tensor): see :func:`register_probe`.
    Returns:
        float | None: None (nothing is logged) for an entropy with no row of positive mass,
        or for a map with a single position (whose entropy is 0 / 0).
    """
    if kind in ("entropy", "dead") and value.shape[-1] < 2:
        return None
    if kind == "feat_norm":
        return mean_feature_norm(value)
    if kind == "entropy":
        h, _ = entropy_rows(value)
        return h.mean().item() if h.numel() else None
    if kind == "dead":
        _, alive = entropy_rows(value)
        return 1.0 - alive.double().mean().item()
    raise ValueError(f"probe record kind {kind!r}; expected one of {KINDS}")
