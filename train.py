"""Fine-tune Idefics2: ``python train.py recipe=NAME [key=value ...]`` (see README.md).

The same as ``idefics2-ft train ...``; the code is in idefics2_ft/cli/train.py.
"""

from idefics2_ft.cli.train import main

if __name__ == "__main__":
    main()
