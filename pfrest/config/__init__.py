"""Load and validate the pfrest configuration (JSON, or TOML with the same keys).

The folder: what a configuration is (schema.py), every key and its check (keys.py), what
``pfrest check`` asks the system (checks.py), the keys a JSON file repeats (duplicates.py); here,
loading a file and the checks across fields.

The file format is the one of the original postfix-rest-connector, so its config files load unchanged:

    {"user-agent": "...", "endpoints": [{"name": "...", "mode": "tcp-lookup", "target": "https://...",
      "bind-address": "0.0.0.0", "bind-port": 9000, "auth-token": "...", "request-timeout": 2000}]}

Every problem is reported with the path of the offending field (``endpoints[1] (aliases).bind-port: must be
1..65535``); all problems are collected, not only the first.  Only the standard library is used here, so
``pfrest check`` and ``pfrest --help`` stay cheap.
"""

import ipaddress
import os
import re
from dataclasses import replace
from typing import List
from urllib.parse import urlsplit

from pfrest.config import duplicates
from pfrest.protocol.modes import LOOKUPS, MODES, POLICY, SASL, SOCKETMAP, TCP  # noqa: F401 (config.MODES ...)
from pfrest.config.keys import ENDPOINT_KEYS, REQUIRED_ENDPOINT_KEYS, TOP_KEYS  # noqa: F401 (config.ENDPOINT_KEYS ...)
from pfrest.config.schema import (  # noqa: F401 (config.Endpoint ...)
    CACHE_SCHEMES, CACHE_URL_FILES, Config, ConfigError, DEFAULT_BIND_ADDRESS,
    DEFAULT_CACHE_ENTRIES, DEFAULT_CACHE_LOCAL_TTL, DEFAULT_CACHE_TIMEOUT_MS, DEFAULT_CONTROL_SOCKET,
    DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS, DEFAULT_PATH, DEFAULT_TIMEOUT_MS, DEFAULT_USER_AGENT,
    Endpoint, LOG_ALL, OAuth2, Tracing, LOG_NONE, LOG_PROBLEMS, LOG_REQUESTS, PARTIAL_REQUEST_TIMEOUT, RESERVED_HEADERS)


def _convert(key, value):
    if key == "bind-mode":
        return int(value, 8)
    if key == "method":
        return value.upper()
    if key == "allow-from":
        return tuple(str(ipaddress.ip_network(n, strict=False)) for n in value)
    if key in ("idle-timeout", "partial-request-timeout", "cache-ttl", "cache-negative-ttl",
               "cache-stale-if-error", "cache-stale-while-revalidate", "cache-local-ttl"):
        return float(value)
    if key == "headers":
        return tuple(value.items())
    if key == "mechanisms":
        return tuple(m.upper() for m in value)
    if key == "oauth2":
        return OAuth2(**{name.replace("-", "_"): item for name, item in value.items()})
    return value


QUOTED_NUMBER = re.compile(r"-?[0-9]+(\.[0-9]+)?")
CLOSE_ENOUGH = 0.6   # difflib's ratio for "did you mean": auth_token, authtoken, auth-tokn; not colour


def where(i, name=None) -> str:
    """How every message, error or warning, names the endpoint ``i``: ``endpoints[1] (aliases)``."""
    return f"endpoints[{i}] ({name})" if isinstance(name, str) and name else f"endpoints[{i}]"


def _judge(check, value):
    """``check(value)``, and for a number written as a string ("18001") what to write instead."""
    message = check(value)
    if message and isinstance(value, str) and QUOTED_NUMBER.fullmatch(value.strip()):
        number = float(value) if "." in value else int(value)
        if check(number) is None:
            return f"must be a number, not the string {value!r}: write {value.strip()} without quotes"
    return message


def _unknown(key, known):
    """The error for an unknown key, with the known one it is probably a typo of."""
    import difflib   # here, not at the top: only a config with a typo needs it (7 ms of a handle's start)
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=CLOSE_ENOUGH)
    return f"unknown key; did you mean {close[0]}?" if close else "unknown key"


def _duplicates(obj, at, problems):
    for key, lines in getattr(obj, "duplicates", {}).items():
        problems.append(f"{at}{key}: given more than once (lines {', '.join(map(str, lines[:-1]))} and "
                        f"{lines[-1]}); keep one (JSON would silently use the last)")


