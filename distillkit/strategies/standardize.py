"""Per-teacher target standardisers (strategy agglomerate): every teacher's targets are brought to one scale
before the student's heads regress them, so that no teacher dominates the loss by the size of its features.

A standardiser is an `nn.Module` whose state (running moments, the cached transform) is buffers, so it is
checkpointed with the strategy. `update(rows)` refreshes it from (N, D) rows (in `after_step`, from the
gathered global batch); `forward` applies it to (..., D) targets, one affine map that reads nothing back from
the device beyond what `feature.RunningMoments` does; `restore` is its inverse (an adaptor head's output back
in the teacher's space); `out_dim` is the width of what it gives.

    none:   y = x
    zscore: y_d = (x_d - mu_d) / sqrt(var_d + 1e-6)        per dimension, running moments (feature.py)
    phi_s:  y = (1/alpha) H [U^T (x - mu); 0]               PHI-S, below

PHI-S: Ranzinger, Heinrich, Kautz, Molchanov, "PHI-S: Distribution Balancing for Label-Free Multi-Teacher
Distillation" (arXiv 2410.01680; official code NVlabs/RADIO examples/common/phi_s.py and hadamard.py). With
the covariance Sigma = U diag(lambda) U^T and H a normalised Hadamard matrix (H H^T = I, every entry
+-1/sqrt(n)), Cov(y) = (1/alpha^2) H diag(lambda) H^T, whose diagonal is (1/alpha^2) sum(lambda) / n: with
alpha^2 = sum(lambda) / n every output dimension has variance exactly 1, from ONE scalar scale, so y is an
isometry of x up to 1/alpha (distances shrink by 1/alpha; no direction is stretched more than another).

  [D] Orders without a Hadamard matrix. Hadamard matrices exist for n = 1, 2 and some multiples of 4; we
  build Sylvester's (powers of 2), Paley's I (q + 1, q a prime = 3 mod 4) and II (2 (q + 1), q a prime = 1
  mod 4) and Kronecker products of a Sylvester matrix with one of Paley's, the constructions of RADIO's
  hadamard.py. Where none reaches the width d, RADIO falls back to a random orthogonal matrix (QR of a +-1
  matrix), whose rows do not have equal squared entries, so its output variances are only roughly equal
  (far from it when one eigenvalue dominates). We pad instead: n = the smallest order >= d that can be built,
  the d eigen-coordinates get n - d zeros, alpha^2 = sum(lambda) / n, and all n outputs have variance exactly
  1 (the head predicts n values; 384, 768, 1024, 1280, 1536, 2048 and most widths need no padding).
  [D] Online estimates. RADIO estimates mu and Sigma once; here they are running moments (a bias-corrected
  moving average in float64, as RunningMoments, with the outer product for the second moment) and the
  eigendecomposition (torch.linalg.eigh, in float32: LAPACK's float64 solver takes seconds for d = 1280 on a
  CPU) is redone after updates 1, 2, 4, ... up to `refresh_every` (agglomerate's `phi_s_refresh`, 200) and then
  every `refresh_every` updates (`refreshes`); between refreshes the transform is fixed while the moments keep
  moving. On a GPU each refresh waits for the device once, outside the loss. An eigenbasis is fixed only up
  to the order and the signs of its vectors, and H mixes every coordinate, so a fresh basis that flipped one
  vector or swapped two of near-equal eigenvalues would move every target; each new basis is matched to the
  previous one first (`align_basis`), which keeps all the properties above (a reordered, sign-flipped
  eigenbasis is an eigenbasis).
  [D] Before the first update (the first step), phi_s gives the raw target padded with zeros and zscore the
  raw target, as feature.py; the eigenvalues get + 1e-6 in alpha^2, as zscore's variances.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from .feature import RunningMoments, normalise_target

Standardize = Literal["none", "zscore", "phi_s"]
VARIANCE_EPS = 1e-6  # feature.normalise_target's


def make_standardizer(kind: str, dim: int, momentum: float, refresh_every: int = 1) -> nn.Module:
    """The standardiser `kind` for targets of width `dim`, its moments a moving average of `momentum`; phi_s
    recomputes its transform on the schedule of `refreshes(updates, refresh_every)`."""
    if kind == "zscore":
        return ZScore(dim, momentum)
    if kind == "phi_s":
        return PhiS(dim, momentum, refresh_every)
    return Unchanged(dim)


class Unchanged(nn.Module):
    """`none`: the target as the teacher gives it."""

    def __init__(self, dim: int):
        super().__init__()
        self.out_dim = dim

    def update(self, rows: Tensor) -> None:
        pass

    def forward(self, x: Tensor) -> Tensor:
        return x

    def restore(self, y: Tensor) -> Tensor:
        return y


class ZScore(nn.Module):
    """`zscore`: y_d = (x_d - mu_d) / sqrt(var_d + 1e-6) with feature.py's running moments; raw before any."""

    def __init__(self, dim: int, momentum: float):
        super().__init__()
        self.out_dim = dim
        self.moments = RunningMoments(dim, momentum)

    def update(self, rows: Tensor) -> None:
        self.moments.update(rows)

    def forward(self, x: Tensor) -> Tensor:
        return normalise_target(x, self.moments.moments(), "standardize")

    def restore(self, y: Tensor) -> Tensor:
        moments = self.moments.moments()
        if moments is None:
            return y
        mean, var = moments
        return y * torch.sqrt(var + VARIANCE_EPS) + mean


