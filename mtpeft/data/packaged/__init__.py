"""Tasks backed by optional PyPI packages that ship benchmark data (docs/data.md section 1).

Importing this package registers them; the packages themselves are imported only when a task's splits
are built, so mtpeft works without them and says how to install them when one is asked for.
"""

from mtpeft.data.packaged import gsm_symbolic, humaneval  # noqa: F401  (register their tasks)
