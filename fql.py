"""Flow Q-Learning (FQL) in one PyTorch file: the whole training side, from datasets to the loop.

Paper: Park, Li, Levine. "Flow Q-Learning", ICML 2025. https://arxiv.org/abs/2502.02538
Official JAX code (whose numbers are the paper's): https://github.com/seohongpark/fql

FQL trains, from one summed loss, a BC flow policy v(s, x_t, t) (flow matching on the dataset's
actions), a one-step policy mu(s, z) (distilled from the flow and pushed up the critic) and a
two-member critic Q(s, a) (TD learning).

Examples:
  python fql.py --env ogbench-cube-single --seeds 0 1 2 3  # alpha 300, task2, 1M steps, 4 seeds
  python fql.py --env d4rl-antmaze-large-play              # D4RL from its hdf5 files, 500K steps
  python fql.py --env ogbench-visual-cube-single           # pixels: IMPALA encoders, 3 frames
  python fql.py --env ogbench-cube-double --online_steps 1000000   # then online fine-tuning
  python fql.py --env ogbench-cube-double --horizon 5 --alpha 100 --online_steps 1000000  # QC-FQL
  python fql.py --env ogbench-cube-single --resume          # continue a killed run
  python fql.py --benchmark                                # updates/s of the training step

The file reads top to bottom as the paper does: the config, the networks, the losses, the agent.
Everything up to the env table needs only torch and numpy: that part is what you copy into your
own project. Below it come the env names and per-env defaults, the datasets, checkpoints and logs,
the training loop and `main`. eval.py (environments, evaluation, fine-tuning) builds on this file.
"""
import copy
import csv
import ctypes.util
import itertools
import json
import math
import os
import pathlib
import re
import signal
import socket
import sys
import warnings
import zipfile
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Warnings that no user can act on: torch.compile imports a module of torch's own that uses the
# deprecated torch.jit.script_method; gymnasium casts OGBench's float64 space bounds to float32, and
# finds a render mode that OGBench's environments support but do not list
for message in ("torch.jit.script_method", "precision lowered by casting", "possible render_modes"):
    warnings.filterwarnings("ignore", f".*{message}")

class UsageError(ValueError):
    """Bad input, or a run that cannot go on: reported as one line, without a traceback."""


# ---- Config --------------------------------------------------------------------------------------
@dataclass
class Config:
    # The algorithm (the paper's Table 5). None: the env's value from the env table below.
    alpha: float | None = None
    """distillation coefficient; default: the env's value in the tables below (the paper's), else
    10"""
    discount: float | None = None
    """discount factor; default: 0.995 for antmaze-giant, humanoidmaze and antsoccer, else 0.99"""
    q_agg: Literal["mean", "min"] | None = None
    """how the TD target combines the 2 critic members (the Q term always takes their mean);
    default: min for OGBench's antmaze-large/giant and for Adroit"""
    normalize_q_loss: bool = False
    """scale the Q term by 1 / mean|Q| (the official README suggests it for new tasks)"""
    tau: float = 0.005
    """Polyak rate of the target critic"""
    lr: float = 3e-4
    """Adam learning rate (all three networks)"""
    batch_size: int = 256
    """transitions per gradient step"""
    flow_steps: int = 10
    """Euler steps when integrating the BC flow"""
    horizon: int = 1
    """QC-FQL: the policies emit chunks of this many actions, the target looks as far (1: FQL)"""
    action_chunking: bool = True
    """with --horizon > 1; --no_action_chunking: QC's FQL-n, one action and the n-step target"""
    sparse: bool = False
    """QC's --sparse (scene, puzzle-3x3): reward -1 until the task is solved, then 0"""
    actor_hidden_dims: tuple[int, ...] = (512,) * 4
    """hidden layer widths of the BC flow and the one-step policy"""
    value_hidden_dims: tuple[int, ...] = (512,) * 4
    """hidden layer widths of each critic member"""
    encoder: Literal["impala_small", "impala_debug"] | None = None
    """image encoder; default: impala_small for visual-* (impala_debug: tiny, for CPU tests)"""
    frame_stack: int | None = None
    """pixel observations stack this many latest frames; default: 3 for visual-* envs"""
    p_aug: float | None = None
    """probability of random shifts (pad 3, crop) on a pixel batch; default: 0.5 for visual-*"""

    # The run
    env: str = "ogbench-cube-single"
    """ogbench-<env>[-task<N>], cube-single-play-singletask-task2-v0, d4rl-<dataset>, ..."""
    seed: int | None = None
    """seed of networks, batches, noise and evaluation episodes (default 0); = --seeds N"""
    # A grid: one agent per (task, alpha, seed), trained as one batched computation, each exactly
    # as the same run alone (--env <env>-task<t> --alpha <a> --seed <s>)
    seeds: tuple[int, ...] | None = None
    """one agent per seed"""
    tasks: tuple[int, ...] | None = None
    """one agent per OGBench task (1-5), all on one copy of the dataset; default: the env's task"""
    alphas: tuple[float, ...] | None = None
    """one agent per distillation coefficient; default: --alpha"""
    offline_steps: int | None = None
    """gradient steps on the offline data; default: 500K for D4RL and pixels, else 1M"""
    online_steps: int = 0
    """environment steps of online fine-tuning after the offline steps, one update per step"""
    balanced_sampling: bool = False
    """fine-tuning batches: half from the offline dataset, half from the online transitions"""
    log_interval: int = 5_000
    """steps between train/validation metric rows in train.csv (validation batches draw from the
    agents' generators: another value on --resume changes the random stream from there on)"""
    eval_interval: int = 100_000
    """steps between evaluations in the environment (0: never)"""
    eval_episodes: int = 50
    """episodes per evaluation"""
    save_interval: int = 100_000
    """steps between checkpoints (one more is written at the end)"""
    dataset_dir: str = "~/.ogbench/data"
    """where the OGBench .npz files are (downloaded there when missing and online)"""
    run_dir: str | None = None
    """where train.csv, eval.csv, checkpoint.pt go; default runs/<env>__seed<seed>; a grid's:
    runs/<env>__task<t>__alpha<a>__seed<s> (the axes given), or <run_dir>/task<t>__...; or a
    pattern that names each axis of the grid as {task}, {alpha}, {seed}"""
    device: str = "auto"
    """torch device; auto: cuda when available, else cpu"""
    compile: bool = True
    """compile the losses and the policy with torch.compile (--no_compile runs eager)"""
    cuda_graph: bool = True
    """on CUDA, record the whole training step once as a CUDA graph and replay it"""
    resume: bool = False
    """continue the run in run_dir from its last checkpoint (give the same command again)"""
    wandb_project: str | None = None
    """also log to this Weights & Biases project (needs `pip install wandb`)"""
    benchmark: bool = False
    """print the training step's updates/s in each mode, one agent and the grid; then exit"""

    @property
    def checkpoint(self):
        return os.path.join(self.run_dir, "checkpoint.pt")


# ---- Networks ------------------------------------------------------------------------------------
class Dense(nn.Module):
    """flax's Dense: x @ weight + bias, weight (in, out), Xavier-uniform as the official code (not
    nn.Linear's init). With `members`, that many independent layers as one batched matmul. In
    flax's (in, out) layout the weight's gradient x^T g comes in the weight's own layout, so
    autograd never copies it (nn.Linear's (out, in) weight gets a transposed one under vmap)."""

    def __init__(self, in_dim, out_dim, members=None):
        super().__init__()
        bound = math.sqrt(6 / (in_dim + out_dim))
        leading = (members,) if members else ()
        self.weight = nn.Parameter(torch.empty(*leading, in_dim, out_dim).uniform_(-bound, bound))
        # (members, 1, out): broadcast over the batch
        self.bias = nn.Parameter(torch.zeros((members, 1, out_dim) if members else out_dim))

    def forward(self, x):
        # (batch, in) or (members, batch, in) -> (batch, out) or (members, batch, out)
        return x @ self.weight + self.bias


class EnsembleLayerNorm(nn.Module):
    """LayerNorm (eps 1e-6) with its own scale and shift per member, as flax's vmapped LayerNorm."""

    def __init__(self, members, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(members, 1, dim))
        self.bias = nn.Parameter(torch.zeros(members, 1, dim))

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], eps=1e-6) * self.weight + self.bias


