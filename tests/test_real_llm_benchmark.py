"""benchmarks/real_llm.py's plumbing with a tiny user LM in place of SmolLM2 (whose weights the
tests never fetch): the demo runs with and without the projector output norm, and the table
reports each run's norm ratio, accuracy and wall time."""

from __future__ import annotations

import os
import sys

from safetensors.torch import load_file

from tests.demo.test_demo_llm import _user_lm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import real_llm  # noqa: E402


def test_runs_with_and_without_the_output_norm_and_prints_one_table(tmp_path, capsys):
    llm = _user_lm(str(tmp_path / "my-qwen"))
    assert real_llm.main(["--llm", llm, "--quick", "--scales", "0.5", "--output-norms", "none", "rmsnorm",
                          "--cache", str(tmp_path / "cache")]) == 0
    table = capsys.readouterr().out.split("norm ratio:", 1)[1]
    rows = {line.split("|")[2].strip(): line for line in table.splitlines() if line.startswith("|   0.5")}
    assert set(rows) == {"none", "rmsnorm"}
    ratios = {norm: [float(x) for x in row.split("|")[3].split("/")] for norm, row in rows.items()}
    # rmsnorm starts the media tokens at the LM's mean token-embedding norm; the plain MLP does not.
    assert ratios["rmsnorm"][0] == 1.0 and abs(ratios["none"][0] - 1.0) > 0.1
    assert all(len(r) == 3 for r in ratios.values())        # init, after stage 1, after stage 2
    captions = [[float(x) for x in row.split("|")[5].split("/")] for row in rows.values()]
    assert all(len(c) == 3 and all(x > 0 for x in c) for c in captions)   # init / own media / another's
    assert all(row.split("|")[-2].strip().endswith("min") for row in rows.values())   # wall time
    runs = tmp_path / "cache" / "runs"
    for stage in ("pretrain", "instruct"):       # the norm's gain is trained and saved in both stages
        saved = load_file(runs / "scale-0.5-rmsnorm" / "runs" / stage / "projectors.safetensors")
        assert {"visual.output_norm.weight", "audio.output_norm.weight"} <= set(saved)
        assert not any("output_norm" in k for k in load_file(runs / "scale-0.5-none" / "runs" / stage /
                                                             "projectors.safetensors"))
