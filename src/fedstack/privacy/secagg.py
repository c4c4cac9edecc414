"""SecAgg+: secure aggregation of model updates (Bell et al. CCS 2020, Bonawitz et al. CCS 2017).

A pure, sans-I/O library: :class:`AgentSession` is one agent's side of one session (one attempt
at one round), :class:`ServerSession` the aggregator's. The engine moves their outputs over the
wire; nothing here does I/O, and every input is validated (anything an agent or the aggregator
sends is attacker-controlled): bad input raises :class:`SecAggError` with a ``code`` and a
message saying what is wrong, never any other exception.

Phases (``docs/privacy.md``, section "Secure aggregation", has the full description):

1. advertise: each agent makes two X25519 key pairs (``c`` encrypts shares, ``s`` derives the
   pairwise masks) and a 16-byte self-mask seed ``b``, and sends the public keys and a
   commitment ``SHA-256(session | agent | b)``. The aggregator closes the phase (U1) and builds
   a Harary graph (a shuffled ring, ``k/2`` neighbours each side; ``k ~ 2 log2 n``).
2. share keys: each agent Shamir-splits ``b`` and ``s_sk`` ``t``-of-``(k+1)`` among its
   neighbourhood (pycryptodome's Shamir over GF(2^128)); each share travels through the
   aggregator encrypted with AES-GCM under ``HKDF(X25519(c_sk_i, c_pk_j))``, bound to the
   session, the sender and the recipient. Agents that complete the phase form U2.
3. masked input: ``y = q + PRG(b) + sum_j +-PRG(s_ij) mod 2**32`` where ``q`` is the quantised
   pre-weighted update; the aggregator keeps only the running sum (U3 = senders).
4. unmask: the live members of U3 send the ``b`` shares of U3 members and the ``s_sk`` shares of
   U2 \\ U3 members; the aggregator reconstructs them (verified against the commitment / the
   advertised public key), removes the masks and dequantises the sum.

Encoding of the input vector (``mask``): ``w = min(weight, max_weight) / max_weight`` where
``weight`` is the agent's sample count; the vector is ``[w * x_1, ..., w * x_P, w * clip]``
(the weight is carried scaled by ``clip`` so it uses the whole quantisation range whatever the
clip), every element clipped to ``[-clip, clip]`` and quantised to ``quant_bits`` bits.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
import secrets
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

try:
    from Crypto.Protocol.SecretSharing import Shamir
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.x25519 import (
        X25519PrivateKey,
        X25519PublicKey,
    )
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
except ImportError as exc:
    raise ImportError(
        "secure aggregation needs the 'privacy' extra (cryptography, pycryptodome): "
        f"pip install 'fedstack[privacy]' (missing: {exc.name or exc})"
    ) from exc

from fedstack.errors import FedstackError
from fedstack.strategies.base import cast_like
from fedstack.types import Weights

__all__ = [
    "CIPHERTEXT_BYTES",
    "AgentSession",
    "PublicKeys",
    "Roster",
    "SecAggError",
    "SecAggParams",
    "ServerSession",
    "apply_update",
    "flatten_update",
    "neighbour_graph",
]

KEY_BYTES = 32
"""Length of an X25519 public key and of the ``b`` commitment."""
SEED_BYTES = 16
"""Length of the self-mask seed ``b`` (one Shamir secret)."""
SK_SHARE_BYTES = 32
"""Length of a share of ``s_sk``: the shares of its two 16-byte halves, concatenated."""
_HEADER_BYTES = 16
_NONCE_BYTES = 12
_TAG_BYTES = 16
_PLAINTEXT_BYTES = SEED_BYTES + SK_SHARE_BYTES
CIPHERTEXT_BYTES = _HEADER_BYTES + _NONCE_BYTES + _PLAINTEXT_BYTES + _TAG_BYTES
"""Exact length of one encrypted share (header, nonce, AES-GCM ciphertext and tag)."""
MAX_ID_CHARS = 256
"""Longest agent id or session id accepted."""
MAX_SUBSETS = 256
"""Most ``t``-subsets of shares tried to reconstruct one secret when some shares are wrong."""

_DOMAIN = b"fedstack-secagg-v1"


class SecAggError(FedstackError):
    """A secure-aggregation step refused its input or cannot proceed.

    ``code`` is one of :data:`CODES`; the message says what was wrong and what to do.
    """

    CODES: ClassVar[frozenset[str]] = frozenset(
        {
            "secagg-bad-key",
            "secagg-bad-share",
            "secagg-not-neighbour",
            "secagg-replay",
            "secagg-unknown-agent",
            "secagg-phase",
            "secagg-too-few",
            "secagg-params",
            "secagg-bad-input",
            "secagg-refused",
        }
    )

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------------------ params
def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SecAggError("secagg-params", f"{name} must be a number, got {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise SecAggError("secagg-params", f"{name} must be finite, got {value!r}")
    return out


def _int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SecAggError("secagg-params", f"{name} must be an integer, got {value!r}")
    return value


@dataclass(frozen=True)
class SecAggParams:
    """Parameters of secure aggregation (the same on the aggregator and every agent).

    * ``clip``: every element of ``w * x`` is clipped to ``[-clip, clip]``;
    * ``quant_bits``: bits per quantised element (the sum of ``n`` must fit in 32 bits:
      ``n * (2**quant_bits - 1) < 2**32``, see :meth:`max_agents`);
    * ``max_weight``: sample counts are capped at this and divided by it (``w`` in [0, 1]);
    * ``neighbours``: ``k``, the degree of the communication graph (even; ``None``: the smallest
      even ``k >= 2 ceil(log2 n)``, capped at ``n - 1``, i.e. a complete graph for small ``n``);
    * ``threshold``: ``t = floor(threshold * (k + 1)) + 1`` of the ``k + 1`` holders of an
      agent's secrets are needed to reconstruct them (at least 0.5, so that no two disjoint
      sets of holders can each reveal one of an agent's two secrets);
    * ``min_survivors``: the aggregator refuses to unmask a sum of fewer masked inputs;
    * ``timeout``: seconds per phase (used by the engine).
    """

    clip: float = 8.0
    quant_bits: int = 22
    max_weight: float = 1000.0
    neighbours: int | None = None
    threshold: float = 0.5
    min_survivors: int = 2
    timeout: float = 30.0

    FIELDS: ClassVar[tuple[str, ...]] = (
        "clip",
        "quant_bits",
        "max_weight",
        "neighbours",
        "threshold",
        "min_survivors",
        "timeout",
    )

    def check(self) -> None:
        """Raise ``SecAggError("secagg-params")`` if any parameter is invalid."""
        clip = _real("clip", self.clip)
        if not 0 < clip <= 1e9:
            raise SecAggError("secagg-params", f"clip must be in (0, 1e9], got {clip}")
        bits = _int("quant_bits", self.quant_bits)
        if not 2 <= bits <= 31:
            raise SecAggError(
                "secagg-params",
                f"quant_bits must be in 2..31 (a sum of agents must fit 32 bits), got {bits}",
            )
        mw = _real("max_weight", self.max_weight)
        if not mw > 0:
            raise SecAggError("secagg-params", f"max_weight must be > 0, got {mw}")
        if self.neighbours is not None:
            k = _int("neighbours", self.neighbours)
            if k < 2 or k % 2:
                raise SecAggError(
                    "secagg-params",
                    f"neighbours must be an even integer >= 2 (or None for automatic), got {k}",
                )
        thr = _real("threshold", self.threshold)
        if not 0.5 <= thr <= 1.0:
            raise SecAggError(
                "secagg-params",
                f"threshold must be in [0.5, 1] (below 0.5 an aggregator could learn both "
                f"secrets of an agent from two disjoint sets of holders), got {thr}",
            )
        ms = _int("min_survivors", self.min_survivors)
        if ms < 2:
            raise SecAggError(
                "secagg-params",
                f"min_survivors must be >= 2 (the sum of one agent is its update), got {ms}",
            )
        if ms > self.max_agents():
            raise SecAggError(
                "secagg-params",
                f"min_survivors={ms} exceeds the {self.max_agents()} agents that "
                f"quant_bits={bits} allows",
            )
        to = _real("timeout", self.timeout)
        if not 0 < to <= 86400:
            raise SecAggError("secagg-params", f"timeout must be in (0, 86400] s, got {to}")

    def max_agents(self) -> int:
        """Most agents whose quantised sum cannot overflow 32 bits."""
        return int((2**32 - 1) // ((1 << int(self.quant_bits)) - 1))

    def check_agents(self, n: int) -> None:
        """Refuse a session of ``n`` agents whose sum could overflow (``secagg-params``)."""
        if n > self.max_agents():
            raise SecAggError(
                "secagg-params",
                f"{n} agents with quant_bits={self.quant_bits} can overflow the 32-bit sum: "
                f"at most {self.max_agents()} agents (lower quant_bits for more)",
            )

    def degree(self, n: int) -> int:
        """``k``: the number of neighbours of each agent in a session of ``n`` agents."""
        if n <= 1:
            return 0
        if self.neighbours is not None:
            k = int(self.neighbours)
        else:
            k = max(2, 2 * math.ceil(math.log2(n)))
        return min(k, n - 1)

    def holders_threshold(self, n: int) -> int:
        """``t``: how many of an agent's ``k + 1`` holders can reconstruct its secrets."""
        k = self.degree(n)
        t = max(1, math.floor(float(self.threshold) * (k + 1)) + 1)
        return min(t, k + 1)

    @property
    def step(self) -> float:
        """Quantisation step ``Delta = 2 clip / (2**quant_bits - 1)``."""
        return 2.0 * float(self.clip) / ((1 << int(self.quant_bits)) - 1)

    def error_bound(self, n: int) -> float:
        """Max abs error per coordinate of the sum of ``n`` pre-weighted updates.

        ``n * Delta / 2`` for values inside ``[-clip, clip]`` (values outside are clipped,
        which is not covered by the bound). The total weight ``W`` is exact to
        ``error_bound(n) / clip``.
        """
        return n * self.step / 2.0

    def to_config(self) -> dict[str, float | int | None]:
        """The parameters as plain values (for a config file or the Welcome message)."""
        return {
            "clip": float(self.clip),
            "quant_bits": int(self.quant_bits),
            "max_weight": float(self.max_weight),
            "neighbours": None if self.neighbours is None else int(self.neighbours),
            "threshold": float(self.threshold),
            "min_survivors": int(self.min_survivors),
            "timeout": float(self.timeout),
        }

    @classmethod
    def from_config(cls, d: Mapping[str, Any]) -> SecAggParams:
        """Validated parameters from :meth:`to_config`'s form (missing keys: defaults)."""
        if not isinstance(d, Mapping):
            raise SecAggError("secagg-params", f"secagg parameters must be a mapping, got {d!r}")
        unknown = sorted(str(k) for k in d if k not in cls.FIELDS)
        if unknown:
            raise SecAggError(
                "secagg-params",
                f"unknown secagg parameter(s) {unknown}; known: {list(cls.FIELDS)}",
            )
        vals: dict[str, Any] = {}
        for name in cls.FIELDS:
            if name not in d:
                continue
            v = d[name]
            if name in ("quant_bits", "min_survivors"):
                vals[name] = _int(name, v)
            elif name == "neighbours":
                vals[name] = None if v is None else _int(name, v)
            else:
                vals[name] = _real(name, v)
        params = cls(**vals)
        params.check()
        return params