class MLP(nn.Module):
    """The official MLP: hidden layers Dense -> GELU (tanh form, flax's nn.gelu), then a Dense
    output. The observation, the first input, goes through `encoder` first, unless it comes
    `encoded` already. With `members`, the critic: that many independent MLPs as one batched
    matmul a layer, each hidden layer followed by a LayerNorm, each member's output a scalar
    Q(s, a), (members, batch); the members read the same encoded observation, as officially.
    (The official MLP has LayerNorm only in the critic, `actor_layer_norm=False`: here `members`
    marks the critic.)"""

    def __init__(self, in_dim, hidden_dims, out_dim, encoder, members=None):
        super().__init__()
        self.encoder = encoder
        self.members = members
        layers = []
        for width in hidden_dims:
            layers += [Dense(in_dim, width, members), nn.GELU(approximate="tanh")]
            if members:
                layers.append(EnsembleLayerNorm(members, width))
            in_dim = width
        self.net = nn.Sequential(*layers, Dense(in_dim, out_dim, members))

    def forward(self, obs, *inputs, encoded=False):
        features = obs if encoded else self.encoder(obs)
        out = self.net(torch.cat([features, *inputs], dim=-1))
        return out.squeeze(-1) if self.members else out


class ResnetStack(nn.Module):
    """IMPALA stack: 3x3 conv, 3x3 max-pool with stride 2, then a residual block of
    (ReLU, conv) x 2."""

    def __init__(self, in_channels, channels):
        super().__init__()
        conv = partial(nn.Conv2d, kernel_size=3, padding=1)  # 3x3, the same size out
        self.conv = conv(in_channels, channels)
        # the official small encoder has one block a stack; a list, as the checkpoints' keys name it
        self.blocks = nn.ModuleList([nn.Sequential(
            nn.ReLU(),
            conv(channels, channels),
            nn.ReLU(),
            conv(channels, channels),
        )])

    def forward(self, x):
        x = self.conv(x)
        # flax's 'SAME' max-pool: padding after (bottom/right), and before too for an odd size
        padding = (x.shape[-1] % 2, 1, x.shape[-2] % 2, 1)
        x = F.max_pool2d(F.pad(x, padding, value=-math.inf), 3, stride=2)
        return x + self.blocks[0](x)


class ImpalaEncoder(nn.Module):
    """The official IMPALA encoder: uint8 images (..., H, W, C) scaled to [0, 1], ResNet stacks,
    ReLU, Dense -> GELU."""

    def __init__(self, image_shape, kind):
        super().__init__()
        height, width, channels = image_shape
        widths = {"impala_small": (16, 32, 32), "impala_debug": (4, 4)}[kind]  # of the stacks
        self.stacks = nn.Sequential(
            *[ResnetStack(a, b) for a, b in zip((channels,) + widths, widths)])
        flat = self.stacks(torch.zeros(1, channels, height, width)).numel()
        self.head = Dense(flat, 512)  # features
        for conv in self.modules():  # Xavier-uniform, zero bias: as the official code sets them
            if isinstance(conv, nn.Conv2d):
                nn.init.xavier_uniform_(conv.weight)
                nn.init.zeros_(conv.bias)

    def forward(self, images):  # (..., H, W, C) -> (..., features)
        x = images.reshape(-1, *images.shape[-3:]).float().div(255).movedim(-1, 1)
        x = F.relu(self.stacks(x)).flatten(1)
        x = F.gelu(self.head(x), approximate="tanh")
        return x.reshape(*images.shape[:-3], -1)


class FQLNetworks(nn.Module):
    """The critic and its target, the BC flow and the one-step policy; for pixels, each network has
    its own encoder (the critic's two members share theirs; the target critic holds a copy)."""

    def __init__(self, observation_shape, action_dim, cfg):
        super().__init__()
        self.observation_shape = tuple(observation_shape)
        self.action_dim = action_dim  # the environment's
        # what the networks take and emit: a chunk of actions, time-major (one action: FQL, FQL-n)
        chunk = self.chunk_dim = action_dim * (cfg.horizon if cfg.action_chunking else 1)
        # ImpalaEncoder's feature width (its head), or the state vector's
        dim = 512 if cfg.encoder else observation_shape[0]
        encoders = [ImpalaEncoder(observation_shape, cfg.encoder) if cfg.encoder else nn.Identity()
                    for _ in range(3)]
        # Q(s, a): two members
        self.critic = MLP(dim + chunk, cfg.value_hidden_dims, 1, encoders[0], members=2)
        self.target_critic = copy.deepcopy(self.critic).requires_grad_(False)
        # v(s, x_t, t): t enters as a raw scalar column, as in the official code
        self.actor_bc_flow = MLP(dim + chunk + 1, cfg.actor_hidden_dims, chunk, encoders[1])
        # mu(s, z): one network call maps noise to an action
        self.actor_onestep = MLP(dim + chunk, cfg.actor_hidden_dims, chunk, encoders[2])

    def forward(self, batch, noise, alpha, cfg, with_metrics):
        """Not an action nor a value: this module's forward is fql_losses of its networks, because
        torch.func.functional_call, which FQLAgent maps over its agents with torch.vmap, calls a
        module's forward with the parameters it is given (an agent's)."""
        return fql_losses(self, batch, noise, alpha, cfg, with_metrics)


# ---- Losses (paper Section 4 and Algorithm 1) ----------------------------------------------------
def flow_actions(actor_bc_flow, obs, noise, steps):
    """Euler-integrate the BC flow from x_0 = noise over t = 0, 1/steps, ...; clip to [-1, 1]."""
    features = actor_bc_flow.encoder(obs)  # the observation is encoded once, as officially
    x = noise
    for i in range(steps):
        t = torch.full_like(x[..., :1], i / steps)
        x = x + actor_bc_flow(features, x, t, encoded=True) / steps
    return x.clamp(-1, 1)


def draw_noise(batch_size, chunk_dim, device, generators=(None,)):
    """The losses' noise for one update (the batch's rows are drawn by the sampler), a draw per
    generator (an agent's) along a leading agent dimension, in one place so that tests can fix it.
    `chunk_dim`: what the networks emit (FQLNetworks.chunk_dim; action_dim when not chunking)."""
    # an agent's three Gaussians in one call: fewer kernels than three calls
    three_each, times = zip(*[
        (torch.randn((3, batch_size, chunk_dim), device=device, generator=g),
         torch.rand((batch_size, 1), device=device, generator=g))
        for g in generators
    ])
    x0, z, z_next = torch.stack(three_each, dim=1)  # each (agents, batch, chunk)
    return dict(
        x0=x0,  # BC flow: the source sample
        t=torch.stack(times),  # BC flow: the time, per sample
        z=z,  # the one-step policy's noise for distillation and the Q term
        z_next=z_next,  # the one-step policy's noise for the next actions a'
    )


def fql_losses(nets, batch, noise, alpha, cfg, with_metrics=False):
    """One agent's L_Q(phi) + L_Flow(theta) + L_pi(omega), to minimise, and the official metrics
    ({} unless with_metrics); all randomness comes in `noise`; `alpha`: the agent's own."""
    obs = batch["observations"]
    actions = batch["actions"]

    # Critic, L_Q(phi): TD target r + discount * mask * Q_target(s', a'), a' = clip(mu(s', z')).
    # With QC's windows of H steps: r = sum_i discount^i r_{t+i}, s' = s_{t+H}, and discount^H
    with torch.no_grad():
        next_actions = nets.actor_onestep(batch["next_observations"], noise["z_next"]).clamp(-1, 1)
        next_qs = nets.target_critic(batch["next_observations"], next_actions)
        next_q = next_qs.amin(0) if cfg.q_agg == "min" else next_qs.mean(0)
        target_q = batch["rewards"] + cfg.discount**cfg.horizon * batch["masks"] * next_q
    q = nets.critic(obs, actions)
    critic_errors = (q - target_q).pow(2)
    if "valid" in batch:  # QC's windows: one that runs past an episode's end adds 0 to the mean
        critic_errors = critic_errors * batch["valid"][..., -1]
    critic_loss = critic_errors.mean()

    # BC flow matching, L_Flow(theta): regress the velocity x_1 - x_0 at x_t = (1 - t) x_0 + t x_1
    x0 = noise["x0"]
    x1 = actions
    t = noise["t"]
    x_t = (1 - t) * x0 + t * x1
    bc_errors = (nets.actor_bc_flow(obs, x_t, t) - (x1 - x0)).pow(2)
    if "valid" in batch and cfg.action_chunking:  # each step of a chunk by its own validity
        bc_errors = bc_errors.unflatten(-1, (cfg.horizon, -1)) * batch["valid"][..., None]
    bc_flow_loss = bc_errors.mean()

    # One-step distillation, L_Distill(omega): the BC flow's action for the same noise, no gradient
    with torch.no_grad():
        target_flow_actions = flow_actions(nets.actor_bc_flow, obs, noise["z"], cfg.flow_steps)
    onestep_actions = nets.actor_onestep(obs, noise["z"])
    distill_loss = (onestep_actions - target_flow_actions).pow(2).mean()

    # Q term of the one-step policy loss L_pi(omega) = alpha L_Distill - Q: maximise Q at the
    # clipped one-step action. The critic's weights (its encoder's too) are detached, not run under
    # no_grad: the gradient must reach the actions, and so mu, but never the critic, as officially
    policy_actions = onestep_actions.clamp(-1, 1)
    frozen_critic = {name: p.detach() for name, p in nets.critic.named_parameters()}
    policy_qs = torch.func.functional_call(nets.critic, frozen_critic, (obs, policy_actions))
    policy_q = policy_qs.mean(0)
    q_loss = -policy_q.mean()
    if cfg.normalize_q_loss:
        q_loss = q_loss / policy_q.abs().mean().detach()

    # the official keys: actor_loss = L_Flow(theta) + L_pi(omega), q_loss = its -Q term
    actor_loss = bc_flow_loss + alpha * distill_loss + q_loss
    metrics = {}
    if with_metrics:
        metrics = {
            "critic/critic_loss": critic_loss,
            "critic/q_mean": q.mean(), "critic/q_max": q.max(), "critic/q_min": q.min(),
            "actor/actor_loss": actor_loss,
            "actor/bc_flow_loss": bc_flow_loss, "actor/distill_loss": distill_loss,
            "actor/q_loss": q_loss, "actor/q": policy_q.mean(),
            # the official code draws other noise for this diagnostic; the same z does as well
            "actor/mse": (policy_actions - actions).pow(2).mean(),
        }
    return critic_loss + actor_loss, {k: v.detach() for k, v in metrics.items()}


