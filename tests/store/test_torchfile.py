"""torch.save files are read without unpickling (fedstack.store.torchfile).

Every file read here is written by real ``torch.save`` or built opcode by opcode; the
reference is torch's own view of the tensors. Refused files must not run anything.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedstack.data.inert_pickle import Limits
from fedstack.errors import ConfigError
from fedstack.store import torchfile
from fedstack.store.modelfiles import read_model_file

torch = pytest.importorskip("torch")


def _save(obj: Any, path: Path, **kwargs: Any) -> Path:
    torch.save(obj, path, **kwargs)
    return path


def _expected(t: Any) -> np.ndarray[Any, Any]:
    t = t.detach()
    return np.asarray((t.float() if t.dtype == torch.bfloat16 else t).numpy())


def _assert_same(got: dict[str, np.ndarray[Any, Any]], state: dict[str, Any]) -> None:
    assert list(got) == list(state)
    for name, t in state.items():
        want = _expected(t)
        assert got[name].dtype == want.dtype, name
        assert got[name].shape == want.shape, name
        np.testing.assert_array_equal(got[name], want, err_msg=name)
        assert got[name].flags.c_contiguous and got[name].flags.writeable, name


class _CNN(torch.nn.Module):  # type: ignore[misc, name-defined]
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, padding=1)
        self.fc = torch.nn.Linear(16 * 2 * 2, 10)


def test_a_cnn_state_dict_registers_as_torch_sees_it(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _CNN()
    model.bn1.running_mean.uniform_()  # buffers, and num_batches_tracked (int64)
    model.bn1.num_batches_tracked += 7
    state = model.state_dict()
    path = _save(state, tmp_path / "cnn.pt")
    got, fmt = read_model_file(path)
    assert fmt == "pt"
    _assert_same(got, dict(state))
    assert got["bn1.num_batches_tracked"].dtype == np.int64
    assert int(got["bn1.num_batches_tracked"]) == 7
    # the module accepts what was read
    fresh = _CNN()
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in got.items()})
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, state[k])


def test_reading_needs_no_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3)}
    path = _save(state, tmp_path / "m.pt")
    monkeypatch.setitem(sys.modules, "torch", None)  # any `import torch` now fails
    got, _ = read_model_file(path)
    np.testing.assert_array_equal(got["w"], np.arange(6, dtype=np.float32).reshape(2, 3))


def test_every_dtype_and_strided_views_come_out_as_torch_shows_them(tmp_path: Path) -> None:
    base = torch.arange(-12, 12).reshape(4, 6)
    state: dict[str, Any] = {}
    for dtype in (
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    ):
        t = (base if dtype != torch.uint8 else base + 12).to(dtype)
        name = str(dtype).removeprefix("torch.")
        state[name] = t
        state[name + ".t"] = t.t()  # transposed view, saved as is (not contiguous)
    x = torch.randn(3, 4, 5)
    state["permuted"] = x.permute(2, 0, 1)
    state["stepped"] = x[1:, ::2, 1::3]  # offset and steps into a shared storage
    state["expanded"] = torch.tensor([1.5, -2.0]).reshape(2, 1).expand(2, 1000)  # stride 0
    state["scalar"] = torch.tensor(2.25)
    state["empty"] = torch.zeros(0, 7)
    assert not state["int8.t"].is_contiguous() and not state["stepped"].is_contiguous()
    assert state["expanded"].stride() == (1, 0)
    path = _save(state, tmp_path / "all.pt")
    got = torchfile.read_state_dict(path.read_bytes(), str(path))
    _assert_same(got, state)
    assert got["bfloat16"].dtype == np.float32 and got["bool.t"].dtype == np.bool_
    # pickle protocol 4 (STACK_GLOBAL, MEMOIZE, FRAME) reads the same
    path4 = _save(state, tmp_path / "all4.pt", pickle_protocol=4)
    _assert_same(torchfile.read_state_dict(path4.read_bytes()), state)


def test_bfloat16_is_read_as_float32_exactly(tmp_path: Path) -> None:
    values = torch.tensor([1.0, -0.0, 3.140625, 1e38, -1e-38, 65504.0], dtype=torch.bfloat16)
    path = _save({"h": values}, tmp_path / "bf.pt")
    got, _ = read_model_file(path)
    assert got["h"].dtype == np.float32
    np.testing.assert_array_equal(got["h"], values.float().numpy())


def test_shared_storages_and_tied_weights(tmp_path: Path) -> None:
    weight = torch.randn(5, 4)
    state = OrderedDict(
        [
            ("emb", weight),
            ("head", weight),  # tied: the same tensor under two names
            ("row0", weight[0]),
            ("tail", weight[2:, 1:]),
        ]
    )
    path = _save(state, tmp_path / "tied.pt")
    with zipfile.ZipFile(path) as z:
        assert len([n for n in z.namelist() if "/data/" in n]) == 1  # one storage record
    got, _ = read_model_file(path)
    _assert_same(got, dict(state))
    got["emb"][0, 0] = 99.0  # separate arrays: writing one leaves the others
    assert got["head"][0, 0] == weight[0, 0].item() and got["row0"][0] == weight[0, 0].item()


@pytest.mark.parametrize("key", ["model_state_dict", "state_dict", "model"])
def test_a_checkpoint_holding_the_state_dict(tmp_path: Path, key: str) -> None:
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(8, 3)).sum().backward()
    opt.step()  # the optimizer state holds momentum tensors
    checkpoint = {
        "epoch": 3,
        key: model.state_dict(),
        "optimizer_state_dict": opt.state_dict(),
        "loss": 0.25,
        "history": [1.0, 0.5],
        "note": None,
    }
    path = _save(checkpoint, tmp_path / "ckpt.pt")
    got, _ = read_model_file(path)
    _assert_same(got, dict(model.state_dict()))
    everything = torchfile.load(path.read_bytes())
    assert everything["epoch"] == 3 and everything["history"] == [1.0, 0.5]
    np.testing.assert_array_equal(
        everything["optimizer_state_dict"]["state"][0]["momentum_buffer"],
        opt.state_dict()["state"][0]["momentum_buffer"].numpy(),
    )


def test_parameters_saved_with_keep_vars(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 3)
    state = model.state_dict(keep_vars=True)
    assert isinstance(state["weight"], torch.nn.Parameter)
    got, _ = read_model_file(_save(state, tmp_path / "p.pt"))
    _assert_same(got, dict(state))


# -- files that must be refused ---------------------------------------------------------


def _with_pickle(pt: Path, pkl: bytes, out: Path, **replace: bytes | None) -> Path:
    """A copy of archive ``pt`` with ``data.pkl`` (and records named in ``replace``,
    relative to the archive; None drops one) swapped."""
    with zipfile.ZipFile(pt) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            rel = info.filename.split("/", 1)[1]
            data = pkl if rel == "data.pkl" else replace.get(rel, src.read(info))
            if data is not None:
                dst.writestr(info.filename, data)
    return out


class _RunsACommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_calling_os_system_is_refused_and_does_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    genuine = _save({"w": torch.ones(2)}, tmp_path / "genuine.pt")
    payload = pickle.dumps({"w": _RunsACommand(marker)}, protocol=2)
    evil = _with_pickle(genuine, payload, tmp_path / "evil.pt")
    with pytest.raises(ConfigError, match=r"evil\.pt.*data\.pkl.*GLOBAL '(posix|nt)\.system'"):
        read_model_file(evil)
    assert not marker.exists()
    # the payload is live: unpickled, it runs (here in this test, on purpose)
    with zipfile.ZipFile(evil) as z:
        pickle.loads(z.read("genuine/data.pkl"))  # noqa: S301
    assert marker.exists()


@pytest.mark.parametrize(
    ("obj", "refused"),
    [
        (lambda: torch.nn.Linear(2, 2), r"'torch\.nn\.modules\.linear\.Linear'"),
        (lambda: {"w": torch.zeros(2, dtype=torch.complex64)}, r"'torch\.ComplexFloatStorage'"),
        (lambda: {"w": torch.zeros(2, dtype=torch.uint16)}, r"'torch\.uint16'"),
        (lambda: {"w": np.ones(2)}, r"'numpy\._?core\.multiarray\._reconstruct'"),
        (lambda: {"w": torch.ones(2), "n": torch.Size([2])}, r"'torch\.Size'"),
    ],
)
def test_unknown_globals_are_refused_by_name(tmp_path: Path, obj: Any, refused: str) -> None:
    path = _save(obj(), tmp_path / "x.pt")
    with pytest.raises(ConfigError, match=r"x\.pt \(x/data\.pkl\): pickle opcode .*" + refused):
        read_model_file(path, "pt")


# A data.pkl written opcode by opcode, torch.save's shape (protocol 2).


def _i(n: int) -> bytes:  # LONG1: any size
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _s(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _g(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def _tensor(
    offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    *,
    storage: str = "FloatStorage",
    key: str = "0",
    numel: int = 6,
    extra: bytes = b"",
    hooks: bytes = b"",
) -> bytes:
    return (
        _g("torch._utils", "_rebuild_tensor_v2")
        + b"(("
        + _s("storage")
        + _g("torch", storage)
        + _s(key)
        + _s("cpu")
        + _i(numel)
        + b"tQ"
        + _i(offset)
        + b"("
        + b"".join(map(_i, size))
        + b"t("
        + b"".join(map(_i, stride))
        + b"t\x89"
        + _g("collections", "OrderedDict")
        + b")R"
        + (b"(" + hooks + b"u" if hooks else b"")
        + extra
        + b"tR"
    )


def _pkl(**tensors: bytes) -> bytes:
    return b"\x80\x02}(" + b"".join(_s(k) + v for k, v in tensors.items()) + b"u."


def _archive(pkl: bytes, storages: dict[str, bytes], byteorder: bytes = b"little") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("a/data.pkl", pkl)
        z.writestr("a/byteorder", byteorder)
        for key, raw in storages.items():
            z.writestr(f"a/data/{key}", raw)
        z.writestr("a/version", b"3\n")
    return buf.getvalue()


SIX = np.arange(6, dtype="<f4").tobytes()


def test_the_hand_built_archive_is_what_torch_reads(tmp_path: Path) -> None:
    data = _archive(_pkl(w=_tensor(1, (2, 2), (1, 2)), v=_tensor(0, (6,), (1,))), {"0": SIX})
    (tmp_path / "h.pt").write_bytes(data)
    want = torch.load(tmp_path / "h.pt", weights_only=True)
    got = torchfile.read_state_dict(data)
    _assert_same(got, want)
    np.testing.assert_array_equal(got["w"], [[1.0, 3.0], [2.0, 4.0]])
    # an empty metadata dict (the optional seventh argument) is accepted
    empty = _archive(_pkl(w=_tensor(2, (1,), (1,), extra=b"}")), {"0": SIX})
    np.testing.assert_array_equal(torchfile.read_state_dict(empty)["w"], [2.0])
    # big-endian storages are read by the byteorder record
    big = _archive(
        _pkl(w=_tensor(1, (2, 2), (1, 2))), {"0": np.arange(6, dtype=">f4").tobytes()}, b"big"
    )
    np.testing.assert_array_equal(torchfile.read_state_dict(big)["w"], [[1.0, 3.0], [2.0, 4.0]])


@pytest.mark.parametrize(
    ("tensors", "storages", "message"),
    [
        # size and stride reach past the storage's 6 elements
        ({"w": _tensor(0, (3, 3), (3, 1))}, {"0": SIX}, "reaches element 8 of storage '0'"),
        ({"w": _tensor(6, (1,), (1,))}, {"0": SIX}, "reaches element 6"),
        ({"w": _tensor(0, (2,), (2**61,))}, {"0": SIX}, "reaches element 2305843009213693952"),
        # the storage record is shorter than numel declares
        ({"w": _tensor(0, (6,), (1,))}, {"0": SIX[:20]}, "holds 20 bytes, not the 24"),
        ({"w": _tensor(0, (6,), (1,), numel=2**40)}, {"0": SIX}, "not the 4398046511104"),
        ({"w": _tensor(0, (6,), (1,), key="1")}, {"0": SIX}, "no record 'a/data/1'"),
        # huge sizes: a stride-0 view of one element, and sizes that are not counts
        ({"w": _tensor(0, (2**40, 2**40), (0, 0))}, {"0": SIX}, "more than 8589934592 bytes"),
        ({"w": _tensor(0, (2**70,), (1,))}, {"0": SIX}, "not non-negative integers"),
        ({"w": _tensor(0, (0, 2**61, 2**61), (1, 1, 1))}, {"0": SIX}, "other sizes are too large"),
        ({"w": _tensor(0, (2,), (-1,))}, {"0": SIX}, "not non-negative integers"),
        ({"w": _tensor(0, (2, 3), (1,))}, {"0": SIX}, "differ in length"),
        (
            {"w": _tensor(0, (6,), (1,)), "v": _tensor(0, (6,), (1,), storage="IntStorage")},
            {"0": SIX},
            "storage '0' is declared twice",
        ),
        ({"w": _tensor(0, (6,), (1,), key="../x")}, {"0": SIX}, "is not a record name"),
        (
            {"w": _tensor(0, (1,), (1,), extra=b"}" + _s("neg") + b"\x88s")},
            {"0": SIX},
            r"metadata \['neg'\] is not read",
        ),
        ({"w": _tensor(0, (1,), (1,), hooks=_i(0) + _i(1))}, {"0": SIX}, "backward_hooks"),
    ],
)
def test_tensors_beyond_their_storage_and_huge_sizes_are_refused(
    tensors: dict[str, bytes], storages: dict[str, bytes], message: str
) -> None:
    data = _archive(_pkl(**tensors), storages)
    with pytest.raises(ConfigError, match=message):
        torchfile.read_state_dict(data, "f.pt")


def test_damaged_and_foreign_archives_are_refused(tmp_path: Path) -> None:
    pt = _save({"w": torch.arange(6, dtype=torch.float32)}, tmp_path / "m.pt")
    data = pt.read_bytes()

    def refused(raw: bytes, message: str) -> None:
        (tmp_path / "x.pt").write_bytes(raw)
        with pytest.raises(ConfigError, match=message):
            read_model_file(tmp_path / "x.pt")

    refused(data[: len(data) // 2], r"x\.pt is not a readable torch\.save zip archive")
    refused(data[:-30], "not a readable torch.save zip archive")
    refused(
        _save(
            {"w": torch.ones(2)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False
        ).read_bytes(),
        "legacy format",
    )
    refused(
        _with_pickle(pt, b"\x80\x02}.", tmp_path / "y.pt", **{"data/0": SIX[:8]}).read_bytes(),
        "holds no tensor",
    )
    refused(
        _with_pickle(pt, pt_pickle(pt), tmp_path / "y.pt", **{"data/0": SIX[:8]}).read_bytes(),
        "holds 8 bytes, not the 24",
    )
    refused(
        _with_pickle(pt, pt_pickle(pt), tmp_path / "y.pt", **{"data/0": None}).read_bytes(),
        "no record 'm/data/0'",
    )
    refused(
        _with_pickle(pt, pt_pickle(pt), tmp_path / "y.pt", byteorder=b"middle").read_bytes(),
        "byteorder record",
    )
    refused(
        _with_pickle(pt, pt_pickle(pt) + b"\x00", tmp_path / "y.pt").read_bytes(), "trailing bytes"
    )
    # records recompressed (a zip bomb could declare terabytes)
    squeezed = io.BytesIO()
    with zipfile.ZipFile(pt) as src, zipfile.ZipFile(squeezed, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    refused(squeezed.getvalue(), "is compressed")
    # a plain list, a bare tensor
    refused(
        _save([torch.ones(1)], tmp_path / "l.pt").read_bytes(), "holds a list, not a state dict"
    )
    refused(_save(torch.ones(1), tmp_path / "t.pt").read_bytes(), "holds a single tensor")
    refused(
        _save({"w": torch.ones(1), "lr": 0.1}, tmp_path / "s.pt").read_bytes(),
        "entry 'lr' is a float",
    )


def pt_pickle(pt: Path) -> bytes:
    with zipfile.ZipFile(pt) as z:
        return z.read(f"{pt.stem}/data.pkl")


def test_limits(tmp_path: Path) -> None:
    data = _save({"w": torch.ones(1000)}, tmp_path / "m.pt").read_bytes()
    with pytest.raises(ConfigError, match=f"{len(data)} bytes is over the 1000-byte limit"):
        torchfile.load(data, limits=torchfile.TorchLimits(max_file_bytes=1000))
    with pytest.raises(ConfigError, match="is over 50 bytes"):
        torchfile.load(data, limits=torchfile.TorchLimits(pickle=Limits(max_bytes=50)))
    with pytest.raises(ConfigError, match="more than 3999 bytes in all"):
        torchfile.load(data, limits=torchfile.TorchLimits(max_total_bytes=3999))
    with pytest.raises(ConfigError, match="zip records is over the limit of 3"):
        torchfile.load(data, limits=torchfile.TorchLimits(max_records=3))
    assert (
        torchfile.load(data, limits=torchfile.TorchLimits(max_total_bytes=4000))["w"].size == 1000
    )
