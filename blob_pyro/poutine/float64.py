"""Float64 log-densities for the latent sites: the KL part of the ELBO in double precision.

::

    with float64_latents():                                   # around an SVI step, float32 or autocast
        loss = elbo.differentiable_loss(model, guide, batch)

Every latent (unobserved) site's distribution is wrapped in :class:`Float64Density`: it samples exactly
as before (same dtype, same draws) while ``log_prob`` and ``kl_divergence`` are computed in float64 on
the float32 parameters (gradients flow through the casts). A float32 Normal log-density is NaN once a
std falls below ~1e-22 (its variance underflows to 0); see ``docs/numerics.md``.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from pyro.distributions.score_parts import ScoreParts
from pyro.distributions.util import scale_and_mask
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.distributions import kl_divergence, register_kl

__all__ = ["Float64Density", "Float64Latents", "float64_latents", "as_float64", "float64_copy", "fill_normal_densities",
           "normal_log_densities", "normal_site_kls", "normal_kl_sums", "point_estimate_kls"]


_FAMILIES = ((dist.Normal, ("loc", "scale")), (dist.Laplace, ("loc", "scale")), (dist.StudentT, ("df", "loc", "scale")),
             (dist.LowRankMultivariateNormal, ("loc", "cov_factor", "cov_diag")), (dist.Delta, ("v", "log_density")))
"""The families :func:`as_float64` copies, each with its parameter tensors in constructor order."""


def _family(d) -> tuple:
    """(family, the parameter tensors :func:`as_float64` casts) of ``d`` under its Independent/Transformed
    wrappers, or (None, ())."""
    while isinstance(d, (dist.Independent, dist.TransformedDistribution)):
        d = d.base_dist
    for family, names in _FAMILIES:
        if isinstance(d, family):
            return family, tuple(getattr(d, n) for n in names)
    return None, ()


def as_float64(d):
    """``d`` with float64 parameters (same family), or None for a family not handled here.

    The copy does not validate its arguments again: they are exact casts of ``d``'s, which ``d`` validated (or
    was built not to). :class:`Float64Density` validates a value against ``d`` where ``d`` validates.
    """
    if isinstance(d, dist.Independent):
        inner = as_float64(d.base_dist)
        return None if inner is None else dist.Independent(inner, d.reinterpreted_batch_ndims, validate_args=False)
    if isinstance(d, dist.TransformedDistribution):
        inner = as_float64(d.base_dist)
        return None if inner is None else dist.TransformedDistribution(inner, d.transforms, validate_args=False)
    family, tensors = _family(d)
    if family is None:
        return None
    extra = {"event_dim": d.event_dim} if family is dist.Delta else {}
    return family(*(t.double() for t in tensors), validate_args=False, **extra)


def float64_copy(d):
    """:func:`as_float64` of ``d``, kept on ``d`` and handed out again while ``d``'s tensors are unchanged (same
    tensors, same in-place versions) where reusing it builds no graph: ``d`` has no tensor that needs a gradient (a
    prior, copied once for all steps), or gradients are off (the KL a step logs reuses the copies its ELBO made).
    The same casts of the same values: the same float64 numbers."""
    tensors = _family(d)[1]
    key = tuple((id(t), t._version) for t in tensors)
    cached = d.__dict__.get("_float64_copy")
    if (cached is not None and cached[0] == key
            and (not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors))):
        return cached[1]
    wide = as_float64(d)
    if tensors:  # keeps the tensors alive with the copy: an id in the key cannot be reused by another tensor
        d.__dict__["_float64_copy"] = (key, wide, tensors)
    return wide


class Float64Density(dist.TorchDistribution):
    """Samples exactly as ``base`` (same dtype, same draws); ``log_prob`` and KL are computed in float64.

    Parameters stay float32 (gradients flow through the casts); families that :func:`as_float64`
    does not know keep their own dtype.
    """

    _wraps_density = True  # blob_pyro.poutine.flipout looks through this wrapper for the draw's mean
    arg_constraints: dict = {}

    def __init__(self, base):
        self.base_dist = base
        # validation as the caller has it when the wrapper is built (it has no arguments of its own to check): a
        # step run with validation off does not check values against a prior built, and validated, long before
        super().__init__(base.batch_shape, base.event_shape)

    @property
    def has_rsample(self):
        return self.base_dist.has_rsample

    @property
    def support(self):
        return self.base_dist.support

    @property
    def mean(self):
        return self.base_dist.mean

    @property
    def variance(self):
        return self.base_dist.variance

    def sample(self, sample_shape=torch.Size()):
        return self.base_dist.sample(sample_shape)

    def rsample(self, sample_shape=torch.Size()):
        return self.base_dist.rsample(sample_shape)

    def log_prob(self, value):
        wide = float64_copy(self.base_dist)
        if wide is None:
            return self.base_dist.log_prob(value)
        if self._validate_args and self.base_dist._validate_args:  # what the float64 copy would check, on the original
            self.base_dist._validate_sample(value)
        return wide.log_prob(value.double())

    def expand(self, batch_shape, _instance=None):
        return Float64Density(self.base_dist.expand(batch_shape))


@register_kl(Float64Density, Float64Density)
def _kl_float64(p, q):
    wp, wq = float64_copy(p.base_dist), float64_copy(q.base_dist)
    if wp is None or wq is None:
        return kl_divergence(p.base_dist, q.base_dist)
    return kl_divergence(wp, wq)


class Float64Latents(Messenger):
    """Wrap the distribution of every latent (unobserved) sample site in :class:`Float64Density`.

    Used around every SVI step (float32 or autocast) so that the KL part of the ELBO (log q − log p of
    the draws, or the closed-form KL of ``TraceMeanField_ELBO``) is computed and summed in float64::

        with Float64Latents(), torch.autocast("cuda", dtype=torch.bfloat16):
            svi.step(batch)
    """

    def _pyro_sample(self, msg):
        if msg["is_observed"] or site_is_subsample(msg) or isinstance(msg["fn"], Float64Density):
            return
        if isinstance(msg["fn"], torch.distributions.Distribution):
            msg["fn"] = Float64Density(msg["fn"])



def float64_latents() -> Float64Latents:
    """Context manager: latent log-densities (and closed-form KLs) in float64; see :class:`Float64Latents`."""
    return Float64Latents()


_HALF_LOG_2PI = math.log(math.sqrt(2 * math.pi))


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _normal_of(site) -> dist.Normal | None:
    """The Normal inside ``site``'s Float64Density(Independent(Normal)) whose event is the whole value, or None."""
    fn = site["fn"]
    if not isinstance(fn, Float64Density) or site["mask"] is not None or site["args"] or site["kwargs"]:
        return None
    ind = fn.base_dist
    value = site["value"]
    if (type(ind) is not dist.Independent or type(ind.base_dist) is not dist.Normal or not torch.is_tensor(value)
            or ind.reinterpreted_batch_ndims != value.dim() or ind.base_dist.loc.shape != value.shape):
        return None
    return ind.base_dist


