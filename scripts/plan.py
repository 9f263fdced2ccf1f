"""Will a recipe fit a GPU, and how long will a step take? Memory and time from the real shapes.

python scripts/plan.py ...  is  idefics2-ft plan ...  (idefics2_ft/cli/plan.py has the usage)
"""

import sys

from idefics2_ft.cli.plan import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
