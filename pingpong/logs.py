"""JSON log lines for PINGPONG_LOG_FORMAT=json."""

import json
import logging
import time

from redis.exceptions import RedisError


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, structured fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def log_event(logger: logging.Logger, event: str, **fields: object) -> None:
    """Log `event key=value ...` as text; JSON logs carry `event` and each field as its own key."""
    text = " ".join([event, *(f"{key}={value}" for key, value in fields.items())])
    logger.info(text, extra={"fields": {"event": event, **fields}})


class BriefConnectionErrors(logging.Filter):
    """Shorten channels-redis' reconnect loop logs to one line while Redis is down.

    Its receive task logs a full traceback every second during an outage; the cause
    (a refused or dropped connection) fits in one line, and tracebacks stay reserved
    for bugs.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], (OSError, ConnectionError, RedisError)):
            error = record.exc_info[1]
            record.msg = f"{record.getMessage()}: {type(error).__name__}: {error}"
            record.args = None
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True
