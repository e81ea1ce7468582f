"""Stage 2: instruction tuning of the projectors plus a peft tuner inside the LLM.

    accelerate launch stages/instruct.py --config configs/demo/instruct.yaml [section.field=value ...]

DeLo across a sequence of tasks: one run per task, task k > 0 with
``tuner.task=k tuner.continue_from=<task k-1's output_dir>`` (README, "Missing modalities").

Run with --help for the config schema.
"""

import sys

from mllm.cli import main

if __name__ == "__main__":
    sys.exit(main(["instruct", *sys.argv[1:]]))
