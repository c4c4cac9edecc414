"""An agent's crash-safe state on disk: its identity and the upload awaiting acknowledgement.

A state directory (created with mode 0700) holds:

``identity.json``
    ``{"format": 1, "name", "agent_id", "token", "version", "aggregator_id", "run_id"}``:
    the agent's name (a directory belongs to one agent), the id the aggregator assigned,
    its credential if it has one, and the version of the last global model received.
``pending.safetensors``
    The tensors of the upload not yet acknowledged, a tensor file in the safetensors layout
    (:mod:`fedstack.wire.tensorfile`, no pickle): the model's arrays as ``m.0, m.1, ...``
    and the extra arrays as ``x.0, x.1, ...``, in the order named by ``pending.json``; its
    ``__metadata__`` carries the ``upload_id``.
``pending.json``
    ``{"format": 2, "upload_id", "base_version", "num_samples", "metrics", "run_id",
    "model": [names], "extra": [names], "blob_bytes", "blob_digest"}``.

``global.safetensors``
    The last global model the agent received and handed to its trainer (the final one
    included), one tensor file: the model's arrays as ``m.0, m.1, ...``, the extra arrays
    that came with it as ``x.0, ...``; its ``__metadata__`` holds ``{"format": "1",
    "version", "run_id", "aggregator_id", "final", "received", "model": JSON names,
    "extra": JSON names, "digest"}`` (``digest``: BLAKE3 of the arrays' bytes in order). One
    file, so one atomic rename: a crash leaves the previous model or the new one. An agent
    restarted without a reachable aggregator reads it back (:meth:`AgentStateDir.load_global`,
    ``Agent.saved_global``, ``fedstack agent-state DIR``).

Every file is written atomically (:func:`fedstack.files.atomic_write`): to a temporary file
in the same directory, flushed, fsynced, renamed over the final name, then the directory is
fsynced. The pending upload is written tensors first, metadata last; the metadata carries
the size and BLAKE3 digest of the tensor file, so a crash between the two writes (or a
damaged file) is detected on load and the upload discarded with a warning rather than sent
torn. On acknowledgement the metadata is removed first, then the tensors.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedstack.errors import (
    ConfigError,
    ProtocolError,
    RemoteProtocolError,
    StoreError,
    TensorFileError,
)
from fedstack.files import (
    atomic_write,
    digest_matches,
    digest_of,
    fsync_dir,
    install,
    is_temp_name,
    write_temp,
)
from fedstack.types import Array, Metrics, Weights
from fedstack.wire import ModelUpload, tensorfile

log = logging.getLogger("fedstack.agent")

FORMAT = 1
PENDING_FORMAT = 2
IDENTITY = "identity.json"
PENDING_META = "pending.json"
PENDING_DATA = "pending.safetensors"
GLOBAL = "global.safetensors"
GLOBAL_FORMAT = "1"
_FILES = (IDENTITY, PENDING_META, PENDING_DATA, GLOBAL)

__all__ = [
    "AgentStateDir",
    "Identity",
    "SavedGlobal",
    "SavedUpload",
    "atomic_write",
    "read_global",
    "report_state",
]


@dataclass
class Identity:
    name: str
    agent_id: str | None = None
    token: str | None = None
    version: int = -1
    aggregator_id: str | None = None
    run_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": FORMAT,
            "name": self.name,
            "agent_id": self.agent_id,
            "version": self.version,
            "aggregator_id": self.aggregator_id,
            "run_id": self.run_id,
        }
        if self.token is not None:
            out["token"] = self.token
        return out


@dataclass(frozen=True)
class SavedUpload:
    """A pending upload read back from disk, with the run it was trained in."""

    upload: ModelUpload
    run_id: str | None


@dataclass(frozen=True)
class SavedGlobal:
    """A global model as the agent keeps it in its state directory.

    Attributes:
        version: The global model's version (rounds completed when it was made).
        run_id, aggregator_id: Where it came from (None if unknown).
        final: Whether it was the federation's final model.
        received: When the agent handed it to its trainer (wall-clock seconds).
        model: The model's named arrays.
        extra: The extra arrays that came with it (e.g. SCAFFOLD's control variate).
    """

    version: int
    run_id: str | None
    aggregator_id: str | None
    final: bool
    received: float
    model: Weights
    extra: Weights = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """What it is, without the arrays' contents: a JSON-ready report."""
        return {
            "version": self.version,
            "run_id": self.run_id,
            "aggregator_id": self.aggregator_id,
            "final": self.final,
            "received": self.received,
            "tensors": {
                n: {"shape": list(a.shape), "dtype": str(a.dtype)} for n, a in self.model.items()
            },
            "extra": sorted(self.extra),
            "bytes": sum(int(a.nbytes) for a in self.model.values()),
        }


def read_global(path: str | Path) -> SavedGlobal:
    """Read a ``global.safetensors`` file (see the module docstring), checking it whole.

    Raises:
        StoreError: it cannot be read, is not such a file, or its arrays do not match
            their digest.
    """
    path = Path(path)
    try:
        data = bytearray(path.read_bytes())  # the arrays are writable views of it
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc}") from exc
    try:
        arrays, meta = tensorfile.decode(memoryview(data))
        if meta.get("format") != GLOBAL_FORMAT:
            raise ValueError(f"not a global model file of format {GLOBAL_FORMAT}")
        names, extra_names = json.loads(meta["model"]), json.loads(meta["extra"])
        if not (
            isinstance(names, list)
            and isinstance(extra_names, list)
            and all(isinstance(x, str) for x in names + extra_names)
        ):
            raise ValueError("bad tensor names")
        if len(arrays) != len(names) + len(extra_names):
            raise ValueError("tensor count does not match the metadata")
        model = {n: arrays[f"m.{i}"] for i, n in enumerate(names)}
        extra = {n: arrays[f"x.{i}"] for i, n in enumerate(extra_names)}
        digest, _ = digest_of(_array_bytes(model, extra))
        if digest != meta["digest"]:
            raise ValueError("the arrays do not match their digest")
        version = int(meta["version"])
        final = meta["final"]
        if final not in ("0", "1"):
            raise ValueError("bad final flag")
        return SavedGlobal(
            version=version,
            run_id=meta.get("run_id") or None,
            aggregator_id=meta.get("aggregator_id") or None,
            final=final == "1",
            received=float(meta["received"]),
            model=model,
            extra=extra,
        )
    except (ValueError, KeyError, TypeError, ProtocolError, TensorFileError) as exc:
        raise StoreError(f"{path} is not a readable global model: {exc}") from None


