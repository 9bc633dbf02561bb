"""Word error rate as a local ``evaluate`` metric, so ``evaluate.load`` works without reaching the Hub.

WER = (S + D + I) / N over the whole corpus, where S, D and I are the word substitutions, deletions and
insertions of a minimum edit alignment and N the number of reference words. Texts are split on whitespace
only: lower-casing or stripping punctuation is the caller's job, so that the metric never hides a
normalisation choice. The file is copied into ``evaluate``'s modules cache on load, so it stays
self-contained (no ``hf_tome`` or relative imports).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import datasets
import evaluate

_DESCRIPTION = """
Word error rate (WER) is the word-level edit distance between each prediction and its reference, summed over
the corpus and divided by the total number of reference words. It can exceed 1 when predictions insert many
words. Words are whitespace-separated tokens; no case or punctuation normalisation is applied.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): Transcriptions to score.
    references (`list` of `str`): Reference transcriptions, one per prediction.

Returns:
    wer (`float`): Total word edits (substitutions + deletions + insertions) over total reference words.

Examples:
    >>> wer = hf_tome.evaluation.metrics.load_metric("wer")
    >>> wer.compute(predictions=["the cat sat down"], references=["the cat sat"])
    {'wer': 0.3333333333333333}
"""

_CITATION = """
@inproceedings{morris2004,
  author = {Morris, Andrew and Maier, Viktoria and Green, Phil},
  year = {2004},
  month = {01},
  title = {From WER and RIL to MER and WIL: improved evaluation measures for connected speech recognition.}
}
"""


def word_edit_distance(reference: Sequence[str], hypothesis: Sequence[str]) -> int:
    """Return the Levenshtein distance between two word sequences (unit cost substitution, insertion, deletion).

    Uses the classic dynamic programme keeping one row of the table, so memory is linear in the hypothesis length.
    """
    previous = list(range(len(hypothesis) + 1))
    for row, reference_word in enumerate(reference, start=1):
        current = [row]
        for column, hypothesis_word in enumerate(hypothesis, start=1):
            substitution = previous[column - 1] + (reference_word != hypothesis_word)
            deletion = previous[column] + 1
            insertion = current[column - 1] + 1
            current.append(min(substitution, deletion, insertion))
        previous = current
    return previous[-1]


# Referenced as ``evaluate.Metric`` rather than imported by name: ``evaluate.load`` picks the first
# EvaluationModule subclass in this module's namespace, and a bare ``Metric`` name would be found first.
@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class WordErrorRate(evaluate.Metric):
    """Corpus-level word error rate with a self-contained word edit distance."""

    def _info(self) -> evaluate.MetricInfo:
        """Describe the metric: one prediction string and one reference string per example."""
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
            reference_urls=["https://en.wikipedia.org/wiki/Word_error_rate"],
        )

    def _compute(self, predictions: list[str], references: list[str]) -> dict[str, Any]:
        """Return ``{"wer": value}`` over every example added so far."""
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
        edits = 0
        reference_words = 0
        for prediction, reference in zip(predictions, references, strict=True):
            reference_tokens = reference.split()
            edits += word_edit_distance(reference_tokens, prediction.split())
            reference_words += len(reference_tokens)
        if reference_words == 0:
            # Every reference is empty: the rate has no denominator, and 0 or inf would both mislead.
            raise ValueError("WER is undefined when all references are empty")
        return {"wer": edits / reference_words}
