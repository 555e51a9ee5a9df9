"""Training diagnostics (``REIDZOO.DIAGNOSTICS``): gradient norms per loss term, feature norms
and attention entropies, logged into fast-reid's EventStorage (``metrics.json``, TensorBoard).

Everything is measured on the training step itself: the hook attaches forward hooks for one
step, reads what the step's forward computed, and takes each loss term's gradient with
``torch.autograd.grad(..., retain_graph=True)`` before the step's own backward. Nothing is run
again, no ``.grad`` is written, no BatchNorm statistic or random number is used, so a diagnosed
run trains exactly like one without diagnostics. What a model reports is declared in
:mod:`reidzoo.modeling.diagnostics`.
"""

import importlib
import importlib.util
import logging
import math

import torch
from fastreid.engine import hooks as fr_hooks
from fastreid.modeling.heads import EmbeddingHead
from fastreid.utils import comm
from fastreid.utils.events import get_event_storage

from reidzoo.modeling import diagnostics as protocol

logger = logging.getLogger(__name__)

PREFIX = "diag"


@protocol.register_probe(EmbeddingHead)
def embedding_head_probe(module, inputs, output):
    """fast-reid's ``EmbeddingHead`` (IANet, the Baseline): the training feature it returns
    (``MODEL.HEADS.NECK_FEAT``: pooled before the BNNeck, or after it)."""
    if isinstance(output, dict) and torch.is_tensor(output.get("features")):
        return {"feat_norm": {"features": output["features"]}}
    return {}


def import_paper_probes(model):
    """Import the ``diagnostics`` module of every reidzoo package that defines a module class of
    ``model`` (e.g. ``reidzoo.projects.pan.diagnostics``), so that its probes are registered.

    Only done when diagnostics are enabled: the paper packages do not import them.

    Args:
        model (nn.Module)
    Returns:
        list[str]: the modules imported (or already imported).
    """
    names = set()
    for m in model.modules():
        package = type(m).__module__.rpartition(".")[0]
        if package.startswith("reidzoo."):
            names.add(f"{package}.diagnostics")
    found = []
    for name in sorted(names):
        try:
            spec = importlib.util.find_spec(name)
        except ModuleNotFoundError:
            spec = None
        if spec is not None:
            importlib.import_module(name)
            found.append(name)
    return found


def grad_key(loss_name):
    """The ``diag/grad/`` name of a loss term: without its ``loss_`` prefix (``loss_cls_p0`` ->
    ``cls_p0``), so that fast-reid's progress line, which prints every key holding "loss",
    does not print the diagnostics too."""
    return loss_name.removeprefix("loss_")


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


class _Session:
    """The forward hooks of one diagnosed step and what they measured.

    Args:
        model (nn.Module): the unwrapped model.
        targets (list[tuple[str, nn.Module, list[callable]]]): (path, module, probes).
        stage_modules (list[nn.Module]): modules whose outputs are the last backbone stage.
    """

    def __init__(self, model, targets, stage_modules):
        self.scalars = {}
        self.calls = {}
        self.stage_outputs = []
        self.handles = [model.register_forward_hook(self._on_model)]
        for path, module, probes in targets:
            self.handles.append(
                module.register_forward_hook(
                    lambda m, i, o, path=path, probes=probes: self._on_module(path, m, i, o, probes)
                )
            )
        for module in stage_modules:
            self.handles.append(module.register_forward_hook(self._on_stage))

    def close(self):
        for h in self.handles:
            h.remove()
        self.handles = []

    def _on_stage(self, module, inputs, output):
        # not the passes a model makes without gradients (PMM's clean Grad-CAM for A-CutMix)
        if torch.is_tensor(output) and torch.is_grad_enabled():
            self.stage_outputs.append(output)

    def _on_module(self, path, module, inputs, output, probes):
        n = self.calls[path] = self.calls.get(path, 0) + 1
        suffix = f"/call{n}" if n > 1 else ""  # a module run twice in one forward (PMM's mix)
        with torch.no_grad():
            for probe in probes:
                for kind, groups in (probe(module, inputs, output) or {}).items():
                    if kind not in protocol.KINDS:
                        raise ValueError(
                            f"diagnostics probe {probe.__module__}.{probe.__qualname__} returned "
                            f"kind {kind!r} for {path}; expected one of {protocol.KINDS}"
                        )
                    for label, value in groups.items():
                        v = protocol.reduce_record(kind, value)
                        if v is not None:
                            name = f"{path}/{label}" if label else path
                            self.scalars[f"{PREFIX}/{kind}/{name}{suffix}"] = v

    def _on_model(self, model, inputs, output):
        if not isinstance(output, dict):
            return
        self._measure_gradients(output)
        # Into the storage now, before any after_step writer (a value put at an iteration that
        # fast-reid's JSONWriter has already written would never be written).
        storage = get_event_storage()
        for key, value in self.scalars.items():
            storage.put_scalar(key, value, smoothing_hint=False)
        self.scalars, self.stage_outputs = {}, []

    def _measure_gradients(self, output):
        outs = self.stage_outputs
        if outs:
            with torch.no_grad():
                norms = [o.detach().float().mean(dim=(2, 3)).norm(dim=1).mean() for o in outs]
                self.scalars[f"{PREFIX}/feat_norm/last_stage"] = torch.stack(norms).mean().item()
        terms = {k: v for k, v in output.items() if torch.is_tensor(v) and v.requires_grad}
        outs = [o for o in outs if o.requires_grad]  # none for a frozen backbone (PFE stage II)
        if not outs or not terms:
            return
        total = [None] * len(outs)
        for name, value in terms.items():
            grads = torch.autograd.grad(value, outs, retain_graph=True, allow_unused=True)
            sq = 0.0
            for i, g in enumerate(grads):
                if g is None:
                    continue
                sq += g.detach().double().pow(2).sum().item()
                total[i] = g.detach() if total[i] is None else total[i] + g.detach()
            self.scalars[f"{PREFIX}/grad/{grad_key(name)}"] = math.sqrt(sq)
        self.scalars[f"{PREFIX}/grad/total"] = math.sqrt(
            sum(t.double().pow(2).sum().item() for t in total if t is not None)
        )


