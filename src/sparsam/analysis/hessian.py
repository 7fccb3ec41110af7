"""Hessian of the mean loss: products, top eigenvalues, trace and spectral density.

All functions see the same objective, the size-weighted mean loss over the batches given:
``H = Σ_b (n_b / N) H_b`` with ``H_b`` the Hessian of batch ``b``'s mean loss. They never change
the model's mode, never write its buffers and never change
its weights.

References:
    B. A. Pearlmutter, "Fast exact multiplication by the Hessian", Neural Computation 6(1), 1994.
    M. F. Hutchinson, "A stochastic estimator of the trace of the influence matrix for Laplacian
    smoothing splines", Communications in Statistics - Simulation and Computation 18(3), 1989.
    C. Lanczos, "An iteration method for the solution of the eigenvalue problem of linear
    differential and integral operators", J. Res. Nat. Bur. Standards 45, 1950.
    L. Lin, Y. Saad, C. Yang, "Approximating spectral densities of large matrices", SIAM Review
    58(1), 2016.
    B. Ghorbani, S. Krishnan, Y. Xiao, "An investigation into neural net optimization via Hessian
    eigenvalue density", ICML 2019.
    Z. Yao, A. Gholami, K. Keutzer, M. Mahoney, "PyHessian: neural networks through the lens of the
    Hessian", IEEE BigData 2020 (largest-magnitude power iteration; we default to Lanczos).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from ._common import (
    GeneratorLike,
    LossFn,
    Objective,
    check_nonnegative_float,
    check_positive_int,
    gaussian,
    make_generator,
    rademacher,
)

__all__ = [
    "SpectralDensity",
    "hessian_trace",
    "hessian_vector_product",
    "spectral_density",
    "top_eigenvalues",
]

Which = Literal["LA", "LM"]
Operator = Callable[[Tensor], Tensor]


# ---------------------------------------------------------------------------------------------
# Hessian-vector product
# ---------------------------------------------------------------------------------------------
def hessian_vector_product(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    v: Tensor | Sequence[Tensor],
    *,
    params: Iterable[Tensor] | None = None,
    device: torch.device | str | None = None,
    n_batches: int | None = None,
) -> Tensor | list[Tensor]:
    """Exact Hessian-vector product ``H v`` of the mean loss (Pearlmutter 1994).

    ```text
    H v = ∇_w ( ∇_w L(w) · v ),      L(w) = Σ_b (n_b / N) · L_b(w)
    ```

    computed by double backward (the gradient is built with ``create_graph=True``, then
    differentiated along ``v``), at the cost of about two backward passes per batch; the dense
    Hessian is never formed.

    Args:
        model: the model; its mode, buffers and weights are left as they are.
        loss_fn: ``loss_fn(outputs, targets)`` returning the mean loss of a batch.
        data: an iterable of ``(inputs, targets)`` batches (or one such pair); read once.
        v: one tensor per parameter (shapes of ``params``) or one flat vector of their total size.
        params: the parameters ``w`` (default: every parameter with ``requires_grad``). Others
            are held fixed: the result is the block of the Hessian for ``params``.
        device: where the batches are moved (default: the device of the first parameter).
        n_batches: use only the first ``n_batches`` batches (default: all).

    Returns:
        ``H v`` in the form of ``v``: a flat tensor, or a list of tensors.
    """
    obj = Objective(model, loss_fn, data, params=params, device=device, n_batches=n_batches, cache_graph=False)
    if isinstance(v, Tensor):
        if v.dim() != 1 or v.numel() != obj.numel:
            raise ValueError(
                f"v must be a flat vector of {obj.numel} entries (the number of parameters) or one tensor "
                f"per parameter, got a tensor of shape {tuple(v.shape)}"
            )
        return obj.hvp_flat(v.to(device=obj.device, dtype=obj.dtype))
    vs = list(v)
    if len(vs) != len(obj.params):
        raise ValueError(f"v has {len(vs)} tensors but there are {len(obj.params)} parameters")
    for i, (t, p) in enumerate(zip(vs, obj.params)):
        if not isinstance(t, Tensor) or t.shape != p.shape:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"v[{i}] must have the shape of its parameter {tuple(p.shape)}, got {got}")
    return obj.hvp([t.to(device=p.device, dtype=p.dtype) for t, p in zip(vs, obj.params)])


# ---------------------------------------------------------------------------------------------
# Krylov machinery on flat vectors
# ---------------------------------------------------------------------------------------------
class _Rows:
    """A growable matrix of orthonormal rows (the Lanczos basis), doubling its storage."""

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device) -> None:
        self.data = torch.empty((0, n), dtype=dtype, device=device)
        self.count = 0

    def append(self, v: Tensor) -> None:
        if self.count == self.data.shape[0]:
            grown = torch.empty(
                (max(8, 2 * self.count), self.data.shape[1]), dtype=self.data.dtype, device=self.data.device
            )
            grown[: self.count] = self.data[: self.count]
            self.data = grown
        self.data[self.count] = v
        self.count += 1

    @property
    def matrix(self) -> Tensor:
        return self.data[: self.count]


def _project_out(w: Tensor, *bases: Tensor | None) -> Tensor:
    """Remove from ``w`` its components along the rows of each basis (classical Gram-Schmidt,
    applied twice: "twice is enough", Parlett 1980)."""
    for _ in range(2):
        for q in bases:
            if q is not None and q.shape[0]:
                w = w - q.T.mv(q.mv(w))
    return w


def _tridiagonal(alphas: list[float], betas: list[float]) -> Tensor:
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas, dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    return t


def _select(theta: Tensor, which: Which) -> int:
    return int(torch.argmax(theta if which == "LA" else theta.abs()))


def _lanczos(
    op: Operator,
    q0: Tensor,
    max_iter: int,
    locked: Tensor | None,
    *,
    converged: Callable[[Tensor, Tensor, float], bool] | None = None,
) -> tuple[Tensor, Tensor, Tensor, bool]:
    r"""Lanczos tridiagonalisation with full reorthogonalisation, in the complement of ``locked``.

    Builds an orthonormal basis ``Q_m`` of the Krylov space ``span{q, Hq, …, Hᵐ⁻¹ q}`` and
    ``T_m = Q_mᵀ H Q_m`` (tridiagonal: ``alpha`` on the diagonal, ``beta`` off it). Each new vector
    is reorthogonalised against the whole basis and ``locked`` (so no ghost eigenvalues). Stops
    after ``max_iter`` steps, at an invariant subspace (``beta`` ~ 0, then ``T_m``'s eigenvalues
    are exact eigenvalues of ``H``), or when ``converged(theta, S, beta)`` says so.

    Returns ``(theta, S, Q, exact)``: the eigenvalues and eigenvectors of ``T_m``, the basis rows,
    and whether an invariant subspace was reached.
    """
    n = q0.numel()
    room = n - (0 if locked is None else locked.shape[0])
    basis = _Rows(n, q0.dtype, q0.device)
    alphas: list[float] = []
    betas: list[float] = []
    q = _project_out(q0, locked)
    q = q / q.norm()
    q_prev: Tensor | None = None
    beta_prev = 0.0
    scale = 0.0
    exact = False
    theta = S = torch.zeros(0, dtype=torch.float64)
    for j in range(min(max_iter, room)):
        basis.append(q)
        w = op(q)
        alpha = torch.dot(w, q)
        w = w - alpha * q
        if q_prev is not None:
            w = w - beta_prev * q_prev
        w = _project_out(w, basis.matrix, locked)
        beta_t = w.norm()
        # One host sync per iteration: the convergence test needs the numbers.
        alpha_f, beta = float(alpha), float(beta_t)
        alphas.append(alpha_f)
        scale = max(scale, abs(alpha_f), beta_prev)
        theta, S = torch.linalg.eigh(_tridiagonal(alphas, betas))
        eps = torch.finfo(q0.dtype).eps
        if j + 1 == room or beta <= 10 * eps * max(scale, beta) * math.sqrt(j + 1):
            exact = True
            break
        if converged is not None and converged(theta, S, beta):
            break
        betas.append(beta)
        q_prev, q, beta_prev = q, w / beta_t, beta
    return theta, S, basis.matrix, exact


def _lanczos_extreme(
    op: Operator, q0: Tensor, max_iter: int, locked: Tensor | None, tol: float, which: Which
) -> tuple[float, Tensor, float]:
    """Extreme Ritz pair of ``op`` in the complement of ``locked``: ``(theta, y, relative residual)``.

    Converged when ``||H y - theta y|| = beta_m |s_{m,i}| <= tol |theta|``; then some eigenvalue of
    ``H`` lies within ``tol |theta|`` of ``theta`` (Kahan-Parlett bound).
    """
    residual = [math.inf]

    def converged(theta: Tensor, S: Tensor, beta: float) -> bool:
        i = _select(theta, which)
        residual[0] = beta * abs(float(S[-1, i])) / max(abs(float(theta[i])), 1e-300)
        return residual[0] <= tol

    theta, S, Q, exact = _lanczos(op, q0, max_iter, locked, converged=converged)
    if exact:
        residual[0] = 0.0
    i = _select(theta, which)
    y = Q.T.mv(S[:, i].to(device=Q.device, dtype=Q.dtype))
    return float(theta[i]), y / y.norm(), residual[0]


def _power(op: Operator, q0: Tensor, max_iter: int, locked: Tensor | None, tol: float) -> tuple[float, Tensor, float]:
    """Power iteration in the complement of ``locked`` (projection deflation): the eigenvalue of
    largest magnitude. Stops when ``|lambda_t - lambda_{t-1}| <= tol |lambda_t|`` (PyHessian's
    criterion up to its ``1e-6`` in the denominator). Returns ``(lambda, v, last relative change)``."""
    v = _project_out(q0, locked)
    v = v / v.norm()
    lam: float | None = None
    change = math.inf
    for _ in range(max_iter):
        w = _project_out(op(v), locked)
        lam_new = float(torch.dot(v, w))  # one host sync per iteration (the stopping test)
        norm = w.norm()
        if float(norm) == 0.0:
            return 0.0, v, 0.0
        v = w / norm
        if lam is not None:
            change = abs(lam_new - lam) / max(abs(lam_new), 1e-300)
            if change <= tol:
                return lam_new, v, change
        lam = lam_new
    if lam is None:  # no iteration: top_eigenvalues checks n_iter >= 1
        raise ValueError(f"max_iter must be at least 1, got {max_iter}")
    return lam, v, change


def _stack(vectors: list[Tensor]) -> Tensor | None:
    return torch.stack(vectors) if vectors else None


def _orthonormal_append(locked: list[Tensor], y: Tensor) -> None:
    y = _project_out(y, _stack(locked))
    locked.append(y / y.norm())


# ---------------------------------------------------------------------------------------------
# Top eigenvalues
# ---------------------------------------------------------------------------------------------
def top_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    k: int = 1,
    *,
    which: Which = "LA",
    method: Literal["lanczos", "power"] = "lanczos",
    n_iter: int = 100,
    tol: float = 1e-3,
    generator: GeneratorLike = None,
    params: Iterable[Tensor] | None = None,
    device: torch.device | str | None = None,
    n_batches: int | None = None,
    cache_graph: bool | None = None,
    return_eigenvectors: bool = False,
) -> list[float] | tuple[list[float], list[Tensor]]:
    """The ``k`` top eigenvalues of the Hessian of the mean loss, largest first.

    **Which eigenvalues.** ``which="LA"`` (default): the largest *algebraic* eigenvalues
    ``λ₁ ≥ λ₂ ≥ …``, i.e. the ``λ_max`` of the sharpness
    literature; negative eigenvalues come last. ``which="LM"``: largest *magnitude*
    ``|λ₁| ≥ |λ₂| ≥ …`` (what PyHessian's power iteration returns; it can
    return a negative eigenvalue). The list is sorted in that order. At a minimum (``H`` positive
    semi-definite) both agree.

    **Methods.** One eigenpair per Krylov run; after each, the eigenvector is locked and the next run
    works in its orthogonal complement (deflation), so repeated eigenvalues are found as many times
    as they occur.

    - ``"lanczos"`` (default): Lanczos with full reorthogonalisation. A run stops when the Ritz
      residual ``‖H y − θ y‖ = β_m |s_mi| ≤ tol · |θ|`` (then an
      eigenvalue of ``H`` lies within ``tol · |θ|`` of ``θ``), or after ``n_iter`` products.
      Stores up to ``n_iter`` vectors of the parameters' size.
    - ``"power"``: power iteration with projection deflation; a run stops when the relative change
      of the Rayleigh quotient between iterations is ``<= tol`` (PyHessian's test). Finds
      largest-magnitude eigenvalues; for ``which="LA"`` it first finds ``μ``, the
      largest-magnitude one, and, unless ``k == 1`` and ``μ ≥ 0``, iterates on ``H + |μ| I``
      (whose largest-magnitude eigenvalues are ``H``'s largest algebraic ones, shifted), which
      converges more slowly.

    Args:
        model, loss_fn, data, params, device, n_batches: as in
            [`hessian_vector_product`][sparsam.analysis.hessian_vector_product].
        k: number of eigenvalues (``1 <= k <=`` number of parameters).
        which: ``"LA"`` (largest algebraic) or ``"LM"`` (largest magnitude).
        method: ``"lanczos"`` or ``"power"``.
        n_iter: maximum Hessian-vector products per eigenvalue.
        tol: relative tolerance of the stopping test (see Methods).
        generator: ``torch.Generator`` or int seed for the start vectors (default: seed 0).
        cache_graph: build the gradient graph once and reuse it for every product (default: when
            there is one batch). Faster; holds the graphs of all batches in memory.
        return_eigenvectors: also return the eigenvectors, as flat unit vectors.

    Returns:
        The eigenvalues as Python floats, largest first (and the eigenvectors). A run that did not
        meet ``tol`` within ``n_iter`` products issues a ``RuntimeWarning`` and returns its estimate.
    """
    check_positive_int("k", k)
    check_positive_int("n_iter", n_iter)
    check_nonnegative_float("tol", tol)
    if which not in ("LA", "LM"):
        raise ValueError(f"which must be 'LA' (largest algebraic) or 'LM' (largest magnitude), got which={which!r}")
    if method not in ("lanczos", "power"):
        raise ValueError(f"method must be 'lanczos' or 'power', got method={method!r}")
    obj = Objective(model, loss_fn, data, params=params, device=device, n_batches=n_batches, cache_graph=cache_graph)
    if k > obj.numel:
        raise ValueError(f"k must be at most the number of parameters ({obj.numel}), got k={k}")
    gen = make_generator(generator)

    def start() -> Tensor:
        return gaussian(obj.numel, gen, dtype=obj.dtype, device=obj.device)

    def report(residual: float, index: int) -> None:
        if residual > tol:
            warnings.warn(
                f"top_eigenvalues: eigenvalue {index + 1} did not reach tol={tol} within n_iter={n_iter} "
                f"products (relative {'residual' if method == 'lanczos' else 'change'} {residual:.3g})",
                RuntimeWarning,
                stacklevel=3,
            )

    values: list[float] = []
    locked: list[Tensor] = []
    try:
        if method == "lanczos":
            for i in range(k):
                theta, y, res = _lanczos_extreme(obj.hvp_flat, start(), n_iter, _stack(locked), tol, which)
                report(res, i)
                values.append(theta)
                _orthonormal_append(locked, y)
        else:
            hvp = obj.hvp_flat
            mu, y, change = _power(hvp, start(), n_iter, None, tol)
            report(change, 0)
            if which == "LM" or mu >= 0:  # mu >= 0 of largest magnitude is also the largest algebraic
                values.append(mu)
                _orthonormal_append(locked, y)
            # LA: shift by |mu| >= spectral radius, so that H + |mu| I >= 0 and its largest-magnitude
            # eigenvalues are H's largest algebraic ones, shifted
            shift = abs(mu) if which == "LA" and len(values) < k else 0.0

            def op(v: Tensor) -> Tensor:
                return hvp(v) + shift * v if shift else hvp(v)

            while len(values) < k:
                lam, y, change = _power(op, start(), n_iter, _stack(locked), tol)
                report(change, len(values))
                values.append(lam - shift)
                _orthonormal_append(locked, y)
    finally:
        obj.release()
    key = (lambda t: -t[0]) if which == "LA" else (lambda t: -abs(t[0]))
    pairs = sorted(zip(values, locked), key=key)
    eigenvalues = [float(v) for v, _ in pairs]
    if return_eigenvectors:
        return eigenvalues, [y for _, y in pairs]
    return eigenvalues


# ---------------------------------------------------------------------------------------------
# Trace
# ---------------------------------------------------------------------------------------------
def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    n_samples: int = 100,
    generator: GeneratorLike = None,
    params: Iterable[Tensor] | None = None,
    device: torch.device | str | None = None,
    n_batches: int | None = None,
    cache_graph: bool | None = None,
    batch_vectors: int = 1,
) -> float:
    """Hutchinson's estimate of the trace of the Hessian of the mean loss (Hutchinson 1989).

    ```text
    tr H ≈ (1/m) Σᵢ zᵢᵀ H zᵢ,      zᵢ ∈ {−1, +1}ⁿ i.i.d. Rademacher
    ```

    Unbiased; one Hessian-vector product per sample; the variance of one sample is
    ``2 (‖H‖_F² − Σ_j H_jj²)``, so the error shrinks as ``1/√m``.

    Args:
        n_samples: number of Rademacher vectors ``m``.
        batch_vectors: compute this many products in one vectorised double backward
            (``is_grads_batched``); much faster for small models, costs ``batch_vectors`` times the
            memory of one product. The estimate does not depend on it.
        generator, cache_graph, and the rest: as in
            [`top_eigenvalues`][sparsam.analysis.top_eigenvalues].

    Returns:
        The estimate, a Python float.
    """
    check_positive_int("n_samples", n_samples)
    check_positive_int("batch_vectors", batch_vectors)
    obj = Objective(model, loss_fn, data, params=params, device=device, n_batches=n_batches, cache_graph=cache_graph)
    gen = make_generator(generator)
    total = torch.zeros((), dtype=torch.float64, device=obj.device)
    try:
        done = 0
        while done < n_samples:
            b = min(batch_vectors, n_samples - done)
            # drawn one vector at a time, so the samples do not depend on batch_vectors
            Z = torch.stack([rademacher(obj.numel, gen, dtype=obj.dtype, device=obj.device) for _ in range(b)])
            total += (Z * obj.hvp_batched_flat(Z)).sum(dtype=torch.float64)
            done += b
    finally:
        obj.release()
    return float(total) / n_samples


# ---------------------------------------------------------------------------------------------
# Spectral density
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SpectralDensity:
    """An estimate of the Hessian's spectral density ``φ(t) = (1/n) Σᵢ δ(t − λᵢ)``.

    Attributes:
        nodes: Ritz values of all Lanczos runs, concatenated (the quadrature nodes).
        weights: their Gauss quadrature weights; each run's weights sum to ``1 / n_vectors``, all to 1.
        grid: points where the smoothed density is evaluated (increasing).
        density: the nodes/weights measure convolved with a Gaussian of standard deviation
            ``sigma``, on ``grid``; it integrates to 1 (up to the grid's truncation).
        sigma: the kernel width.
        n_params: the dimension ``n`` of the Hessian.
    """

    nodes: np.ndarray
    weights: np.ndarray
    grid: np.ndarray
    density: np.ndarray
    sigma: float
    n_params: int

    def mean(self) -> float:
        """``Σ_j w_j θ_j``, an unbiased estimate of ``tr(H) / n``."""
        return float(np.dot(self.weights, self.nodes))

    def trace(self) -> float:
        """The trace estimate implied by the density, ``n * mean()``."""
        return self.n_params * self.mean()

    def to_dict(self) -> dict[str, Any]:
        return {
            "nodes": self.nodes.tolist(),
            "weights": self.weights.tolist(),
            "grid": self.grid.tolist(),
            "density": self.density.tolist(),
            "sigma": self.sigma,
            "n_params": self.n_params,
        }

    @staticmethod
    def smooth(nodes: np.ndarray, weights: np.ndarray, grid: np.ndarray, sigma: float) -> np.ndarray:
        """``Σ_j w_j N(t; θ_j, σ²)`` at every ``t`` of ``grid``."""
        diff = (np.asarray(grid, dtype=np.float64)[:, None] - np.asarray(nodes, dtype=np.float64)[None, :]) / sigma
        return np.exp(-0.5 * diff**2).dot(np.asarray(weights, dtype=np.float64)) / (sigma * math.sqrt(2 * math.pi))


def spectral_density(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    n_iter: int = 100,
    n_vectors: int = 1,
    sigma: float | None = None,
    grid_size: int = 1000,
    generator: GeneratorLike = None,
    params: Iterable[Tensor] | None = None,
    device: torch.device | str | None = None,
    n_batches: int | None = None,
    cache_graph: bool | None = None,
) -> SpectralDensity:
    """Spectral density of the Hessian by stochastic Lanczos quadrature (Lin, Saad & Yang 2016;
    Ghorbani, Krishnan & Xiao 2019).

    For each of ``n_vectors`` start vectors ``v = z / √n`` (``z`` Rademacher, so
    ``‖v‖ = 1``), ``n_iter`` Lanczos steps (full reorthogonalisation) give
    ``T_m = S Θ Sᵀ``; the Gauss quadrature
    ``vᵀ f(H) v ≈ Σ_j S_1j² f(θ_j)`` with nodes ``θ_j`` and weights
    ``S_1j²`` (summing to 1) approximates the density, averaged over the vectors:

    ```text
    φ(t) ≈ (1/n_v) Σ_l Σ_j (S⁽ˡ⁾_1j)² · g_σ(t − θ⁽ˡ⁾_j),      l = 1 … n_v,  j = 1 … m
    ```

    with ``g_σ`` a Gaussian kernel. The mean of the measure is
    ``(1/n_v) Σ_l v_lᵀ H v_l``, Hutchinson's estimate of ``tr(H) / n``.

    Args:
        n_iter: Lanczos steps per vector ``m`` (stops earlier at an invariant subspace, e.g. when
            it exceeds the number of parameters; the quadrature is then exact).
        n_vectors: number of start vectors ``n_v``.
        sigma: kernel width (default: 1% of the range of the nodes; 1e-3 of their size, or 1, if
            the range is 0).
        grid_size: number of grid points, spread over ``[min node − 6σ, max node + 6σ]``.
        generator, cache_graph, and the rest: as in
            [`top_eigenvalues`][sparsam.analysis.top_eigenvalues].
    """
    check_positive_int("n_iter", n_iter)
    check_positive_int("n_vectors", n_vectors)
    check_positive_int("grid_size", grid_size)
    if grid_size < 2:
        raise ValueError(f"grid_size must be at least 2, got grid_size={grid_size}")
    if sigma is not None:
        check_nonnegative_float("sigma", sigma, positive=True)
    obj = Objective(model, loss_fn, data, params=params, device=device, n_batches=n_batches, cache_graph=cache_graph)
    gen = make_generator(generator)
    all_nodes: list[np.ndarray] = []
    all_weights: list[np.ndarray] = []
    try:
        for _ in range(n_vectors):
            z = rademacher(obj.numel, gen, dtype=obj.dtype, device=obj.device)
            theta, S, _, _ = _lanczos(obj.hvp_flat, z, n_iter, None)
            all_nodes.append(theta.numpy())
            all_weights.append(S[0].numpy() ** 2 / n_vectors)
    finally:
        obj.release()
    nodes = np.concatenate(all_nodes)
    weights = np.concatenate(all_weights)
    lo, hi = float(nodes.min()), float(nodes.max())
    if sigma is None:
        span = hi - lo
        sigma = 0.01 * span if span > 0 else (1e-3 * abs(hi) if hi != 0 else 1.0)
    grid = np.linspace(lo - 6 * sigma, hi + 6 * sigma, grid_size)
    density = SpectralDensity.smooth(nodes, weights, grid, sigma)
    return SpectralDensity(
        nodes=nodes, weights=weights, grid=grid, density=density, sigma=float(sigma), n_params=obj.numel
    )