# ---- Agent: one Adam step on the summed loss, and the Polyak target update -----------------------
# FQLAgent trains one or more agents as one batched computation: a grid of every combination of
# tasks, alphas and seeds (agent_grid). Each parameter is stored once for all agents, stacked along
# a leading agent dimension, and torch.vmap maps fql_losses (written for one agent) over it, with
# each agent's alpha; one Adam and, on CUDA, one CUDA graph update every agent. Adam, the Polyak
# update and every loss act per element or per agent, so each agent follows its own training
# exactly. Batches, noise, observations, actions and metrics all carry that leading dimension.
class FQLAgent:
    """`agent_nets`: each agent's FQLNetworks; `generators`: each one's, for batches and noise;
    `alphas`: each one's alpha; `tasks`: each one's column of the data's rewards and masks."""

    def __init__(self, agent_nets, cfg, generators, alphas, tasks):
        self.cfg = cfg
        self.agent_nets = agent_nets
        # the first agent's networks, as the template that torch.func.functional_call runs with
        # each agent's parameters (the shapes, chunk_dim and so on are every agent's)
        self.nets = agent_nets[0]
        self.generators = generators
        self.alphas = torch.tensor(alphas, dtype=torch.float32, device=cfg.device)
        self.tasks = torch.tensor(tasks, device=cfg.device)
        self.params = stack_parameters(agent_nets)
        # (the target's parameters, the critic's), for the lerp (one a deep copy of the other)
        critic = [k for k in self.params if k.startswith("critic.")]
        self.lerp = [self.params[f"target_{k}"] for k in critic], [self.params[k] for k in critic]
        trained = [p for p in self.params.values() if p.requires_grad]
        # On CUDA, fused: one kernel for every parameter; capturable: the step counters stay on
        # the GPU, so a CUDA graph can hold Adam. Not fused on a CPU, where the fused kernel rounds
        # an element in its vectorised body otherwise than in its tail: an agent's step would then
        # depend on its place in the grid, not as alone, bit for bit
        cuda = cfg.device.startswith("cuda")
        self.optimizer = torch.optim.Adam(trained, lr=cfg.lr, fused=cuda, capturable=cuda)
        # torch.compile fuses the losses' forward and backward (shapes and config are fixed).
        # fullgraph=True: a graph break (Python in mid-step, often a host synchronisation such as
        # .item(), which would also break the CUDA graph's capture) is an error, not a silent
        # split of the step. It also makes torch.compile's limit of 8 compilations of a function
        # per process an error (each config of agents takes 2, with and without metrics)
        self.losses = self.losses_eager
        self.policy = self.policy_eager
        if cfg.compile:
            self.losses = torch.compile(self.losses_eager, dynamic=False, fullgraph=True)
            # reduce-overhead: on CUDA the policy is replayed as a CUDA graph (no effect on a CPU)
            self.policy = torch.compile(self.policy_eager, dynamic=False, fullgraph=True,
                                        mode="reduce-overhead")

    def losses_eager(self, batch, noise, with_metrics=False):
        """The sum of the agents' losses, and each one's metrics: fql_losses mapped over agents."""
        def agent_losses(params, agent_batch, agent_noise, alpha):
            return torch.func.functional_call(
                self.nets, params, (agent_batch, agent_noise, alpha, self.cfg, with_metrics))

        losses, metrics = torch.vmap(agent_losses)(self.params, batch, noise, self.alphas)
        return losses.sum(), metrics

    def update(self, batch, noise, with_metrics=False):
        """Algorithm 1's step: one gradient step on all losses and the target update. The target
        moves towards the critic from before this step (a one-step lag, as the official code,
        where Algorithm 1 lists the target update last)."""
        loss, metrics = self.losses(batch, noise, with_metrics)
        self.optimizer.zero_grad()
        loss.backward()
        # lerp before optimizer.step(): the critic from before this step (see above)
        with torch.no_grad():
            torch._foreach_lerp_(*self.lerp, self.cfg.tau)
        self.optimizer.step()
        return metrics

    def draw(self, sample):
        """(batch, noise) of one update, each agent's from its own generator (and task)."""
        return (sample(self.cfg.batch_size, self.generators, self.tasks),
                draw_noise(self.cfg.batch_size, self.nets.chunk_dim, self.cfg.device,
                           self.generators))

    def train_step(self, sample, with_metrics=False):
        return self.update(*self.draw(sample), with_metrics)

    def policy_eager(self, obs, z):
        """mu(s, z) clipped to [-1, 1] (with --horizon, a chunk of actions); each agent's
        observations through its own policy."""
        actions = [nets.actor_onestep(o, n) for nets, o, n in zip(self.agent_nets, obs, z)]
        return torch.stack(actions).clamp(-1, 1)

    @torch.no_grad()
    def act(self, observations, generators):
        """The stochastic policy on (agents, ..., *observation) arrays: fresh z ~ N(0, I) for each
        row of the leading dimensions from its own generator in `generators` (CPU generators, in
        the rows' order), not from the training streams. eval.py seeds one for each episode, so an
        episode's actions depend on its own seed only, on any device. z is drawn outside the
        compiled policy, so that the compiled and the eager policy act alike."""
        obs = torch.as_tensor(observations, dtype=torch.float32, device=self.cfg.device)
        leading_shape = obs.shape[: -len(self.nets.observation_shape)]  # (agents, ...)
        z = torch.stack([torch.randn(self.nets.chunk_dim, generator=g) for g in generators])
        return self.policy(obs, z.view(*leading_shape, -1).to(obs.device)).cpu().numpy()

    def state_dict(self, index=0):
        """Agent `index`'s networks and Adam state, as a one-agent FQLAgent's (copies: a view would
        save the whole grid's storage)."""
        # a new dict of copies: the dicts in optimizer.state_dict()["state"] are Adam's live ones
        optimizer = self.optimizer.state_dict()
        optimizer["state"] = {
            i: {k: (v if k == "step" else v[index]).clone() for k, v in state.items()}
            for i, state in optimizer["state"].items()
        }
        return dict(nets={k: v[index].clone() for k, v in self.params.items()}, optimizer=optimizer)

    def load_state_dicts(self, states):
        """Restore every agent from its one-agent state dict; Adam's own flags (fused, capturable)
        stay those of this device's."""
        for nets, state in zip(self.agent_nets, states):
            nets.load_state_dict(state["nets"])
        optimizer = self.optimizer.state_dict()
        for i, saved in states[0]["optimizer"]["state"].items():  # empty before the first update
            agents = [state["optimizer"]["state"][i] for state in states]
            moments = {k: torch.stack([a[k] for a in agents]) for k in ("exp_avg", "exp_avg_sq")}
            optimizer["state"][i] = dict(saved, **moments)
        self.optimizer.load_state_dict(optimizer)


def stack_parameters(agent_nets):
    """{name: the agents' parameters stacked}; each agent's module then holds views of its slice,
    so it always shows the current values. (Moving or casting an agent's module afterwards, .to()
    or .double(), would part it from the stacked tensors the optimiser trains: build the networks
    where and as they will train, as make_agent does.)"""
    params, _ = torch.func.stack_module_state(agent_nets)
    for name, stacked in params.items():
        module_name, _, param_name = name.rpartition(".")
        for i, nets in enumerate(agent_nets):
            view = nn.Parameter(stacked.detach()[i], requires_grad=stacked.requires_grad)
            setattr(nets.get_submodule(module_name), param_name, view)
    return params


