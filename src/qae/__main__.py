"""``python -m qae`` runs the command line, as the ``qae`` script does."""

import sys

from qae.cli import main

if __name__ == "__main__":
    sys.exit(main())
