"""Content-addressed tensor blobs: encoding and atomic writes."""

from __future__ import annotations

from pathlib import Path

import blake3
import numpy as np
import pytest

from fedstack.errors import LocalProtocolError, StoreError, TensorFileError
from fedstack.store.blobs import BlobStore, decode_weights, digest_of, encode_weights


def sample() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {
        "conv.weight": rng.standard_normal((2, 3, 3)).astype(np.float32),
        "conv.bias": rng.standard_normal(2),
        "half": rng.standard_normal(7).astype(np.float16),
        "ids": rng.integers(-5, 5, size=(4, 4), dtype=np.int8),
        "big": rng.integers(0, 2**63, size=3, dtype=np.uint64),
        "flags": np.array([True, False]),
        "empty": np.zeros((0,), np.float64),
        "be": np.arange(6, dtype=">f8").reshape(2, 3),
        "strided": np.arange(20, dtype=np.int32)[::3],
    }


def joined(parts: list[bytes | memoryview]) -> bytes:
    return b"".join(bytes(p) for p in parts)


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert list(got) == list(want)
    for k, v in want.items():
        assert got[k].shape == v.shape, k
        assert got[k].dtype.name == v.dtype.name, k
        assert np.array_equal(got[k], v), k


def test_encode_decode_roundtrip() -> None:
    w = sample()
    data = joined(encode_weights(w))
    header_len = int.from_bytes(data[:8], "little")
    assert data[8:9] == b"{" and (8 + header_len) % 64 == 0  # safetensors, aligned data
    got = decode_weights(memoryview(data))
    assert_same(got, w)
    assert all(np.shares_memory(a, np.frombuffer(data, np.uint8)) for a in got.values() if a.size)


def test_encode_decode_empty_model() -> None:
    assert decode_weights(memoryview(joined(encode_weights({})))) == {}


def test_encoding_is_deterministic() -> None:
    assert joined(encode_weights(sample())) == joined(encode_weights(sample()))


def test_encode_refuses_bad_dtype() -> None:
    with pytest.raises(LocalProtocolError):
        encode_weights({"c": np.zeros(2, np.complex128)})


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"FST",
        b"XXXX\x00\x00\x00\x00",
        b"FSTB\xff\xff\x00\x00",
        b"\x02\x00\x00\x00\x00\x00\x00\x00{}x",
    ],
)
def test_decode_refuses_non_blobs(data: bytes) -> None:
    with pytest.raises(TensorFileError):
        decode_weights(memoryview(data))


def test_put_get_roundtrip_and_content_address(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs")
    w = sample()
    digest, size = blobs.put(w)
    path = blobs.path(digest)
    assert path.is_file() and path.stat().st_size == size
    # BLAKE3, 248 bits, "z3"-prefixed: 64 characters that are never a sha256 hex digest
    assert len(digest) == 64 and digest.startswith("z3")
    assert "z3" + blake3.blake3(path.read_bytes()).hexdigest(length=31) == digest
    assert path.parent.name == digest[2:4]
    assert_same(blobs.get(digest), w)
    assert blobs.put(w) == (digest, size)  # idempotent
    assert blobs.put(sample() | {"extra": np.ones(1)})[0] != digest


def test_atomic_write_leaves_no_tmp_files(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs")
    for seed in range(5):
        blobs.put({"w": np.full(100, seed, np.float32)})
    blobs.put({"w": np.full(100, 0, np.float32)})  # again: nothing new
    files = [p for p in (tmp_path / "blobs").rglob("*") if p.is_file()]
    assert len(files) == 5
    assert all(p.suffix == ".safetensors" for p in files)
    assert not [p for p in files if ".tmp" in p.name]


def test_failed_rename_cleans_up_and_raises_store_error(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    blobs = BlobStore(root)
    w = {"w": np.arange(10.0)}
    digest = digest_of([joined(encode_weights(w))])[0]
    final = blobs.path(digest)
    final.mkdir(parents=True)  # a non-empty directory where the blob must go
    (final / "occupied").write_bytes(b"x")
    with pytest.raises(StoreError, match="cannot write blob"):
        blobs.put(w)
    leftovers = [p for p in final.parent.iterdir() if p != final]
    assert leftovers == []  # the temporary file was removed


def test_unusable_fanout_directory_raises_store_error(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    blobs = BlobStore(root)
    w = {"w": np.arange(10.0)}
    digest = digest_of([joined(encode_weights(w))])[0]
    (root / digest[2:4]).write_bytes(b"")  # a regular file where the directory goes
    with pytest.raises(StoreError):
        blobs.put(w)


def test_get_detects_corruption(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path)
    digest, _ = blobs.put(sample())
    path = blobs.path(digest)
    data = bytearray(path.read_bytes())
    data[-70] ^= 0x80
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="corrupt"):
        blobs.get(digest)
    with pytest.raises(StoreError):
        blobs.get("0" * 64)  # missing


def test_a_damaged_blob_is_repaired_by_storing_its_content_again(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path)
    w = sample()
    digest, size = blobs.put(w)
    path = blobs.path(digest)
    data = bytearray(path.read_bytes())
    data[-70] ^= 0x80  # tampered, same size
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="corrupt"):
        blobs.get(digest)
    assert blobs.put(w) == (digest, size)
    assert_same(blobs.get(digest), w)
    path.write_bytes(bytes(data[:100]))  # truncated
    assert blobs.put(w) == (digest, size)
    assert_same(blobs.get(digest), w)


def test_an_intact_blob_is_not_rewritten(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path)
    digest, _ = blobs.put(sample())
    before = blobs.path(digest).stat().st_ino
    blobs.put(sample())
    assert blobs.path(digest).stat().st_ino == before


def test_storing_known_content_again_does_not_read_the_file_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ten agents uploading the same 100 MB model must not cost nine 100 MB reads: a file
    this store wrote is trusted while unchanged, and checked again once it changes."""
    import fedstack.store.blobs as blobs_module

    blobs = BlobStore(tmp_path)
    digest, size = blobs.put(sample())
    reads: list[str] = []
    real = blobs_module.file_matches  # type: ignore[attr-defined]  # patched where put() looks

    def counting(d: str, path: Path) -> bool:
        reads.append(d)
        return real(d, path)

    monkeypatch.setattr(blobs_module, "file_matches", counting)
    for _ in range(3):
        assert blobs.put(sample()) == (digest, size)
    assert reads == []
    path = blobs.path(digest)
    data = bytearray(path.read_bytes())
    data[-70] ^= 0x80
    path.write_bytes(bytes(data))
    assert blobs.put(sample()) == (digest, size)  # changed: checked, found damaged, repaired
    assert reads == [digest]
    assert_same(blobs.get(digest), sample())
