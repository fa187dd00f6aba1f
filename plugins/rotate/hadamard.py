"""Orthogonal matrices for ``rotate``: randomized Hadamard matrices, or Haar-random ones.

A Hadamard matrix ``H`` of order ``n`` has entries ±1 and ``H Hᵀ = n I``; ``H / √n`` is orthogonal
and spreads every coordinate evenly over all of them, which is what flattens outlier channels.
Orders built here (all in float64, deterministic):

* Sylvester: ``n = 2ᵏ`` (``H₂ₙ = [[Hₙ, Hₙ], [Hₙ, −Hₙ]]``);
* Paley I: ``n = q + 1`` for a prime ``q ≡ 3 (mod 4)`` (12, 20, 24, 32, 44, 48, 60, …);
* Paley II: ``n = 2(q + 1)`` for a prime ``q ≡ 1 (mod 4)`` (12, 28, 36, 60, 76, …);
* their Kronecker products with a Sylvester matrix: ``n = m · 2ᵏ`` with ``m`` one of the above.

That covers the hidden sizes of common decoders (896 = 28·32, 2304 = 36·64, 3072 = 12·256,
5120 = 20·256, 960 = 60·16) besides the powers of two. A size with no construction here (not a
multiple of 4, or one whose odd part needs a prime power or another construction) gets a
Haar-random orthogonal matrix from the QR decomposition of a Gaussian matrix instead
(``hadamard_order`` tells which), as ``kind = "random"`` does for every size.

``rotation(n, kind, seed)`` returns ``Q`` with ``QᵀQ = I``: ``diag(s) · H / √n`` with random signs
``s`` (QuaRot's randomized Hadamard), or the random orthogonal matrix. Both are drawn from a torch
CPU generator seeded with ``seed``, so a seed gives the same matrix on every machine and rank.
"""
from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

KINDS = ("hadamard", "random")


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q ** 0.5) + 1))


def _paley(n: int) -> tuple[str, int] | None:
    """``("I", q)`` or ``("II", q)`` when a Paley construction gives a Hadamard matrix of order ``n``."""
    if n % 4:
        return None
    if _is_prime(n - 1) and (n - 1) % 4 == 3:
        return ("I", n - 1)
    if n % 2 == 0 and _is_prime(n // 2 - 1) and (n // 2 - 1) % 4 == 1:
        return ("II", n // 2 - 1)
    return None


def hadamard_order(n: int) -> tuple[int, int] | None:
    """``(m, 2ᵏ)`` with ``m · 2ᵏ = n`` and ``m`` 1 or a Paley order (the smallest such ``m``), or
    ``None`` when no Hadamard matrix of order ``n`` is built here."""
    if n < 1:
        return None
    power = 1
    while n % (power * 2) == 0:
        power *= 2
    candidates = []
    p = power
    while p >= 1:
        m = n // p
        if m == 1 or _paley(m) is not None:
            candidates.append((m, p))
        p //= 2
    return min(candidates) if candidates else None


def _legendre(a: int, q: int) -> int:
    a %= q
    if a == 0:
        return 0
    return 1 if pow(a, (q - 1) // 2, q) == 1 else -1


def _paley_matrix(n: int) -> torch.Tensor:
    import torch

    kind, q = _paley(n)  # type: ignore[misc]
    jac = torch.tensor([[_legendre(j - i, q) for j in range(q)] for i in range(q)],
                       dtype=torch.float64)
    ones = torch.ones(q, dtype=torch.float64)
    if kind == "I":  # q ≡ 3 (mod 4): the Jacobsthal matrix is skew-symmetric
        s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        s[0, 1:] = ones
        s[1:, 0] = -ones
        s[1:, 1:] = jac
        return torch.eye(q + 1, dtype=torch.float64) + s
    # q ≡ 1 (mod 4): a symmetric conference matrix C, then
    # C ⊗ [[1, 1], [1, −1]] + I ⊗ [[1, −1], [−1, −1]]
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:] = ones
    c[1:, 0] = ones
    c[1:, 1:] = jac
    a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


@lru_cache(maxsize=8)
def _hadamard_cached(n: int) -> torch.Tensor:
    import torch

    order = hadamard_order(n)
    if order is None:
        raise ValueError(f"no Hadamard matrix of order {n} is built here")
    m, power = order
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < power:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return torch.kron(_paley_matrix(m), h) if m > 1 else h


def hadamard(n: int) -> torch.Tensor:
    """A Hadamard matrix of order ``n`` (entries ±1, ``H Hᵀ = n I``) in float64; ``ValueError`` for
    an order ``hadamard_order`` has no construction for."""
    return _hadamard_cached(n).clone()


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal matrix (QR of a Gaussian matrix, signs fixed by ``R``'s diagonal)."""
    import torch

    gauss = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gauss)
    return q * torch.sign(torch.diagonal(r))[None, :]


def rotation(n: int, kind: str = "hadamard", seed: int = 0) -> tuple[torch.Tensor, str]:
    """An orthogonal ``n × n`` float64 matrix and how it was made (for the stage's log).

    ``kind = "hadamard"``: ``diag(s) · H / √n`` with random signs ``s``, or a random orthogonal
    matrix when ``n`` has no Hadamard construction here; ``kind = "random"``: a random orthogonal
    matrix.
    """
    import torch

    if kind not in KINDS:
        raise ValueError(f"unknown rotation kind '{kind}' (expected one of {', '.join(KINDS)})")
    generator = torch.Generator().manual_seed(int(seed))
    order = hadamard_order(n) if kind == "hadamard" else None
    if order is None:
        how = "random orthogonal" + (" (no Hadamard construction of that order)"
                                     if kind == "hadamard" else "")
        return random_orthogonal(n, generator), how
    signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.int64).double() * 2 - 1
    m, power = order
    how = "randomized Hadamard" + (f" ({m} × {power}, Paley ⊗ Sylvester)" if m > 1 else "")
    return signs[:, None] * hadamard(n) / n ** 0.5, how
