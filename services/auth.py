"""Who may call a simulator server: a shared-secret token in call metadata, and TLS.

    token = load_token(config.token_file)          # file, else $FLYWHEEL_TOKEN_FILE, else $FLYWHEEL_TOKEN
    server = grpc.server(pool, interceptors=[TokenInterceptor(token)])
    port = server.add_secure_port(addr, server_credentials(config))   # when the config names a certificate
    creds = ClientCredentials.from_env(token_file="/run/secrets/flywheel")    # the client's side

The token is compared in constant time (``hmac.compare_digest``); health checking and reflection
stay open so that probes work without it. A token is never taken from the command line: a process
listing would show it. Imports only grpc and the standard library.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

import grpc

TOKEN_ENV, TOKEN_FILE_ENV = "FLYWHEEL_TOKEN", "FLYWHEEL_TOKEN_FILE"
ROOT_CERT_ENV, CLIENT_CERT_ENV, CLIENT_KEY_ENV = "FLYWHEEL_TLS_ROOT_CERT", "FLYWHEEL_TLS_CLIENT_CERT", "FLYWHEEL_TLS_CLIENT_KEY"
SERVER_NAME_ENV = "FLYWHEEL_TLS_SERVER_NAME"
HEADER = "authorization"
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1.ServerReflection/",
                 "/grpc.reflection.v1alpha.ServerReflection/")


class AuthError(ValueError):
    """A token or certificate that cannot be used: names the file or variable and what is expected."""


def read_secret(path: str | os.PathLike, what: str = "token file") -> str:
    """The stripped content of a secret file; an unreadable or empty file is an ``AuthError``."""
    try:
        text = Path(path).read_text().strip()
    except OSError as exc:
        raise AuthError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    if not text:
        raise AuthError(f"the {what} {path} is empty; it must hold the shared token")
    return text


def load_token(token_file: str | None = None, environ: dict | None = None) -> str | None:
    """The token from ``token_file``, else the file ``$FLYWHEEL_TOKEN_FILE``, else ``$FLYWHEEL_TOKEN``; None if none."""
    env = os.environ if environ is None else environ
    path = token_file or env.get(TOKEN_FILE_ENV)
    if path:
        where = f"token file {path}" if token_file else f"token file ${TOKEN_FILE_ENV} ({path})"
        return check_token(read_secret(path, "token file" if token_file else f"token file ${TOKEN_FILE_ENV}"), where)
    token = env.get(TOKEN_ENV, "").strip()
    return check_token(token, f"${TOKEN_ENV}") if token else None


def check_token(token: str, where: str) -> str:
    """A token gRPC metadata can carry: one word of printable ASCII (no spaces, no line breaks)."""
    bad = sorted({c for c in token if not 0x21 <= ord(c) <= 0x7E})
    if bad:
        raise AuthError(f"the {where} holds characters a token cannot have ({', '.join(repr(c) for c in bad[:5])}); "
                        "a token is one line of printable ASCII without spaces")
    return token


def group_readable(path: str | os.PathLike) -> bool:
    """Whether a secret file can be read by others than its owner (worth a warning)."""
    try:
        return bool(os.stat(path).st_mode & (stat.S_IRWXG | stat.S_IRWXO))
    except OSError:
        return False


def host_port(host: str, port: int) -> str:
    """A gRPC target or bind address: ``host:port``, an IPv6 literal in brackets (``[::1]:50051``)."""
    name = host.strip("[]")
    return f"[{name}]:{port}" if ":" in name else f"{name}:{port}"


def is_loopback(host: str) -> bool:
    """Whether ``host`` only listens on this machine (127.0.0.0/8, ::1, localhost)."""
    name = host.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(name, None))
        except (OSError, ValueError):
            return False


def metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries ``token`` (empty without one)."""
    return ((HEADER, f"Bearer {token}"),) if token else ()


