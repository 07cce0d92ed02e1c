"""The TLS front of `patchscope serve --tls-cert --tls-key`: the client speaks TLS, plaintext is refused."""

from __future__ import annotations

import datetime

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from patchscope.serve.local import free_port
from patchscope.serve.tls import tls_front
from patchscope.wire import pb, pb_grpc
from patchscope_client import CallError, PatchscopeClient

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
