"""production-stack's logging shape: named loggers with their own handlers, never the root."""

import json
import logging
import sys

_LOG_LEVEL = logging.INFO
_LOG_FORMAT = "text"
_loggers: list[logging.Logger] = []
_LEVELS = {"critical": logging.CRITICAL, "error": logging.ERROR, "warning": logging.WARNING,
           "info": logging.INFO, "debug": logging.DEBUG, "trace": logging.DEBUG}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"level": record.levelname, "logger": record.name,
                           "message": record.getMessage()})


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("[%(asctime)s] %(levelname)s: %(message)s (%(name)s)")


class _AtMost(logging.Filter):
    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno <= self.level


def _formatter() -> logging.Formatter:
    return JsonFormatter() if _LOG_FORMAT == "json" else TextFormatter()


def set_log_level(name: str) -> None:
    global _LOG_LEVEL
    _LOG_LEVEL = _LEVELS.get(name.lower(), logging.INFO)
    for logger in _loggers:
        logger.setLevel(_LOG_LEVEL)
        for handler in logger.handlers:
            if getattr(handler, "stream", None) is sys.stdout:
                handler.setLevel(_LOG_LEVEL)


def set_log_format(name: str) -> None:
    global _LOG_FORMAT
    _LOG_FORMAT = name.lower()
    for logger in _loggers:
        for handler in logger.handlers:
            handler.setFormatter(_formatter())


def init_logger(name: str, log_level: int | None = None) -> logging.Logger:
    level = _LOG_LEVEL if log_level is None else log_level
    logger = logging.getLogger(name)
    logger.setLevel(level)
    out = logging.StreamHandler(sys.stdout)
    out.setLevel(level)
    out.setFormatter(_formatter())
    out.addFilter(_AtMost(logging.INFO))
    logger.addHandler(out)
    err = logging.StreamHandler()  # stderr
    err.setLevel(logging.WARNING)
    err.setFormatter(_formatter())
    logger.addHandler(err)
    logger.propagate = False
    _loggers.append(logger)
    return logger
