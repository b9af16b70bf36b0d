"""Tests for fql.py and eval.py. CPU only, no network: every dataset is built here.

Run: python -m pytest -q test_fql.py                  (everything, as CI does)
     python -m pytest -q -m "not slow" test_fql.py     (the unit and formula tests, under a minute)
"""
import copy
import csv
import ctypes.util
import dataclasses
import functools
import itertools
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
import urllib.error
import urllib.request
import warnings

import gymnasium
import numpy as np
import pytest
import torch
import tyro
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import eval as fql_eval
import fql

HERE = os.path.dirname(os.path.abspath(__file__))
# torch.compile keeps 8 compilations of a function per process (fullgraph=True: a 9th is an error); a run needs 2 to
# 4, this suite compiles the same functions for dozens of configs
torch._dynamo.config.recompile_limit = 256
with warnings.catch_warnings():  # pytest knows marks from its ini files, which this project has none of
    warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
    slow = pytest.mark.slow  # compiles, steps environments or runs the scripts: not in the quick tier
    gpu_mark = pytest.mark.gpu  # `python -m pytest -m gpu test_fql.py` runs exactly these


def gpu(test):
    """A GPU test: marked gpu, skipped without CUDA. The whole set runs in a few minutes on one GPU."""
    return gpu_mark(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))

SMALL = ("--actor_hidden_dims", "32", "32", "--value_hidden_dims", "32", "32")
COMPILED = dict(flow_steps=2)  # the tests that compile share this config and their shapes: each compilation takes
# tens of seconds on a small CPU, and torch.compile reuses one for the same shapes and config


def make_config(**overrides) -> fql.Config:
    """A resolved config with small networks, on the CPU, eager unless asked."""
    base = dict(env="ogbench-cube-single", alpha=3.0, discount=0.99, q_agg="mean", device="cpu", compile=False,
                actor_hidden_dims=(32, 32), value_hidden_dims=(32, 32))
    return fql.Config(**{**base, **overrides})


def make_agent(obs_dim: int, action_dim: int, cfg: fql.Config) -> fql.FQLAgent:
    """A one-seed agent whose networks come from the global torch RNG."""
    return fql.FQLAgent([fql.FQLNetworks((obs_dim,), action_dim, cfg)], cfg, [torch.Generator()], [cfg.alpha], [0])


def generators(n: int) -> list:
    """The policy's noise generators for n rows, seeded 0 .. n - 1 (as evaluation seeds one per episode)."""
    return [torch.Generator().manual_seed(k) for k in range(n)]


def one(inputs: dict) -> dict:
    """A one-seed agent's batch or noise: the leading seed dimension of size 1."""
    return {k: v[None] for k, v in inputs.items()}


def random_batch(n: int, obs_dim: int, action_dim: int, dtype=torch.float32, seed: int = 123) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch = dict(
        observations=torch.randn(n, obs_dim, generator=g, dtype=dtype),
        actions=torch.rand(n, action_dim, generator=g, dtype=dtype) * 2 - 1,
        rewards=-torch.randint(0, 2, (n,), generator=g).to(dtype),
        masks=torch.randint(0, 2, (n,), generator=g).to(dtype),
        next_observations=torch.randn(n, obs_dim, generator=g, dtype=dtype),
    )  # in the order of fql.to_device's batches: torch.compile compiles again for another order
    return {k: batch[k] for k in ("actions", "rewards", "masks", "observations", "next_observations")}


def fixed_noise(n: int, action_dim: int, dtype=torch.float32, seed: int = 456) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(x0=torch.randn(n, action_dim, generator=g, dtype=dtype),
                t=torch.rand(n, 1, generator=g, dtype=dtype),
                z=torch.randn(n, action_dim, generator=g, dtype=dtype),
                z_next=torch.randn(n, action_dim, generator=g, dtype=dtype))


# ----------------------------------------------------------------------------------------------
# A direct computation of the paper's and the official code's formulas (README's "Where the paper's
# pieces are"), written independently of fql.py's modules
# ----------------------------------------------------------------------------------------------
def manual_mlp(layers: list, x: torch.Tensor, norms: list | None = None) -> torch.Tensor:
    """layers: [(weight (in, out), bias)]; norms: [(scale, shift)] after each hidden layer, or None."""
    for i, (weight, bias) in enumerate(layers[:-1]):
        x = x @ weight + bias
        x = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))  # GELU, tanh form
        if norms is not None:
            mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
            x = (x - mean) / torch.sqrt(var + 1e-6) * norms[i][0] + norms[i][1]
    weight, bias = layers[-1]
    return x @ weight + bias


def actor_layers(mlp: fql.MLP) -> list:
    return [(m.weight, m.bias) for m in mlp.net if isinstance(m, fql.Dense)]


def critic_member_layers(critic: fql.MLP, member: int):
    layers = [(m.weight[member], m.bias[member, 0]) for m in critic.net if isinstance(m, fql.Dense)]
    norms = [(m.weight[member, 0], m.bias[member, 0]) for m in critic.net if isinstance(m, fql.EnsembleLayerNorm)]
    return layers, norms


def manual_actor(mlp: fql.MLP, *inputs):
    return manual_mlp(actor_layers(mlp), torch.cat(inputs, -1))


def manual_q(critic: fql.MLP, obs, actions):
    """Each member on its own, one after the other."""
    qs = []
    for member in range(2):
        layers, norms = critic_member_layers(critic, member)
        qs.append(manual_mlp(layers, torch.cat([obs, actions], -1), norms)[:, 0])
    return torch.stack(qs)


def manual_losses(nets: fql.FQLNetworks, b: dict, n: dict, cfg: fql.Config) -> dict:
    """Each loss term of FQL, with gradients only where the official code lets them flow. With QC's windows
    (a batch with `valid`, (batch, H)): the target bootstraps with discount^H, the critic's squared errors are
    weighted by the last step's validity, and with action chunks each step's BC errors by its own; every mean
    still counts the invalid entries (QC's acfql.py)."""
    obs, a = b["observations"], b["actions"]
    valid = b.get("valid", torch.ones_like(b["rewards"])[:, None])
    with torch.no_grad():
        next_a = manual_actor(nets.actor_onestep, b["next_observations"], n["z_next"])
        next_qs = manual_q(nets.target_critic, b["next_observations"], next_a.clamp(-1, 1))
        next_q = next_qs.min(0).values if cfg.q_agg == "min" else next_qs.mean(0)
        target = b["rewards"] + cfg.discount ** cfg.horizon * b["masks"] * next_q
        x = n["z"]
        for i in range(cfg.flow_steps):
            t = torch.full_like(x[:, :1], i / cfg.flow_steps)
            x = x + manual_actor(nets.actor_bc_flow, obs, x, t) / cfg.flow_steps
        flow_target = x.clamp(-1, 1)
    critic = ((manual_q(nets.critic, obs, a) - target) ** 2 * valid[:, -1]).mean()
    x_t = (1 - n["t"]) * n["x0"] + n["t"] * a
    bc_errors = (manual_actor(nets.actor_bc_flow, obs, x_t, n["t"]) - (a - n["x0"])) ** 2
    if cfg.action_chunking:  # step i of the chunk: its columns i * A ... (i + 1) * A - 1
        bc_errors = bc_errors * valid.repeat_interleave(a.shape[1] // valid.shape[1], dim=1)
    bc = bc_errors.mean()
    mu = manual_actor(nets.actor_onestep, obs, n["z"])
    distill = ((mu - flow_target) ** 2).mean()
    frozen_critic = copy.deepcopy(nets.critic).requires_grad_(False)
    q = manual_q(frozen_critic, obs, mu.clamp(-1, 1)).mean(0)
    q_loss = -q.mean()
    if cfg.normalize_q_loss:
        q_loss = q_loss / q.abs().mean().detach()
    return dict(critic=critic, bc=bc, distill=distill, q_loss=q_loss, q=q.mean(),
                total=critic + bc + cfg.alpha * distill + q_loss)


def float64_setup(**cfg_overrides):
    """Networks and inputs in float64, so a deviation from the formulas stands out of rounding."""
    torch.manual_seed(0)
    cfg = make_config(**cfg_overrides)
    nets = fql.FQLNetworks((7,), 3, cfg).double()
    with torch.no_grad():  # a target critic that differs from the critic, as after some training
        for p in nets.target_critic.parameters():
            p.add_(0.1 * torch.randn_like(p))
        nets.actor_onestep.net[-1].weight.mul_(5)  # actions beyond [-1, 1], so the clipping matters
    return cfg, nets, random_batch(64, 7, 3, torch.float64), fixed_noise(64, 3, torch.float64)


# ----------------------------------------------------------------------------------------------
# Losses and gradients
# ----------------------------------------------------------------------------------------------
def assert_losses_are(nets, batch, noise, cfg) -> dict:
    """fql_losses equal the direct formulas (manual_losses) term by term, in float64; returns those."""
    total, metrics = fql.fql_losses(nets, batch, noise, cfg.alpha, cfg, with_metrics=True)
    expected = manual_losses(nets, batch, noise, cfg)
    close = dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(metrics["critic/critic_loss"], expected["critic"], **close)
    torch.testing.assert_close(metrics["actor/bc_flow_loss"], expected["bc"], **close)
    torch.testing.assert_close(metrics["actor/distill_loss"], expected["distill"], **close)
    torch.testing.assert_close(metrics["actor/q_loss"], expected["q_loss"], **close)
    torch.testing.assert_close(metrics["actor/q"], expected["q"], **close)
    torch.testing.assert_close(total, expected["total"], **close)
    torch.testing.assert_close(metrics["actor/actor_loss"], expected["total"] - expected["critic"], **close)
    return expected


@pytest.mark.parametrize("q_agg,normalize_q_loss", [("mean", False), ("min", False), ("mean", True)])
def test_losses_equal_direct_formulas(q_agg, normalize_q_loss):
    cfg, nets, batch, noise = float64_setup(q_agg=q_agg, normalize_q_loss=normalize_q_loss)
    expected = assert_losses_are(nets, batch, noise, cfg)
    assert expected["distill"].item() > 0 and expected["critic"].item() > 0  # the check is not vacuous
    assert nets.actor_onestep(batch["observations"], noise["z"]).abs().max() > 1  # clipping is exercised


def test_dataset_on_device_clips_actions_and_samples_whole_transitions():
    n = 1000
    index = np.arange(n, dtype=np.float32)
    dataset = dict(observations=np.stack([index, index], 1), next_observations=np.stack([index + 1, index], 1),
                   actions=np.linspace(-1, 1, n)[:, None], rewards=-index, masks=index % 2, terminals=index * 0)
    data = fql.to_device(dataset, "cpu")
    assert set(data) == {"observations", "actions", "rewards", "masks", "next_observations", "terminals"}
    assert data["actions"].dtype == torch.float32
    assert data["actions"].max() == np.float32(1 - 1e-5) and data["actions"].min() == np.float32(-1 + 1e-5)
    generators = [torch.Generator().manual_seed(seed) for seed in (1, 2)]
    batches = fql.sample_batch(data, 4096, generators)  # one batch per seed's generator, stacked
    assert list(batches) == ["actions", "rewards", "masks", "observations", "next_observations"]  # FQL's
    assert batches["observations"].shape == (2, 4096, 2) and batches["rewards"].shape == (2, 4096)
    for seed, batch in zip((1, 2), (dict(zip(batches, values)) for values in zip(*batches.values()))):
        i = batch["observations"][:, 0]
        assert torch.equal(batch["next_observations"][:, 0], i + 1) and torch.equal(batch["rewards"], -i)
        assert torch.equal(batch["masks"], i % 2) and len(torch.unique(i)) > 900  # uniform over the dataset
        alone = fql.sample_batch(data, 4096, [torch.Generator().manual_seed(seed)])  # the seed's draws, its own
        assert all(torch.equal(alone[k][0], batch[k]) for k in batch)
    assert not torch.equal(batches["observations"][0], batches["observations"][1])


def test_noise_draws_are_independent_and_follow_the_generator():
    noises = fql.draw_noise(20_000, 2, "cpu", [torch.Generator().manual_seed(s) for s in (0, 1)])
    assert {k: tuple(v.shape) for k, v in noises.items()} == dict(x0=(2, 20_000, 2), t=(2, 20_000, 1),
                                                                    z=(2, 20_000, 2), z_next=(2, 20_000, 2))
    noise = {k: v[0] for k, v in noises.items()}  # seed 0's draws
    for key in ("x0", "z", "z_next"):  # standard normal each, and three different draws
        assert abs(noise[key].mean()) < 0.03 and abs(noise[key].std() - 1) < 0.03
    assert max(abs(torch.corrcoef(torch.stack([noise[k][:, 0] for k in ("x0", "z", "z_next")]))
                   - torch.eye(3)).flatten()) < 0.05
    assert noise["t"].min() >= 0 and noise["t"].max() < 1 and abs(noise["t"].mean() - 0.5) < 0.01
    again = fql.draw_noise(20_000, 2, "cpu", [torch.Generator().manual_seed(0)])  # seed 0 alone: the same
    assert all(torch.equal(noise[k], again[k][0]) for k in noise)
    assert not torch.equal(noises["z"][0], noises["z"][1])  # each seed its own


def test_min_and_mean_aggregation_give_different_targets():
    cfg_mean, nets, batch, noise = float64_setup(q_agg="mean")
    loss_mean = fql.fql_losses(nets, batch, noise, cfg_mean.alpha, cfg_mean, True)[1]["critic/critic_loss"]
    loss_min = fql.fql_losses(nets, batch, noise, cfg_mean.alpha, dataclasses.replace(cfg_mean, q_agg="min"), True)[1]
    assert not torch.isclose(loss_mean, loss_min["critic/critic_loss"])


def grads(loss: torch.Tensor, module: nn.Module) -> list:
    params = list(module.parameters())
    got = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [g if g is not None else torch.zeros_like(p) for g, p in zip(got, params, strict=True)]


@pytest.mark.parametrize("normalize_q_loss", [False, True])
def test_gradients_flow_only_where_they_must(normalize_q_loss):
    """Each network's gradient from the summed loss equals the gradient of exactly its own terms:
    the distillation target sends nothing into the BC flow, the Q term nothing into the critic,
    and the critic loss (through a') nothing into the one-step policy."""
    cfg, nets, batch, noise = float64_setup(normalize_q_loss=normalize_q_loss)
    total, _ = fql.fql_losses(nets, batch, noise, cfg.alpha, cfg)
    e = manual_losses(nets, batch, noise, cfg)
    own_terms = {"critic": e["critic"], "actor_bc_flow": e["bc"],
                 "actor_onestep": cfg.alpha * e["distill"] + e["q_loss"]}
    for name, own in own_terms.items():
        module = getattr(nets, name)
        for got, want in zip(grads(total, module), grads(own, module), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    # and the paths that must carry gradient really do
    assert all(g.abs().sum() > 0 for g in grads(e["q_loss"], nets.actor_onestep)[-1:])
    assert grads(e["bc"], nets.actor_bc_flow)[-1].abs().sum() > 0
    # the summed loss never touches the target critic
    assert all(not p.requires_grad for p in nets.target_critic.parameters())
    # the agent's loss (fql_losses mapped by torch.vmap over its stacked parameters) sends the same gradients
    expected = {name: grads(own, getattr(nets, name)) for name, own in own_terms.items()}
    agent = fql.FQLAgent([nets], cfg, [torch.Generator()], [cfg.alpha], [0])
    loss, _ = agent.losses_eager(one(batch), one(noise))
    for name, want in expected.items():
        stacked = [agent.params[f"{name}.{p}"] for p, _ in getattr(nets, name).named_parameters()]
        for got, w in zip(torch.autograd.grad(loss, stacked, retain_graph=True), want, strict=True):
            torch.testing.assert_close(got[0], w, rtol=1e-9, atol=1e-12)


def test_q_term_alone_moves_the_one_step_policy():
    cfg, nets, batch, noise = float64_setup(alpha=0.0)
    # With alpha = 0, the one-step policy's only loss is the Q term
    total, _ = fql.fql_losses(nets, batch, noise, cfg.alpha, cfg)
    onestep_grad = grads(total, nets.actor_onestep)
    assert sum(float(g.abs().sum()) for g in onestep_grad) > 0
    q_only = manual_losses(nets, batch, noise, cfg)["q_loss"]
    for got, want in zip(onestep_grad, grads(q_only, nets.actor_onestep), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Action chunking (QC-FQL, FQL-n): windows, losses, acting
# ----------------------------------------------------------------------------------------------
def window_dataset(n=14, action_dim=2):
    """Rows whose values name them: observation (i, -i), action i / 100 + its column, reward i; masks 0 every
    third row (a success), episodes ending at rows 4 and 9 (windows cross them)."""
    rows = np.arange(n, dtype=np.float32)
    return dict(observations=np.stack([rows, -rows], 1), next_observations=np.stack([rows + 1, -rows - 1], 1),
                actions=rows[:, None] / 100 + np.arange(action_dim) / 10, rewards=rows,
                masks=(rows % 3 != 2).astype(np.float32), terminals=np.isin(rows, [4, 9]).astype(np.float32))


@pytest.mark.parametrize("chunking", [True, False], ids=["QC-FQL", "FQL-n"])
def test_windows_are_qcs_sample_sequence(chunking):
    """Each sampled window against a direct computation of QC's sample_sequence from its start row: starts
    uniform over [0, n - H], actions time-major (FQL-n: the first), the discounted reward sum, the masks'
    running minimum, s_{t+H}, and valid_i = 1 - (an episode ended at a step before i)."""
    horizon, n = 4, 14
    dataset = window_dataset(n)
    cfg = make_config(horizon=horizon, discount=0.9, action_chunking=chunking)
    generators = [torch.Generator().manual_seed(seed) for seed in (0, 1)]
    batch = fql.sample_batch(fql.to_device(dataset, "cpu"), 3000, generators, cfg=cfg)
    starts = batch["observations"][..., 0].long()
    assert set(starts.flatten().tolist()) == set(range(n - horizon + 1))  # every start, none past n - H
    for seed in (0, 1):
        for i, start in enumerate(starts[seed].tolist()[:200]):
            window = range(start, start + horizon)
            actions = dataset["actions"][list(window)]
            ended = np.maximum.accumulate(dataset["terminals"][list(window)])
            expected = dict(
                actions=actions.reshape(-1) if chunking else actions[0],
                rewards=sum(0.9**k * dataset["rewards"][row] for k, row in enumerate(window)),
                masks=min(dataset["masks"][row] for row in window),
                next_observations=dataset["next_observations"][start + horizon - 1],
                valid=np.concatenate([[1.0], 1 - ended[:-1]]),
            )
            for key, value in expected.items():
                np.testing.assert_allclose(batch[key][seed, i].numpy(), value, rtol=1e-6, err_msg=key)
    assert 0 < batch["valid"][..., -1].mean() < 1  # windows across an episode's end are in the batch


def test_horizon_1_is_fql_and_the_chunk_path_reduces_to_it_exactly():
    """--horizon 1 samples the plain FQL batch (no window fields) and the update is FQL's. A batch in the form
    of QC's windows with H = 1 (every step valid, discount^1) gives the same losses, gradients and parameters
    after a few updates, bit for bit."""
    data = fql.to_device(window_dataset(50, action_dim=3), "cpu")
    assert list(fql.sample_batch(data, 8, cfg=make_config(horizon=1))) == [
        "actions", "rewards", "masks", "observations", "next_observations"]
    torch.manual_seed(0)
    plain = make_agent(2, 3, make_config(horizon=1))
    chunked = fql.FQLAgent([copy.deepcopy(plain.nets)], plain.cfg, [torch.Generator()], [plain.cfg.alpha], [0])
    for step in range(5):
        batch = one(random_batch(64, 2, 3, seed=step))
        noise = one(fixed_noise(64, 3, seed=step))
        window = {**batch, "valid": torch.ones(1, 64, 1)}
        losses = [agent.losses_eager(b, noise, with_metrics=True) for agent, b in ((plain, batch), (chunked, window))]
        for key, value in losses[0][1].items():
            assert torch.equal(value, losses[1][1][key]), key
        grads = [torch.autograd.grad(loss, [p for p in agent.params.values() if p.requires_grad])
                 for (loss, _), agent in zip(losses, (plain, chunked))]
        assert all(torch.equal(g, h) for g, h in zip(*grads))
        plain.update(batch, noise)
        chunked.update(window, noise)
    for name, p in plain.params.items():
        assert torch.equal(p, chunked.params[name]), name


@pytest.mark.parametrize("chunking", [True, False], ids=["QC-FQL", "FQL-n"])
def test_chunked_losses_equal_direct_formulas(chunking):
    """QC's losses on known inputs: a chunk of 3 actions (FQL-n: one) whose windows are partly invalid."""
    torch.manual_seed(0)
    cfg = make_config(horizon=3, action_chunking=chunking, discount=0.9)
    nets = fql.FQLNetworks((7,), 2, cfg).double()
    assert nets.chunk_dim == (6 if chunking else 2) and nets.action_dim == 2
    with torch.no_grad():
        for p in nets.target_critic.parameters():
            p.add_(0.1 * torch.randn_like(p))
    batch = random_batch(64, 7, nets.chunk_dim, torch.float64)
    batch["valid"] = (torch.rand(64, 3, generator=torch.Generator().manual_seed(1)) > 0.3).double().cummin(1).values
    batch["valid"][:, 0] = 1
    noise = fixed_noise(64, nets.chunk_dim, torch.float64)
    expected = assert_losses_are(nets, batch, noise, cfg)
    unweighted = manual_losses(nets, {**batch, "valid": torch.ones_like(batch["valid"])}, noise, cfg)
    assert not torch.isclose(unweighted["critic"], expected["critic"])  # the weights matter here
    assert chunking != bool(torch.isclose(unweighted["bc"], expected["bc"]))  # FQL-n: BC unweighted


@pytest.mark.parametrize("horizon", [1, 5])
def test_an_agent_of_a_grid_trains_as_its_run_alone(horizon):
    """A grid of 2 tasks x 2 alphas x 2 seeds: the agent last on every axis (task 3, alpha 30, seed 1) starts as
    its run alone does and follows it step for step: its own task's rewards and masks (a column of the shared
    data, windows included), its own alpha, its own batches and noise."""
    cfg = fql.resolve_config(make_config(env="ogbench-cube-single", tasks=(1, 3), alphas=(3.0, 30.0), seeds=(0, 1),
                                         horizon=horizon))
    dataset = window_dataset(200, action_dim=3)
    rows = dataset["rewards"]
    dataset["rewards"] = np.stack([rows, -2 * rows], 1)  # task 1's column, task 3's
    dataset["masks"] = np.stack([dataset["masks"], (rows % 4 != 3).astype(np.float32)], 1)
    data = fql.to_device(dataset, "cpu")
    grid = fql.make_agent(cfg, (2,), 3)
    runs = fql.agent_runs(cfg)
    assert [(run.env[-8:-3], run.alpha, run.seed) for run in runs] == [
        (f"task{t}", a, s) for t in (1, 3) for a in (3.0, 30.0) for s in (0, 1)]
    alone = runs[-1]  # the config --env ogbench-cube-single-task3 --alpha 30 --seed 1 gives
    assert alone == fql.resolve_config(make_config(env="ogbench-cube-single-task3", alpha=30.0, seed=1,
                                                   horizon=horizon, run_dir=alone.run_dir))
    single = fql.make_agent(alone, (2,), 3)
    single_data = dict(data, rewards=data["rewards"][:, 1:], masks=data["masks"][:, 1:])  # its task alone
    assert torch.equal(grid.generators[-1].get_state(), single.generators[0].get_state())
    for name, p in single.params.items():
        assert torch.equal(grid.params[name][-1], p[0]), name
    for _ in range(5):
        got = grid.train_step(functools.partial(fql.sample_batch, data, cfg=cfg), with_metrics=True)
        want = single.train_step(functools.partial(fql.sample_batch, single_data, cfg=alone), with_metrics=True)
        for key in want:
            torch.testing.assert_close(got[key][-1], want[key][0], msg=key)
    for name, p in single.params.items():
        torch.testing.assert_close(grid.params[name][-1], p[0], msg=name)
    first = fql.make_agent(runs[0], (2,), 3)  # task 1, alpha 3, seed 0: the grid's first agent, checked likewise
    got = fql.make_agent(cfg, (2,), 3).train_step(functools.partial(fql.sample_batch, data, cfg=cfg), True)
    want = first.train_step(functools.partial(fql.sample_batch, dict(data, rewards=data["rewards"][:, :1],
                                                                     masks=data["masks"][:, :1]), cfg=runs[0]), True)
    for key in want:
        torch.testing.assert_close(got[key][0], want[key][0], msg=key)


class ChunkEnv(gymnasium.Env):
    """Observation = the step count; episodes of 7 steps; records every action it is given."""
    observation_space = gymnasium.spaces.Box(0, 100, (1,))
    action_space = gymnasium.spaces.Box(-1, 1, (1,))

    def __init__(self):
        self.actions = []

    def reset(self, seed=None, options=None):
        self.t = 0
        return np.zeros(1, np.float32), {}

    def step(self, action):
        self.actions.append(float(action[0]))
        self.t += 1
        return np.full(1, self.t, np.float32), 0.0, False, self.t == 7, {"success": 0.0}


def in_process_finetuning(envs, seeds, obs_dim=1, **flags) -> "fql_eval.Finetuning":
    """eval.Finetuning for one agent per env (the agents' seeds `seeds`), its vector env stepping them in this
    process, its buffer without offline rows."""
    cfg = fql.resolve_config(make_config(online_steps=20, seeds=tuple(seeds), **flags))
    empty = dict(observations=torch.zeros(0, obs_dim), actions=torch.zeros(0, 1), rewards=torch.zeros(0, 1),
                 masks=torch.zeros(0, 1), terminals=torch.zeros(0), next_observations=torch.zeros(0, obs_dim))
    runs = [dataclasses.replace(cfg, seed=seed, seeds=(seed,)) for seed in seeds]
    vector_env = gymnasium.vector.SyncVectorEnv([lambda env=env: fql_eval.Replay(env) for env in envs],
                                                autoreset_mode="Disabled")
    return fql_eval.Finetuning(cfg, runs, empty, workers=lambda names: vector_env)


def test_chunks_run_open_loop_and_start_afresh_with_each_episode():
    """A policy that emits chunks of 3 actions is called every 3 steps, its actions run in order, and a new
    episode starts a new chunk (the last chunk of an episode of 7 steps is cut after one action): in
    evaluation (each of two environments its own chunk) and in fine-tuning's collector."""
    calls = []

    def chunk_policy(observations, generators):  # action j of call k: k / 10 + j / 100
        calls.append(observations.copy())
        k = len(calls)
        return np.broadcast_to(k / 10 + np.arange(3) / 100, (*observations.shape[:-1], 3)).copy()

    envs = [ChunkEnv(), ChunkEnv()]
    vector_env = gymnasium.vector.SyncVectorEnv([lambda env=env: env for env in envs], autoreset_mode="Disabled")
    (result,) = fql_eval.evaluate(chunk_policy, vector_env, 4, [0])
    assert result["length"] == 7 and len(calls) == 6  # two rounds of episodes, 3 chunks each
    assert [c[0, :, 0].tolist() for c in calls[:3]] == [[0, 0], [3, 3], [6, 6]]  # at steps 0, 3, 6
    chunks = [[k / 10 + j / 100 for j in range(3)] for k in range(1, 7)]
    expected = chunks[0] + chunks[1] + chunks[2][:1] + chunks[3] + chunks[4] + chunks[5][:1]
    for env in envs:
        np.testing.assert_allclose(env.actions, expected)

    calls.clear()
    env = ChunkEnv()
    online = in_process_finetuning([env], seeds=[0])
    for _ in range(9):
        online.collect(chunk_policy)
    np.testing.assert_allclose(env.actions, chunks[0] + chunks[1] + chunks[2][:1] + chunks[3][:2])
    np.testing.assert_allclose(online.buffer.data["actions"][:9, 0], env.actions)  # each action its own row
    np.testing.assert_array_equal(online.buffer.data["terminals"][:9], [0] * 6 + [1, 0, 0])
    state = online.state_dict(0)["collector"]
    assert state["steps"] == 2 and np.allclose(state["queue"], [[chunks[3][2]]])  # mid-chunk


def test_sparse_rewards_are_qcs():
    dataset = window_dataset(6)
    dataset["rewards"] = np.array([-2, -1, 0, -1, 0, -3], np.float32)
    assert fql.to_device(dataset, "cpu", sparse=True)["rewards"][:, 0].tolist() == [-1, -1, 0, -1, 0, -1]
    assert fql.to_device(dataset, "cpu")["rewards"][:, 0].tolist() == [-2, -1, 0, -1, 0, -3]
    online = in_process_finetuning([TerminatingEnv()], seeds=[0], obs_dim=2, sparse=True)  # reward 1 a step
    online.collect(lambda obs, generators: np.ones((1, 1, 1)))
    assert online.buffer.data["rewards"][0] == -1


# ----------------------------------------------------------------------------------------------
# Initialisation, optimiser, target network
# ----------------------------------------------------------------------------------------------
def test_initialisation_matches_official():
    torch.manual_seed(0)
    nets = fql.FQLNetworks((20,), 4, make_config(actor_hidden_dims=(256, 256), value_hidden_dims=(256, 256)))
    weights = [layer for name in ("actor_bc_flow", "actor_onestep") for layer in actor_layers(getattr(nets, name))]
    weights += [critic_member_layers(nets.critic, e)[0][i] for e in range(2) for i in range(3)]
    assert len(weights) == 3 * 2 + 3 * 2  # 2 hidden + output: 2 actors, 2 critic members
    for weight, bias in weights:  # Xavier uniform: U(-b, b), b = sqrt(6 / (fan_in + fan_out))
        bound = math.sqrt(6 / sum(weight.shape))
        assert weight.abs().max() <= bound and weight.abs().max() > 0.9 * bound
        assert abs(weight.std().item() - bound / math.sqrt(3)) < 0.1 * bound
        assert torch.all(bias == 0)
    for e in range(2):  # LayerNorm starts as the identity affine map in every member
        for scale, shift in critic_member_layers(nets.critic, e)[1]:
            assert torch.all(scale == 1) and torch.all(shift == 0)
    assert not any(isinstance(m, (nn.LayerNorm, fql.EnsembleLayerNorm)) for m in nets.actor_bc_flow.modules())
    assert sum(isinstance(m, fql.EnsembleLayerNorm) for m in nets.critic.modules()) == 2
    gelus = [m for name in ("critic", "actor_bc_flow") for m in getattr(nets, name).modules() if isinstance(m, nn.GELU)]
    assert len(gelus) == 2 * 2 and all(m.approximate == "tanh" for m in gelus)  # hidden layers only, flax's form
    for m in nets.critic.net:  # the two members are drawn independently
        if isinstance(m, fql.Dense):
            assert not torch.equal(m.weight[0], m.weight[1])
    for p, tp in zip(nets.critic.parameters(), nets.target_critic.parameters(), strict=True):
        assert torch.equal(p, tp)


def test_every_parameter_is_optimised_and_target_moves_by_tau():
    torch.manual_seed(0)
    cfg = make_config(tau=0.25)
    agent = make_agent(7, 3, cfg)
    nets = agent.nets
    in_optimiser = {id(p) for group in agent.optimizer.param_groups for p in group["params"]}
    optimised = {name for name, p in agent.params.items() if id(p) in in_optimiser}
    assert len(in_optimiser) == len(optimised)  # every optimised tensor is one of the stacked parameters
    assert optimised == {f"{net}.{name}" for net in ("critic", "actor_bc_flow", "actor_onestep")
                         for name, _ in getattr(nets, net).named_parameters()}
    for name, p in nets.named_parameters():  # the modules hold views of the tensors Adam trains
        assert p.data_ptr() == agent.params[name].data_ptr() and p.shape == agent.params[name].shape[1:]

    before = {name: p.detach().clone() for name, p in nets.named_parameters()}
    agent.update(one(random_batch(64, 7, 3)), one(fixed_noise(64, 3)))
    for name, p in nets.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[name]), f"{name} did not change"
    # The target moves towards the critic's PRE-step parameters, equal to the target at step 1:
    # so the first update leaves the target where it started.
    for name, p in nets.target_critic.named_parameters():
        assert torch.equal(p, before[f"target_critic.{name}"])
    before = {name: p.detach().clone() for name, p in nets.named_parameters()}
    agent.update(one(random_batch(64, 7, 3)), one(fixed_noise(64, 3)))
    for name, p in nets.target_critic.named_parameters():
        expected = 0.75 * before[f"target_critic.{name}"] + 0.25 * before[f"critic.{name}"]
        assert not torch.equal(p, before[f"target_critic.{name}"])
        torch.testing.assert_close(p, expected)


class LoopCritic(nn.Module):
    """The straightforward critic: two separate MLPs evaluated one after the other, holding the same
    weights as fql's batched critic (an MLP of two members)."""

    def __init__(self, batched: fql.MLP):
        super().__init__()
        self.members = nn.ModuleList()
        for member in range(2):
            layers, norms = critic_member_layers(batched, member)
            modules = []
            for i, (weight, bias) in enumerate(layers):
                linear = nn.Linear(*weight.shape)
                linear.weight.data.copy_(weight.T)
                linear.bias.data.copy_(bias)
                modules.append(linear)
                if i < len(norms):
                    norm = nn.LayerNorm(weight.shape[1], eps=1e-6)
                    norm.weight.data.copy_(norms[i][0])
                    norm.bias.data.copy_(norms[i][1])
                    modules += [nn.GELU(approximate="tanh"), norm]
            self.members.append(nn.Sequential(*modules))

    def forward(self, obs, actions):
        return torch.stack([m(torch.cat([obs, actions], -1)).squeeze(-1) for m in self.members])


# ----------------------------------------------------------------------------------------------
# Seed groups: several agents as one batched computation
# ----------------------------------------------------------------------------------------------
def stack(dicts: list) -> dict:
    return {k: torch.stack([d[k] for d in dicts]) for k in dicts[0]}


def equivalent_agents(variant: str) -> tuple:
    """(agent under test, the agents it must train like, tolerances) for each way of computing the updates."""
    torch.manual_seed(0)
    if variant == "per-member critic":  # the batched critic against two separate MLPs holding its weights
        batched = make_agent(7, 3, make_config())
        nets = copy.deepcopy(batched.nets)
        nets.critic = LoopCritic(batched.nets.critic)
        nets.target_critic = LoopCritic(batched.nets.target_critic).requires_grad_(False)
        return batched, [fql.FQLAgent([nets], batched.cfg, [torch.Generator()], [batched.cfg.alpha], [0])], dict(rtol=1e-5, atol=1e-6)
    if variant == "compiled":
        eager = make_agent(7, 3, make_config(**COMPILED))
        compiled = make_agent(7, 3, make_config(**COMPILED, compile=True))
        compiled.nets.load_state_dict(eager.nets.state_dict())
        return compiled, [eager], dict(rtol=1e-4, atol=1e-5)
    # a seed group against the agents its seeds give alone (eager): equal at the start, random streams included
    cfg = fql.resolve_config(make_config(**COMPILED, seeds=(0, 1, 2), compile=variant == "compiled seed group"))
    group = fql.make_agent(cfg, (7,), 3)
    singles = [fql.make_agent(run, (7,), 3) for run in fql.agent_runs(cfg)]  # as --seed N alone
    for single in singles:
        single.losses = single.losses_eager
    assert len(group.agent_nets) == 3 and all(len(single.agent_nets) == 1 for single in singles)
    for k, single in enumerate(singles):
        assert torch.equal(group.generators[k].get_state(), single.generators[0].get_state())
        for (name, p), q in zip(single.nets.state_dict().items(), group.agent_nets[k].state_dict().values()):
            assert torch.equal(p, q), name
    assert not torch.equal(singles[0].nets.critic.net[0].weight, singles[1].nets.critic.net[0].weight)
    return group, singles, dict(rtol=1e-4, atol=1e-5) if cfg.compile else {}  # {}: float32 rounding


def comparable_parameters(nets: nn.Module) -> list:
    """A networks' parameters in one order, a batched critic's laid out as two separate MLPs'."""
    critics = [LoopCritic(c) if isinstance(c, fql.MLP) else c for c in (nets.critic, nets.target_critic)]
    return [p for module in (*critics, nets.actor_bc_flow, nets.actor_onestep) for p in module.parameters()]


@pytest.mark.parametrize("variant", ["per-member critic", pytest.param("compiled", marks=slow), "seed group",
                                     pytest.param("compiled seed group", marks=slow)])
def test_equivalent_computations_train_alike(variant):
    """The same 20 updates computed in different ways agree in every metric and parameter: the batched
    critic and two separate MLPs, compiled and eager, a group of 3 seeds and 3 agents built alone."""
    tested, references, tolerance = equivalent_agents(variant)
    for step in range(20):
        batches = [random_batch(256, 7, 3, seed=100 * step + k) for k in range(len(references))]
        noises = [fixed_noise(256, 3, seed=100 * step + k) for k in range(len(references))]
        with_metrics = step % 5 == 0
        got = tested.update(stack(batches), stack(noises), with_metrics=with_metrics)
        for k, reference in enumerate(references):
            want = reference.update(one(batches[k]), one(noises[k]), with_metrics=with_metrics)
            for key in want:
                torch.testing.assert_close(got[key][k], want[key][0], **tolerance, msg=f"step {step} seed {k} {key}")
    for k, reference in enumerate(references):
        for p, q in zip(comparable_parameters(tested.agent_nets[k]), comparable_parameters(reference.nets), strict=True):
            torch.testing.assert_close(p, q, **tolerance)
        adam, reference_adam = tested.state_dict(k)["optimizer"]["state"], reference.state_dict()["optimizer"]["state"]
        last, reference_last = adam[max(adam)], reference_adam[max(reference_adam)]  # the one-step policy's output bias
        torch.testing.assert_close(last["exp_avg_sq"], reference_last["exp_avg_sq"], **tolerance)
        assert last["step"] == reference_last["step"] == 20


@slow
def test_compiled_policy_acts_as_the_eager_one():
    """act() through torch.compile, for one agent and for a group (one call maps every seed's observations), each
    row's noise from its own generator."""
    cfg = fql.resolve_config(make_config(compile=True, seeds=(0, 1)))
    for seeds, shape in (((0,), (1, 4, 7)), ((0, 1), (2, 4, 7))):
        agent = fql.make_agent(dataclasses.replace(cfg, seeds=seeds), (7,), 3)
        observations = np.random.default_rng(0).normal(size=shape).astype(np.float32)
        rows = len(seeds) * 4
        got = agent.act(observations, generators(rows))
        z = torch.stack([torch.randn(3, generator=generator) for generator in generators(rows)])
        with torch.no_grad():
            want = agent.policy_eager(torch.as_tensor(observations), z.view(*shape[:-1], 3)).numpy()
        assert got.shape == (*shape[:-1], 3) and np.abs(got).max() <= 1
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(got[0], got[1])  # each seed's own policy


def test_seeds_in_a_group_do_not_interact():
    cfg = fql.resolve_config(make_config(seeds=(0, 1, 2)))
    groups = [fql.make_agent(cfg, (7,), 3) for _ in range(2)]
    for step in range(3):
        batches = [random_batch(64, 7, 3, seed=10 * step + k) for k in range(3)]
        noises = [fixed_noise(64, 3, seed=10 * step + k) for k in range(3)]
        groups[0].update(stack(batches), stack(noises))
        batches[1] = random_batch(64, 7, 3, seed=999 + step)  # only seed 1's batch differs
        groups[1].update(stack(batches), stack(noises))
    for name, p in groups[0].params.items():
        assert torch.equal(p[0], groups[1].params[name][0]) and torch.equal(p[2], groups[1].params[name][2]), name
    assert not torch.equal(groups[0].params["critic.net.0.weight"][1], groups[1].params["critic.net.0.weight"][1])


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=slow)], ids=["eager", "compiled"])
def test_gradients_come_in_their_parameters_layout(compiled):
    """Autograd copies, at every step, a gradient laid out otherwise than its parameter (as nn.Linear's transposed
    weight gradient under vmap was): every gradient comes in its parameter's layout, for one seed and a group."""
    cfg = fql.resolve_config(make_config(**COMPILED, compile=compiled))
    for seeds in ((0,), (0, 1, 2)):
        agent = fql.make_agent(dataclasses.replace(cfg, seeds=seeds), (7,), 3)
        trained = {name: p for name, p in agent.params.items() if p.requires_grad}
        strides = {}
        for name, p in trained.items():  # a hook sees the gradient before autograd accumulates it
            p.register_hook(lambda grad, name=name: strides.update({name: grad.stride()}))
        batches = [random_batch(256, 7, 3, seed=k) for k in seeds]
        noises = [fixed_noise(256, 3, seed=k) for k in seeds]
        agent.update(stack(batches), stack(noises))
        assert strides.keys() == trained.keys()
        for name, p in trained.items():  # strides of dimensions of size 1 do not matter
            assert [s for s, n in zip(strides[name], p.shape) if n > 1] == \
                   [s for s, n in zip(p.stride(), p.shape) if n > 1], name


