"""Deployment (book row 79): the files shipped in ``deploy/`` run a federation on one host
and across two hosts, changing nothing but where the aggregator's name resolves to.

The two "hosts" are network namespaces joined by a veth pair (10.79.0.1 and 10.79.0.2,
:mod:`fedstack.testing.netns`, removed afterwards whatever happens); the aggregator runs
in one, two agents in the other, and they reach it only across the veth, over TLS
(``wss://aggregator.example:8765``, the certificate made by ``fedstack certs --host
aggregator.example``, its name resolved through the agents' namespace's ``/etc/hosts``)
with credentials issued by ``fedstack credentials add`` (the token written into the
agent's env file, as the README says; a third agent left with the shipped file's empty
token is refused). The one-host variant runs the same files and commands with
everything in one namespace, where the name resolves to 127.0.0.1.

The processes are started from the systemd units of ``deploy/systemd`` as systemd would
start them (:class:`Unit`: ``ExecStart`` with its specifiers ``%i %S %C %%`` and
``$VAR``/``${VAR}`` from ``Environment=`` and ``EnvironmentFile=``, ``WorkingDirectory``,
``StateDirectory``/``CacheDirectory`` created), from ``deploy/`` installed under a temporary
root: ``/etc``, ``/var`` and ``/opt`` in the shipped files are relocated under it, the only
change made to them; ``/opt/fedstack/bin/fedstack`` is a wrapper running this checkout's
``fedstack``. Not emulated: the switch to ``User=fedstack`` and the sandboxing options
(the test runs as root); ``systemd-analyze verify`` checks those lines.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fedstack.aggregator.config import AggregatorConfig
from fedstack.store import Store
from fedstack.testing import netns

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
AGGREGATOR_NAME = "aggregator.example"
AGENTS = ("a1", "a2")
INTRUDER = "a3"  # its env file is the shipped example as is: no credential
INSTALLED_BIN = "/opt/fedstack/bin/fedstack"

# the shipped files mention these trees; installed, they live under the test's root
_ABSOLUTE = re.compile(r"(?<![\w./:-])/(etc|var|opt)/")


def relocate(text: str, root: Path) -> str:
    """``text`` with its absolute /etc, /var and /opt paths moved under ``root``."""
    return _ABSOLUTE.sub(lambda m: f"{root}/{m.group(1)}/", text)


# ---------------------------------------------------------------------------------------
# systemd, as far as the shipped units use it


def read_environment_file(path: Path) -> dict[str, str]:
    """An ``EnvironmentFile=``: ``KEY=VALUE`` lines, ``#``/``;`` comments, a value in
    matching quotes taken without them; anything else is refused (systemd would log it)."""
    env: dict[str, str] = {}
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        key, sep, value = line.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key.strip()):
            raise ValueError(f"{path}:{n}: not KEY=VALUE: {raw!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        env[key.strip()] = value
    return env


@dataclass
class Unit:
    """A systemd service unit file: its ``[Service]`` lines, repeated keys kept in order."""

    path: Path
    service: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> Unit:
        unit = cls(path)
        section = ""
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            line = lines[i].strip()
            i += 1
            while line.endswith("\\") and i < len(lines):  # continuation
                line = line[:-1] + " " + lines[i].strip()
                i += 1
            if not line or line[0] in "#;":
                continue
            if line.startswith("["):
                section = line.strip("[]")
                continue
            key, sep, value = line.partition("=")
            assert sep, f"{path}: not key=value: {line!r}"
            if section == "Service":
                unit.service.setdefault(key.strip(), []).append(value.strip())
        return unit

    def one(self, key: str) -> str:
        values = self.service.get(key, [])
        assert len(values) == 1, f"{self.path.name}: {key}= {values}"
        return values[0]

    @staticmethod
    def specifiers(text: str, instance: str | None, root: Path) -> str:
        """``%i %I %S %C %%`` (a system unit's: /var/lib, /var/cache under ``root``)."""
        values = {"S": f"{root}/var/lib", "C": f"{root}/var/cache", "%": "%"}
        if instance is not None:
            values.update(i=instance, I=instance)

        def one(m: re.Match[str]) -> str:
            if m.group(1) not in values:
                raise ValueError(f"specifier %{m.group(1)} is not emulated by this test")
            return values[m.group(1)]

        return re.sub(r"%(.)", one, text)

    def command(
        self, root: Path, instance: str | None = None
    ) -> tuple[list[str], dict[str, str], Path]:
        """What systemd would run for this unit (instance ``instance`` of a template):
        the argv, the environment it adds, the working directory. Creates the state and
        cache directories, as systemd does before starting the service."""
        env: dict[str, str] = {}
        for item in self.service.get("Environment", []):
            for pair in shlex.split(self.specifiers(item, instance, root)):
                k, _, v = pair.partition("=")
                env[k] = v
        for item in self.service.get("EnvironmentFile", []):
            optional = item.startswith("-")
            path = Path(self.specifiers(item.removeprefix("-"), instance, root))
            if optional and not path.exists():
                continue
            env.update(read_environment_file(path))
        for key, base in (("StateDirectory", "var/lib"), ("CacheDirectory", "var/cache")):
            for item in self.service.get(key, []):
                for d in self.specifiers(item, instance, root).split():
                    (root / base / d).mkdir(parents=True, exist_ok=True)
        argv: list[str] = []
        for word in shlex.split(self.specifiers(self.one("ExecStart"), instance, root)):
            if m := re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word):  # split at spaces
                argv.extend(env.get(m.group(1), "").split())
            else:  # ${VAR}: one word
                argv.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env[m[1]], word))
        # a program path: ExecStart's prefixes (- @ + ! :) are not emulated
        assert argv[0].startswith("/"), argv[0]
        cwd = Path(self.specifiers(self.one("WorkingDirectory"), instance, root))
        return argv, env, cwd


