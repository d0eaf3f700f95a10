"""Scoring a classifier's labels against the truth: accuracy, per-class precision, recall
and F1 (as scikit-learn's ``classification_report`` lays them out), macro-F1 and the
confusion matrix. Pure numpy: used by ``fusebus eval`` on live decisions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ClassScores:
    """Precision, recall and F1 of one label, and how many cases truly had it."""

    label: str
    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True)
class ClassReport:
    """The per-class report people know from scikit-learn's ``classification_report``."""

    classes: tuple[ClassScores, ...]
    accuracy: float
    macro: ClassScores  # unweighted mean over labels
    weighted: ClassScores  # mean over labels weighted by support

    @property
    def total(self) -> int:
        """Cases scored."""
        return self.macro.support


def macro_f1(truth: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> float:
    """Mean over labels of F1 = 2TP / (2TP + FP + FN); a label never seen nor predicted counts 0."""
    return class_report(truth, predicted, labels).macro.f1


def class_report(
    truth: Sequence[str], predicted: Sequence[str], labels: Sequence[str]
) -> ClassReport:
    """Per label: precision TP/(TP+FP), recall TP/(TP+FN), F1 2TP/(2TP+FP+FN) and support
    (cases truly of it); a ratio whose denominator is 0 counts 0, as scikit-learn's
    ``zero_division=0`` does. Predictions outside ``labels`` count as wrong for the truth."""
    truth_a = np.asarray(truth, dtype=object)
    predicted_a = np.asarray(predicted, dtype=object)
    if truth_a.shape != predicted_a.shape:
        raise ValueError(f"{len(truth)} true labels against {len(predicted)} predictions")
    classes = []
    for label in labels:
        is_true, is_predicted = truth_a == label, predicted_a == label
        tp = int(np.sum(is_true & is_predicted))
        fp = int(np.sum(~is_true & is_predicted))
        fn = int(np.sum(is_true & ~is_predicted))
        classes.append(
            ClassScores(
                label,
                tp / (tp + fp) if tp + fp else 0.0,
                tp / (tp + fn) if tp + fn else 0.0,
                2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
                int(np.sum(is_true)),
            )
        )
    support = np.array([c.support for c in classes], dtype=np.float64)
    total = int(support.sum())

    def average(weights: np.ndarray, name: str) -> ClassScores:
        def mean(values: list[float]) -> float:
            return float(np.average(values, weights=weights)) if weights.sum() else 0.0

        return ClassScores(
            name,
            mean([c.precision for c in classes]),
            mean([c.recall for c in classes]),
            mean([c.f1 for c in classes]),
            total,
        )

    accuracy = float(np.mean(truth_a == predicted_a)) if len(truth_a) else 0.0
    return ClassReport(
        tuple(classes),
        accuracy,
        average(np.ones(len(classes)), "macro avg"),
        average(support, "weighted avg"),
    )


def render_class_report(report: ClassReport, *, title: str) -> str:
    """A report as plain text, laid out like scikit-learn's."""
    width = max([len(c.label) for c in report.classes] + [len("weighted avg")])
    lines = [title, f"{'':>{width}}  precision    recall  f1-score   support", ""]
    for c in report.classes:
        lines.append(
            f"{c.label:>{width}}  {c.precision:9.3f} {c.recall:9.3f} {c.f1:9.3f} {c.support:9d}"
        )
    lines.append("")
    lines.append(f"{'accuracy':>{width}}  {'':9} {'':9} {report.accuracy:9.3f} {report.total:9d}")
    for c in (report.macro, report.weighted):
        lines.append(
            f"{c.label:>{width}}  {c.precision:9.3f} {c.recall:9.3f} {c.f1:9.3f} {c.support:9d}"
        )
    return "\n".join(lines) + "\n"


def class_report_markdown(report: ClassReport, *, title: str) -> str:
    """A report as a Markdown table."""
    lines = [
        f"## {title}",
        "",
        "| label | precision | recall | F1 | support |",
        "|---|---:|---:|---:|---:|",
    ]
    for c in report.classes:
        lines.append(
            f"| {c.label} | {c.precision:.3f} | {c.recall:.3f} | {c.f1:.3f} | {c.support} |"
        )
    lines.append(f"| accuracy | | | {report.accuracy:.3f} | {report.total} |")
    for c in (report.macro, report.weighted):
        lines.append(
            f"| {c.label} | {c.precision:.3f} | {c.recall:.3f} | {c.f1:.3f} | {c.support} |"
        )
    return "\n".join(lines) + "\n"


def confusion(truth: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """Counts of (true label, predicted label); predictions outside ``labels`` are dropped."""
    index = {label: i for i, label in enumerate(labels)}
    matrix = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for t, p in zip(truth, predicted, strict=True):
        if t in index and p in index:
            matrix[index[t], index[p]] += 1
    return matrix
