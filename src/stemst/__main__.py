"""``python -m stemst`` (and ``torchrun -m stemst``): the command line, :mod:`stemst._cli`."""

import sys

from stemst._cli import main

if __name__ == "__main__":
    sys.exit(main())
