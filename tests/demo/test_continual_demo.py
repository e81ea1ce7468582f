"""Smoke test of ``mllm demo --continual --quick``: result matrices and the summary table (method x
missing ratio -> average, forgetting, last) for DeLo and sequential LoRA."""

from __future__ import annotations

import json
import math
import re

import mllm.cli

ROW = re.compile(r"^\|\s*(DeLo|sequential LoRA)\s*\|\s*(\d+)% missing\s*\|\s*(-?[\d.]+)\s*\|\s*(-?[\d.]+)\s*\|"
                 r"\s*(-?[\d.]+)\s*\|$")


def test_quick_continual_demo_prints_matrices_and_summary(tmp_path, capsys):
    assert mllm.cli.main(["demo", "--continual", "--quick", "--output-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    header = next(line for line in lines if line.startswith("| method"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["method", "missing", "average", "forgetting", "last"]
    rows = {(m.group(1), int(m.group(2))): [float(m.group(k)) for k in (3, 4, 5)]
            for m in map(ROW.match, lines) if m}
    assert sorted(rows) == [("DeLo", 0), ("DeLo", 70), ("sequential LoRA", 0), ("sequential LoRA", 70)]
    assert all(math.isfinite(v) for values in rows.values() for v in values)

    # One 2-task matrix per method and ratio, lower triangle filled.
    saved = json.loads((tmp_path / "results.json").read_text())
    for method in ("delo", "lora"):
        for ratio in ("0% missing", "70% missing"):
            matrix = saved["results"][method][ratio]["matrix"]
            assert matrix[0][1] is None and all(math.isfinite(v) for v in (matrix[0][0], *matrix[1]))
    assert sum(line.startswith("  after task 1") for line in lines) == 4
    # Structural, hence reliable: task 1 leaves task 0's pools and head untouched, and with complete
    # inputs on these separable tasks the Task-Key Memory routes every task-0 sample back to them.
    assert rows[("DeLo", 0)][1] == 0.0