@slow
# ----------------------------------------------------------------------------------------------
# Behaviour: a contextual bandit with two action modes of different value
# ----------------------------------------------------------------------------------------------
def test_bc_flow_keeps_both_modes_and_one_step_policy_picks_the_better():
    torch.manual_seed(0)
    n = 4096
    context = torch.rand(n, 2) * 2 - 1
    mode = torch.randint(0, 2, (n, 1)) * 2 - 1.0  # -1 or +1, half each
    actions = (0.6 * mode + 0.05 * torch.randn(n, 1)).clamp(-1, 1)
    better = torch.sign(context[:, :1])  # the better mode flips with the context
    rewards = (mode == better).float()[:, 0]
    data = dict(observations=context, actions=actions, rewards=rewards[:, None], masks=torch.zeros(n, 1),
                next_observations=context)
    # alpha 0.3: leaving the flow's mode costs alpha * 1.2^2 = 0.43 of distillation loss for a Q gain of 1
    cfg = make_config(alpha=0.3, actor_hidden_dims=(64, 64), value_hidden_dims=(64, 64), lr=1e-3)
    agent = make_agent(2, 1, cfg)
    for _ in range(1000):
        agent.train_step(functools.partial(fql.sample_batch, data))

    test_context = torch.rand(2000, 2) * 2 - 1
    better_sign = torch.sign(test_context[:, :1])
    with torch.no_grad():
        flow = fql.flow_actions(agent.nets.actor_bc_flow, test_context, torch.randn(2000, 1), cfg.flow_steps)
    near_plus, near_minus = ((flow - 0.6).abs() < 0.2).float().mean(), ((flow + 0.6).abs() < 0.2).float().mean()
    assert near_plus > 0.3 and near_minus > 0.3, (near_plus, near_minus)  # both modes, about half each
    assert (torch.sign(flow) == better_sign).float().mean() < 0.6  # the BC flow ignores rewards

    policy = torch.as_tensor(agent.act(test_context.numpy()[None], generators(2000))[0])
    picks_better = (torch.sign(policy) == better_sign).float().mean()
    assert picks_better > 0.8, picks_better


# ----------------------------------------------------------------------------------------------
# The GPU path, proven on a CPU: a recorded step never waits for the device nor reads host data
# ----------------------------------------------------------------------------------------------
aten = torch.ops.aten
HOST_READS = {  # ops whose result the host must wait for: a CUDA graph cannot record them
    aten._local_scalar_dense.default: "a device value read on the host (.item(), float(), int(), bool())",
    aten.nonzero.default: "nonzero (its shape depends on the data)",
    aten.masked_select.default: "masked_select (its shape depends on the data)",
    aten.equal.default: "torch.equal (a host bool)",
    aten.lift_fresh.default: "a tensor made from host data (torch.tensor, torch.as_tensor, from_numpy): a CUDA graph "
                             "replays the value it recorded",
}
HOST_COPIES = {"item", "tolist", "cpu", "numpy", "__array__"}  # (on a CPU these reach no dispatched op)


def project_line() -> str:
    """The innermost line of this project's files on the stack, as file:line code."""
    for frame in reversed(traceback.extract_stack()):
        checker = frame.name in ("project_line", "__torch_dispatch__", "__torch_function__")
        if os.path.basename(frame.filename) in ("fql.py", "eval.py", "test_fql.py") and not checker:
            return f"{os.path.basename(frame.filename)}:{frame.lineno} {frame.line}"
    return "?"


def in_adam() -> bool:
    """Called from torch.optim: Adam on a CPU cannot be capturable and reads its step counters on the host; on CUDA
    it is capturable (FQLAgent) and the CUDA-graph tests replay it."""
    frame = sys._getframe(2)
    while frame and f"torch{os.sep}optim{os.sep}" not in frame.f_code.co_filename:
        frame = frame.f_back
    return frame is not None


class DeviceOnly(TorchDispatchMode):
    """Fails, naming the op and the line, on every op that makes the host wait for the device or brings in host data;
    records every other op with its arguments that are not tensors (their shapes, Python numbers), so that two steps
    can be compared: a CUDA graph replays the ops, shapes and numbers of the step it recorded."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not in_adam():
            problem = HOST_READS.get(func)
            indices = args[1] if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default) else []
            if any(index is not None and index.dtype == torch.bool for index in indices):
                problem = "boolean-mask indexing (its shape depends on the data)"
            assert problem is None, f"{problem}: {func} at {project_line()}"
            leaves = torch.utils._pytree.tree_leaves((args, kwargs))
            self.ops.append((str(func), [tuple(v.shape) if isinstance(v, torch.Tensor) else v for v in leaves]))
        return func(*args, **kwargs)


class NoHostCopies(torch.overrides.TorchFunctionMode):
    """Fails on .item(), .tolist(), .cpu(), .numpy() of a tensor: on a GPU each waits for the device."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        assert name not in HOST_COPIES or in_adam(), f"Tensor.{name}() at {project_line()}"
        return func(*args, **(kwargs or {}))


def assert_steps_stay_on_device(step, between):
    """step() once (as CUDAGraphStep's warm-up: Adam's state is made there), then twice under DeviceOnly and
    NoHostCopies, `between()` before each (a buffer grows): the two must run the same ops on the same shapes and
    numbers, as a CUDA graph's replay of the first would."""
    step()
    steps = []
    for _ in range(2):
        between()
        with NoHostCopies(), DeviceOnly() as mode:
            step()
        steps.append(mode.ops)
    assert len(steps[0]) > 100 and steps[0] == steps[1]


def grid_data(n=200, tasks=2, device="cpu"):
    """A window_dataset on the device with a column of rewards and masks per task."""
    dataset = window_dataset(n, action_dim=3)
    dataset["rewards"] = np.stack([dataset["rewards"] * (1 - task) for task in range(tasks)], 1)
    dataset["masks"] = np.stack([dataset["masks"]] * tasks, 1)
    return fql.to_device(dataset, device)


STEP_VARIANTS = {  # each one's config on a grid of 2 tasks x 2 alphas x 2 seeds; "online": fine-tuning's buffer
    "H1": dict(), "H5": dict(horizon=5), "FQL-n": dict(horizon=5, action_chunking=False),
    "online H1": dict(online_steps=10), "online H5": dict(online_steps=10, horizon=5),
    "online balanced": dict(online_steps=10, balanced_sampling=True),
    "pixels": dict(env="ogbench-visual-cube-single", encoder="impala_debug", frame_stack=3, p_aug=0.5),
}


