"""Agent names follow a grammar; agent-controlled text is shown escaped (issue 16, 9)."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest

from fedstack import Agent, AggregatorConfig, Store
from fedstack.cli.main import main as cli_main
from fedstack.errors import ConfigError, ConnectionClosed, RemoteProtocolError
from fedstack.names import BadName, SafeFormatter, check_agent_name, safe_text
from fedstack.testing import aggregator_thread
from fedstack.transport import connect
from fedstack.wire import Error, Participate, decode, encode

HOSTILE = {
    "csi-colour": "\x1b[31mroot\x1b[0m",
    "osc-link": "\x1b]8;;http://evil.example\x07click\x1b]8;;\x07",
    "newline": "agent-1\n12:00:00 INFO fedstack: agent admin joined",
    "bidi-override": "admin\u202egnp.exe",
    "zero-width": "ad\u200bmin",
}
UNSAFE_CHARS = ("\x1b", "\x07", "\n", "\u202e", "\u200b")


@pytest.mark.parametrize(
    "name", ["a", "agent-7", "sim-00042", "site@org.example", "Host_1+x", "A" * 128]
)
def test_names_of_the_grammar_are_accepted(name: str) -> None:
    assert check_agent_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        *HOSTILE.values(),
        "",
        "A" * 129,
        " a",
        "a b",
        "-a",
        ".a",
        "caf\u00e9",
        "\u0430dmin",
        "a/b",
        "a:b",
    ],
    ids=[
        *HOSTILE,
        "empty",
        "too-long",
        "leading-space",
        "space",
        "leading-dash",
        "leading-dot",
        "latin1",
        "cyrillic-a",
        "slash",
        "colon",
    ],
)
def test_names_outside_the_grammar_are_refused(name: str) -> None:
    with pytest.raises(BadName) as info:
        check_agent_name(name)
    assert isinstance(info.value, ConfigError) and isinstance(info.value, ValueError)
    assert not any(c in str(info.value) for c in UNSAFE_CHARS)  # the message is escaped


def test_safe_text_escapes_what_a_terminal_interprets() -> None:
    assert safe_text("agent-1 ok, accuracy 0.93 ü") == "agent-1 ok, accuracy 0.93 ü"
    assert safe_text("\x1b[31mred") == "\\x1b[31mred"
    assert safe_text("a\nb\tc\r") == "a\\nb\\tc\\r"
    assert safe_text("admin\u202egnp") == "admin\\u202egnp"
    assert safe_text("ad\u200bmin") == "ad\\u200bmin"
    assert safe_text("\U000e0041") == "\\U000e0041"  # a tag character
    assert safe_text("x" * 10, limit=4) == "xxxx..."
    for text in HOSTILE.values():
        assert not any(c in safe_text(text) for c in UNSAFE_CHARS)


def test_log_lines_stay_one_line() -> None:
    record = logging.LogRecord(
        "fedstack", logging.INFO, __file__, 1, "agent %s joined", (HOSTILE["newline"],), None
    )
    line = SafeFormatter("%(levelname)s %(message)s").format(record)
    assert "\n" not in line and line.startswith("INFO agent agent-1\\n12:00")


def test_the_agent_constructor_refuses_a_bad_name() -> None:
    for name in HOSTILE.values():
        with pytest.raises(ValueError):
            Agent("ws://127.0.0.1:1", name=name)


@pytest.mark.parametrize("name", list(HOSTILE.values()), ids=list(HOSTILE))
def test_the_decoder_refuses_a_participate_with_a_bad_name(name: str) -> None:
    data = b"".join(encode(Participate(agent_name=name)))
    with pytest.raises(RemoteProtocolError) as info:
        decode(data)
    assert info.value.code == "bad-name"
    assert not any(c in str(info.value) for c in UNSAFE_CHARS)
    ok = decode(b"".join(encode(Participate(agent_name="agent-1"))))
    assert isinstance(ok, Participate) and ok.agent_name == "agent-1"


def test_the_aggregator_refuses_registration_with_bad_names(tmp_path: Path) -> None:
    cfg = AggregatorConfig(port=0, db=str(tmp_path / "n.db"), auth="off")

    async def register(url: str, name: str) -> object:
        conn = await connect(url, max_message_bytes=1 << 20)
        try:
            conn.write(encode(Participate(agent_name=name)))
            return decode(await asyncio.wait_for(conn.recv(), 10))
        except ConnectionClosed as exc:
            return exc
        finally:
            conn.abort()

    with aggregator_thread(cfg) as agg:
        url = f"ws://127.0.0.1:{agg.port}"
        for name in HOSTILE.values():
            reply = asyncio.run(register(url, name))
            assert isinstance(reply, Error) and reply.code == "bad-name", reply
            assert not any(c in reply.message for c in UNSAFE_CHARS)
    st = Store(str(tmp_path / "n.db"))
    try:
        assert st.list_agents() == []  # nobody registered
    finally:
        st.close()


@pytest.mark.parametrize("name", list(HOSTILE.values()), ids=list(HOSTILE))
def test_credentials_add_refuses_a_bad_name(
    tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    db = str(tmp_path / "c.db")
    assert cli_main(["credentials", "add", name, "--db", db]) == 2
    err = capsys.readouterr().err.removesuffix("\n")
    assert "agent name" in err and not any(c in err for c in UNSAFE_CHARS)
    assert not Path(db).exists()  # refused before the store was opened: nothing issued
    assert cli_main(["credentials", "list", "--db", db, "--json"]) == 2  # read-only: no store
    assert "no fedstack store" in capsys.readouterr().err


def test_a_store_holding_hostile_text_prints_it_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = str(tmp_path / "old.db")
    st = Store(db)
    try:  # written straight into the store, as a store from before the grammar could hold
        for name in HOSTILE.values():
            st.issue_credential(name)
        st.log_event("refused", {"name": HOSTILE["osc-link"], "reason": HOSTILE["newline"]})
    finally:
        st.close()
    for argv in (["credentials", "list", "--db", db], ["db", "events", "--db", db]):
        assert cli_main(argv) == 0, argv
        out = capsys.readouterr().out
        assert not any(c in out.replace("\n", "") for c in UNSAFE_CHARS[:2] + UNSAFE_CHARS[3:])
        assert "\\x1b" in out
        lines = [ln for ln in out.splitlines() if "12:00:00 INFO" in ln]
        assert all("agent-1\\n12:00:00" in ln for ln in lines)  # no forged line of its own
    assert cli_main(["credentials", "list", "--db", db, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)  # JSON keeps the data as it is
    assert {c["name"] for c in listed} == set(HOSTILE.values())