def _latent_pairs(model_sites: dict, guide_sites: dict, guide_of) -> list[tuple]:
    """(name, guide site, model site, q, float64 copy of p) for every latent site whose guide distribution
    ``guide_of(site)`` finds (q; None where it does not) and whose prior is a :class:`Float64Density` over a Normal
    with the whole value as its event."""
    pairs = []
    for name, g in guide_sites.items():
        m = model_sites.get(name)
        if g["type"] != "sample" or g["is_observed"] or m is None or m["type"] != "sample":
            continue
        q, p = guide_of(g), _normal_of(m)
        if q is not None and p is not None:
            pairs.append((name, g, m, q, float64_copy(p)))
    return pairs


def _normal_pairs(model_sites: dict, guide_sites: dict) -> list[tuple]:
    """:func:`_latent_pairs` of the sites whose guide, too, is a :class:`Float64Density` over a float32 Normal with the
    whole value as its event."""
    return _latent_pairs(model_sites, guide_sites, _float32_normal_of)


def _float32_normal_of(site) -> dist.Normal | None:
    q = _normal_of(site)
    return q if q is not None and q.loc.dtype != torch.float64 else None


def fill_normal_densities(model_trace, guide_trace, kernel=None) -> int:
    """Compute the float64 log-densities of every latent site whose guide and prior are both a
    :class:`Float64Density` over a Normal with the whole value as its event, in one pass over all those sites, and
    record them in both traces as ``compute_log_prob`` / ``compute_score_parts`` would (Pyro then skips the sites),
    and each guide site's closed-form KL (no gradient) as ``closed_form_kl``, which :func:`normal_site_kls` reads.

    Per site Pyro builds float64 copies and runs ``Normal.log_prob`` and a sum for guide and prior, and their
    backward: on MiniLM's 12 factors a blob step dispatches 1 936 operators this way, the logged KL included, against
    2 566 with Pyro's per-site densities and KL (``benchmarks/perf.py --sections overhead``).
    :func:`normal_log_densities` computes every site's number as Pyro does, and the gradients too. A reparameterised
    guide site's score parts are (log q, 0, log q), as Pyro's. Sites that do not qualify (another family, a
    transformed or low-rank guide, a point estimate, a density already recorded) are left to Pyro.

    :param kernel: what computes the densities, with :func:`normal_log_densities`'s arguments and result (default:
        that function; a compiled network passes its compiled copy of it, :mod:`blob_pyro.compiled`).
    :returns: the number of sites filled (per trace).
    """
    pairs = [(g, m, q, p) for _, g, m, q, p in _normal_pairs(model_trace.nodes, guide_trace.nodes)
             if "log_prob" not in g and "score_parts" not in g and "log_prob" not in m and m["value"] is g["value"]
             and g["fn"].has_rsample]
    if not pairs:
        return 0
    with torch.no_grad():  # the priors' copies are constants
        p_loc, p_scale = _flat([p.loc for *_, p in pairs]), _flat([p.scale for *_, p in pairs])
    log_q, log_p, kl = (kernel or normal_log_densities)(
        [g["value"] for g, *_ in pairs], p_loc, p_scale, [q.loc for _, _, q, _ in pairs],
        [q.scale for _, _, q, _ in pairs], tuple(g["value"].numel() for g, *_ in pairs))
    guides, models = [g for g, *_ in pairs], [m for _, m, *_ in pairs]
    for site, site_kl in zip(guides, kl.unbind()):  # what normal_site_kls returns for these sites, already cast
        site["closed_form_kl"] = site_kl
    for sites, unscaled in ((models, log_p), (guides, log_q)):
        scaled = _scaled(unscaled, [site["scale"] for site in sites])
        for site, u, lp in zip(sites, unscaled.unbind(), scaled):
            site["unscaled_log_prob"] = u
            site["log_prob"] = site["log_prob_sum"] = lp  # a 0-dim density is its own sum
            if sites is guides:  # reparameterised: (log q, no score function, log q)
                site["score_parts"] = ScoreParts(lp, 0, lp)
    return len(pairs)