def _endpoint(raw, where, problems):
    if not isinstance(raw, dict):
        problems.append(f"{where}: must be an object")
        return None
    _duplicates(raw, f"{where}.", problems)
    values = {}
    for key in REQUIRED_ENDPOINT_KEYS:
        if key not in raw:
            problems.append(f"{where}.{key}: is required")
    mode = raw.get("mode")
    for key, value in raw.items():
        if key not in ENDPOINT_KEYS:
            problems.append(f"{where}.{key}: {_unknown(key, ENDPOINT_KEYS)}")
            continue
        attr, check, modes = ENDPOINT_KEYS[key]
        message = _judge(check, value)
        if message:
            problems.append(f"{where}.{key}: {message}")
        elif modes and mode in MODES and mode not in modes:
            problems.append(f"{where}.{key}: not used by mode {mode}")
        else:
            values[attr] = _convert(key, value)
    if isinstance(values.get("target"), list):  # several targets: the first is ``target``
        values["targets"] = tuple(values["target"])
        values["target"] = values["targets"][0]
    elif "target" in values:
        values["targets"] = (values["target"],)
    if "bind-path" in raw and ("bind-port" in raw or "bind-address" in raw):
        problems.append(f"{where}.bind-path: give either bind-path or bind-address/bind-port, not both")
    # refused by check and serve (checks.refusals), not by handle: a spawn setup must not stop for it
    values["bind_address_alone"] = "bind-address" in raw and "bind-port" not in raw and "bind-path" not in raw
    if "basic_auth" in values and any(name.lower() == "authorization"
                                      for name, _ in values.get("headers", ())):
        problems.append(f"{where}.basic-auth: conflicts with headers' Authorization")
    if "oauth2" in values and ("basic_auth" in values or any(
            name.lower() == "authorization" for name, _ in values.get("headers", ()))):
        problems.append(f"{where}.oauth2: sends Authorization: Bearer, so basic-auth and headers' Authorization "
                        "cannot be given too")
    if "client-key" in raw and "client-cert" not in raw:
        problems.append(f"{where}.client-key: needs client-cert (the key of that certificate)")
    if ("client-cert" in raw or "client-key" in raw) and not any(
            str(t).startswith("https:") for t in values.get("targets", ())):
        problems.append(f"{where}.client-cert: only an https target can use a client certificate")
    for key in ("cache-local-ttl", "cache-timeout", "cache-read-url"):
        if key in raw and "cache-url" not in raw:
            problems.append(f"{where}.{key}: needs cache-url (it is about the shared cache)")
    if mode == SASL:   # (its method is POST: Endpoint sees to it)
        if "proxy" in values and any(not str(t).startswith("https:") for t in values.get("targets", ())):
            problems.append(f"{where}.proxy: a dovecot-sasl endpoint sends passwords: through a proxy only to "
                            "https targets (tunnelled end to end, the proxy sees nothing); make the target "
                            "https or drop the proxy")
    if "cache_url" in values and not (values.get("cache_ttl") or values.get("cache_negative_ttl")):
        problems.append(f"{where}.cache-url: needs cache-ttl or cache-negative-ttl (nothing is cached without)")
    if any(f"{where}.{key}:" in p for p in problems for key in REQUIRED_ENDPOINT_KEYS):
        return None
    try:
        return Endpoint(**values)
    except TypeError as exc:  # a required key failed its check
        problems.append(f"{where}: {exc}")
        return None


def parse(raw, path=None, partial=False) -> Config:
    """Validate a decoded config document and build a :class:`Config`; raise ConfigError.  ``partial``:
    a part of a document (load_part), which may have no endpoint."""
    problems = []
    if not isinstance(raw, dict):
        raise ConfigError([f"{path or 'config'}: the top level must be an object"])
    _duplicates(raw, "", problems)
    for key, value in raw.items():
        if key not in TOP_KEYS:
            problems.append(f"{key}: unknown key (an endpoint key: it goes inside an endpoint)"
                            if key in ENDPOINT_KEYS else f"{key}: {_unknown(key, TOP_KEYS)}")
        elif TOP_KEYS[key] and _judge(TOP_KEYS[key], value):
            problems.append(f"{key}: {_judge(TOP_KEYS[key], value)}")
    endpoints = []
    items = raw.get("endpoints")
    if partial and not items:
        pass
    elif items is None:
        problems.append("endpoints: is required")
    elif not isinstance(items, list):
        problems.append("endpoints: must be a list of endpoints"
                        + (": in TOML, write [[endpoints]] (two brackets) before each endpoint, not [endpoints]"
                           if str(path).endswith(".toml") else ': "endpoints": [{...}, {...}]'))
    elif not items:  # nothing to serve or handle: a config that can only be a mistake
        problems.append("endpoints: must list at least one endpoint")
    else:
        seen = {}
        for i, item in enumerate(items):
            ep = _endpoint(item, where(i, item.get("name") if isinstance(item, dict) else None), problems)
            if ep is None:
                continue
            if ep.name in seen:
                problems.append(f"{where(i, ep.name)}.name: the name of endpoints[{seen[ep.name]}] too: each "
                                "endpoint needs a name of its own")
            seen.setdefault(ep.name, i)
            endpoints.append(ep)
    if problems:
        raise ConfigError(problems)
    log_requests = raw.get("log-requests", LOG_ALL)
    endpoints = [ep if ep.log_requests else replace(ep, log_requests=log_requests) for ep in endpoints]
    metrics = raw.get("metrics-address")
    if metrics:
        host, _, port = metrics.rpartition(":")
        metrics = (host.strip("[]"), int(port))
    return Config(endpoints=tuple(endpoints),
                  user_agent=raw.get("user-agent", DEFAULT_USER_AGENT),
                  user=raw.get("user"), path=path, metrics_address=metrics,
                  metrics_allow_from=tuple(str(ipaddress.ip_network(n, strict=False))
                                           for n in raw.get("metrics-allow-from", ())),
                  log_requests=log_requests, control_socket=raw.get("control-socket"),
                  tracing=_tracing(raw.get("tracing")))


