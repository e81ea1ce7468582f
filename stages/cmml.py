"""Continual missing-modality learning (CMML) with DeLo on a ViLT backbone (DeLo paper, RebQ's
benchmarks): trains task by task and writes the result matrix, average, forgetting and last.

    python stages/cmml.py --config configs/cmml/food101_delo.yaml [section.field=value ...]
"""

import sys

from mllm.cli import main

if __name__ == "__main__":
    sys.exit(main(["cmml", *sys.argv[1:]]))
