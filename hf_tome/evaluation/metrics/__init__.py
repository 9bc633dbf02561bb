"""Evaluation metrics that load offline.

``evaluate.load("accuracy")`` fetches the metric script from the Hugging Face Hub, which the benchmarks cannot
reach. The scripts here are ordinary ``evaluate.Metric`` modules shipped inside the package, and
:func:`load_metric` hands ``evaluate.load`` their file path, which takes its local-script branch and never
touches the network (it works with ``HF_HUB_OFFLINE=1`` and ``HF_EVALUATE_OFFLINE=1``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import evaluate

_METRICS_DIR = Path(__file__).resolve().parent

AVAILABLE_METRICS: tuple[str, ...] = ("accuracy", "wer")
"""Names accepted by :func:`load_metric`; each is a folder holding ``<name>/<name>.py``."""


def metric_script_path(name: str) -> Path:
    """Return the path of the packaged ``evaluate`` script for metric ``name``.

    Raises:
        ValueError: If ``name`` is not one of :data:`AVAILABLE_METRICS`.
    """
    if name not in AVAILABLE_METRICS:
        raise ValueError(f"unknown metric {name!r}; available: {', '.join(AVAILABLE_METRICS)}")
    return _METRICS_DIR / name / f"{name}.py"


def load_metric(name: str, **kwargs: Any) -> evaluate.EvaluationModule:
    """Load a packaged metric with ``evaluate.load`` from its local script, without the Hub.

    Args:
        name: One of :data:`AVAILABLE_METRICS` (``"accuracy"``, ``"wer"``).
        **kwargs: Passed to ``evaluate.load`` (for example ``experiment_id`` or ``cache_dir``).
            ``keep_in_memory`` defaults to ``True`` here: the benchmarks run in one process, and in-memory
            buffers avoid the Arrow cache files and file locks ``evaluate`` otherwise creates under
            ``~/.cache/huggingface/evaluate``. Pass ``keep_in_memory=False`` for distributed evaluation.

    Returns:
        The metric, supporting ``add_batch(predictions=..., references=...)`` and ``compute(...)``.
    """
    # Imported here so that importing hf_tome.evaluation.metrics (e.g. for AVAILABLE_METRICS) stays cheap.
    import evaluate

    kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(str(metric_script_path(name)), **kwargs)
