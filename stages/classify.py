"""Missing-modality classification with a CLIP dual encoder (MoRA paper section 4).

    python stages/classify.py --config configs/missing_modality/food101.yaml [section.field=value ...]
"""

import argparse
import json
import logging
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", help="section.field=value (YAML values)")
    args = parser.parse_args(argv)
    from mllm.classify.train import load_classify_config, run_classify

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    results = run_classify(load_classify_config(args.config, args.overrides))
    print(json.dumps({"dataset": results["dataset"], "tuner": results["tuner"], "test": results["test"]}))
    return 0


if __name__ == "__main__":
    from mllm.cli import run_reporting_user_errors

    sys.exit(run_reporting_user_errors("stages/classify.py", main, sys.argv[1:]))