def normal_log_densities(values, p_loc, p_scale, q_locs, q_scales, sizes) -> tuple[torch.Tensor, ...]:
    """(log q, log p, KL), each (S,) float64: every site's Normal log-density of its draw under the guide and the
    prior, and its closed-form KL(q‖p) without gradient (:func:`normal_kl_sums`' numbers, from the same casts).

    :param values: the S draws (float32, any shapes); ``q_locs``, ``q_scales``: the guide's parameters, shaped alike.
    :param p_loc, p_scale: the priors' parameters, float64, flat and concatenated in the sites' order.
    :param sizes: each site's number of entries.

    The draws, means and scales of all sites are concatenated and cast to float64 and torch's ``Normal.log_prob``
    runs elementwise once per side; each site's density is the sum of its own slice, as ``Independent.log_prob``
    sums it, so every number is Pyro's per-site one, and the gradients are too: each density casts the draws
    itself, the model's first, as Pyro's order of computing them does (the float32 additions that bring the
    gradients back to a draw are the same, in the same order).
    """
    log_p = _normal_log_prob(_flat(values).double(), p_loc, p_scale)
    q_loc, q_scale = _flat(q_locs).double(), _flat(q_scales).double()
    log_q = _normal_log_prob(_flat(values).double(), q_loc, q_scale)
    kl = _normal_kl(q_loc.detach(), q_scale.detach(), p_loc, p_scale)
    return _site_sums(log_q, sizes), _site_sums(log_p, sizes), _site_sums(kl, sizes)