def _tracing(raw):
    if raw is None:
        return None
    return Tracing(raw["otlp-endpoint"], float(raw.get("sample-ratio", 1.0)),
                   raw.get("service-name", Tracing._field_defaults["service_name"]))


def decode(text: bytes, path: str):
    """Decode a config file's bytes: TOML for ``*.toml``, JSON otherwise."""
    if path.endswith(".toml"):
        try:
            import tomllib
        except ImportError:  # Python < 3.11
            import tomli as tomllib
        try:
            return tomllib.loads(text.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    try:
        return duplicates.decode(text)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ConfigError([f"{path}: not valid JSON: {exc}"]) from None


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None


def load(path: str) -> Config:
    """Read, decode and validate the config file at ``path``."""
    return parse(decode(_read(path), path), path)


def load_part(path: str, top_keys, endpoint_name=None):
    """``(config, problems elsewhere)``: the config at ``path`` as ``load`` gives it and ``[]``; or, when
    the file is invalid, only the top-level ``top_keys`` and the endpoint named (when one is), validated
    alone, and the problems of the whole.  For the admin's commands that talk to a running serve (stats,
    cache): a file edited into errors while serve runs on its last valid config (a reload refused) must
    not keep them from reaching it.  ConfigError when even that part is invalid, or the file unreadable."""
    text = _read(path)
    try:
        return parse(decode(text, path), path), []
    except ConfigError as exc:
        whole = exc
    raw = decode(text, path)   # not decodable at all: nothing can be read from it
    if not isinstance(raw, dict):
        raise whole
    part = {key: raw[key] for key in top_keys if key in raw}
    if endpoint_name is not None:
        items = raw.get("endpoints") if isinstance(raw.get("endpoints"), list) else []
        part["endpoints"] = [item for item in items if isinstance(item, dict) and item.get("name") == endpoint_name][:1]
        if not part["endpoints"]:
            raise whole
    try:
        return parse(part, path, partial=True), whole.problems
    except ConfigError:
        raise whole from None   # the part itself is invalid: every problem, each where the file has it


def is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


# What the example config (pfrest.json.example) and the package's copy of it (debian/rules) hold until the
# admin sets their own: a config still holding one is not yet deployed, whatever check says of its form.
PLACEHOLDER_TOKEN = "change-me"
PLACEHOLDER_TARGET = "http://127.0.0.1:8080/postfix/"   # the package's: https://rest.example.com/ replaced
EXAMPLE_DOMAINS = ("example.com", "example.net", "example.org", "example", "invalid", "test")   # RFC 2606


def _placeholders(ep) -> List[str]:
    """What of ``ep`` is still the example's, as message tails."""
    found = []
    if ep.auth_token == PLACEHOLDER_TOKEN:   # the placeholder only: a real token is never shown
        found.append(f"auth-token: still the example's placeholder {PLACEHOLDER_TOKEN!r}: set the token your "
                     "backend expects")
    for target in ep.targets:
        host = (urlsplit(target).hostname or "").rstrip(".").lower()
        if target.startswith(PLACEHOLDER_TARGET) or any(host == d or host.endswith("." + d)
                                                        for d in EXAMPLE_DOMAINS):
            found.append(f"target: {target} is the example's placeholder backend: set your backend's URL")
    return found


def warnings(config: Config) -> List[str]:
    """Things that are valid but probably not what the admin wants."""
    found = []
    for i, ep in enumerate(config.endpoints):
        found += [f"{where(i, ep.name)}.{tail}" for tail in _placeholders(ep)]
        if ep.bind_path is None and ep.bind_port is not None and not ep.allow_from \
                and not is_loopback(ep.bind_address):
            found.append(f"{where(i, ep.name)}: listens on {ep.bind_address}, beyond loopback, "
                         "without allow-from: any host that reaches it can query it")
    if config.metrics_address and not config.metrics_allow_from and not is_loopback(config.metrics_address[0]):
        found.append(f"metrics-address: listens on {config.metrics_address[0]}, beyond loopback, without "
                     "metrics-allow-from: any host that reaches it can read the metrics")
    for i, ep in enumerate(config.endpoints):
        url = ep.oauth2 and (ep.oauth2.token_url or ep.oauth2.issuer)
        if url and not url.startswith("https:"):
            found.append(f"{where(i, ep.name)}.oauth2: {url} is not https: the client secret and the tokens "
                         "would cross the network in clear")
    if config.path and any(ep.auth_token or (ep.oauth2 and ep.oauth2.client_secret) for ep in config.endpoints):
        try:
            mode = os.stat(config.path).st_mode
        except OSError:
            mode = 0
        if mode & 0o004:
            what = "an auth-token" if any(ep.auth_token for ep in config.endpoints) else "an oauth2 client-secret"
            found.append(f"{config.path}: holds {what} and is readable by every user; "
                         "chmod o-r it")
    return found
