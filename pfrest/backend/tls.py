"""TLS client contexts, one per (``ca-file``, ``client-cert``, ``client-key``), cached for the life of
the process.

Verification is always on and host names are checked.  With ``ca-file`` only that file is trusted.
Without it, the system store at OpenSSL's compiled-in paths, never SSL_CERT_FILE / SSL_CERT_DIR from
the environment (spawn(8) gives a clean environment, and behaviour must not change with a dirty one);
certifi only where those paths do not exist and it is installed.

``client-cert`` (and ``client-key``, when the key is not in the certificate's file) is presented to the
target only, never to a proxy.  A certificate or key that cannot be loaded raises ClientCertificateError,
a TLS failure of the request naming the file (never its content); such a context is not cached, so a
file put right is used from the next connection on.

Contexts are made only once a target or proxy is https, and ``ssl`` is imported only then as far as
this package goes: loading a CA store takes tens of milliseconds in every short-lived ``pfrest handle``
process.  (asyncio itself imports the ssl module, so that import is paid anyway.)
"""

import os
import sys
from typing import NamedTuple, Optional

_contexts = {}   # Files -> ssl.SSLContext


class Files(NamedTuple):
    """What a TLS context is made from: the endpoint's ca-file, client-cert and client-key."""
    ca_file: Optional[str] = None
    client_cert: Optional[str] = None
    client_key: Optional[str] = None

    @classmethod
    def of(cls, endpoint) -> "Files":
        return cls(endpoint.ca_file, endpoint.client_cert, endpoint.client_key)

    def for_proxy(self) -> "Files":
        """A proxy is verified like the target but never sees the client certificate."""
        return Files(self.ca_file)


class ClientCertificateError(Exception):
    """The client certificate or its key cannot be used; the text names the file, never its content."""


def context(files: Files):
    """The client context for ``files`` (no ca-file: the system store); raises OSError/SSLError when
    the CA certificates cannot be loaded, ClientCertificateError for the client certificate."""
    ctx = _contexts.get(files)
    if ctx is None:
        ctx = _new(files)
        _contexts[files] = ctx
    return ctx


def is_tls_error(exc) -> bool:
    """True for an error of the ssl module or of the client certificate; never imports ssl (no TLS
    was used if it is not loaded)."""
    if isinstance(exc, ClientCertificateError):
        return True
    ssl = sys.modules.get("ssl")
    return ssl is not None and isinstance(exc, ssl.SSLError)


def _new(files: Files):
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)   # CERT_REQUIRED and check_hostname by default
    if files.client_cert:   # first: a broken one fails before the CA store costs its load time
        _load_client_certificate(ctx, files.client_cert, files.client_key)
    if files.ca_file:
        ctx.load_verify_locations(cafile=files.ca_file)
    else:
        _load_system_store(ctx, ssl.get_default_verify_paths())
    return ctx


def _load_client_certificate(ctx, cert: str, key: Optional[str]):
    import ssl
    for name, path in (("client-cert", cert), ("client-key", key)):
        if path is not None and not os.access(path, os.R_OK):
            reason = "no such file" if not os.path.exists(path) else "not readable"
            raise ClientCertificateError(f"cannot read {name} {path}: {reason}")
    try:
        ctx.load_cert_chain(cert, key, password=_no_password)
    except _Encrypted:
        raise ClientCertificateError(f"the key in {key or cert} is encrypted: give it unencrypted "
                                     "(readable by pfrest only)") from None
    except (OSError, ssl.SSLError) as exc:   # content only OpenSSL's reason, never the file's bytes
        files = cert if key is None else f"{cert} with {key}"
        raise ClientCertificateError(f"client-cert {files} is not a usable certificate and key "
                                     f"({getattr(exc, 'reason', None) or exc})") from None


class _Encrypted(Exception):
    pass


def _no_password():
    """OpenSSL would otherwise prompt for a pass phrase on the terminal, which is Postfix's connection
    under ``pfrest handle``: an encrypted key is refused instead."""
    raise _Encrypted


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
