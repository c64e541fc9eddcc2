"""Postfix's own configuration, read through postconf(1), never by parsing main.cf or master.cf.

postconf knows Postfix's syntax (continuation lines, ``{ }`` grouping, ``-o`` overrides) and where the
files are; it prints them in forms that stay stable across versions: ``postconf -n`` the main.cf
parameters set explicitly, ``postconf -M`` one line per master.cf service, ``postconf -P`` every
``-o name=value`` of a service as ``service/type/name = value``; ``postconf -xh queue_directory`` where
``private/NAME`` sockets are (often a default, absent from -n).  What is read here is still parsed
leniently (a service continued on indented lines, ``name=value`` without blanks), so that another
version's layout does not turn into false findings.
"""

import os
import subprocess
from typing import Dict, List, NamedTuple, Optional, Tuple

PROGRAM = "postconf"
SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")   # where postconf lives, often off a user's PATH
TIMEOUT = 30.0   # seconds; postconf answers in milliseconds, unless main.cf is being rewritten
MASTER_FIELDS = 8   # service type private unpriv chroot wakeup maxproc command


class PostconfError(Exception):
    """postconf is missing, failed, or printed what cannot be read; the text says which."""


class Service(NamedTuple):
    """One master.cf entry.  ``args`` are the words after the command, ``{ }`` grouping undone."""
    name: str
    type: str
    private: str
    command: str
    args: Tuple[str, ...]

    @property
    def label(self) -> str:
        return f"{self.name}/{self.type}"


class PostfixConfig(NamedTuple):
    main: Dict[str, str]                               # main.cf parameters set explicitly
    services: List[Service]
    overrides: Dict[Tuple[str, str], Dict[str, str]]   # (service, type) -> its -o parameters
    queue_directory: str


def read(directory: Optional[str] = None) -> PostfixConfig:
    """Postfix's configuration in ``directory`` (postconf -c), or its default one."""
    main = _parameters(_postconf(directory, "-n"), "-n")
    services = [_service(entry) for entry in _entries(_postconf(directory, "-M"))]
    overrides = {}
    for key, value in _parameters(_postconf(directory, "-P"), "-P").items():
        service, kind, name = _split_override(key)
        overrides.setdefault((service, kind), {})[name] = value
    queue_directory = _postconf(directory, "-xh", "queue_directory").strip()
    return PostfixConfig(main, services, overrides, queue_directory)


def _command_line(directory: Optional[str], *args: str) -> List[str]:
    return [PROGRAM, *(["-c", directory] if directory else []), *args]


def _postconf(directory, *args) -> str:
    argv = _command_line(directory, *args)
    path = os.pathsep.join([os.environ.get("PATH", os.defpath), *SBIN])
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, errors="replace", timeout=TIMEOUT, env=dict(os.environ, PATH=path))
    except FileNotFoundError:
        raise PostconfError(f"{PROGRAM} not found (looked in PATH and {', '.join(SBIN)}): "
                            "is Postfix installed?") from None
    except subprocess.TimeoutExpired:
        raise PostconfError(f"{' '.join(argv)}: no answer within {TIMEOUT:g} s") from None
    except OSError as exc:
        raise PostconfError(f"{' '.join(argv)}: cannot run it: {exc.strerror}") from None
    if proc.returncode != 0:
        said = " ".join(proc.stderr.split()) or "nothing"
        raise PostconfError(f"{' '.join(argv)} failed (exit status {proc.returncode}): {said}")
    return proc.stdout


def _logical_lines(text: str) -> List[str]:
    """Lines with their indented continuations joined; blank lines and comments dropped."""
    lines = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace() and lines:
            lines[-1] += " " + line.strip()
        else:
            lines.append(line.strip())
    return lines


def _parameters(text: str, option: str) -> Dict[str, str]:
    found = {}
    for line in _logical_lines(text):
        name, sep, value = line.partition("=")
        if not sep or not name.strip():
            raise PostconfError(f"postconf {option} printed a line that is not name = value: {line!r}")
        found[name.strip()] = value.strip()
    return found


def _split_override(key: str) -> Tuple[str, str, str]:
    """``service/type/name`` -> its parts (a service name holds no slash; an inet one may hold
    colons and brackets)."""
    service, _, rest = key.partition("/")
    kind, _, name = rest.partition("/")
    if not (service and kind and name):
        raise PostconfError(f"postconf -P printed a parameter that is not service/type/name: {key!r}")
    return service, kind, name


def _entries(text: str) -> List[List[str]]:
    return [words(line) for line in _logical_lines(text)]


def _service(fields: List[str]) -> Service:
    if len(fields) < MASTER_FIELDS:
        raise PostconfError(f"postconf -M printed an entry with fewer than {MASTER_FIELDS} fields: "
                            f"{' '.join(fields)!r}")
    name, kind, private = fields[:3]
    return Service(name, kind, private, fields[7], tuple(fields[MASTER_FIELDS:]))


def words(text: str) -> List[str]:
    """Split as master.cf does: at white space, but ``{ ... }`` (nesting allowed) is one word, given
    without its outer braces and the blanks inside them."""
    found, i = [], 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        start, depth = i, 0
        while i < len(text) and (depth or not text[i].isspace()):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        word = text[start:i]
        if word.startswith("{") and word.endswith("}") and depth == 0:
            word = word[1:-1].strip()
        found.append(word)
    return found
