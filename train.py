"""Fine-tune Idefics2: ``python train.py recipe=NAME [key=value ...]`` (see README.md).

The same as ``idefics2-ft train ...``; the code is in idefics2_ft/cli/train.py.
"""

if __name__ == "__main__":
    from idefics2_ft.stops import StopPolicy

    StopPolicy("train").install()  # before the imports below: a stop during them is never a traceback
    from idefics2_ft.cli.train import main

    main()
