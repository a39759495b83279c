"""mtpeft: multi-task parameter-efficient fine-tuning benchmark framework."""

__version__ = "0.1.0"
