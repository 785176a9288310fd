"""Authentication and transport security of the simulator server: tokens, TLS and mutual TLS with certificates
made at test time, probes without a token, and LoadWorldModel confined to the model directory."""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_reflection.v1alpha import reflection_pb2

from services.auth import AuthError, ClientCredentials
from services.client import FailedPrecondition, InvalidArgument, NotFound, SimulatorClient, Unauthenticated, Unavailable
from services.config import ServerConfig
from services.proto.flywheel.simulator.v1 import simulator_pb2 as pb
from services.server import SERVICE_NAME, ServerProcess, serve
from simulators import make_engine
from simulators.world_model import WorldModel, WorldModelConfig

TASK = "pendulum"
ENV_KEYS = ("FLYWHEEL_TOKEN", "FLYWHEEL_TOKEN_FILE", "FLYWHEEL_TLS_ROOT_CERT", "FLYWHEEL_TLS_CLIENT_CERT",
            "FLYWHEEL_TLS_CLIENT_KEY", "FLYWHEEL_TLS_SERVER_NAME")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)


def write_secret(path: Path, text: str) -> str:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return str(path)


def certificate(directory: Path, name: str, issuer: tuple | None = None, server: bool = True) -> tuple[str, str, tuple]:
    """A PEM certificate and key (self-signed CA when ``issuer`` is None); returns (cert path, key path, (cert, key))."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1)))
    if issuer is None:
        builder = builder.issuer_name(subject).add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        signer = key
    else:
        builder = builder.issuer_name(issuer[0].subject).add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                                                        True)
        signer = issuer[1]
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
    cert = builder.sign(signer, hashes.SHA256())
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return str(cert_path), str(key_path), (cert, key)


def works(client: SimulatorClient) -> bool:
    session = client.create_session(TASK, 2)
    session.reset(seed=0)
    ok = session.step(np.zeros((2, 1), np.float32)).observations.shape == (2, 3)
    session.close()
    return ok


def reflection_lists(channel: grpc.Channel, version: str) -> set[str]:
    call = channel.stream_stream(f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                                 request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                 response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
    reply = next(call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
    return {s.name for s in reply.list_services_response.service}


def test_a_server_beyond_loopback_refuses_to_start_without_a_token():
    with pytest.raises(AuthError, match="listens beyond loopback, so the server needs a token"):
        serve(ServerConfig(task=TASK, engine="mujoco", host="0.0.0.0"))
    with pytest.raises(AuthError, match="cannot read the token file"):
        serve(ServerConfig(task=TASK, engine="mujoco", host="0.0.0.0", token_file="/nonexistent/token"))


def test_token_no_token_wrong_token_and_open_probes(tmp_path, monkeypatch):
    token = write_secret(tmp_path / "token", "s3cret-token-for-tests")
    with ServerProcess(ServerConfig(task=TASK, engine="mujoco", token_file=token)) as proc:
        with SimulatorClient(proc.address) as client:
            with pytest.raises(Unauthenticated, match="missing or wrong token"):
                client.create_session(TASK, 2)
            assert client.health() == "SERVING"                           # probes need no token
            assert client.health(SERVICE_NAME) == "SERVING"
        with grpc.insecure_channel(proc.address) as channel:
            for version in ("v1", "v1alpha"):
                assert {SERVICE_NAME, "grpc.health.v1.Health"} <= reflection_lists(channel, version)
        with SimulatorClient(proc.address, token="s3cret-token-for-test") as client:
            with pytest.raises(Unauthenticated):
                client.create_session(TASK, 2)
            with pytest.raises(Unauthenticated):
                client.call("Step", pb.StepRequest(session_id="s0-x"))
        with SimulatorClient(proc.address, token_file=token) as client:
            assert works(client)
            session = client.create_session(TASK, 2)
            session.use_stream()
            session.reset()
            assert session.step(np.zeros((2, 1), np.float32)).observations.shape == (2, 3)
            session.close()
        monkeypatch.setenv("FLYWHEEL_TOKEN", "s3cret-token-for-tests")      # what a Ray worker inherits
        with SimulatorClient(proc.address) as client:
            assert works(client)
        monkeypatch.delenv("FLYWHEEL_TOKEN")
        monkeypatch.setenv("FLYWHEEL_TOKEN_FILE", token)
        from services.vector_env import RemoteVectorEnv

        env = RemoteVectorEnv(proc.address, TASK, 2, streaming=True)
        env.reset(seed=0)
        env.step(np.zeros((2, 1), np.float32))
        env.close()


def test_tls_with_a_certificate_made_at_test_time(tmp_path):
    ca_cert, _ca_key, ca = certificate(tmp_path, "test-ca")
    cert, key, _ = certificate(tmp_path, "localhost", issuer=ca)
    token = write_secret(tmp_path / "token", "tls-token")
    config = ServerConfig(task=TASK, engine="mujoco", token_file=token, tls_cert_file=cert, tls_key_file=key)
    with ServerProcess(config) as proc:
        with SimulatorClient(proc.address, token_file=token, tls_root_cert=ca_cert) as client:
            assert works(client) and client.health() == "SERVING"
        with pytest.raises(Unavailable, match="a TLS server also needs tls_root_cert"):   # plaintext to a TLS server
            SimulatorClient(proc.address, token_file=token, timeout=2.0)
        other_ca, _, _ = certificate(tmp_path, "other-ca")
        with pytest.raises(Unavailable):                                       # a certificate it does not trust
            SimulatorClient(proc.address, token_file=token, tls_root_cert=other_ca, timeout=2.0)
        with SimulatorClient(proc.address, tls_root_cert=ca_cert) as client, pytest.raises(Unauthenticated):
            client.create_session(TASK, 2)                                     # TLS alone is not the token


def test_mutual_tls_wants_a_client_certificate(tmp_path, monkeypatch):
    ca_cert, _ca_key, ca = certificate(tmp_path, "test-ca")
    cert, key, _ = certificate(tmp_path, "localhost", issuer=ca)
    client_cert, client_key, _ = certificate(tmp_path, "runner", issuer=ca, server=False)
    token = write_secret(tmp_path / "token", "mtls-token")
    config = ServerConfig(task=TASK, engine="mujoco", token_file=token, tls_cert_file=cert, tls_key_file=key,
                          tls_client_ca_file=ca_cert)
    with ServerProcess(config) as proc:
        with pytest.raises(Unavailable):
            SimulatorClient(proc.address, token_file=token, tls_root_cert=ca_cert, timeout=2.0)
        credentials = ClientCredentials(token_file=token, root_cert=ca_cert, client_cert=client_cert,
                                        client_key=client_key)
        with SimulatorClient(proc.address, credentials=credentials) as client:
            assert works(client)
        for name, value in (("FLYWHEEL_TOKEN_FILE", token), ("FLYWHEEL_TLS_ROOT_CERT", ca_cert),
                            ("FLYWHEEL_TLS_CLIENT_CERT", client_cert), ("FLYWHEEL_TLS_CLIENT_KEY", client_key)):
            monkeypatch.setenv(name, value)
        with SimulatorClient(proc.address) as client:
            assert works(client)


def test_load_world_model_only_by_version_from_the_model_directory(tmp_path):
    spec = make_engine("mujoco", TASK).spec
    models, outside = tmp_path / "models", tmp_path / "outside"
    models.mkdir(), outside.mkdir()
    tiny = WorldModelConfig(ensemble_size=2, hidden_size=16, num_layers=1)
    inside = WorldModel(TASK, spec.state_size, spec.action_size, tiny)
    inside.save(models / f"{inside.version}.pt")
    WorldModel(TASK, spec.state_size, spec.action_size, tiny).save(outside / "x.pt")
    (models / "broken.pt").write_text("not a checkpoint")
    config = ServerConfig(task=TASK, engine="mujoco", world_model_dir=str(models))
    with ServerProcess(config) as proc, SimulatorClient(proc.address) as client:
        for version in ("../outside/x", "*", "wm-*", "/etc/passwd", "..", "a/b", "x?", "[ab]", "~root", ".hidden"):
            with pytest.raises(InvalidArgument, match="is not a version name"):
                client.load_world_model(version)
        answers = set()
        for path in ("/etc/passwd", str(outside / "x.pt"), "/nonexistent/file.pt"):
            with pytest.raises(InvalidArgument) as info:
                client.call("LoadWorldModel", pb.LoadWorldModelRequest(path=path))
            answers.add(info.value.details)
        assert answers == {"LoadWorldModel loads by version name from the server's model directory only; a path is "
                           "not accepted"}                                  # the same answer, whatever exists
        with pytest.raises(NotFound) as info:
            client.load_world_model("wm-absent")
        assert str(models) not in info.value.details and "neither loaded" in info.value.details
        with pytest.raises(FailedPrecondition, match="cannot be loaded"):
            client.load_world_model("broken")
        assert client.load_world_model(inside.version) == inside.version
        assert client.create_session(TASK, 2).info.wm_version == inside.version
    assert os.path.exists(outside / "x.pt")


def test_a_token_that_grpc_metadata_cannot_carry_is_refused_naming_the_file(tmp_path):
    from services.auth import ClientCredentials, load_token

    two_lines = write_secret(tmp_path / "token", "line-one\nline-two")
    with pytest.raises(AuthError, match=rf"token file {two_lines} holds characters a token cannot have \('\\n'\)"):
        load_token(two_lines)
    with pytest.raises(AuthError, match=r"holds characters a token cannot have \(' '\)"):
        ClientCredentials(token="two words").resolved_token()
    with pytest.raises(AuthError, match=r"\$FLYWHEEL_TOKEN holds characters"):
        load_token(environ={"FLYWHEEL_TOKEN": "caf\u00e9"})
    assert load_token(write_secret(tmp_path / "ok", "  s3cret-token  \n")) == "s3cret-token"
