"""Laplace-LoRA: a post-hoc Gaussian over the LoRA factors of a MAP run, as a Pyro guide.

(This is the Laplace *approximation* of ``method=laplace``; the Laplace *prior* family is ``prior=laplace`` in
:mod:`blob_pyro.priors`.) After ``method=map`` has trained an AutoDelta point θ* of every LoRA factor, the
posterior is approximated by ``N(θ*, P⁻¹)`` with the precision

    P = GGN(θ*) + δ·I,        GGN = Σ_n J_nᵀ (diag p_n − p_n p_nᵀ) J_n

over the Laplace sites (all LoRA factors, or those of the last LoRA module), where J_n (K, D) is the Jacobian of
example n's logits with respect to the flattened factors and p_n its softmax: the exact generalised Gauss-Newton
of the Categorical likelihood over the training split, ``"diag"`` (its diagonal) or ``"full"`` (the D×D matrix,
for small D). The prior precision δ maximises the Laplace estimate of the log marginal likelihood

    log p(D | δ) ≈ log p(D | θ*) − ½ δ ‖θ*‖² + ½ D log δ − ½ log det(GGN + δ I)     (+ constants)

which, in terms of the GGN's eigenvalues e_i (its diagonal for ``"diag"``), has the unique stationary point
Σ_i e_i / (e_i + δ) = δ ‖θ*‖² (MacKay's effective number of parameters γ): a root found by bisection in log δ::

    record = fit_laplace(run.model, run.guide, run.train, hessian="diag", subset="all")   # a LaplaceGuide
    run.guide = record.guide                 # predict / evaluate / ArviZ / ppc draw from N(θ*, P⁻¹)
    record.info["prior_precision"], record.info["marglik_trace"]

The guide samples each Laplace site from ``Normal(θ*, P^-½)`` (``"diag"``: Flipout applies, the entries being
independent) or every Laplace site jointly from one ``MultivariateNormal`` (``"full"``: one joint draw per batch,
since Flipout's sign flips would break the correlations); the other sites stay at θ* (``Delta``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch

from .errors import ConfigError, RunError

__all__ = ["LaplaceGuide", "LaplaceFit", "HESSIANS", "SUBSETS", "LAPLACE_FILE", "FULL_MAX_PARAMETERS",
           "laplace_sites", "ggn", "log_marglik", "tune_prior_precision", "fit_laplace"]

HESSIANS = ("diag", "full")
SUBSETS = ("all", "last_layer")
LAPLACE_FILE = "laplace.json"
FULL_MAX_PARAMETERS = 8192
"""Largest number of Laplace parameters for ``hessian="full"`` (a D×D float64 matrix: 512 MiB at this D)."""


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
    the factor's shape) or ``precision_matrix`` (``"full"``: (D, D) over the Laplace sites flattened in order),
    and ``prior_precision`` (δ, a scalar). A guide built with zero precision is a placeholder for
    :meth:`load_state_dict`.

    :param model: the :class:`~blob_pyro.model.BlobModel`.
    :param dict loc: θ* per site (every site of the model).
    :param precision: ``"diag"``: {site: P's diagonal}; ``"full"``: a (D, D) tensor; None: zeros (to load into).
    :param str hessian: ``"diag"`` or ``"full"``.
    :param str subset: ``"all"`` or ``"last_layer"``.
    """

    def __init__(self, model, loc: dict, precision=None, *, hessian: str = "diag", subset: str = "all",
                 prior_precision: float = 1.0):
        super().__init__()
        if hessian not in HESSIANS:
            raise ConfigError(f"laplace_hessian must be one of {', '.join(HESSIANS)}; got {hessian!r}")
        self.hessian, self.subset = hessian, subset
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
        var = torch.linalg.inv(self.precision_matrix).diagonal().float()
        start = 0
        for n in self.laplace_names:
            size = math.prod(self.shapes[n])
            out[n] = var[start:start + size].sqrt().reshape(self.shapes[n])
            start += size
        return out

    def describe(self) -> str:
        return (f"Laplace N(MAP, (GGN + delta I)^-1), hessian={self.hessian}, subset={self.subset}, "
                f"delta={float(self.prior_precision):.4g}")


