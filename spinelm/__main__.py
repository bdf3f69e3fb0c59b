"""``python -m spinelm`` runs the ``spinelm`` command."""
import sys

from spinelm.cli import main

if __name__ == "__main__":
    sys.exit(main())