@pytest.mark.parametrize("with_metrics", [False, True], ids=["", "metrics"])
@pytest.mark.parametrize("variant", STEP_VARIANTS)
def test_a_training_step_never_waits_for_the_device_nor_reads_host_data(variant, with_metrics):
    """One training step of each kind, eager, as a CUDA graph records it: no op makes the host wait for the device
    (.item(), float(), nonzero, a mask index, .tolist(), .cpu()), no tensor comes from host data, and two steps
    (the buffer growing between them) run the same ops on the same shapes and numbers. What a step needs that does
    not change (the agents' task columns, index tensors) is on the device before it."""
    cfg = fql.resolve_config(make_config(tasks=(1, 3), alphas=(3.0, 30.0), seeds=(0, 1), **STEP_VARIANTS[variant]))
    agents = len(fql.agent_grid(cfg))
    if cfg.encoder:
        data, _ = compact_pixels([30, 40])
        data = dict(data, rewards=data["rewards"].expand(-1, 2), masks=data["masks"].expand(-1, 2))
    else:
        data = grid_data()
    agent = fql.make_agent(cfg, fql.stacked_shape(data), 3 if not cfg.encoder else 2)
    sample = functools.partial(fql.sample_batch, data, p_aug=cfg.p_aug, cfg=cfg)
    between = lambda: None  # noqa: E731
    if cfg.online_steps:
        offline = {k: v[:0] for k, v in data.items()} if cfg.balanced_sampling else data
        buffer = fql_eval.ReplayBuffer(offline, agents, cfg.online_steps, cfg)
        sample = functools.partial(fql_eval.sample_balanced, data, buffer) if cfg.balanced_sampling else buffer.sample
        rng = np.random.default_rng(0)

        def between():  # one online transition for each agent, as Finetuning.collect adds them
            buffer.add(dict(observations=rng.normal(size=(agents, 2)), actions=rng.uniform(-1, 1, (agents, 3)),
                            rewards=-np.ones((agents, 1)), masks=np.ones((agents, 1)), terminals=np.zeros(agents),
                            next_observations=rng.normal(size=(agents, 2))))
        for _ in range(cfg.horizon):
            between()
    assert_steps_stay_on_device(lambda: agent.train_step(sample, with_metrics), between)


@pytest.mark.parametrize("mutation,expected", [
    ("float(loss) in the update", r"_local_scalar_dense.* at test_fql.py:\d+ float\(loss"),
    ("tasks as a tuple, not a tensor", r"lift_fresh.* at fql.py:\d+ task = torch.as_tensor\(tasks"),
    (".item() in the buffer's sample", r"Tensor.item\(\) at test_fql.py:\d+ buffer.size.item\(\)"),
    ("a Python number that grows with the buffer", r"assert .* == "),
], ids=["float(loss)", "tasks tuple", "buffer .item()", "growing number"])
def test_the_device_check_sees_each_kind_of_host_traffic(mutation, expected):
    """The check above fails on a host read or host data brought into a step, naming it, and on a Python number
    that changes from step to step (which a CUDA graph would replay frozen)."""
    cfg = fql.resolve_config(make_config(seeds=(0, 1), online_steps=10))
    agent = fql.make_agent(cfg, (2,), 3)
    buffer = fql_eval.ReplayBuffer(grid_data(tasks=1), 2, 10, cfg)
    real_losses, real_sample = agent.losses, buffer.sample

    def losses(*args):
        loss, metrics = real_losses(*args)
        float(loss.detach())
        return loss, metrics

    def sample(*args):
        if mutation.startswith(".item()"):
            buffer.size.item()
        batch = real_sample(*args)
        if mutation.startswith("a Python number"):
            batch["rewards"] = batch["rewards"] - buffer.added
        return batch

    def between():
        buffer.add(dict(observations=np.zeros((2, 2)), actions=np.zeros((2, 3)), rewards=np.zeros((2, 1)),
                        masks=np.ones((2, 1)), terminals=np.zeros(2), next_observations=np.zeros((2, 2))))
    if mutation.startswith("float"):
        agent.losses = losses
    if mutation.startswith("tasks"):
        agent.tasks = (0, 0)  # torch.as_tensor of it in every step
    with pytest.raises(AssertionError, match=expected):
        assert_steps_stay_on_device(lambda: agent.train_step(sample), between)


# ----------------------------------------------------------------------------------------------
# A real OGBench environment: tiny dataset, CLI run, evaluation, checkpoints, resume
# ----------------------------------------------------------------------------------------------
def write_cube_dataset(directory, train_episodes=3, val_episodes=1, steps=100, seed=0):
    """Step OGBench's cube-single-v0 with random actions and save it in OGBench's file layout."""
    env = gymnasium.make("cube-single-v0", terminate_at_goal=False, max_episode_steps=steps)
    rng = np.random.default_rng(seed)
    for name, episodes in (("cube-single-play-v0.npz", train_episodes), ("cube-single-play-v0-val.npz", val_episodes)):
        cols = {k: [] for k in ("observations", "actions", "terminals", "qpos", "qvel")}
        for _ in range(episodes):
            ob, _ = env.reset(seed=int(rng.integers(1 << 30)))
            for t in range(steps):
                action = rng.uniform(-1, 1, 5).astype(np.float32)
                next_ob, _, _, _, info = env.step(action)
                for k, v in (("observations", ob), ("actions", action), ("terminals", t == steps - 1),
                             ("qpos", info["prev_qpos"]), ("qvel", info["prev_qvel"])):
                    cols[k].append(v)
                ob = next_ob
        np.savez(os.path.join(directory, name), **{k: np.asarray(v, dtype=bool if k == "terminals" else np.float32)
                                                   for k, v in cols.items()})


@pytest.fixture(scope="module")
def cube_data(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ogbench")
    write_cube_dataset(str(directory))
    return str(directory)


def run_cli(cube_data, run_dir, *flags):
    return fql.main(["--env", "ogbench-cube-single", "--dataset_dir", cube_data, "--run_dir", str(run_dir),
                     "--no-compile", "--eval_interval", "0", *SMALL, *flags])


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@slow
def test_real_run_trains_logs_evaluates_and_checkpoints(cube_data, tmp_path):
    run_dir = tmp_path / "run"
    agent = run_cli(cube_data, run_dir, "--offline_steps", "100", "--log_interval", "50", "--save_interval", "60",
                    "--eval_interval", "100", "--eval_episodes", "1", "--batch_size", "64")
    rows = read_csv(run_dir / "train.csv")
    assert [int(r["step"]) for r in rows] == [50, 100]
    for key in ("critic/critic_loss", "critic/q_mean", "critic/q_max", "critic/q_min", "actor/actor_loss",
                "actor/bc_flow_loss", "actor/distill_loss", "actor/q_loss", "actor/q", "actor/mse",
                "validation/critic/critic_loss", "validation/actor/bc_flow_loss", "time/updates_per_sec"):
        assert all(math.isfinite(float(r[key])) for r in rows), key
    (evaluation,) = read_csv(run_dir / "eval.csv")
    assert int(evaluation["step"]) == 100 and float(evaluation["evaluation/length"]) == 200  # cube-single: 200 steps
    # 100 steps on random actions never put the cube on its goal: -1 for each of the 200 steps
    assert float(evaluation["evaluation/success"]) == 0 and float(evaluation["evaluation/return"]) == -200

    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert state["step"] == 100
    assert state["config"]["env"] == "cube-single-play-singletask-task2-v0" and state["config"]["alpha"] == 300
    for name, p in agent.nets.state_dict().items():
        assert torch.equal(state["nets"][name], p)
    assert not os.path.exists(run_dir / "checkpoint.pt.tmp")


def test_checkpoint_round_trip_restores_networks_optimiser_and_rng(tmp_path):
    torch.manual_seed(0)
    cfg = make_config(run_dir=str(tmp_path))
    agent = make_agent(7, 3, cfg)
    agent.update(one(random_batch(64, 7, 3)), one(fixed_noise(64, 3)))
    path = str(tmp_path / "checkpoint.pt")
    fql.save_checkpoints(agent, 1, [cfg])
    state = torch.load(path, weights_only=True)  # as if saved on a GPU: Adam's flags there were capturable
    state["optimizer"]["param_groups"][0]["capturable"] = True
    torch.save(state, path)
    expected_act = agent.act(np.ones((1, 4, 7), np.float32), generators(4))
    expected_update = agent.update(one(random_batch(64, 7, 3)), one(fixed_noise(64, 3)), with_metrics=True)

    torch.manual_seed(99)
    restored = make_agent(7, 3, cfg)
    assert fql.load_checkpoints(restored, [cfg])[0]["step"] == 1
    assert restored.optimizer.param_groups[0]["capturable"] is False  # the flags follow this agent's device
    np.testing.assert_array_equal(restored.act(np.ones((1, 4, 7), np.float32), generators(4)), expected_act)
    got_update = restored.update(one(random_batch(64, 7, 3)), one(fixed_noise(64, 3)), with_metrics=True)
    for key, value in expected_update.items():  # same Adam moments, so the same next step
        torch.testing.assert_close(got_update[key], value, rtol=0, atol=0)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    cfg = make_config(run_dir=str(tmp_path))
    agent = make_agent(7, 3, cfg)
    path = str(tmp_path / "checkpoint.pt")
    fql.save_checkpoints(agent, 5, [cfg])

    def killed_mid_write(obj, f):
        with open(f, "wb") as handle:
            handle.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(fql.torch, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        fql.save_checkpoints(agent, 6, [cfg])
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 5


def killed_after(monkeypatch, steps: int, owner=fql.FQLAgent, method: str = "train_step") -> list:
    """From now on, call number `steps` of owner.method (a training step by default) raises KeyboardInterrupt."""
    real, calls = getattr(owner, method), []

    def killed(*args, **kwargs):
        calls.append(1)
        if len(calls) == steps:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, method, killed)
    return calls


def untimed_rows(path) -> list:
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in read_csv(path)]


@slow
def test_a_run_killed_again_and_again_resumes_to_the_uninterrupted_run(cube_data, tmp_path, monkeypatch):
    """The cluster pattern: the same command, always with --resume, after each kill (the first before any
    checkpoint). Parameters, train.csv and eval.csv end as an uninterrupted run's; the evaluation workers
    end with every kill; a restart without --resume or with other flags is refused and changes nothing."""
    flags = ("--offline_steps", "60", "--log_interval", "10", "--save_interval", "20", "--batch_size", "32")
    straight = run_cli(cube_data, tmp_path / "straight", *flags, "--resume")  # a folder that does not exist yet
    vector_envs, make_vector_env = [], fql_eval.make_vector_env
    monkeypatch.setattr(fql_eval, "make_vector_env", lambda *args: vector_envs.append(make_vector_env(*args))
                        or vector_envs[-1])
    run = tmp_path / "killed"
    # each attempt runs this many steps before its kill: at step 5 (no checkpoint yet), 35 and 55
    for steps, saved_step in ((5, None), (35, 20), (35, 40)):
        calls = killed_after(monkeypatch, steps)
        spelling = str(run) + "/" if saved_step == 40 else os.path.relpath(run)  # the same folder either way
        evaluation = ("--eval_interval", "30", "--eval_episodes", "1") if saved_step == 20 else ()
        with pytest.raises(SystemExit, match="the same command with --resume continues"):
            run_cli(cube_data, spelling, *flags, *evaluation, "--resume")
        assert len(calls) == steps
        assert (torch.load(run / "checkpoint.pt", weights_only=True)["step"] if saved_step else None) == saved_step
        assert all(not process.is_alive() for env in vector_envs for process in env.processes)
        assert len(vector_envs) == (saved_step is not None)
        if saved_step == 20:
            assert [r["step"] for r in read_csv(run / "eval.csv")] == ["30"]  # evaluated after the checkpoint
            kept = {name: (run / name).read_bytes() for name in ("checkpoint.pt", "config.json", "train.csv")}
            with pytest.raises(SystemExit, match="already holds a run; add --resume"):
                run_cli(cube_data, run, *flags)
            with pytest.raises(SystemExit, match="differs from the run in .* in alpha"):
                run_cli(cube_data, run, *flags, "--resume", "--alpha", "1")
            assert kept == {name: (run / name).read_bytes() for name in kept}
    monkeypatch.undo()
    resumed = run_cli(cube_data, run, *flags, "--resume")
    for (name, p), q in zip(straight.nets.state_dict().items(), resumed.nets.state_dict().values(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)
    assert [r["step"] for r in read_csv(run / "train.csv")] == ["10", "20", "30", "40", "50", "60"]
    assert untimed_rows(run / "train.csv") == untimed_rows(tmp_path / "straight" / "train.csv")
    assert read_csv(run / "eval.csv") == []  # the evaluation at step 30 came after the checkpoint resumed from


@pytest.mark.parametrize("log_interval,message", [("10", "critic/critic_loss is nan at step 30"),
                                                  ("100", "its parameters are not finite at step 40")])
def test_a_diverging_run_stops_before_it_overwrites_its_checkpoint(cube_data, tmp_path, monkeypatch, log_interval,
                                                                   message):
    """NaN parameters from step 25 on: the run stops at the first log step that sees a non-finite metric,
    or else at the next checkpoint, whose last good copy (step 20) stays as it was."""
    real_step, calls = fql.FQLAgent.train_step, []

    def poisoned_step(agent, sample, with_metrics=False):
        calls.append(1)
        if len(calls) == 25:
            agent.params["critic.net.0.weight"].data[0, 0, 0, 0] = float("nan")
        return real_step(agent, sample, with_metrics)

    monkeypatch.setattr(fql.FQLAgent, "train_step", poisoned_step)
    with pytest.raises(SystemExit, match=f"training diverged in {tmp_path}: {message}. Stopped before saving"):
        run_cli(cube_data, tmp_path, "--offline_steps", "60", "--log_interval", log_interval, "--save_interval", "20",
                "--batch_size", "32")
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] == 20 and all(torch.isfinite(v).all() for v in state["nets"].values())
    if log_interval == "10":  # train.csv holds the step that stopped the run
        rows = read_csv(tmp_path / "train.csv")
        assert [r["step"] for r in rows] == ["10", "20", "30"] and rows[-1]["critic/critic_loss"] == "nan"


