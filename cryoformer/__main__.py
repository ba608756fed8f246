"""``python -m cryoformer`` runs the command-line tool."""

import sys

from cryoformer.cli import main

if __name__ == "__main__":
    sys.exit(main())
