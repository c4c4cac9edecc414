"""Homomorphic encryption of model updates with CKKS, through TenSEAL (extra ``he``).

The agents hold a CKKS key set the aggregator does not have; the aggregator only ever sees
ciphertexts and sums them; the agents decrypt the sum. Weighted FedAvg of the models:

* an agent encrypts ``n_i * x_i`` (its trained weights times its sample count) and
  ``n_i`` itself (:func:`encrypt_model`);
* the aggregator (strategy ``ckks-fedavg``, :class:`CkksSum`) adds the ciphertexts of a
  round: its global model is the encrypted pair ``(sum n_i x_i, sum n_i)``;
* every agent decrypts it and divides (:func:`decrypt_model`): ``sum n_i x_i / sum n_i``,
  plain weighted FedAvg up to CKKS' error.

Key distribution (:func:`keygen`, ``fedstack he keygen --out DIR``): the operator makes one
key set per run; ``DIR/agents.ctx`` (the TenSEAL context WITH the secret key, mode 0600)
goes to every agent out of band, like its credential; ``DIR/aggregator.ctx`` (the
encryption parameters only: no secret key, not even a public key: the aggregator cannot
decrypt nor encrypt) goes to the aggregator. :func:`load_context` refuses a secret key
where the aggregator's context is expected. Rotation is a new run with a new key set.

Files: ``MAGIC``, a little-endian u32 header length, a JSON header (format, role, key id,
parameters), then TenSEAL's own serialisation (protobuf and SEAL's binary format, no
pickle).

Encrypted models are dicts of ``uint8`` arrays whose sizes depend only on the parameters
and on the number of model values, so the aggregator's structure check (names, shapes,
dtypes fixed by the first model) holds for every upload and every global model:

* ``ckks.meta``: :data:`META_SIZE` bytes: magic, key id, a digest of the plain model's
  layout (names, dtypes, shapes), the number of values and of chunks;
* ``ckks.000000``, ``ckks.000001``, ...: one CKKS ciphertext each, serialised by TenSEAL,
  behind an 8-byte header (magic, length) and zero-padded to :attr:`CkksContext.buffer_size`.
  Chunk ``c`` holds :attr:`CkksContext.data_slots` values of the flat model and, in its last
  slot, the number 1: after a sum that slot holds the number of updates summed in every
  chunk; an agent checks it (a ciphertext under another key set decrypts to noise of the
  size of the modulus, not to the same small integer in every chunk).

Errors: :class:`CkksError` (a :class:`~fedstack.errors.ConfigError` for files and
parameters), :class:`~fedstack.errors.InvalidUpdate` for an upload the aggregator refuses.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fedstack.errors import ConfigError, FedstackError, InvalidUpdate
from fedstack.types import Array, Metrics, Weights

__all__ = [
    "AGENTS_FILE",
    "AGGREGATOR_FILE",
    "CkksContext",
    "CkksError",
    "CkksParams",
    "CkksSum",
    "CkksTrainer",
    "Meta",
    "decrypt_model",
    "encrypt_model",
    "keygen",
    "load_context",
    "read_meta",
]

MAGIC = b"FSCKKS1\n"
"""First bytes of a context file made by :func:`keygen`."""
AGENTS_FILE = "agents.ctx"
AGGREGATOR_FILE = "aggregator.ctx"
MAX_CONTEXT_BYTES = 256 << 20
"""Largest context file read (a 32768-degree context with its keys is ~10 MB)."""
META = "ckks.meta"
META_MAGIC = b"FSCKKSM1"
META_SIZE = 64
CHUNK_MAGIC = b"FSCT"
CHUNK_HEADER = 8
DEGREES = (4096, 8192, 16384, 32768)
MAX_HEADROOM_USE = 20
"""Bits of the plaintext headroom kept free for the sum: up to 2**20 updates of the
largest value one agent may encrypt add up without wrapping around the modulus."""

Role = Literal["agents", "aggregator"]


class CkksError(ConfigError):
    """A CKKS key file, parameter or encrypted model is unusable (the message says why)."""


class CkksDecryptError(FedstackError):
    """A global model does not decrypt to a valid sum under this agent's key set."""


