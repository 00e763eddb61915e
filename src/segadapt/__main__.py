"""``python -m segadapt`` (and ``torchrun -m segadapt``) run the command line."""

import sys

from .cli import main

if __name__ == "__main__":  # not when imported (pytest's doctest collection imports every module)
    sys.exit(main())
