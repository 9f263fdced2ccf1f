"""Evaluate a finished run: batched greedy generation on a split, metrics and predictions.jsonl.

python scripts/evaluate.py ...  is  idefics2-ft evaluate ...  (idefics2_ft/cli/evaluate.py has the usage)
"""

import sys

from idefics2_ft.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