class RunningCovariance(nn.Module):
    """Mean and covariance of a stream of (N, D) batches: a bias-corrected moving average in float64.

    m_t = a m_{t-1} + (1 - a) mean_n(x_n),  S_t = a S_{t-1} + (1 - a) mean_n(x_n x_n^T)
    mu = m_t / (1 - a^t),  Sigma = S_t / (1 - a^t) - mu mu^T
    """

    def __init__(self, dim: int, momentum: float):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("first", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("second", torch.zeros(dim, dim, dtype=torch.float64))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, batch: Tensor) -> None:
        batch = batch.detach().double()
        self.first.mul_(self.momentum).add_(batch.mean(0), alpha=1 - self.momentum)
        self.second.mul_(self.momentum).add_(batch.T @ batch / batch.shape[0], alpha=1 - self.momentum)
        self.updates.add_(1)

    def moments(self) -> tuple[Tensor, Tensor]:
        """(mu, Sigma) in float64, computed on the device (no host read of the update count)."""
        correction = 1 - self.momentum ** self.updates.double()
        mean = self.first / correction
        return mean, self.second / correction - torch.outer(mean, mean)


class PhiS(nn.Module):
    """`phi_s`: y = (x - mu) W^T with W = (1/alpha) H[:, :d] U^T, (n, d), cached in `matrix` (module docstring)."""

    def __init__(self, dim: int, momentum: float, refresh_every: int = 1):
        super().__init__()
        self.out_dim = hadamard_order(dim)
        self.refresh_every = refresh_every
        self.moments = RunningCovariance(dim, momentum)
        self._host_updates: int | None = None  # moments.updates as a number, read once (after a load), then counted
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "_host_updates", None))
        # the first d columns of H: the padded coordinates are zeros
        self.register_buffer("hadamard", hadamard(self.out_dim)[:, :dim].contiguous(), persistent=False)
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("matrix", torch.eye(self.out_dim, dim))  # the raw target, padded, until an update
        self.register_buffer("scale", torch.ones(()))  # alpha
        self.register_buffer("basis", torch.eye(dim, dtype=torch.float64))  # U, which the next one follows

    @torch.no_grad()
    def update(self, rows: Tensor) -> None:
        """Add `rows` to the moments; recompute the transform when `refreshes(updates)` says so."""
        if self._host_updates is None:
            self._host_updates = int(self.moments.updates)
        self.moments.update(rows)
        self._host_updates += 1
        if refreshes(self._host_updates, self.refresh_every):
            self._refresh()

    def _refresh(self) -> None:
        mean, covariance = self.moments.moments()
        # float32: LAPACK's float64 eigensolver takes seconds for a 1280-d covariance on a CPU, float32 ~0.4 s
        try:
            eigenvalues, vectors = torch.linalg.eigh(covariance.float())
        except torch.linalg.LinAlgError:  # float32's solver gives up on some rank-deficient covariances
            eigenvalues, vectors = torch.linalg.eigh(covariance)
        eigenvalues, vectors = eigenvalues.double(), align_basis(self.basis, vectors.double())
        alpha = torch.sqrt(eigenvalues.clamp_min(0).sum() / self.out_dim + VARIANCE_EPS)
        self.basis.copy_(vectors)
        self.mean.copy_(mean)
        self.scale.copy_(alpha)
        self.matrix.copy_(self.hadamard @ vectors.T / alpha)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) @ self.matrix.T

    def restore(self, y: Tensor) -> Tensor:
        """x = mu + alpha^2 W^T y (W^T W = I / alpha^2); for padded widths, the projection onto the d
        coordinates that exist."""
        return y @ self.matrix * self.scale**2 + self.mean


def refreshes(updates: int, every: int) -> bool:
    """Whether the PHI-S transform is recomputed after update number `updates` (1, 2, ...): at every power of two
    up to `every`, then at every multiple of `every`; a pure function of the count, so a resumed run refreshes
    where an uninterrupted one does."""
    if updates % every == 0:
        return True
    return updates < every and updates & (updates - 1) == 0


