"""TLS: wss:// federations, plaintext refused, wrong CA fails fast, mutual TLS, test PKI."""

from __future__ import annotations

import os
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography import x509

from fedstack import Agent, AggregatorConfig, FederationFinished
from fedstack.aggregator import Aggregator
from fedstack.cli.main import main as cli_main
from fedstack.errors import ConfigError, TLSError
from fedstack.security import (
    PKIFiles,
    client_context,
    is_fatal_tls_error,
    make_test_pki,
    server_context,
)
from fedstack.testing import aggregator_thread

# the book's minimal example (chapter 6): fixed "trained" models, the global is their mean
MODELS = {
    "a1": {"model1": [[1, 2, 3], [4, 5, 6]], "model2": [[1, 2], [3, 4]]},
    "a2": {"model1": [[3, 4, 5], [6, 7, 8]], "model2": [[3, 4], [5, 6]]},
}
EXPECTED = {"model1": [[2, 3, 4], [5, 6, 7]], "model2": [[2, 3], [4, 5]]}


def weights(name: str) -> dict[str, np.ndarray]:
    return {k: np.array(v, dtype=np.float32) for k, v in MODELS[name].items()}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKIFiles:
    return make_test_pki(tmp_path_factory.mktemp("pki"), agents=["a1", "a2"])


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> PKIFiles:
    """A second, unrelated CA (with a client certificate it signed)."""
    return make_test_pki(tmp_path_factory.mktemp("other"), agents=["a1"])


def tls_config(tmp_path: Path, pki: PKIFiles, **kw: Any) -> AggregatorConfig:
    base: dict[str, Any] = dict(
        auth="off",
        port=0,
        db=str(tmp_path / "f.db"),
        rounds=3,
        min_agents=2,
        finish_grace=5,
        tls_cert=str(pki.server_cert),
        tls_key=str(pki.server_key),
        require_tls=True,
    )
    base.update(kw)
    return AggregatorConfig(**base)


@pytest.fixture
def tls_aggregator(tmp_path: Path, pki: PKIFiles) -> Iterator[Aggregator]:
    with aggregator_thread(tls_config(tmp_path, pki)) as agg:
        yield agg


def run_agent(url: str, name: str, **kw: Any) -> list[tuple[int, dict[str, np.ndarray]]]:
    agent = Agent(url, name=name, **kw)
    agent.send_initial_model(weights(name))
    agent.start(timeout=30)
    seen = []
    try:
        while True:
            try:
                gm = agent.wait_for_global_model(timeout=30)
            except FederationFinished:
                break
            seen.append((agent.version, {k: np.array(v) for k, v in gm.items()}))
            agent.send_trained_model(weights(name), num_samples=1)
    finally:
        agent.close()
    return seen