def _tenseal() -> Any:
    try:
        import tenseal
    except ImportError as exc:
        raise CkksError("homomorphic encryption needs TenSEAL: pip install 'fedstack[he]'") from exc
    return tenseal


# ---------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class CkksParams:
    """CKKS encryption parameters.

    Attributes:
        poly_modulus_degree: N (4096, 8192, 16384 or 32768); a ciphertext holds N/2 values.
        coeff_mod_bit_sizes: bit sizes of the coefficient modulus primes; the last one is
            the special prime, the others carry data. Sums need no multiplicative depth,
            so two primes and a special one suffice. SEAL refuses totals beyond the
            128-bit security bound (109, 218, 438, 881 bits for the four degrees).
        scale_bits: log2 of the encoding scale: the precision of each value (about
            ``2**-(scale_bits - 20)`` absolute, see docs/privacy.md).
    """

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40, 60)
    scale_bits: int = 40

    def __post_init__(self) -> None:
        if self.poly_modulus_degree not in DEGREES:
            raise CkksError(
                f"poly_modulus_degree {self.poly_modulus_degree} is refused: one of "
                f"{', '.join(map(str, DEGREES))}"
            )
        bits = self.coeff_mod_bit_sizes
        if len(bits) < 2 or not all(isinstance(b, int) and 20 <= b <= 60 for b in bits):
            raise CkksError(
                f"coeff_mod_bit_sizes {list(bits)} is refused: at least two primes of "
                "20..60 bits (data primes, then the special prime)"
            )
        if not 20 <= self.scale_bits <= min(bits[0], 60) - 1:
            raise CkksError(
                f"scale_bits {self.scale_bits} is refused: 20..{min(bits[0], 60) - 1} (below "
                "the first prime's bit size)"
            )
        if self.headroom_bits <= MAX_HEADROOM_USE + 1:
            raise CkksError(
                f"coeff_mod_bit_sizes {list(bits)} with scale_bits {self.scale_bits} leave "
                f"{self.headroom_bits} bits above the scale: sums need more than "
                f"{MAX_HEADROOM_USE + 1} (add a data prime or lower scale_bits)"
            )

    @property
    def data_primes(self) -> int:
        return len(self.coeff_mod_bit_sizes) - 1

    @property
    def headroom_bits(self) -> int:
        """log2 of the largest magnitude a decrypted value can have (above: wraps around)."""
        return sum(self.coeff_mod_bit_sizes[:-1]) - self.scale_bits - 1

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    def as_dict(self) -> dict[str, Any]:
        return {
            "poly_modulus_degree": self.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes),
            "scale_bits": self.scale_bits,
        }


def ciphertext_bound(params: CkksParams) -> int:
    """An upper bound of the size of one serialised ciphertext with ``params``.

    A fresh or summed ciphertext is two polynomials of ``N`` coefficients per data prime,
    8 bytes each (SEAL's raw layout); SEAL compresses it with zstd, whose output is at most
    ``raw + raw/128 + 64`` bytes; SEAL's header, the ciphertext's metadata and TenSEAL's
    protobuf wrapper add less than 200 bytes. 4 KiB covers both overheads with margin.
    """
    raw = 2 * params.poly_modulus_degree * params.data_primes * 8
    return raw + raw // 128 + 4096


