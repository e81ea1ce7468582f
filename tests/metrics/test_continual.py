import json

import numpy as np
import pytest

from mllm.metrics.continual import ResultMatrix, average_performance, forgetting, last, score_task, summarize

# R[i, j]: score on task j after training task i (hand-made, 3 tasks)
R = [[80.0, np.nan, np.nan],
     [70.0, 90.0, np.nan],
     [60.0, 85.0, 75.0]]


def test_metrics_from_a_hand_made_matrix():
    assert average_performance(R) == pytest.approx((60 + 85 + 75) / 3)
    assert forgetting(R) == pytest.approx(((80 - 60) + (90 - 85)) / 2)
    assert last(R) == 75.0
    summary = summarize(R)
    assert summary["average_per_step"] == pytest.approx([80.0, 80.0, (60 + 85 + 75) / 3])
    assert forgetting([[50.0]]) == 0.0


def test_result_matrix_records_row_by_row():
    matrix = ResultMatrix(3)
    for i in range(3):
        for j in range(i + 1):
            matrix.record(i, j, R[i][j])
    assert json.loads(matrix.to_json())["forgetting"] == pytest.approx(12.5)
    with pytest.raises(ValueError, match="before it is trained"):
        matrix.record(0, 1, 1.0)
    with pytest.raises(ValueError, match="NaN"):
        ResultMatrix(2).summary()


def test_class_incremental_scoring_cuts_unseen_classes():
    # 2 tasks x 2 classes; the sample of class 1 has its largest logit on unseen class 3
    logits = np.array([[5.0, 0.0, 0.0, 9.0], [0.0, 5.0, 0.0, 9.0]])
    labels = np.array([0, 1])
    assert score_task(logits, labels, seen_classes=2, multilabel=False) == pytest.approx(1.0)
    assert score_task(logits, labels, seen_classes=4, multilabel=False) == pytest.approx(0.0)
    multi = np.array([[1, 0, 0, 1], [0, 1, 0, 0]])
    assert score_task(np.where(multi > 0, 1.0, -1.0), multi, seen_classes=2, multilabel=True) == pytest.approx(1.0)
