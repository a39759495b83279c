"""``python -m mtpeft.lmeval [lm_eval options]``: lm-eval's command line with the ``mtpeft`` model type.

Importing the package registers the model (``@register_model("mtpeft")``); everything else is lm-eval's
own ``cli_evaluate`` (``lm_eval --help`` lists the options).
"""

from __future__ import annotations

import mtpeft.lmeval  # noqa: F401  (registers the "mtpeft" model type)


def main() -> None:
    """Run lm-eval's command line."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