# ---- curvature ------------------------------------------------------------------------------
def ggn(model, point: dict, sites: list, examples, *, hessian: str = "diag", progress: bool = False):
    """(GGN, log-likelihood) of the Categorical likelihood at ``point`` over ``examples``, exactly.

    For each example: one forward pass at ``point`` (the guide's θ*, bound to every LoRA layer, no Flipout, no
    dropout), then one backward pass per present option k for J_n's row k, and GGN += J_nᵀ (diag p − p pᵀ) J_n.
    Examples go one at a time: the squares need per-example Jacobians, which a batched backward would sum.

    :returns: GGN (``"diag"``: (D,) float64; ``"full"``: (D, D)) over ``sites`` flattened in order, and
        Σ_n log p(y_n | x_n, θ*) (float).
    """
    from .lora import bind_values

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
            theta = {n: point[n].detach().clone().requires_grad_(True) for n in names}
            with torch.enable_grad(), bind_values(model.sites, {**point, **theta}):
                logits = model.head.logits(model.network, batch)[0]  # (K,)
                present = torch.isfinite(logits).nonzero().reshape(-1).tolist()
                rows = []
                for k in present:
                    grads = torch.autograd.grad(logits[k], [theta[n] for n in names], retain_graph=True,
                                                allow_unused=True)
                    rows.append(torch.cat([(g if g is not None else torch.zeros_like(theta[n])).reshape(-1)
                                           for g, n in zip(grads, names)]))
            jac = torch.stack(rows).double()  # (K', D)
            logp = torch.log_softmax(logits.detach().double()[present], dim=-1)
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


def fit_laplace(model, guide, data, *, hessian: str = "diag", subset: str = "all", progress: bool = False) -> LaplaceFit:
    """Fit the Laplace posterior around ``guide``'s MAP point on ``data`` (the training split).

    ``guide`` must be a point estimate (AutoDelta, as ``method=map`` trains): RunError otherwise. The prior
    precision starts at the model's prior (1/prior_scale², reported as ``marglik_at_map_prior``) and is tuned by
    :func:`tune_prior_precision`. Returns the :class:`LaplaceGuide` and a JSON-able record.
    """
    from pyro.infer.autoguide import AutoDelta

    if not isinstance(guide, AutoDelta):
        raise RunError(f"the Laplace approximation needs a MAP point (an AutoDelta guide, method=map); "
                       f"got a {type(guide).__name__} guide")
    if hessian not in HESSIANS:
        raise ConfigError(f"laplace_hessian must be one of {', '.join(HESSIANS)}; got {hessian!r}")
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
    else:
        precision = curvature + prior_precision * torch.eye(size, dtype=torch.float64, device=device)
    lap = LaplaceGuide(model, point, precision, hessian=hessian, subset=subset, prior_precision=prior_precision)
    gamma = float((eigenvalues.clamp_min(0) / (eigenvalues.clamp_min(0) + prior_precision)).sum())
    info = {"hessian": hessian, "subset": subset, "sites": [s.name for s in sites], "num_parameters": size,
            "num_examples": len(list(getattr(data, "examples", data))), "log_likelihood": loglik,
            "prior_precision": prior_precision, "marglik": log_marglik(prior_precision, eigenvalues, sq_norm, loglik),
            "map_prior_precision": map_prior,
            "marglik_at_map_prior": (log_marglik(map_prior, eigenvalues, sq_norm, loglik)
                                     if map_prior is not None else None),
            "effective_parameters": gamma, "marglik_trace": trace, "seconds": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - cpu_start,
            "ggn_seconds": ggn_seconds, **_peak_memory(device)}
    return LaplaceFit(lap, info)


def placeholder_guide(model, *, hessian: str, subset: str) -> LaplaceGuide:
    """A :class:`LaplaceGuide` of the right shapes (zeros) for ``load_state_dict`` of a saved one."""
    loc = {s.name: torch.zeros(s.shape, device=s.device) for s in model.sites}
    return LaplaceGuide(model, loc, None, hessian=hessian, subset=subset)
