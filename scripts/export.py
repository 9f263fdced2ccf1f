"""Merge a run's adapter into a full-precision base, check parity, save with a model card, push.

python scripts/export.py ...  is  idefics2-ft export ...  (idefics2_ft/cli/export.py has the usage)
"""

import sys

from idefics2_ft.cli.export import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
