"""Server-side TLS contexts (pyOpenSSL) for STARTTLS, and a one-line description of a session.

API:
  ``server_context(cert_file, key_file) -> OpenSSL.SSL.Context``: TLS 1.2 minimum, no compression,
     forward-secret AEAD ciphers for TLS 1.2 (TLS 1.3 suites are OpenSSL's defaults), server cipher preference.
  ``tls_description(conn) -> str``: protocol and cipher, e.g. ``"TLSv1.3 TLS_AES_256_GCM_SHA384"``.
Invariants: a context is never changed after it is handed out; a reload builds a new one (STYLE: pyOpenSSL).
Threading: a finished context may be shared by every session thread; each session has its own Connection.
Errors: ``server_context`` raises ``PmasterError`` with one line naming the file when a file is missing,
  unreadable or not PEM, or when the key does not belong to the certificate.
"""

import logging
import os

from OpenSSL import SSL

from pmaster.errors import PmasterError

log = logging.getLogger("pmaster.tls")

# TLS 1.2 suites only; OpenSSL keeps its TLS 1.3 suites (all AEAD and forward secret) separately.
CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS:!SHA1"

# Belt and braces with set_min_proto_version, for pyOpenSSL releases that lack it.
_OLD_PROTOCOLS = SSL.OP_NO_SSLv2 | SSL.OP_NO_SSLv3 | SSL.OP_NO_TLSv1 | SSL.OP_NO_TLSv1_1


def server_context(cert_file: str, key_file: str) -> SSL.Context:
    """Build a fresh server context from a PEM certificate chain and its private key."""
    for what, path in (("certificate", cert_file), ("key", key_file)):
        _check_readable(what, path)
    ctx = SSL.Context(getattr(SSL, "TLS_SERVER_METHOD", SSL.SSLv23_METHOD))
    ctx.set_options(_OLD_PROTOCOLS | SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE)
    if hasattr(ctx, "set_min_proto_version"):
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_cipher_list(CIPHERS)
    # Idle sessions are many and mostly quiet: give their buffers back to the allocator.
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    # Without a session id context OpenSSL fails resumption attempts with an error instead of a full handshake.
    ctx.set_session_id(b"pmaster")
    try:
        ctx.use_certificate_chain_file(cert_file)
    except SSL.Error as exc:
        raise PmasterError("%s: not a PEM certificate chain (%s)" % (cert_file, _reason(exc))) from None
    mismatch = PmasterError("%s: private key does not match the certificate in %s" % (key_file, cert_file))
    try:
        ctx.use_privatekey_file(key_file)
    except SSL.Error as exc:
        if "mismatch" in _reason(exc):  # OpenSSL compares the key with the certificate already loaded
            raise mismatch from None
        raise PmasterError("%s: not a PEM private key (%s)" % (key_file, _reason(exc))) from None
    try:
        ctx.check_privatekey()
    except SSL.Error:
        raise mismatch from None
    return ctx


def tls_description(conn: SSL.Connection) -> str:
    """``"TLSv1.3 TLS_AES_256_GCM_SHA384"``: for the Received: header, the log and the policy view."""
    version = conn.get_protocol_version_name() or "TLS"
    cipher = conn.get_cipher_name()
    return "%s %s" % (version, cipher) if cipher else version


def _check_readable(what: str, path: str) -> None:
    if not path:
        raise PmasterError("TLS %s file not set" % what)
    if not os.path.isfile(path):
        raise PmasterError("%s: TLS %s file does not exist" % (path, what))
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise PmasterError("%s: cannot read TLS %s file: %s" % (path, what, exc.strerror or exc)) from None


def _reason(exc: SSL.Error) -> str:
    """The last OpenSSL reason string, e.g. 'no start line'; pyOpenSSL nests them in tuples."""
    try:
        return str(exc.args[0][-1][2]) or "invalid"
    except (IndexError, TypeError):
        return str(exc) or "invalid"