def agent_grid(cfg):
    """(column, alpha, seed) of each agent: every combination of cfg's lists, in this order; the
    column of the rewards and masks is its task's index in cfg.tasks (0 for an env of one task):
    train loads the tasks in that order."""
    return list(itertools.product(range(len(cfg.tasks or [0])), cfg.alphas or [cfg.alpha],
                                  cfg.seeds))


def make_agent(cfg, observation_shape, action_dim):
    """The agents of cfg (agent_grid): each one's networks, then its generator, from
    torch.manual_seed(seed), so that an agent of a grid starts as its run alone does."""
    tasks, alphas, seeds = zip(*agent_grid(cfg))
    agent_nets = []
    generators = []
    for seed in seeds:
        torch.manual_seed(seed)
        agent_nets.append(FQLNetworks(observation_shape, action_dim, cfg).to(cfg.device))
        generators.append(torch.Generator(cfg.device).manual_seed(int(torch.randint(2**62, ()))))
    return FQLAgent(agent_nets, cfg, generators, alphas, tasks)


class CUDAGraphStep:
    """Record `fn` once as a CUDA graph, then replay it: one launch per step instead of hundreds of
    kernels. The first call runs `fn` for real (compiling it, creating Adam's state);
    `generators` advance at each replay."""

    def __init__(self, fn, generators):
        self.fn = fn
        self.generators = generators
        self.graph = None

    def __call__(self):
        if self.graph:
            self.graph.replay()
            return self.outputs
        # as PyTorch's docs ask: the eager run before the capture goes on a side stream (after all
        # queued work, and all of it done before the capture)
        torch.cuda.synchronize()
        with torch.cuda.stream(torch.cuda.Stream()):
            outputs = self.fn()
        torch.cuda.synchronize()
        # capturing records the kernels without running them: this first call makes one update,
        # the eager one above
        self.graph = torch.cuda.CUDAGraph()
        for generator in self.generators:
            self.graph.register_generator_state(generator)
        with torch.cuda.graph(self.graph):
            self.outputs = self.fn()
        return outputs


def make_train_step(agent, sample):
    """`step(with_metrics) -> metrics`; on CUDA each variant is a CUDA graph (not with
    --no_cuda_graph)."""
    variants = {m: partial(agent.train_step, sample, m) for m in (False, True)}
    if agent.cfg.cuda_graph and agent.cfg.device.startswith("cuda"):
        variants = {m: CUDAGraphStep(variants[m], agent.generators) for m in variants}
    return lambda with_metrics: variants[with_metrics]()


# ---- Env names and per-env defaults (the paper's hyperparameter tables; the official README) -----
DEFAULTS = dict(alpha=10.0, discount=0.99, q_agg="mean", offline_steps=1_000_000)  # the official
PIXELS = dict(encoder="impala_small", frame_stack=3, p_aug=0.5, offline_steps=500_000)

# OGBench, as the paper's Table 5 and the official README: `--env ogbench-<alias>` trains on the
# dataset's default task (ogbench-<alias>-task<N> on another), with alpha and the flags that differ
# from DEFAULTS (pixels: those of PIXELS). FQL: the paper's success in %, the mean over the
# dataset's five tasks (8 seeds; pixels: task1 alone, 4 seeds)
OGBENCH = """
alias                dataset                       task  alpha  FQL  other flags
antmaze-large        antmaze-large-navigate        1     10     79   q_agg="min"
antmaze-giant        antmaze-giant-navigate        1     10     9    q_agg="min" discount=0.995
humanoidmaze-medium  humanoidmaze-medium-navigate  1     30     58   discount=0.995
humanoidmaze-large   humanoidmaze-large-navigate   1     30     4    discount=0.995
antsoccer-arena      antsoccer-arena-navigate      4     10     60   discount=0.995
cube-single          cube-single-play              2     300    96
cube-double          cube-double-play              2     300    29
scene                scene-play                    2     300    56
puzzle-3x3           puzzle-3x3-play               4     1000   30
puzzle-4x4           puzzle-4x4-play               4     1000   17
visual-cube-single   visual-cube-single-play       1     300    81   pixels
visual-cube-double   visual-cube-double-play       1     100    21   pixels
visual-scene         visual-scene-play             1     100    98   pixels
visual-puzzle-3x3    visual-puzzle-3x3-play        1     300    94   pixels
visual-puzzle-4x4    visual-puzzle-4x4-play        1     300    33   pixels
"""
# D4RL, as the official README (500K steps): d4rl's file (AntMaze: ant_maze_v2/Ant_maze_<maze>_
# sparse_fixed.hdf5; Adroit: hand_dapg_v1/<name>.hdf5), alpha, other flags; FQL: the paper's
# normalised score (8 seeds)
D4RL_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl/"
D4RL_DATASETS = """
name                      maze                                               alpha FQL flags
antmaze-umaze-v2          u-maze_noisy_multistart_False_multigoal_False      10    96
antmaze-umaze-diverse-v2  u-maze_noisy_multistart_True_multigoal_True        10    89
antmaze-medium-play-v2    big-maze_noisy_multistart_True_multigoal_False     10    78
antmaze-medium-diverse-v2 big-maze_noisy_multistart_True_multigoal_True      10    71
antmaze-large-play-v2     hardest-maze_noisy_multistart_True_multigoal_False 3     84
antmaze-large-diverse-v2  hardest-maze_noisy_multistart_True_multigoal_True  3     83
pen-human-v1              -                                                  10000 53  q_agg="min"
pen-cloned-v1             -                                                  10000 74  q_agg="min"
pen-expert-v1             -                                                  3000  142 q_agg="min"
door-human-v1             -                                                  30000 0   q_agg="min"
door-cloned-v1            -                                                  30000 2   q_agg="min"
door-expert-v1            -                                                  30000 104 q_agg="min"
hammer-human-v1           -                                                  30000 1   q_agg="min"
hammer-cloned-v1          -                                                  10000 11  q_agg="min"
hammer-expert-v1          -                                                  30000 125 q_agg="min"
relocate-human-v1         -                                                  10000 0   q_agg="min"
relocate-cloned-v1        -                                                  30000 0   q_agg="min"
relocate-expert-v1        -                                                  30000 107 q_agg="min"
"""


def table_rows(table):
    """The rows of a table drawn as text, each a list of its cells (apart by spaces), the header
    left out."""
    return [row.split() for row in table.strip().splitlines()[1:]]


def table_defaults(alpha, cells):
    """A table row's alpha and its other flags as a dict: q_agg="min", discount=0.995 (values in
    JSON), pixels (PIXELS)."""
    flags = dict(PIXELS if "pixels" in cells else {}, alpha=int(alpha))
    for name, _, value in (cell.partition("=") for cell in cells if "=" in cell):
        flags[name] = json.loads(value)
    return flags


ENVS = {}  # alias: (OGBench dataset, default task)
ENV_DEFAULTS = {}  # OGBench dataset or D4RL name: its alpha and other flags
PAPER = {"cube-single-play-singletask-task2-v0": 97}  # the FQL column (and cube-single's task2)
for alias, dataset, task, alpha, paper, *other in table_rows(OGBENCH):
    ENVS[alias] = (dataset, int(task))
    ENV_DEFAULTS[dataset] = table_defaults(alpha, other)
    PAPER[dataset] = int(paper)
D4RL = {}  # name: d4rl's file
for name, maze, alpha, paper, *other in table_rows(D4RL_DATASETS):
    D4RL[name] = f"ant_maze_v2/Ant_maze_{maze}_sparse_fixed.hdf5" if name.startswith("antmaze") \
        else f"hand_dapg_v1/{name}.hdf5"
    ENV_DEFAULTS[name] = dict(table_defaults(alpha, other), offline_steps=500_000)
    PAPER[name] = int(paper)


def resolve_env(name):
    """Map a user's env name to (the full OGBench single-task or D4RL name, per-env defaults); a
    Minari dataset keeps its name, minari:<dataset id>, and the official defaults."""
    if name.startswith("minari:"):
        return name, {}
    for d4rl_name in D4RL:
        if name in (d4rl_name, f"d4rl-{d4rl_name[:-3]}"):  # without -v2 / -v1
            return d4rl_name, ENV_DEFAULTS[d4rl_name]
    alias = re.fullmatch(r"ogbench-(.+?)(?:-task(\d+))?", name)
    if alias and alias[1] in ENVS:
        dataset, default_task = ENVS[alias[1]]
        name = f"{dataset}-singletask-task{alias[2] or default_task}-v0"
    full = re.fullmatch(r"(.+)-singletask(-task[1-5])?-v0", name)
    if full:  # the table's defaults; another OGBench dataset, the official ones
        return name, ENV_DEFAULTS.get(full[1], {})
    aliases = ", ".join(f"ogbench-{alias}" for alias in ENVS)
    d4rl_names = ", ".join(f"d4rl-{d4rl_name[:-3]}" for d4rl_name in D4RL)
    raise UsageError(f"unknown env {name!r}. Valid: {aliases} (add -task1 to -task5 for OGBench's "
                     "tasks 1 to 5), a full OGBench single-task name such as "
                     f"cube-single-play-singletask-task2-v0, {d4rl_names}, or minari:<dataset id>")


