"""``python -m pmaster`` runs the command line."""

import sys

from pmaster.cli import main

sys.exit(main())
