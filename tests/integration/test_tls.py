"""The TLS front of `patchscope serve --tls-cert --tls-key`: the client speaks TLS, plaintext is refused."""

from __future__ import annotations

import datetime
import time

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from patchscope.serve.local import free_port
from patchscope.serve.tls import tls_front
from patchscope.wire import pb, pb_grpc
from patchscope_client import CallError, PatchscopeClient
from tests.integration.test_service import explain_request

SERVING = health_pb2.HealthCheckResponse.SERVING

pytestmark = pytest.mark.ray


def self_signed(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def test_the_tls_front_serves_every_call_and_refuses_plaintext(tiny_service, tmp_path):
    cert, key = self_signed(tmp_path)
    port = free_port()
    front = tls_front(tiny_service.address, port, cert, key)
    try:
        with PatchscopeClient(f"localhost:{port}", tls=cert.read_bytes(), timeout=60) as client:
            assert {m.id for m in client.models()} == {"tiny-llama", "tiny-qwen2"}
            table = client.explain_table(
                "tiny-llama", "hello world", [1], target="tiny-llama", max_new_tokens=3
            )
            assert table.rows and table.rows[0].explanation is not None
            with pytest.raises(CallError) as error:  # status codes pass through the front unchanged
                client.extract("tiny-llama", "hello world", [9])
            assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT and "layers" in error.value.details
        with grpc.insecure_channel(f"localhost:{port}") as plain:
            with pytest.raises(grpc.RpcError) as refused:
                pb_grpc.PatchscopeStub(plain).ListModels(pb.ListModelsRequest(), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        front.stop(grace=1)


def test_health_is_serving_on_the_proxy_and_through_the_tls_front_while_streams_are_busy(
    tiny_service, stub, tmp_path
):
    """grpc.health.v1 is answered by the proxy itself; the front forwards it on its event loop, so more
    streams than the old front's 32 threads leave it answered."""
    cert, key = self_signed(tmp_path)
    port = free_port()
    front = tls_front(tiny_service.address, port, cert, key, host="127.0.0.1")
    request = health_pb2.HealthCheckRequest(service="patchscope.v1.Patchscope")
    try:
        with grpc.insecure_channel(tiny_service.address) as plain:
            assert health_pb2_grpc.HealthStub(plain).Check(request, timeout=10).status == SERVING
        credentials = grpc.ssl_channel_credentials(cert.read_bytes())
        with grpc.secure_channel(f"localhost:{port}", credentials) as secure:
            tls_stub = pb_grpc.PatchscopeStub(secure)
            streams = [
                tls_stub.Explain(explain_request(layers=[1], positions=[-1], max_new_tokens=60), timeout=120)
                for _ in range(40)
            ]
            for s in streams[:5]:
                next(s)  # the first of them are streaming
            started = time.monotonic()
            assert health_pb2_grpc.HealthStub(secure).Check(request, timeout=10).status == SERVING
            print(f"health via the TLS front, 40 streams open: {(time.monotonic() - started) * 1000:.0f} ms")
            for s in streams:
                s.cancel()
    finally:
        front.stop(grace=1)
