"""Logging for the two ways pfrest runs.

Handler mode (spawn(8), xinetd, systemd Accept=yes): stdout *and stderr* may be the Postfix socket, so
nothing but protocol replies may ever be written there.  Logs go to syslog (facility mail, ident
``pfrest`` with the pid, like other Postfix helpers), or to ``--log-file``.  Where /dev/log does not
exist (containers, minimal hosts), libc would drop every line without a trace: they go to journald's
sockets instead (``syslog_handler``), and ``pfrest check`` warns when there is none of them either.

A ``--log-file`` is a regular file written by its own name, never through a link (open_log_file).

Foreground mode (serve, demo, query): stderr, or syslog on request.  Under systemd, when stderr is
the journal's stream (``JOURNAL_STREAM``), each line starts with its syslog priority (``<3>`` error ...
``<7>`` debug, sd-daemon(3)), so that ``journalctl -p err`` finds pfrest's errors, and without a time
stamp, which journald adds.

Secrets (auth tokens, proxy passwords) registered with ``add_secret`` are replaced by ``(redacted)`` in
every line written, tracebacks included, whatever code produced the text.

A busy ``serve`` logs a line per request, thousands a second: streams and files are written a turn of
the event loop at a time (one write for every line of that turn), and the per-request line skips the
logging module's record machinery (``request``), which cost as much CPU as answering the request.
"""

import errno
import logging
import os
import stat
import sys
import time

FORMAT_FILE = "%(asctime)s pfrest[%(process)d]: %(levelname)s: %(message)s"
FORMAT_STDERR = "%(asctime)s pfrest: %(levelname)s: %(message)s"
FORMAT_JOURNAL = "%(levelname)s: %(message)s"
# sd-daemon(3) line prefixes: the syslog priority of each line written to the journal's stream
JOURNAL_PRIORITY = {logging.DEBUG: "<7>", logging.INFO: "<6>", logging.WARNING: "<4>", logging.ERROR: "<3>",
                    logging.CRITICAL: "<2>"}
_PREFIX = {logging.WARNING: "warning: ", logging.ERROR: "error: ", logging.CRITICAL: "fatal: "}
MIN_SECRET = 4  # shorter "secrets" would only garble the log (and are no secrets)
PIPE_BUF = 4096  # a write to a pipe up to this size is never interleaved with another process's
_secrets = []    # longest first, so that a secret containing another is replaced whole
_logger = logging.getLogger("pfrest")
_process = [os.getpid()]   # os.getpid() is a system call; a forked child updates this


def _pid():
    return _process[0]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=lambda: _process.__setitem__(0, os.getpid()))
_fast = None     # the installed LineHandler, for request()


def add_secret(text):
    """Never write ``text`` out again: logs and ``redact`` replace it."""
    if text and len(text) >= MIN_SECRET and text not in _secrets:
        _secrets.append(text)
        _secrets.sort(key=len, reverse=True)


def forget_secret(text):
    """A secret no longer used (an oauth2 token replaced): the list stays as long as what is in use."""
    if text in _secrets:
        _secrets.remove(text)


def redact(text: str) -> str:
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, "(redacted)")
    return text


def request(message: str, warning: bool = False):
    """Log one request line at INFO: ``logger.info("%s", message)``, for a fraction of the cost; a
    failed request's (``warning``) at WARNING, through the record path (they are few)."""
    if warning:
        _logger.warning("%s", message)
        return
    if not _logger.isEnabledFor(logging.INFO):
        return
    handlers = _logger.handlers
    if _fast is not None and len(handlers) == 1 and handlers[0] is _fast:
        _fast.line(message)
    else:
        _logger.info("%s", message)


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


# Where syslog lines can go, in order: libc syslog(3)'s socket, then journald's own two (its syslog
# socket speaks the same datagrams; the native one takes KEY=value fields, systemd's journal-native).
SYSLOG_SOCKET = "/dev/log"
JOURNAL_SYSLOG_SOCKET = "/run/systemd/journal/dev-log"
JOURNAL_NATIVE_SOCKET = "/run/systemd/journal/socket"
FACILITY_MAIL = 2           # syslog(3)'s LOG_MAIL >> 3
SEND_TIMEOUT = 0.5          # seconds a log datagram may wait for a full socket queue; then it is dropped
_SYSLOG_LEVEL = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def is_socket(path) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:   # missing, or a dangling link (a container's /dev/log to an absent journald)
        return False


