"""Logging for the two ways pfrest runs.

Handler mode (spawn(8), xinetd, systemd Accept=yes): stdout *and stderr* may be the Postfix socket, so
nothing but protocol replies may ever be written there.  Logs go to syslog (facility mail, ident
``pfrest`` with the pid, like other Postfix helpers), or to ``--log-file``.  Where no syslog socket
exists, libc drops the messages and handling goes on unharmed.

Foreground mode (serve, demo, query): stderr, or syslog on request.

Secrets (auth tokens, proxy passwords) registered with ``add_secret`` are replaced by ``(redacted)`` in
every line written, tracebacks included, whatever code produced the text.
"""

import logging
import os
import sys

FORMAT_FILE = "%(asctime)s pfrest[%(process)d]: %(levelname)s: %(message)s"
FORMAT_STDERR = "%(asctime)s pfrest: %(levelname)s: %(message)s"
_PREFIX = {logging.WARNING: "warning: ", logging.ERROR: "error: ", logging.CRITICAL: "fatal: "}
MIN_SECRET = 4  # shorter "secrets" would only garble the log (and are no secrets)
_secrets = set()


def add_secret(text):
    """Never write ``text`` out again: logs and ``redact`` replace it."""
    if text and len(text) >= MIN_SECRET:
        _secrets.add(text)


def redact(text: str) -> str:
    for secret in sorted(_secrets, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, "(redacted)")
    return text


class RedactingFormatter(logging.Formatter):
    def format(self, record):
        return redact(super().format(record))


class SyslogHandler(logging.Handler):
    """Sends records through libc syslog(3), which adds ``pfrest[pid]:`` and never raises."""

    def __init__(self, facility_name: str = "mail"):
        super().__init__()
        self.setFormatter(RedactingFormatter())
        import syslog
        self._syslog = syslog
        facility = getattr(syslog, "LOG_" + facility_name.upper(), syslog.LOG_MAIL)
        syslog.openlog("pfrest", syslog.LOG_PID, facility)
        self._priority = {logging.DEBUG: syslog.LOG_DEBUG, logging.INFO: syslog.LOG_INFO,
                          logging.WARNING: syslog.LOG_WARNING, logging.ERROR: syslog.LOG_ERR,
                          logging.CRITICAL: syslog.LOG_CRIT}

    def emit(self, record):
        try:
            message = _PREFIX.get(record.levelno, "") + self.format(record)
            for line in message.splitlines() or [""]:
                self._syslog.syslog(self._priority.get(record.levelno, 6), line)
        except Exception:  # logging must never break a conversation with Postfix
            pass


def _file_handler(path):
    handler = logging.FileHandler(path)
    handler.setFormatter(RedactingFormatter(FORMAT_FILE))
    return handler


def _install(handler, level):
    root = logging.getLogger("pfrest")
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


def for_handler(log_file=None, level=logging.INFO):
    """Handler mode: syslog or a file; fd 2 and sys.stdout/stderr sent to /dev/null first, so that
    nothing (a log file that cannot be opened included) ever writes into the Postfix connection."""
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 2)  # a stray warning or traceback must not reach the Postfix socket
    os.close(devnull)
    sys.stderr = open(os.devnull, "w")
    sys.stdout = open(os.devnull, "w")
    logging.raiseExceptions = False
    problem = None
    try:
        handler = _file_handler(log_file) if log_file else SyslogHandler()
    except OSError as exc:
        handler, problem = SyslogHandler(), f"cannot open --log-file {log_file}: {exc.strerror}; logging to syslog"
    _install(handler, level)
    if problem:
        logging.getLogger("pfrest").error("%s", problem)
    sys.excepthook = lambda kind, value, tb: logging.getLogger("pfrest").critical(
        "uncaught exception", exc_info=(kind, value, tb))


def for_foreground(use_syslog=False, log_file=None, level=logging.INFO):
    if use_syslog:
        handler = SyslogHandler()
    elif log_file:
        handler = _file_handler(log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
        # journald adds its own time stamps
        handler.setFormatter(RedactingFormatter(
            "%(levelname)s: %(message)s" if os.environ.get("JOURNAL_STREAM") else FORMAT_STDERR))
    _install(handler, level)
