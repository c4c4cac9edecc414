"""``fedstack certs``: a self-signed CA and certificates for a test deployment."""

from __future__ import annotations

from typing import Annotated

import typer

from fedstack.names import safe_text

__all__ = ["cmd_certs"]


def cmd_certs(
    out: Annotated[str, typer.Option("--out", help="directory to write into (created)")],
    host: Annotated[
        list[str] | None,
        typer.Option(
            "--host",
            metavar="H",
            help="DNS name or IP address the aggregator is reached at, "
            "repeatable (default: localhost and 127.0.0.1)",
        ),
    ] = None,
    agent: Annotated[
        list[str] | None,
        typer.Option(
            "--agent",
            metavar="NAME",
            help="also make a client certificate for this agent, repeatable",
        ),
    ] = None,
    days: Annotated[int, typer.Option("--days", help="validity in days")] = 365,
    force: Annotated[bool, typer.Option("--force", help="overwrite existing files")] = False,
) -> int:
    """Make a self-signed CA and TLS certificates for a test deployment.

    Writes ca.pem/ca.key, server.pem/server.key (valid for every --host) and
    agent-NAME.pem/.key client certificates (mutual TLS) into --out. Keys are written with
    mode 0600. For tests and trials: use your own CA in production.
    """
    from fedstack.security.tls import make_test_pki

    hosts = host or ["localhost", "127.0.0.1"]
    pki = make_test_pki(out, hosts=hosts, agents=agent or [], days=days, overwrite=force)
    print(f"wrote into {pki.directory}:")
    print(f"  {pki.ca}  CA certificate: give it to agents (--ca or FEDSTACK_CA)")
    print(f"  {pki.ca_key}  CA key: keep it private (mode 0600)")
    print(safe_text(f"  {pki.server_cert}  aggregator certificate for {', '.join(hosts)}"))
    print(f"  {pki.server_key}  aggregator key (mode 0600)")
    for name, (cert, key) in pki.clients.items():
        print(safe_text(f"  {cert}, {key}  client certificate and key of agent {name}"))
    first = hosts[0]
    port = 8765
    url_host = f"[{first}]" if ":" in first else first
    print("\nuse it:")
    mtls = f" --tls-client-ca {pki.ca}" if pki.clients else ""
    print(
        f"  fedstack aggregator --port {port} --tls-cert {pki.server_cert} "
        f"--tls-key {pki.server_key}{mtls} --require-tls ..."
    )
    agent_lines = [
        (name, f" --cert {cert} --key {key}") for name, (cert, key) in pki.clients.items()
    ] or [("NAME", "")]
    for name, client in agent_lines:
        print(
            safe_text(
                f"  fedstack agent --url wss://{url_host}:{port} --ca {pki.ca}{client} "
                f"--name {name} ..."
            )
        )
    print(
        "  in Python: Agent(url, name, ca=..., cert=..., key=...); config keys tls_cert, "
        "tls_key, tls_client_ca, require_tls"
    )
    return 0
