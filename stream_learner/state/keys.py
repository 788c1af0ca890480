"""Keys for distinct purposes, derived from one group secret (HKDF-SHA256, RFC 5869).

A deployment configures one secret (``$STREAM_LEARNER_CHECKPOINT_KEY`` or a key file). Each use
gets its own key derived from it with a distinct label, so a MAC made for one purpose never
verifies for another: a fusion snapshot cannot pass for a checkpoint, nor the reverse.

>>> secret = b"0123456789abcdef0123456789abcdef"
>>> derive_key(secret, CHECKPOINT) != derive_key(secret, FUSION)
True
>>> len(derive_key(secret, FUSION))
32

"""

from __future__ import annotations

import hashlib
import hmac

__all__ = ["CHECKPOINT", "FUSION", "MODEL_FILE", "derive_key", "hkdf_sha256"]

# Labels of the derived keys; changing one invalidates everything signed with its key.
CHECKPOINT = "stream-learner/checkpoint/v1"
FUSION = "stream-learner/fusion/v1"
MODEL_FILE = "stream-learner/model-file/v1"

_SALT = b"stream-learner key derivation"


def hkdf_sha256(secret: bytes, info: bytes, length: int = 32, salt: bytes = b"") -> bytes:
    """RFC 5869 HKDF with SHA-256: extract a pseudorandom key from ``secret``, expand it for ``info``.

    >>> ikm = bytes.fromhex("0b" * 22)
    >>> salt = bytes.fromhex("000102030405060708090a0b0c")
    >>> info = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9")
    >>> hkdf_sha256(ikm, info, 42, salt).hex()  # RFC 5869, test case 1
    '3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865'

    """
    if not 0 < length <= 255 * hashlib.sha256().digest_size:
        raise ValueError(f"HKDF-SHA256 output length must be 1 to 8160 bytes, not {length}")
    pseudorandom_key = hmac.new(salt or bytes(32), secret, hashlib.sha256).digest()
    output, block, counter = b"", b"", 1
    while len(output) < length:
        block = hmac.new(pseudorandom_key, block + info + bytes([counter]), hashlib.sha256).digest()
        output += block
        counter += 1
    return output[:length]


def derive_key(secret: bytes, purpose: str) -> bytes:
    """The 32-byte key for ``purpose`` (one of this module's labels) derived from ``secret``."""
    return hkdf_sha256(secret, purpose.encode("utf-8"), salt=_SALT)
