"""blob_pyro.ensemble and method=ensemble on the tiny network: K mle members with distinct seeds give distinct
point estimates; the ensemble's probabilities are the mean of the members'; the logit rule; the draws ppc uses."""

import pyro
import pytest
import torch

from blob_pyro.config import RunConfig
from blob_pyro.ensemble import (
    ENSEMBLE_SEED_STRIDE,
    ensemble_average,
    ensemble_draws,
    member_configs,
    member_dirs,
    member_seed,
    predict_members,
)
from blob_pyro.errors import ConfigError
from blob_pyro.infer import fit
from blob_pyro.optim import own_params
from blob_pyro.predictive import predict

from .tiny import tiny_examples, tiny_run


def test_method_ensemble_resolves_to_k_mle_members_with_distinct_seeds():
    cfg = RunConfig.from_dict({"method": "ensemble", "seed": 7, "lr": 0.01}).resolve()
    assert (cfg.ensemble_size, cfg.bayes.guide, cfg.fit.kl_multiplier, cfg.predict.num_samples) == \
        (3, "auto_delta", 0.0, 0)
    members = member_configs(cfg)
    assert [m.fit.seed for m in members] == [7, 7 + ENSEMBLE_SEED_STRIDE, 7 + 2 * ENSEMBLE_SEED_STRIDE]
    assert [member_seed(7, j) for j in range(3)] == [m.fit.seed for m in members]
    assert all(m.method == "mle" and m.ensemble_size is None and m.fit.lr == 0.01 for m in members)
    # a member is exactly an mle run of the same settings and its own seed
    assert members[1] == RunConfig.from_dict({"method": "mle", "seed": 1007, "lr": 0.01}).resolve()
    assert len(member_configs(cfg.replace(ensemble_size=5))) == 5
    assert [d.name for d in member_dirs("out", 2)] == ["member0", "member1"]


@pytest.mark.parametrize("settings, message", [
    ({"method": "ensemble", "ensemble_size": 1}, "method=ensemble needs ensemble_size >= 2; got ensemble_size=1"),
    ({"method": "mle", "ensemble_size": 3}, "ensemble_size is a setting of method=ensemble; got method=mle"),
    ({"method": "ensemble", "guide": "blob"}, "method=ensemble implies guide=auto_delta; got guide=blob "
                                              "(drop one of them)"),
])
def test_bad_ensemble_settings_are_one_line(settings, message):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict(settings).resolve()
    assert str(err.value) == message
    with pytest.raises(ConfigError, match="needs method=ensemble"):
        member_configs(RunConfig.from_dict({"method": "mle"}))


def _members(k=3):
    """K tiny mle runs trained with their member seeds, as train_ensemble trains them."""
    cfg = RunConfig.from_dict({"method": "ensemble", "ensemble_size": k, "lr": 5e-2, "max_steps": 5, "batch_size": 4})
    runs = []
    for mcfg in member_configs(cfg):
        with own_params():
            run = tiny_run(mcfg, num_data=16)
            fit(run.model, run.guide, tiny_examples(16, seed=4), run.config.fit, progress=False)
        runs.append(run)
    return runs


def _own(member, data):
    with own_params():
        return predict(member.model, member.guide, data, num_samples=0, keep_draws=True, progress=False)


def test_members_are_distinct_and_the_ensemble_averages_their_probabilities():
    members = _members(3)
    data = tiny_examples(10, seed=8)
    own = [_own(m, data) for m in members]
    for a in range(3):
        for b in range(a + 1, 3):
            assert not torch.allclose(own[a].probs, own[b].probs)  # K distinct members
    ens = predict_members(members, data, progress=False)
    assert torch.allclose(ens.probs, torch.stack([o.probs for o in own]).mean(0), atol=1e-7)
    assert torch.allclose(ens.probs.sum(-1), torch.ones(10))
    assert ens.logits.shape == (3, 10, 2) and torch.equal(ens.labels, own[0].labels)
    assert torch.allclose(ens.logits, torch.stack([o.logits[0] for o in own]))


def test_members_share_parameter_names_so_each_predicts_in_its_own_param_store():
    members = _members(2)
    data = tiny_examples(6, seed=8)
    first = _own(members[0], data).probs
    pyro.clear_param_store()
    with torch.no_grad():  # the store now holds member 1's parameters under the names member 0 uses too
        members[1].model(members[1].model.head.collate(data))
    assert not torch.allclose(_own(members[1], data).probs, first)
    assert torch.equal(_own(members[0], data).probs, first)  # member 0 still predicts with its own weights
    assert torch.equal(predict_members(members, data, progress=False).probs,
                       (first + _own(members[1], data).probs) / 2)


def test_ensemble_average_rules_by_hand():
    p1, p2 = torch.tensor([[0.9, 0.1]]), torch.tensor([[0.5, 0.5]])
    l1, l2 = torch.tensor([[[2.0, 0.0]]]), torch.tensor([[[0.0, 0.0]], [[0.0, 2.0]]])  # (S, N, C): S = 1 and 2
    p, q = ensemble_average([p1, p2], [l1, l2])
    assert torch.allclose(p, torch.tensor([[0.7, 0.3]]))
    assert torch.allclose(q, torch.softmax(torch.tensor([[1.0, 0.5]]), -1))  # mean over draws, then members
    assert ensemble_average([p1, p2])[1] is None


def test_ppc_draws_are_the_members_in_turn():
    members = _members(2)
    data = tiny_examples(6, seed=8)
    idata = ensemble_draws(members, data, num_samples=5, seed=1, attrs={"dataset": "tiny"})
    logits = torch.as_tensor(idata.posterior_predictive["logits"].values[0])
    own = [_own(m, data).logits[0] for m in members]
    for s in range(5):
        assert torch.allclose(logits[s], own[s % 2], atol=1e-6)
    assert idata.posterior_predictive["y"].shape == (1, 5, 6) and idata.attrs["dataset"] == "tiny"
    assert list(idata.observed_data["y"].values) == [e.label for e in data]
    from blob_pyro.ppc import check_idata

    result = check_idata(idata)
    assert torch.allclose(result.probs, torch.softmax(logits.double(), -1).mean(0).float(), atol=1e-6)
