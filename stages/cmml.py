"""Continual missing-modality learning (CMML) with DeLo on a ViLT backbone (DeLo paper, RebQ's
benchmarks): trains task by task and writes the result matrix, average, forgetting and last.

    python stages/cmml.py --config configs/cmml/food101_delo.yaml [section.field=value ...]
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
    from mllm.continual.stage import load_cmml_config, run_cmml

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    results = run_cmml(load_cmml_config(args.config, args.overrides))
    print(json.dumps({k: results[k] for k in ("benchmark", "metric", "average", "forgetting", "last")}))
    return 0


if __name__ == "__main__":
    from mllm.cli import run_reporting_user_errors

    sys.exit(run_reporting_user_errors("stages/cmml.py", main, sys.argv[1:]))
