"""Issue 16: which parameters are the basin's coordinates. Names, glob patterns and predicates
select them; D, the default prior scale, the Adam and Fisher preconditioners and the
memory-light mode all follow the selection. Expected values are computed here by hand
(autograd loops over examples and classes, the optimizer's own state)."""

import json
import math
import warnings

import pytest
import torch
from torch import nn

import basin_volume as bv
from basin_volume.cli import main
from basin_volume.parameters import select_parameters


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(4, 8)
        self.block = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        for layer in self.block:
            h = torch.tanh(layer(h))
        return self.head(h)


@pytest.fixture()
def trained():
    model = Net().double()
    x = torch.randn(24, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.arange(24) % 3
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model, x, opt


def quiet_run(cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bv.LowESSWarning)
        return bv.VolumeEstimator.from_config(cfg).run()


SUBSET = ["block.*.weight", "head.bias"]
CHOSEN = ["block.0.weight", "block.1.weight", "head.bias"]


def test_glob_patterns_and_names_select_parameters(trained):
    model, _, _ = trained
    assert [n for n, _ in select_parameters(model, SUBSET)] == CHOSEN
    assert [n for n, _ in select_parameters(model, ["block.1.*"])] == [
        "block.1.weight",
        "block.1.bias",
    ]
    with pytest.raises(ValueError, match=r"parameters has names or patterns \['blok\.\*'\]"):
        select_parameters(model, ["blok.*", "head.bias"])
    with pytest.raises(ValueError, match="parameters"):
        select_parameters(model, ["Head.bias"])  # case sensitive


def test_dim_and_prior_follow_the_selection(trained):
    model, x, _ = trained
    cfg = bv.VolumeConfig(
        model_type="classifier",
        model=model,
        inputs=x,
        n_samples=4,
        progress=False,
        parameters=SUBSET,
    )
    res = quiet_run(cfg)
    values = torch.cat([dict(model.named_parameters())[n].detach().reshape(-1) for n in CHOSEN])
    assert res.dim == values.numel() == 2 * 64 + 3
    assert res.sigma == pytest.approx(float(values.square().mean().sqrt()), rel=1e-12)
    assert res.meta["parameters"]["dim"] == res.dim
    assert sorted(res.meta["parameters"]["excluded"]) == sorted(
        n for n, _ in model.named_parameters() if n not in CHOSEN
    )


def test_adam_scales_come_from_exactly_the_selected_state(trained):
    model, x, opt = trained
    cfg = bv.VolumeConfig(
        model_type="classifier",
        model=model,
        inputs=x,
        parameters=SUBSET,
        preconditioner_type="adam",
        optimizer=opt,
        preconditioner_eps=1e-6,
    )
    got = bv.VolumeEstimator.from_config(cfg).preconditioner
    params = dict(model.named_parameters())
    v = torch.cat([opt.state[params[n]]["exp_avg_sq"].reshape(-1) for n in CHOSEN])
    assert torch.allclose(got, 1 / (v.sqrt() + 1e-6), rtol=1e-12, atol=0)


def brute_force_fisher(model, x, names):
    """(1/N) sum_x sum_c p_c(x) (d log p_c(x) / d theta)^2 over the named parameters, one
    backward pass per example and class."""
    params = dict(model.named_parameters())
    total = torch.zeros(sum(params[n].numel() for n in names), dtype=torch.float64)
    for row in x:
        logp = torch.log_softmax(model(row[None]), -1)[0]
        for c in range(len(logp)):
            grads = torch.autograd.grad(logp[c], [params[n] for n in names], retain_graph=True)
            flat = torch.cat([g.reshape(-1) for g in grads])
            total += logp[c].exp().detach() * flat.square()
    return total / len(x)


def test_fisher_is_taken_over_the_selected_parameters(trained):
    model, x, _ = trained
    cfg = bv.VolumeConfig(
        model_type="classifier",
        model=model,
        inputs=x,
        parameters=SUBSET,
        preconditioner_type="fisher",
        preconditioner_eps=1e-3,
    )
    got = bv.VolumeEstimator.from_config(cfg).preconditioner
    fisher = brute_force_fisher(model, x, CHOSEN)
    assert torch.allclose(got, 1 / (fisher.sqrt() + 1e-3), rtol=1e-9, atol=0)


def test_memory_light_mode_moves_only_the_selected_parameters(trained):
    model, x, _ = trained
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    base = dict(
        model_type="classifier",
        model=model,
        inputs=x,
        n_samples=5,
        progress=False,
        parameters=SUBSET,
    )
    dense = quiet_run(bv.VolumeConfig(**base, low_memory=False))
    light = quiet_run(bv.VolumeConfig(**base, low_memory=True))
    assert light.dim == dense.dim
    assert torch.allclose(light.estimates, dense.estimates, rtol=1e-9, atol=0)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_cli_parameters_option(tmp_path, capsys):
    out = tmp_path / "r.json"
    code = main(
        [
            "estimate",
            "--model",
            "digits",
            "--digits-steps",
            "30",
            "-n",
            "2",
            "-q",
            "--parameters",
            "2.*",
            "-o",
            str(out),
        ]
    )
    assert code == 0
    saved = json.loads(out.read_text())
    assert saved["dim"] == 64 * 10 + 10
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "estimate",
                "--model",
                "digits",
                "--digits-steps",
                "30",
                "-n",
                "2",
                "-q",
                "--parameters",
                "nope",
                "-o",
                str(tmp_path / "x.json"),
            ]
        )
    assert exit_.value.code == 2
    assert "--parameters" in capsys.readouterr().err
    assert math.isfinite(saved["log_volume"])