def federate(url: str, **agent_kw: dict[str, Any]) -> dict[str, list[Any]]:
    results: dict[str, list[Any]] = {}
    errors: list[BaseException] = []

    def one(name: str) -> None:
        try:
            results[name] = run_agent(url, name, **agent_kw.get(name, {}))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(n,)) for n in ("a1", "a2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    return results


def check_minimal_results(results: dict[str, list[Any]]) -> None:
    for name in ("a1", "a2"):
        assert [v for v, _ in results[name]] == [0, 1, 2, 3]
        for _version, gm in results[name][1:]:
            for k, v in EXPECTED.items():
                np.testing.assert_array_equal(gm[k], np.array(v, dtype=np.float32))


def timed_start_error(agent: Agent, limit: float = 5.0) -> TLSError:
    agent.send_initial_model(weights("a1"))
    t0 = time.monotonic()
    with pytest.raises(TLSError) as info:
        agent.start(timeout=60)
    elapsed = time.monotonic() - t0
    agent.close()
    assert elapsed < limit, f"took {elapsed:.1f} s: retried instead of failing fast"
    assert agent.reconnects == 0
    return info.value


# ---------------------------------------------------------------------- federation
def test_minimal_federation_over_wss(
    tls_aggregator: Aggregator, pki: PKIFiles, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"wss://127.0.0.1:{tls_aggregator.port}"
    ca = {"ca": str(pki.ca)}
    check_minimal_results(federate(url, a1=ca, a2=ca))


def test_listening_line_says_wss(
    tmp_path: Path, pki: PKIFiles, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("INFO", logger="fedstack.aggregator"):
        with aggregator_thread(tls_config(tmp_path, pki)) as agg:
            port = agg.port
    assert f"listening on wss://127.0.0.1:{port}" in caplog.text


def test_ca_from_environment(
    tls_aggregator: Aggregator, pki: PKIFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDSTACK_CA", str(pki.ca))
    agent = Agent(f"wss://localhost:{tls_aggregator.port}", name="a1")  # DNS SAN too
    agent.send_initial_model(weights("a1"))
    agent.start(timeout=10)
    assert agent.agent_id
    agent.close()


# ---------------------------------------------------------------------- refused
def test_plaintext_agent_is_refused(tls_aggregator: Aggregator) -> None:
    err = timed_start_error(Agent(f"ws://127.0.0.1:{tls_aggregator.port}", name="a1"))
    assert "speaks only TLS" in str(err) and "wss://" in str(err)


def test_plaintext_upgrade_gets_no_websocket(tls_aggregator: Aggregator) -> None:
    request = (
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", tls_aggregator.port), timeout=5) as s:
        s.sendall(request)
        answer = b""
        try:
            while chunk := s.recv(4096):
                answer += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    assert b"101" not in answer and b"Upgrade" not in answer


def test_wrong_ca_fails_fast(tls_aggregator: Aggregator, other_pki: PKIFiles) -> None:
    url = f"wss://127.0.0.1:{tls_aggregator.port}"
    err = timed_start_error(Agent(url, name="a1", ca=str(other_pki.ca)))
    msg = str(err)
    assert "CA" in msg and "--ca" in msg and "FEDSTACK_CA" in msg and url in msg
    assert str(other_pki.ca) in msg


def test_certificate_for_another_host_fails_fast(tmp_path: Path) -> None:
    elsewhere = make_test_pki(tmp_path / "pki", hosts=["aggregator.example"])
    with aggregator_thread(tls_config(tmp_path, elsewhere)) as agg:
        err = timed_start_error(
            Agent(f"wss://127.0.0.1:{agg.port}", name="a1", ca=str(elsewhere.ca))
        )
    assert "not valid for this host" in str(err)


# ---------------------------------------------------------------------- mutual TLS
@pytest.fixture
def mtls_aggregator(tmp_path: Path, pki: PKIFiles) -> Iterator[Aggregator]:
    with aggregator_thread(tls_config(tmp_path, pki, tls_client_ca=str(pki.ca))) as agg:
        yield agg


def test_mutual_tls_federation(mtls_aggregator: Aggregator, pki: PKIFiles) -> None:
    url = f"wss://127.0.0.1:{mtls_aggregator.port}"
    kw = {
        n: {"ca": str(pki.ca), "cert": str(pki.clients[n][0]), "key": str(pki.clients[n][1])}
        for n in ("a1", "a2")
    }
    check_minimal_results(federate(url, **kw))


def test_mutual_tls_refuses_agent_without_certificate(
    mtls_aggregator: Aggregator, pki: PKIFiles
) -> None:
    url = f"wss://127.0.0.1:{mtls_aggregator.port}"
    err = timed_start_error(Agent(url, name="a1", ca=str(pki.ca)))
    assert "client certificate" in str(err) and "--cert" in str(err)


def test_mutual_tls_refuses_certificate_of_another_ca(
    mtls_aggregator: Aggregator, pki: PKIFiles, other_pki: PKIFiles
) -> None:
    cert, key = other_pki.clients["a1"]
    url = f"wss://127.0.0.1:{mtls_aggregator.port}"
    err = timed_start_error(Agent(url, name="a1", ca=str(pki.ca), cert=str(cert), key=str(key)))
    assert "refused this agent's client certificate" in str(err)


# ---------------------------------------------------------------------- config
def test_require_tls_without_certificate_refuses_to_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="require_tls"):
        AggregatorConfig(require_tls=True)
    with pytest.raises(ConfigError, match="require_tls"):
        AggregatorConfig.from_mapping({"require_tls": "true", "tls_key": None})
    with pytest.raises(ConfigError, match="need tls_cert"):
        AggregatorConfig(tls_client_ca="ca.pem")
    assert cli_main(["aggregator", "--require-tls", "--db", str(tmp_path / "x.db")]) == 2
    assert not (tmp_path / "x.db").exists()


def test_tls_keys_from_a_config_file(tmp_path: Path, pki: PKIFiles) -> None:
    path = tmp_path / "agg.toml"
    path.write_text(
        f'[aggregator]\ntls_cert = "{pki.server_cert}"\n'
        f'tls_key = "{pki.server_key}"\nrequire_tls = "yes"\n'
    )
    cfg = AggregatorConfig.load(path)
    assert cfg.require_tls is True and cfg.tls_cert == str(pki.server_cert)


def test_missing_or_bad_files_are_clear_errors(tmp_path: Path, pki: PKIFiles) -> None:
    with pytest.raises(TLSError, match="not found"):
        Aggregator(AggregatorConfig(tls_cert=str(tmp_path / "nope.pem")))
    with pytest.raises(TLSError, match="cannot load"):
        server_context(pki.server_cert, pki.clients["a1"][1])  # a key of another cert
    with pytest.raises(TLSError, match="CA file"):
        Agent("wss://127.0.0.1:1", name="a1", ca=str(tmp_path / "nope.pem"))


def test_contexts_are_tls12_plus_and_verify(pki: PKIFiles) -> None:
    c = client_context(pki.ca)
    assert c.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert c.verify_mode == ssl.CERT_REQUIRED and c.check_hostname
    s = server_context(pki.server_cert, pki.server_key)
    assert s.minimum_version >= ssl.TLSVersion.TLSv1_2 and s.verify_mode == ssl.CERT_NONE
    m = server_context(pki.server_cert, pki.server_key, client_ca=pki.ca)
    assert m.verify_mode == ssl.CERT_REQUIRED


def test_transient_tls_errors_are_retried() -> None:
    assert not is_fatal_tls_error(ssl.SSLEOFError())
    assert not is_fatal_tls_error(ConnectionRefusedError())
    assert is_fatal_tls_error(ssl.SSLCertVerificationError())


# ---------------------------------------------------------------------- test PKI
def test_key_files_are_private(pki: PKIFiles) -> None:
    for key in [pki.ca_key, pki.server_key, *(k for _, k in pki.clients.values())]:
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600, key
    assert stat.S_IMODE(os.stat(pki.ca).st_mode) & 0o077 != 0o077  # certs are public


def test_server_certificate_names_hosts(pki: PKIFiles) -> None:
    cert = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_certs_cli(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    cmd = [
        sys.executable,
        "-m",
        "fedstack",
        "certs",
        "--out",
        str(out),
        "--host",
        "localhost",
        "--host",
        "10.0.0.5",
        "--agent",
        "a1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for name in ("ca.pem", "ca.key", "server.pem", "server.key", "agent-a1.pem", "agent-a1.key"):
        assert (out / name).is_file() and str(out / name) in proc.stdout
    assert "--tls-cert" in proc.stdout and "wss://localhost:" in proc.stdout
    assert "--ca" in proc.stdout
    for key in ("ca.key", "server.key", "agent-a1.key"):
        assert stat.S_IMODE(os.stat(out / key).st_mode) == 0o600
    server_context(out / "server.pem", out / "server.key", client_ca=out / "ca.pem")
    client_context(out / "ca.pem", out / "agent-a1.pem", out / "agent-a1.key")
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "already exist" in again.stderr