def resolve_config(cfg):
    """Fill in what the user did not set (the env's defaults, the device, the seeds, the run_dir
    pattern; a grid's env without its task), then check every value (check_values). Calling it
    again on its result changes nothing (main and train both call it)."""
    env_name, env_defaults = resolve_env(cfg.env)
    # the official agent's defaults, then the env's, where the user gave no value
    filled = {k: v for k, v in {**DEFAULTS, **env_defaults}.items() if getattr(cfg, k) is None}
    gpus = torch.cuda.device_count()
    device = cfg.device.replace("auto", "cuda" if gpus else "cpu")
    if device not in ["cpu"] + ["cuda"] * (gpus > 0) + [f"cuda:{i}" for i in range(gpus)]:
        raise UsageError(f"--device {device}: give auto, cpu, or cuda[:N] for one of this "
                         f"machine's {gpus} CUDA GPUs")
    seeds = tuple(cfg.seeds or (cfg.seed or 0,))
    for name, values in (("seed", seeds), ("alpha", cfg.alphas), ("task", cfg.tasks)):
        # --seed 1 = --seeds 1 (there is no --task: a task sits in --env, checked below)
        if values and getattr(cfg, name, None) not in (None, values[0]):
            raise UsageError(f"give --{name} or --{name}s, not both")
        if values and len(set(values)) < len(values):
            raise UsageError(f"--{name}s has a value twice: {' '.join(map(str, values))}")
    if cfg.alphas:
        filled["alpha"] = cfg.alphas[0]
    if cfg.tasks:  # the grid's env: one of OGBench's single-task envs, its task left out
        if "-singletask" not in env_name or re.search(r"-task\d", cfg.env):
            raise UsageError(
                "--tasks is for OGBench envs named without a task (ogbench-cube-single, not "
                f"ogbench-cube-single-task2); {cfg.env} is not one")
        env_name = re.sub(r"-task\d+-v0$", "-v0", env_name)
    # each agent's folder (agent_runs fills it in) names the axes given as lists, and its seed
    axes = "task{task}__" * bool(cfg.tasks) + "alpha{alpha}__" * bool(cfg.alphas) + "seed{seed}"
    run_dir = cfg.run_dir or f"runs/{re.sub('[:/]', '-', cfg.env)}__{axes}"
    cfg = replace(cfg, env=env_name, device=device, seed=seeds[0], seeds=seeds, **filled)
    if len(agent_grid(cfg)) > 1 and "{" not in run_dir:
        run_dir += f"/{axes}"
    cfg = replace(cfg, run_dir=os.path.normpath(run_dir))
    check_values(cfg)
    return cfg


def check_values(cfg):
    """Each value of a resolved config in its range, and the flags that go together; nan fails
    every comparison, so these checks refuse it too."""
    for rule, valid, names in (
        ("must be positive", lambda v: 0 < v < math.inf,
         "batch_size flow_steps horizon lr log_interval save_interval eval_episodes frame_stack"),
        ("must be >= 0", lambda v: 0 <= v < math.inf,
         "alphas alpha offline_steps online_steps eval_interval"),
        ("must be in [0, 1]", lambda v: 0 <= v <= 1, "discount p_aug"),
        ("must be in (0, 1]", lambda v: 0 < v <= 1, "tau"),
        ("must be among OGBench's tasks, 1 to 5", lambda v: 1 <= v <= 5, "tasks"),
        ("must be in [0, 2**32), numpy's seeds", lambda v: 0 <= v < 2**32, "seeds"),
    ):
        for name in names.split():
            value = getattr(cfg, name)
            for v in value if isinstance(value, tuple) else [value]:
                if v is not None and not valid(v):
                    raise UsageError(f"--{name} {rule}, got {v}")
    if not cfg.offline_steps + cfg.online_steps:
        raise UsageError("nothing to train: --offline_steps and --online_steps are both 0")
    pixels = cfg.env.startswith("visual-")
    if not pixels and {cfg.encoder, cfg.frame_stack, cfg.p_aug} != {None}:
        raise UsageError("--encoder, --frame_stack and --p_aug are for pixel (visual-*) envs; "
                         f"{cfg.env} has states")
    if pixels and (cfg.online_steps or cfg.horizon > 1):
        raise UsageError("fine-tuning and --horizon > 1 are not supported on pixels: their "
                         "batches would hold stacked frames per step")


# ---- Datasets: OGBench, D4RL, Minari; moved to the device once, sampled there ------------------
def headless_mujoco():
    """Call before anything loads MuJoCo (load_ogbench; eval.py at its import). It does two things:
    MUJOCO_GL=egl where libEGL exists, so that MuJoCo renders without a display (else it tries
    GLFW and warns); and Triton imported first, which keeps a process that renders from crashing
    (below)."""
    if ctypes.util.find_library("EGL"):
        os.environ.setdefault("MUJOCO_GL", "egl")
    # Mesa's EGL (its llvmpipe renderer, on CPUs and in containers without NVIDIA's graphics
    # libraries) loads Mesa's LLVM into the process's global symbols. A Triton loaded after that
    # (torch.compile and Adam import it) binds its own LLVM's start-up code to Mesa's and dies by
    # SIGSEGV; loaded before MuJoCo, it keeps its own
    try:
        import triton  # noqa: F401
    except ImportError:  # torch's CPU build comes without Triton
        pass


def load_datasets(env_names, dataset_dir):
    """(train, validation) transitions of the envs `env_names` (the tasks of one OGBench dataset,
    or one D4RL or Minari dataset, which have no validation split): a column of rewards and of
    masks for each; missing files are downloaded."""
    timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(60)  # a blocked network should fail, not hang forever
    try:
        if env_names[0].startswith("minari:"):
            return load_minari(env_names[0]), None
        if env_names[0] in D4RL:
            return load_d4rl(env_names[0]), None
        return load_ogbench(env_names, dataset_dir)
    finally:
        socket.setdefaulttimeout(timeout)


def load_ogbench(env_names, dataset_dir):
    """OGBench's train and validation splits, loaded once, with every task's rewards and masks."""
    headless_mujoco()
    import ogbench
    from ogbench.relabel_utils import relabel_dataset

    env_name = env_names[0]
    dataset_name = re.sub(r"-singletask(-task\d+)?", "", env_name)  # cube-single-play-v0
    dataset_dir = os.path.expanduser(dataset_dir)
    files = [os.path.join(dataset_dir, f"{dataset_name}{split}.npz") for split in ("", "-val")]
    missing = not all(map(os.path.exists, files))
    try:  # pixel datasets stay compact: each frame once, s' = the next row
        env, train, val = ogbench.make_env_and_datasets(
            env_name, dataset_dir=dataset_dir, compact_dataset=env_name.startswith("visual-"),
            add_info=True)
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
        if missing:
            raise UsageError(
                f"dataset files {files[0]} and {files[1]} are missing and could not be downloaded "
                f"({err}). Copy them there, or pass --dataset_dir DIR.") from None
        broken = [file for file in files if not zipfile.is_zipfile(file)] or files
        raise UsageError(f"{' or '.join(broken)} is not a readable OGBench dataset "
                         f"({type(err).__name__}; an interrupted download?): delete it to download "
                         "it again, or copy a whole one there") from None
    # Each task's rewards and masks, a column per task, from the states the dataset holds (qpos,
    # button_states): OGBench's own relabelling, as make_env_and_datasets did for the first task
    envs = [env] + [ogbench.make_env_and_datasets(name, env_only=True) for name in env_names[1:]]
    for dataset in (train, val):
        columns = []
        for name, env in zip(env_names, envs):
            relabel_dataset(name, env, dataset)
            columns.append((dataset["rewards"], dataset["masks"]))
        dataset["rewards"], dataset["masks"] = (np.stack(c, axis=-1) for c in zip(*columns))
    return train, val