class TrainingDiagnostics(fr_hooks.HookBase):
    """Logs diagnostics at the first iteration and the last of every ``period`` iterations
    (0-based iterations 0, period - 1, 2 period - 1, ...), on the main process.

    Keys (``diag/`` in ``metrics.json`` and TensorBoard, at the iteration they were measured):

    * ``diag/grad/<term>``: L2 norm of the gradient of loss term ``loss_<term>`` (as the
      meta-architecture returns it, weights included) w.r.t. the last backbone stage's output
      map(s), on the step's batch and weights; ``diag/grad/total`` for the sum of the terms
      (what the step back-propagates through that map);
    * ``diag/feat_norm/last_stage``: mean L2 norm of the globally average-pooled last-stage map;
    * ``diag/feat_norm/<module>/<group>``, ``diag/entropy/<module>/<map>``,
      ``diag/dead/<module>/<map>``: what the registered probes return
      (:mod:`reidzoo.modeling.diagnostics`), ``<module>`` being the module's path in the model.

    Args:
        period (int): ``REIDZOO.DIAGNOSTICS.PERIOD``, >= 1.
    """

    def __init__(self, period):
        period = int(period)
        if period < 1:
            raise ValueError(f"REIDZOO.DIAGNOSTICS.PERIOD={period}; expected an integer >= 1")
        self.period = period
        self._session = None
        self._targets = None

    def due(self, iteration):
        """bool: whether ``iteration`` (0-based) is diagnosed."""
        return iteration == 0 or (iteration + 1) % self.period == 0

    def _prepare(self, model):
        import_paper_probes(model)
        targets = []
        for path, module in model.named_modules():
            probes = protocol.probes_for(module)
            if probes:
                targets.append((path, module, probes))
        stages = [protocol.stage_output_module(s) for s in protocol.last_stage_modules(model)]
        if not stages:
            logger.warning(
                "REIDZOO.DIAGNOSTICS: %s has no backbone.layer4 and registers no last stage "
                "(reidzoo.modeling.diagnostics.register_last_stages): no diag/grad keys",
                type(model).__name__,
            )
        logger.info(
            "REIDZOO.DIAGNOSTICS: every %d iterations, probes on %d modules, gradients at %d "
            "last-stage output(s)",
            self.period,
            len(targets),
            len(stages),
        )
        self._targets = (targets, stages)

    def before_step(self):
        if not comm.is_main_process() or not self.due(self.trainer.iter):
            return
        model = _unwrap(self.trainer.model)
        if self._targets is None:
            self._prepare(model)
        self._session = _Session(model, *self._targets)

    def after_step(self):
        session, self._session = self._session, None
        if session is None:
            return
        session.close()

    def after_train(self):
        if self._session is not None:
            self._session.close()
            self._session = None
