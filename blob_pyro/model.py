"""The probabilistic program: a frozen Hugging Face network with Bayesian LoRA factors.

For every LoRA layer the Bayesian factor is a Pyro sample site named after the module path and the
factor (``bert.encoder.layer.3.attention.self.query.lora_B``) with an i.i.d. prior over the whole
matrix; the other factor and any new classifier head are deterministic parameters; the likelihood
is a Categorical over the K options inside a data plate of size N::

    model = BlobModel(peft_net, head, bayesian_factor="B", prior=NormalPrior(0.2), num_data=640)
    guide = make_guide("blob", model)
    svi = SVI(model, guide, optim, Trace_ELBO())
    with flipout(model.flipout):                              # blob_pyro.poutine; model.flipout = "token"
        svi.step(batch)                                       # batch = head.collate(examples)
    Predictive(model, guide=guide, num_samples=10, return_sites=["logits", "obs"])(batch)
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.params import param_with_module_name

from .lora import LoraSite, bind_values, lora_layers
from .priors import NormalPrior

__all__ = ["BlobModel", "BAYESIAN_FACTORS", "ModuleRegistration"]

BAYESIAN_FACTORS = {"A": ("A",), "B": ("B",), "both": ("A", "B")}


class ModuleRegistration:
    """``pyro.module(name, module, update_module_params=True)`` without walking the module tree at every call.

    ``pyro.module`` walks every parameter of the network (the frozen backbone's too) to find the trainable ones,
    ~0.5 ms per step on MiniLM. This keeps the walk's result and, at each call, checks in one flat pass that it still
    holds: every module keeps the same children and parameter tensors under the same names, and every parameter the
    same ``requires_grad``. Where it holds, the same ``pyro.param`` statements run in the same order and a
    parameter the param store holds another tensor for is replaced in its module, as ``pyro.module`` does; where
    it does not (or the module is in training mode, where ``pyro.module`` warns about frozen parameters),
    ``pyro.module`` itself runs and the walk is taken again::

        register = ModuleRegistration("network", peft_net)
        register()                         # in the model, at every call
    """

    def __init__(self, name: str, module: torch.nn.Module):
        self.name, self.module = name, module
        self._slots: list | None = None  # (dict, key, value) for every child and parameter entry of the tree
        self._sizes: list = []  # (dict, len) for the same dicts
        self._flags: list = []  # (parameter, requires_grad)
        self._trainable: list = []  # (param-store name, _parameters dict, key, parameter)

    def __call__(self) -> torch.nn.Module:
        if self._slots is None or self.module.training or not self._unchanged():
            pyro.module(self.name, self.module, update_module_params=True)
            self._record()
            return self.module
        replaced = []
        for full_name, params, key, value in self._trainable:
            returned = pyro.param(full_name, value)
            if returned._cdata != value._cdata:
                replaced.append((params, key, returned))
        for params, key, returned in replaced:  # what pyro.module's update_module_params does
            params[key] = returned
        if replaced:
            self._slots = None
        return self.module

    def _unchanged(self) -> bool:
        return (all(len(d) == n for d, n in self._sizes) and all(d.get(k) is v for d, k, v in self._slots)
                and all(p.requires_grad is flag for p, flag in self._flags))

    def _record(self) -> None:
        slots, sizes = [], []
        for module in self.module.modules():
            for d in (module._modules, module._parameters):
                sizes.append((d, len(d)))
                slots.extend((d, k, v) for k, v in d.items())
        owner = {}
        for module in self.module.modules():
            for key, p in module._parameters.items():
                if p is not None:
                    owner.setdefault(id(p), (module._parameters, key))
        named = list(self.module.named_parameters())
        self._flags = [(p, p.requires_grad) for _, p in named]
        self._trainable = [(param_with_module_name(self.name, n), *owner[id(p)], p) for n, p in named if p.requires_grad]
        self._slots, self._sizes = slots, sizes


class BlobModel(torch.nn.Module):
    """Pyro model ``model(batch)`` over the LoRA factors of a PEFT-wrapped network.

    :param network: a PEFT model made by :func:`blob_pyro.lora.inject_lora`.
    :param head: a head from :mod:`blob_pyro.heads` (collate + logits).
    :param str bayesian_factor: ``"B"`` (default), ``"A"`` (the paper) or ``"both"``.
    :param prior: ``callable(site) -> Distribution`` (default ``NormalPrior(0.2)``).
    :param int num_data: N, the size of the training set (plate size).
    :param flipout: how training and prediction apply a draw: ``"token"`` (Flipout with signs per example and
        token, the paper), ``"sequence"`` (per example) or ``None`` (one weight draw per batch).
    """

    def __init__(self, network, head, *, bayesian_factor: str = "B", prior=None, num_data: int = 1,
                 flipout: str | None = "token"):
        super().__init__()
        if bayesian_factor not in BAYESIAN_FACTORS:
            raise ValueError(f"bayesian_factor must be one of A, B, both; got {bayesian_factor!r}")
        if flipout not in ("token", "sequence", None):
            raise ValueError(f"flipout must be 'token', 'sequence' or None; got {flipout!r}")
        self.network = network.eval()  # frozen backbone: no dropout; LoRA dropout is switched on where asked
        self.head = head
        self.bayesian_factor = bayesian_factor
        self.prior = prior if prior is not None else NormalPrior(0.2)
        self.num_data = int(num_data)
        self.flipout = flipout
        self.temperature = 1.0  # logits / T in the likelihood; method=temperature fits T after training
        self.compiled = None  # a CompiledNetwork once compile_network() is called
        self._register = ModuleRegistration("network", network)
        self.sites: list[LoraSite] = []
        for path, layer in lora_layers(network).items():
            for factor in BAYESIAN_FACTORS[bayesian_factor]:
                mod = layer.lora_A if factor == "A" else layer.lora_B
                shape = tuple(mod["default"].weight.shape)
                self.sites.append(LoraSite(f"{path}.lora_{factor}", path, factor, shape, layer))
        if not self.sites:
            raise ValueError("the network has no LoRA layers: build it with blob_pyro.lora.inject_lora")
        # The guide owns the Bayesian factors; PEFT's tensors keep the init (and, once saved, the mean).
        self._init = {}
        for site in self.sites:
            weight = site.peft_weight()
            weight.requires_grad_(False)
            self._init[site.name] = weight.detach().clone()

    # ---- the model ---------------------------------------------------------------------------
    def forward(self, batch: dict) -> torch.Tensor:
        self._register()  # pyro.module("network", self.network, update_module_params=True): deterministic factors, new heads
        draws = self.latents()
        with bind_values(self.sites, draws):
            if self.compiled is not None:
                logits = self.compiled(batch)  # (B, K)
            else:
                logits = self.head.logits(self.network, batch)  # (B, K)
        if self.temperature != 1.0:
            logits = logits / self.temperature
        labels = batch.get("labels")
        size = max(self.num_data, logits.shape[0])
        with pyro.plate("data", size=size, subsample=torch.arange(logits.shape[0], device=logits.device)):
            pyro.deterministic("logits", logits, event_dim=1)
            return pyro.sample("obs", dist.Categorical(logits=logits), obs=labels)

    def latents(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """The prior part alone: one sample site per Bayesian factor (no network, no data).

        Guides that set themselves up by tracing a model (Pyro's autoguides) trace this instead of
        :meth:`forward`, so they need no batch.
        """
        return {site.name: pyro.sample(site.name, self.prior(site)) for site in self.sites}

    def compile_network(self, **compile_kwargs):
        """Run the network part (backbone, LoRA, Flipout) through ``torch.compile`` from now on; Pyro, the guide
        and the ELBO stay eager (:mod:`blob_pyro.compiled`). ``compile_kwargs`` go to ``torch.compile``.

        :returns: the :class:`~blob_pyro.compiled.CompiledNetwork` (``calls`` counts eager and compiled calls).
        """
        from .compiled import CompiledNetwork

        self.compiled = CompiledNetwork(self, **compile_kwargs)
        return self.compiled

    # ---- helpers for guides, saving and describe ----------------------------------------------
    def latent_sites(self) -> list[LoraSite]:
        return list(self.sites)

    def init_loc_fn(self, site: dict) -> torch.Tensor:
        """PEFT's initial value of a Bayesian factor (guide means start here)."""
        return self._init[site["name"]]

    def prior_distributions(self) -> dict[str, dist.Distribution]:
        return {site.name: self.prior(site) for site in self.sites}

    @torch.no_grad()
    def write_factors(self, values: dict[str, torch.Tensor]) -> None:
        """Copy factor values (e.g. the posterior mean) into PEFT's tensors, for a vanilla adapter."""
        for site in self.sites:
            if site.name in values:
                site.peft_weight().copy_(values[site.name])

    def parameter_counts(self, guide=None) -> dict[str, int]:
        trainable = sum(p.numel() for p in self.network.parameters() if p.requires_grad)
        bayes = sum(site.peft_weight().numel() for site in self.sites)
        frozen = sum(p.numel() for p in self.network.parameters() if not p.requires_grad) - bayes
        counts = {"frozen": frozen, "deterministic": trainable, "bayesian_entries": bayes}
        if guide is not None:
            counts["variational"] = sum(p.numel() for p in guide.parameters())
        return counts
