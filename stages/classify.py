"""Missing-modality classification with a CLIP dual encoder (MoRA paper section 4).

    python stages/classify.py --config configs/missing_modality/food101.yaml [section.field=value ...]
"""

import sys

from mllm.cli import main

if __name__ == "__main__":
    sys.exit(main(["classify", *sys.argv[1:]]))
