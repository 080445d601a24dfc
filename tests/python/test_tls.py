"""moe_client over TLS against moe_api_test_server with --tls-cert/--tls-key (the api.tls of a
cluster config): tokens stream over TLS; a client trusting another CA, checking another name,
speaking plain TCP to a TLS server or TLS to a plain one gets a TlsFailed / ConnectionFailed that
names the cause, not a hang; a wrong secret is still Unauthenticated; client certificates when
the server asks for them. The certificates are made at run time by the test server
(--make-test-certs: libcrypto, tests/unit/runtime/tls_test_certs.hpp)."""

import asyncio
import subprocess

import capnp
import pytest

import moe_client
from conftest import SECRET, _server_binary
from test_client import fake_tokens


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    subprocess.run([_server_binary(), "--make-test-certs", str(d)], check=True)
    return d


@pytest.fixture(scope="module")
def tls_server(certs):
    # Module-scoped like conftest's `server`, with the certificates of the module's CA.
    from conftest import Server

    s = Server("--token-interval-ms", "2", "--tls-cert", str(certs / "server.pem"),
               "--tls-key", str(certs / "server.key"))
    yield s
    s.stop()


def test_tokens_stream_over_tls(tls_server, certs):
    events = []
    # The address is an IP: Python checks it against the certificate's IP entries.
    with moe_client.Client(tls_server.address, SECRET, ca_file=str(certs / "ca.pem")) as c:
        assert c.generate([5, 17, 42], 8) == fake_tokens([5, 17, 42], 8)
        job = c.submit([1, 2, 3], 20, on_event=events.append)
        final = c.wait(job, timeout=60)
        assert c.describe().name == "fake"
    assert final.state == "finished"
    assert final.tokens == fake_tokens([3], 20)
    assert [t for e in events for t in e.tokens] == final.tokens
    assert events[-1].finished


def test_a_server_name_the_certificate_holds(tls_server, certs):
    with moe_client.Client(tls_server.address, SECRET, ca_file=str(certs / "ca.pem"),
                           server_name="localhost") as c:
        assert c.generate([7], 3) == [8, 9, 10]


def test_async_client_over_tls(tls_server, certs):
    async def main():
        async with capnp.kj_loop():
            c = await moe_client.AsyncClient.connect(tls_server.address, SECRET,
                                                     ca_file=str(certs / "ca.pem"))
            try:
                return await c.generate([100], 4)
            finally:
                await c.close()

    assert asyncio.run(main()) == [101, 102, 103, 104]


def test_a_wrong_secret_over_tls_is_unauthenticated(tls_server, certs):
    with pytest.raises(moe_client.Unauthenticated) as e:
        moe_client.Client(tls_server.address, "not the secret", ca_file=str(certs / "ca.pem"))
    assert "not the secret" not in str(e.value)


def test_a_client_trusting_another_ca_gets_a_clear_error(tls_server, certs):
    with pytest.raises(moe_client.TlsFailed) as e:
        moe_client.Client(tls_server.address, SECRET, ca_file=str(certs / "other-ca.pem"))
    assert "not signed by a CA this client trusts" in str(e.value)
    # The server keeps serving the clients that trust it.
    with moe_client.Client(tls_server.address, SECRET, ca_file=str(certs / "ca.pem")) as c:
        assert c.generate([1], 1) == [2]


def test_a_certificate_for_another_name_is_refused(tls_server, certs):
    with pytest.raises(moe_client.TlsFailed) as e:
        moe_client.Client(tls_server.address, SECRET, ca_file=str(certs / "ca.pem"),
                          server_name="api.example.org")
    assert "does not name 'api.example.org'" in str(e.value)


def test_a_plain_client_of_a_tls_server_gets_an_error_not_a_hang(tls_server, certs):
    with pytest.raises(moe_client.ConnectionFailed) as e:
        moe_client.Client(tls_server.address, SECRET)
    assert "connect with TLS" in str(e.value)


def test_a_tls_client_of_a_plain_server_gets_an_error_not_a_hang(server, certs):
    with pytest.raises(moe_client.TlsFailed) as e:
        moe_client.Client(server.address, SECRET, ca_file=str(certs / "ca.pem"))
    assert "does not speak TLS" in str(e.value)


def test_client_certificates_when_the_server_asks(make_server, certs):
    s = make_server("--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key"),
                    "--tls-client-ca", str(certs / "client-ca.pem"))
    ca = str(certs / "ca.pem")
    with pytest.raises(moe_client.TlsFailed) as e:
        moe_client.Client(s.address, SECRET, ca_file=ca)
    assert "client certificate" in str(e.value)
    with pytest.raises(moe_client.TlsFailed):
        moe_client.Client(s.address, SECRET, ca_file=ca, cert_file=str(certs / "stranger.pem"),
                          key_file=str(certs / "stranger.key"))
    with moe_client.Client(s.address, SECRET, ca_file=ca, cert_file=str(certs / "client.pem"),
                           key_file=str(certs / "client.key")) as c:
        assert c.generate([3], 2) == [4, 5]


def test_an_encrypted_server_key_with_its_passphrase(make_server, certs):
    passphrase = (certs / "server-encrypted.passphrase").read_text()
    s = make_server("--tls-cert", str(certs / "server-encrypted.pem"),
                    "--tls-key", str(certs / "server-encrypted.key"), "--tls-passphrase", passphrase)
    with moe_client.Client(s.address, SECRET, ca_file=str(certs / "ca.pem")) as c:
        assert c.generate([9], 1) == [10]


def test_unusable_tls_options_are_invalid_requests(tls_server, certs):
    with pytest.raises(moe_client.InvalidRequest):
        moe_client.Client(tls_server.address, SECRET, ca_file=str(certs / "ca.pem"),
                          cert_file=str(certs / "client.pem"))
    with pytest.raises(moe_client.InvalidRequest):
        moe_client.Client(tls_server.address, SECRET, ca_file=str(certs / "missing.pem"))
