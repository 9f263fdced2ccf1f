"""Answer a question about one or more images with a finished run.

python scripts/predict.py ...  is  idefics2-ft predict ...  (idefics2_ft/cli/predict.py has the usage)
"""

import sys

from idefics2_ft.cli.predict import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