class TokenInterceptor(grpc.ServerInterceptor):
    """Answers UNAUTHENTICATED to every call without ``authorization: Bearer <token>``, probes excepted."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    def _allowed(self, details: grpc.HandlerCallDetails) -> bool:
        if details.method.startswith(OPEN_PREFIXES):
            return True
        sent = [v for k, v in (details.invocation_metadata or ()) if k == HEADER]
        value = sent[0] if len(sent) == 1 else ""
        value = value if isinstance(value, bytes) else str(value).encode()
        return hmac.compare_digest(value, self._expected)

    def intercept_service(self, continuation, handler_call_details):
        if self._allowed(handler_call_details):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        return None if handler is None else _denied(handler)


def _denied(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    message = ("missing or wrong token: send the server's token as call metadata 'authorization: Bearer <token>' "
               f"(SimulatorClient(token=... or token_file=...), or ${TOKEN_ENV} / ${TOKEN_FILE_ENV})")

    def unary(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    def streaming(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - abort raises

    kinds = {(False, False): grpc.unary_unary_rpc_method_handler, (True, False): grpc.stream_unary_rpc_method_handler,
             (False, True): grpc.unary_stream_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(streaming if handler.response_streaming else unary,
                request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)


def server_credentials(cert_file: str, key_file: str, client_ca_file: str | None = None) -> grpc.ServerCredentials:
    """TLS credentials of a server; with ``client_ca_file`` clients must present a certificate it signed."""
    key = read_secret(key_file, "TLS key file (tls_key_file)").encode()
    cert = read_secret(cert_file, "TLS certificate file (tls_cert_file)").encode()
    ca = read_secret(client_ca_file, "client CA file (tls_client_ca_file)").encode() if client_ca_file else None
    try:
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)
    except Exception as exc:  # noqa: BLE001 - grpc raises a bare RuntimeError/TypeError for bad PEM
        raise AuthError(f"cannot use the TLS certificate {cert_file} with key {key_file}: {exc}") from None


@dataclass(frozen=True)
class ClientCredentials:
    """What a client shows a server: a token and, for TLS, the root certificate (and its own, for mutual TLS).

    File fields are paths. ``from_env`` fills what is not given from ``$FLYWHEEL_TOKEN_FILE``,
    ``$FLYWHEEL_TOKEN``, ``$FLYWHEEL_TLS_ROOT_CERT``, ``$FLYWHEEL_TLS_CLIENT_CERT``, ``$FLYWHEEL_TLS_CLIENT_KEY``
    and ``$FLYWHEEL_TLS_SERVER_NAME`` (so Ray workers inherit them).
    """

    token: str | None = None
    token_file: str | None = None
    root_cert: str | None = None          # PEM file of the CA that signed the server's certificate: use TLS
    client_cert: str | None = None        # PEM files of this client's certificate and key (mutual TLS)
    client_key: str | None = None
    server_name: str | None = None        # the name the server's certificate is checked against (default: the host)

    @classmethod
    def from_env(cls, token: str | None = None, token_file: str | None = None, root_cert: str | None = None,
                 environ: dict | None = None) -> ClientCredentials:
        env = os.environ if environ is None else environ
        if not token and not token_file:
            token_file, token = env.get(TOKEN_FILE_ENV) or None, env.get(TOKEN_ENV) or None
        return cls(token=token, token_file=token_file, root_cert=root_cert or env.get(ROOT_CERT_ENV) or None,
                   client_cert=env.get(CLIENT_CERT_ENV) or None, client_key=env.get(CLIENT_KEY_ENV) or None,
                   server_name=env.get(SERVER_NAME_ENV) or None)

    @property
    def tls(self) -> bool:
        return bool(self.root_cert)

    def resolved_token(self) -> str | None:
        """The token to send (read from ``token_file`` when that is given)."""
        if self.token_file:
            return check_token(read_secret(self.token_file), f"token file {self.token_file}")
        return check_token(self.token.strip(), "token") if self.token and self.token.strip() else None

    def channel(self, address: str, options: list[tuple[str, object]]) -> grpc.Channel:
        """A TLS channel when ``root_cert`` is set, else a plaintext one."""
        if not self.tls:
            return grpc.insecure_channel(address, options=options)
        root = read_secret(self.root_cert, "TLS root certificate").encode()
        if bool(self.client_cert) != bool(self.client_key):
            raise AuthError(f"a client certificate needs its key: set both ${CLIENT_CERT_ENV} and ${CLIENT_KEY_ENV}")
        chain = read_secret(self.client_cert, "TLS client certificate").encode() if self.client_cert else None
        key = read_secret(self.client_key, "TLS client key").encode() if self.client_key else None
        creds = grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=chain)
        if self.server_name:
            options = [*options, ("grpc.ssl_target_name_override", self.server_name)]
        return grpc.secure_channel(address, creds, options=options)