def load_d4rl(name):
    """A D4RL dataset from d4rl's hdf5 file, turned into transitions as d4rl.qlearning_dataset does,
    then post-processed as the official FQL code does."""
    import h5py

    directory = os.path.expanduser(os.environ.get("D4RL_DATASET_DIR", "~/.d4rl/datasets"))
    url = D4RL_URL + D4RL[name]
    path = os.path.join(directory, os.path.basename(url))
    try:
        if not os.path.exists(path):  # through a temporary file, with progress
            os.makedirs(directory, exist_ok=True)
            torch.hub.download_url_to_file(url, path)
        with h5py.File(path, "r") as f:  # D4RL's v2 antmaze and v1 adroit files have timeouts
            keys = "observations actions rewards terminals timeouts".split()
            columns = {k: f[k][:].astype(np.float32) for k in keys}
    except (OSError, KeyError) as err:
        raise UsageError(f"{path} is not a readable D4RL file (or could not be downloaded: {err}): "
                         f"delete it to download it again, or download {url} into {directory} (or "
                         "set D4RL_DATASET_DIR)") from None

    # d4rl.qlearning_dataset: s' of row i is row i + 1's s; the last step of a timed-out episode
    # is dropped
    keep = columns["timeouts"][:-1] == 0
    columns["next_observations"] = columns["observations"][1:]
    dataset = {k: v[: len(keep)][keep] for k, v in columns.items() if k != "timeouts"}
    dataset["masks"] = 1.0 - dataset["terminals"]
    # The official FQL code: an episode ends where the next transition does not start from this
    # one's next observation (or, for adroit, at a terminal); antmaze rewards shift from {0, 1}
    # to {-1, 0}
    jumps = dataset["observations"][1:] - dataset["next_observations"][:-1]
    ends = np.linalg.norm(jumps, axis=-1) > 1e-6
    if name.startswith("antmaze"):
        dataset["rewards"] -= 1.0
    else:
        ends |= dataset["terminals"][:-1] > 0
    # from here on `terminals` are the episodes' ends (QC's windows stop there), not the MDP's
    # terminations, which the masks keep
    dataset["terminals"] = np.append(ends, True).astype(np.float32)
    return dataset


def open_minari_dataset(env_name):
    """The Minari dataset of minari:<id>, from Minari's folder (MINARI_DATASETS_PATH, else
    ~/.minari/datasets), downloaded there when missing, if FQL can train on it (vector
    observations, bounded continuous actions); else a one-line UsageError."""
    import minari

    # huggingface_hub's download retries warn on the console; the one line below says it all
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    try:
        dataset = minari.load_dataset(env_name.removeprefix("minari:"), download=True)
        dataset[0]  # a broken or empty file fails here, not only at its first episode's read
    except Exception as err:  # Minari has no errors of its own: FileNotFoundError, httpx's, ...
        raise UsageError(f"could not load the Minari dataset of {env_name} ({type(err).__name__}: "
                         f"{str(err).splitlines()[0]}): check the id (as D4RL/pen/human-v2)"
                         " and the network; a broken copy in MINARI_DATASETS_PATH "
                         "(~/.minari/datasets): delete it") from None
    action_space = dataset.action_space
    # refused: actions without finite bounds (Discrete has none), observations of 2 or more
    # dimensions (images); a Dict of vectors (its shape is None) passes: load_minari flattens it
    bounds = [getattr(action_space, "low", np.inf), getattr(action_space, "high", np.inf)]
    if not np.isfinite(bounds).all() or len(dataset.observation_space.shape or ()) > 1:
        raise UsageError(f"{env_name}: FQL trains on vector observations and bounded continuous "
                         f"actions, not {dataset.observation_space} and {action_space}")
    return dataset


def load_minari(env_name):
    """A Minari dataset's episodes as transitions: s' the episode's next observation, mask =
    1 - termination, an episode's end at its last step (a termination or a truncation); actions
    scaled to [-1, 1] from the action space's bounds (eval.py scales the policy's back)."""
    dataset = open_minari_dataset(env_name)
    episodes = []
    for episode in dataset:
        steps = len(episode.actions)
        observations = episode.observations
        if isinstance(observations, dict):  # (goal-conditioned mazes) flattened as gymnasium
            # flattens a Dict: its parts, each a vector, concatenated in its order
            observations = np.concatenate([observations[key]
                                           for key in dataset.observation_space.spaces], axis=-1)
        episodes.append(dict(observations=observations[:-1], next_observations=observations[1:],
                             actions=episode.actions, rewards=episode.rewards,
                             masks=1 - episode.terminations,
                             # the episode's last step (a termination or a truncation)
                             terminals=np.arange(steps) == steps - 1))
    data = {k: np.concatenate([episode[k] for episode in episodes]) for k in episodes[0]}
    space = dataset.action_space
    data["actions"] = 2 * (data["actions"] - space.low) / (space.high - space.low) - 1
    return data


def to_device(dataset, device, frame_stack=None, sparse=False):
    """What the update needs, on the device, as float32 transitions (with `terminals`, the
    episodes' ends, for QC's windows). A compact pixel dataset (OGBench's layout for visual-* envs:
    each frame once, s' in the next row) keeps its uint8 frames once, and each transition the rows
    of its frame_stack + 1 frames: frames 0..frame_stack-1 make s, frames 1..frame_stack make s'
    (before an episode starts, its first frame stands in)."""
    rows = slice(None)
    keys = "actions rewards masks terminals observations next_observations"
    data = {}
    if "valids" in dataset:
        valids = dataset["valids"]
        rows = np.flatnonzero(valids)  # the rows that start a transition
        starts = np.concatenate([[True], valids[:-1] == 0])  # after an episode's last frame
        episode_start = np.maximum.accumulate(np.where(starts, np.arange(len(valids)), 0))
        frame_rows = np.maximum(rows[:, None] + np.arange(1 - frame_stack, 2),
                                episode_start[rows, None])
        data["frames"] = torch.as_tensor(dataset["observations"], device=device)
        data["frame_rows"] = torch.as_tensor(frame_rows, device=device)
        keys = "actions rewards masks"  # frames stand for the observations
    for k in keys.split():
        if k in dataset:
            data[k] = torch.as_tensor(np.asarray(dataset[k][rows], dtype=np.float32), device=device)
    for k in ("rewards", "masks"):  # a column per task: one, unless a grid trains several
        data[k] = data[k].reshape(len(data[k]), -1)
    # as the official code: the flow never has to reach exactly +-1
    data["actions"] = data["actions"].clamp(-1 + 1e-5, 1 - 1e-5)
    if sparse:  # QC's --sparse: -1 until the task is solved (reward 0 in OGBench), then 0
        data["rewards"] = -(data["rewards"] != 0).float()
    return data


def sample_batch(data, batch_size, generators=(None,), tasks=(0,), p_aug=None, cfg=None):
    """Uniform transitions, a batch per generator along a leading agent dimension: each agent
    draws its own rows, then one gather per array serves every agent, on the device; agent k's
    rewards and masks come from column tasks[k]. With cfg.horizon > 1, windows of that many rows
    (`gather`). Pixels: the frames are stacked along the channels, oldest first, then randomly
    shifted with probability p_aug (train passes cfg.p_aug; validation batches are not shifted)."""
    horizon = cfg.horizon if cfg else 1
    starts = torch.stack([
        torch.randint(len(data["actions"]) - horizon + 1, (batch_size,), generator=g,
                      device=data["actions"].device)
        for g in generators
    ])
    # the windows' rows, (agents, batch, H)
    batch = gather(data, starts[..., None] + torch.arange(horizon, device=starts.device), tasks,
                   cfg)
    if "frames" in data:
        # (agents, batch, height, width, frame_stack + 1, channels)
        frames = data["frames"][batch.pop("frame_rows")].movedim(2, -2)
        images = [frames[..., :-1, :].flatten(-2), frames[..., 1:, :].flatten(-2)]  # s, s'
        if p_aug:
            images = random_shift(*images, p_aug, generators)
        batch["observations"], batch["next_observations"] = images
    return batch


def gather(data, rows, tasks, cfg):
    """The batch of the windows of H rows `rows` (agents, batch, H), agent k's rewards and masks
    from column tasks[k]. H = 1: FQL's transitions. H > 1: QC's windows (its sample_sequence; a
    window may cross an episode's end): s_t, the actions a_t..a_{t+H-1} flattened time-major
    (FQL-n: a_t alone), the discounted reward sum, the masks' minimum, s_{t+H}, and `valid`: a
    step of the window counts unless an episode ended before it."""
    task = torch.as_tensor(tasks, device=rows.device)[:, None, None]  # (agents, 1, 1)
    if rows.shape[-1] == 1:
        return {k: (v[rows, task] if k in ("rewards", "masks") else v[rows])[:, :, 0]
                for k, v in data.items() if k not in ("frames", "terminals")}
    steps = torch.arange(rows.shape[-1], device=rows.device)
    actions = data["actions"][rows]
    ended = data["terminals"][rows].cummax(-1).values  # an episode ended here or before
    return dict(
        actions=actions.flatten(-2) if cfg.action_chunking else actions[..., 0, :],
        rewards=(data["rewards"][rows, task] * cfg.discount**steps).sum(-1),
        masks=data["masks"][rows, task].amin(-1),
        observations=data["observations"][rows[..., 0]],
        next_observations=data["next_observations"][rows[..., -1]],
        valid=1 - F.pad(ended[..., :-1], (1, 0)),  # the first step always counts
    )


