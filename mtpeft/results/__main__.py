"""``python -m mtpeft.results <study or directory>``: see `mtpeft.results`."""

import logging

from mtpeft.results import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
