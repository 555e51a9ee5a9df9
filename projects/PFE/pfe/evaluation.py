"""PFE stage II evaluation: the test feature [F_2, F_3, F_4, F_5] and its parts, ranked in one
pass over the test set.

The model's evaluation output stays the paper's test feature (what ``reidzoo.extract`` and
ONNX export give). :class:`FeatureGroupsEvaluator` is a fast-reid ``DatasetEvaluator`` that
feeds every batch to one evaluator of the configured kind (``TEST.EVALUATOR``) per group,
each receiving a column range of the output:

* ``""`` (unprefixed keys: ``Rank-1``, ``mAP``, ..., ``metric``): all columns, the paper's
  feature; ``metric`` (model_best, ``reidzoo.splits``) keeps meaning the paper's feature;
* ``"F5/"``: F_5 alone, the stage-I feature of the frozen main branch;
* ``"side/"``: [F_2, F_3, F_4], what stage II adds.

The groups share the output tensor (column views, no copy per group), so collecting costs no
more memory than one evaluator; ranking runs once per group.
"""

from collections import OrderedDict

from fastreid.evaluation.evaluator import DatasetEvaluator

#: Metric-key prefixes of the groups; "" is the whole test feature.
GROUPS = ("", "F5/", "side/")


class FeatureGroupsEvaluator(DatasetEvaluator):
    """Rank the whole test feature and its F_5 and side parts with evaluators of one kind.

    Args:
        make_evaluator (callable): ``make_evaluator() -> DatasetEvaluator``, a new evaluator
            of the configured kind per call (one per group).
        side_dim (int): columns of [F_2, F_3, F_4] at the start of the output (3 * SIDE_DIM);
            the remaining columns are F_5.
    """

    def __init__(self, make_evaluator, side_dim):
        self._side_dim = int(side_dim)
        if self._side_dim <= 0:
            raise ValueError(f"side_dim={side_dim}; expected > 0 (3 * MODEL.PFE.SIDE_DIM)")
        self._evaluators = OrderedDict((g, make_evaluator()) for g in GROUPS)

    def reset(self):
        for ev in self._evaluators.values():
            ev.reset()

    def _columns(self, group, outputs):
        if group == "":
            return outputs
        if outputs.dim() != 2 or outputs.shape[1] <= self._side_dim:
            raise ValueError(
                f"PFE stage II evaluation: output of shape {tuple(outputs.shape)} has no F_5 "
                f"after the {self._side_dim} side columns (3 * MODEL.PFE.SIDE_DIM); expected "
                "[N, 3 * SIDE_DIM + C_5] (set MODEL.PFE.EVAL_GROUPS False for other outputs)"
            )
        if group == "F5/":
            return outputs[:, self._side_dim :]
        return outputs[:, : self._side_dim]

    def process(self, inputs, outputs):
        """Args:
        inputs (dict): fast-reid's test batch (``targets``, ``camids``).
        outputs (Tensor): [N, 3 * SIDE_DIM + C_5], the model's test feature.
        """
        for group, ev in self._evaluators.items():
            ev.process(inputs, self._columns(group, outputs))

    def evaluate(self):
        """Returns:
        OrderedDict: the whole feature's metrics, then ``F5/<metric>``, then
        ``side/<metric>`` (empty on non-main processes, as fast-reid's evaluators).
        """
        results = OrderedDict()
        for group, ev in self._evaluators.items():
            for key, value in (ev.evaluate() or {}).items():
                results[group + key] = value
        return results
