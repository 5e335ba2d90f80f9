"""Variational families over the Bayesian LoRA factors.

:class:`BlobGuide` is BLoB's guide: per factor a Gaussian ``Normal(loc, std)`` with
``std = rho**2`` (or ``softplus(rho)``), ``loc`` initialised from PEFT's init for that factor and
``rho ~ U(eps/sqrt(2), eps)``. ``covariance="lowrank"`` adds a rank-``k`` factor inside each
matrix (``LowRankMultivariateNormal``, covariance ``diag(std) (I + U Uᵀ) diag(std)``). Pyro's own
``AutoNormal`` and ``AutoDelta`` plug in through the same argument::

    guide = make_guide("blob", model)                  # the paper's mean-field guide
    guide = make_guide("lowrank", model, rank=4)       # low-rank-plus-diagonal per factor
    guide = make_guide("auto_delta", model)            # MAP
    guide = make_guide(functools.partial(AutoNormal, init_scale=1e-3), model)   # any builder
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions import constraints
from pyro.infer.autoguide import AutoDelta, AutoGuide, AutoNormal
from pyro.infer.autoguide.utils import deep_setattr
from pyro.nn import PyroModule, PyroParam
from torch.distributions.transforms import ReshapeTransform

__all__ = ["BlobGuide", "make_guide", "GUIDES", "DEFAULT_EPS", "guide_std"]

DEFAULT_EPS = 0.2
"""BLoB's ε when none is given: initial stds in [0.02, 0.04]. The paper's 0.05 (``preset=paper``) starts them at
[1.25e-3, 2.5e-3]; under the AdamW step the std parameter moves by about ``lr`` per step whatever its gradient's
size, so in a run of a few hundred steps the posterior width stays close to where ε starts it, and at 0.05 it is
too narrow to matter (docs/methods.md, "Which recipe calibrates")."""

# Floor on the low-rank guide's diagonal std s: the Woodbury terms scale like 1/s² and 1/s³ and overflow
# float32 in backward as s nears 1e-18, and below ~1e-19 s² leaves float32's normal range (the capacitance
# Cholesky fails). 1e-10 keeps s² ≥ 1e-20, far below any std that matters next to LoRA entries of ~1e-2.
# docs/numerics.md has the run that showed it.
_LOWRANK_MIN_STD = 1e-10


@dataclass(frozen=True)
class _Spec:
    name: str
    shape: tuple
    init: torch.Tensor


def deep_getattr(obj, key: str):
    """Follow a dotted site name through the nested PyroModules made by ``deep_setattr``."""
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _inv_softplus(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


class BlobGuide(AutoGuide):
    r"""BLoB's variational posterior over the Bayesian LoRA factors.

    For each Bayesian factor :math:`F` (``lora_A`` of shape (r, in) or ``lora_B`` of shape
    (out, r)), :math:`q(F) = \mathcal N(M, \Sigma)` with mean ``loc`` = M and std
    :math:`\Sigma = \rho^2` element-wise (``std_param="square"``, the paper's G²) or
    :math:`\mathrm{softplus}(\rho)`. ``rho`` starts at U(eps/√2, eps), so the initial std lies in
    [eps²/2, eps²] = [0.02, 0.04] for the default eps = 0.2 ([1.25e-3, 2.5e-3] for the paper's 0.05; softplus: rho
    is set so the std starts in
    the same range).

    **Why the posterior over the full weight is low-rank.** The adapted weight is
    :math:`W = W_0 + s\,BA` with frozen :math:`W_0`. With B deterministic and A Gaussian, every
    draw of W differs from its mean by :math:`s\,B\,\Delta A`, whose column space is the column
    space of B (dimension ≤ r): the covariance of vec(W) has rank ≤ r·in, however large out×in
    is. The same holds with A deterministic (row space of A) and, for ``both``, for each factor
    given the other. So the guide never stores an out×in covariance: it spends r·(in+out) means
    plus the stds of the Bayesian factor, as LoRA does, and the Gaussian prior on the factor
    induces a "low-rank prior" on the update.

    ``covariance="lowrank"`` adds correlations *inside* each factor: q(vec F) has covariance
    :math:`\mathrm{diag}(\sigma)\,(I + U U^\top)\,\mathrm{diag}(\sigma)` with a learned D×k
    ``corr_factor`` U (D = entries of the factor), i.e. ``LowRankMultivariateNormal(vec(M),
    σ ⊙ U, σ²)``. U is scale-free (as in Pyro's ``AutoLowRankMultivariateNormal``): the Woodbury
    capacitance :math:`I + U^\top U` does not depend on σ (with the covariance factor W itself, the
    capacitance :math:`I + W^\top \mathrm{diag}(σ^2)^{-1} W` grows like 1/σ² and its float32 Cholesky fails
    once training shrinks σ; see ``docs/numerics.md``).
    U starts N(0, 0.5/k), so the initial marginal std is ~1.22× the diagonal guide's. σ is floored at
    1e-10 in this family: the data can drive it towards 0, where σ² leaves float32's normal range
    and the Woodbury terms overflow.

    :param model: a :class:`~blob_pyro.model.BlobModel` (its ``latent_sites()`` give shapes and
        PEFT's init) or any Pyro model whose latent sites are matrices (set up lazily from a trace).
    :param float eps: BLoB's ε (> 0).
    :param str std_param: ``"square"`` (std = rho²) or ``"softplus"``.
    :param str covariance: ``"diagonal"`` or ``"lowrank"``.
    :param int rank: k for ``covariance="lowrank"``.
    :param callable init_loc_fn: site -> initial mean; defaults to ``model.init_loc_fn``.
    """

    def __init__(
        self,
        model,
        *,
        eps: float = DEFAULT_EPS,
        std_param: str = "square",
        covariance: str = "diagonal",
        rank: int = 2,
        init_loc_fn=None,
        create_plates=None,
    ):
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be a finite number > 0, got {eps}")
        if std_param not in ("square", "softplus"):
            raise ValueError(f"std_param must be 'square' or 'softplus', got {std_param!r}")
        if covariance not in ("diagonal", "lowrank"):
            raise ValueError(f"covariance must be 'diagonal' or 'lowrank', got {covariance!r}")
        if int(rank) < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        super().__init__(model, create_plates=create_plates)
        self.eps = float(eps)
        self.std_param = std_param
        self.covariance = covariance
        self.rank = int(rank)
        self.init_loc_fn = init_loc_fn or getattr(model, "init_loc_fn", None)
        self._specs: list[_Spec] | None = None
        if hasattr(model, "latent_sites"):
            self._setup([_Spec(s.name, tuple(s.shape), self._init_of(s.name, None)) for s in model.latent_sites()])

    # --- set-up -----------------------------------------------------------------------------
    def _init_of(self, name, site_value):
        if self.init_loc_fn is not None:
            return self.init_loc_fn({"name": name, "value": site_value}).detach()
        return site_value.detach()

    def _setup_prototype(self, *args, **kwargs):
        super()._setup_prototype(*args, **kwargs)
        specs = []
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            specs.append(_Spec(name, tuple(site["value"].shape), self._init_of(name, site["value"])))
        self._setup(specs)

    def _setup(self, specs: list[_Spec]) -> None:
        self._specs = specs
        self._parents = {}
        self.loc = PyroModule()
        self.rho = PyroModule()
        if self.covariance == "lowrank":
            self.corr_factor = PyroModule()
        for spec in specs:
            init = spec.init.float()
            std0 = torch.empty_like(init).uniform_(self.eps / math.sqrt(2), self.eps).square()
            rho0 = std0.sqrt() if self.std_param == "square" else _inv_softplus(std0)
            deep_setattr(self.loc, spec.name, PyroParam(init.clone(), constraints.real))
            deep_setattr(self.rho, spec.name, PyroParam(rho0, constraints.real))
            if self.covariance == "lowrank":
                d = init.numel()
                factor0 = torch.randn(d, self.rank, device=init.device) * math.sqrt(0.5 / self.rank)
                deep_setattr(self.corr_factor, spec.name, PyroParam(factor0, constraints.real))

    # --- the guide ----------------------------------------------------------------------------
    def _param(self, group: str, name: str) -> torch.Tensor:
        """``deep_getattr(getattr(self, group), name)``: the last attribute is read from its PyroModule (a param
        statement, the param store's value), the modules above it from a cache made once per tree."""
        root = getattr(self, group)
        cached = self._parents.get(group)
        if cached is None or cached[0] is not root:
            parents = {s.name: (deep_getattr(root, s.name.rpartition(".")[0]) if "." in s.name else root,
                                s.name.rpartition(".")[2]) for s in self._specs}
            cached = self._parents[group] = (root, parents)
        module, attr = cached[1][name]
        return getattr(module, attr)

    def _std(self, rho: torch.Tensor) -> torch.Tensor:
        std = rho.square() if self.std_param == "square" else F.softplus(rho)
        return std.clamp_min(_LOWRANK_MIN_STD) if self.covariance == "lowrank" else std

    def site_distribution(self, name: str) -> dist.Distribution:
        """q(factor) for one site, event shape = the factor's shape."""
        loc = self._param("loc", name)
        std = self._std(self._param("rho", name))
        if self.covariance == "diagonal":
            return dist.Normal(loc, std).to_event(loc.dim())
        std = std.reshape(-1)
        base = dist.LowRankMultivariateNormal(
            loc.reshape(-1), std.unsqueeze(-1) * self._param("corr_factor", name), std.square()
        )
        return dist.TransformedDistribution(base, [ReshapeTransform((loc.numel(),), tuple(loc.shape))])

    def forward(self, *args, **kwargs):
        if self._specs is None:
            self._setup_prototype(*args, **kwargs)
        out = {}
        for spec in self._specs:
            infer = {"flipout_loc": self._param("loc", spec.name)} if self.covariance == "lowrank" else {}
            out[spec.name] = pyro.sample(spec.name, self.site_distribution(spec.name), infer=infer)
        return out

    def scale_parameters(self) -> list[torch.Tensor]:
        """The parameters that set the posterior's spread (``rho``; ``corr_factor`` for the low-rank family),
        trained at ``scale_lr``."""
        params = list(self.rho.parameters())
        if self.covariance == "lowrank":
            params += list(self.corr_factor.parameters())
        return params

    @property
    def site_names(self) -> list[str]:
        return [s.name for s in (self._specs or [])]

    @torch.no_grad()
    def median(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        if self._specs is None:
            self._setup_prototype(*args, **kwargs)
        return {s.name: deep_getattr(self.loc, s.name).detach() for s in self._specs}

    @torch.no_grad()
    def std(self) -> dict[str, torch.Tensor]:
        """Marginal posterior std of every entry, per site."""
        out = {}
        for s in self._specs or []:
            std = self._std(deep_getattr(self.rho, s.name)).detach()
            if self.covariance == "lowrank":
                extra = deep_getattr(self.corr_factor, s.name).detach().square().sum(-1).reshape(std.shape)
                std = std * (1 + extra).sqrt()
            out[s.name] = std
        return out

    @torch.no_grad()
    def quantiles(self, quantiles, *args, **kwargs) -> dict[str, torch.Tensor]:
        q = torch.as_tensor(quantiles, dtype=torch.float32)
        stds = self.std()
        out = {}
        for name, loc in self.median(*args, **kwargs).items():
            shape = (-1,) + (1,) * loc.dim()
            out[name] = dist.Normal(loc, stds[name]).icdf(q.to(loc.device).reshape(shape))
        return out

    def describe(self) -> str:
        std = "rho^2" if self.std_param == "square" else "softplus(rho)"
        if self.covariance == "diagonal":
            return f"Normal(loc, {std})"
        return f"LowRankMVN(loc, cov=diag(s)(I+UU^T)diag(s), rank={self.rank}, s={std})"


def _set_up(guide, model):
    """Run a Pyro autoguide once over ``model``'s prior part, so that its parameters, median and stds exist
    before any data is seen; the RNG streams are restored, so this changes no later draw."""
    if not hasattr(model, "latents"):  # a plain Pyro model: the guide sets itself up at its first call
        return guide
    from .checkpoint import get_rng_state, set_rng_state

    state = get_rng_state()
    try:
        with torch.no_grad():
            guide()
    finally:
        set_rng_state(state)
    return guide


def _auto_args(model):
    """What a Pyro autoguide traces (the model's prior part when it has one: no batch needed) and its init."""
    fn = getattr(model, "init_loc_fn", None)
    return getattr(model, "latents", model), ({"init_loc_fn": fn} if fn is not None else {})


GUIDES = ("blob", "lowrank", "auto_normal", "auto_delta")
"""Guide names :func:`make_guide` knows; any ``callable(model) -> guide`` works too."""


def make_guide(guide="blob", model=None, *, eps: float = DEFAULT_EPS, std_param: str = "square", rank: int = 2):
    """Build a guide for ``model`` from a name in :data:`GUIDES` or a builder ``callable(model)``.

    ``auto_normal`` starts its scales at eps² (BLoB's initial std scale) rather than Pyro's 0.1,
    which would swamp LoRA factors whose entries are ~1e-2.
    """
    if callable(guide) and not isinstance(guide, str):
        return guide(model)
    if guide == "blob":
        return BlobGuide(model, eps=eps, std_param=std_param)
    if guide == "lowrank":
        return BlobGuide(model, eps=eps, std_param=std_param, covariance="lowrank", rank=rank)
    if guide == "auto_normal":
        target, init = _auto_args(model)
        return _set_up(AutoNormal(target, init_scale=eps**2, **init), model)
    if guide == "auto_delta":
        target, init = _auto_args(model)
        return _set_up(AutoDelta(target, **init), model)
    raise ValueError(f"unknown guide {guide!r}; choose one of {', '.join(GUIDES)} or pass a builder")


@torch.no_grad()
def guide_std(guide) -> dict[str, torch.Tensor]:
    """Posterior std per site for any supported guide (zeros for AutoDelta)."""
    if isinstance(guide, BlobGuide):
        return guide.std()
    if isinstance(guide, AutoNormal):
        return {n: deep_getattr(guide.scales, n).detach() for n in _site_names(guide)}
    if isinstance(guide, AutoDelta):
        return {n: torch.zeros_like(v) for n, v in guide.median().items()}
    from .laplace import LaplaceGuide

    if isinstance(guide, LaplaceGuide):
        return guide.std()
    raise TypeError(f"no std summary for guide type {type(guide).__name__}")


def _site_names(guide) -> list[str]:
    return [name for name, _ in guide.prototype_trace.iter_stochastic_nodes()]
