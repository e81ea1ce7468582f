"""Stage 1: projector pretraining on captioning data (LLM and encoders frozen).

    accelerate launch stages/pretrain.py --config configs/demo/pretrain.yaml [section.field=value ...]

Run with --help for the config schema.
"""

import sys

from mllm.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