def test_unreadable_checkpoints_give_one_line_and_change_nothing(cube_data, tmp_path):
    """A checkpoint that is not a whole checkpoint of this fql.py (a config field of another version, a missing
    part, networks of other shapes, a truncated file) ends in one line from every path that reads one: --resume,
    eval.py, eval.py finetune; and nothing is written."""
    run = tmp_path / "run"
    run_cli(cube_data, run, "--offline_steps", "10", "--batch_size", "32")
    whole = (run / "checkpoint.pt").read_bytes()
    state = torch.load(run / "checkpoint.pt", weights_only=True)

    def broken(change):
        bad = copy.deepcopy(state)
        change(bad)
        return bad

    def older_actor_layout(bad):  # as an fql.py with nn.Linear's (out, in) actor weights wrote it
        bad["nets"]["actor_onestep.net.0.weight"] = bad["nets"]["actor_onestep.net.0.weight"].T.clone()

    cases = [(broken(lambda bad: bad["config"].update(retired_flag=1)), "unexpected keyword argument 'retired_flag'"),
             (broken(lambda bad: bad.pop("rng")), "KeyError: 'rng'"),
             (broken(lambda bad: bad.pop("nets")), "KeyError: 'nets'"),
             (broken(older_actor_layout), "size mismatch for actor_onestep.net.0.weight"),
             (None, "is not a readable checkpoint (RuntimeError; truncated?); delete it to start over")]
    for bad, named in cases:
        if bad is None:
            (run / "checkpoint.pt").write_bytes(whole[: len(whole) // 2])  # truncated, as by a full disk
        else:
            torch.save(bad, run / "checkpoint.pt")
        files = {path.name: path.read_bytes() for path in run.iterdir()}
        for command in (lambda: run_cli(cube_data, run, "--offline_steps", "20", "--batch_size", "32", "--resume"),
                        lambda: fql_eval.main(["--checkpoint", str(run)]),
                        lambda: fql_eval.main(["finetune", "--checkpoint", str(run), "--online_steps", "5"])):
            with pytest.raises(SystemExit) as exit_info:
                command()
            message = str(exit_info.value.code)
            assert message.startswith(("fql.py: error: ", "eval.py: error: ")) and "\n" not in message
            assert f"{run / 'checkpoint.pt'} is " in message and named in message, message
            assert files == {path.name: path.read_bytes() for path in run.iterdir()}  # nothing written
        assert not os.path.exists(str(run) + "-finetune")


def test_a_checkpoint_of_an_earlier_release_resumes_bit_identically_or_is_refused_in_one_line(cube_data, tmp_path):
    """A checkpoint of a release without the chunking, grid and --buffer_size changes (no horizon, action_chunking,
    sparse, tasks, alphas; a buffer_size): the new fields at their defaults, the run resumes as if never stopped,
    and a command that changes a new field is refused. One of a release before 2026-11-29 (numpy's random state as
    a numpy array) is refused in one line that says why: it holds numpy objects."""
    flags = ("--log_interval", "10", "--save_interval", "10", "--batch_size", "32")
    straight = run_cli(cube_data, tmp_path / "straight", "--offline_steps", "20", *flags)
    run_cli(cube_data, tmp_path / "resumed", "--offline_steps", "10", *flags)
    path = tmp_path / "resumed" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)  # made into what the earlier fql.py wrote:
    for field in ("horizon", "action_chunking", "sparse", "tasks", "alphas"):  # fields it did not have
        del state["config"][field]
    state["config"]["buffer_size"] = 2_000_000  # one it had
    torch.save(state, path)
    with pytest.raises(SystemExit, match="differs from the run in .* in horizon"):
        run_cli(cube_data, tmp_path / "resumed", "--offline_steps", "20", *flags, "--resume", "--horizon", "5")
    resumed = run_cli(cube_data, tmp_path / "resumed", "--offline_steps", "20", *flags, "--resume")
    for (name, p), q in zip(straight.nets.state_dict().items(), resumed.nets.state_dict().values(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)
    assert untimed_rows(tmp_path / "resumed" / "train.csv") == untimed_rows(tmp_path / "straight" / "train.csv")

    state["rng"]["numpy"] = np.random.get_state()  # with its key array, as an fql.py before 2026-11-29 kept it
    torch.save(state, path)
    with pytest.raises(SystemExit, match="holds Python objects .*numpy.* and loading them could run code"):
        run_cli(cube_data, tmp_path / "resumed", "--offline_steps", "30", *flags, "--resume")


def test_a_full_disk_while_saving_ends_in_one_line_and_resume_continues(cube_data, tmp_path, monkeypatch):
    """torch.save fails as on a full disk (a partial file, then its RuntimeError) at the first agent's checkpoint
    of step 30: one line names the file, the partial file is gone, every agent's checkpoint of step 20 is whole,
    and once there is space the same command with --resume ends as a run that never failed."""
    flags = ("--offline_steps", "40", "--log_interval", "10", "--save_interval", "10", "--batch_size", "32",
             "--seeds", "0", "1")
    straight = run_cli(cube_data, tmp_path / "straight", *flags)
    real_save, saves = torch.save, []

    def disk_full(state, path):
        saves.append(path)
        if len(saves) == 2 * 2 + 1:
            with open(path, "wb") as f:
                f.write(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        return real_save(state, path)

    monkeypatch.setattr(fql.torch, "save", disk_full)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(cube_data, tmp_path / "full", *flags)
    monkeypatch.undo()
    checkpoint = tmp_path / "full" / "seed0" / "checkpoint.pt"
    assert str(exit_info.value.code) == (
        f"fql.py: error: could not write {checkpoint} ([enforce fail at inline_container.cc:672] . unexpected pos "
        "704 vs 598; is the disk full?). The last checkpoint in that folder is whole: the same command with "
        "--resume continues from it once there is space")
    for seed in (0, 1):
        assert fql.read_checkpoint(str(tmp_path / "full" / f"seed{seed}" / "checkpoint.pt"))["step"] == 20
    assert not list((tmp_path / "full").rglob("*.tmp"))
    resumed = run_cli(cube_data, tmp_path / "full", *flags, "--resume")
    for name, p in straight.params.items():
        torch.testing.assert_close(resumed.params[name], p, rtol=0, atol=0, msg=name)


@slow
def test_a_log_too_large_to_write_stops_the_run_in_one_line(cube_data, tmp_path):
    """A real failed write: `python fql.py` under a file size limit (writes past it fail as on a full disk) that its
    checkpoints fit in and its growing train.csv outgrows. One line names the file; the last checkpoint is whole,
    and --resume without the limit ends as a run that never failed."""
    import resource

    flags = ["--dataset_dir", cube_data, "--offline_steps", "200", "--log_interval", "1", "--save_interval", "50",
             "--eval_interval", "0", "--batch_size", "16", "--no-compile", "--actor_hidden_dims", "4",
             "--value_hidden_dims", "4"]
    straight = fql.main([*flags, "--run_dir", str(tmp_path / "straight")])
    limit = (tmp_path / "straight" / "checkpoint.pt").stat().st_size + 10_000  # train.csv: about 500 bytes a row

    def file_size_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    run = tmp_path / "limited"
    result = subprocess.run([sys.executable, "fql.py", *flags, "--run_dir", str(run)], capture_output=True,
                            text=True, cwd=HERE, env={**os.environ, **WARNINGS_ON}, preexec_fn=file_size_limit)
    one_line_error(result, f"could not write {run / 'train.csv'} ([Errno 27] File too large; is the disk full?)",
                   "--resume continues from it once there is space")
    step = fql.read_checkpoint(str(run / "checkpoint.pt"))["step"]
    assert 50 <= step < 200 and not list(run.glob("*.tmp"))
    resumed = fql.main([*flags, "--run_dir", str(run), "--resume"])
    for name, p in straight.params.items():
        torch.testing.assert_close(resumed.params[name], p, rtol=0, atol=0, msg=name)
    assert untimed_rows(run / "train.csv") == untimed_rows(tmp_path / "straight" / "train.csv")


@pytest.mark.parametrize("where,error", [
    ("make_agent", torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")),
    ("train_step", RuntimeError("[enforce fail at alloc_cpu.cpp:127] . DefaultCPUAllocator: can't allocate memory: "
                                "you tried to allocate 536870912 bytes. Error code 12 (Cannot allocate memory)"))])
def test_running_out_of_memory_names_the_agents_and_the_batch(cube_data, tmp_path, monkeypatch, where, error):
    def out_of_memory(*args, **kwargs):
        raise error

    monkeypatch.setattr(fql.FQLAgent if where == "train_step" else fql, where, out_of_memory)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(cube_data, tmp_path, "--offline_steps", "10", "--batch_size", "32", *GRID)
    assert str(exit_info.value.code) == ("fql.py: error: out of memory on cpu with 8 agents and --batch_size 32: "
                                         "train fewer agents per process, or smaller batches")


def test_a_horizon_longer_than_the_dataset_is_refused(cube_data, tmp_path):
    with pytest.raises(SystemExit, match="--horizon 1000 is longer than a split of cube-single-play-singletask-"):
        run_cli(cube_data, tmp_path / "run", "--offline_steps", "10", "--horizon", "1000")
    assert not (tmp_path / "run").exists()


class CodeInAPickle:
    """Unpickled, it runs a shell command: what loading a checkpoint must never do."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@slow
def test_a_checkpoint_that_would_run_code_is_refused_by_every_path(cube_data, tmp_path):
    """eval.py, eval.py finetune, fql.py --resume and a group's --resume, as users run them, refuse a checkpoint
    whose unpickling would create a file: one line, the file never created, nothing written."""
    group = tmp_path / "group"
    run_cli(cube_data, group, "--seeds", "0", "1", "--offline_steps", "2", "--batch_size", "16")
    crafted = group / "seed1" / "checkpoint.pt"
    marker = tmp_path / "code-ran"
    state = torch.load(crafted, weights_only=True)
    state["nets"] = CodeInAPickle(f"touch {marker}")
    torch.save(state, crafted)
    written = files_in(tmp_path)
    train = ["fql.py", "--dataset_dir", cube_data, "--offline_steps", "4", "--batch_size", "16", "--no-compile", *SMALL,
             "--resume"]
    for command in (["eval.py", "--checkpoint", str(group / "seed1")],
                    ["eval.py", "finetune", "--checkpoint", str(crafted), "--online_steps", "5"],
                    [*train, "--seed", "1", "--run_dir", str(group / "seed1")],
                    [*train, "--seeds", "0", "1", "--run_dir", str(group)]):
        one_line_error(script(*command), f"{crafted} is not a checkpoint of fql.py: it holds Python objects (",
                       "loading them could run code")
        assert not marker.exists()
    assert files_in(tmp_path) == written


def test_unreadable_dataset_files_are_named(cube_data, tmp_path, monkeypatch):
    for name in ("cube-single-play-v0.npz", "cube-single-play-v0-val.npz"):
        with open(os.path.join(cube_data, name), "rb") as f:
            data = f.read()
        (tmp_path / name).write_bytes(data[: len(data) // 2] if name.endswith("-val.npz") else data)
    with pytest.raises(SystemExit) as exit_info:
        fql.main(["--dataset_dir", str(tmp_path), "--run_dir", str(tmp_path / "run"), "--eval_interval", "0"])
    message = str(exit_info.value.code)
    assert f"{tmp_path / 'cube-single-play-v0-val.npz'} is not a readable OGBench dataset" in message
    assert "cube-single-play-v0.npz or" not in message and "delete it to download it again" in message
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))
    (tmp_path / "pen-human-v1.hdf5").write_bytes(b"not an hdf5 file")
    with pytest.raises(SystemExit, match="pen-human-v1.hdf5 is not a readable D4RL file .* delete it to download"):
        fql.main(["--env", "d4rl-pen-human", "--run_dir", str(tmp_path / "run"), "--eval_interval", "0"])
    assert not (tmp_path / "run").exists()


@slow
def test_seed_group_cli_matches_single_runs_resumes_and_feeds_eval(cube_data, tmp_path, monkeypatch):
    """--seeds 0 1 writes a complete ordinary run folder per seed: seed 1 equals --seed 1 alone, a killed
    group resumes exactly, and eval.py evaluates and plots the folders."""
    flags = ("--offline_steps", "50", "--log_interval", "10", "--save_interval", "20", "--batch_size", "32")
    group = run_cli(cube_data, tmp_path / "group", *flags, "--seeds", "0", "1", "--eval_interval", "50",
                    "--eval_episodes", "1")
    single = run_cli(cube_data, tmp_path / "single", *flags, "--seed", "1")
    for (name, p), q in zip(single.nets.state_dict().items(), group.agent_nets[1].state_dict().values(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=name)
    for seed in (0, 1):
        run = tmp_path / "group" / f"seed{seed}"
        with open(run / "config.json") as f:
            assert fql.json.load(f)["seed"] == seed
        assert [r["step"] for r in read_csv(run / "train.csv")] == ["10", "20", "30", "40", "50"]
        (evaluation,) = read_csv(run / "eval.csv")
        assert evaluation["step"] == "50" and float(evaluation["evaluation/length"]) == 200
        state = torch.load(run / "checkpoint.pt", weights_only=True)
        assert state["step"] == 50 and state["config"]["seeds"] == (seed,)
        for name, p in group.agent_nets[seed].state_dict().items():
            assert torch.equal(state["nets"][name], p)
    assert read_csv(tmp_path / "group" / "seed0" / "train.csv") != read_csv(tmp_path / "group" / "seed1" / "train.csv")

    real_replace, renames = os.replace, []

    def killed_between_the_renames_of_step_40(source, destination):
        renames.append(source) if source.endswith("checkpoint.pt.tmp") else None
        if len(renames) == 2 + 2:  # step 20's two renames, then step 40's: killed before seed 1's
            raise KeyboardInterrupt
        return real_replace(source, destination)

    monkeypatch.setattr(fql.os, "replace", killed_between_the_renames_of_step_40)
    with pytest.raises(SystemExit, match="--resume"):
        run_cli(cube_data, tmp_path / "killed", *flags, "--seeds", "0", "1")
    monkeypatch.undo()
    saved = [torch.load(tmp_path / "killed" / f"seed{k}" / "checkpoint.pt", weights_only=True)["step"] for k in (0, 1)]
    assert saved == [40, 20] and os.path.exists(tmp_path / "killed" / "seed1" / "checkpoint.pt.tmp")
    resumed = run_cli(cube_data, tmp_path / "killed", *flags, "--seeds", "0", "1", "--resume")
    for name, p in group.params.items():
        torch.testing.assert_close(resumed.params[name], p, rtol=0, atol=0, msg=name)

    result = fql_eval.main(["--checkpoint", str(tmp_path / "group" / "seed1"), "--episodes", "1", "--device", "cpu"])
    assert result["step"] == 50 and result["episodes"] == 1
    output = tmp_path / "seeds.png"
    fql_eval.main(["plot", *(str(tmp_path / "group" / f"seed{k}") for k in (0, 1)), "--output", str(output)])
    assert output.stat().st_size > 10_000


GRID = ("--tasks", "1", "3", "--alphas", "100", "300", "--seeds", "0", "1")
GRID_AGENTS = list(itertools.product((1, 3), (100, 300), (0, 1)))  # (task, alpha, seed), in the grid's order


@slow
def test_a_grid_on_the_command_line_writes_each_agent_the_folder_of_its_run_alone(cube_data, tmp_path):
    """`python fql.py --tasks 1 3 --alphas 100 300 --seeds 0 1` (evaluation on): eight ordinary run folders, named
    by task, alpha and seed, each with the config, checkpoint, train.csv and eval.csv of that agent run alone
    (--env ogbench-cube-single-task<t> --alpha <a> --seed <s>); `eval.py table` and `plot` read them."""
    flags = ["--dataset_dir", cube_data, "--offline_steps", "20", "--log_interval", "10", "--save_interval", "20",
             "--eval_interval", "20", "--eval_episodes", "1", "--batch_size", "16", "--no-compile", *SMALL]
    grid = script("fql.py", *GRID, "--run_dir", str(tmp_path / "grid"), *flags)
    assert grid.returncode == 0 and console(grid) == [], grid.stderr[-3000:]
    names = [f"task{t}__alpha{a}__seed{s}" for t, a, s in GRID_AGENTS]
    assert sorted(path.name for path in (tmp_path / "grid").iterdir()) == names
    for name, (task, alpha, seed) in zip(names, GRID_AGENTS):
        folder, alone_folder = tmp_path / "grid" / name, tmp_path / "alone" / name
        alone = fql.main(["--env", f"ogbench-cube-single-task{task}", "--alpha", str(alpha), "--seed", str(seed),
                          "--run_dir", str(alone_folder), *flags])
        grid_config, alone_config = (fql.json.loads((run / "config.json").read_text()) for run in (folder, alone_folder))
        assert grid_config == dict(alone_config, run_dir=grid_config["run_dir"])  # all but the folder
        configs = [grid_config]
        assert configs[0]["env"] == f"cube-single-play-singletask-task{task}-v0" and configs[0]["alpha"] == alpha
        state = fql.read_checkpoint(str(folder / "checkpoint.pt"))
        for key, p in alone.nets.state_dict().items():
            torch.testing.assert_close(state["nets"][key], p, rtol=1e-4, atol=1e-6, msg=f"{name} {key}")
        for log in ("train.csv", "eval.csv"):
            got, want = untimed_rows(folder / log), untimed_rows(alone_folder / log)
            assert [row.keys() for row in got] == [row.keys() for row in want] and got
            for got_row, want_row in zip(got, want):
                np.testing.assert_allclose([float(v) for v in got_row.values()],
                                           [float(v) for v in want_row.values()], rtol=1e-4, atol=1e-5)
    table = script("eval.py", "table", *(str(tmp_path / "grid" / name) for name in names))
    assert table.returncode == 0 and console(table) == [], table.stderr[-3000:]
    rows = [line.split(" | ")[1:4] for line in table.stdout.splitlines()[2:]]
    assert rows == [["1", "alpha=100.0", "2"], ["1", "alpha=300.0", "2"], ["3", "alpha=100.0", "2"],
                    ["3", "alpha=300.0", "2"], ["mean of 1 3", "alpha=100.0", "2"], ["mean of 1 3", "alpha=300.0", "2"]]
    plot = script("eval.py", "plot", *(str(tmp_path / "grid" / name) for name in names), "--output",
                  str(tmp_path / "grid.png"))
    assert plot.returncode == 0 and console(plot) == [] and (tmp_path / "grid.png").stat().st_size > 10_000


@slow
def test_a_killed_grid_resumes_exactly_and_an_agents_folder_resumes_alone(cube_data, tmp_path, monkeypatch):
    """A grid killed between the renames of its agents' checkpoints: the same command with --resume mends it and
    ends as the grid never killed; one agent's folder, continued alone with its own flags, ends as that agent does
    in the grid; eval.py evaluates it in its task's environment."""
    flags = ("--offline_steps", "50", "--log_interval", "10", "--save_interval", "20", "--batch_size", "32")
    straight = run_cli(cube_data, tmp_path / "straight", *flags, *GRID)
    real_replace, renames = os.replace, []

    def killed_between_the_renames_of_step_40(source, destination):
        renames.append(source) if source.endswith("checkpoint.pt.tmp") else None
        if len(renames) == 8 + 3:  # step 20's eight renames, then step 40's: killed before the third agent's
            raise KeyboardInterrupt
        return real_replace(source, destination)

    monkeypatch.setattr(fql.os, "replace", killed_between_the_renames_of_step_40)
    with pytest.raises(SystemExit, match="--resume"):
        run_cli(cube_data, tmp_path / "killed", *flags, *GRID)
    monkeypatch.undo()
    folders = [tmp_path / "killed" / f"task{t}__alpha{a}__seed{s}" for t, a, s in GRID_AGENTS]
    assert [fql.read_checkpoint(str(f / "checkpoint.pt"))["step"] for f in folders] == [40, 40] + [20] * 6
    shutil.copytree(folders[-1], tmp_path / "alone")  # task 3, alpha 300, seed 1: last on every axis
    resumed = run_cli(cube_data, tmp_path / "killed", *flags, *GRID, "--resume")
    for name, p in straight.params.items():
        torch.testing.assert_close(resumed.params[name], p, rtol=0, atol=0, msg=name)
    alone = run_cli(cube_data, tmp_path / "alone", *flags, "--env", "ogbench-cube-single-task3", "--alpha", "300",
                    "--seed", "1", "--resume")
    for name, p in alone.params.items():
        torch.testing.assert_close(straight.params[name][-1], p[0], rtol=1e-4, atol=1e-6, msg=name)
    result = fql_eval.main(["--checkpoint", str(tmp_path / "alone"), "--episodes", "1", "--device", "cpu"])
    assert result["env"] == "cube-single-play-singletask-task3-v0" and result["step"] == 50


@slow
def test_benchmark_times_each_mode_for_one_agent_and_a_grid(capsys, monkeypatch):
    # the shapes and config of the compiled equivalence tests (3 agents), whose compilations it reuses
    results = fql_eval.benchmark(make_config(**COMPILED, compile=True, tasks=(1, 2, 3)), ((7,), 3), seconds=0.05)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("FQL training step, observation (7,), action 3, horizon 1, batch 256")
    assert list(results) == [("eager", 1), ("eager", 3), ("compile", 1), ("compile", 3)]
    assert all(rate > 0 for rate in results.values())
    assert [line.split()[0] for line in lines[1:]] == ["eager", "eager", "compile", "compile"]
    assert "updates/s of 3 agents" in lines[2] and "agent-updates/s" in lines[2] and "x one agent" in lines[2]
    called = []
    monkeypatch.setattr(fql_eval, "benchmark", lambda cfg: called.append((len(fql.agent_grid(cfg)),
                                                                          fql_eval.env_shapes(cfg.env))))
    fql.main(["--benchmark", "--tasks", "1", "2", "3", "4", "5", "--seeds", "0", "1", "--device", "cpu"])
    assert called == [(10, ((28,), 5))]  # eval.py's benchmark, for the env's shapes


@slow
def test_benchmark_times_the_online_loop_of_one_agent_and_a_grid(capsys):
    """For the env's own shapes, --benchmark also steps every agent's real environment, one batched policy call a
    step (--no_compile: the eager update and policy only)."""
    results = fql_eval.benchmark(make_config(tasks=(1, 3), seeds=(0, 1)), seconds=0.5)
    assert list(results) == [("eager", 1), ("eager", 4), ("online loop", 1), ("online loop", 4)]
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[3].startswith("online loop") and "env steps/s" in lines[3]
    assert "env steps/s of 4 agents" in lines[4] and "agent-env steps/s" in lines[4] and "x one agent" in lines[4]
    assert all(rate > 0 for rate in results.values())


@gpu
def test_cuda_graph_replay_equals_eager_update():
    torch.manual_seed(0)
    cfg = make_config(device="cuda", compile=True)
    graphed = fql.FQLAgent([fql.FQLNetworks((7,), 3, cfg).cuda()], cfg, [torch.Generator("cuda")], [cfg.alpha], [0])
    eager = fql.FQLAgent([copy.deepcopy(graphed.nets)], make_config(device="cuda"), [torch.Generator("cuda")], [make_config(device="cuda").alpha], [0])
    static_batch = {k: v.cuda() for k, v in one(random_batch(64, 7, 3)).items()}
    static_noise = {k: v.cuda() for k, v in one(fixed_noise(64, 3)).items()}
    replay = fql.CUDAGraphStep(lambda: graphed.update(static_batch, static_noise, with_metrics=True), [])
    for step in range(4):  # the first call runs eagerly and records; the others replay the recording
        for k in static_noise:
            static_noise[k].copy_(static_noise[k] + 0.01 if k != "t" else torch.rand_like(static_noise[k]))
        want = eager.update(static_batch, {k: v.clone() for k, v in static_noise.items()}, with_metrics=True)
        got = replay()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=f"step {step} {key}")
    for p, q in zip(graphed.nets.parameters(), eager.nets.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@gpu
def test_cuda_graph_of_a_seed_group_draws_fresh_batches_and_equals_eager():
    """The recorded step of a 3-seed group draws each seed's batch and noise from its own generator at
    every replay, as the same group run eagerly does, and the compiled policy maps every seed."""
    cfg = fql.resolve_config(make_config(device="cuda", compile=True, seeds=(0, 1, 2)))
    graphed = fql.make_agent(cfg, (7,), 3)
    eager = fql.make_agent(dataclasses.replace(cfg, compile=False), (7,), 3)  # same seeds: same start
    data = fql.to_device({k: v.numpy() for k, v in random_batch(1000, 7, 3).items()}, "cuda")
    step = fql.make_train_step(graphed, functools.partial(fql.sample_batch, data))
    losses = []
    for _ in range(4):  # the first call runs eagerly and records; the others replay the recording
        want = eager.train_step(functools.partial(fql.sample_batch, data), with_metrics=True)
        got = step(True)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=key)
        losses.append(got["critic/critic_loss"].clone())
    assert len({tuple(loss.tolist()) for loss in losses}) == 4  # new batches and noise at every replay
    for name, p in eager.params.items():
        torch.testing.assert_close(graphed.params[name], p, rtol=1e-4, atol=1e-5, msg=name)
    for _ in range(2):
        actions = graphed.act(np.zeros((3, 4, 7), np.float32), generators(12))
        assert actions.shape == (3, 4, 3) and np.abs(actions).max() <= 1


@gpu
def test_a_cpu_checkpoint_resumes_on_cuda_with_a_cuda_graph(cube_data, tmp_path):
    """Adam's flags follow the device (capturable on CUDA), and the CPU generator's stream gives way to a new one."""
    run_cli(cube_data, tmp_path, "--offline_steps", "20", "--batch_size", "32", "--log_interval", "10",
            "--device", "cpu")
    agent = run_cli(cube_data, tmp_path, "--offline_steps", "40", "--batch_size", "32", "--log_interval", "10",
                    "--device", "cuda", "--compile", "--resume")
    assert agent.optimizer.param_groups[0]["capturable"] and agent.generators[0].device.type == "cuda"
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 40
    assert [r["step"] for r in read_csv(tmp_path / "train.csv")] == ["10", "20", "30", "40"]


def graphed_and_eager(cfg, data_shape, action_dim):
    """A compiled, CUDA-graphed grid and the same grid eager (same seeds: the same start), full float32 matmuls."""
    torch.set_float32_matmul_precision("highest")
    graphed = fql.make_agent(cfg, data_shape, action_dim)
    eager = fql.make_agent(dataclasses.replace(cfg, compile=False, cuda_graph=False), data_shape, action_dim)
    return graphed, eager


def assert_replays_equal_eager(graphed, eager, graphed_sample, eager_sample, between=lambda: None, steps=5):
    """`steps` steps of each (the graph's first call runs eagerly and records, the others replay), with and without
    metrics, `between()` before each: the same metrics and, at the end, the same parameters."""
    step = fql.make_train_step(graphed, graphed_sample)
    losses = set()
    for i in range(steps):
        between()
        with_metrics = i % 2 == 0
        want = eager.train_step(eager_sample, with_metrics)
        got = step(with_metrics)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=f"step {i} {key}")
        if with_metrics:
            losses.add(tuple(got["critic/critic_loss"].tolist()))
    assert len(losses) == (steps + 1) // 2  # a new batch and new noise at every replay
    for name, p in eager.params.items():
        torch.testing.assert_close(graphed.params[name], p, rtol=1e-4, atol=1e-5, msg=name)


@gpu
@pytest.mark.parametrize("flags", [dict(), dict(horizon=5), dict(horizon=5, action_chunking=False)],
                         ids=["H1", "H5", "FQL-n"])
def test_cuda_graph_of_a_grid_equals_eager(flags):
    """A grid of 2 tasks x 2 alphas x 2 seeds recorded as one CUDA graph trains as the same grid eager."""
    cfg = fql.resolve_config(make_config(device="cuda", compile=True, tasks=(1, 3), alphas=(3.0, 30.0), seeds=(0, 1),
                                         flow_steps=2, **flags))
    data = grid_data(device="cuda")
    graphed, eager = graphed_and_eager(cfg, (2,), 3)
    sample = functools.partial(fql.sample_batch, data, cfg=cfg)
    assert_replays_equal_eager(graphed, eager, sample, sample)


@gpu
def test_cuda_graph_of_pixels_equals_eager():
    """Pixels (frames on the device, stacked and randomly shifted inside the recorded step) train as eager."""
    cfg = fql.resolve_config(make_config(device="cuda", compile=True, seeds=(0, 1), env="ogbench-visual-cube-single",
                                         encoder="impala_debug", frame_stack=3, p_aug=0.5, flow_steps=2))
    data = {k: v.cuda() for k, v in compact_pixels([30, 40])[0].items()}
    graphed, eager = graphed_and_eager(cfg, fql.stacked_shape(data), 2)
    sample = functools.partial(fql.sample_batch, data, p_aug=cfg.p_aug, cfg=cfg)
    assert_replays_equal_eager(graphed, eager, sample, sample)


@gpu
@pytest.mark.parametrize("flags", [dict(horizon=5), dict(balanced_sampling=True)], ids=["H5", "balanced"])
def test_cuda_graph_of_the_online_grid_replays_while_its_buffer_grows(flags):
    """Fine-tuning's step of a grid, recorded once: each replay samples each agent's buffer at its current size (on
    the device), as eager does while the buffer grows by a row per agent and step."""
    cfg = fql.resolve_config(make_config(device="cuda", compile=True, tasks=(1, 3), seeds=(0, 1), online_steps=20,
                                         flow_steps=2, **flags))
    data = grid_data(device="cuda")
    graphed, eager = graphed_and_eager(cfg, (2,), 3)
    offline = {k: v[:0] for k, v in data.items()} if cfg.balanced_sampling else data
    buffers = [fql_eval.ReplayBuffer(offline, 4, cfg.online_steps, cfg) for _ in range(2)]
    samples = [functools.partial(fql_eval.sample_balanced, data, buffer) if cfg.balanced_sampling else buffer.sample
               for buffer in buffers]
    rng = np.random.default_rng(0)

    def between():
        rows = dict(observations=rng.normal(size=(4, 2)), actions=rng.uniform(-1, 1, (4, 3)),
                    rewards=-np.ones((4, 1)), masks=np.ones((4, 1)), terminals=np.zeros(4),
                    next_observations=rng.normal(size=(4, 2)))
        for buffer in buffers:
            buffer.add(rows)
    for _ in range(cfg.horizon):
        between()
    assert_replays_equal_eager(graphed, eager, *samples, between, steps=9)
    assert buffers[0].added == cfg.horizon + 9


@gpu
def test_compiled_policy_on_cuda_acts_as_the_eager_one():
    """act() of the compiled policy (its CUDA graphs replayed from the third call on) gives the eager policy's
    actions for the same noise generators, call after call, in each shape it is called with."""
    cfg = fql.resolve_config(make_config(device="cuda", compile=True, seeds=(0, 1)))
    graphed, eager = graphed_and_eager(cfg, (7,), 3)
    rng = np.random.default_rng(0)
    for shape in [(2, 4, 7)] * 4 + [(2, 1, 7)] * 4:
        observations = rng.normal(size=shape).astype(np.float32)
        rows = shape[0] * shape[1]
        got = graphed.act(observations, generators(rows))
        want = eager.act(observations, generators(rows))
        assert got.shape == (*shape[:2], 3)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@gpu
@slow
def test_sigterm_on_cuda_saves_and_resumes_to_the_straight_run(cube_data, tmp_path):
    """A compiled, CUDA-graphed grid on the GPU stopped by SIGTERM saves the step it is in; the same command with
    --resume ends where the run never stopped ends (up to the GPU's nondeterminism)."""
    def command(run_dir):
        return [sys.executable, "fql.py", "--dataset_dir", cube_data, "--run_dir", str(run_dir), "--seeds", "0", "1",
                "--offline_steps", "2000", "--log_interval", "10", "--save_interval", "5000", "--eval_interval", "0",
                "--batch_size", "64", "--device", "cuda", *SMALL, "--resume"]

    environment = {**os.environ, **OFFLINE}
    stopped = tmp_path / "stopped"
    process = subprocess.Popen(command(stopped), cwd=HERE, env=environment, start_new_session=True, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    train_csv = stopped / "seed0" / "train.csv"
    while process.poll() is None and not (train_csv.exists() and len(read_csv(train_csv)) >= 5):
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode != 0 and "stopped by SIGTERM at step" in stderr, stderr[-3000:]
    step = fql.read_checkpoint(str(stopped / "seed0" / "checkpoint.pt"))["step"]
    assert 50 <= step < 2000
    for run_dir in (stopped, tmp_path / "straight"):
        finished = subprocess.run(command(run_dir), cwd=HERE, env=environment, capture_output=True, text=True)
        assert finished.returncode == 0, finished.stderr[-3000:]
    for seed in (0, 1):
        want, got = (fql.read_checkpoint(str(run / f"seed{seed}" / "checkpoint.pt"))
                     for run in (tmp_path / "straight", stopped))
        assert got["step"] == want["step"] == 2000
        for name, p in want["nets"].items():
            torch.testing.assert_close(got["nets"][name], p, rtol=1e-3, atol=1e-4, msg=name)


@gpu
@slow
@pytest.mark.parametrize("grid", [("--seeds", *map(str, range(8))), ("--tasks", "1", "2", "3", "4", "5", "--seeds",
                                                                      *map(str, range(8)))], ids=["8", "40"])
def test_benchmark_of_1_8_and_40_agents_on_cuda(grid, capsys):
    """--benchmark on the GPU (every mode, the CUDA graph's included; one agent and a grid of 8 or 40) prints a
    finite rate for each."""
    cfg = fql.resolve_config(tyro.cli(fql.Config, args=["--device", "cuda", *SMALL, *grid], use_underscores=True))
    results = fql_eval.benchmark(cfg, seconds=0.5)
    agents = len(fql.agent_grid(cfg))
    assert {mode for mode, _ in results} == {"eager", "compile", "compile + CUDA graph", "online loop"}
    assert {count for _, count in results} == {1, agents}
    assert all(math.isfinite(rate) and rate > 0 for rate in results.values()), results
    assert f"{agents:.0f} agents" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------
class ScriptedEnv(gymnasium.Env):
    """Episodes of 3 steps; reward 1 per step; success only if the last action was positive."""
    observation_space = gymnasium.spaces.Box(-np.inf, np.inf, (2,))
    action_space = gymnasium.spaces.Box(-1, 1, (1,))

    def reset(self, seed=None, options=None):
        self.t = 0
        return np.zeros(2, np.float32), {}

    def step(self, action):
        self.t += 1
        done = self.t == 3
        return np.full(2, self.t, np.float32), 1.0, False, done, {"success": float(done and action[0] > 0)}


def one_at_a_time(make_env) -> gymnasium.vector.VectorEnv:
    """A vector env of one environment, reset when asked (as eval.make_vector_env's): evaluate() then runs its
    episodes one after the other."""
    return gymnasium.vector.SyncVectorEnv([make_env], autoreset_mode="Disabled")


def test_evaluate_counts_success_at_the_last_step():
    (result,) = fql_eval.evaluate(lambda obs, generators: np.where(obs[..., :1] < 2, 1.0, -1.0), one_at_a_time(ScriptedEnv), 4,
                                  seeds=[0])
    assert result == {"success": 0.0, "return": 3.0, "length": 3.0}
    (result,) = fql_eval.evaluate(lambda obs, generators: np.full((1, 1, 1), 5.0), one_at_a_time(ScriptedEnv), 4, seeds=[0])
    assert result["success"] == 1.0  # clipped, still positive


POINTMAZE = "pointmaze-medium-navigate-singletask-task1-v0"
CUBE = "cube-single-play-singletask-task2-v0"


def pointmaze_oracle():
    """Heads for OGBench's oracle subgoal on the way to the task's goal: a policy known to succeed."""
    helper = fql_eval.make_env(POINTMAZE).unwrapped
    helper.reset(seed=0)
    goal = np.array(helper.cur_goal_xy)

    def policy(observations, generators):
        xy = observations.reshape(-1, 2)
        direction = np.array([helper.get_oracle_subgoal(p, goal)[0] - p for p in xy])
        direction /= np.linalg.norm(direction, axis=-1, keepdims=True) + 1e-6
        return direction.reshape(np.shape(observations))

    return policy


@slow
def test_scripted_policy_succeeds_and_random_policy_fails():
    vector_env = fql_eval.make_vector_env([POINTMAZE] * 2)
    try:
        (oracle,) = fql_eval.evaluate(pointmaze_oracle(), vector_env, 3, [0])
        rng = np.random.default_rng(0)
        (random,) = fql_eval.evaluate(lambda obs, generators: rng.uniform(-1, 1, obs.shape), vector_env, 3, [0])
    finally:
        vector_env.close()
    assert oracle["success"] == 1 and oracle["length"] < 400  # reaches the goal well within 1000 steps
    assert random["success"] == 0 and random["length"] == 1000  # the goal is far for a random walk


def recording(seen: list):
    """A deterministic policy that depends on the observation and records what it saw."""
    def policy(observations, generators):
        seen.append(np.array(observations))
        return np.tanh(3 * observations[..., 14:19])
    return policy


@pytest.fixture(scope="module")
def cube_vector_env():
    """One vector env of 2 cube-single environments, shared by the evaluation tests (workers take seconds to start)."""
    vector_env = fql_eval.make_vector_env([CUBE] * 2)
    yield vector_env
    vector_env.close()


@slow
def test_parallel_and_sequential_evaluation_agree_on_the_same_seeds(cube_vector_env):
    sequential_seen, parallel_seen = [], []
    sequential = fql_eval.evaluate(recording(sequential_seen), one_at_a_time(lambda: fql_eval.make_env(CUBE)), 3,
                                   [5])
    parallel = fql_eval.evaluate(recording(parallel_seen), cube_vector_env, 3, [5])
    assert parallel == [pytest.approx(result) for result in sequential]  # a dict per seed
    by_episode = np.array(sequential_seen).reshape(3, 200, -1)
    rounds = np.array(parallel_seen).reshape(2, 200, 2, -1)  # 2 rounds of 2 environments, 200 steps each
    for episode in range(3):  # the second round needs one environment; the other's steps are ignored
        np.testing.assert_allclose(rounds[episode // 2, :, episode % 2], by_episode[episode])
    assert not np.allclose(by_episode[0], by_episode[1])  # different seeds, different episodes


@slow
def test_a_seed_group_evaluates_each_seed_in_its_own_environments(cube_vector_env):
    seen = []
    results = fql_eval.evaluate(recording(seen), cube_vector_env, 2, [5, 105])
    rounds = np.array(seen).reshape(2, 200, 2, 28)  # round, step, seed (one environment each): one call maps all
    for k, seed in enumerate((5, 105)):
        sequential_seen = []
        (alone,) = fql_eval.evaluate(recording(sequential_seen), one_at_a_time(lambda: fql_eval.make_env(CUBE)), 2,
                                     [seed])
        assert results[k] == pytest.approx(alone)
        np.testing.assert_allclose(rounds[:, :, k], np.array(sequential_seen).reshape(2, 200, -1))


@slow
def test_videos_are_written(tmp_path):
    paths = fql_eval.record_videos(lambda obs, generators: np.zeros((1, 5)), CUBE, 1, seed=0, directory=str(tmp_path), frame_skip=20)
    if not paths:
        pytest.skip("no offscreen OpenGL renderer on this machine (record_videos said why)")
    import imageio.v3 as iio

    frames = iio.imread(paths[0])
    assert frames.shape == (11, 256, 256, 3) and frames.std() > 0  # first frame + every 20th of 200 steps


def test_replay_buffer_keeps_each_agents_online_rows_after_the_shared_offline_ones():
    """Two agents on 10 shared offline rows: each adds its own online rows; its batches are uniform over the
    offline rows and its own online ones, windows included, never the other agent's; the rows round-trip through
    each agent's state dict (one reward and mask column, as a run alone keeps)."""
    n = 10
    offline = dict(observations=torch.zeros(n, 3), next_observations=torch.zeros(n, 3), actions=torch.zeros(n, 2),
                   rewards=torch.zeros(n, 2), masks=torch.ones(n, 2), terminals=torch.zeros(n))  # two tasks
    cfg = make_config(horizon=3)
    buffer = fql_eval.ReplayBuffer(offline, 2, capacity=6, cfg=cfg)
    for i in range(6):  # agent k's i-th online row: observation 10 k + i + 1, reward k + 1
        buffer.add(dict(observations=np.array([[i + 1.0] * 3, [i + 11.0] * 3]), actions=np.ones((2, 2)),
                        rewards=np.array([[1.0], [2.0]]), masks=np.ones((2, 1)), terminals=np.zeros(2),
                        next_observations=np.zeros((2, 3))))
    assert (buffer.added, float(buffer.size)) == (6, 16.0)  # 10 offline rows and each agent's 6 online ones
    for agent in (0, 1):
        online = buffer.data["observations"][buffer.online_rows(agent), 0]
        assert online.tolist() == [10 * agent + i + 1.0 for i in range(6)]
    batch = buffer.sample(20_000, [torch.Generator().manual_seed(k) for k in (0, 1)], tasks=(0, 1))
    first = batch["observations"][..., 0]  # each window's first row
    for agent in (0, 1):
        own = first[agent][first[agent] > 0]
        assert set(own.tolist()) == {10 * agent + i + 1.0 for i in range(4)}  # windows of 3 end in the buffer
        assert abs(float((first[agent] > 0).float().mean()) - 4 / 14) < 0.02  # uniform over the 14 starts
        rewards = batch["rewards"][agent][first[agent] > 0]  # a window of 3 own online rows: its rewards' sum
        torch.testing.assert_close(rewards, torch.full_like(rewards, (agent + 1) * (1 + 0.99 + 0.99**2)))
    assert buffer.state_dict(1)["rows"]["rewards"].tolist() == [[2.0]] * 6
    restored = fql_eval.ReplayBuffer(offline, 2, capacity=6, cfg=cfg)
    restored.load_state_dicts([buffer.state_dict(agent) for agent in (0, 1)])
    assert (restored.added, float(restored.size)) == (6, 16.0)
    for k in offline:
        assert torch.equal(restored.data[k], buffer.data[k]), k
    online_only = fql_eval.ReplayBuffer({k: v[:0] for k, v in offline.items()}, 2, capacity=6, cfg=cfg)
    online_only.load_state_dicts([buffer.state_dict(agent) for agent in (0, 1)])
    balanced = fql_eval.sample_balanced(offline, online_only, 256, [None, None])  # half offline, half online
    assert torch.equal(balanced["rewards"][1, :128], torch.zeros(128)) and (balanced["rewards"][1, 128:] > 0).all()


class TerminatingEnv(gymnasium.Env):
    """Observation = step count; reward 1 per step; terminated at step 2 with success, truncated at step 3
    otherwise (the action's sign decides). Records the seeds of its resets."""
    observation_space = gymnasium.spaces.Box(0, 100, (2,))
    action_space = gymnasium.spaces.Box(-1, 1, (1,))

    def __init__(self):
        self.seeds = []

    def reset(self, seed=None, options=None):
        self.seeds.append(seed)
        self.t = 0
        return np.zeros(2, np.float32), {}

    def step(self, action):
        self.t += 1
        terminated = self.t == 2 and action[0] > 0
        return (np.full(2, self.t, np.float32), 1.0, terminated, self.t == 3 and not terminated,
                {"success": float(terminated)})


def test_fine_tuning_masks_terminations_restarts_episodes_and_keeps_each_agents_episodes():
    """Two agents, each its own environment: a terminated episode (mask 0) and a truncated one (mask 1; the time
    limit is no termination), each episode from reset(seed=the agent's seed + the online transitions so far), the
    D4RL antmaze reward shift, each agent's own rows and exploration columns."""
    envs = [TerminatingEnv(), TerminatingEnv()]
    online = in_process_finetuning(envs, seeds=[100, 200], obs_dim=2, env="d4rl-antmaze-umaze")
    signs = [1, -1]  # agent 0's episodes end terminated after 2 steps, agent 1's truncated after 3
    for _ in range(6):
        online.collect(lambda obs, generators: np.array(signs, dtype=np.float32).reshape(2, 1, 1))
    assert online.log()[0] == {"exploration/success": 1.0, "exploration/return": 2.0, "exploration/length": 2,
                               "exploration/buffer_size": 6}
    assert online.log()[1]["exploration/length"] == 3 and online.log()[1]["exploration/success"] == 0
    assert envs[0].seeds == [100, 102, 104] and envs[1].seeds == [200, 203]
    rows = [{k: v[online.buffer.online_rows(agent)] for k, v in online.buffer.data.items()} for agent in (0, 1)]
    np.testing.assert_array_equal(rows[0]["masks"][:, 0], [1, 0, 1, 0, 1, 0])
    np.testing.assert_array_equal(rows[1]["masks"][:, 0], [1, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(rows[1]["terminals"], [0, 0, 1, 0, 0, 1])  # the episodes' ends, truncation too
    np.testing.assert_array_equal(rows[0]["rewards"][:, 0], [0] * 6)  # shifted by -1, as D4RL antmaze online
    np.testing.assert_array_equal(rows[1]["observations"][:, 0], [0, 1, 2, 0, 1, 2])  # a fresh start after each end
    np.testing.assert_array_equal(rows[1]["next_observations"][:, 0], [1, 2, 3, 1, 2, 3])


@slow
def test_finetuning_grows_buffer_logs_checkpoints_and_resumes(cube_data, tmp_path, monkeypatch):
    flags = ("--offline_steps", "50", "--online_steps", "260", "--log_interval", "50", "--save_interval", "50",
             "--batch_size", "32")
    killed_after(monkeypatch, 230, fql_eval.Finetuning, "collect")  # at online step 230
    with pytest.raises(SystemExit, match="the same command with --resume continues"):
        run_cli(cube_data, tmp_path, *flags)
    monkeypatch.undo()
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] == 250 and state["buffer"]["added"] == 200  # the online transitions travel along
    assert state["buffer"]["rows"]["observations"].shape == (200, 28)

    agent = run_cli(cube_data, tmp_path, *flags, "--resume")
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] == 310 and state["buffer"]["added"] == 260
    rows = read_csv(tmp_path / "train.csv")
    assert [int(r["step"]) for r in rows] == [50, 100, 150, 200, 250, 300]
    offline_size = int(rows[1]["exploration/buffer_size"]) - 50
    assert offline_size == 3 * 99  # the recorded dataset: 3 episodes of 100 steps, 99 transitions each
    assert [int(r["exploration/buffer_size"]) for r in rows[1:]] == [offline_size + k for k in (50, 100, 150, 200, 250)]
    assert rows[0]["exploration/buffer_size"] == ""  # offline rows have no exploration columns
    # the first online episode ended at step 250, 200 steps long
    assert float(rows[4]["exploration/length"]) == 200 and rows[4]["exploration/success"] in ("0.0", "1.0")
    assert all(math.isfinite(float(r["critic/critic_loss"])) for r in rows)
    for name, p in agent.nets.state_dict().items():  # the last checkpoint holds the finished agent
        assert torch.equal(state["nets"][name], p)


@slow
def test_finetuning_with_chunks_resumes_bit_identically_mid_chunk(cube_data, tmp_path, monkeypatch):
    """QC-FQL fine-tuning (--horizon 5) killed in the middle of a chunk and of an episode resumes to the run
    never killed: its episode replayed from its reset, the rest of its chunk run from the saved queue; the same
    parameters, train.csv rows and online transitions. Its checkpoint then evaluates with eval.py."""
    flags = ("--horizon", "5", "--offline_steps", "10", "--online_steps", "30", "--log_interval", "5",
             "--save_interval", "7", "--batch_size", "16")
    straight = run_cli(cube_data, tmp_path / "straight", *flags)
    killed_after(monkeypatch, 19, fql_eval.Finetuning, "collect")  # online step 19: chunk 4, its 4th action
    with pytest.raises(SystemExit, match="the same command with --resume continues"):
        run_cli(cube_data, tmp_path / "killed", *flags)
    monkeypatch.undo()
    state = fql.read_checkpoint(str(tmp_path / "killed" / "checkpoint.pt"))  # step 28: online step 18
    assert state["step"] == 28 and state["buffer"]["collector"]["steps"] == 18
    assert len(state["buffer"]["collector"]["queue"]) == 2  # actions 4 and 5 of the chunk still to run
    resumed = run_cli(cube_data, tmp_path / "killed", *flags, "--resume")
    for name, p in straight.params.items():
        torch.testing.assert_close(resumed.params[name], p, rtol=0, atol=0, msg=name)
    assert untimed_rows(tmp_path / "killed" / "train.csv") == untimed_rows(tmp_path / "straight" / "train.csv")
    buffers = [fql.read_checkpoint(str(tmp_path / run / "checkpoint.pt"))["buffer"] for run in ("straight", "killed")]
    for key, rows in buffers[0]["rows"].items():
        assert torch.equal(rows, buffers[1]["rows"][key]), key
    result = fql_eval.main(["--checkpoint", str(tmp_path / "killed"), "--episodes", "1", "--device", "cpu"])
    assert result["length"] == 200 and result["step"] == 40


@slow
def test_finetune_command_resumes_and_samples_half_online(cube_data, tmp_path, monkeypatch):
    run_cli(cube_data, tmp_path / "offline", "--offline_steps", "40", "--batch_size", "32")
    argv = ["finetune", "--checkpoint", str(tmp_path / "offline"), "--online_steps", "30", "--eval_interval", "0",
            "--log_interval", "10", "--save_interval", "10", "--device", "cpu", "--balanced_sampling"]
    killed_after(monkeypatch, 25, fql_eval.Finetuning, "collect")  # at online step 25
    with pytest.raises(SystemExit, match="eval.py: interrupted; the same command with --resume"):
        fql_eval.main(argv)
    monkeypatch.undo()
    run = tmp_path / "offline-finetune"
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 60
    sampled = []
    real_balanced = fql_eval.sample_balanced
    monkeypatch.setattr(fql_eval, "sample_balanced", lambda *args: sampled.append(real_balanced(*args)) or sampled[-1])
    agent = fql_eval.main(argv + ["--resume"])
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["step"] == 70 and state["buffer"]["added"] == 30 and state["config"]["offline_steps"] == 40
    assert state["config"]["balanced_sampling"] and agent.cfg.online_steps == 30
    rows = read_csv(run / "train.csv")
    assert [r["step"] for r in rows] == ["50", "60", "70"]
    assert [r["exploration/buffer_size"] for r in rows] == ["10", "20", "30"]  # online rows only, beside the data
    online = {tuple(row) for row in state["buffer"]["rows"]["observations"].tolist()}
    for batch in sampled:  # half of every batch from the offline data, half from the online rows
        from_online = [tuple(row) in online for row in batch["observations"][0].tolist()]
        assert from_online == [False] * 16 + [True] * 16


FINETUNE = ("--offline_steps", "20", "--online_steps", "300", "--log_interval", "20", "--save_interval", "37",
            "--batch_size", "16", "--no-compile", *SMALL)  # cube-single's episodes: 200 steps, so one ends


def checkpoints_equal(got_dir, want_dir, rtol=0.0, atol=0.0):
    """The networks and online rows in two run folders' checkpoints, equal to the tolerances, at the same step."""
    got, want = (fql.read_checkpoint(str(folder / "checkpoint.pt")) for folder in (got_dir, want_dir))
    assert got["step"] == want["step"]
    for name, p in want["nets"].items():
        torch.testing.assert_close(got["nets"][name], p, rtol=rtol, atol=atol, msg=name)
    for key, rows in want["buffer"]["rows"].items():
        torch.testing.assert_close(got["buffer"]["rows"][key], rows, rtol=rtol, atol=atol, msg=key)


@slow
def test_a_fine_tuned_grid_killed_anywhere_resumes_bit_identically(cube_data, tmp_path):
    """`python fql.py --seeds 0 1 --horizon 5 --online_steps 300` (its evaluation at the end), killed with SIGKILL in
    the middle of its online phase (mid-episode and mid-chunk: checkpoints every 37 steps) and run again with
    --resume, ends bit-identical to the same grid never killed: parameters, online rows, train.csv."""
    command = ["fql.py", "--seeds", "0", "1", "--dataset_dir", cube_data, *FINETUNE, "--horizon", "5",
               "--eval_interval", "320", "--eval_episodes", "1", "--resume"]
    straight = script(*command, "--run_dir", str(tmp_path / "straight"))
    assert straight.returncode == 0 and console(straight) == [], straight.stderr[-3000:]
    assert read_csv(tmp_path / "straight" / "seed1" / "train.csv")[-1]["exploration/length"] == "200"
    process = subprocess.Popen([sys.executable, *command, "--run_dir", str(tmp_path / "killed")], cwd=HERE,
                               env={**os.environ, **OFFLINE}, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "killed" / "seed1" / "checkpoint.pt"
    while process.poll() is None and not (checkpoint.exists() and fql.read_checkpoint(str(checkpoint))["step"] > 150):
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the run and its environment workers, at once
    process.wait()
    state = fql.read_checkpoint(str(checkpoint))
    assert 150 < state["step"] < 320 and state["buffer"]["collector"]["steps"] > 0  # killed mid-episode
    resumed = script(*command, "--run_dir", str(tmp_path / "killed"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for seed in (0, 1):
        checkpoints_equal(tmp_path / "killed" / f"seed{seed}", tmp_path / "straight" / f"seed{seed}")
        assert untimed_rows(tmp_path / "killed" / f"seed{seed}" / "train.csv") == untimed_rows(
            tmp_path / "straight" / f"seed{seed}" / "train.csv")


@slow
def test_an_agent_fine_tunes_in_a_grid_as_alone_and_exactly_as_in_any_other_grid(cube_data, tmp_path):
    """The agent (task 3, seed 1) last in a grid of tasks 1 3 x seeds 0 1 and in one of tasks 2 3 x seeds 5 1, at
    --horizon 5 past an episode's end: its own task's environment, episodes, chunks, online rows and batches,
    whatever the other agents are, bit for bit. And `--seeds 0 1 --online_steps 300` equals each seed fine-tuned
    alone, bit for bit (on the CPU, eager), at --horizon 5 and at --horizon 1 with balanced sampling: a rounding
    difference would not stay small, as a contact in the simulation grows it into another trajectory."""
    flags = ("--eval_interval", "0", *FINETUNE, "--horizon", "5")
    run_cli(cube_data, tmp_path / "a", *flags, "--tasks", "1", "3", "--seeds", "0", "1")
    run_cli(cube_data, tmp_path / "b", *flags, "--tasks", "2", "3", "--seeds", "5", "1")
    checkpoints_equal(tmp_path / "a" / "task3__seed1", tmp_path / "b" / "task3__seed1")
    assert untimed_rows(tmp_path / "a" / "task3__seed1" / "train.csv") == untimed_rows(tmp_path / "b" /
                                                                                       "task3__seed1" / "train.csv")
    assert read_csv(tmp_path / "a" / "task3__seed1" / "train.csv")[-1]["exploration/length"] == "200"
    for horizon, balanced in (("5", ()), ("1", ("--balanced_sampling",))):
        flags = ("--eval_interval", "0", *FINETUNE, "--horizon", horizon, *balanced)
        run_cli(cube_data, tmp_path / f"grid{horizon}", *flags, "--seeds", "0", "1")
        for seed in (0, 1):
            alone, grid_agent = tmp_path / f"alone{horizon}" / str(seed), tmp_path / f"grid{horizon}" / f"seed{seed}"
            run_cli(cube_data, alone, *flags, "--seed", str(seed))
            checkpoints_equal(grid_agent, alone)
            assert untimed_rows(grid_agent / "train.csv") == untimed_rows(alone / "train.csv")
            assert read_csv(alone / "train.csv")[-1]["exploration/length"] == "200"  # past an episode's end


@slow
def test_finetune_command_fine_tunes_a_grids_checkpoints_as_one_grid(cube_data, tmp_path):
    """`eval.py finetune --checkpoint <a grid's folders>`: one fine-tuning grid, each agent into <its folder>-finetune
    equal to that checkpoint fine-tuned alone; checkpoints that are no grid, or differ in more than task, alpha and
    seed, are refused in one line with nothing written."""
    run_cli(cube_data, tmp_path / "grid", "--offline_steps", "20", "--batch_size", "16", "--tasks", "1", "3",
            "--seeds", "0", "1")
    folders = sorted(str(path) for path in (tmp_path / "grid").iterdir())
    steps = ["--online_steps", "30", "--eval_interval", "0", "--log_interval", "10", "--save_interval", "10"]
    result = script("eval.py", "finetune", "--checkpoint", *folders, *steps)
    assert result.returncode == 0 and console(result) == [], result.stderr[-3000:]
    assert sorted(str(path) for path in (tmp_path / "grid").iterdir()) == sorted(folders + [f"{tmp_path / 'grid'}/"
        f"task{t}__seed{s}-finetune" for t in (1, 3) for s in (0, 1)])
    alone = fql_eval.main(["finetune", "--checkpoint", folders[-1], *steps, "--run_dir", str(tmp_path / "alone")])
    assert alone.cfg.env == "cube-single-play-singletask-task3-v0" and alone.cfg.seed == 1
    checkpoints_equal(tmp_path / "grid" / "task3__seed1-finetune", tmp_path / "alone", rtol=1e-4, atol=1e-5)

    run_cli(cube_data, tmp_path / "other", "--offline_steps", "20", "--batch_size", "16", "--seed", "5",
            "--env", "ogbench-cube-single-task1", "--actor_hidden_dims", "16")  # of task 1 but other networks
    written = files_in(tmp_path)
    one_line_error(script("eval.py", "finetune", "--checkpoint", *folders[:3], *steps), "are not a grid")
    one_line_error(script("eval.py", "finetune", "--checkpoint", folders[0], str(tmp_path / "other"), *steps),
                   "differ in more than task, alpha and seed")
    assert files_in(tmp_path) == written


def test_wandb_logs_each_agent_as_a_run_of_the_grids_group(cube_data, tmp_path, monkeypatch):
    runs = []

    class FakeRun:
        def __init__(self, **settings):
            self.settings, self.rows = settings, []
            runs.append(self)

        def log(self, row, step):
            self.rows.append((step, row))

    monkeypatch.setitem(sys.modules, "wandb", type(sys)("wandb"))
    sys.modules["wandb"].init = FakeRun
    run_cli(cube_data, tmp_path, "--offline_steps", "20", "--log_interval", "10", "--batch_size", "16",
            "--wandb_project", "fql", "--seeds", "0", "1")
    assert [run.settings["name"] for run in runs] == [str(tmp_path / "seed0"), str(tmp_path / "seed1")]
    assert {run.settings["group"] for run in runs} == {str(tmp_path / "seed{seed}")}
    assert [run.settings["config"]["seed"] for run in runs] == [0, 1]
    for run, seed in zip(runs, (0, 1)):  # each agent's own train.csv rows
        logged = [(step, row["critic/critic_loss"]) for step, row in run.rows]
        assert logged == [(int(r["step"]), float(r["critic/critic_loss"])) for r in read_csv(tmp_path / f"seed{seed}"
                                                                                                / "train.csv")]


def write_fake_run(directory, seed, alpha, success, task=2):
    """A run folder of cube-single's `task` whose evaluations climb to `success` at step 400."""
    os.makedirs(directory)
    cfg = make_config(env=f"ogbench-cube-single-task{task}", seed=seed, alpha=alpha, run_dir=str(directory))
    with open(os.path.join(directory, "config.json"), "w") as f:
        fql.json.dump(dataclasses.asdict(fql.resolve_config(cfg)), f)
    steps = (100, 200, 300, 400)
    fql.write_csv([{"step": step, "critic/critic_loss": 1 / step, "actor/bc_flow_loss": 0.5, "actor/distill_loss": 0.1,
                    "actor/q": -step / 100} for step in steps], os.path.join(directory, "train.csv"))
    fql.write_csv([{"step": step, "evaluation/success": success * step / 400} for step in steps],
                  os.path.join(directory, "eval.csv"))


def test_plot_writes_a_png(tmp_path):
    runs = [tmp_path / "a0", tmp_path / "a1", tmp_path / "b0"]
    write_fake_run(runs[0], 0, 3.0, 0.5)
    write_fake_run(runs[1], 1, 3.0, 0.7)
    write_fake_run(runs[2], 0, 10.0, 0.2)
    output = tmp_path / "runs.png"
    fql_eval.main(["plot", *map(str, runs), "--output", str(output)])
    import matplotlib.image

    image = matplotlib.image.imread(output)
    assert output.stat().st_size > 10_000 and image.shape[1] > 1000 and image.std() > 0.01
    with pytest.raises(SystemExit, match="not an fql.py run folder"):
        fql_eval.main(["plot", str(tmp_path), "--output", str(output)])
    with pytest.raises(SystemExit, match="one or more run folders"):
        fql_eval.main(["plot", "--output", str(output)])
    for name in ("train.csv", "eval.csv"):  # a run that has logged nothing yet
        os.remove(runs[2] / name)
    with pytest.raises(SystemExit, match="nothing to plot yet: these runs have no rows in train.csv or eval.csv"):
        fql_eval.main(["plot", str(runs[2]), "--output", str(output)])


def test_table_scores_each_task_and_alpha_as_the_paper_and_each_env_over_its_tasks(tmp_path, capsys):
    """A row per (task, alpha): each seed's success averaged over its last three evaluations (the paper's protocol
    for OGBench), then mean and population std over seeds; and a row for the env's mean over the tasks present,
    each seed's averaged first, next to the paper's number for the env when they are all five (the paper's is the
    mean over five)."""
    runs = []
    for task, alpha, seed, success in ((2, 3.0, 0, 0.5), (2, 3.0, 1, 0.7), (2, 10.0, 0, 0.2), (4, 3.0, 0, 0.1),
                                       (4, 3.0, 1, 0.3)):
        runs.append(tmp_path / f"task{task}__alpha{alpha}__seed{seed}")
        write_fake_run(runs[-1], seed, alpha, success, task)  # steps 100-400: last three = 0.75 x success
    rows = fql_eval.main(["table", *map(str, runs), "--output", str(tmp_path / "table.csv")])
    common = dict(env="cube-single-play", steps="200 300 400")
    expected = [dict(common, task=2, settings="alpha=3.0", seeds=2, mean="45.0", std="7.5", paper=97),
                dict(common, task=2, settings="alpha=10.0", seeds=1, mean="15.0", std="0.0", paper=97),
                dict(common, task=4, settings="alpha=3.0", seeds=2, mean="15.0", std="7.5", paper=""),
                dict(common, task="mean of 2 4", settings="alpha=3.0", seeds=2, mean="30.0", std="7.5", paper="",
                     steps="")]  # the steps are its tasks' rows'
    assert [{k: row[k] for k in expected[0]} for row in rows] == expected
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| env | task | settings | seeds | steps | mean | std | paper |" and lines[1] == "|" + " --- |" * 8
    assert lines[2] == "| cube-single-play | 2 | alpha=3.0 | 2 | 200 300 400 | 45.0 | 7.5 | 97 |"
    assert read_csv(tmp_path / "table.csv") == [{k: str(v) for k, v in row.items()} for row in rows]
    os.remove(runs[2] / "eval.csv")
    with pytest.raises(SystemExit, match=f"{runs[2]}: no evaluation at a step all these runs reached"):
        fql_eval.main(["table", *map(str, runs)])
    five = []
    for task in (1, 2, 3, 4, 5):
        five.append(tmp_path / "five" / f"task{task}")
        write_fake_run(five[-1], 0, 3.0, task / 10, task)
    assert fql_eval.main(["table", *map(str, five)])[-1] == dict(
        common, task="mean of 1 2 3 4 5", settings="", seeds=1, mean="22.5", std="0.0", paper=96, steps="")


@slow
def test_eval_command_reports_and_rejects_bad_checkpoints(tmp_path):
    cfg = fql.resolve_config(make_config(run_dir=str(tmp_path)))
    agent = make_agent(28, 5, cfg)
    fql.save_checkpoints(agent, 7, [cfg])
    result = fql_eval.main(["--checkpoint", str(tmp_path), "--episodes", "2", "--num_envs", "2", "--device", "cpu"])
    assert result["step"] == 7 and (result["success"], result["return"], result["length"]) == (0, -200, 200)
    with open(tmp_path / "eval_step7_seed0.json") as f:
        assert fql.json.load(f)["episodes"] == 2
    with pytest.raises(SystemExit, match="no checkpoint at"):
        fql_eval.main(["--checkpoint", str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="--episodes and --frame_skip must be positive"):
        fql_eval.main(["--checkpoint", str(tmp_path), "--episodes", "0"])


# ----------------------------------------------------------------------------------------------
# D4RL: datasets from d4rl's hdf5 files, environments on modern MuJoCo
# ----------------------------------------------------------------------------------------------
def write_d4rl_file(directory, name, observations, actions, rewards, terminals, timeouts):
    import h5py

    path = os.path.join(directory, os.path.basename(fql.D4RL[name]))
    with h5py.File(path, "w") as f:
        for key, value in dict(observations=observations, actions=actions, rewards=rewards, terminals=terminals,
                               timeouts=timeouts).items():
            f.create_dataset(key, data=value)
        f.create_dataset("infos/qpos", data=np.zeros((len(rewards), 2)))  # d4rl files carry infos/*; unused
    return path


def test_d4rl_file_becomes_fql_transitions(tmp_path, monkeypatch):
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))
    rows = np.arange(7, dtype=np.float32)  # two episodes, rows 0-3 and 4-6, each cut by a timeout
    observations = np.repeat(rows[:, None], 29, axis=1)
    timeouts = np.array([0, 0, 0, 1, 0, 0, 1], bool)
    write_d4rl_file(tmp_path, "antmaze-umaze-v2", observations, np.full((7, 8), 2.0), rows * 0 + (rows == 2),
                    np.zeros(7, bool), timeouts)
    data = fql.load_d4rl("antmaze-umaze-v2")
    # as d4rl.qlearning_dataset: transitions from rows 0, 1, 2, 4, 5 (row 3 ends its episode by timeout)
    np.testing.assert_array_equal(data["observations"][:, 0], [0, 1, 2, 4, 5])
    np.testing.assert_array_equal(data["next_observations"][:, 0], [1, 2, 3, 5, 6])
    np.testing.assert_array_equal(data["rewards"], [-1, -1, 0, -1, -1])  # antmaze: reward - 1
    np.testing.assert_array_equal(data["masks"], [1, 1, 1, 1, 1])
    np.testing.assert_array_equal(data["terminals"], [0, 0, 1, 0, 1])  # where the next start does not follow
    assert fql.to_device(data, "cpu")["actions"].max() == np.float32(1 - 1e-5)  # actions clipped as OGBench's

    dones = np.array([0, 1, 0, 0, 0, 0, 0], bool)  # adroit: a terminal also ends the episode, and masks it
    write_d4rl_file(tmp_path, "pen-human-v1", observations[:, :3], np.zeros((7, 24)), rows, dones, timeouts)
    data = fql.load_d4rl("pen-human-v1")
    np.testing.assert_array_equal(data["rewards"], [0, 1, 2, 4, 5])
    np.testing.assert_array_equal(data["masks"], [1, 0, 1, 1, 1])
    np.testing.assert_array_equal(data["terminals"], [0, 1, 1, 0, 1])


def test_d4rl_names_presets_and_errors(tmp_path, monkeypatch):
    cfg = parse("--env", "d4rl-antmaze-large-play")
    assert (cfg.env, cfg.alpha, cfg.q_agg, cfg.offline_steps) == ("antmaze-large-play-v2", 3, "mean", 500_000)
    cfg = parse("--env", "pen-expert-v1", "--offline_steps", "7")
    assert (cfg.env, cfg.alpha, cfg.q_agg, cfg.offline_steps) == ("pen-expert-v1", 3000, "min", 7)
    assert len(fql.D4RL) == 18
    with pytest.raises(SystemExit, match="d4rl-antmaze-umaze-diverse"):
        fql.main(["--env", "d4rl-antmaze-ultra-play"])

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        fql.main(["--env", "d4rl-door-cloned", "--run_dir", str(tmp_path / "run")])
    assert "door-cloned-v1.hdf5" in str(exit_info.value.code) and str(tmp_path) in str(exit_info.value.code)


# D4RL's *_TEST maze maps (d4rl/locomotion/maze_env.py): 1 wall, 0 free
U_MAZE = [[1, 1, 1, 1, 1],
          [1, 0, 0, 0, 1],
          [1, 1, 1, 0, 1],
          [1, 0, 0, 0, 1],
          [1, 1, 1, 1, 1]]
BIG_MAZE = [[1, 1, 1, 1, 1, 1, 1, 1],
            [1, 0, 0, 1, 1, 0, 0, 1],
            [1, 0, 0, 1, 0, 0, 0, 1],
            [1, 1, 0, 0, 0, 1, 1, 1],
            [1, 0, 0, 1, 0, 0, 0, 1],
            [1, 0, 1, 0, 0, 1, 0, 1],
            [1, 0, 0, 0, 1, 0, 0, 1],
            [1, 1, 1, 1, 1, 1, 1, 1]]
HARDEST_MAZE = [[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
                [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1],
                [1, 0, 1, 1, 0, 1, 0, 1, 0, 1, 0, 1],
                [1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1],
                [1, 0, 1, 1, 1, 1, 0, 1, 1, 1, 0, 1],
                [1, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 1],
                [1, 1, 0, 1, 0, 1, 0, 1, 0, 1, 1, 1],
                [1, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1],
                [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]]


@slow
@pytest.mark.parametrize("name,maze_map,goal_xy,steps", [  # D4RL's goals: cells (3, 1), (6, 6), (7, 9)
    ("antmaze-umaze-v2", U_MAZE, (0, 8), 700), ("antmaze-medium-play-v2", BIG_MAZE, (20, 20), 1000),
    ("antmaze-large-diverse-v2", HARDEST_MAZE, (32, 24), 1000)])
def test_d4rl_antmaze_rewards_the_goal_and_ends_there(name, maze_map, goal_xy, steps):
    env = fql_eval.make_env(name)
    maze = env.unwrapped
    assert env.observation_space.shape == (29,) and env._max_episode_steps == steps
    np.testing.assert_array_equal(maze.maze_map, maze_map)
    goals = []
    for seed in range(20):
        observation, _ = env.reset(seed=seed)
        assert np.abs(observation[:2]).max() <= 0.1  # starts at cell (1, 1) = (0, 0), with the ant's noise
        goals.append(np.array(maze.cur_goal_xy))
        _, reward, terminated, _, info = env.step(np.zeros(8))
        assert (reward, terminated, info["success"]) == (0.0, False, 0.0)
    goals = np.array(goals)  # D4RL's goal: the goal cell's corner plus U(0, 1) + U(0, 0.5) per axis
    assert np.all(goals >= goal_xy) and np.all(goals <= np.add(goal_xy, 1.5)) and goals.std(0).min() > 0.1
    maze.set_xy(maze.cur_goal_xy + 0.2)
    _, reward, terminated, _, info = env.step(np.zeros(8))
    assert (reward, terminated, info["success"]) == (1.0, True, 1.0)


@slow
@pytest.mark.parametrize("task", ["door", "hammer", "relocate"])
def test_adroit_reward_is_d4rls(task):
    """gymnasium-robotics (1.2.1-1.4.2, requirements.txt pins 1.4.2) adds +0.1 |palm - object| where D4RL
    subtracts it; the wrapper's reward must equal the simulator's reward with that term's sign put back."""
    env = fql_eval.make_env(f"{task}-human-v1")
    inner = env.unwrapped
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    for _ in range(30):
        action = rng.uniform(-1, 1, env.action_space.shape)
        state = (inner.data.qpos.copy(), inner.data.qvel.copy())
        _, reward, terminated, truncated, _ = env.step(action)
        inner.set_state(*state)  # the same step again, through gymnasium-robotics alone
        _, gym_reward, *_ = env.env.step(action)
        if task == "door":  # D4RL's "object" of the door is its handle
            obj, palm = inner.data.site_xpos[inner.handle_site_id], inner.data.site_xpos[inner.grasp_site_id]
        else:
            obj, palm = inner.data.xpos[inner.obj_body_id], inner.data.site_xpos[inner.S_grasp_site_id]
        assert reward == pytest.approx(gym_reward - 0.2 * np.linalg.norm(palm - obj), abs=1e-9)
        assert not terminated and not truncated


@slow
def test_adroit_pen_ends_when_dropped_and_runs_100_steps():
    env = fql_eval.make_env("pen-human-v1")
    pen = env.unwrapped
    rng = np.random.default_rng(0)
    endings = []
    for episode in range(5):  # random hands drop the pen now and then, as D4RL's random reference did
        env.reset(seed=episode)
        for t in range(1, 200):
            _, reward, terminated, truncated, _ = env.step(rng.uniform(-1, 1, 24))
            if terminated or truncated:
                break
        endings.append((t, terminated, pen.data.xpos[pen.obj_body_id][2], reward))
    assert all(t <= 100 for t, *_ in endings)
    assert all(t == 100 for t, terminated, *_ in endings if not terminated)
    dropped = [(z, reward) for t, terminated, z, reward in endings if terminated]
    assert dropped and all(z < 0.075 and reward < -3 for z, reward in dropped)  # D4RL's -5 for dropping


@slow
@pytest.mark.parametrize("name,tolerance", [("pen-human-v1", 5), ("door-human-v1", 1), ("hammer-human-v1", 1),
                                            ("relocate-human-v1", 1), ("antmaze-umaze-v2", 0)])
def test_random_policy_scores_near_d4rl_random_reference(name, tolerance):
    """D4RL's reference minimum is a random policy's return, so random actions must score about 0. The
    spread of 10 random episodes is a few points of pen's expert-random range (pens drop at random times)
    and well under a point for the other tasks; the antmaze goal is never reached at random."""
    env = fql_eval.make_env(name)
    rng = np.random.default_rng(0)
    (result,) = fql_eval.evaluate(lambda obs, generators: rng.uniform(-1, 1, (1, 1, *env.action_space.shape)),
                                  one_at_a_time(lambda: env), 10 if name != "antmaze-umaze-v2" else 2, [0])
    result = fql_eval.with_score(name, result)
    assert abs(result["score"]) <= tolerance, result


def test_d4rl_normalised_score_arithmetic():
    assert fql_eval.with_score("pen-human-v1", {"return": 3076.8331017826877})["score"] == pytest.approx(100)
    assert fql_eval.with_score("door-cloned-v1", {"return": -56.512833})["score"] == pytest.approx(0)
    hammer = (-274.856578 + 12794.134825156867) / 2
    assert fql_eval.with_score("hammer-expert-v1", {"return": hammer})["score"] == pytest.approx(50)
    assert fql_eval.with_score("antmaze-large-play-v2", {"return": 0.75})["score"] == pytest.approx(75)
    assert "score" not in fql_eval.with_score(CUBE, {"return": 1.0})


def test_d4rl_training_run(tmp_path, monkeypatch):
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))
    rng = np.random.default_rng(0)
    n = 200
    write_d4rl_file(tmp_path, "antmaze-umaze-v2", rng.normal(size=(n, 29)).astype(np.float32),
                    rng.uniform(-1, 1, (n, 8)), (rng.uniform(size=n) < 0.1).astype(np.float32), np.zeros(n, bool),
                    np.arange(n) % 50 == 49)
    fql.main(["--env", "d4rl-antmaze-umaze", "--run_dir", str(tmp_path / "run"), "--no-compile", *SMALL,
              "--offline_steps", "40", "--online_steps", "20", "--log_interval", "20", "--eval_interval", "60",
              "--eval_episodes", "1", "--batch_size", "32"])
    rows = read_csv(tmp_path / "run" / "train.csv")
    assert [r["step"] for r in rows] == ["20", "40", "60"] and not any(k.startswith("validation/") for k in rows[0])
    (evaluation,) = read_csv(tmp_path / "run" / "eval.csv")
    assert float(evaluation["evaluation/score"]) == 100 * float(evaluation["evaluation/success"]) == 0
    online = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["buffer"]["rows"]
    assert online["rewards"][:, 0].tolist() == [-1.0] * 20  # the maze's reward 0 away from the goal, shifted as offline


# ----------------------------------------------------------------------------------------------
# Pixels (visual-*): IMPALA encoder, frame stacking, random shifts
# ----------------------------------------------------------------------------------------------
def test_impala_encoder_shapes_and_flax_same_pooling():
    encoder = fql.ImpalaEncoder((64, 64, 9), "impala_small")
    assert encoder.head.weight.shape == (32 * 8 * 8, 512)  # 64 -> 32 -> 16 -> 8 through three stacks
    images = torch.randint(0, 256, (2, 3, 64, 64, 9), dtype=torch.uint8)
    assert encoder(images).shape == (2, 3, 512)
    assert all(torch.all(m.bias == 0) for m in encoder.modules() if isinstance(m, (nn.Conv2d, fql.Dense)))
    assert sum(isinstance(m, nn.Conv2d) for m in encoder.modules()) == 3 * 3  # conv + one block of two, per stack

    stack = fql.ResnetStack(1, 1)  # an identity conv and a block that adds 0: the stack is just the max-pool
    with torch.no_grad():
        stack.conv.weight.zero_()
        stack.conv.weight[0, 0, 1, 1] = 1
        stack.conv.bias.zero_()
        stack.blocks[0][3].weight.zero_()
        stack.blocks[0][3].bias.zero_()
    pooled = stack(torch.arange(16.0).reshape(1, 1, 4, 4))
    # windows of 3 with stride 2 over rows/cols [0, 1, 2] and [2, 3, pad]: flax pads after, not before
    assert pooled.flatten().tolist() == [10, 11, 14, 15]


def compact_pixels(episode_lengths, frame_stack=3, p_aug=0.0):
    """A compact pixel dataset whose frame i is filled with the value i."""
    frames = sum(episode_lengths) + len(episode_lengths)  # each episode has one final frame without action
    valids = np.concatenate([[1] * n + [0] for n in episode_lengths])
    dataset = dict(observations=np.broadcast_to(np.arange(frames, dtype=np.uint8)[:, None, None, None],
                                                (frames, 8, 8, 3)).copy(),
                   valids=valids, actions=np.zeros((frames, 2)), rewards=np.arange(frames), masks=np.ones(frames))
    return fql.to_device(dataset, "cpu", frame_stack), make_config(frame_stack=frame_stack, p_aug=p_aug, encoder="impala_debug")


def test_frame_stacks_repeat_the_first_frame_at_episode_starts():
    data, cfg = compact_pixels([4, 3])  # frames 0-4 (transitions from 0-3) and 5-8 (from 5-7)
    assert data["frame_rows"][:, -2].tolist() == [0, 1, 2, 3, 5, 6, 7]  # the rows that start a transition
    batch = {k: v[0] for k, v in functools.partial(fql.sample_batch, data, p_aug=cfg.p_aug)(2000).items()}
    rows = batch["rewards"].long()  # the row each transition starts from
    assert set(rows.tolist()) == {0, 1, 2, 3, 5, 6, 7}  # never the final frame of an episode
    stacks = {r: (batch["observations"][i, 0, 0, ::3].tolist(), batch["next_observations"][i, 0, 0, ::3].tolist())
              for i, r in enumerate(rows.tolist())}
    assert stacks[0] == ([0, 0, 0], [0, 0, 1])  # oldest first; the first frame stands in before the start
    assert stacks[1] == ([0, 0, 1], [0, 1, 2])
    assert stacks[3] == ([1, 2, 3], [2, 3, 4])
    assert stacks[5] == ([5, 5, 5], [5, 5, 6])  # the second episode does not look into the first
    assert stacks[7] == ([5, 6, 7], [6, 7, 8])
    assert batch["observations"].dtype == torch.uint8 and batch["observations"].shape == (2000, 8, 8, 9)


def test_pixel_batches_of_a_seed_group_are_each_seeds_own():
    data, cfg = compact_pixels([6, 5], p_aug=0.5)
    data["frames"] = torch.randint(0, 256, data["frames"].shape, dtype=torch.uint8)  # shifts show
    sample = functools.partial(fql.sample_batch, data, p_aug=cfg.p_aug)
    group = sample(64, [torch.Generator().manual_seed(seed) for seed in range(6)])
    assert group["observations"].shape == (6, 64, 8, 8, 9) and group["rewards"].shape == (6, 64)
    for seed in range(6):  # rows, frame stacks and shifts: those the seed's generator draws alone
        alone = sample(64, [torch.Generator().manual_seed(seed)])
        assert all(torch.equal(alone[k][0], group[k][seed]) for k in group)
    unshifted = functools.partial(fql.sample_batch, data)(64, [torch.Generator().manual_seed(s) for s in range(6)])
    shifted = [not torch.equal(group["observations"][s], unshifted["observations"][s]) for s in range(6)]
    assert any(shifted) and not all(shifted)  # p_aug 0.5: some seeds' batches are shifted this update, some not


def test_random_shift_keeps_shape_moves_pixels_and_pairs_s_with_next_s():
    images = torch.randint(0, 256, (2, 64, 16, 16, 6), dtype=torch.uint8)  # two seeds' batches
    shifted, shifted_next = fql.random_shift(images, images.clone(), 1.0, [torch.Generator().manual_seed(s)
                                                                           for s in (0, 1)])
    assert shifted.shape == images.shape and shifted.dtype == torch.uint8
    assert torch.equal(shifted, shifted_next)  # s and s' of a sample move together
    assert (shifted != images).flatten(2).any(2).float().mean() > 0.9  # 48 of 49 offsets move the image
    padded = torch.nn.functional.pad(images.flatten(0, 1).permute(0, 3, 1, 2).float(), (3, 3, 3, 3), mode="replicate")
    for i in (0, 1, 2, 64, 65):  # each sample is an edge-padded crop at one of the 49 offsets, its own
        crops = [padded[i, :, dy:dy + 16, dx:dx + 16].permute(1, 2, 0) for dy in range(7) for dx in range(7)]
        assert any(torch.equal(shifted.flatten(0, 1)[i].float(), crop) for crop in crops)
    for k in (0, 1):  # each seed's shifts are the ones its generator draws alone
        alone, _ = fql.random_shift(images[k:k + 1], images[k:k + 1], 1.0, [torch.Generator().manual_seed(k)])
        assert torch.equal(alone[0], shifted[k])
    same = images[:1].expand(16, -1, -1, -1, -1)  # p_aug decides per seed: whole batches shift, or none of them
    shifted, _ = fql.random_shift(same, same, 0.5, [torch.Generator().manual_seed(s) for s in range(16)])
    moved = (shifted != same).flatten(2).any(2).float().mean(1)
    assert set(moved.tolist()) - {0.0} and 0.0 in moved.tolist() and all(m in (0.0,) or m > 0.9 for m in moved)
    unshifted, _ = fql.random_shift(images, images, p_aug=0.0)
    assert torch.equal(unshifted, images)


class FrameEnv(gymnasium.Env):
    """Frames filled with the step count."""
    observation_space = gymnasium.spaces.Box(0, 255, (4, 4, 3), np.uint8)
    action_space = gymnasium.spaces.Box(-1, 1, (1,))

    def reset(self, seed=None, options=None):
        self.t = 0
        return np.full((4, 4, 3), 7, np.uint8), {}

    def step(self, action):
        self.t += 1
        return np.full((4, 4, 3), self.t, np.uint8), 0.0, False, False, {}


def test_environment_frames_stack_like_the_dataset():
    env = fql_eval.FrameStack(FrameEnv(), 3)
    assert env.observation_space.shape == (4, 4, 9)
    observation, _ = env.reset()
    assert observation[0, 0, ::3].tolist() == [7, 7, 7]
    observation, *_ = env.step(np.zeros(1))
    assert observation[0, 0, ::3].tolist() == [7, 7, 1]
    observation, *_ = env.step(np.zeros(1))
    observation, *_ = env.step(np.zeros(1))
    assert observation[0, 0, ::3].tolist() == [1, 2, 3]


@pytest.fixture(scope="module")
def visual_data(tmp_path_factory):
    """A tiny compact dataset of 64x64 frames rendered by OGBench's visual-cube-single environment."""
    directory = str(tmp_path_factory.mktemp("visual"))
    try:
        env = gymnasium.make("visual-cube-single-v0", terminate_at_goal=False, max_episode_steps=5)
        env.reset(seed=0)
    except Exception as err:  # no OpenGL platform: MuJoCo raises several types
        pytest.skip(f"no offscreen renderer for OGBench's pixel environments: {err}")
    rng = np.random.default_rng(0)
    for name, episodes in (("visual-cube-single-play-v0.npz", 2), ("visual-cube-single-play-v0-val.npz", 1)):
        cols = {k: [] for k in ("observations", "actions", "terminals", "qpos", "qvel")}
        for _ in range(episodes):
            ob, _ = env.reset(seed=int(rng.integers(1 << 30)))
            for t in range(5):
                action = rng.uniform(-1, 1, 5).astype(np.float32)
                next_ob, _, _, _, info = env.step(action)
                for k, v in (("observations", ob), ("actions", action), ("terminals", t == 4),
                             ("qpos", info["prev_qpos"]), ("qvel", info["prev_qvel"])):
                    cols[k].append(v)
                ob = next_ob
        np.savez(os.path.join(directory, name), **{k: np.asarray(v) for k, v in cols.items()})
    return directory


def with_goals_reached(source, directory, prefix=""):
    """Copies of the OGBench dataset files in `source` in which the cube sits on task 1's goal in rows 1-2 and on
    task 3's in rows 3-4 (the relabelling reads only qpos), so that the two tasks' rewards and masks differ."""
    goals = []
    for task in (1, 3):
        env = gymnasium.make(f"{prefix}cube-single-singletask-task{task}-v0")
        env.reset(seed=0)
        goals.append(env.unwrapped._data.mocap_pos[0].copy())
        env.close()
    for name in os.listdir(source):
        data = dict(np.load(os.path.join(source, name)))
        data["qpos"][1:3, 14:17] = goals[0]
        data["qpos"][3:5, 14:17] = goals[1]
        np.savez(os.path.join(directory, name), **data)


@slow
@pytest.mark.parametrize("prefix", ["", "visual-"], ids=["states", "pixels"])
def test_one_loaded_dataset_gives_every_tasks_rewards_and_masks(prefix, request, tmp_path):
    """Tasks 1 and 3 from one load: the same observations, actions and frames once, and for each task a column of
    rewards and masks equal to what OGBench's make_env_and_datasets gives for that task alone, in the train and
    validation splits (compact frames for pixels); on the device, --sparse applies to each column."""
    import ogbench

    with_goals_reached(request.getfixturevalue("visual_data" if prefix else "cube_data"), str(tmp_path), prefix)
    names = [f"{prefix}cube-single-play-singletask-task{task}-v0" for task in (1, 3)]
    splits = fql.load_datasets(names, str(tmp_path))
    for k, name in enumerate(names):
        _, *alone = ogbench.make_env_and_datasets(name, dataset_dir=str(tmp_path), compact_dataset=bool(prefix))
        for split, single in zip(splits, alone, strict=True):
            for key in ("observations", "actions", "terminals"):
                np.testing.assert_array_equal(split[key], single[key])
            np.testing.assert_array_equal(split["rewards"][:, k], single["rewards"])
            np.testing.assert_array_equal(split["masks"][:, k], single["masks"])
    rewards = splits[0]["rewards"]
    assert rewards.shape == (len(splits[0]["actions"]), 2) and (rewards == 0).any(axis=0).all()  # each solved
    assert not np.array_equal(rewards[:, 0], rewards[:, 1])
    data = fql.to_device(splits[0], "cpu", frame_stack=3 if prefix else None, sparse=True)
    assert data["rewards"].shape == data["masks"].shape == (len(data["actions"]), 2)
    assert set(data["rewards"].unique().tolist()) == {-1.0, 0.0}


@slow
def test_visual_training_run(visual_data, tmp_path):
    agent = fql.main(["--env", "ogbench-visual-cube-single", "--dataset_dir", visual_data, "--run_dir",
                      str(tmp_path), "--no-compile", "--encoder", "impala_debug", *SMALL, "--offline_steps", "20",
                      "--log_interval", "10", "--eval_interval", "0", "--batch_size", "16"])
    assert agent.cfg.env == "visual-cube-single-play-singletask-task1-v0"
    assert (agent.cfg.alpha, agent.cfg.frame_stack, agent.cfg.p_aug) == (300, 3, 0.5)  # visual presets
    rows = read_csv(tmp_path / "train.csv")
    assert [r["step"] for r in rows] == ["10", "20"]
    assert all(math.isfinite(float(r[k])) for r in rows for k in ("critic/critic_loss", "validation/actor/q"))
    nets = agent.nets  # three encoders plus the target's copy, each its own
    encoders = [nets.critic.encoder, nets.target_critic.encoder, nets.actor_bc_flow.encoder, nets.actor_onestep.encoder]
    assert all(isinstance(e, fql.ImpalaEncoder) for e in encoders)
    assert len({id(p) for e in encoders for p in e.parameters()}) == sum(len(list(e.parameters())) for e in encoders)
    restored, state = fql_eval.load_agent(str(tmp_path / "checkpoint.pt"), "cpu")
    assert tuple(state["observation_shape"]) == (64, 64, 9)
    action = restored.act(np.zeros((1, 64, 64, 9), np.uint8), generators(1))
    assert action.shape == (1, 5) and np.all(np.abs(action) <= 1)


# ----------------------------------------------------------------------------------------------
# CLI and bad input
# ----------------------------------------------------------------------------------------------
def parse(*args) -> fql.Config:
    return fql.resolve_config(tyro.cli(fql.Config, args=list(args), use_underscores=True))


def test_env_names_and_per_env_defaults():
    def resolved(*args):
        cfg = parse(*args)
        return cfg.env, cfg.alpha, cfg.q_agg, cfg.discount

    assert resolved("--env", "ogbench-cube-single") == ("cube-single-play-singletask-task2-v0", 300, "mean", 0.99)
    assert resolved("--env", "ogbench-antmaze-giant-task3") == (
        "antmaze-giant-navigate-singletask-task3-v0", 10, "min", 0.995)
    assert resolved("--env", "puzzle-4x4-play-singletask-task1-v0", "--alpha", "5", "--q_agg", "min") == (
        "puzzle-4x4-play-singletask-task1-v0", 5, "min", 0.99)
    assert parse("--env", "ogbench-antsoccer-arena").env == "antsoccer-arena-navigate-singletask-task4-v0"
    cfg = parse("--env", "ogbench-visual-cube-single-task1", "--encoder", "impala_small", "--frame_stack", "3",
                "--p_aug", "0.5")
    assert (cfg.env, cfg.alpha, cfg.offline_steps) == ("visual-cube-single-play-singletask-task1-v0", 300, 500_000)
    cfg = parse("--env", "visual-scene-play-singletask-task2-v0")
    assert (cfg.alpha, cfg.encoder, cfg.frame_stack, cfg.p_aug) == (100, "impala_small", 3, 0.5)
    with pytest.raises(fql.UsageError, match="--frame_stack must be positive, got 0"):
        parse("--env", "visual-cube-double-play-singletask-task1-v0", "--frame_stack", "0")
    assert parse("--env", "pointmaze-medium-navigate-singletask-v0").alpha == 10  # official default
    for alias in fql.ENVS:  # every alias names an environment OGBench registers (its name without the dataset type)
        name = parse("--env", f"ogbench-{alias}").env
        assert re.sub(r"-(play|navigate)-singletask", "-singletask", name) in gymnasium.registry, name


def test_action_chunking_flags():
    cfg = parse("--env", "ogbench-scene", "--horizon", "5", "--no-action-chunking", "--sparse")
    assert (cfg.horizon, cfg.action_chunking, cfg.sparse, cfg.alpha) == (5, False, True, 300)
    cfg = parse("--horizon", "5", "--no_action_chunking")
    assert (cfg.horizon, cfg.action_chunking, cfg.sparse) == (5, False, False)
    assert (parse().horizon, parse().action_chunking) == (1, True)  # plain FQL


def test_flags_in_underscore_and_hyphen_spellings():
    cfg = parse("--offline_steps", "7", "--batch-size", "9", "--no-compile", "--actor_hidden_dims", "8", "8",
                "--normalize_q_loss", "--run_dir", "x", "--device", "cpu")
    assert (cfg.offline_steps, cfg.batch_size, cfg.compile, cfg.actor_hidden_dims) == (7, 9, False, (8, 8))
    assert cfg.normalize_q_loss and cfg.run_dir == "x"
    defaults = parse()
    assert (defaults.offline_steps, defaults.batch_size, defaults.log_interval, defaults.eval_interval,
            defaults.eval_episodes, defaults.lr, defaults.tau, defaults.flow_steps) == (
        1_000_000, 256, 5000, 100_000, 50, 3e-4, 0.005, 10)


@pytest.mark.parametrize("flags,message", [
    (("--env", "ogbench-cube-triple"), "Valid: ogbench-antmaze-large"),
    (("--env", "ogbench-cube-single-task9"), "tasks 1 to 5"),
    (("--batch_size", "0"), "--batch_size must be positive"),
    (("--offline_steps", "-5"), "--offline_steps must be >= 0"),
    (("--offline_steps", "0"), "nothing to train"),
    (("--alpha", "nan"), "--alpha must be >= 0, got nan"),
    (("--alpha", "-1"), "--alpha must be >= 0, got -1.0"),
    (("--lr", "0"), "--lr must be positive, got 0.0"),
    (("--tau", "1.5"), "--tau must be in (0, 1], got 1.5"),
    (("--discount", "-0.1"), "--discount must be in [0, 1], got -0.1"),
    (("--env", "ogbench-visual-cube-single", "--p_aug", "2"), "--p_aug must be in [0, 1], got 2.0"),
    (("--frame_stack", "3"), "--encoder, --frame_stack and --p_aug are for pixel (visual-*) envs"),
    (("--encoder", "impala_small"), "--encoder, --frame_stack and --p_aug are for pixel (visual-*) envs"),
    (("--p_aug", "0.5"), "--encoder, --frame_stack and --p_aug are for pixel (visual-*) envs"),
    (("--device", "tpu"), "--device tpu: give auto, cpu, or cuda[:N] for one of this machine's"),
    (("--device", "cuda:7"), "--device cuda:7: give auto, cpu, or cuda[:N] for one of this machine's"),
    (("--seeds", "1", "1"), "--seeds has a value twice: 1 1"),
    (("--seed", "2", "--seeds", "0", "1"), "give --seed or --seeds, not both"),
    (("--seeds", "-1"), "--seeds must be in [0, 2**32), numpy's seeds, got -1"),
    (("--seeds", "0", "4294967296"), "--seeds must be in [0, 2**32), numpy's seeds, got 4294967296"),
    (("--tasks", "1", "9"), "--tasks must be among OGBench's tasks, 1 to 5, got 9"),
    (("--tasks", "3", "3"), "--tasks has a value twice: 3 3"),
    (("--env", "d4rl-pen-human", "--tasks", "1"), "--tasks is for OGBench envs named without a task"),
    (("--env", "ogbench-cube-single-task3", "--tasks", "1", "2"), "--tasks is for OGBench envs named without a task"),
    (("--alphas", "3", "3"), "--alphas has a value twice: 3.0 3.0"),
    (("--alphas", "10", "-1"), "--alphas must be >= 0, got -1.0"),
    (("--alphas", "inf"), "--alphas must be >= 0, got inf"),
    (("--alphas", "nan"), "--alphas must be >= 0, got nan"),
    (("--alpha", "3", "--alphas", "1", "2"), "give --alpha or --alphas, not both"),
    (("--run_dir", "sweep/seed{seed}", "--alphas", "1", "10"), "gives two agents one folder: name each axis"),
    (("--horizon", "0"), "--horizon must be positive, got 0"),
    (("--env", "ogbench-visual-cube-single", "--horizon", "5"), "--horizon > 1 are not supported on pixels"),
])
def test_bad_input_gives_a_clear_error(flags, message, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        fql.main(["--run_dir", str(tmp_path / "run"), *flags])
    assert str(exit_info.value.code).startswith("fql.py: error: ") and message in str(exit_info.value.code)
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_wandb_without_wandb_installed_is_a_clear_error(cube_data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: import raises ImportError
    with pytest.raises(SystemExit, match="pip install wandb"):
        run_cli(cube_data, tmp_path, "--offline_steps", "10", "--wandb_project", "fql")


def test_missing_dataset_offline_names_the_files(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(SystemExit) as exit_info:
        fql.main(["--env", "ogbench-scene", "--dataset_dir", str(tmp_path), "--run_dir", str(tmp_path / "run")])
    message = str(exit_info.value.code)
    assert "scene-play-v0.npz" in message and "scene-play-v0-val.npz" in message and str(tmp_path) in message


@slow
def test_fql_imports_and_trains_without_the_environment_packages():
    """fql.py can be copied alone: without ogbench, gymnasium, MuJoCo, h5py and eval.py, `import fql` works
    and a compiled update runs on random data."""
    code = """
import importlib.abc, sys
BLOCKED = {"ogbench", "gymnasium", "mujoco", "h5py", "eval"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked")
sys.meta_path.insert(0, Block())
import torch, fql
cfg = fql.resolve_config(fql.Config(device="cpu", compile=True, alpha=3.0, flow_steps=2, actor_hidden_dims=(32, 32),
                                    value_hidden_dims=(32, 32)))  # as the compiled tests: compiled once, cached
agent = fql.make_agent(cfg, (7,), 3)
batch = dict(actions=torch.rand(1, 256, 3) * 2 - 1, rewards=torch.zeros(1, 256), masks=torch.ones(1, 256),
             observations=torch.randn(1, 256, 7), next_observations=torch.randn(1, 256, 7))
metrics = agent.update(batch, fql.draw_noise(256, 3, "cpu"), with_metrics=True)
assert all(torch.isfinite(v) for v in metrics.values()) and len(metrics) == 10
print("loaded:", sorted(BLOCKED & {m.split(".")[0] for m in sys.modules}))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__)))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "loaded: []" in result.stdout


@slow
def test_each_compiled_function_compiles_once_for_each_shape_it_is_called_with(cube_data, tmp_path, monkeypatch):
    """A compiled run of a grid that crosses every boundary (log steps with validation, an evaluation, the end of the
    offline phase, an online buffer that grows at every step, a resumed run) compiles the losses once with and once
    without metrics and the policy once for each shape of its input (the evaluation's, fine-tuning's), never again:
    no recompilation, and no graph break (fullgraph=True makes one an error)."""
    real_compile = torch.compile
    compiled = {}  # the compiled function's name: its compilations, the signatures it was called with

    def counting_compile(fn, **options):
        """torch.compile as fql.py calls it, whose backend counts the graphs that dynamo hands it (and runs them as
        they are: dynamo's guards decide on recompilations whatever the backend); one backend for each function, so
        that the resumed run's agent reuses what this process compiled, as the same shapes should."""
        record = compiled.setdefault(fn.__name__, dict(graphs=0, signatures=set()))
        if "backend" not in record:
            def backend(graph, example_inputs):
                record["graphs"] += 1
                return graph.forward
            record["backend"] = backend
        options.pop("mode", None)  # reduce-overhead: inductor's CUDA graphs, nothing on a CPU
        function = real_compile(fn, backend=record["backend"], **options)

        def call(*args):
            leaves = torch.utils._pytree.tree_leaves(args)
            record["signatures"].add(tuple(tuple(v.shape) if isinstance(v, torch.Tensor) else v for v in leaves))
            return function(*args)
        return call

    monkeypatch.setattr(torch, "compile", counting_compile)
    flags = ["--env", "ogbench-cube-single", "--dataset_dir", cube_data, "--run_dir", str(tmp_path / "run"),
             "--seeds", "0", "1", "--offline_steps", "6", "--log_interval", "2", "--eval_interval", "3",
             "--save_interval", "4", "--eval_episodes", "2", "--batch_size", "16", *SMALL, "--flow_steps", "2",
             "--resume"]
    fql.main([*flags, "--online_steps", "6"])
    fql.main([*flags, "--online_steps", "12"])  # resumed at step 12
    assert set(compiled) == {"losses_eager", "policy_eager"}
    assert len(compiled["losses_eager"]["signatures"]) == 2  # with and without metrics
    for name, record in compiled.items():
        assert record["graphs"] == len(record["signatures"]), (name, record)
    assert len(read_csv(tmp_path / "run" / "seed1" / "train.csv")) == 9


# ----------------------------------------------------------------------------------------------
# Minari: the offline datasets of the gymnasium world, and a user's own data (no network: built here)
# ----------------------------------------------------------------------------------------------
class ActionRecorder(gymnasium.Wrapper):
    """Appends each action the environment receives to the file $RECORDED_ACTIONS, when that is set."""

    def step(self, action):
        if os.environ.get("RECORDED_ACTIONS"):
            with open(os.environ["RECORDED_ACTIONS"], "a") as f:
                f.write(" ".join(map(str, np.ravel(action))) + "\n")
        return self.env.step(action)


def recording_pendulum(**kwargs):
    """MuJoCo's InvertedPendulum-v5 (actions in [-3, 3]) with its actions recorded: the environment of a test
    dataset, which Minari makes from this entry point in the scripts' processes too."""
    return ActionRecorder(gymnasium.make("InvertedPendulum-v5", **kwargs))


gymnasium.register("test_fql/RecordingPendulum-v0", entry_point="test_fql:recording_pendulum", max_episode_steps=40)
PENDULUM_SCORES = dict(ref_min_score=0.0, ref_max_score=40.0)  # its normalised score: 100 * return / 40


def write_minari_dataset(dataset_id, stepped, episodes, **create):
    """`episodes` episodes of uniform random actions in the environment `stepped` (episode i from reset(seed=i)),
    saved with minari.create_dataset_from_buffers (its `env`: `stepped`, unless given, as None for own data)."""
    import minari
    from minari.data_collector import EpisodeBuffer

    buffers = []
    for i in range(episodes):
        observations = [stepped.reset(seed=i)[0]]
        stepped.action_space.seed(i)
        actions, rewards, terminations, truncations = [], [], [], []
        while not (terminations and (terminations[-1] or truncations[-1])):
            actions.append(stepped.action_space.sample())
            observation, reward, terminated, truncated, _ = stepped.step(actions[-1])
            for steps, value in ((observations, observation), (rewards, reward), (terminations, terminated),
                                 (truncations, truncated)):
                steps.append(value)
        if isinstance(observations[0], dict):
            observations = {k: np.stack([o[k] for o in observations]) for k in observations[0]}
        buffers.append(EpisodeBuffer(observations=np.stack(observations) if isinstance(observations, list) else
                                     observations, actions=np.stack(actions), rewards=np.array(rewards),
                                     terminations=np.array(terminations), truncations=np.array(truncations),
                                     infos={}))
    details = dict(algorithm_name="random", author="test", author_email="test@example.com", code_permalink="-",
                   description="test data")
    return minari.create_dataset_from_buffers(dataset_id, buffers, **{"env": stepped, **details, **create})


class ImageEnv(gymnasium.Env):
    """Images of 32x32 pixels, one action in [-1, 1]; episodes of 3 steps."""
    observation_space = gymnasium.spaces.Box(0, 255, (32, 32, 3), np.uint8)
    action_space = gymnasium.spaces.Box(-1, 1, (1,))

    def reset(self, seed=None, options=None):
        self.t = 0
        return self.observation_space.sample(), {}

    def step(self, action):
        self.t += 1
        return self.observation_space.sample(), 0.0, False, self.t == 3, {}


@pytest.fixture(scope="module")
def minari_data(tmp_path_factory):
    """A Minari folder: pendulum (Box observations, actions in [-3, 3], reference scores), pointmaze (Dict
    observations, success, no reference scores), own (a user's data: no environment), and the bad: cartpole
    (Discrete actions), images, unbounded (actions), broken (a truncated data file), empty (no data file)."""
    import gymnasium_robotics

    gymnasium.register_envs(gymnasium_robotics)
    root = str(tmp_path_factory.mktemp("minari"))
    saved = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = root
    try:
        pendulum = gymnasium.make("test_fql/RecordingPendulum-v0")
        write_minari_dataset("test/pendulum-v0", pendulum, 30, **PENDULUM_SCORES)
        write_minari_dataset("test/pointmaze-v0", gymnasium.make("PointMaze_UMaze-v3", max_episode_steps=30), 6)
        write_minari_dataset("test/own-v0", pendulum, 10, env=None, observation_space=pendulum.observation_space,
                             action_space=pendulum.action_space)
        write_minari_dataset("test/cartpole-v0", gymnasium.make("CartPole-v1"), 2)
        write_minari_dataset("test/images-v0", ImageEnv(), 2, env=None, observation_space=ImageEnv.observation_space,
                             action_space=ImageEnv.action_space)
        write_minari_dataset("test/unbounded-v0", pendulum, 2, env=None, observation_space=pendulum.observation_space,
                             action_space=gymnasium.spaces.Box(-np.inf, np.inf, (1,)))
        for broken in ("broken", "empty"):
            dataset = write_minari_dataset(f"test/{broken}-v0", pendulum, 2)
            data_file = os.path.join(dataset.spec.data_path, "main_data.hdf5")
            with open(data_file, "r+b") as f:
                f.truncate(4096 if broken == "broken" else 0)
            if broken == "empty":
                os.remove(data_file)
    finally:
        os.environ.pop("MINARI_DATASETS_PATH")
        if saved is not None:
            os.environ["MINARI_DATASETS_PATH"] = saved
    return root


def test_a_minari_datasets_episodes_become_fql_transitions(minari_data, monkeypatch):
    """Each episode's steps in order: s' the next observation, mask = 1 - termination, the episode's end at its last
    step; actions from the space's bounds to [-1, 1]; Dict observations flattened as gymnasium flattens them, as the
    recovered environment's are (the same reset, the same vector)."""
    import minari

    monkeypatch.setenv("MINARI_DATASETS_PATH", minari_data)
    for name in ("pendulum", "pointmaze"):
        dataset = minari.load_dataset(f"test/{name}-v0")
        data = fql.load_minari(f"minari:test/{name}-v0")
        episodes = list(dataset.iterate_episodes())
        start = 0
        for episode in episodes:
            n = len(episode.actions)
            observations = episode.observations  # (n + 1, ...), or a dict of them
            steps = [{k: v[i] for k, v in observations.items()} if isinstance(observations, dict) else
                     observations[i] for i in range(n + 1)]
            flat = np.stack([gymnasium.spaces.flatten(dataset.observation_space, step) for step in steps])
            rows = slice(start, start + n)
            np.testing.assert_allclose(data["observations"][rows], flat[:-1], rtol=1e-6)
            np.testing.assert_allclose(data["next_observations"][rows], flat[1:], rtol=1e-6)
            np.testing.assert_array_equal(data["masks"][rows], 1 - episode.terminations)
            np.testing.assert_array_equal(data["terminals"][rows], np.arange(n) == n - 1)
            np.testing.assert_allclose(data["rewards"][rows], episode.rewards)
            high = dataset.action_space.high
            np.testing.assert_allclose(data["actions"][rows] * high, episode.actions, rtol=1e-5, atol=1e-6)
            start += n
        assert start == len(data["actions"]) == dataset.total_steps
        assert np.abs(data["actions"]).max() <= 1 and data["terminals"].sum() == len(episodes)
        env = fql_eval.make_env(f"minari:test/{name}-v0")
        for i in (0, 3):  # episode i of the data started from reset(seed=i)
            first = np.flatnonzero(np.r_[True, data["terminals"][:-1]])[i]
            np.testing.assert_allclose(env.reset(seed=i)[0], data["observations"][first], rtol=1e-6)


def test_the_policys_actions_reach_a_minari_environment_in_its_own_bounds(minari_data, tmp_path, monkeypatch):
    """The recovered environment gets the policy's actions in [-1, 1] scaled to its space's [-3, 3]."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", minari_data)
    monkeypatch.setenv("RECORDED_ACTIONS", str(tmp_path / "actions.txt"))
    env = fql_eval.make_env("minari:test/pendulum-v0")
    assert env.action_space == gymnasium.spaces.Box(-1, 1, (1,))
    env.reset(seed=0)
    for action in (1.0, -1.0, 0.5, 0.0):
        env.step(np.array([action], np.float32))
    np.testing.assert_allclose(np.loadtxt(tmp_path / "actions.txt"), [3.0, -3.0, 1.5, 0.0], atol=1e-6)


def minari_command(run_dir, dataset, *flags):
    return ["fql.py", "--env", f"minari:test/{dataset}-v0", "--run_dir", str(run_dir), "--batch_size", "16",
            "--eval_episodes", "2", "--no-compile", *SMALL, *flags]


@slow
def test_a_minari_dataset_trains_evaluates_resumes_finetunes_and_tabulates(minari_data, tmp_path):
    """`python fql.py --env minari:<id>` with evaluation on: the dataset's own environment gets actions in its bounds
    and reports return and Minari's normalised score (no success: InvertedPendulum has none); the run resumes,
    fine-tunes with eval.py, and `eval.py table` shows the score, no paper number."""
    recorded = tmp_path / "actions.txt"
    env = dict(MINARI_DATASETS_PATH=minari_data, RECORDED_ACTIONS=str(recorded))
    run = tmp_path / "run"
    command = minari_command(run, "pendulum", "--eval_interval", "4", "--log_interval", "2", "--resume")
    for steps in ("4", "8"):  # a run, and its resumption
        result = script(*command, "--offline_steps", steps, env=env)
        assert result.returncode == 0 and console(result) == [], result.stderr[-3000:]
        assert f"step {steps}: return " in result.stdout
    rows = read_csv(run / "eval.csv")
    assert [row["step"] for row in rows] == ["4", "8"] and "evaluation/success" not in rows[0]
    for row in rows:
        assert float(row["evaluation/score"]) == pytest.approx(100 * float(row["evaluation/return"]) / 40)
    actions = np.loadtxt(recorded)  # every evaluation step's action, as the environment got it (the exact scaling:
    assert len(actions) >= sum(2 * float(row["evaluation/length"]) for row in rows)  # the test above)
    assert np.abs(actions).max() <= 3

    finetune = script("eval.py", "finetune", "--checkpoint", str(run), "--online_steps", "60", "--eval_interval", "30",
                      "--eval_episodes", "2", "--log_interval", "15", "--save_interval", "30", env=env)
    assert finetune.returncode == 0 and console(finetune) == [], finetune.stderr[-3000:]
    online = read_csv(tmp_path / "run-finetune" / "train.csv")
    assert [row["step"] for row in online] == ["15", "30", "45", "60"]
    # an episode of at most 40 steps has ended: its length and return, no success (the env has none)
    assert 0 < float(online[-1]["exploration/length"]) <= 40 and "exploration/success" not in online[-1]
    assert [row["step"] for row in read_csv(tmp_path / "run-finetune" / "eval.csv")] == ["30", "60", "68"]
    table = script("eval.py", "table", str(run), env=env)
    assert table.returncode == 0, table.stderr[-3000:]
    score = float(rows[-1]["evaluation/score"])
    assert table.stdout.splitlines()[2] == f"| minari:test/pendulum-v0 |  |  | 1 | 8 | {score:.1f} | 0.0 |  |"


@slow
def test_a_grid_on_a_minari_dataset_of_dict_observations(minari_data, tmp_path):
    """Goal-conditioned PointMaze data (Dict observations, success, no reference scores): a grid of seeds and alphas
    trains and evaluates each agent in the dataset's environment; --tasks is OGBench's alone."""
    env = dict(MINARI_DATASETS_PATH=minari_data)
    result = script(*minari_command(tmp_path / "grid", "pointmaze", "--seeds", "0", "1", "--alphas", "1", "10",
                                    "--offline_steps", "4", "--eval_interval", "4"), env=env)
    assert result.returncode == 0 and console(result) == [], result.stderr[-3000:]
    runs = sorted((tmp_path / "grid").iterdir())
    assert [run.name for run in runs] == sorted(f"alpha{a}__seed{s}" for a in (1, 10) for s in (0, 1))
    for run in runs:
        (row,) = read_csv(run / "eval.csv")
        assert float(row["evaluation/length"]) == 30 and "evaluation/score" not in row
        assert 0 <= float(row["evaluation/success"]) <= 1
    table = script("eval.py", "table", *map(str, runs), env=env)
    assert "| minari:test/pointmaze-v0 |  | alpha=1.0 | 2 | 4 |" in table.stdout  # its return
    one_line_error(script(*minari_command(tmp_path / "tasks", "pointmaze", "--tasks", "1", "2"), env=env),
                   "--tasks is for OGBench envs")


@slow
def test_readmes_own_data_becomes_a_minari_dataset_that_fql_trains_on(tmp_path, monkeypatch):
    """README's block, run as written on episodes of the shapes it names, makes a dataset that README's command for
    own data (`--eval_interval 0`) trains on."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    rng = np.random.default_rng(0)
    my_episodes = [(rng.normal(size=(n + 1, 6)), rng.uniform(-1, 1, (n, 2)), rng.normal(size=n), np.arange(n) == n - 1,
                    np.zeros(n, bool)) for n in (5, 9, 7)]
    exec(readme_python("my/robot-logs-v0"), {"my_episodes": my_episodes})
    (command,) = [line for line in open(os.path.join(HERE, "README.md")) if "minari:my/robot-logs-v0" in line]
    result = script(*command.split("#")[0].split()[1:], "--run_dir", str(tmp_path / "run"), "--offline_steps", "3",
                    "--batch_size", "8", "--no-compile", *SMALL, env=dict(MINARI_DATASETS_PATH=str(tmp_path / "minari")))
    assert result.returncode == 0 and console(result) == [], result.stderr[-3000:]
    state = fql.read_checkpoint(str(tmp_path / "run" / "checkpoint.pt"))
    assert state["step"] == 3 and state["observation_shape"] == (6,) and state["action_dim"] == 2


@slow
def test_minari_datasets_fql_cannot_use_are_refused_in_one_line(minari_data, tmp_path):
    """An unknown id (its download fails: no network), Discrete or unbounded actions, images, a truncated or missing
    data file, and a user's data without an environment while evaluation is on: each one line, nothing written.
    That data trains with --eval_interval 0."""
    env = dict(MINARI_DATASETS_PATH=minari_data)
    for dataset, message in (("nope", "could not load the Minari dataset of minari:test/nope-v0"),
                             ("cartpole", "bounded continuous actions, not Box"),
                             ("images", "vector observations and bounded continuous actions, not Box(0, 255, (32, 32, 3)"),
                             ("unbounded", "bounded continuous actions, not Box(-inf, inf, (4,), float64) and Box(-inf, inf, (1,)"),
                             ("broken", "could not load the Minari dataset of minari:test/broken-v0 (OSError"),
                             ("empty", "could not load the Minari dataset of minari:test/empty-v0 (ValueError"),
                             ("own", "minari:test/own-v0 has no environment to evaluate or fine-tune in")):
        result = script(*minari_command(tmp_path / "run", dataset, "--offline_steps", "2"), env=env)
        one_line_error(result, message, *["and Discrete(2)"] * (dataset == "cartpole"))
        assert files_in(tmp_path) == {}, dataset
    own = script(*minari_command(tmp_path / "run", "own", "--offline_steps", "2", "--eval_interval", "0"), env=env)
    assert own.returncode == 0 and console(own) == [], own.stderr[-3000:]
    assert fql.read_checkpoint(str(tmp_path / "run" / "checkpoint.pt"))["step"] == 2


# ----------------------------------------------------------------------------------------------
# The scripts as users run them: subprocesses, with evaluation on (the default) and no network
# ----------------------------------------------------------------------------------------------
OFFLINE = {name: "http://127.0.0.1:9" for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")}
WARNINGS_ON = dict(PYTHONWARNINGS="default")  # every warning shown, once per place: the console must stay clean
PROGRESS = re.compile(r"\d+%\|")  # tqdm's progress bar, which it draws on stderr


def script(*args, env=None) -> subprocess.CompletedProcess:
    """`python fql.py ...` or `python eval.py ...` as a user types it, in this folder, with Python's warnings on;
    every download fails at once (through a proxy that refuses connections)."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=HERE,
                          env={**os.environ, **OFFLINE, **WARNINGS_ON, **(env or {})}, timeout=900)


def console(result) -> list:
    """What the script wrote on stderr, its progress bar left out."""
    return [line for line in result.stderr.splitlines() if line.strip() and not PROGRESS.search(line)]


def one_line_error(result, *named):
    """The script failed with one line on stderr, besides its progress bar: an error naming `named`."""
    assert result.returncode != 0 and len(console(result)) == 1, result.stderr[-3000:]
    line = console(result)[0]
    assert re.match(r"(fql|eval)\.py: error: ", line) and all(name in line for name in named), line


def files_in(folder) -> dict:
    return {str(path): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


@slow
@pytest.mark.skipif(not ctypes.util.find_library("EGL"), reason="needs EGL, which MuJoCo renders through")
def test_readmes_main_command_runs_where_mujoco_renders_through_mesas_egl(cube_data, tmp_path):
    """README's first command (tiny flags; compiled, evaluation on) with MUJOCO_GL=egl, on a machine whose EGL is
    Mesa's, exits 0 with a clean console. With Triton installed (as with PyPI's default torch, and in CI) it died by
    SIGSEGV without a word: Triton, imported by Adam after MuJoCo's EGL had loaded Mesa's LLVM, ran into it."""
    run_dir = tmp_path / "run"
    result = script("fql.py", "--env", "ogbench-cube-single", "--alpha", "300", "--dataset_dir", cube_data,
                    "--run_dir", str(run_dir), "--offline_steps", "2", "--eval_interval", "2", "--eval_episodes", "1",
                    "--batch_size", "16", *SMALL, env=dict(MUJOCO_GL="egl"))
    assert result.returncode == 0 and console(result) == [], (result.returncode, result.stderr[-3000:])
    assert "step 2: success 0.000" in result.stdout and (run_dir / "checkpoint.pt").exists()


@slow
def test_scripts_name_a_missing_dataset_in_one_line(tmp_path):
    empty = tmp_path / "datasets"
    result = script("fql.py", "--env", "ogbench-cube-single", "--dataset_dir", str(empty), "--run_dir",
                    str(tmp_path / "run"))
    one_line_error(result, str(empty / "cube-single-play-v0.npz"), str(empty / "cube-single-play-v0-val.npz"))
    result = script("fql.py", "--env", "d4rl-pen-human", "--run_dir", str(tmp_path / "run"),
                    env=dict(D4RL_DATASET_DIR=str(empty)))
    one_line_error(result, "pen-human-v1.hdf5", str(empty))
    assert files_in(tmp_path) == {}  # no run folder, no partial download


@slow
def test_scripts_refuse_in_one_line_what_would_lose_a_run(cube_data, tmp_path):
    """A short run of two seeds with the default evaluation (at its end) prints nothing but its progress bar
    and lines on stdout, and `eval.py table` reads its folders. Then the same command again, with --resume
    and other flags, or on a broken checkpoint; `eval.py` on a missing or broken checkpoint and `plot` with no
    runs: each ends in one line and a non-zero exit, and changes no file."""
    command = ["fql.py", "--dataset_dir", cube_data, "--run_dir", str(tmp_path / "run"), "--seeds", "0", "1",
               "--offline_steps", "4", "--batch_size", "16", "--eval_episodes", "2", "--no-compile", *SMALL]
    first = script(*command)
    assert first.returncode == 0 and console(first) == [], first.stderr[-3000:]  # no warnings, no chatter
    assert "step 4: success 0.000 0.000" in first.stdout
    runs = [tmp_path / "run" / f"seed{seed}" for seed in (0, 1)]
    table = script("eval.py", "table", *map(str, runs), "--output", str(tmp_path / "table.csv"))
    assert table.returncode == 0 and console(table) == [], table.stderr[-3000:]
    assert table.stdout.splitlines()[2] == "| cube-single-play | 2 |  | 2 | 4 | 0.0 | 0.0 | 97 |"
    assert read_csv(tmp_path / "table.csv")[0]["seeds"] == "2"

    written = files_in(tmp_path)
    one_line_error(script(*command), f"{runs[0]} already holds a run; add --resume")
    one_line_error(script(*command, "--resume", "--alpha", "1"), f"differs from the run in {runs[0]} in alpha")
    assert files_in(tmp_path) == written
    checkpoint = runs[1] / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])  # truncated, as by a full disk
    written = files_in(tmp_path)
    one_line_error(script(*command, "--resume"), f"{checkpoint} is not a readable checkpoint")
    one_line_error(script("eval.py", "--checkpoint", str(runs[1])), f"{checkpoint} is not a readable checkpoint")
    one_line_error(script("eval.py", "--checkpoint", str(tmp_path / "none")), f"no checkpoint at {tmp_path / 'none'}")
    one_line_error(script("eval.py", "plot", "--output", str(tmp_path / "runs.png")), "give one or more run folders")
    assert files_in(tmp_path) == written


@slow
def test_scripts_stop_a_diverging_run_and_refuse_bad_flags_in_one_line(cube_data, tmp_path):
    run = tmp_path / "run"
    result = script("fql.py", "--dataset_dir", cube_data, "--run_dir", str(run), "--offline_steps", "10", "--lr",
                    "1e30", "--log_interval", "2", "--save_interval", "1", "--eval_episodes", "1", "--batch_size",
                    "16", "--no-compile", *SMALL)  # Adam's first step throws the parameters to 1e30
    one_line_error(result, f"training diverged in {run}: critic/critic_loss is nan at step 2. Stopped before saving")
    state = fql.read_checkpoint(str(run / "checkpoint.pt"))  # the last good checkpoint
    assert state["step"] == 1 and all(torch.isfinite(v).all() for v in state["nets"].values())

    one_line_error(script("fql.py", "--env", "nope"), "unknown env 'nope'")
    one_line_error(script("fql.py", "--batch_size", "0", "--run_dir", str(tmp_path / "other")),
                   "--batch_size must be positive")
    unknown = script("fql.py", "--batch-sise", "8")  # tyro's own message, in a box
    assert unknown.returncode != 0 and "--batch-sise" in unknown.stderr and "Traceback" not in unknown.stderr
    assert not (tmp_path / "other").exists()


@slow
def test_every_readme_command_keeps_a_clean_console(cube_data, tmp_path):
    """With Python's warnings on: training without evaluation (fql.py alone: MuJoCo's GLFW and gymnasium's
    float64 warnings came while it relabelled the dataset), evaluation with a video, plot and fine-tuning print
    nothing on stderr but their progress bars."""
    run = tmp_path / "run"
    commands = [["fql.py", "--dataset_dir", cube_data, "--run_dir", str(run), "--eval_interval", "0",
                 "--offline_steps", "4", "--log_interval", "2", "--batch_size", "16", *SMALL],
                ["eval.py", "--checkpoint", str(run), "--episodes", "2", "--video_episodes", "1", "--frame_skip", "50"],
                ["eval.py", "plot", str(run), "--output", str(tmp_path / "runs.png")],
                ["eval.py", "finetune", "--checkpoint", str(run), "--online_steps", "4", "--eval_interval", "0",
                 "--log_interval", "2", "--save_interval", "2"]]
    for command in commands:
        result = script(*command)
        lines = [line for line in console(result) if not line.startswith("no videos: offscreen rendering failed")]
        assert result.returncode == 0 and lines == [], (command, result.stderr[-3000:])
    assert (tmp_path / "runs.png").exists() and (tmp_path / "run-finetune" / "checkpoint.pt").exists()


@slow
def test_sigterm_saves_the_step_it_interrupts_and_the_resumed_run_ends_as_if_never_stopped(cube_data, tmp_path):
    """SIGTERM to every process of the run (as SLURM sends it before a preemption), during an evaluation: the
    evaluation workers go on, the step it lands in is finished and saved between two periodic checkpoints, the run
    exits with one line, and the same command with --resume ends as the run never stopped (parameters, logs)."""
    def command(run_dir):
        return [sys.executable, "fql.py", "--dataset_dir", cube_data, "--run_dir", str(run_dir), "--seeds", "0", "1",
                "--offline_steps", "600", "--log_interval", "10", "--save_interval", "150", "--eval_interval", "100",
                "--eval_episodes", "1", "--batch_size", "16", "--no-compile", *SMALL, "--resume"]

    environment = {**os.environ, **OFFLINE, **WARNINGS_ON}
    stopped = tmp_path / "stopped"
    process = subprocess.Popen(command(stopped), cwd=HERE, env=environment, start_new_session=True, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    train_csv = stopped / "seed0" / "train.csv"
    while process.poll() is None and not (train_csv.exists() and len(read_csv(train_csv)) >= 20):
        time.sleep(0.01)  # until the row of step 200, written just before its evaluation
    os.killpg(process.pid, signal.SIGTERM)  # the whole process group: the run and its evaluation workers
    _, stderr = process.communicate(timeout=300)
    lines = [line for line in stderr.splitlines() if line.strip() and not PROGRESS.search(line)]
    assert process.returncode != 0 and len(lines) == 1, stderr[-3000:]
    step = int(re.fullmatch(r"stopped by SIGTERM at step (\d+), saved in .*; the same command with --resume continues",
                            lines[0])[1])
    assert step == 200, step  # saved at the step it stopped in (its evaluation), not at a periodic checkpoint
    for seed in (0, 1):
        assert fql.read_checkpoint(str(stopped / f"seed{seed}" / "checkpoint.pt"))["step"] == step
        assert int(read_csv(stopped / f"seed{seed}" / "train.csv")[-1]["step"]) == step - step % 10

    for run_dir in (stopped, tmp_path / "straight"):  # the stopped run resumed, and a run never stopped
        finished = subprocess.run(command(run_dir), cwd=HERE, env=environment, capture_output=True, text=True)
        assert finished.returncode == 0, finished.stderr[-3000:]
    for seed in (0, 1):
        want, got = (fql.read_checkpoint(str(run / f"seed{seed}" / "checkpoint.pt")) for run in (tmp_path / "straight",
                                                                                             stopped))
        assert got["step"] == want["step"] == 600
        for name, p in want["nets"].items():
            torch.testing.assert_close(got["nets"][name], p, rtol=0, atol=0, msg=name)
        for name in ("train.csv", "eval.csv"):
            assert untimed_rows(stopped / f"seed{seed}" / name) == untimed_rows(tmp_path / "straight" / f"seed{seed}"
                                                                                / name)


def readme_python(containing: str) -> str:
    """The README's Python block that contains `containing`."""
    with open(os.path.join(HERE, "README.md")) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.DOTALL)
    (block,) = [block for block in blocks if containing in block]
    return block


@slow
def test_readmes_submitit_jobs_continue_after_a_preemption(cube_data, tmp_path, monkeypatch):
    """README's submitit example as written, on submitit's local executor (real job processes, as on SLURM), on
    tiny data and networks: a job stopped by SIGTERM after its first checkpoint (as a preemption stops it) and
    submitted again with the same command continues, and ends as a job never stopped."""
    submitit = pytest.importorskip("submitit")
    code = readme_python("submitit.AutoExecutor")
    setup, submit = code[: code.index("jobs = ")], code[code.index("jobs = "):]
    tiny = ["--tasks", "2", "--seeds", "0", "1",  # a grid of 2 agents, not README's 40
            "--dataset_dir", cube_data, "--offline_steps", "3000", "--log_interval", "100", "--save_interval", "100",
            "--eval_interval", "0", "--batch_size", "16", "--no-compile", *SMALL]
    local = submitit.AutoExecutor
    monkeypatch.setattr(submitit, "AutoExecutor", lambda folder: local(folder=tmp_path / folder, cluster="local"))
    monkeypatch.setenv("PYTHONPATH", HERE)  # the jobs import fql from this folder, as from a clone of it
    monkeypatch.chdir(tmp_path)  # where they write runs/

    def submit_readme_jobs():
        namespace = {"__name__": "readme"}
        exec(setup, namespace)
        namespace["ENVS"] = ["cube-single"]
        namespace["FLAGS"] += tiny  # README's flags, then the tiny run's
        exec(submit, namespace)
        return namespace

    (job,) = submit_readme_jobs()["jobs"]
    checkpoint = tmp_path / "runs" / "ogbench-cube-single__task2__seed0" / "checkpoint.pt"
    while not checkpoint.exists() and not job.done():
        time.sleep(0.02)
    os.kill(int(job.job_id), signal.SIGTERM)  # submitit's local controller passes it on to the job, as SLURM does
    with pytest.raises(submitit.core.utils.UncompletedJobError):
        job.result()
    step = int(re.search(r"stopped by SIGTERM at step (\d+)", job.stderr())[1])
    assert 100 <= step < 3000 and fql.read_checkpoint(str(checkpoint))["step"] == step

    namespace = submit_readme_jobs()  # a requeued job runs the same command again
    namespace["jobs"][0].result()
    straight = fql.main(["--env", "ogbench-cube-single", *namespace["FLAGS"], "--run_dir", str(tmp_path / "straight")])
    for seed, nets in enumerate(straight.agent_nets):
        saved = fql.read_checkpoint(str(tmp_path / "runs" / f"ogbench-cube-single__task2__seed{seed}" /
                                        "checkpoint.pt"))
        assert saved["step"] == 3000
        for name, p in nets.state_dict().items():
            torch.testing.assert_close(saved["nets"][name], p, rtol=0, atol=0, msg=name)

