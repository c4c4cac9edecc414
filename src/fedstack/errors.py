"""The fedstack error hierarchy.

::

    FedstackError
    ├── ProtocolError                 a message broke the wire protocol
    │   ├── LocalProtocolError        we were about to send something invalid
    │   └── RemoteProtocolError       the peer sent something invalid (carries ``code``)
    │       └── MessageTooLarge
    ├── ConnectionClosed              the connection ended (carries ``code`` and ``reason``)
    ├── InvalidUpdate                 a model failed validation (carries ``agent_id``, ``round``)
    ├── FederationFinished            the aggregator's last round is over
    ├── RegistrationRefused           the aggregator refused this agent (carries ``code``)
    │   └── CredentialRefused         the credential check refused it (adds ``reason``)
    ├── StoreError                    the model store failed
    │   ├── StoreConflict             a write conflicts with stored data (a unique key taken)
    │   └── TensorFileError           bytes that should be a tensor file are not a valid one
    ├── TLSError                      TLS setup or certificate verification failed
    └── ConfigError                   a configuration value is invalid

Errors name their cause; the CLI is the only place they become exit codes.
"""

from __future__ import annotations


class FedstackError(Exception):
    """Root of every error fedstack raises on purpose."""


class ProtocolError(FedstackError):
    """A message broke the wire protocol."""


class LocalProtocolError(ProtocolError):
    """We were about to send something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow.

    ``code`` is a short machine-readable reason sent back in the ``error`` reply.
    """

    def __init__(self, message: str, code: str = "bad-message") -> None:
        super().__init__(message)
        self.code = code


class MessageTooLarge(RemoteProtocolError):
    """A frame or message is larger than the configured limit."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"message of {size} bytes exceeds the limit of {limit} bytes "
            "(raise max_message_bytes on the aggregator if the model really is this big)",
            code="too-large",
        )
        self.size = size
        self.limit = limit


class ConnectionClosed(FedstackError):
    """The connection ended."""

    def __init__(self, code: int = 1006, reason: str = "") -> None:
        super().__init__(f"connection closed (code {code}{': ' + reason if reason else ''})")
        self.code = code
        self.reason = reason


class InvalidUpdate(FedstackError):
    """A model upload does not match the federation's model or is not finite."""

    def __init__(self, message: str, agent_id: str | None = None, round: int | None = None):
        super().__init__(message)
        self.agent_id = agent_id
        self.round = round


class FederationFinished(FedstackError):
    """The federation's last round is over; there is no further global model."""


class RegistrationRefused(FedstackError):
    """The aggregator refused to register this agent (see the message for why).

    ``code`` is the machine-readable reason (``auth-required``, ``bad-credential``,
    ``revoked``, ``weak-token``, ``refused``, ...), the one sent in the ``error`` reply.
    """

    def __init__(self, message: str, code: str = "refused") -> None:
        super().__init__(message)
        self.code = code


class CredentialRefused(RegistrationRefused):
    """Registration (or an operator call) refused by the credential check.

    ``code`` goes on the wire (it never tells an unknown name from a wrong token);
    ``reason`` is the precise cause for the audit trail (``no-token``, ``unknown-agent``,
    ``bad-enrollment``, ``wrong-token``, ``no-credential``, ``weak-token``, ``revoked``,
    ``operator-credential``, ``agent-credential``). ``credential`` is the fingerprint of
    the credential presented and ``source`` how the stored one was obtained, when known.
    """

    def __init__(
        self,
        message: str,
        code: str,
        reason: str,
        *,
        credential: str | None = None,
        source: str | None = None,
    ) -> None:
        super().__init__(message, code)
        self.reason = reason
        self.credential = credential
        self.source = source


class StoreError(FedstackError):
    """The model store could not read or write. The message never carries SQL text or
    parameters (the details are logged at debug level by the store)."""


class StoreConflict(StoreError):
    """A write conflicts with data already stored (a unique name or id is taken, possibly
    by a concurrent writer); nothing of the transaction was written."""


class StoreUnavailable(StoreError):
    """The database server cannot be reached (down, restarting, the connection cut):
    nothing of the transaction was written, and the same call succeeds once it is back."""


class CorruptBlob(StoreError):
    """A stored blob is missing, truncated or fails its hash check: the data is damaged,
    not the store unavailable (retrying does not help)."""


class DatabaseReplaced(StoreError):
    """The database file an aggregator opened was deleted or replaced while it ran: every
    later write would be lost on restart, so the aggregator stops."""


class TensorFileError(StoreError):
    """Bytes that should be a tensor file (safetensors layout) are not a valid one: too
    short, a bad header, a dtype not allowed, offsets out of range or not contiguous."""


class TLSError(FedstackError):
    """TLS could not be set up (a certificate or key file) or the handshake failed in a way
    no retry fixes (the peer's certificate does not verify against the CA, the peer refused
    ours, or the peer speaks TLS and we did not). The message says what to check."""


class ConfigError(FedstackError):
    """A configuration value is missing or invalid."""
