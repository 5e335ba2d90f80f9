"""Laplace-LoRA: a post-hoc Gaussian over the LoRA factors of a MAP run, as a Pyro guide.

(This is the Laplace *approximation* of ``method=laplace``; the Laplace *prior* family is ``prior=laplace`` in
:mod:`blob_pyro.priors`.) After ``method=map`` has trained an AutoDelta point θ* of every LoRA factor, the
posterior is approximated by ``N(θ*, P⁻¹)`` with the precision

    P = GGN(θ*) + δ·I,        GGN = Σ_n J_nᵀ (diag p_n − p_n p_nᵀ) J_n

over the Laplace sites (all LoRA factors, or those of the last LoRA module), where J_n (K, D) is the Jacobian of
example n's logits with respect to the flattened factors and p_n its softmax: the exact generalised Gauss-Newton
of the Categorical likelihood over the training split, ``"diag"`` (its diagonal), ``"full"`` (the D×D matrix,
for small D) or ``"kfac"`` (per LoRA factor W (d_out, d_in), a Kronecker product H ⊗ Q of a d_out×d_out and a
d_in×d_in matrix, block-diagonal across factors; see :func:`kfac`). The prior precision δ maximises the Laplace
estimate of the log marginal likelihood

    log p(D | δ) ≈ log p(D | θ*) − ½ δ ‖θ*‖² + ½ D log δ − ½ log det(GGN + δ I)     (+ constants)

which, in terms of the GGN's eigenvalues e_i (its diagonal for ``"diag"``, the products λ_i μ_j of H's and Q's
eigenvalues for ``"kfac"``), has the unique stationary point
Σ_i e_i / (e_i + δ) = δ ‖θ*‖² (MacKay's effective number of parameters γ): a root found by bisection in log δ::

    record = fit_laplace(run.model, run.guide, run.train, hessian="diag", subset="all")   # a LaplaceGuide
    run.guide = record.guide                 # predict / evaluate / ArviZ / ppc draw from N(θ*, P⁻¹)
    record.info["prior_precision"], record.info["marglik_trace"]

The guide samples each Laplace site from ``Normal(θ*, P^-½)`` (``"diag"``: Flipout applies, the entries being
independent), every Laplace site jointly from one ``MultivariateNormal`` (``"full"``) or each factor as
θ* + U_H (S ⊙ E) U_Qᵀ in the eigenbases of H and Q (``"kfac"``: E standard normal, S_ij = (λ_i μ_j + δ)^-½,
the eigenvalues of H and Q, no D×D matrix formed); ``"full"`` and ``"kfac"`` draw once per batch,
since Flipout's sign flips diag(s) ΔW diag(r) keep a covariance only when it is diagonal. The other sites stay at
θ* (``Delta``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch

from .errors import ConfigError, RunError

__all__ = ["LaplaceGuide", "LaplaceFit", "HESSIANS", "SUBSETS", "PREDICTIVES", "LAPLACE_FILE", "FULL_MAX_PARAMETERS",
           "laplace_sites", "example_jacobian", "ggn", "kfac", "kfac_eigen", "log_marglik", "tune_prior_precision",
           "fit_laplace"]

HESSIANS = ("diag", "full", "kfac")
SUBSETS = ("all", "last_layer")
PREDICTIVES = ("glm", "sample")
"""How a :class:`LaplaceGuide` predicts: ``"glm"``, the network linearised at θ* (:mod:`blob_pyro.laplace_glm`), or
``"sample"``, the network run on weight draws from the guide (:func:`blob_pyro.predictive.posterior_logits`)."""
LAPLACE_FILE = "laplace.json"
FULL_MAX_PARAMETERS = 8192
"""Largest number of Laplace parameters for ``hessian="full"`` (a D×D float64 matrix: 512 MiB at this D)."""


_KFAC_PARTS = ("h_values", "h_vectors", "q_values", "q_vectors")


def _tree_set(root: torch.nn.Module, dotted: str, tensor: torch.Tensor) -> None:
    """Register ``tensor`` as a buffer at the dotted path ``dotted`` below ``root`` (making empty modules)."""
    *path, leaf = dotted.split(".")
    for part in path:
        if not hasattr(root, part):
            root.add_module(part, torch.nn.Module())
        root = getattr(root, part)
    root.register_buffer(leaf, tensor)


def _tree_get(root: torch.nn.Module, dotted: str) -> torch.Tensor:
    for part in dotted.split("."):
        root = getattr(root, part)
    return root


def laplace_sites(model, subset: str = "all") -> list:
    """The sites the Laplace approximation covers: every LoRA factor, or those of the last LoRA module."""
    if subset not in SUBSETS:
        raise ConfigError(f"laplace_subset must be one of {', '.join(SUBSETS)}; got {subset!r}")
    if subset == "all":
        return list(model.sites)
    last = model.sites[-1].module_path
    return [s for s in model.sites if s.module_path == last]


class LaplaceGuide(torch.nn.Module):
    """``q = N(θ*, P⁻¹)`` over the Laplace sites, ``Delta(θ*)`` elsewhere: a guide for :class:`BlobModel`.

    Buffers (``state_dict``): ``loc.<site>`` (θ*, every site), ``precision.<site>`` (``"diag"``: P's diagonal,
    the factor's shape), ``precision_matrix`` (``"full"``: (D, D) over the Laplace sites flattened in order) or
    ``kfac.<site>.{h_values, h_vectors, q_values, q_vectors}`` (``"kfac"``: the eigendecompositions of the factor's
    H (d_out,), (d_out, d_out) and Q (d_in,), (d_in, d_in), float64; P = H ⊗ Q + δ I over the factor flattened
    row-major), and ``prior_precision`` (δ, a scalar). A guide built with zero precision is a placeholder for
    :meth:`load_state_dict`.

    :param model: the :class:`~blob_pyro.model.BlobModel`.
    :param dict loc: θ* per site (every site of the model).
    :param precision: ``"diag"``: {site: P's diagonal}; ``"full"``: a (D, D) tensor; ``"kfac"``: {site:
        (h_values, h_vectors, q_values, q_vectors)} (:func:`kfac_eigen`); None: zeros (to load into).
    :param str hessian: ``"diag"``, ``"full"`` or ``"kfac"``.
    :param str subset: ``"all"`` or ``"last_layer"``.
    :param str predictive: ``"glm"`` or ``"sample"`` (:data:`PREDICTIVES`): what
        :func:`~blob_pyro.predictive.posterior_logits` does with this guide; not part of the state (config.json
        and laplace.json hold it).
    """

    def __init__(self, model, loc: dict, precision=None, *, hessian: str = "diag", subset: str = "all",
                 prior_precision: float = 1.0, predictive: str = "glm"):
        super().__init__()
        if hessian not in HESSIANS:
            raise ConfigError(f"laplace_hessian must be one of {', '.join(HESSIANS)}; got {hessian!r}")
        if predictive not in PREDICTIVES:
            raise ConfigError(f"laplace_predictive must be one of {', '.join(PREDICTIVES)}; got {predictive!r}")
        self.hessian, self.subset, self.predictive = hessian, subset, predictive
        self.site_names = [s.name for s in model.sites]
        self.laplace_names = [s.name for s in laplace_sites(model, subset)]
        self.shapes = {s.name: tuple(s.shape) for s in model.sites}
        self.loc = torch.nn.Module()
        for name in self.site_names:
            _tree_set(self.loc, name, loc[name].detach().float().clone())
        device = loc[self.site_names[0]].device
        if hessian == "diag":
            self.precision = torch.nn.Module()
            for name in self.laplace_names:
                value = precision[name] if precision is not None else torch.zeros(self.shapes[name], device=device)
                _tree_set(self.precision, name, value.detach().float().clone())
        elif hessian == "kfac":
            self.kfac = torch.nn.Module()
            for name in self.laplace_names:
                d_out, d_in = self.shapes[name]
                parts = precision[name] if precision is not None else (
                    torch.zeros(d_out, device=device), torch.eye(d_out, device=device),
                    torch.zeros(d_in, device=device), torch.eye(d_in, device=device))
                for key, value in zip(_KFAC_PARTS, parts):
                    _tree_set(self.kfac, f"{name}.{key}", value.detach().double().clone())
        else:
            size = self.num_parameters
            value = precision if precision is not None else torch.zeros(size, size, device=device)
            self.register_buffer("precision_matrix", value.detach().double().clone())
        self.register_buffer("prior_precision", torch.tensor(float(prior_precision), dtype=torch.float64))

    @property
    def num_parameters(self) -> int:
        """D, the number of entries under the Laplace approximation."""
        return sum(math.prod(self.shapes[n]) for n in self.laplace_names)

    # --- the guide ----------------------------------------------------------------------------
    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        out = {}
        joint = self._joint_draw() if self.hessian == "full" else None
        for name in self.site_names:
            loc = _tree_get(self.loc, name)
            if name not in self.laplace_names:
                fn = dist.Delta(loc, event_dim=loc.dim())
            elif joint is not None:
                fn = dist.Delta(joint[name], event_dim=loc.dim())
            elif self.hessian == "kfac":
                fn = dist.Delta(self._kfac_draw(name), event_dim=loc.dim())
            else:
                fn = dist.Normal(loc, _tree_get(self.precision, name).rsqrt()).to_event(loc.dim())
            out[name] = pyro.sample(name, fn)
        return out

    def _joint_draw(self) -> dict[str, torch.Tensor]:
        flat = torch.cat([_tree_get(self.loc, n).reshape(-1) for n in self.laplace_names]).double()
        z = pyro.sample("laplace_joint", dist.MultivariateNormal(flat, precision_matrix=self.precision_matrix),
                        infer={"is_auxiliary": True}).float()
        out, start = {}, 0
        for name in self.laplace_names:
            size = math.prod(self.shapes[name])
            out[name] = z[start:start + size].reshape(self.shapes[name])
            start += size
        return out

    def kfac_parts(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``"kfac"``: (h_values, h_vectors, q_values, q_vectors) of Laplace site ``name``."""
        return tuple(_tree_get(self.kfac, f"{name}.{key}") for key in _KFAC_PARTS)

    def _kfac_scale(self, name: str) -> torch.Tensor:
        """(d_out, d_in): (λ_i μ_j + δ)^-½, the posterior std along the eigenvector u_i ⊗ v_j."""
        h_values, _, q_values, _ = self.kfac_parts(name)
        return (torch.outer(h_values, q_values) + self.prior_precision).rsqrt()

    def _kfac_draw(self, name: str) -> torch.Tensor:
        # vec_row(U_H M U_Qᵀ) = (U_H ⊗ U_Q) vec_row(M): with M = S ⊙ E, E standard normal, the draw has covariance
        # (U_H ⊗ U_Q) diag(S²) (U_H ⊗ U_Q)ᵀ = (H ⊗ Q + δI)⁻¹ without forming the Kronecker product
        _, h_vectors, _, q_vectors = self.kfac_parts(name)
        scale = self._kfac_scale(name)
        noise = pyro.sample(f"laplace_noise.{name}", dist.Normal(torch.zeros_like(scale), 1.0).to_event(2),
                            infer={"is_auxiliary": True})
        loc = _tree_get(self.loc, name)
        return loc + (h_vectors @ (scale * noise) @ q_vectors.T).to(loc.dtype)

    # --- summaries (what guides.guide_std, ArviZ and describe read) ---------------------------
    @torch.no_grad()
    def median(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return {n: _tree_get(self.loc, n).detach() for n in self.site_names}

    @torch.no_grad()
    def std(self) -> dict[str, torch.Tensor]:
        """Marginal posterior std of every entry, per site (0 off the Laplace sites)."""
        out = {n: torch.zeros(self.shapes[n], device=self.prior_precision.device) for n in self.site_names}
        if self.hessian == "diag":
            for n in self.laplace_names:
                out[n] = _tree_get(self.precision, n).rsqrt()
            return out
        if self.hessian == "kfac":  # Var(W_kl) = Σ_ij U_H[k,i]² U_Q[l,j]² / (λ_i μ_j + δ), the inverse's diagonal
            for n in self.laplace_names:
                _, h_vectors, _, q_vectors = self.kfac_parts(n)
                var = h_vectors.square() @ self._kfac_scale(n).square() @ q_vectors.square().T
                out[n] = var.sqrt().float()
            return out
        var = torch.linalg.inv(self.precision_matrix).diagonal().float()
        start = 0
        for n in self.laplace_names:
            size = math.prod(self.shapes[n])
            out[n] = var[start:start + size].sqrt().reshape(self.shapes[n])
            start += size
        return out

    def describe(self) -> str:
        return (f"Laplace N(MAP, (GGN + delta I)^-1), hessian={self.hessian}, subset={self.subset}, "
                f"delta={float(self.prior_precision):.4g}, predictive={self.predictive}")


# ---- curvature ------------------------------------------------------------------------------
def example_jacobian(model, point: dict, names: list, batch: dict) -> tuple[torch.Tensor, list, torch.Tensor]:
    """(logits (K,), present options, J (K, D) float64) of the one example in ``batch`` at ``point``.

    One forward pass with the factors ``point`` bound to their layers (``names``, the Laplace sites, are the ones
    differentiated; no Flipout), then one backward pass per present option k for J's row k = ∂f_k/∂θ over
    ``names`` flattened in order. Absent options (logit −inf) keep a zero row. The caller sets eval mode.
    """
    from .lora import bind_values

    theta = {n: point[n].detach().clone().requires_grad_(True) for n in names}
    with torch.enable_grad(), bind_values(model.sites, {**point, **theta}):
        logits = model.head.logits(model.network, batch)[0]  # (K,)
        present = torch.isfinite(logits).nonzero().reshape(-1).tolist()
        size = sum(t.numel() for t in theta.values())
        jac = torch.zeros(logits.shape[0], size, dtype=torch.float64, device=logits.device)
        for k in present:
            grads = torch.autograd.grad(logits[k], [theta[n] for n in names], retain_graph=True, allow_unused=True)
            jac[k] = torch.cat([(g if g is not None else torch.zeros_like(theta[n])).reshape(-1)
                                for g, n in zip(grads, names)])
    return logits.detach(), present, jac


def ggn(model, point: dict, sites: list, examples, *, hessian: str = "diag", progress: bool = False):
    """(GGN, log-likelihood) of the Categorical likelihood at ``point`` over ``examples``, exactly.

    For each example: one forward pass at ``point`` (the guide's θ*, bound to every LoRA layer, no Flipout, no
    dropout), then one backward pass per present option k for J_n's row k, and GGN += J_nᵀ (diag p − p pᵀ) J_n.
    Examples go one at a time: the squares need per-example Jacobians, which a batched backward would sum.

    :returns: GGN (``"diag"``: (D,) float64; ``"full"``: (D, D)) over ``sites`` flattened in order, and
        Σ_n log p(y_n | x_n, θ*) (float).
    """
    examples = list(getattr(examples, "examples", examples))
    names = [s.name for s in sites]
    size = sum(point[n].numel() for n in names)
    device = point[names[0]].device
    acc = torch.zeros(size, dtype=torch.float64, device=device) if hessian == "diag" else \
        torch.zeros(size, size, dtype=torch.float64, device=device)
    loglik = 0.0
    was_training = model.network.training
    model.network.eval()  # the curvature of the network the MAP predicts with: no (LoRA) dropout
    if progress:
        from tqdm.auto import tqdm

        examples = tqdm(examples, desc=f"Laplace GGN ({hessian})", dynamic_ncols=True, leave=False)
    try:
        for example in examples:
            batch = model.head.collate([example], device)
            logits, present, jac = example_jacobian(model, point, names, batch)
            jac = jac[present]  # (K', D)
            logp = torch.log_softmax(logits.double()[present], dim=-1)
            p = logp.exp()
            lam = torch.diag(p) - torch.outer(p, p)
            loglik += float(logp[present.index(int(batch["labels"][0]))])
            if hessian == "diag":
                acc += (jac * (lam @ jac)).sum(0)
            else:
                acc += jac.T @ lam @ jac
    finally:
        model.network.train(was_training)
    return acc, loglik


def kfac(model, point: dict, sites: list, examples, *, batch_size: int = 8, progress: bool = False):
    """({site: (H, Q)}, log-likelihood, {module path: positions}): KFAC of the Categorical likelihood's GGN at ``point``.

    A LoRA factor W (d_out, d_in) is a linear map applied at every position t of example n (its tokens, and for an
    encoder's multiple choice every option's sequence): y_nt = W a_nt. Factor A's inputs a are the LoRA layer's
    inputs x and its outputs h = A x; factor B's inputs are h and its outputs y = B h (the LoRA scaling s then
    multiplies y, so y's gradient carries it). With g_nct = ∂(l_ncᵀ f_n)/∂y_nt for the columns l_nc of a square
    root of Λ_n = diag p_n − p_n p_nᵀ, the exact GGN block is Σ_n Σ_c (Σ_t g_nct ⊗ a_nt)(Σ_t g_nct ⊗ a_nt)ᵀ
    (row-major vec(W)). **KFAC-expand** (Eschenhagen et al., 2023, "Kronecker-Factored Approximate Curvature for
    Modern Neural Network Architectures"; curvlinops' ``KFACLinearOperator(kfac_approx="expand")`` with a summed
    loss, the backend of laplace-torch's ``"kron"`` for such layers) treats the positions as independent examples,
    dropping the cross terms t ≠ t', and factorises the sum into

        H = Σ_{n,c,t} g_nct g_nctᵀ   (d_out, d_out),        Q = (1/M) Σ_{n,t} a_nt a_ntᵀ   (d_in, d_in),

    M = Σ_n T_n the number of positions, so GGN_W ≈ H ⊗ Q; exact for one example at one position. Positions whose
    output gradient is zero for every c are left out of Q and M (curvlinops counts every position of the padded
    tensor): padding, so the fit does not depend on how examples are padded together into a batch, and positions
    the logits cannot see (an encoder's non-[CLS] queries in its last layer), which add nothing to the exact block.
    The square root is l_c = √p_c (e_c − p) (Σ_c l_c l_cᵀ = Λ exactly: no Monte Carlo labels), and one backward
    pass per option serves the whole batch, since each position's gradient of Σ_n l_ncᵀ f_n is its own example's.
    x, h, y and their gradients are read by hooks on the LoRA computation itself (:func:`blob_pyro.lora.tap_layers`),
    with the factors bound as in :func:`ggn` (no Flipout, no dropout).

    :param int batch_size: examples per forward pass (its graph is kept for the K backward passes).
    :returns: per site (H, Q) float64, Σ_n log p(y_n | x_n, θ*) (float), and M per LoRA module path.
    """
    from .lora import bind_values, tap_layers

    examples = list(getattr(examples, "examples", examples))
    names = [s.name for s in sites]
    device = point[names[0]].device
    by_path: dict[str, dict] = {}
    for s in sites:
        by_path.setdefault(s.module_path, {})[s.factor] = s
    layers = {path: next(iter(f.values())).layer for path, f in by_path.items()}
    grams = {s.name: torch.zeros(s.shape[0], s.shape[0], dtype=torch.float64, device=device) for s in sites}
    inputs = {s.name: torch.zeros(s.shape[1], s.shape[1], dtype=torch.float64, device=device) for s in sites}
    positions = dict.fromkeys(by_path, 0)
    calls: list[dict] = []  # this batch's LoRA applications: path, x, h and which positions move the logits
    recording = {"open": False}

    def add_gram(acc: torch.Tensor, g: torch.Tensor) -> None:
        g = g.detach().reshape(-1, g.shape[-1]).double()
        acc.add_(g.T @ g)

    def tap(path, x, h, y):
        if not recording["open"]:  # a checkpointed block recomputed during backward: already recorded
            return
        call = {"path": path, "x": x.detach(), "h": h.detach(),
                "used": torch.zeros(y.shape[:-1], dtype=torch.bool, device=y.device)}
        calls.append(call)
        factors = by_path[path]
        if "A" in factors and h.requires_grad:
            h.register_hook(lambda g, acc=grams[factors["A"].name]: add_gram(acc, g))

        site_b = factors.get("B")

        def on_output(g, call=call):
            call["used"] |= (g != 0).any(-1)
            if site_b is not None:
                add_gram(grams[site_b.name], g)

        if y.requires_grad:
            y.register_hook(on_output)

    loglik = 0.0
    was_training = model.network.training
    model.network.eval()  # the curvature of the network the MAP predicts with: no (LoRA) dropout
    starts = range(0, len(examples), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="Laplace KFAC", dynamic_ncols=True, leave=False)
    try:
        for start in starts:
            batch = model.head.collate(examples[start:start + batch_size], device)
            theta = {n: point[n].detach().clone().requires_grad_(True) for n in names}
            calls.clear()
            with torch.enable_grad(), bind_values(model.sites, {**point, **theta}), tap_layers(layers, tap):
                recording["open"] = True
                try:
                    logits = model.head.logits(model.network, batch)  # (B, K), -inf at absent options
                finally:
                    recording["open"] = False
                logp = torch.log_softmax(logits.detach().double(), dim=-1)
                p = logp.exp()  # 0 at absent options
                loglik += float(logp.gather(1, batch["labels"].reshape(-1, 1)).sum())
                f = torch.where(torch.isfinite(logits), logits, torch.zeros_like(logits))
                live = [c for c in range(p.shape[1]) if bool((p[:, c] > 0).any())]
                for i, c in enumerate(live):
                    direction = -p * p[:, c:c + 1].sqrt()
                    direction[:, c] += p[:, c].sqrt()  # l_c = √p_c (e_c − p), per example
                    torch.autograd.grad((f * direction.to(f.dtype)).sum(), list(theta.values()),
                                        retain_graph=i < len(live) - 1, allow_unused=True)
            for call in calls:
                used = call["used"].reshape(-1)
                positions[call["path"]] += int(used.sum())
                for factor, key in (("A", "x"), ("B", "h")):
                    if factor in by_path[call["path"]]:
                        a = call[key].reshape(-1, call[key].shape[-1])[used].double()
                        inputs[by_path[call["path"]][factor].name].add_(a.T @ a)
            calls.clear()
    finally:
        model.network.train(was_training)
    factors = {s.name: (grams[s.name], inputs[s.name] / max(positions[s.module_path], 1)) for s in sites}
    return factors, loglik, positions


def kfac_eigen(h: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h_values, h_vectors, q_values, q_vectors): eigendecompositions of the PSD factors H and Q.

    Eigenvalues are clamped at 0 (round-off leaves tiny negative ones); H ⊗ Q has eigenvalues λ_i μ_j with
    eigenvectors u_i ⊗ v_j, so log det(H ⊗ Q + δI) = Σ_ij log(λ_i μ_j + δ).
    """
    h_values, h_vectors = torch.linalg.eigh(h.double())
    q_values, q_vectors = torch.linalg.eigh(q.double())
    return h_values.clamp_min(0), h_vectors, q_values.clamp_min(0), q_vectors


# ---- the marginal likelihood --------------------------------------------------------------------
def log_marglik(delta: float, eigenvalues: torch.Tensor, sq_norm: float, loglik: float) -> float:
    """Laplace's log p(D | δ) up to constants, from the GGN's eigenvalues (or diagonal), ‖θ*‖² and log p(D | θ*)::

        log p(D | θ*) − ½ δ ‖θ*‖² + ½ D log δ − ½ Σ_i log(e_i + δ)
    """
    e = eigenvalues.double()
    return float(loglik - 0.5 * delta * sq_norm + 0.5 * e.numel() * math.log(delta)
                 - 0.5 * torch.log(e + delta).sum())


def tune_prior_precision(eigenvalues: torch.Tensor, sq_norm: float, loglik: float, *, lo: float = 1e-8,
                         hi: float = 1e8, steps: int = 80) -> tuple[float, list[dict]]:
    """The δ in [lo, hi] maximising :func:`log_marglik`, and the bisection's trace ``[{delta, marglik}]``.

    d/dδ log p(D | δ) = (γ(δ) − δ ‖θ*‖²) / (2δ) with γ(δ) = Σ e_i / (e_i + δ) falling and δ ‖θ*‖² rising in δ: one
    sign change, so the root (or the bound it lies beyond) is the maximum; bisection in log δ finds it.
    """
    e = eigenvalues.double().clamp_min(0)  # round-off can leave tiny negative eigenvalues of a PSD matrix

    def slope(log_delta: float) -> float:
        d = math.exp(log_delta)
        return float((e / (e + d)).sum()) - d * sq_norm

    a, b = math.log(lo), math.log(hi)
    trace = []
    if slope(b) >= 0:
        return hi, [{"delta": hi, "marglik": log_marglik(hi, e, sq_norm, loglik)}]
    if slope(a) <= 0:
        return lo, [{"delta": lo, "marglik": log_marglik(lo, e, sq_norm, loglik)}]
    for _ in range(steps):
        mid = 0.5 * (a + b)
        trace.append({"delta": math.exp(mid), "marglik": log_marglik(math.exp(mid), e, sq_norm, loglik)})
        if slope(mid) > 0:
            a = mid
        else:
            b = mid
    delta = math.exp(0.5 * (a + b))
    return delta, trace


# ---- the post-hoc step ------------------------------------------------------------------------
@dataclass
class LaplaceFit:
    guide: LaplaceGuide
    info: dict  # what laplace.json holds


def _peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_gpu_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20}
    try:
        import resource

        return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    except (ImportError, OSError):  # no resource module (Windows)
        return {}


def fit_laplace(model, guide, data, *, hessian: str = "diag", subset: str = "all", batch_size: int = 8,
                predictive: str = "glm", progress: bool = False) -> LaplaceFit:
    """Fit the Laplace posterior around ``guide``'s MAP point on ``data`` (the training split).

    ``guide`` must be a point estimate (AutoDelta, as ``method=map`` trains): RunError otherwise. The prior
    precision starts at the model's prior (1/prior_scale², reported as ``marglik_at_map_prior``) and is tuned by
    :func:`tune_prior_precision`. ``batch_size``: examples per pass of ``"kfac"`` (``"diag"``/``"full"`` need
    per-example Jacobians and go one at a time). ``predictive``: how the guide predicts (:data:`PREDICTIVES`).
    Returns the :class:`LaplaceGuide` and a JSON-able record.
    """
    from pyro.infer.autoguide import AutoDelta

    if not isinstance(guide, AutoDelta):
        raise RunError(f"the Laplace approximation needs a MAP point (an AutoDelta guide, method=map); "
                       f"got a {type(guide).__name__} guide")
    if hessian not in HESSIANS:
        raise ConfigError(f"laplace_hessian must be one of {', '.join(HESSIANS)}; got {hessian!r}")
    if predictive not in PREDICTIVES:
        raise ConfigError(f"laplace_predictive must be one of {', '.join(PREDICTIVES)}; got {predictive!r}")
    sites = laplace_sites(model, subset)
    size = sum(math.prod(s.shape) for s in sites)
    if hessian == "full" and size > FULL_MAX_PARAMETERS:
        raise ConfigError(f"laplace_hessian=full over {size} parameters needs a {size}x{size} matrix; use "
                          f"laplace_hessian=diag or laplace_subset=last_layer (full allows up to {FULL_MAX_PARAMETERS})")
    point = {k: v.detach() for k, v in guide.median().items()}
    device = point[sites[0].name].device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    positions = None
    if hessian == "kfac":
        factors, loglik, positions = kfac(model, point, sites, data, batch_size=batch_size, progress=progress)
        ggn_seconds = time.perf_counter() - start
        curvature = {name: kfac_eigen(h, q) for name, (h, q) in factors.items()}
        eigenvalues = torch.cat([torch.outer(e[0], e[2]).reshape(-1) for e in curvature.values()])
    else:
        curvature, loglik = ggn(model, point, sites, data, hessian=hessian, progress=progress)
        ggn_seconds = time.perf_counter() - start
        eigenvalues = curvature if hessian == "diag" else torch.linalg.eigvalsh(curvature)
    flat = torch.cat([point[s.name].reshape(-1) for s in sites]).double()
    sq_norm = float(flat.square().sum())
    prior_precision, trace = tune_prior_precision(eigenvalues, sq_norm, loglik)
    map_prior = 1.0 / float(model.prior.scale) ** 2 if hasattr(model.prior, "scale") else None
    if hessian == "diag":
        precision, offset = {}, 0
        for s in sites:
            n = math.prod(s.shape)
            precision[s.name] = (curvature[offset:offset + n] + prior_precision).reshape(s.shape).float()
            offset += n
    elif hessian == "kfac":
        precision = curvature
    else:
        precision = curvature + prior_precision * torch.eye(size, dtype=torch.float64, device=device)
    lap = LaplaceGuide(model, point, precision, hessian=hessian, subset=subset, prior_precision=prior_precision,
                       predictive=predictive)
    gamma = float((eigenvalues.clamp_min(0) / (eigenvalues.clamp_min(0) + prior_precision)).sum())
    info = {"hessian": hessian, "subset": subset, "predictive": predictive, "sites": [s.name for s in sites],
            "num_parameters": size,
            "num_examples": len(list(getattr(data, "examples", data))), "log_likelihood": loglik,
            "prior_precision": prior_precision, "marglik": log_marglik(prior_precision, eigenvalues, sq_norm, loglik),
            "map_prior_precision": map_prior,
            "marglik_at_map_prior": (log_marglik(map_prior, eigenvalues, sq_norm, loglik)
                                     if map_prior is not None else None),
            "effective_parameters": gamma, "marglik_trace": trace, "seconds": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - cpu_start,
            "ggn_seconds": ggn_seconds, **_peak_memory(device)}
    if positions is not None:
        info["kfac"] = {"approximation": "expand", "batch_size": batch_size, "positions": positions}
    return LaplaceFit(lap, info)


def placeholder_guide(model, *, hessian: str, subset: str, predictive: str = "glm") -> LaplaceGuide:
    """A :class:`LaplaceGuide` of the right shapes (zeros) for ``load_state_dict`` of a saved one."""
    loc = {s.name: torch.zeros(s.shape, device=s.device) for s in model.sites}
    return LaplaceGuide(model, loc, None, hessian=hessian, subset=subset, predictive=predictive)
