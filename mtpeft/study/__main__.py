"""``python -m mtpeft.study <name> [overrides]``: see `mtpeft.study` (`mtpeft.study.cli.main`)."""

import logging
import sys

from mtpeft.study.cli import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