# ---------------------------------------------------------------------------------------
# the deployment


@dataclass
class Installed:
    """``deploy/`` installed under ``root`` (relocated), certificates made."""

    root: Path

    @property
    def etc(self) -> Path:
        return self.root / "etc" / "fedstack"

    def unit(self, name: str) -> Unit:
        return Unit.read(self.root / "etc" / "systemd" / "system" / name)

    @property
    def db(self) -> Path:
        cfg = AggregatorConfig.load(self.etc / "aggregator.toml")
        return Path(cfg.db)


def run(argv: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float = 60) -> str:
    done = subprocess.run(
        list(argv), env=dict(env or base_env()), capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{argv}: {done.returncode}\n{done.stderr[-3000:]}"
    return done.stdout


def base_env() -> dict[str, str]:
    """What a service inherits here: no FEDSTACK_* from the test's environment."""
    keep = ("PATH", "PYTHONPATH", "LANG", "LC_ALL", "TMPDIR")
    env = {k: v for k, v in os.environ.items() if k in keep or k.startswith("COVERAGE")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def install(root: Path) -> Installed:
    """Install ``deploy/`` as its files say: /etc/fedstack, /etc/systemd/system, and
    /opt/fedstack/bin/fedstack (a wrapper around this checkout's fedstack)."""
    inst = Installed(root)
    (inst.etc / "agents").mkdir(parents=True)
    units = root / "etc" / "systemd" / "system"
    units.mkdir(parents=True)
    for name in ("aggregator.toml", "aggregator.env", "agent.env"):
        (inst.etc / name).write_text(relocate((DEPLOY / name).read_text(), root))
    for unit in (DEPLOY / "systemd").glob("*.service"):
        (units / unit.name).write_text(relocate(unit.read_text(), root))
    binary = Path(relocate(INSTALLED_BIN, root))
    binary.parent.mkdir(parents=True)
    binary.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m fedstack "$@"\n')
    binary.chmod(0o755)
    return inst


def add_agent(inst: Installed, name: str, index: int, token: str) -> None:
    """/etc/fedstack/agents/NAME.env from the shipped example (a1's): its token (none if
    empty), its trainer's index."""
    text = (DEPLOY / "agents" / "a1.env").read_text()
    assert "FEDSTACK_TOKEN=\n" in text and "index=0 " in text
    text = text.replace("FEDSTACK_TOKEN=\n", f"FEDSTACK_TOKEN={token}\n")
    text = text.replace("index=0 ", f"index={index} ").replace("a1", name)
    path = inst.etc / "agents" / f"{name}.env"
    path.write_text(relocate(text, inst.root))
    path.chmod(0o600)


@dataclass
class Service:
    """A unit's process, started inside a namespace."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def start(inst: Installed, ns: netns.Namespace, unit: str, instance: str | None = None) -> Service:
    argv, env, cwd = inst.unit(unit).command(inst.root, instance)
    for word in argv:  # nothing outside the installation root
        assert not word.startswith("/") or word.startswith(str(inst.root)), word
    label = instance or unit.split(".")[0]
    log = inst.root / f"{label}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ns.argv(argv),
            cwd=cwd,
            env={**base_env(), "HOME": str(cwd), **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Service(label, proc, log)


# probes the aggregator from an agent's namespace: HTTPS /healthz with the deployment's CA
# and host name (waiting while the port is closed); then plaintext on the same port
PROBE = r"""
import http.client, socket, ssl, sys, time
host, port, ca = sys.argv[1], int(sys.argv[2]), sys.argv[3]
deadline = time.monotonic() + 60
while True:
    try:
        conn = http.client.HTTPSConnection(
            host, port, context=ssl.create_default_context(cafile=ca), timeout=10)
        conn.request("GET", "/healthz")
        peer = conn.sock.getpeername()[0]
        print("https", conn.getresponse().status, peer)
        break
    except ConnectionRefusedError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.1)
with socket.create_connection((host, port), timeout=10) as s:
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        reply = s.recv(64)
    except ConnectionResetError:
        reply = b""
print("plain", reply.startswith(b"HTTP/"))
"""


# scrapes the operator port as README step 6 says, on the aggregator's host: HTTPS with
# the deployment's CA for the name localhost; prints whether the round counter is there
METRICS_PROBE = r"""
import http.client, ssl, sys
conn = http.client.HTTPSConnection(
    "localhost", int(sys.argv[1]), context=ssl.create_default_context(cafile=sys.argv[2]),
    timeout=10)
conn.request("GET", "/metrics")
resp = conn.getresponse()
print(resp.status, b"fedstack_rounds_completed_total" in resp.read())
"""


def stop(services: Sequence[Service]) -> None:
    for svc in services:
        if svc.proc.poll() is None:
            os.killpg(svc.proc.pid, signal.SIGKILL)
            svc.proc.wait(10)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`fedstack certs` as the README runs it on the aggregator host (once: both tests
    install the same certificates)."""
    out = tmp_path_factory.mktemp("pki") / "certs"
    run(
        [sys.executable, "-m", "fedstack", "certs", "--out", str(out)]
        + ["--host", AGGREGATOR_NAME, "--host", "localhost"]
    )
    return out


@pytest.fixture
def deployment(tmp_path: Path, certificates: Path) -> Installed:
    inst = install(tmp_path / "root")
    shutil.copytree(certificates, inst.etc / "certs")
    return inst


def federate(
    inst: Installed,
    aggregator_host: netns.Namespace,
    agent_host: netns.Namespace,
    *,
    intruder: bool,
) -> str:
    """The README's steps: the aggregator's service, credentials, the agents' services,
    to the end of the run (every one exits 0); with ``intruder``, a third agent whose env
    file has no credential too. Returns the address the agents connect from."""
    agg_address = aggregator_host.address or "127.0.0.1"
    aggregator_host.set_hosts({AGGREGATOR_NAME: agg_address})
    agent_host.set_hosts({AGGREGATOR_NAME: agg_address})
    fedstack = relocate(INSTALLED_BIN, inst.root)
    services: list[Service] = []
    try:
        agg = start(inst, aggregator_host, "fedstack-aggregator.service")
        services.append(agg)
        # from the agents' host: the aggregator's name, its certificate, TLS only
        ca = str(inst.etc / "certs" / "ca.pem")
        probe = subprocess.run(
            agent_host.argv([sys.executable, "-c", PROBE, AGGREGATOR_NAME, "8765", ca]),
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert probe.returncode == 0, probe.stderr[-2000:] + agg.output()
        assert probe.stdout.split() == ["https", "200", agg_address, "plain", "False"]
        # the operator port: Prometheus metrics over HTTPS on the aggregator host's loopback
        port = str(AggregatorConfig.load(inst.etc / "aggregator.toml").operator_port)
        scrape = subprocess.run(
            aggregator_host.argv([sys.executable, "-c", METRICS_PROBE, port, ca]),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert scrape.stdout.split() == ["200", "True"], scrape.stderr[-2000:]
        # on the aggregator's host, into its running store: one credential per agent
        adds = [
            subprocess.Popen(
                aggregator_host.argv(
                    [fedstack, "credentials", "add", name, "--db", str(inst.db), "--json"]
                ),
                env=base_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for name in AGENTS
        ]
        for index, (name, add) in enumerate(zip(AGENTS, adds, strict=True)):
            out, err = add.communicate(timeout=60)
            assert add.returncode == 0, err
            add_agent(inst, name, index, json.loads(out)["token"])
        names: tuple[str, ...] = AGENTS
        if intruder:
            add_agent(inst, INTRUDER, 0, "")
            names = (*AGENTS, INTRUDER)
        for name in names:
            services.append(start(inst, agent_host, "fedstack-agent@.service", name))
        for svc in services[1:] + services[:1]:
            try:
                rc = svc.proc.wait(120)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{svc.name} did not finish:\n{svc.output()}")
            # the agent without a credential is refused for good: exit 2, not restarted
            expected = 2 if svc.name == INTRUDER else 0
            assert rc == expected, f"{svc.name} exited with {rc}:\n{svc.output()}"
    finally:
        stop(services)
    return agent_host.address or "127.0.0.1"


def check_run(inst: Installed, agent_address: str, *, intruder: bool) -> None:
    cfg = AggregatorConfig.load(inst.etc / "aggregator.toml")
    store = Store(str(inst.db))
    try:
        run_id = store.list_runs()[-1]["id"]
        rounds = store.rounds(run_id)
        events = store.events(run_id)
        credentials = {c["name"]: c for c in store.list_credentials()}
    finally:
        store.close()
    assert cfg.rounds is not None and [r["round"] for r in rounds] == list(range(1, cfg.rounds + 1))
    assert all(r["num_updates"] == len(AGENTS) for r in rounds)
    assert rounds[-1]["metrics"]["eval_accuracy"] > 0.85, rounds[-1]["metrics"]
    auth = [e["detail"] for e in events if e["kind"] == "authenticated"]
    assert {a["name"] for a in auth} == set(AGENTS)
    assert {a["source"] for a in auth} == {"issued"}
    assert {a["credential"] for a in auth} == {credentials[n]["credential"] for n in AGENTS}
    refused = [e["detail"] for e in events if e["kind"] == "refused"]
    expected = {("auth-required", agent_address)} if intruder else set()
    assert {(r["code"], r["address"].rsplit(":", 1)[0]) for r in refused} == expected, refused
    joined = [e["detail"] for e in events if e["kind"] == "joined"]
    assert {j["name"] for j in joined} == set(AGENTS)
    assert {j["address"].rsplit(":", 1)[0] for j in joined} == {agent_address}


def assert_removed(names: set[str]) -> None:
    """The namespaces and their /etc/netns entries are gone."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not names & set(re.findall(r"^(\S+)", listed, re.M)), listed
    assert not any((netns.ETC_NETNS / n).exists() for n in names)


needs_netns = pytest.mark.skipif(netns.unavailable() is not None, reason=str(netns.unavailable()))


@needs_netns
def test_deploy_files_run_across_two_hosts_over_tls(deployment: Installed) -> None:
    with netns.hosts(2) as (aggregator_host, agent_host):
        names = {aggregator_host.name, agent_host.name}
        address = federate(deployment, aggregator_host, agent_host, intruder=True)
    assert_removed(names)
    assert address == "10.79.0.2"
    check_run(deployment, address, intruder=True)


@needs_netns
def test_deploy_files_run_on_one_host(deployment: Installed) -> None:
    with netns.hosts(1) as (host,):
        address = federate(deployment, host, host, intruder=False)
    assert_removed({host.name})
    assert address == "127.0.0.1"
    check_run(deployment, address, intruder=False)


def test_unit_files_pass_systemd_analyze(tmp_path: Path) -> None:
    """The shipped units as systemd reads them: no unknown key, bad value or section."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    binary = tmp_path / "fedstack"  # verify wants ExecStart's program to exist
    binary.write_text("#!/bin/sh\n")
    binary.chmod(stat.S_IRWXU)
    units = []
    for unit in (DEPLOY / "systemd").glob("*.service"):
        name = unit.name.replace("@.", "@a1.")  # a template is verified as an instance
        (tmp_path / name).write_text(unit.read_text().replace(INSTALLED_BIN, str(binary)))
        units.append(str(tmp_path / name))
    assert len(units) == 2
    done = subprocess.run(
        [analyze, "verify", "--man=no", *units],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "info"},
    )
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


@needs_netns
def test_namespaces_are_removed_whatever_happens_inside() -> None:
    """An exception inside: the process left running in a namespace is killed, the
    namespaces, the veth pair and the /etc/netns entries are removed; a namespace left
    by a dead test process is removed by the next use."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"{netns.PREFIX}{dead.pid}-abcdef-0"
    subprocess.run(["ip", "netns", "add", stale], check=True, timeout=30)
    try:
        with pytest.raises(RuntimeError, match="inside"), netns.hosts(2) as (a, b):
            assert_removed({stale})
            b.set_hosts({"peer.example": str(a.address)})
            sleeper = subprocess.Popen(b.argv(["sleep", "300"]), start_new_session=True)
            ping = subprocess.run(
                b.argv([sys.executable, "-c", "import socket; print(socket.gethostbyname("
                        "'peer.example'))"]),
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            assert ping.stdout.strip() == a.address == "10.79.0.1"
            assert b.pids() == [sleeper.pid]
            raise RuntimeError("inside")
        assert sleeper.wait(10) == -signal.SIGKILL
        assert_removed({a.name, b.name})
    finally:
        subprocess.run(["ip", "netns", "delete", stale], capture_output=True, timeout=30)
    with pytest.raises(ValueError):
        netns.hosts(3).__enter__()
    with netns.hosts(1) as (lone,), pytest.raises(ValueError, match="host name"):
        lone.set_hosts({"bad name; rm": "10.0.0.1"})