def random_shift(observations, next_observations, p_aug, generators=(None,), pad=3):
    """With probability p_aug (per agent and update), shift each image of (agent, sample, H, W, C)
    batches by up to `pad` pixels (edge padding, then a crop), s and s' of a sample alike, each
    sample its own way. An unshifted batch takes the offset (pad, pad), so that the same kernels
    run either way and a CUDA graph holds the step."""
    agents, batch, height, width = observations.shape[:4]
    device = observations.device
    offsets = torch.stack([torch.randint(2 * pad + 1, (batch, 2), device=device, generator=g)
                           for g in generators])
    draws = torch.stack([torch.rand((), device=device, generator=g) for g in generators])
    offsets = torch.where(draws[:, None, None] < p_aug, offsets, pad) - pad
    rows = (torch.arange(height, device=device) + offsets[..., :1]).clamp(0, height - 1)
    cols = (torch.arange(width, device=device) + offsets[..., 1:]).clamp(0, width - 1)
    agent = torch.arange(agents, device=device)[:, None, None, None]
    sample = torch.arange(batch, device=device)[:, None, None]
    return [images[agent, sample, rows[..., None], cols[..., None, :]]
            for images in (observations, next_observations)]


def stacked_shape(data):
    """An observation's shape as the networks see it (pixels: frame_stack frames stacked)."""
    if "frames" in data:
        height, width, channels = data["frames"].shape[1:]
        return height, width, channels * (data["frame_rows"].shape[1] - 1)
    return tuple(data["observations"].shape[1:])


def device_splits(cfg, runs):
    """The runs' train and validation splits (OGBench's; D4RL and Minari have no validation
    split), each one copy on the device shared by all agents, a column of rewards and masks per
    task."""
    splits = load_datasets(list(dict.fromkeys(run.env for run in runs)), cfg.dataset_dir)
    splits = [to_device(split, cfg.device, cfg.frame_stack, cfg.sparse)
              for split in splits if split]
    if min(len(split["actions"]) for split in splits) < cfg.horizon:
        raise UsageError(f"--horizon {cfg.horizon} is longer than a split of {cfg.env}'s dataset")
    return splits


# ---- Checkpoints and logs: nothing written is lost when a run is killed --------------------------
# Fields that may change between a killed run and its resumption (run_dir: the same folder,
# spelled another way)
RESUMABLE_CHANGES = set(
    "resume offline_steps online_steps log_interval eval_interval eval_episodes run_dir "
    "save_interval device compile cuda_graph wandb_project dataset_dir".split())


def write_atomically(path, write, rename=True):
    """write(path + ".tmp"), then its rename to `path` (rename=False: the caller's), so that a kill
    leaves the old file or the new one whole. A write that fails (a full disk: torch.save raises
    a RuntimeError there) ends in one line, its partial file removed."""
    tmp = f"{path}.tmp"
    try:
        write(tmp)
    except (OSError, RuntimeError) as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UsageError(f"could not write {path} ({str(err).splitlines()[0]}; is the disk "
                         "full?). The last checkpoint in that folder is whole: the same command "
                         "with --resume continues from it once there is space") from None
    if rename:
        os.replace(tmp, path)


def save_checkpoints(agent, step, runs, online=None):
    """Each agent's checkpoint.pt (with its fine-tuning state, from `online`): all written to
    temporary files first, then renamed, so that a kill leaves the previous ones whole. If any
    agent's parameters are not finite, the run stops before writing any."""
    for run, params in zip(runs, zip(*agent.params.values())):  # one host synchronisation each
        if not torch.stack([p.isfinite().all() for p in params]).all():
            stop_diverged(f"its parameters are not finite at step {step}", run.run_dir)
    for i, run in enumerate(runs):
        # rng: the agent's random stream (nothing in the loop draws from the global ones)
        state = dict(agent.state_dict(i), step=step, config=asdict(run),
                     rng={"generator": agent.generators[i].get_state()},
                     action_dim=agent.nets.action_dim, buffer=online and online.state_dict(i),
                     observation_shape=agent.nets.observation_shape)
        write_atomically(run.checkpoint, partial(torch.save, state), rename=False)
    for run in runs:
        os.replace(f"{run.checkpoint}.tmp", run.checkpoint)


def read_checkpoint(path):
    """A checkpoint's contents, read as data only (no code in the file can run) and checked to be a
    whole checkpoint of this fql.py; else one line that says what is wrong."""
    if not os.path.exists(path):
        raise UsageError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load fails in many ways on a truncated or foreign file
        code = re.search(r"GLOBAL (\S+)|but got (<[^>]+>)", str(err))  # what a pickle would run
        if code:  # (fql.py before 2026-11-29 kept numpy's random state as an array: such a
            # checkpoint loads with that fql.py)
            raise UsageError(f"{path} is not a checkpoint of fql.py: it holds Python objects "
                             f"({code[1] or code[2]}), and loading them could run code") from None
        raise UsageError(f"{path} is not a readable checkpoint ({type(err).__name__}; truncated?); "
                         "delete it to start over, or restore a copy") from None
    try:  # every part, a config of this fql.py, and networks of the shapes its config builds
        state["config"].pop("buffer_size", None)  # a flag of earlier releases
        config = Config(**state["config"])  # a field this fql.py does not have: TypeError
        for part in ("optimizer", "rng", "step", "buffer"):  # a KeyError names a missing one
            state[part]
        state["config"] = asdict(config)
        with torch.device("meta"):  # shapes only, no memory
            nets = FQLNetworks(state["observation_shape"], state["action_dim"], config)
        nets.load_state_dict(state["nets"], assign=True)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
        detail = str(err).strip().splitlines()[-1].strip()
        raise UsageError(f"{path} is not a checkpoint of this fql.py ({type(err).__name__}: "
                         f"{detail}); one of an fql.py from before 2026-11-26, which stored its "
                         "actors' weights as (out, in), needs that version") from None
    return state


def load_checkpoints(agent, runs):
    """Resume a killed run: each agent's checkpoint read and checked (its config may differ only
    in RESUMABLE_CHANGES), then its networks, Adam's state and random stream restored; returns
    the checkpoints."""
    states = []
    for run, generator in zip(runs, agent.generators):
        state = read_checkpoint(run.checkpoint)
        changed = [k for k, v in asdict(run).items()
                   if k not in RESUMABLE_CHANGES and state["config"][k] != v]
        if changed:
            raise UsageError(f"--resume: this command differs from the run in {run.run_dir} in "
                             f"{', '.join(changed)}; give the same flags as the original run")
        try:
            generator.set_state(state["rng"]["generator"])
        except (KeyError, RuntimeError, TypeError):  # a generator of another kind of device
            generator.manual_seed(run.seed * 1_000_003 + state["step"])  # a new stream
        states.append(state)
    agent.load_state_dicts(states)
    return states


