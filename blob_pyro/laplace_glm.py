"""The linearised (GLM) predictive of a Laplace posterior: logits ~ N(f(x), J(x) Σ J(x)ᵀ), drawn in logit space.

``method=laplace`` with ``laplace_predictive=glm`` (the default) predicts as Laplace-LoRA (Yang et al., ICLR 2024)
and laplace-torch's ``pred_type="glm"`` do: the network is linearised in the Laplace sites' parameters θ around the
MAP θ*, f_lin(x; θ) = f(x; θ*) + J(x)(θ − θ*), J(x) (K, D) the Jacobian of the K logits, so under θ ~ N(θ*, Σ) the
logits are exactly Gaussian, N(f(x; θ*), J(x) Σ J(x)ᵀ). The GGN the posterior was fitted with is the curvature of
this very linear model, so the two agree; running the full network on weight draws (``laplace_predictive=sample``)
also feeds it the second-order terms the GGN never saw (δA·δB of a LoRA layer), which on a large, mostly
prior-wide Σ wreck the prediction (docs/methods.md). The S = ``num_samples`` draws
logits_s = f + R ε_s (R Rᵀ = J Σ Jᵀ over the present options, ε_s standard normal) are averaged through the softmax as
every method's draws are, so predictions.safetensors, the metrics, MI and ``ppc`` read them unchanged::

    guide = fit_laplace(model, map_guide, train, hessian="kfac").guide   # a LaplaceGuide, predictive "glm"
    mean, cov = logit_moments(model, guide, batch)      # (B, K), (B, K, K); absent options: -inf, no variance
    logits = glm_logits(model, guide, batch, num_samples=10)              # (S, B, K)

J Σ Jᵀ per example and Laplace structure, never forming Σ beyond what the guide holds: ``diag``, Σ = diag(1/P);
``full``, Σ = P⁻¹ through P's Cholesky factor; ``kfac``, per site Σ = (U_H ⊗ U_Q) diag(1/(λ_i μ_j + δ))
(U_H ⊗ U_Q)ᵀ, so with the site's Jacobian rows as (d_out, d_in) matrices J_k and M_k = U_Hᵀ J_k U_Q,
(J Σ Jᵀ)_kl = Σ_ij M_k[i,j] M_l[i,j] / (λ_i μ_j + δ), summed over the sites (block-diagonal Σ). J comes from one
forward pass per example and one backward pass per present option (:func:`blob_pyro.laplace.example_jacobian`,
eval mode, no Flipout): per-example Jacobians that a batched backward would sum.
"""

from __future__ import annotations

import math

import torch

from .laplace import _tree_get, example_jacobian

__all__ = ["jacobians", "logit_covariance", "logit_moments", "sample_logits", "glm_logits", "linearised_logits"]


def _one(batch: dict, i: int) -> dict:
    """Example ``i`` of a collated batch as a batch of one (every head keeps the example first)."""
    return {k: v[i:i + 1] if torch.is_tensor(v) else v for k, v in batch.items()}