# ---------------------------------------------------------------------------- contexts
class CkksContext:
    """A loaded CKKS key set (the agents') or parameter set (the aggregator's)."""

    def __init__(self, ts_context: Any, params: CkksParams, key_id: bytes, role: Role) -> None:
        self.ts = ts_context
        self.params = params
        self.key_id = key_id
        self.role = role
        self.data_slots = params.slots - 1
        """Model values per ciphertext (the last slot holds the update counter)."""
        self.buffer_size = CHUNK_HEADER + ciphertext_bound(params)
        """Bytes of one ciphertext array (header, serialised ciphertext, zero padding)."""

    @property
    def has_secret_key(self) -> bool:
        return bool(self.ts.has_secret_key())

    def chunks_for(self, values: int) -> int:
        return max(1, -(-values // self.data_slots))

    def encrypted_size(self, values: int) -> int:
        """Bytes of an encrypted model of ``values`` plain values (with the count)."""
        return META_SIZE + self.chunks_for(values + 1) * self.buffer_size

    def __repr__(self) -> str:
        return (
            f"CkksContext(role={self.role!r}, key_id={self.key_id.hex()}, "
            f"params={self.params.as_dict()}, secret_key={self.has_secret_key})"
        )


def keygen(
    out_dir: str | Path, params: CkksParams | None = None, *, force: bool = False
) -> tuple[Path, Path]:
    """Make a key set: ``out_dir/agents.ctx`` (secret key; mode 0600) and
    ``out_dir/aggregator.ctx`` (parameters only). Returns both paths.

    Raises:
        CkksError: the files exist (without ``force``) or SEAL refuses the parameters.
    """
    from fedstack.files import atomic_write

    ts = _tenseal()
    params = params or CkksParams()
    out = Path(out_dir)
    agents, aggregator = out / AGENTS_FILE, out / AGGREGATOR_FILE
    if not force:
        existing = [str(p) for p in (agents, aggregator) if p.exists()]
        if existing:
            raise CkksError(
                f"{', '.join(existing)} exist: a key set is made once per run (use --force "
                "to replace it: agents holding the old agents.ctx can no longer decrypt)"
            )
    try:
        ctx = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=params.poly_modulus_degree,
            coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
        )
    except ValueError as exc:
        raise CkksError(f"SEAL refuses the parameters {params.as_dict()}: {exc}") from exc
    ctx.global_scale = float(2**params.scale_bits)
    key_id = secrets.token_bytes(16)
    secret = ctx.serialize(
        save_public_key=True, save_secret_key=True, save_galois_keys=False, save_relin_keys=False
    )
    public = ctx.serialize(
        save_public_key=False, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
    )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(agents, _container("agents", key_id, params, secret), mode=0o600)
    atomic_write(aggregator, _container("aggregator", key_id, params, public), mode=0o644)
    return agents, aggregator


def _container(role: Role, key_id: bytes, params: CkksParams, body: bytes) -> bytes:
    header = json.dumps(
        {"format": 1, "role": role, "key_id": key_id.hex(), **params.as_dict()},
        sort_keys=True,
    ).encode()
    return MAGIC + struct.pack("<I", len(header)) + header + body


def load_context(path: str | Path, role: Role) -> CkksContext:
    """Load a key file made by :func:`keygen` for ``role``.

    ``role="aggregator"`` refuses a file that holds a secret key, before TenSEAL parses
    it when the file says so and after it when the file lies. ``role="agents"`` refuses a
    file without one.

    Raises:
        CkksError: naming the file and what to do.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > MAX_CONTEXT_BYTES:
            raise CkksError(f"{p}: {size} bytes is not a CKKS key file (too large)")
        data = p.read_bytes()
    except OSError as exc:
        raise CkksError(f"cannot read the CKKS key file {p}: {exc.strerror or exc}") from exc
    return context_from_bytes(data, role, str(p))


def context_from_bytes(data: bytes, role: Role, source: str = "CKKS context") -> CkksContext:
    """:func:`load_context` on bytes (``source`` names them in errors)."""
    ts = _tenseal()
    header, body = _parse_container(data, source)
    params = CkksParams(
        poly_modulus_degree=header["poly_modulus_degree"],
        coeff_mod_bit_sizes=tuple(header["coeff_mod_bit_sizes"]),
        scale_bits=header["scale_bits"],
    )
    if role == "aggregator" and header["role"] != "aggregator":
        raise CkksError(
            f"{source} holds the secret key (it is the agents' {AGENTS_FILE}): give the "
            f"aggregator {AGGREGATOR_FILE}, and keep this file on the agents only"
        )
    try:
        ctx = ts.context_from(body)
    except Exception as exc:  # TenSEAL raises ValueError/RuntimeError on bad bytes
        raise CkksError(f"{source} is not a valid TenSEAL context: {exc}") from exc
    if role == "aggregator" and ctx.has_secret_key():
        del ctx
        raise CkksError(
            f"{source} holds the secret key (it is the agents' {AGENTS_FILE}): give the "
            f"aggregator {AGGREGATOR_FILE}, and keep this file on the agents only"
        )
    if role == "agents" and not (ctx.has_secret_key() and ctx.has_public_key()):
        raise CkksError(
            f"{source} holds no secret key (it is the aggregator's {AGGREGATOR_FILE}): "
            f"give agents {AGENTS_FILE}"
        )
    if float(ctx.global_scale) != float(2**params.scale_bits):
        raise CkksError(f"{source}: its scale differs from its header's scale_bits")
    return CkksContext(ctx, params, bytes.fromhex(header["key_id"]), role)


def _parse_container(data: bytes, source: str) -> tuple[dict[str, Any], bytes]:
    def bad(why: str) -> CkksError:
        return CkksError(f"{source} is not a CKKS key file of `fedstack he keygen`: {why}")

    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 4:
        raise bad("wrong magic bytes")
    (hlen,) = struct.unpack_from("<I", data, len(MAGIC))
    start = len(MAGIC) + 4
    if hlen > 4096 or start + hlen > len(data):
        raise bad("bad header length")
    try:
        header = json.loads(data[start : start + hlen])
    except ValueError as exc:
        raise bad(f"header is not JSON ({exc})") from None
    if not isinstance(header, dict) or header.get("format") != 1:
        raise bad("unknown header format")
    if header.get("role") not in ("agents", "aggregator"):
        raise bad("unknown role")
    kid = header.get("key_id")
    if not isinstance(kid, str) or len(kid) != 32 or any(c not in "0123456789abcdef" for c in kid):
        raise bad("bad key id")
    bits = header.get("coeff_mod_bit_sizes")
    if (
        not isinstance(header.get("poly_modulus_degree"), int)
        or not isinstance(header.get("scale_bits"), int)
        or not isinstance(bits, list)
        or not all(isinstance(b, int) for b in bits)
    ):
        raise bad("bad parameters")
    return header, data[start + hlen :]


# ---------------------------------------------------------------------------- model layout
@dataclass(frozen=True)
class Meta:
    """The plain header of an encrypted model (``ckks.meta``)."""

    key_id: bytes
    layout: bytes
    values: int
    chunks: int
    data_slots: int

    def encode(self) -> Array:
        raw = (
            META_MAGIC
            + self.key_id
            + self.layout
            + struct.pack("<QII", self.values, self.chunks, self.data_slots)
        )
        return np.frombuffer(raw.ljust(META_SIZE, b"\0"), dtype=np.uint8).copy()


def read_meta(enc: Mapping[str, Array], source: str = "model") -> Meta:
    """The ``ckks.meta`` header of encrypted model ``enc``, checked.

    Raises:
        InvalidUpdate: it is missing or malformed.
    """
    arr = enc.get(META)
    if arr is None:
        raise InvalidUpdate(
            f"{source} has no {META!r} array: it is not a CKKS-encrypted model (run the "
            "agents with --he-context agents.ctx)"
        )
    if arr.dtype != np.uint8 or arr.shape != (META_SIZE,):
        raise InvalidUpdate(f"{source}: {META!r} must be {META_SIZE} uint8 values")
    raw = arr.tobytes()
    if raw[:8] != META_MAGIC or any(raw[56:]):
        raise InvalidUpdate(f"{source}: {META!r} is not a CKKS model header")
    values, chunks, data_slots = struct.unpack_from("<QII", raw, 40)
    if data_slots < 1 or chunks != max(1, -(-values // data_slots)) or values < 2:
        raise InvalidUpdate(f"{source}: {META!r} has inconsistent sizes")
    return Meta(raw[8:24], raw[24:40], values, chunks, data_slots)


def chunk_name(i: int) -> str:
    return f"ckks.{i:06d}"


def layout_digest(template: Mapping[str, Array]) -> bytes:
    """16 bytes naming the plain model's tensor names, dtypes and shapes, in order."""
    desc = [[k, np.asarray(v).dtype.str, list(np.shape(v))] for k, v in template.items()]
    return hashlib.blake2b(json.dumps(desc).encode(), digest_size=16).digest()


def _pack(payload: bytes, size: int) -> Array:
    if CHUNK_HEADER + len(payload) > size:
        raise CkksError(
            f"a serialised ciphertext of {len(payload)} bytes exceeds the bound of "
            f"{size - CHUNK_HEADER} derived from the parameters (please report this)"
        )
    buf = np.zeros(size, dtype=np.uint8)
    buf[:4] = np.frombuffer(CHUNK_MAGIC, dtype=np.uint8)
    buf[4:8] = np.frombuffer(struct.pack("<I", len(payload)), dtype=np.uint8)
    buf[CHUNK_HEADER : CHUNK_HEADER + len(payload)] = np.frombuffer(payload, dtype=np.uint8)
    return buf


def _unpack(arr: Array, size: int, name: str) -> bytes:
    if arr.dtype != np.uint8 or arr.shape != (size,):
        raise InvalidUpdate(
            f"{name!r} must be {size} uint8 values for these CKKS parameters, not "
            f"{arr.dtype} {tuple(arr.shape)}"
        )
    raw = arr.data.cast("B") if arr.flags.c_contiguous else memoryview(arr.tobytes())
    if bytes(raw[:4]) != CHUNK_MAGIC:
        raise InvalidUpdate(f"{name!r} is not a ciphertext buffer (bad magic)")
    (length,) = struct.unpack("<I", raw[4:8])
    end = CHUNK_HEADER + length
    if length == 0 or end > size:
        raise InvalidUpdate(f"{name!r}: ciphertext length {length} does not fit its buffer")
    if np.any(arr[end:]):
        raise InvalidUpdate(f"{name!r}: bytes after the ciphertext are not zero")
    return bytes(raw[CHUNK_HEADER:end])


def load_vector(ctx: CkksContext, arr: Array, name: str, expected_size: int) -> Any:
    """The CKKS vector in ciphertext buffer ``arr``, checked against ``ctx``'s parameters
    (size, level, scale, one two-polynomial ciphertext of ``expected_size`` values).

    Raises:
        InvalidUpdate: naming what is wrong.
    """
    ts = _tenseal()
    payload = _unpack(arr, ctx.buffer_size, name)
    try:
        vec = ts.ckks_vector_from(ctx.ts, payload)
    except Exception as exc:  # ValueError/RuntimeError from TenSEAL and SEAL
        raise InvalidUpdate(
            f"{name!r} is not a ciphertext under this run's CKKS parameters ({exc})"
        ) from None
    cts = vec.data.ciphertext()
    if len(cts) != 1:
        raise InvalidUpdate(f"{name!r} holds {len(cts)} ciphertexts, expected 1")
    ct = cts[0]
    p = ctx.params
    if (
        ct.size() != 2
        or ct.poly_modulus_degree() != p.poly_modulus_degree
        or ct.coeff_modulus_size() != p.data_primes
        or not ct.is_ntt_form()
        or ct.is_transparent()
    ):
        raise InvalidUpdate(f"{name!r} is not a fresh or summed ciphertext of this run's level")
    if ct.scale != float(2**p.scale_bits):
        raise InvalidUpdate(f"{name!r} has scale 2^{math.log2(ct.scale):.1f}, not 2^{p.scale_bits}")
    if vec.size() != expected_size:
        raise InvalidUpdate(f"{name!r} holds {vec.size()} values, expected {expected_size}")
    return vec


def chunk_sizes(meta: Meta) -> Iterator[tuple[int, int, int]]:
    """(chunk index, first value, values in the chunk) for every chunk of ``meta``."""
    for c in range(meta.chunks):
        lo = c * meta.data_slots
        yield c, lo, min(meta.data_slots, meta.values - lo)


# ---------------------------------------------------------------------------- agents' side
def encrypt_model(ctx: CkksContext, weights: Mapping[str, Array], num_samples: float) -> Weights:
    """``weights`` times ``num_samples``, and ``num_samples``, encrypted under ``ctx``.

    Raises:
        CkksError: the context cannot encrypt, or a value is too large for the parameters.
    """
    ts = _tenseal()
    if not ctx.ts.has_public_key():
        raise CkksError("this CKKS context cannot encrypt (it is the aggregator's)")
    if not weights:
        raise CkksError("the model has no tensors")
    n = float(num_samples)
    flat = np.concatenate(
        [np.asarray(v, dtype=np.float64).ravel() for v in weights.values()] + [np.array([1.0])]
    )
    np.multiply(flat, n, out=flat)
    if not np.all(np.isfinite(flat)):
        raise CkksError("the model holds NaN or infinite values: nothing is encrypted")
    limit = 2.0 ** (ctx.params.headroom_bits - MAX_HEADROOM_USE)
    peak = float(np.max(np.abs(flat)))
    if peak > limit:
        raise CkksError(
            f"a weighted value of {peak:.3g} (weights times {n:g} samples) exceeds "
            f"{limit:.3g}, the largest these CKKS parameters sum safely (add a data prime)"
        )
    meta = Meta(
        ctx.key_id, layout_digest(weights), flat.size, ctx.chunks_for(flat.size), ctx.data_slots
    )
    out: Weights = {META: meta.encode()}
    for c, lo, count in chunk_sizes(meta):
        values = np.empty(count + 1)
        values[:count] = flat[lo : lo + count]
        values[count] = 1.0  # the update counter: sums to the number of updates
        vec = ts.ckks_vector(ctx.ts, values)
        out[chunk_name(c)] = _pack(vec.serialize(), ctx.buffer_size)
    return out


def decrypt_model(
    ctx: CkksContext, enc: Mapping[str, Array], template: Mapping[str, Array]
) -> tuple[Weights, float, int]:
    """Decrypt an encrypted sum: (``sum n_i x_i / sum n_i`` shaped and typed like
    ``template``, ``sum n_i``, the number of updates summed).

    Raises:
        CkksDecryptError: it was not made under this key set, for this model, or does not
            decrypt to a valid sum (naming which).
    """
    if not ctx.has_secret_key:
        raise CkksError("this CKKS context cannot decrypt (it is the aggregator's)")
    try:
        meta = read_meta(enc, "the global model")
    except InvalidUpdate as exc:
        raise CkksDecryptError(str(exc)) from None
    if meta.key_id != ctx.key_id:
        raise CkksDecryptError(
            f"the global model was encrypted under key set {meta.key_id.hex()}, this agent "
            f"holds {ctx.key_id.hex()}: use the run's agents.ctx"
        )
    if meta.layout != layout_digest(template):
        raise CkksDecryptError(
            "the global model was encrypted from a model with other tensor names, dtypes or "
            "shapes than this trainer's"
        )
    expected = sum(int(np.asarray(v).size) for v in template.values()) + 1
    if meta.values != expected or meta.data_slots != ctx.data_slots:
        raise CkksDecryptError(
            f"the global model holds {meta.values} values, this trainer's model {expected}"
        )
    flat = np.empty(meta.values)
    counters = np.empty(meta.chunks)
    for c, lo, count in chunk_sizes(meta):
        name = chunk_name(c)
        arr = enc.get(name)
        if arr is None:
            raise CkksDecryptError(f"the global model has no {name!r}")
        try:
            vec = load_vector(ctx, np.asarray(arr), name, count + 1)
        except InvalidUpdate as exc:
            raise CkksDecryptError(f"the global model: {exc}") from None
        values = np.asarray(vec.decrypt(), dtype=np.float64)
        flat[lo : lo + count] = values[:count]
        counters[c] = values[count]
    updates = int(np.rint(counters[0]))
    if (
        not np.all(np.isfinite(counters))
        or updates < 1
        or np.max(np.abs(counters - updates)) > 0.01
    ):
        raise CkksDecryptError(
            "the global model does not decrypt to a sum under this key set (its update "
            "counters are not one small integer in every ciphertext): a ciphertext made "
            "under another key set was summed in, or the model was tampered with"
        )
    total = float(flat[-1])
    if not math.isfinite(total) or total < 0.5 * updates:
        raise CkksDecryptError(
            f"the global model's decrypted sample count {total:.4g} is not a count of "
            f"{updates} update(s)"
        )
    flat = flat[:-1] / total
    out: Weights = {}
    pos = 0
    for name, ref in template.items():
        ref_arr = np.asarray(ref)
        k = int(ref_arr.size)
        out[name] = _cast_like(flat[pos : pos + k].reshape(ref_arr.shape), ref_arr)
        pos += k
    return out, total, updates


def _cast_like(value: np.ndarray[Any, Any], ref: Array) -> Array:
    from fedstack.strategies.base import cast_like

    return cast_like(value, ref)


class CkksTrainer:
    """A :class:`~fedstack.agent.trainer.Trainer` around ``inner``: the models it gets
    are decrypted before ``inner`` sees them, the models it returns are encrypted.

    ``fedstack agent --he-context agents.ctx`` wraps its trainer in one. The initial model
    is ``inner``'s, encrypted with weight 1; each fit returns ``n * weights`` and ``n``
    encrypted (``n`` the sample count ``inner`` reports; 0 counts once, as in FedAvg).
    Extra arrays (FedCurv, SCAFFOLD) are refused: they would travel in the clear.
    """

    def __init__(self, inner: Any, context: CkksContext | str | Path) -> None:
        self.inner = inner
        self.context = (
            context if isinstance(context, CkksContext) else load_context(context, "agents")
        )
        if not self.context.has_secret_key:
            raise CkksError("an agent needs the agents' context (agents.ctx, with the secret key)")
        self._template: Weights | None = None
        self.last_sum: tuple[float, int] | None = None
        """(sum of sample counts, number of updates) of the last global model decrypted."""

    def template(self) -> Weights:
        if self._template is None:
            self._template = dict(self.inner.initial_weights())
        return self._template

    def initial_weights(self) -> Weights:
        plain = dict(self.inner.initial_weights())
        self._template = plain
        return encrypt_model(self.context, plain, 1.0)

    def decrypt(self, enc: Mapping[str, Array]) -> Weights:
        weights, total, updates = decrypt_model(self.context, enc, self.template())
        self.last_sum = (total, updates)
        return weights

    def _check_aggregator(self, config: Mapping[str, Any]) -> None:
        """Refuse an aggregator that does not sum ciphertexts under this key set (it would
        average the encrypted bytes as numbers)."""
        fed = config.get("federation")
        if not isinstance(fed, Mapping):
            return  # called outside the agent runner (no federation settings to check)
        if fed.get("he") != "ckks":
            raise CkksError(
                "this agent runs with --he-context but the aggregator does not run "
                "homomorphic encryption (start it with --he ckks --he-context "
                "aggregator.ctx of the same key set)"
            )
        if fed.get("he_key_id") != self.context.key_id.hex():
            raise CkksError(
                "the aggregator runs homomorphic encryption with another key set "
                f"({str(fed.get('he_key_id'))[:32]!r}, this agent has "
                f"{self.context.key_id.hex()!r}): give both files of one `fedstack he keygen`"
            )

    def fit(self, weights: Weights, config: Mapping[str, Any]) -> tuple[Weights, int, Metrics]:
        self._check_aggregator(config)
        out = self.inner.fit(self.decrypt(weights), config)
        if len(out) > 3 and out[3]:
            raise CkksError(
                "the trainer returned extra arrays: with homomorphic encryption only the "
                "model is sent (encrypted); extra arrays would travel in the clear"
            )
        trained, num_samples, metrics = out[0], int(out[1]), out[2]
        weight = num_samples if num_samples > 0 else 1
        return encrypt_model(self.context, trained, weight), num_samples, metrics

    def evaluate(self, weights: Weights, config: Mapping[str, Any]) -> Metrics:
        result: Metrics = self.inner.evaluate(self.decrypt(weights), config)
        return result


# ---------------------------------------------------------------------------- aggregator side
class CkksSum:
    """The running sum of a round's encrypted updates (the ``ckks-fedavg`` accumulator)."""

    def __init__(self, ctx: CkksContext, global_weights: Weights) -> None:
        self.ctx = ctx
        self.names = list(global_weights)
        try:
            self.expected: Meta | None = read_meta(global_weights, "the global model")
        except InvalidUpdate:
            self.expected = None  # a damaged initial model: the first update sets the layout
        self.meta: Meta | None = None
        self.acc: list[Any] = []
        self.count = 0
        self.samples = 0
        self._done = False

    def check(
        self, enc: Mapping[str, Array], agent_id: str | None = None
    ) -> tuple[Meta, list[Any]]:
        """The update's header and CKKS vectors, every part checked.

        Raises:
            InvalidUpdate: naming the problem.
        """
        try:
            return self._read(enc, self.meta or self.expected)
        except InvalidUpdate as exc:
            raise InvalidUpdate(str(exc), agent_id=agent_id) from None

    def _read(self, enc: Mapping[str, Array], expected: Meta | None) -> tuple[Meta, list[Any]]:
        meta = read_meta(enc, "the upload")
        if meta.key_id != self.ctx.key_id:
            raise InvalidUpdate(
                f"the upload is encrypted under key set {meta.key_id.hex()}, this run's is "
                f"{self.ctx.key_id.hex()}: give the agent this run's agents.ctx"
            )
        if meta.data_slots != self.ctx.data_slots:
            raise InvalidUpdate("the upload was encrypted with other CKKS parameters")
        if expected is not None and meta != expected:
            raise InvalidUpdate(
                "the upload encrypts a model of another layout than the federation's "
                f"({meta.values} values, the federation's model has {expected.values})"
            )
        if meta.chunks != len(enc) - 1:  # before building names from a claimed count
            raise InvalidUpdate(
                f"the upload's header claims {meta.chunks} ciphertext(s), it has "
                f"{len(enc) - 1} other array(s)"
            )
        names = [META] + [chunk_name(c) for c in range(meta.chunks)]
        if sorted(enc) != sorted(names):
            raise InvalidUpdate(
                f"the upload's arrays are not {META!r} and {meta.chunks} ciphertext(s)"
            )
        vecs = [
            load_vector(self.ctx, np.asarray(enc[chunk_name(c)]), chunk_name(c), count + 1)
            for c, _, count in chunk_sizes(meta)
        ]
        return meta, vecs

    def add(
        self,
        enc: Mapping[str, Array],
        num_samples: int,
        agent_id: str | None = None,
        parsed: tuple[Meta, list[Any]] | None = None,
    ) -> None:
        """Add upload ``enc`` (``parsed``: what :meth:`check` returned for it on a
        :class:`CkksSum` of the same global model, to skip parsing it again)."""
        if self._done:
            raise ValueError("result() was already taken for this round")
        meta, vecs = self.check(enc, agent_id) if parsed is None else parsed
        if self.meta is not None and meta != self.meta:
            raise InvalidUpdate("the upload's layout differs from the round's", agent_id=agent_id)
        if self.meta is None:
            self.meta, self.acc = meta, vecs
        else:
            for acc, vec in zip(self.acc, vecs, strict=True):
                acc.add_(vec)
        self.count += 1
        self.samples += max(num_samples, 0)

    def result(self) -> Weights:
        if self.meta is None:
            raise ValueError("no updates to aggregate")
        if self._done:
            raise ValueError("result() was already taken for this round")
        self._done = True
        out: Weights = {META: self.meta.encode()}
        for c, vec in enumerate(self.acc):
            out[chunk_name(c)] = _pack(vec.serialize(), self.ctx.buffer_size)
        self.acc = []
        return {k: out[k] for k in self.names} if set(self.names) == set(out) else out
