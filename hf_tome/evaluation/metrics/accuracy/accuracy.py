"""Accuracy as a local ``evaluate`` metric, so ``evaluate.load`` works without reaching the Hub.

``evaluate.load`` copies this file into its modules cache and imports it from there, so it must stay
self-contained: no imports from ``hf_tome`` and no relative imports (``evaluate`` would try to copy those as
extra script files).
"""

from __future__ import annotations

from typing import Any

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Accuracy is the proportion of correct predictions among all predictions:
Accuracy = (TP + TN) / (TP + TN + FP + FN) for binary tasks, and matches / total in general.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): Predicted labels.
    references (`list` of `int`): Ground truth labels.
    normalize (`bool`, defaults to `True`): If `False`, return the number of correct predictions instead of the
        fraction.
    sample_weight (`list` of `float`, *optional*): Per-example weights; `None` weighs every example equally.

Returns:
    accuracy (`float`): Fraction (or weighted count when `normalize=False`) of predictions equal to their reference.

Examples:
    >>> accuracy = hf_tome.evaluation.metrics.load_metric("accuracy")
    >>> accuracy.compute(predictions=[0, 1, 2, 0], references=[0, 1, 2, 1])
    {'accuracy': 0.75}
"""

_CITATION = """
@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and Varoquaux, G. and Gramfort, A. and Michel, V. and Thirion, B. and Grisel, O. and
          Blondel, M. and Prettenhofer, P. and Weiss, R. and Dubourg, V. and Vanderplas, J. and Passos, A. and
          Cournapeau, D. and Brucher, M. and Perrot, M. and Duchesnay, E.},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}
"""


# Referenced as ``evaluate.Metric`` rather than imported by name: ``evaluate.load`` picks the first
# EvaluationModule subclass in this module's namespace, and a bare ``Metric`` name would be found first.
@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    """Fraction of predictions that equal their reference label, computed with numpy."""

    def _info(self) -> evaluate.MetricInfo:
        """Describe the metric: integer predictions and references, one of each per example."""
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.accuracy_score.html"],
        )

    def _compute(
        self,
        predictions: list[int],
        references: list[int],
        normalize: bool = True,
        sample_weight: list[float] | None = None,
    ) -> dict[str, Any]:
        """Return ``{"accuracy": value}`` over every example added so far."""
        predicted = np.asarray(predictions)
        expected = np.asarray(references)
        if predicted.shape != expected.shape:
            raise ValueError(f"{predicted.size} predictions but {expected.size} references")
        if predicted.size == 0:
            raise ValueError("accuracy needs at least one prediction")
        weights = np.ones(predicted.shape, dtype=np.float64) if sample_weight is None else np.asarray(sample_weight)
        if weights.shape != predicted.shape:
            raise ValueError(f"{weights.size} sample weights for {predicted.size} predictions")
        correct = float(np.sum(weights * (predicted == expected)))
        return {"accuracy": correct / float(np.sum(weights)) if normalize else correct}