def report_state(root: str | Path) -> tuple[dict[str, Any], SavedGlobal | None]:
    """What an agent's state directory holds, read without changing anything (no agent
    and no aggregator needed): a JSON-ready report (``identity`` without the token,
    ``global_model`` described, ``pending_upload``) and the last global model itself.

    Raises:
        StoreError: ``root`` is not an agent state directory, or a file in it is
            unreadable or damaged.
    """
    root = Path(root)
    ident_path = root / IDENTITY
    try:
        doc = json.loads(ident_path.read_bytes())
    except FileNotFoundError:
        raise StoreError(f"{root} is not an agent state directory (no {IDENTITY})") from None
    except (OSError, ValueError) as exc:
        raise StoreError(f"cannot read {ident_path}: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise StoreError(f"{ident_path} is not an identity file of format {FORMAT}")
    identity = {k: doc.get(k) for k in ("name", "agent_id", "version", "aggregator_id", "run_id")}
    identity["has_token"] = bool(doc.get("token"))
    saved = read_global(root / GLOBAL) if (root / GLOBAL).exists() else None
    pending: dict[str, Any] | None = None
    try:
        meta = json.loads((root / PENDING_META).read_bytes())
        pending = {k: meta.get(k) for k in ("upload_id", "base_version", "num_samples", "run_id")}
    except FileNotFoundError:
        pass  # no upload pending
    except (OSError, ValueError, AttributeError) as exc:
        pending = {"unreadable": str(exc)}
    report = {
        "state_dir": str(root),
        "identity": identity,
        "global_model": None if saved is None else saved.describe(),
        "pending_upload": pending,
    }
    return report, saved


def _array_bytes(model: Weights, extra: Weights) -> list[memoryview]:
    out = []
    for a in [*model.values(), *extra.values()]:
        c = np.ascontiguousarray(a).reshape(-1)
        out.append(c.view(np.uint8).data if c.nbytes else memoryview(b""))
    return out


def _opt_str(value: object, what: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise ValueError(f"{what} must be a string")


class AgentStateDir:
    """The state directory of one agent (see the module docstring for the files).

    Opening it loads (or creates) the identity; a directory that belongs to an agent of
    another name is refused with :class:`~fedstack.errors.ConfigError`. Temporary files
    left by a crash mid-write are removed.
    """

    def __init__(self, root: str | Path, name: str, token: str | None = None) -> None:
        self.root = Path(root)
        self._lock = threading.Lock()
        self._pending_id: str | None = None
        try:
            if not self.root.is_dir():
                self.root.mkdir(mode=0o700, parents=True)
                os.chmod(self.root, 0o700)
            for leftover in self.root.iterdir():
                if is_temp_name(leftover.name, _FILES):
                    log.info("removing %s left by an interrupted write", leftover)
                    leftover.unlink()
        except OSError as exc:
            raise ConfigError(
                f"cannot use {self.root} as the agent's state directory: {exc}"
            ) from exc
        self.identity = self._load_identity(name)
        changed = not (self.root / IDENTITY).exists()
        if token is not None and token != self.identity.token:
            self.identity.token = token
            changed = True
        if changed:
            self._write_identity()

    # ------------------------------------------------------------------ identity
    def _load_identity(self, name: str) -> Identity:
        path = self.root / IDENTITY
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return Identity(name=name)
        except OSError as exc:
            raise ConfigError(f"cannot read the agent identity {path}: {exc}") from exc
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict) or doc.get("format") != FORMAT:
                raise ValueError(f"not an identity file of format {FORMAT}")
            stored = doc.get("name")
            if not isinstance(stored, str):
                raise ValueError("no agent name")
            version = doc.get("version", -1)
            if type(version) is not int:
                raise ValueError("version must be an integer")
            ident = Identity(
                name=stored,
                agent_id=_opt_str(doc.get("agent_id"), "agent_id"),
                token=_opt_str(doc.get("token"), "token"),
                version=version,
                aggregator_id=_opt_str(doc.get("aggregator_id"), "aggregator_id"),
                run_id=_opt_str(doc.get("run_id"), "run_id"),
            )
        except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError included
            raise ConfigError(
                f"the agent identity {path} is unreadable ({exc}); move it away "
                "to start this agent afresh"
            ) from None
        if ident.name != name:
            raise ConfigError(
                f"state directory {self.root} belongs to agent {ident.name!r}, "
                f"not {name!r}: give each agent its own state directory"
            )
        return ident

    def _write_identity(self) -> None:
        data = json.dumps(self.identity.to_json(), indent=1).encode()
        atomic_write(self.root / IDENTITY, data)

    def save_identity(self, **changes: Any) -> None:
        """Update fields of the identity (``agent_id``, ``version``, ...) and write it if
        anything changed. Errors are logged, not raised (called from the connection)."""
        with self._lock:
            if all(getattr(self.identity, k) == v for k, v in changes.items()):
                return
            for k, v in changes.items():
                setattr(self.identity, k, v)
            try:
                self._write_identity()
            except OSError as exc:
                log.warning("cannot write the agent identity in %s: %s", self.root, exc)

    # ------------------------------------------------------------------ global model
    def save_global(self, saved: SavedGlobal) -> None:
        """Keep ``saved`` as the last global model (replacing the previous one) in one
        atomic write.

        Raises:
            StoreError: it could not be written (the previous file is left as it was).
        """
        model, extra = saved.model, saved.extra
        arrays: dict[str, Array] = {f"m.{i}": a for i, a in enumerate(model.values())}
        arrays.update({f"x.{i}": a for i, a in enumerate(extra.values())})
        digest, _ = digest_of(_array_bytes(model, extra))
        meta = {
            "format": GLOBAL_FORMAT,
            "version": str(saved.version),
            "run_id": saved.run_id or "",
            "aggregator_id": saved.aggregator_id or "",
            "final": "1" if saved.final else "0",
            "received": repr(float(saved.received)),
            "model": json.dumps(list(model)),
            "extra": json.dumps(list(extra)),
            "digest": digest,
        }
        try:
            parts = tensorfile.encode(arrays, meta)
            atomic_write(self.root / GLOBAL, parts)
        except (OSError, ProtocolError) as exc:
            raise StoreError(f"cannot save the global model in {self.root}: {exc}") from exc

    def load_global(self) -> SavedGlobal | None:
        """The last global model kept here, or None if there is none.

        Raises:
            StoreError: the file exists but is unreadable or damaged.
        """
        if not (self.root / GLOBAL).exists():
            return None
        return read_global(self.root / GLOBAL)

    # ------------------------------------------------------------------ pending upload
    def save_pending(self, upload: ModelUpload, run_id: str | None) -> None:
        """Persist ``upload`` (replacing any previous one) before it is sent.

        Raises:
            StoreError: it could not be written.
        """
        model_names = list(upload.model)
        extra = upload.extra or {}
        extra_names = list(extra)
        arrays: dict[str, Array] = {f"m.{i}": upload.model[n] for i, n in enumerate(model_names)}
        arrays.update({f"x.{i}": extra[n] for i, n in enumerate(extra_names)})
        try:
            parts = tensorfile.encode(arrays, {"upload_id": upload.upload_id})
        except RemoteProtocolError as exc:  # not expected: the upload was validated
            raise StoreError(f"cannot encode the pending upload: {exc}") from exc
        digest, size = digest_of(parts)
        meta = {
            "format": PENDING_FORMAT,
            "upload_id": upload.upload_id,
            "base_version": upload.base_version,
            "num_samples": upload.num_samples,
            "metrics": dict(upload.metrics),
            "run_id": run_id,
            "model": model_names,
            "extra": extra_names,
            "blob_bytes": size,
            "blob_digest": digest,
        }
        data_tmp: Path | None = None
        meta_tmp: Path | None = None
        try:
            data_tmp = write_temp(self.root / PENDING_DATA, parts)
            meta_tmp = write_temp(self.root / PENDING_META, [json.dumps(meta).encode()])
            with self._lock:
                # tensors first, metadata last: the metadata names the tensors' hash
                install(data_tmp, self.root / PENDING_DATA)
                data_tmp = None
                install(meta_tmp, self.root / PENDING_META)
                meta_tmp = None
                self._pending_id = upload.upload_id
        except OSError as exc:
            raise StoreError(f"cannot save the pending upload in {self.root}: {exc}") from exc
        finally:
            for tmp in (data_tmp, meta_tmp):
                if tmp is not None:
                    with contextlib.suppress(OSError):
                        tmp.unlink()

    def clear_pending(self, upload_id: str | None = None) -> None:
        """Remove the pending upload (only if it is ``upload_id``, when given)."""
        with self._lock:
            if upload_id is not None and self._pending_id != upload_id:
                return
            self._pending_id = None
            self._remove_pending()

    def _remove_pending(self) -> None:
        try:
            removed = False
            for name in (PENDING_META, PENDING_DATA):  # metadata first
                with contextlib.suppress(FileNotFoundError):
                    (self.root / name).unlink()
                    removed = True
            if removed:
                fsync_dir(self.root)
        except OSError as exc:
            log.warning("cannot remove the pending upload in %s: %s", self.root, exc)

    def load_pending(self) -> SavedUpload | None:
        """The pending upload left by a previous process, or None.

        A torn or damaged one (missing, truncated or altered tensors, unreadable metadata)
        is removed with a warning.
        """
        meta_path, data_path = self.root / PENDING_META, self.root / PENDING_DATA
        with self._lock:
            try:
                meta_raw = meta_path.read_bytes()
            except FileNotFoundError:
                if data_path.exists():
                    log.info(
                        "removing tensors of an upload whose metadata was never written (%s)",
                        data_path,
                    )
                    self._remove_pending()
                return None
            except OSError as exc:
                raise StoreError(f"cannot read {meta_path}: {exc}") from exc
            try:
                saved = self._read_pending(meta_raw, data_path)
            except (ValueError, KeyError, TypeError, OSError, StoreError) as exc:
                log.warning(
                    "discarding the pending upload in %s: it is torn or damaged (%s)",
                    self.root,
                    exc,
                )
                self._remove_pending()
                return None
            self._pending_id = saved.upload.upload_id
            return saved

    @staticmethod
    def _read_pending(meta_raw: bytes, data_path: Path) -> SavedUpload:
        meta = json.loads(meta_raw)
        if not isinstance(meta, dict) or meta.get("format") != PENDING_FORMAT:
            raise ValueError(f"metadata is not of format {PENDING_FORMAT}")
        upload_id, size, digest = meta["upload_id"], meta["blob_bytes"], meta["blob_digest"]
        base, n = meta["base_version"], meta["num_samples"]
        names, extra_names, metrics = meta["model"], meta["extra"], meta["metrics"]
        if not (isinstance(upload_id, str) and 0 < len(upload_id) <= 64):
            raise ValueError("bad upload_id")
        if not all(type(v) is int for v in (size, base, n)) or not isinstance(digest, str):
            raise ValueError("bad size, hash, base_version or num_samples")
        if not (
            isinstance(names, list)
            and isinstance(extra_names, list)
            and all(isinstance(x, str) for x in names + extra_names)
        ):
            raise ValueError("bad tensor names")
        if not isinstance(metrics, dict) or not all(
            isinstance(v, (bool, int, float, str)) for v in metrics.values()
        ):
            raise ValueError("bad metrics")
        actual = data_path.stat().st_size
        if actual != size:
            raise ValueError(f"{data_path.name} has {actual} bytes, expected {size}")
        buf = np.empty(size, dtype=np.uint8)
        with open(data_path, "rb", buffering=0) as f:
            got = f.readinto(buf.data)
        if got != size:
            raise ValueError(f"{data_path.name} is truncated")
        if not digest_matches(digest, buf.data):
            raise ValueError(f"{data_path.name} does not match its metadata (digest)")
        arrays, file_meta = tensorfile.decode(buf.data)
        if file_meta.get("upload_id") != upload_id:
            raise ValueError(f"{data_path.name} holds another upload than its metadata names")
        if len(arrays) != len(names) + len(extra_names):
            raise ValueError("tensor count does not match the metadata")
        model = {name: arrays[f"m.{i}"] for i, name in enumerate(names)}
        extra = {name: arrays[f"x.{i}"] for i, name in enumerate(extra_names)}
        clean: Metrics = {str(k): v for k, v in metrics.items()}
        upload = ModelUpload(
            upload_id=upload_id,
            base_version=base,
            num_samples=n,
            metrics=clean,
            model=model,
            extra=extra or None,
        )
        return SavedUpload(upload, _opt_str(meta.get("run_id"), "run_id"))