def write_csv(rows, path):
    """Rows (dicts) as a CSV file whose columns are every row's, in order."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, dict.fromkeys(k for row in rows for k in row))
        writer.writeheader()
        writer.writerows(rows)


class RunLog:
    """Every agent's train.csv and eval.csv, each rewritten atomically at every row (the rows of
    steps after `start`, written after the checkpoint a run resumes from, are dropped); Weights &
    Biases (a run per agent, named after its folder, in a group named after the grid); and the
    progress bar over the steps still to run."""

    def __init__(self, cfg, runs, start, total_steps):
        self.runs = runs
        self.rows = {}  # CSV path: its rows
        for path in (os.path.join(run.run_dir, name) for run in runs for name in ("train.csv",
                                                                                   "eval.csv")):
            rows = []
            if os.path.exists(path):
                with open(path, newline="") as f:
                    rows = [row for row in csv.DictReader(f) if int(row["step"]) <= start]
            self.rows[path] = rows
            write_atomically(path, partial(write_csv, rows))
        from tqdm import tqdm

        self.wandb = []
        if cfg.wandb_project:
            try:
                import wandb
            except ImportError:
                raise UsageError("--wandb_project needs wandb: pip install wandb") from None
            self.wandb = [wandb.init(project=cfg.wandb_project, group=cfg.run_dir, name=run.run_dir,
                                     config=asdict(run), reinit="create_new")
                          for run in runs]
        self.progress = tqdm(range(start + 1, total_steps + 1), initial=start, total=total_steps,
                             unit="update", smoothing=0.05)

    def train(self, step, metrics, extras):
        """A train.csv row per agent: its metrics, its `extras` and the updates/s of late (the
        progress bar's, smoothed)."""
        speed = self.progress.format_dict["rate"] or 0.0
        values = torch.stack(list(metrics.values()), dim=1).tolist()  # (agents, metrics)
        rows = [{**dict(zip(metrics, v)), **extra, "time/updates_per_sec": speed}
                for v, extra in zip(values, extras)]
        self.write("train.csv", step, rows)

    def evaluation(self, step, results):
        """An eval.csv row per agent."""
        rows = [{f"evaluation/{k}": v for k, v in result.items()} for result in results]
        self.write("eval.csv", step, rows)
        key = "success" if "success" in results[0] else "return"  # (not every env has a success)
        values = " ".join(f"{result[key]:.3f}" for result in results)
        self.progress.write(f"step {step}: {key} {values}")

    def write(self, name, step, rows):
        """A row per agent in its `name` file; a number that is not finite stops the run."""
        for run, row in zip(self.runs, rows):
            path = os.path.join(run.run_dir, name)
            self.rows[path].append({"step": step, **row})
            write_atomically(path, partial(write_csv, self.rows[path]))
            for key, value in row.items():
                if not math.isfinite(value):
                    stop_diverged(f"{key} is {value} at step {step}", run.run_dir)
        for wandb_run, row in zip(self.wandb, rows):
            wandb_run.log(row, step=step)


def stop_diverged(what, run_dir):
    raise UsageError(
        f"training diverged in {run_dir}: {what}. Stopped before saving, so its last checkpoint "
        "holds the parameters from before. Try a smaller --lr or --alpha, or --normalize_q_loss")


# ---- Training loop -------------------------------------------------------------------------------
def agent_runs(cfg):
    """Each agent's run: the config its run alone has (--env <env>-task<t> --alpha <a> --seed <s>),
    in its own folder; or one clear line, before anything is loaded or written, if a folder holds
    another run. With --resume, a grid killed between its checkpoints' renames is mended: once
    the first agent's .tmp is gone, the renames had begun, so every .tmp left is a whole checkpoint
    of the same step, and is renamed."""
    runs = []
    for column, alpha, seed in agent_grid(cfg):
        task = cfg.tasks[column] if cfg.tasks else None
        env = re.sub(r"-v0$", f"-task{task}-v0", cfg.env) if task else cfg.env
        # its folder: its task, alpha and seed in the grid's run_dir (not str.format: a folder's
        # name may hold other braces)
        run_dir = cfg.run_dir.replace("{task}", str(task)).replace("{alpha}", f"{alpha:g}")
        run = replace(cfg, env=env, tasks=None, alpha=alpha, alphas=None, seed=seed, seeds=(seed,),
                      run_dir=run_dir.replace("{seed}", str(seed)))
        if run.run_dir in [other.run_dir for other in runs]:
            raise UsageError(f"--run_dir {cfg.run_dir} gives two agents one folder: name each "
                             "axis of the grid in it ({task}, {alpha}, {seed})")
        if os.path.exists(run.checkpoint) and not cfg.resume:
            raise UsageError(f"{run.run_dir} already holds a run; add --resume to continue it, or "
                             "another --run_dir")
        renamed = runs and not os.path.exists(f"{runs[0].checkpoint}.tmp")
        if cfg.resume and renamed and os.path.exists(f"{run.checkpoint}.tmp"):
            os.replace(f"{run.checkpoint}.tmp", run.checkpoint)
        runs.append(run)
    return runs


def open_run(cfg, runs, agent, online):
    """The step to start from: with --resume, each agent's networks, optimiser, random streams
    (and fine-tuning's buffer) come from its checkpoint. Then each one's config.json is written."""
    start = 0
    if cfg.resume and os.path.exists(runs[0].checkpoint):
        states = load_checkpoints(agent, runs)
        start = states[0]["step"]
        if online and states[0]["buffer"] is not None:
            online.load_state_dicts([state["buffer"] for state in states])
    elif cfg.resume:
        print(f"--resume: no checkpoint in {runs[0].run_dir} yet; starting from the beginning")
    for run in runs:  # written once the run is accepted
        os.makedirs(run.run_dir, exist_ok=True)
        config = json.dumps(asdict(run), indent=1)
        write_atomically(os.path.join(run.run_dir, "config.json"),
                         lambda path: pathlib.Path(path).write_text(config))
    return start


def validation_metrics(agent, validation_data):
    """The losses on a batch of the validation split (the list holds it, or is empty), each
    agent's, as "validation/..." metrics. Its batch and noise come from the agents' own
    generators, so the random streams depend on --log_interval."""
    if not validation_data:  # (D4RL and Minari have no validation split)
        return {}
    with torch.no_grad():  # eager: compiled under no_grad, the losses would compile once more
        sample = partial(sample_batch, validation_data[0], cfg=agent.cfg)
        _, metrics = agent.losses_eager(*agent.draw(sample), True)
    return {f"validation/{k}": v for k, v in metrics.items()}


def train(cfg, evaluate=None, finetuning=None):
    """Algorithm 1 for every agent of cfg: offline steps, then with --online_steps fine-tuning.
    eval.py gives the env side (without it, no evaluation): `evaluate(policy, runs, step)` -> a
    result per agent, run k's episode i in runs[k].env from reset(seed=runs[k].seed + step + i);
    `finetuning(cfg, runs, train_data)` -> an object as eval.Finetuning (collect, sample, log,
    state dicts)."""
    cfg = resolve_config(cfg)
    runs = agent_runs(cfg)
    # TF32 matmuls on the GPU, as JAX does by default
    torch.set_float32_matmul_precision("high" if cfg.device.startswith("cuda") else "highest")

    train_data, *validation_data = device_splits(cfg, runs)
    agent = make_agent(cfg, stacked_shape(train_data), train_data["actions"].shape[1])
    offline_step = make_train_step(agent, partial(sample_batch, train_data, p_aug=cfg.p_aug,
                                                  cfg=cfg))
    online = finetuning(cfg, runs, train_data) if cfg.online_steps else None
    online_step = make_train_step(agent, online.sample) if online else None
    # (a CUDA graph records at its first call, so after open_run has loaded Adam's state)
    start = open_run(cfg, runs, agent, online)
    where = runs[0].run_dir if len(runs) == 1 else cfg.run_dir  # a grid's: its folders' pattern
    print(f"FQL on {cfg.env}, alpha {cfg.alphas or cfg.alpha}, in {where}")
    total_steps = cfg.offline_steps + cfg.online_steps
    log = RunLog(cfg, runs, start, total_steps)
    # A cluster sends SIGTERM before it preempts or requeues a job (SLURM: SIGKILL follows after a
    # grace period). The step it interrupts is finished and saved, so that the requeued job, the
    # same command with --resume, repeats nothing
    stop = []
    previous_sigterm = signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    try:
        for step in log.progress:  # Algorithm 1
            with_metrics = step % cfg.log_interval == 0
            if step <= cfg.offline_steps:
                metrics = offline_step(with_metrics)
            else:  # fine-tuning: one environment step, then one update on the growing buffer
                online.collect(agent.act)
                metrics = online_step(with_metrics)

            if with_metrics:  # the only host synchronisation of an offline step
                metrics = metrics | validation_metrics(agent, validation_data)
                log.train(step, metrics,
                          online.log() if step > cfg.offline_steps else [{}] * len(runs))

            last = step == total_steps
            if evaluate and cfg.eval_interval and (step % cfg.eval_interval == 0 or last):
                log.evaluation(step, evaluate(agent.act, runs, step))

            if step % cfg.save_interval == 0 or last or stop:
                save_checkpoints(agent, step, runs, online)
            if stop and not last:
                log.progress.close()
                raise SystemExit(f"stopped by SIGTERM at step {step}, saved in {where}; the "
                                 "same command with --resume continues")
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
    log.progress.close()
    return agent


# ---- Command line --------------------------------------------------------------------------------
def main(argv=None):
    import tyro

    cfg = tyro.cli(Config, args=argv, use_underscores=True, description=__doc__.splitlines()[0])
    try:
        cfg = resolve_config(cfg)
        if not (cfg.benchmark or cfg.eval_interval or cfg.online_steps):
            return train(cfg)
        try:
            import eval  # the environments: their shapes, evaluation, fine-tuning
        except ImportError as err:
            raise UsageError("evaluation, fine-tuning and --benchmark need eval.py beside fql.py "
                             f"and its packages ({err}); --eval_interval 0 trains without them") \
                from None
        return (eval.benchmark if cfg.benchmark else eval.train)(cfg)
    except UsageError as err:
        sys.exit(f"fql.py: error: {err}")
    except KeyboardInterrupt:
        sys.exit("fql.py: interrupted; the same command with --resume continues from the last "
                 "checkpoint")
    except RuntimeError as err:  # out of memory: torch.OutOfMemoryError on a GPU
        if not re.search("out of memory|can't allocate memory", str(err)):
            raise
        sys.exit(
            f"fql.py: error: out of memory on {cfg.device} with {len(agent_grid(cfg))} agents and "
            f"--batch_size {cfg.batch_size}: train fewer agents per process, or smaller batches")


if __name__ == "__main__":
    # `python fql.py` runs this file as the module __main__; eval.py's `import fql` must get this
    # same module, not a second copy of it (whose UsageError `main` would not catch)
    sys.modules["fql"] = sys.modules["__main__"]
    main()
