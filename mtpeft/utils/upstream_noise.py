"""Silence two messages of upstream libraries that every run printed and that ask nothing of the user.

* Lightning's "💡 Tip: ... try installing litlogger" (an INFO record of ``lightning.pytorch.utilities.rank_zero``
  at every ``Trainer`` construction whose loggers include no ``LitLogger``): an advertisement, once per job.
* torch's ``FutureWarning`` "`isinstance(treespec, LeafSpec)` is deprecated", raised inside Lightning's own
  ``_pytree`` helper on its first use: nothing in mtpeft can change it (Lightning has to).

Both filters match those messages only; every other record and warning passes.
"""

from __future__ import annotations

import logging
import warnings

LIGHTNING_RANK_ZERO = "lightning.pytorch.utilities.rank_zero"
"""The logger of Lightning's ``rank_zero_info`` (where the tip is logged)."""
TIP_PREFIX = "💡 Tip: For seamless cloud logging"
LEAFSPEC_WARNING = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


class _DropLitLoggerTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(TIP_PREFIX)


_TIP_FILTER = _DropLitLoggerTip()


def quiet_upstream_noise() -> None:
    """Install both filters (idempotent: a second call adds nothing)."""
    logger = logging.getLogger(LIGHTNING_RANK_ZERO)
    if _TIP_FILTER not in logger.filters:
        logger.addFilter(_TIP_FILTER)
    warnings.filterwarnings("ignore", message=LEAFSPEC_WARNING, category=FutureWarning)