def jacobians(model, guide, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(f (B, K), J (B, K, D) float64): the logits at the guide's MAP and their Jacobian w.r.t. its Laplace sites.

    D runs over ``guide.laplace_names`` flattened in order (row-major per factor); rows of absent options (logit −inf)
    are zero. The network runs in eval mode (the MAP network the GGN was taken of: no LoRA dropout).
    """
    point = {k: v.detach() for k, v in guide.median().items()}
    names = guide.laplace_names
    modes = [(m, m.training) for m in model.network.modules()]  # per module: predict keeps LoRA dropout on
    model.network.eval()
    try:
        size = batch["labels"].shape[0]
        out = [example_jacobian(model, point, names, _one(batch, i)) for i in range(size)]
    finally:
        for module, mode in modes:
            module.training = mode
    return torch.stack([o[0] for o in out]), torch.stack([o[2] for o in out])


def _cholesky(guide) -> torch.Tensor:
    """Lower Cholesky factor of a ``full`` guide's precision, cached until the matrix changes (load_state_dict)."""
    matrix = guide.precision_matrix
    key = (matrix.data_ptr(), matrix._version)
    cached = getattr(guide, "_glm_cholesky", None)
    if cached is None or cached[0] != key:
        cached = (key, torch.linalg.cholesky(matrix))
        guide._glm_cholesky = cached
    return cached[1]


def logit_covariance(guide, jac: torch.Tensor) -> torch.Tensor:
    """(B, K, K) float64: J Σ Jᵀ for Jacobians ``jac`` (B, K, D) over ``guide``'s Laplace sites (see the module)."""
    jac = jac.double()
    if guide.hessian == "full":
        flat = jac.reshape(-1, jac.shape[-1])  # (B·K, D)
        half = torch.linalg.solve_triangular(_cholesky(guide), flat.T, upper=False)  # L⁻¹ Jᵀ: Σ = L⁻ᵀ L⁻¹
        half = half.reshape(-1, *jac.shape[:2])  # (D, B, K)
        return torch.einsum("dbk,dbl->bkl", half, half)
    cov = torch.zeros(jac.shape[0], jac.shape[1], jac.shape[1], dtype=torch.float64, device=jac.device)
    start = 0
    for name in guide.laplace_names:
        shape = guide.shapes[name]
        size = math.prod(shape)
        part = jac[:, :, start:start + size]
        start += size
        if guide.hessian == "diag":
            var = _tree_get(guide.precision, name).double().reciprocal().reshape(-1)
            cov += torch.einsum("bkd,bld,d->bkl", part, part, var)
        else:  # kfac: rotate each row into H's and Q's eigenbases, weight by the eigenvalues' 1/(λ_i μ_j + δ)
            h_values, h_vectors, q_values, q_vectors = guide.kfac_parts(name)
            inv = (torch.outer(h_values, q_values) + guide.prior_precision).reciprocal()
            rotated = h_vectors.T @ part.reshape(*part.shape[:2], *shape) @ q_vectors  # (B, K, d_out, d_in)
            cov += torch.einsum("bkij,blij,ij->bkl", rotated, rotated, inv)
    return cov


def logit_moments(model, guide, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (B, K), covariance (B, K, K) float64) of the GLM predictive's logits; −inf means, no variance, at
    absent options."""
    f, jac = jacobians(model, guide, batch)
    return f, logit_covariance(guide, jac)


def _root(cov: torch.Tensor) -> torch.Tensor:
    """(B, K, K) R with R Rᵀ = cov, for PSD ``cov`` that may be singular (zero rows of absent options): the
    symmetric eigendecomposition, eigenvalues clamped at 0 (a Cholesky factor would need a jitter)."""
    values, vectors = torch.linalg.eigh(cov)
    return vectors * values.clamp_min(0).sqrt().unsqueeze(-2)


def sample_logits(f: torch.Tensor, cov: torch.Tensor, num_samples: int, *, generator=None) -> torch.Tensor:
    """(S, B, K) draws f + R ε of N(f, cov) (``f`` (B, K), ``cov`` (B, K, K), R Rᵀ = cov), in ``f``'s dtype;
    absent options (f = −inf) stay −inf. ``generator``: torch's global one by default."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1 for draws, got {num_samples}")
    noise = torch.randn(num_samples, *f.shape, dtype=torch.float64, device=f.device, generator=generator)
    draws = f.double() + torch.einsum("bkl,sbl->sbk", _root(cov), noise)
    return torch.where(torch.isfinite(f), draws, f.double()).to(f.dtype)


def glm_logits(model, guide, batch: dict, *, num_samples: int) -> torch.Tensor:
    """(S, B, K) draws of the GLM predictive's logits (torch's global generator); absent options stay −inf."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1 for draws, got {num_samples}")
    return sample_logits(*logit_moments(model, guide, batch), num_samples)


def linearised_logits(f: torch.Tensor, jac: torch.Tensor, guide, draws: list) -> torch.Tensor:
    """(S, B, K): the linearised network f + J (θ_s − θ*) at S weight draws ``draws`` (each {site: value}, the guide's
    sites), from the MAP logits ``f`` (B, K) and Jacobians ``jac`` (B, K, D) of :func:`jacobians`: what the GLM
    predictive is for given weights (the ArviZ export pairs each parameter draw with its logits this way)."""
    point = guide.median()
    deltas = torch.stack([torch.cat([(d[n] - point[n]).reshape(-1) for n in guide.laplace_names])
                          for d in draws]).double().to(jac.device)  # (S, D)
    out = f.double() + torch.einsum("bkd,sd->sbk", jac.double(), deltas)
    return torch.where(torch.isfinite(f), out, f.double()).to(f.dtype)
