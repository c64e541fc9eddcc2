"""TLS client contexts, one per ``ca-file`` (cached for the life of the process).

Verification is always on and host names are checked.  With ``ca-file`` only that file is trusted.
Without it, the system store at OpenSSL's compiled-in paths, never SSL_CERT_FILE / SSL_CERT_DIR from
the environment (spawn(8) gives a clean environment, and behaviour must not change with a dirty one);
certifi only where those paths do not exist and it is installed.

Contexts are made only once a target or proxy is https, and ``ssl`` is imported only then as far as
this package goes: loading a CA store takes tens of milliseconds in every short-lived ``pfrest handle``
process.  (asyncio itself imports the ssl module, so that import is paid anyway.)
"""

import os
import sys

_contexts = {}   # ca-file (or None) -> ssl.SSLContext


def context(ca_file):
    """The client context for ``ca_file`` (None: the system store); raises OSError/SSLError when the
    CA certificates cannot be loaded."""
    ctx = _contexts.get(ca_file)
    if ctx is None:
        ctx = _contexts[ca_file] = _new(ca_file)
    return ctx


def is_tls_error(exc) -> bool:
    """True for an error of the ssl module; never imports it (no TLS was used if it is not loaded)."""
    ssl = sys.modules.get("ssl")
    return ssl is not None and isinstance(exc, ssl.SSLError)


def _new(ca_file):
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)   # CERT_REQUIRED and check_hostname by default
    if ca_file:
        ctx.load_verify_locations(cafile=ca_file)
    else:
        _load_system_store(ctx, ssl.get_default_verify_paths())
    return ctx


def _load_system_store(ctx, paths):
    cafile = paths.openssl_cafile if os.path.isfile(paths.openssl_cafile or "") else None
    capath = paths.openssl_capath if os.path.isdir(paths.openssl_capath or "") else None
    if cafile or capath:
        ctx.load_verify_locations(cafile=cafile, capath=capath)
        return
    try:
        import certifi
    except ImportError:
        return   # nothing to trust: every handshake fails, as a tls failure
    ctx.load_verify_locations(cafile=certifi.where())
