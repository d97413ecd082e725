"""``python -m samkit``: the ``samkit`` command (also what ``torchrun -m samkit`` runs)."""

import sys

from samkit.cli import main

if __name__ == "__main__":
    sys.exit(main())