def align_basis(previous: Tensor, vectors: Tensor) -> Tensor:
    """The columns of `vectors` (an eigenbasis) reordered and sign-flipped to follow `previous`'s: a column
    and a previous one that are each other's largest overlap |<u_i, v_j>| take the same place, the others fill
    the remaining places in their order, and every column turns to the side of the previous one in its place.
    Computed on the device, without reading anything back."""
    size = vectors.shape[1]
    overlap = (previous.T @ vectors).abs()  # [previous i, new j]
    best_new = overlap.argmax(1)
    best_previous = overlap.argmax(0)
    places = torch.arange(size, device=vectors.device)
    mutual = best_previous[best_new] == places  # previous place i and its best new column agree
    matched = best_new[best_previous] == places  # new column j and its best previous place agree
    free_places = torch.argsort(mutual.int(), stable=True)  # unmatched places first, in order
    free_columns = torch.argsort(matched.int(), stable=True)  # unmatched columns first, in order
    order = torch.empty_like(places).scatter_(0, free_places, free_columns)
    order = torch.where(mutual, best_new, order)
    aligned = vectors[:, order]
    signs = torch.sign((previous * aligned).sum(0))
    return aligned * torch.where(signs == 0, torch.ones_like(signs), signs)


# ----------------------------------------------------------------------------- Hadamard matrices


def hadamard(n: int) -> Tensor:
    """A normalised Hadamard matrix of order `n` (H H^T = I, entries +-1/sqrt(n)), float64: Sylvester's
    for powers of 2, else a Sylvester matrix (x) Paley's I or II. ValueError when no construction reaches n."""
    plan = _plan(n)
    if plan is None:
        raise ValueError(f"no Hadamard matrix of order {n} is built here; pad to hadamard_order({n})")
    core, kind = plan
    matrix = _sylvester(n // core)
    if kind != "sylvester":
        matrix = torch.kron(matrix, _paley_1(core) if kind == "paley_1" else _paley_2(core))
    return matrix / math.sqrt(n)


def hadamard_order(dim: int) -> int:
    """The smallest order >= `dim` that `hadamard` builds."""
    order = dim
    while _plan(order) is None:
        order += 1
    return order


def _plan(n: int) -> tuple[int, str] | None:
    """(core order p, kind) with n = 2^i p: p = 1 "sylvester", p = q + 1 for a prime q = 3 mod 4 "paley_1",
    p = 2 (q + 1) for a prime q = 1 mod 4 "paley_2"; the smallest such p, or None."""
    if n < 1:
        return None
    odd = n
    while odd % 2 == 0:
        odd //= 2
    if odd == 1:
        return 1, "sylvester"
    core = odd
    while core <= n:
        if _is_prime(core - 1) and (core - 1) % 4 == 3:
            return core, "paley_1"
        if core % 2 == 0 and _is_prime(core // 2 - 1) and (core // 2 - 1) % 4 == 1:
            return core, "paley_2"
        core *= 2
    return None


def _sylvester(n: int) -> Tensor:
    """The +-1 Sylvester matrix of order n (a power of 2): H_2k = [[H_k, H_k], [H_k, -H_k]]."""
    matrix = torch.ones(1, 1, dtype=torch.float64)
    step = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while matrix.shape[0] < n:
        matrix = torch.kron(step, matrix)
    return matrix


def _jacobsthal(q: int) -> Tensor:
    """Q_ij = chi(i - j mod q), chi the Legendre symbol modulo the prime q (0 at 0)."""
    chi = torch.tensor(
        [0.0] + [1.0 if pow(a, (q - 1) // 2, q) == 1 else -1.0 for a in range(1, q)], dtype=torch.float64
    )
    index = torch.arange(q)
    return chi[(index[:, None] - index[None, :]) % q]


def _conference(q: int, sign: float) -> Tensor:
    """[[0, 1^T], [sign 1, Q]]: Paley's conference matrix of order q + 1 (S S^T = q I)."""
    matrix = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    matrix[0, 1:] = 1.0
    matrix[1:, 0] = sign
    matrix[1:, 1:] = _jacobsthal(q)
    return matrix


def _paley_1(p: int) -> Tensor:
    """Order p = q + 1, q = 3 mod 4: H = I + S, S antisymmetric."""
    return torch.eye(p, dtype=torch.float64) + _conference(p - 1, -1.0)


def _paley_2(p: int) -> Tensor:
    """Order p = 2 (q + 1), q = 1 mod 4: H = S (x) [[1, 1], [1, -1]] + I (x) [[1, -1], [-1, -1]], S symmetric."""
    conference = _conference(p // 2 - 1, 1.0)
    plus = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(conference, plus) + torch.kron(torch.eye(p // 2, dtype=torch.float64), zero)


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % k for k in range(2, math.isqrt(n) + 1))