def _site_sums(flat: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """(S,): each site's sum over its slice of ``flat``, one reduction per run of equal-sized sites (row sums of a
    (k, n) view are the numbers each slice's own sum gives)."""
    runs, start, i = [], 0, 0
    while i < len(sizes):
        j = i
        while j < len(sizes) and sizes[j] == sizes[i]:
            j += 1
        k, n = j - i, sizes[i]
        runs.append(flat[start:start + k * n].view(k, n).sum(-1))
        start, i = start + k * n, j
    return runs[0] if len(runs) == 1 else torch.cat(runs)


def _scaled(unscaled: torch.Tensor, scales: list) -> list[torch.Tensor]:
    """Each site's density times its site's scale, as Pyro's ``scale_and_mask`` (no mask): one multiplication
    where every site has the same number."""
    first = scales[0]
    if all(isinstance(c, (int, float)) and c == first for c in scales):
        return list((unscaled if first == 1 else unscaled * first).unbind())
    return [scale_and_mask(u, c) for u, c in zip(unscaled.unbind(), scales)]


def normal_site_kls(model_sites: dict, guide_sites: dict) -> dict[str, torch.Tensor]:
    """KL(q‖p) in float64, summed over each site's entries, of every latent site whose guide and prior are both a
    :class:`Float64Density` over a Normal with the whole value as its event (``*_sites``: name -> trace node or
    message), in one pass over all of them: ``{name: kl}``, each the number ``kl_divergence`` gives for that site
    (:func:`normal_kl_sums`). Other sites are not in the result. Where :func:`fill_normal_densities` filled the traces,
    the KLs it recorded (``closed_form_kl``) are returned: the same numbers, not computed again.
    """
    pairs = _normal_pairs(model_sites, guide_sites)
    if not pairs:
        return {}
    if all("closed_form_kl" in g for _, g, *_ in pairs):
        return {name: g["closed_form_kl"] for name, g, *_ in pairs}
    qs, ps = [q for *_, q, _ in pairs], [p for *_, p in pairs]
    sums = normal_kl_sums([q.loc for q in qs], [q.scale for q in qs], _flat([p.loc for p in ps]),
                          _flat([p.scale for p in ps]), tuple(q.loc.numel() for q in qs))
    return {name: total for (name, *_), total in zip(pairs, sums.unbind())}


def normal_kl_sums(q_locs, q_scales, p_loc, p_scale, sizes) -> torch.Tensor:
    """(S,) float64: each site's KL(q‖p) between Normals, summed over its entries (torch's Normal–Normal formula,
    elementwise on the concatenated sites, then each site's own sum: the numbers ``kl_divergence`` gives).

    :param q_locs, q_scales: the guide's parameters of the S sites (float32, any shapes).
    :param p_loc, p_scale: the priors' parameters, float64, flat and concatenated in the sites' order.
    :param sizes: each site's number of entries.
    """
    return _site_sums(_normal_kl(_flat(q_locs).double(), _flat(q_scales).double(), p_loc, p_scale), sizes)


def _normal_log_prob(value, loc, scale) -> torch.Tensor:
    """torch's ``Normal.log_prob``, elementwise (the same operations in the same order: the same numbers)."""
    return -((value - loc) ** 2) / (2 * scale**2) - scale.log() - _HALF_LOG_2PI


def _normal_kl(q_loc, q_scale, p_loc, p_scale) -> torch.Tensor:
    """torch.distributions.kl._kl_normal_normal, elementwise."""
    var_ratio = (q_scale / p_scale).pow(2)
    t1 = ((q_loc - p_loc) / p_scale).pow(2)
    return 0.5 * (var_ratio + t1 - 1 - var_ratio.log())


def _delta_of(site) -> dist.Delta | None:
    """The Delta inside ``site``'s Float64Density whose event is the whole value (Pyro's ``AutoDelta``), or None."""
    fn = site["fn"]
    if not isinstance(fn, Float64Density) or site["mask"] is not None or site["args"] or site["kwargs"]:
        return None
    delta, value = fn.base_dist, site["value"]
    if (type(delta) is not dist.Delta or not torch.is_tensor(value) or delta.event_dim != value.dim()
            or delta.v.shape != value.shape or delta.v.dtype == torch.float64):
        return None
    return delta


def point_estimate_kls(model_sites: dict, guide_sites: dict) -> dict[str, torch.Tensor]:
    """``kl_divergence(q, p)`` in float64 of every point-estimate site (a :class:`Float64Density` over a ``Delta`` at
    v, as ``AutoDelta`` draws) whose prior is a :class:`Float64Density` over a Normal with the whole value as its event
    and whose model trace holds no density of it (``scale_latents(0)``: ``mle``), in one pass over all of them:
    ``{name: −log p(v)}``, each the number Pyro's Delta KL gives (torch's ``Normal.log_prob``, elementwise, then the
    site's own sum). A site whose model trace holds its prior density is left out: the caller reads that off.
    """
    pairs = [(name, q, p) for name, _, m, q, p in _latent_pairs(model_sites, guide_sites, _delta_of)
             if "unscaled_log_prob" not in m]
    if not pairs:
        return {}
    p_loc, p_scale = _flat([p.loc for *_, p in pairs]), _flat([p.scale for *_, p in pairs])
    log_p = _normal_log_prob(_flat([q.v for _, q, _ in pairs]).double(), p_loc, p_scale)
    sums = _site_sums(log_p, [q.v.numel() for _, q, _ in pairs])
    return {name: -total for (name, *_), total in zip(pairs, sums.unbind())}
