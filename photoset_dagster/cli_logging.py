"""A plain Dagster logger for the terminal: the pipeline's own lines (summaries, progress, warnings)
without timestamps and run ids; Dagster's engine events only with --verbose."""

from __future__ import annotations

import logging
import sys

import dagster as dg


class _PlainFilter(logging.Filter):
    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        meta = getattr(record, "dagster_meta", None) or {}
        record.plain_message = meta.get("orig_message", record.getMessage())
        # Engine events (step/run started, failed...) only when verbose: the CLI prints a failed run's
        # reason itself, in one line.
        return meta.get("dagster_event") is None or self.verbose


@dg.logger(
    config_schema={
        "log_level": dg.Field(str, is_required=False, default_value="INFO"),
        "verbose": dg.Field(bool, is_required=False, default_value=False),
    },
    description="Plain terminal output: the pipeline's messages only (used by the photoset CLI).",
)
def plain_logger(init_context: dg.InitLoggerContext) -> logging.Logger:
    config = init_context.logger_config
    logger = logging.Logger("photoset", level=config["log_level"])
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_PlainFilter(config["verbose"]))
    handler.setFormatter(logging.Formatter("%(plain_message)s"))
    logger.addHandler(handler)
    return logger
