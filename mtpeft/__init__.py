"""mtpeft: multi-task parameter-efficient fine-tuning benchmark framework."""

__version__ = "0.1.0"

#: The version of what runs compute. Part of every job's identity (`mtpeft.utils.confighash.code_version`):
#: a sweep never reuses a finished run recorded under another results version. Bump it in the commit that
#: changes what a run computes for an unchanged config (a default, a method's maths, batching, the loss,
#: a metric), and say so in the commit message. ``MTPEFT_CODE_VERSION=digest`` instead keys jobs on a digest
#: of every file of the package (strict: any edit, even a comment, re-runs everything).
RESULTS_VERSION = "4"