def log_socket():
    """Where syslog lines would go: SYSLOG_SOCKET, one of journald's, or None (they would be lost)."""
    for path in (SYSLOG_SOCKET, JOURNAL_SYSLOG_SOCKET, JOURNAL_NATIVE_SOCKET):
        if is_socket(path):
            return path
    return None


def syslog_handler():
    """libc syslog(3) when /dev/log is there (or nothing is: it drops them, as before); else journald."""
    path = log_socket()
    if path in (JOURNAL_SYSLOG_SOCKET, JOURNAL_NATIVE_SOCKET):
        return JournalHandler(path, native=path == JOURNAL_NATIVE_SOCKET)
    return SyslogHandler()


class JournalHandler(logging.Handler):
    """Sends records as datagrams to one of journald's sockets, like SyslogHandler (facility mail,
    ``pfrest[pid]``, a line per datagram), and never raises: a line that cannot go is dropped."""

    def __init__(self, path, native=False):
        super().__init__()
        self.setFormatter(RedactingFormatter())
        self.path, self.native, self._sock = path, native, None

    def datagram(self, level: int, line: str) -> bytes:
        priority = _SYSLOG_LEVEL.get(level, 6)
        if self.native:   # one field a line: no newline is left in ``line`` (splitlines)
            return (f"PRIORITY={priority}\nSYSLOG_FACILITY={FACILITY_MAIL}\nSYSLOG_IDENTIFIER=pfrest\n"
                    f"SYSLOG_PID={_pid()}\nMESSAGE={line}\n").encode("utf-8", "backslashreplace")
        return f"<{FACILITY_MAIL * 8 + priority}>pfrest[{_pid()}]: {line}".encode("utf-8", "backslashreplace")

    def emit(self, record):
        try:
            if self._sock is None:
                import socket
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.settimeout(SEND_TIMEOUT)
            message = _PREFIX.get(record.levelno, "") + self.format(record)
            for line in message.splitlines() or [""]:
                self._sock.sendto(self.datagram(record.levelno, line), self.path)
        except Exception:  # logging must never break a conversation with Postfix
            pass

    def close(self):
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        super().close()


class LineHandler(logging.Handler):
    """A text stream or file, written a turn of the event loop at a time: the lines of one turn go out
    in one write (in pieces of at most PIPE_BUF, cut at line ends, so that the lines of several worker
    processes sharing a pipe never interleave), right after the turn.  Without a running loop, at once."""

    def __init__(self, stream, fmt, owns_stream=False, journal=False):
        super().__init__()
        self.stream, self.owns_stream = stream, owns_stream
        self.journal = journal     # prefix every line with its priority (JOURNAL_PRIORITY)
        self.setFormatter(RedactingFormatter(fmt))
        self.timestamped, self.with_pid = "%(asctime)s" in fmt, "%(process)d" in fmt
        self.pending, self.scheduled = [], False
        self._second, self._stamp = None, ""
        self._pid = self._tag_text = None

    def _tag(self):
        """``pfrest[PID]: INFO: `` or what the format says; the pid looked up again after a fork."""
        if self._tag_text is None or (self.with_pid and self._pid != _pid()):
            self._pid = _pid()
            self._tag_text = f"pfrest[{self._pid}]: INFO: " if self.with_pid else \
                ("pfrest: INFO: " if self.timestamped else "INFO: ")
        return self._tag_text

    def emit(self, record):
        try:
            text = self.format(record)
            if self.journal:  # a traceback's lines too: journald makes an entry of every line
                priority = JOURNAL_PRIORITY.get(record.levelno, JOURNAL_PRIORITY[logging.INFO])
                text = "\n".join(priority + line for line in text.split("\n"))
            self._add(text)
        except Exception:
            self.handleError(record)

    def line(self, message):
        """An INFO line of the handler's format, without a LogRecord."""
        now = time.time()
        head = ""
        if self.timestamped:
            second = int(now)
            if second != self._second:
                self._second, self._stamp = second, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            head = f"{self._stamp},{int((now - second) * 1000):03d} "
        priority = JOURNAL_PRIORITY[logging.INFO] if self.journal else ""
        self._add(redact(priority + head + self._tag() + message))

    def _add(self, text):
        self.pending.append(text + "\n")
        if not self.scheduled:
            asyncio = sys.modules.get("asyncio")  # never imported for it: no asyncio, no loop
            try:
                loop = asyncio.get_running_loop() if asyncio else None
            except RuntimeError:
                loop = None
            if loop is None:
                return self.flush()
            self.scheduled = True
            loop.call_soon(self.flush)

    def flush(self):
        self.scheduled = False
        pending, self.pending = self.pending, []
        if not pending:
            return
        try:
            chunk, size = [], 0
            for text in pending:
                if chunk and size + len(text) > PIPE_BUF:
                    self.stream.write("".join(chunk))
                    self.stream.flush()
                    chunk, size = [], 0
                chunk.append(text)
                size += len(text)
            self.stream.write("".join(chunk))
            self.stream.flush()
        except Exception:  # logging must never break a conversation with Postfix
            pass

    def close(self):
        self.flush()
        if self.owns_stream:
            self.stream.close()
        super().close()


