"""A feature whose extra is not installed says what to install."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fedstack.errors import ConfigError, TLSError


def test_certificates_without_cryptography_name_the_certs_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedstack.security.tls import make_test_pki

    for name in [m for m in sys.modules if m == "cryptography" or m.startswith("cryptography.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "cryptography", None)  # import fails
    with pytest.raises(TLSError, match=r"pip install 'fedstack\[certs\]'"):
        make_test_pki(tmp_path / "pki")


def test_digits_without_scikit_learn_name_the_demo_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedstack.data import digits

    monkeypatch.setenv("FEDSTACK_CACHE_DIR", str(tmp_path))  # no cached split
    digits._split.cache_clear()
    for name in [m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(ConfigError, match=r"pip install 'fedstack\[demo\]'"):
        digits._split(0.25, 12345)
