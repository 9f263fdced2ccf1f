"""Download what a recipe needs into the Hugging Face cache, once, where there is internet.

python scripts/prefetch.py ...  is  idefics2-ft prefetch ...  (idefics2_ft/cli/prefetch.py has the usage)
"""

import sys

from idefics2_ft.cli.prefetch import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