# ------------------------------------------------------------------------------ helpers
def _lp(*parts: str | bytes) -> bytes:
    """Length-prefixed concatenation (unambiguous)."""
    out = bytearray()
    for p in parts:
        b = p.encode("utf-8") if isinstance(p, str) else p
        out += struct.pack(">I", len(b))
        out += b
    return bytes(out)


def _check_id(value: object, what: str = "agent id") -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_ID_CHARS:
        raise SecAggError(
            "secagg-bad-input",
            f"{what} must be a non-empty string of at most {MAX_ID_CHARS} characters, "
            f"got {value!r:.80}",
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise SecAggError(
            "secagg-bad-input", f"{what} is not valid unicode: {value!r:.80}"
        ) from None
    return value


def _commit(session: str, agent_id: str, b: bytes) -> bytes:
    return hashlib.sha256(_DOMAIN + b"|commit|" + _lp(session, agent_id, b)).digest()


def _share_header(session: str, sender: str, recipient: str) -> bytes:
    return hashlib.sha256(_DOMAIN + b"|header|" + _lp(session, sender, recipient)).digest()[
        :_HEADER_BYTES
    ]


def _share_aad(session: str, sender: str, recipient: str) -> bytes:
    return _DOMAIN + b"|share|" + _lp(session, sender, recipient)


def _agree(sk: X25519PrivateKey, pk: bytes, info: bytes, length: int, whose: str) -> bytes:
    try:
        shared = sk.exchange(X25519PublicKey.from_public_bytes(pk))
    except ValueError:
        raise SecAggError(
            "secagg-bad-key", f"the public key of {whose} is invalid (a low-order point)"
        ) from None
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(shared)


def _share_key(sk: X25519PrivateKey, pk: bytes, session: str, whose: str) -> bytes:
    return _agree(sk, pk, _DOMAIN + b"|share-key|" + _lp(session), 32, whose)


def _mask_seed(sk: X25519PrivateKey, pk: bytes, session: str, whose: str) -> bytes:
    return _agree(sk, pk, _DOMAIN + b"|mask-seed|" + _lp(session), 32, whose)


_CHUNK = 1 << 16
"""uint32 elements of keystream made per step (256 KiB: it is added while still in cache)."""
_ZEROS = bytes(4 * _CHUNK)


def _add_prg(acc: np.ndarray[Any, Any], seed: bytes, sign: int) -> None:
    """``acc += sign * PRG(seed) mod 2**32`` in place (``acc``: uint32).

    PRG(seed) is the AES-CTR keystream of ``seed`` (AES-128 for 16 bytes, AES-256 for 32;
    zero nonce: every seed is used for one vector only) read as little-endian uint32. It is
    made block by block into one small buffer, so the keystream never goes to main memory.
    """
    enc = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    buf = np.empty(_CHUNK + 4, dtype="<u4")  # update_into wants 15 bytes of spare room
    out = buf.view(np.uint8).data
    zeros = memoryview(_ZEROS)
    op = np.add if sign > 0 else np.subtract
    n = acc.size
    for start in range(0, n, _CHUNK):
        m = min(_CHUNK, n - start)
        enc.update_into(zeros[: 4 * m], out)
        part = acc[start : start + m]
        op(part, buf[:m], out=part)


def _quantise(v: np.ndarray[Any, Any], params: SecAggParams) -> np.ndarray[Any, Any]:
    """``rint((clip(v) + clip) * (2**bits - 1) / (2 clip))`` as uint32 (``v`` is overwritten)."""
    clip = float(params.clip)
    scale = ((1 << int(params.quant_bits)) - 1) / (2.0 * clip)
    c = np.clip(v, -clip, clip, out=v)
    c += clip
    c *= scale
    np.rint(c, out=c)
    q: np.ndarray[Any, Any] = c.astype(np.uint32)
    return q


def neighbour_graph(
    ids: Sequence[str], k: int, rng: random.Random | secrets.SystemRandom
) -> dict[str, list[str]]:
    """The Harary graph H(k, n) on a shuffled ring of ``ids`` (complete if ``k >= n - 1``)."""
    order = sorted(ids)
    rng.shuffle(order)
    n = len(order)
    if k >= n - 1:
        return {a: [b for b in order if b != a] for a in order}
    half = k // 2
    return {
        a: [order[(p + d) % n] for d in range(-half, half + 1) if d != 0]
        for p, a in enumerate(order)
    }


# ------------------------------------------------------------------------------ messages
@dataclass(frozen=True)
class PublicKeys:
    """What an agent advertises: two X25519 public keys and the commitment to ``b``."""

    c_pk: bytes
    s_pk: bytes
    b_commit: bytes

    def __post_init__(self) -> None:
        for name in ("c_pk", "s_pk", "b_commit"):
            v = getattr(self, name)
            if not isinstance(v, bytes) or len(v) != KEY_BYTES:
                got = f"{len(v)} bytes" if isinstance(v, bytes) else type(v).__name__
                raise SecAggError("secagg-bad-key", f"{name} must be {KEY_BYTES} bytes, got {got}")


@dataclass(frozen=True)
class Roster:
    """What one agent learns when phase 1 closes."""

    session: str
    threshold: int
    neighbours: dict[str, PublicKeys]
    index: dict[str, int] = field(default_factory=dict)


# ------------------------------------------------------------------------------ agent
class AgentSession:
    """One agent's side of one SecAgg+ session (fresh keys and seed per session)."""

    def __init__(self, params: SecAggParams, session: str, agent_id: str) -> None:
        if not isinstance(params, SecAggParams):
            raise SecAggError("secagg-params", f"params must be SecAggParams, got {params!r:.80}")
        params.check()
        self.params = params
        self.session = _check_id(session, "session id")
        self.agent_id = _check_id(agent_id)
        self._phase = "new"
        self._c_sk = X25519PrivateKey.generate()
        self._s_sk = X25519PrivateKey.generate()
        self._b = secrets.token_bytes(SEED_BYTES)
        self._roster: Roster | None = None
        self._share_keys: dict[str, bytes] = {}
        self._mask_seeds: dict[str, bytes] = {}
        self._own: tuple[bytes, bytes] | None = None
        self._held: dict[str, tuple[bytes, bytes]] = {}

    @property
    def phase(self) -> str:
        """new, advertised, shared, received, masked, unmasked."""
        return self._phase

    def _expect(self, phase: str, step: str) -> None:
        if self._phase != phase:
            if step == "unmask" and self._phase == "unmasked":
                raise SecAggError(
                    "secagg-replay",
                    f"session {self.session}: unmask was already answered; a second request "
                    "is refused (it could reveal both secrets of an agent)",
                )
            raise SecAggError(
                "secagg-phase",
                f"session {self.session}: {step} is not allowed in phase {self._phase!r}",
            )

    def advertise(self) -> PublicKeys:
        """Phase 1: the public keys and the commitment to the self-mask seed."""
        self._expect("new", "advertise")
        self._phase = "advertised"
        return PublicKeys(
            c_pk=self._c_sk.public_key().public_bytes_raw(),
            s_pk=self._s_sk.public_key().public_bytes_raw(),
            b_commit=_commit(self.session, self.agent_id, self._b),
        )

    def _check_roster(self, roster: object) -> Roster:
        if not isinstance(roster, Roster):
            raise SecAggError("secagg-bad-input", f"roster must be a Roster, got {roster!r:.80}")
        if roster.session != self.session:
            raise SecAggError(
                "secagg-replay",
                f"roster is for session {roster.session!r:.80}, this is {self.session!r}",
            )
        nb = roster.neighbours
        if not isinstance(nb, dict) or not isinstance(roster.index, dict):
            raise SecAggError("secagg-bad-input", "roster neighbours and index must be dicts")
        for a, keys in nb.items():
            _check_id(a, "neighbour id")
            if a == self.agent_id:
                raise SecAggError(
                    "secagg-bad-input", "the roster lists this agent as its neighbour"
                )
            if not isinstance(keys, PublicKeys):
                raise SecAggError("secagg-bad-key", f"neighbour {a!r:.80} has no PublicKeys")
        k = len(nb)
        if k >= self.params.max_agents():
            raise SecAggError(
                "secagg-params",
                f"the roster lists {k} neighbours: more agents than quant_bits="
                f"{self.params.quant_bits} allows in a session ({self.params.max_agents()})",
            )
        if set(roster.index) != set(nb) | {self.agent_id}:
            raise SecAggError(
                "secagg-bad-input", "roster index must name exactly the neighbours and this agent"
            )
        idx = list(roster.index.values())
        if any(isinstance(i, bool) or not isinstance(i, int) for i in idx) or sorted(idx) != list(
            range(1, k + 2)
        ):
            raise SecAggError("secagg-bad-input", f"roster indices must be 1..{k + 1}, each once")
        t = roster.threshold
        if isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= k + 1:
            raise SecAggError("secagg-bad-input", f"roster threshold must be in 1..{k + 1}")
        safe = min(k + 1, max(1, math.floor(float(self.params.threshold) * (k + 1)) + 1))
        if t < safe:
            raise SecAggError(
                "secagg-params",
                f"roster threshold {t} is below {safe} for {k} neighbours (threshold "
                f"{self.params.threshold}): refused, it would let too few holders reveal a secret",
            )
        return roster

    def share_keys(self, roster: Roster) -> dict[str, bytes]:
        """Phase 2: encrypted Shamir shares of ``b`` and ``s_sk`` for each neighbour."""
        self._expect("advertised", "share_keys")
        roster = self._check_roster(roster)
        share_keys: dict[str, bytes] = {}
        mask_seeds: dict[str, bytes] = {}
        for a, keys in roster.neighbours.items():
            share_keys[a] = _share_key(self._c_sk, keys.c_pk, self.session, f"neighbour {a}")
            mask_seeds[a] = _mask_seed(self._s_sk, keys.s_pk, self.session, f"neighbour {a}")
        n = len(roster.neighbours) + 1
        t = roster.threshold
        sk = self._s_sk.private_bytes_raw()
        b_sh = Shamir.split(t, n, self._b)
        lo_sh = Shamir.split(t, n, sk[:16])
        hi_sh = Shamir.split(t, n, sk[16:])

        def share(holder: str) -> bytes:
            i = roster.index[holder] - 1
            return bytes(b_sh[i][1] + lo_sh[i][1] + hi_sh[i][1])

        out: dict[str, bytes] = {}
        for a in roster.neighbours:
            nonce = secrets.token_bytes(_NONCE_BYTES)
            ct = AESGCM(share_keys[a]).encrypt(
                nonce, share(a), _share_aad(self.session, self.agent_id, a)
            )
            out[a] = _share_header(self.session, self.agent_id, a) + nonce + ct
        own = share(self.agent_id)
        self._own = (own[:SEED_BYTES], own[SEED_BYTES:])
        self._roster = roster
        self._share_keys = share_keys
        self._mask_seeds = mask_seeds
        self._phase = "shared"
        return out

    def receive_shares(self, shares: dict[str, bytes]) -> None:
        """Phase 2 end: the neighbours' shares (sender -> ciphertext), checked and decrypted."""
        self._expect("shared", "receive_shares")
        assert self._roster is not None
        if not isinstance(shares, Mapping):
            raise SecAggError("secagg-bad-input", f"shares must be a mapping, got {shares!r:.80}")
        got: dict[str, tuple[bytes, bytes]] = {}
        for sender, ct in shares.items():
            _check_id(sender, "sender id")
            if sender not in self._roster.neighbours:
                raise SecAggError(
                    "secagg-not-neighbour",
                    f"a share from {sender!r:.80}, which is not a neighbour of {self.agent_id}",
                )
            if not isinstance(ct, bytes) or len(ct) != CIPHERTEXT_BYTES:
                raise SecAggError(
                    "secagg-bad-share",
                    f"the share from {sender} must be {CIPHERTEXT_BYTES} bytes",
                )
            if ct[:_HEADER_BYTES] != _share_header(self.session, sender, self.agent_id):
                raise SecAggError(
                    "secagg-replay",
                    f"the share from {sender} is not bound to session {self.session} and this "
                    "agent (replayed from another session or another recipient)",
                )
            nonce = ct[_HEADER_BYTES : _HEADER_BYTES + _NONCE_BYTES]
            try:
                pt = AESGCM(self._share_keys[sender]).decrypt(
                    nonce,
                    ct[_HEADER_BYTES + _NONCE_BYTES :],
                    _share_aad(self.session, sender, self.agent_id),
                )
            except InvalidTag:
                raise SecAggError(
                    "secagg-bad-share",
                    f"the share from {sender} failed authentication (tampered, or encrypted "
                    "under another key)",
                ) from None
            got[sender] = (pt[:SEED_BYTES], pt[SEED_BYTES:])
        self._held = got
        self._phase = "received"

    @property
    def u2_neighbours(self) -> list[str]:
        """The neighbours whose shares arrived (this agent's view of ``N(i) ∩ U2``)."""
        return sorted(self._held)

    def mask(self, vector: np.ndarray[Any, Any], weight: float) -> np.ndarray[Any, Any]:
        """Phase 3: the masked, quantised ``[w*x, w*clip]`` (uint32[P+1]).

        ``vector`` is the flattened update delta (:func:`flatten_update`), ``weight`` the
        agent's sample count (``w = min(weight, max_weight) / max_weight``).
        """
        self._expect("received", "mask")
        if not isinstance(vector, np.ndarray) or vector.ndim != 1:
            raise SecAggError("secagg-bad-input", "vector must be a 1-D numpy array")
        if vector.dtype.kind not in "fiu":
            raise SecAggError(
                "secagg-bad-input", f"vector must be real numbers, got dtype {vector.dtype}"
            )
        if isinstance(weight, bool) or not isinstance(weight, int | float | np.number):
            raise SecAggError("secagg-bad-input", f"weight must be a number, got {weight!r:.80}")
        wf = float(weight)
        if not math.isfinite(wf) or wf < 0:
            raise SecAggError("secagg-bad-input", f"weight must be finite and >= 0, got {wf}")
        v = np.asarray(vector, dtype=np.float64)
        if not np.isfinite(v).all():
            raise SecAggError("secagg-bad-input", "vector holds NaN or infinite values")
        mw = float(self.params.max_weight)
        w = min(wf, mw) / mw
        x = np.empty(v.size + 1, dtype=np.float64)
        np.multiply(v, w, out=x[:-1])
        x[-1] = w * float(self.params.clip)
        y = _quantise(x, self.params)
        del x
        _add_prg(y, self._b, +1)
        for a in sorted(self._held):
            _add_prg(y, self._mask_seeds[a], +1 if self.agent_id < a else -1)
        self._phase = "masked"
        return y

    def unmask(
        self, survivors: Sequence[str], dropped: Sequence[str]
    ) -> tuple[dict[str, bytes], dict[str, bytes]]:
        """Phase 4: the ``b`` shares of ``survivors`` and ``s_sk`` shares of ``dropped`` held here.

        Refused (once answered, forever in this session): fewer survivors than the threshold,
        overlapping sets, this agent not a survivor, a neighbour not in U2, a second request.
        """
        self._expect("masked", "unmask")
        assert self._roster is not None and self._own is not None
        sets: list[set[str]] = []
        for name, seq in (("survivors", survivors), ("dropped", dropped)):
            if isinstance(seq, str | bytes) or not isinstance(seq, Sequence):
                raise SecAggError("secagg-bad-input", f"{name} must be a sequence of agent ids")
            for a in seq:
                _check_id(a, f"id in {name}")
            s = set(seq)
            if len(s) != len(seq):
                raise SecAggError("secagg-refused", f"{name} lists an agent twice")
            sets.append(s)
        surv, drop = sets
        if surv & drop:
            raise SecAggError(
                "secagg-refused",
                f"agents listed both as survivors and dropped: {sorted(surv & drop)[:5]} "
                "(refused: it would reveal both secrets of an agent)",
            )
        if self.agent_id not in surv:
            raise SecAggError(
                "secagg-refused",
                f"{self.agent_id} sent its masked input but is not listed as a survivor",
            )
        t = self._roster.threshold
        if len(surv) < max(t, self.params.min_survivors):
            raise SecAggError(
                "secagg-too-few",
                f"{len(surv)} survivors, fewer than the threshold "
                f"{max(t, self.params.min_survivors)}: refusing to help unmask",
            )
        u2 = set(self._held) | {self.agent_id}
        for a in (surv | drop) & set(self._roster.neighbours):
            if a not in u2:
                raise SecAggError(
                    "secagg-refused",
                    f"{a} is listed in the unmask request but did not share its keys (not in U2)",
                )
        if self._roster.neighbours and not surv & set(self._roster.neighbours):
            raise SecAggError(
                "secagg-refused",
                f"none of {self.agent_id}'s neighbours is a survivor: unmasking would reveal "
                "its own update",
            )
        self._phase = "unmasked"
        b_out: dict[str, bytes] = {}
        sk_out: dict[str, bytes] = {}
        if self.agent_id in surv:
            b_out[self.agent_id] = self._own[0]
        for a, (b_share, sk_share) in self._held.items():
            if a in surv:
                b_out[a] = b_share
            elif a in drop:
                sk_out[a] = sk_share
        self._held = {}
        return b_out, sk_out


# ------------------------------------------------------------------------------ server
class ServerSession:
    """The aggregator's side of one session: it never holds an individual unmasked vector.

    Phases: ``keys`` -> ``shares`` -> ``masked`` -> ``unmask`` -> ``done`` (or ``failed``).
    """

    def __init__(
        self,
        params: SecAggParams,
        session: str,
        rng: random.Random | None = None,
        *,
        vector_length: int | None = None,
    ) -> None:
        if not isinstance(params, SecAggParams):
            raise SecAggError("secagg-params", f"params must be SecAggParams, got {params!r:.80}")
        params.check()
        if vector_length is not None and (
            isinstance(vector_length, bool)
            or not isinstance(vector_length, int)
            or vector_length < 1
        ):
            raise SecAggError("secagg-params", "vector_length must be an integer >= 1 (P + 1)")
        self.params = params
        self.session = _check_id(session, "session id")
        self._rng: random.Random | secrets.SystemRandom = (
            rng if rng is not None else secrets.SystemRandom()
        )
        self._phase = "keys"
        self._failure: str | None = None
        self._keys: dict[str, PublicKeys] = {}
        self._key_owner: dict[bytes, str] = {}
        self._graph: dict[str, list[str]] = {}
        self._index: dict[str, dict[str, int]] = {}
        self._k = 0
        self._t = 0
        self._u1: list[str] = []
        self._u2: list[str] = []
        self._u3: list[str] = []
        self._dropped: list[str] = []
        self._shares: dict[str, dict[str, bytes]] = {}
        self._sum: np.ndarray[Any, Any] | None = None
        self._vector_length = vector_length
        self._b_shares: dict[str, dict[str, bytes]] = {}
        self._sk_shares: dict[str, dict[str, bytes]] = {}
        self._responded: list[str] = []
        self.bad_senders: dict[str, str] = {}
        """Holders caught sending a wrong Shamir share (id -> what was wrong)."""

    # ---- introspection
    @property
    def phase(self) -> str:
        return self._phase

    @property
    def failure(self) -> str | None:
        """Why the session failed (``None`` unless ``phase == "failed"``)."""
        return self._failure

    @property
    def members(self) -> dict[str, list[str]]:
        """``{"U1": ..., "U2": ..., "U3": ...}`` as far as the phases have closed."""
        return {"U1": list(self._u1), "U2": list(self._u2), "U3": list(self._u3)}

    @property
    def u1(self) -> list[str]:
        return list(self._u1)

    @property
    def u2(self) -> list[str]:
        return list(self._u2)

    @property
    def u3(self) -> list[str]:
        return list(self._u3)

    @property
    def vector_length(self) -> int | None:
        """``P + 1`` once known (given, or from the first masked input)."""
        return self._vector_length

    @property
    def threshold(self) -> int:
        return self._t

    @property
    def degree(self) -> int:
        return self._k

    def neighbours(self, agent_id: str) -> list[str]:
        """``agent_id``'s neighbours (after :meth:`close_keys`)."""
        return list(self._graph.get(agent_id, []))

    def _expect(self, phase: str, step: str) -> None:
        if self._phase != phase:
            why = f" ({self._failure})" if self._failure else ""
            raise SecAggError(
                "secagg-phase",
                f"session {self.session}: {step} is not allowed in phase {self._phase!r}{why}",
            )

    def fail(self, reason: str) -> None:
        """Abandon the session: the masked sum and every share are dropped."""
        self._phase = "failed"
        self._failure = reason
        self._sum = None
        self._shares = {}
        self._b_shares = {}
        self._sk_shares = {}

    def _too_few(self, message: str) -> SecAggError:
        self.fail(message)
        return SecAggError("secagg-too-few", message)

    # ---- phase 1
    def add_keys(self, agent_id: str, keys: PublicKeys) -> None:
        self._expect("keys", "add_keys")
        _check_id(agent_id)
        if agent_id in self._keys:
            raise SecAggError("secagg-replay", f"{agent_id} already advertised its keys")
        if not isinstance(keys, PublicKeys):
            raise SecAggError("secagg-bad-key", f"keys of {agent_id} must be PublicKeys")
        for pk in (keys.c_pk, keys.s_pk):
            if pk in self._key_owner:
                raise SecAggError(
                    "secagg-bad-key",
                    f"{agent_id} advertised a public key {self._key_owner[pk]} already uses",
                )
        if keys.c_pk == keys.s_pk:
            raise SecAggError("secagg-bad-key", f"{agent_id} advertised c_pk == s_pk")
        self.params.check_agents(len(self._keys) + 1)
        self._keys[agent_id] = keys
        self._key_owner[keys.c_pk] = agent_id
        self._key_owner[keys.s_pk] = agent_id

    def close_keys(self) -> dict[str, Roster]:
        """Close phase 1 (U1), build the graph: each agent's roster."""
        self._expect("keys", "close_keys")
        n = len(self._keys)
        if n < self.params.min_survivors:
            raise self._too_few(
                f"{n} agents advertised keys, fewer than min_survivors={self.params.min_survivors}"
            )
        self._u1 = sorted(self._keys)
        self._k = self.params.degree(n)
        self._t = self.params.holders_threshold(n)
        self._graph = neighbour_graph(self._u1, self._k, self._rng)
        rosters: dict[str, Roster] = {}
        for a in self._u1:
            holders = sorted([*self._graph[a], a])
            self._index[a] = {h: i + 1 for i, h in enumerate(holders)}
            rosters[a] = Roster(
                session=self.session,
                threshold=self._t,
                neighbours={b: self._keys[b] for b in self._graph[a]},
                index=dict(self._index[a]),
            )
        self._phase = "shares"
        return rosters

    # ---- phase 2
    def add_shares(self, agent_id: str, shares: dict[str, bytes]) -> None:
        self._expect("shares", "add_shares")
        _check_id(agent_id)
        if agent_id not in self._graph:
            raise SecAggError("secagg-unknown-agent", f"{agent_id} is not in this session (U1)")
        if agent_id in self._shares:
            raise SecAggError("secagg-replay", f"{agent_id} already sent its shares")
        if not isinstance(shares, Mapping):
            raise SecAggError("secagg-bad-input", f"shares of {agent_id} must be a mapping")
        nbrs = set(self._graph[agent_id])
        for r, ct in shares.items():
            _check_id(r, "recipient id")
            if r not in self._graph:
                raise SecAggError(
                    "secagg-unknown-agent",
                    f"{agent_id} sent a share for {r!r:.80}, which is not in this session",
                )
            if r not in nbrs:
                raise SecAggError(
                    "secagg-not-neighbour",
                    f"{agent_id} sent a share for {r}, which is not its neighbour",
                )
            if not isinstance(ct, bytes) or len(ct) != CIPHERTEXT_BYTES:
                raise SecAggError(
                    "secagg-bad-share",
                    f"{agent_id}'s share for {r} must be {CIPHERTEXT_BYTES} bytes",
                )
            if ct[:_HEADER_BYTES] != _share_header(self.session, agent_id, r):
                raise SecAggError(
                    "secagg-replay",
                    f"{agent_id}'s share for {r} is not bound to session {self.session} and "
                    "this sender/recipient (replayed?)",
                )
        missing = nbrs - set(shares)
        if missing:
            raise SecAggError(
                "secagg-bad-share",
                f"{agent_id} sent no share for its neighbour(s) {sorted(missing)[:5]}",
            )
        self._shares[agent_id] = dict(shares)

    def close_shares(self) -> dict[str, dict[str, bytes]]:
        """Close phase 2 (U2): recipient -> {sender: ciphertext} for every member of U2."""
        self._expect("shares", "close_shares")
        self._u2 = sorted(self._shares)
        if len(self._u2) < self.params.min_survivors:
            raise self._too_few(
                f"{len(self._u2)} agents shared keys, fewer than "
                f"min_survivors={self.params.min_survivors}"
            )
        out: dict[str, dict[str, bytes]] = {r: {} for r in self._u2}
        for s in self._u2:
            for r, ct in self._shares[s].items():
                if r in out:
                    out[r][s] = ct
        self._shares = {}
        self._phase = "masked"
        return out

    # ---- phase 3
    def add_masked(self, agent_id: str, vector: np.ndarray[Any, Any]) -> None:
        self._expect("masked", "add_masked")
        _check_id(agent_id)
        if agent_id not in self._u2:
            raise SecAggError(
                "secagg-unknown-agent", f"{agent_id} did not share its keys (not in U2)"
            )
        if agent_id in self._u3:
            raise SecAggError("secagg-replay", f"{agent_id} already sent its masked input")
        if (
            not isinstance(vector, np.ndarray)
            or vector.dtype != np.dtype(np.uint32)
            or vector.ndim != 1
            or vector.size < 1
        ):
            raise SecAggError(
                "secagg-bad-input",
                f"the masked input of {agent_id} must be a 1-D uint32 array",
            )
        if self._vector_length is not None and vector.size != self._vector_length:
            raise SecAggError(
                "secagg-bad-input",
                f"the masked input of {agent_id} has {vector.size} elements, expected "
                f"{self._vector_length}",
            )
        if self._sum is None:
            self._sum = np.array(vector, dtype=np.uint32, copy=True)
            self._vector_length = vector.size
        else:
            np.add(self._sum, vector, out=self._sum)
        self._u3.append(agent_id)

    def close_masked(self) -> tuple[list[str], list[str]]:
        """Close phase 3: (U3 survivors, U2 \\ U3 dropped); ``secagg-too-few`` below threshold."""
        self._expect("masked", "close_masked")
        need = max(self.params.min_survivors, self._t)
        if len(self._u3) < need:
            raise self._too_few(
                f"{len(self._u3)} masked inputs, fewer than {need} (threshold {self._t}, "
                f"min_survivors {self.params.min_survivors}): the sum cannot be unmasked"
            )
        self._u3.sort()
        u3 = set(self._u3)
        smallest = min(len(c) for c in self._components(u3))
        if smallest < self.params.min_survivors:
            raise self._too_few(
                f"the graph of the {len(u3)} masked inputs falls apart into groups with no "
                f"surviving neighbour in common (the smallest has {smallest} agent(s), fewer "
                f"than min_survivors {self.params.min_survivors}): unmasking would reveal the "
                "sum of such a group"
            )
        self._dropped = [a for a in self._u2 if a not in u3]
        self._phase = "unmask"
        return list(self._u3), list(self._dropped)

    def _components(self, members: set[str]) -> list[set[str]]:
        """Connected components of the graph restricted to ``members``.

        Unmasking reveals the sum of each component (their pairwise masks cancel inside it),
        so each must be at least ``min_survivors`` agents.
        """
        left = set(members)
        out: list[set[str]] = []
        while left:
            start = left.pop()
            comp = {start}
            todo = [start]
            while todo:
                for b in self._graph[todo.pop()]:
                    if b in left:
                        left.discard(b)
                        comp.add(b)
                        todo.append(b)
            out.append(comp)
        return out

    # ---- phase 4
    def add_unmask(
        self, agent_id: str, b_shares: dict[str, bytes], sk_shares: dict[str, bytes]
    ) -> None:
        self._expect("unmask", "add_unmask")
        _check_id(agent_id)
        if agent_id not in self._u3:
            raise SecAggError(
                "secagg-unknown-agent", f"{agent_id} is not a survivor (U3) of this session"
            )
        if agent_id in self._responded:
            raise SecAggError("secagg-replay", f"{agent_id} already sent its unmask shares")
        holds_for = set(self._graph[agent_id]) | {agent_id}
        u3 = set(self._u3)
        dropped = set(self._dropped)
        checks = (
            ("b", b_shares, u3, SEED_BYTES, "survivor"),
            ("s_sk", sk_shares, dropped, SK_SHARE_BYTES, "dropped agent"),
        )
        for what, shares, allowed, size, role in checks:
            if not isinstance(shares, Mapping):
                raise SecAggError("secagg-bad-input", f"{what} shares must be a mapping")
            for owner, sh in shares.items():
                _check_id(owner, "share owner id")
                if owner not in allowed:
                    raise SecAggError(
                        "secagg-unknown-agent",
                        f"{agent_id} sent a {what} share of {owner!r:.80}, not a {role}",
                    )
                if owner not in holds_for:
                    raise SecAggError(
                        "secagg-not-neighbour",
                        f"{agent_id} sent a {what} share of {owner}, which is not its neighbour",
                    )
                if not isinstance(sh, bytes) or len(sh) != size:
                    raise SecAggError(
                        "secagg-bad-share",
                        f"{agent_id}'s {what} share of {owner} must be {size} bytes",
                    )
        for owner, sh in b_shares.items():
            self._b_shares.setdefault(owner, {})[agent_id] = sh
        for owner, sh in sk_shares.items():
            self._sk_shares.setdefault(owner, {})[agent_id] = sh
        self._responded.append(agent_id)

    @property
    def responded(self) -> list[str]:
        """Survivors whose unmask shares arrived."""
        return list(self._responded)

    def can_finish(self) -> bool:
        """Whether every secret has at least ``t`` shares (finish may still find bad ones)."""
        if self._phase != "unmask":
            return False
        for owners, table in ((self._u3, self._b_shares), (self._dropped, self._sk_shares)):
            for o in owners:
                if len(table.get(o, {})) < self._t:
                    return False
        return True

    def _reconstruct(
        self,
        owner: str,
        what: str,
        shares: Mapping[str, bytes],
        verify: Callable[[bytes], bool],
    ) -> bytes:
        idx = self._index[owner]
        items = sorted((idx[h], h, sh) for h, sh in shares.items())
        t = self._t
        if len(items) < t:
            raise self._too_few(
                f"{len(items)} shares of {what} of {owner}, fewer than the threshold {t}: "
                "the sum cannot be unmasked (nothing was revealed)"
            )
        parts = len(items[0][2]) // 16

        def combine(subset: Sequence[tuple[int, str, bytes]]) -> bytes | None:
            try:
                secret = b"".join(
                    Shamir.combine([(i, sh[16 * p : 16 * p + 16]) for i, _, sh in subset])
                    for p in range(parts)
                )
            except (ValueError, TypeError):
                return None
            return secret if verify(secret) else None

        first = combine(items[:t])
        if first is not None:
            return first
        m = len(items)
        tries = 1
        found: tuple[bytes, list[tuple[int, str, bytes]]] | None = None
        seen = {tuple(range(t))}
        for r in range(1, m - t + 1):
            for excl in itertools.combinations(range(m), r):
                if tries >= MAX_SUBSETS:
                    break
                chosen = tuple(i for i in range(m) if i not in excl)[:t]
                if chosen in seen:
                    continue
                seen.add(chosen)
                subset = [items[i] for i in chosen]
                tries += 1
                secret = combine(subset)
                if secret is not None:
                    found = (secret, subset)
                    break
            if found is not None or tries >= MAX_SUBSETS:
                break
        senders = [h for _, h, _ in items]
        if found is None:
            message = (
                f"could not reconstruct {what} of {owner} from the shares of {senders} "
                f"({tries} subsets of {t} tried): some of these agents sent wrong shares"
            )
            self.fail(message)
            raise SecAggError("secagg-bad-share", message)
        secret, subset = found
        base = subset[: t - 1]
        for it in items:
            if it in subset:
                continue
            if combine([*base, it]) is None:
                self.bad_senders[it[1]] = f"wrong {what} share of {owner}"
        return secret

    def finish(self) -> tuple[np.ndarray[Any, Any], float, list[str]]:
        """Unmask: ``(sum of w_i x_i as float64[P], W = sum of w_i, U3)``.

        Every secret is reconstructed and verified first; if any cannot be, the session fails
        (``secagg-too-few`` / ``secagg-bad-share``) and the masked sum is dropped unopened.
        """
        self._expect("unmask", "finish")
        session = self.session
        keys = self._keys
        b_seeds: dict[str, bytes] = {}
        for u in self._u3:

            def committed(s: bytes, u: str = u, c: bytes = keys[u].b_commit) -> bool:
                return _commit(session, u, s) == c

            b_seeds[u] = self._reconstruct(
                u, "the self-mask seed", self._b_shares.get(u, {}), committed
            )
        sks: dict[str, X25519PrivateKey] = {}
        for d in self._dropped:
            s_pk = keys[d].s_pk

            def ok(s: bytes, pk: bytes = s_pk) -> bool:
                return X25519PrivateKey.from_private_bytes(s).public_key().public_bytes_raw() == pk

            sks[d] = X25519PrivateKey.from_private_bytes(
                self._reconstruct(d, "the mask key", self._sk_shares.get(d, {}), ok)
            )
        assert self._sum is not None
        total = self._sum
        self._sum = None
        for u in self._u3:
            _add_prg(total, b_seeds[u], -1)
        u3 = set(self._u3)
        for d, sk in sks.items():
            for j in self._graph[d]:
                if j not in u3:
                    continue
                # y_j holds +PRG(s_jd) if j < d else -PRG(s_jd): take it out
                seed = _mask_seed(sk, keys[j].s_pk, session, f"agent {j}")
                _add_prg(total, seed, -1 if j < d else +1)
        clip = float(self.params.clip)
        v = total.astype(np.float64)
        del total
        v *= self.params.step
        v -= len(self._u3) * clip
        weight = float(v[-1]) / clip
        self._b_shares = {}
        self._sk_shares = {}
        self._phase = "done"
        return v[:-1], weight, list(self._u3)


# ------------------------------------------------------------------------------ models
def flatten_update(weights: Weights, base: Weights) -> np.ndarray[Any, Any]:
    """``weights - base`` as one float64 vector, tensors in ``base``'s name order."""
    if not isinstance(weights, Mapping) or not isinstance(base, Mapping):
        raise SecAggError("secagg-bad-input", "weights and base must be mappings of arrays")
    if set(weights) != set(base):
        extra = sorted(set(weights) - set(base))[:5]
        missing = sorted(set(base) - set(weights))[:5]
        raise SecAggError(
            "secagg-bad-input",
            f"the update's tensors differ from the global model's (missing {missing}, "
            f"extra {extra})",
        )
    parts = []
    for name, ref in base.items():
        w = np.asarray(weights[name])
        r = np.asarray(ref)
        if w.shape != r.shape:
            raise SecAggError(
                "secagg-bad-input", f"tensor {name!r}: shape {w.shape}, expected {r.shape}"
            )
        if w.dtype.kind not in "fiub" or r.dtype.kind not in "fiub":
            raise SecAggError("secagg-bad-input", f"tensor {name!r} is not numeric")
        parts.append(np.subtract(w, r, dtype=np.float64).ravel())
    if not parts:
        return np.zeros(0, dtype=np.float64)
    return np.concatenate(parts)


def apply_update(base: Weights, total: np.ndarray[Any, Any], weight: float) -> Weights:
    """``base + total / weight`` tensor by tensor, cast back to each tensor's dtype."""
    if not isinstance(base, Mapping):
        raise SecAggError("secagg-bad-input", "base must be a mapping of arrays")
    if not isinstance(total, np.ndarray) or total.ndim != 1:
        raise SecAggError("secagg-bad-input", "total must be a 1-D numpy array")
    size = sum(int(np.asarray(r).size) for r in base.values())
    if total.size != size:
        raise SecAggError("secagg-bad-input", f"total has {total.size} elements, the model {size}")
    if isinstance(weight, bool) or not isinstance(weight, int | float | np.number):
        raise SecAggError("secagg-bad-input", f"weight must be a number, got {weight!r:.80}")
    wf = float(weight)
    if not math.isfinite(wf) or wf <= 0:
        raise SecAggError(
            "secagg-bad-input",
            f"the total weight is {wf}: no agent contributed a positive weight (sample count)",
        )
    out: Weights = {}
    off = 0
    for name, ref in base.items():
        r = np.asarray(ref)
        seg = total[off : off + r.size].reshape(r.shape)
        off += r.size
        out[name] = cast_like(np.asarray(r, dtype=np.float64) + seg / wf, r)
    return out