# The log file is opened as root (serve before dropping privileges, reopened on SIGHUP by a serve that
# kept root), often in a directory the service account may write, for logrotate or for a reopen after
# the drop: a link that account swapped in would have root append to, or create, any file.  So the
# name must be the file itself: no symlink (O_NOFOLLOW), a regular file (O_NONBLOCK: a FIFO swapped in
# cannot hold the open), and none with a second name (a hard link to another's file).
LOG_FILE_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
LOG_FILE_MODE = 0o666   # less the umask, as open() makes it


def open_log_file(path):
    """``path`` opened for appending, a new one created; OSError for a link or any but a regular file."""
    try:
        fd = os.open(path, LOG_FILE_FLAGS, LOG_FILE_MODE)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(exc.errno, "a symbolic link; pfrest writes to no file through a link") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if st.st_nlink > 1:
            raise OSError(errno.EMLINK, "a file with another name (a hard link); pfrest writes to no such file")
        os.set_blocking(fd, True)
        return open(fd, "a", encoding="utf-8", errors="backslashreplace")
    except BaseException:
        os.close(fd)
        raise


def _file_handler(path):
    return LineHandler(open_log_file(path), FORMAT_FILE, owns_stream=True)


def _install(handler, level):
    global _fast
    for old in list(_logger.handlers):
        _logger.removeHandler(old)
        if isinstance(old, (LineHandler, SyslogHandler, JournalHandler)):
            old.close()  # a reopened log file: the old one's descriptor goes
    _logger.addHandler(handler)
    _logger.setLevel(level)
    _logger.propagate = False
    _fast = handler if isinstance(handler, LineHandler) else None


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
        handler = _file_handler(log_file) if log_file else syslog_handler()
    except OSError as exc:
        handler, problem = syslog_handler(), f"cannot open --log-file {log_file}: {exc.strerror}; logging to syslog"
    _install(handler, level)
    if problem:
        logging.getLogger("pfrest").error("%s", problem)
    sys.excepthook = lambda kind, value, tb: logging.getLogger("pfrest").critical(
        "uncaught exception", exc_info=(kind, value, tb))


def for_foreground(use_syslog=False, log_file=None, level=logging.INFO):
    if use_syslog:
        handler = syslog_handler()
    elif log_file:
        handler = _file_handler(log_file)
    else:
        journal = stderr_is_journal()
        handler = LineHandler(sys.stderr, FORMAT_JOURNAL if journal else FORMAT_STDERR, journal=journal)
    _install(handler, level)


def stderr_is_journal() -> bool:
    """Whether stderr is the stream systemd connected to the journal: JOURNAL_STREAM holds its device
    and inode (systemd.exec(5)); a stderr redirected elsewhere (``2>file`` in ExecStart) is not."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (AttributeError, ValueError, OSError):  # no stderr, no descriptor, no JOURNAL_STREAM
        return False
