"""Deterministic pseudo-random payloads, identical at both ends without sending a digest.

The stream for a seed is the AES-256-CTR keystream under ``SHA-256(seed)``, starting at counter 0:
unique bytes everywhere (so a reordered or duplicated chunk changes the digest), seekable, and
produced at several GB/s by OpenSSL, far faster than the links under test. (SHAKE-128 from
hashlib manages about 350 MB/s here, too close to what a download may need.)
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

CHUNK = 1 << 20
_ZEROS = bytes(CHUNK)


def chunks(n: int, seed: str = "0", chunk: int = CHUNK) -> Iterator[bytes]:
    """Yield the first ``n`` bytes of the stream for ``seed``, ``chunk`` bytes at a time."""
    if n < 0:
        raise ValueError("negative length")
    key = hashlib.sha256(seed.encode()).digest()
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    zeros = _ZEROS if chunk == CHUNK else bytes(chunk)
    left = n
    while left > 0:
        size = min(chunk, left)
        yield encryptor.update(zeros if size == chunk else zeros[:size])
        left -= size


def expected_sha256(n: int, seed: str = "0") -> str:
    """The hex SHA-256 of the first ``n`` bytes of the stream for ``seed``."""
    digest = hashlib.sha256()
    for block in chunks(n, seed):
        digest.update(block)
    return digest.hexdigest()
