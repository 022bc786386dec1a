"""Evaluation tables against hand-computed references (evaluate and the pictures run on a
real tree in tests/test_apply.py)."""

from __future__ import annotations

import numpy as np
import pytest

from segclr_beam import report


def test_segment_accuracy_reference():
    segments = np.array([1, 1, 1, 2, 2, 3])
    truth = np.array(["a", "a", "b", "b", "b", "c"], dtype=object)
    predicted = np.array(["a", "b", "a", "a", "b", "c"], dtype=object)
    # segment 1: a vs a; segment 2: b vs tie a/b -> a; segment 3: c vs c
    assert report.segment_accuracy(segments, truth, predicted) == pytest.approx(2 / 3)


def test_table_puts_variants_side_by_side():
    rows = [report.Row("class", v, h, 0.5 + i / 10, 0.25)
            for i, (v, h) in enumerate([(v, h) for v in ("raw", "agg10um") for h in report.HEADS])]
    lines = report.format_rows(rows).splitlines()
    assert lines[0].split() == ["task", "head", "raw", "node", "bal.acc", "raw", "segment",
                                "acc", "agg10um", "node", "bal.acc", "agg10um", "segment",
                                "acc"]
    assert lines[1].split() == ["class", "plain", "0.500", "0.250", "0.700", "0.250"]
    assert lines[2].split() == ["class", "sngp", "0.600", "0.250", "0.800", "0.250"]


def test_ood_column_is_the_mean_over_held_out_classes():
    rows = [report.Row("class", "raw", "plain", 0.5, 0.5, {"a": 0.25, "b": 0.75}),
            report.Row("class", "raw", "sngp", 0.5, 0.5, {"a": 1.0, "b": 0.75}),
            report.Row("compartment", "raw", "plain", 0.5, 0.5),
            report.Row("compartment", "raw", "sngp", 0.5, 0.5)]
    lines = report.format_rows(rows).splitlines()
    assert lines[0].split()[-3:] == ["raw", "OOD", "AUROC"]
    assert [line.split()[-1] for line in lines[1:]] == ["0.500", "0.875", "-", "-"]
    assert report.format_ood(rows).splitlines() == [
        "class         plain  raw       a 0.250  b 0.750",
        "class         sngp   raw       a 1.000  b 0.750"]
