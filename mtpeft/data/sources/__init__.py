"""Real data sources: local JSON/JSONL files and ``datasets.load_dataset`` ids, as mtpeft records.

A source is ``(format, location, options)`` and yields records for one or more tasks:

* ``config``: the checked ``SourceConfig`` of one ``data.sources`` entry (unknown keys rejected);
* ``formats``: one small converter per dataset schema (alpaca, gsm8k, mbpp, squad, commonsense_mc);
* ``files``: JSON list / JSON Lines reading with file-and-line errors;
* ``hub``: ``load_dataset`` with local copies and caches first and a fail-fast message when offline;
* ``splits``: HyCAM's exact seeded ratio split, de-duplication of eval prompts, seeded limits;
* ``load``: all of it per source -> ``SourceTask`` objects for the datamodule's own task table.
"""

from mtpeft.data.sources.config import SourceConfig, parse_source, parse_sources
from mtpeft.data.sources.formats import Format, available_formats, get_format, register_format
from mtpeft.data.sources.hub import DataNotAvailableError
from mtpeft.data.sources.load import MAX_NEW_TOKENS_CAP, SourceTask, default_max_new_tokens, load_sources

__all__ = [
    "MAX_NEW_TOKENS_CAP",
    "DataNotAvailableError",
    "Format",
    "SourceConfig",
    "SourceTask",
    "available_formats",
    "default_max_new_tokens",
    "get_format",
    "load_sources",
    "parse_source",
    "parse_sources",
    "register_format",
]
