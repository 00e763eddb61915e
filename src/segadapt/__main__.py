"""``python -m segadapt`` (and ``torchrun -m segadapt``) run the command line."""

import sys

from .cli import main

sys.exit(main())
