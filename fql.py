"""Flow Q-Learning (FQL) in one PyTorch file.

Paper: Park, Li, Levine. "Flow Q-Learning", ICML 2025. https://arxiv.org/abs/2502.02538
Official JAX code (whose numbers are the paper's): https://github.com/seohongpark/fql

FQL trains three networks from one summed loss:
  * a BC flow policy v(s, x_t, t) by flow matching on the dataset actions,
  * a one-step policy mu(s, z) distilled from the BC flow and pushed up the critic,
  * a critic Q(s, a) (two members) by TD learning with the one-step policy's next actions.

Examples:
  python fql.py --env ogbench-cube-single                  # alpha 300, task2, 1M steps
  python fql.py --env ogbench-puzzle-3x3-task1 --alpha 1000
  python fql.py --env d4rl-antmaze-large-play              # D4RL from its hdf5 files, 500K steps
  python fql.py --env ogbench-visual-cube-single           # pixels: IMPALA encoders, 3 frames, shifts
  python fql.py --env ogbench-cube-double --online_steps 1000000   # then offline-to-online fine-tuning
  python fql.py --env ogbench-cube-single --resume          # continue a killed run
  python fql.py --benchmark                                # updates/s of the training step
Env names, datasets and environments: envs.py. Evaluation, videos, plots, fine-tuning of saved runs: eval.py.
"""
import copy
import csv
import dataclasses
import functools
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
import tyro
from torch import nn
from tqdm import tqdm

import envs  # env names and settings, datasets and batch sampling, environments
from envs import UsageError


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
@dataclass
class Config:
    env: str = "ogbench-cube-single"
    """ogbench-<env> (its default task), ogbench-<env>-task<N>, a full OGBench name such as
    cube-single-play-singletask-task2-v0, d4rl-<dataset> or a D4RL name such as antmaze-large-play-v2"""
    seed: int = 0
    """seed for torch, numpy and the evaluation episodes"""
    offline_steps: int | None = None
    """gradient steps on the offline dataset; default: 500K for D4RL (as the paper), else 1M"""
    online_steps: int = 0
    """environment steps of online fine-tuning after the offline steps, one update per step"""
    buffer_size: int = 2_000_000
    """replay buffer capacity for fine-tuning (the offline data counts unless --balanced_sampling)"""
    balanced_sampling: bool = False
    """fine-tuning batches: half from the offline dataset, half from the online transitions"""
    batch_size: int = 256
    """transitions per gradient step"""
    lr: float = 3e-4
    """Adam learning rate (all three networks)"""
    alpha: float | None = None
    """distillation coefficient; default: the paper's value for the env (table in README), else 10"""
    discount: float | None = None
    """discount factor; default: 0.995 for antmaze-giant, humanoidmaze and antsoccer, else 0.99"""
    q_agg: Literal["mean", "min"] | None = None
    """how the target takes the two critic members; default: min for antmaze-large/giant and Adroit, else mean"""
    tau: float = 0.005
    """Polyak rate of the target critic"""
    normalize_q_loss: bool = False
    """scale the Q term by 1 / mean|Q| (the official README suggests it for new tasks)"""
    flow_steps: int = 10
    """Euler steps when integrating the BC flow"""
    encoder: Literal["impala_small", "impala_debug"] | None = None
    """image encoder, one per network (the critic's two members share theirs); default: impala_small for
    visual-* envs (impala_debug: a tiny one for quick CPU checks)"""
    frame_stack: int | None = None
    """pixel observations stack this many latest frames along the channels; default: 3 for visual-* envs"""
    p_aug: float | None = None
    """probability that a batch of pixel observations is randomly shifted (pad 3, crop); default: 0.5
    for visual-* envs"""
    actor_hidden_dims: tuple[int, ...] = (512, 512, 512, 512)
    """hidden layer widths of the BC flow and the one-step policy"""
    value_hidden_dims: tuple[int, ...] = (512, 512, 512, 512)
    """hidden layer widths of each critic member"""
    log_interval: int = 5_000
    """steps between train/validation metric rows in train.csv"""
    eval_interval: int = 100_000
    """steps between evaluations in the environment (0: never)"""
    eval_episodes: int = 50
    """episodes per evaluation"""
    save_interval: int = 100_000
    """steps between checkpoints (one more is written at the end)"""
    dataset_dir: str = "~/.ogbench/data"
    """where the OGBench .npz files are (downloaded there when missing and online)"""
    run_dir: str | None = None
    """folder for train.csv, eval.csv and checkpoint.pt; default: runs/<env>__seed<seed>"""
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
    """print updates/s of the training step (eager, compiled, CUDA graph) on random data with the env's
    shapes and this config's networks and batch size, then exit; needs no dataset"""


# ----------------------------------------------------------------------------------------------
# Defaults: the official agent's, then the paper's per-env settings (envs.ENVS, envs.D4RL)
# ----------------------------------------------------------------------------------------------
DEFAULTS = dict(alpha=10.0, discount=0.99, q_agg="mean", offline_steps=1_000_000)


def resolve_config(cfg: Config) -> Config:
    """Fill the per-environment defaults the user did not set, then check the config."""
    env_name, env_defaults = envs.resolve_env(cfg.env)
    filled = {k: v if getattr(cfg, k) is None else getattr(cfg, k)
              for k, v in {**DEFAULTS, **env_defaults}.items()}
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    run_dir = cfg.run_dir or os.path.join("runs", f"{cfg.env}__seed{cfg.seed}")
    cfg = dataclasses.replace(cfg, env=env_name, device=device, run_dir=run_dir, **filled)
    for field in ("buffer_size", "batch_size", "flow_steps", "log_interval", "save_interval", "eval_episodes"):
        if getattr(cfg, field) <= 0:
            raise UsageError(f"--{field} must be positive, got {getattr(cfg, field)}")
    for field in ("offline_steps", "online_steps", "eval_interval"):
        if getattr(cfg, field) < 0:
            raise UsageError(f"--{field} must be >= 0, got {getattr(cfg, field)}")
    if cfg.offline_steps + cfg.online_steps == 0:
        raise UsageError("nothing to train: --offline_steps and --online_steps are both 0")
    if cfg.env.startswith("visual-") and not (cfg.encoder and cfg.frame_stack and cfg.frame_stack >= 1):
        raise UsageError(f"{cfg.env} has pixel observations: give --encoder and --frame_stack >= 1")
    if cfg.env.startswith("visual-") and cfg.online_steps:
        raise UsageError("fine-tuning on pixels is not supported: its buffer would hold stacked frames per step")
    return cfg


# ----------------------------------------------------------------------------------------------
# Layers: Linear (through oneDNN on x86 CPUs) and GELU
# ----------------------------------------------------------------------------------------------
# PyTorch's CPU build multiplies float32 matrices with MKL, which picks slower code on non-Intel
# processors: on an AMD EPYC it reaches about 200 GFLOP/s where oneDNN, also inside PyTorch, reaches 450,
# and the matmuls are most of an FQL update. So on x86 CPUs the Linear layers call oneDNN through a
# custom op (torch.compile treats it as one opaque kernel); elsewhere, GPUs included, they call F.linear.
USE_ONEDNN = (torch.backends.mkldnn.is_available() and platform.machine().lower() in ("x86_64", "amd64")
              and hasattr(torch.ops.mkldnn, "_linear_pointwise"))  # a private op: fall back if it goes away


@torch.library.custom_op("fql::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias for a 2-D float32 x and weight (out, in), as F.linear, computed by oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@onednn_linear.register_fake  # the output's shape, for torch.compile's tracing
def _onednn_linear_shape(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


def _onednn_linear_save(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)


def _onednn_linear_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    needs_x, needs_weight, needs_bias = ctx.needs_input_grad  # frozen weights and data inputs need none
    grad_x = onednn_linear(grad, weight.t(), None) if needs_x else None  # grad @ weight
    # grad.T @ x; oneDNN runs this a quarter faster with the left operand copied to a dense layout
    grad_weight = onednn_linear(grad.t().contiguous(), x.t(), None) if needs_weight else None
    return grad_x, grad_weight, grad.sum(0) if needs_bias else None


onednn_linear.register_autograd(_onednn_linear_backward, setup_context=_onednn_linear_save)


def on_onednn(x: torch.Tensor) -> bool:
    return USE_ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear, through oneDNN for float32 on x86 CPUs (see above)."""
    if not on_onednn(x):
        return F.linear(x, weight, bias)
    return onednn_linear(x.reshape(-1, x.shape[-1]), weight, bias).reshape(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """nn.Linear (same parameters and state dict) that calls `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """flax's nn.gelu (tanh approximation), 0.5 x (1 + tanh(y)) with y = sqrt(2/pi) (x + 0.044715 x^3),
    written as x * sigmoid(2y): the same function to float32 rounding, but exp is cheaper than tanh
    in the CPU kernels torch.compile generates (a compiled CPU update is about 13% faster)."""
    return x * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x))


class GELUTanh(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_tanh(x)


# ----------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------
class ResnetStack(nn.Module):
    """IMPALA stack: 3x3 conv, 3x3 max-pool with stride 2, then residual blocks of (ReLU, conv) x 2."""

    def __init__(self, in_channels: int, channels: int, blocks: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                                  nn.Conv2d(channels, channels, 3, padding=1)) for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        # flax's 'SAME' max-pool: the one extra padding row/column goes after (bottom/right)
        x = F.max_pool2d(F.pad(x, (x.shape[-1] % 2, 1, x.shape[-2] % 2, 1), value=-math.inf), 3, stride=2)
        for block in self.blocks:
            x = x + block(x)
        return x


class ImpalaEncoder(nn.Module):
    """The official code's IMPALA encoder: uint8 images (..., H, W, C) scaled to [0, 1], ResNet stacks,
    ReLU, flatten, then Linear -> GELU to 512 features. Xavier-uniform weights, zero biases."""

    SIZES = {"impala_small": ((16, 32, 32), 1), "impala_debug": ((4, 4), 1)}  # stack widths, blocks each

    def __init__(self, image_shape: tuple[int, ...], kind: str, features: int = 512):
        super().__init__()
        widths, blocks = self.SIZES[kind]
        height, width, channels = image_shape
        stacks = []
        for stack_width in widths:
            stacks.append(ResnetStack(channels, stack_width, blocks))
            channels, height, width = stack_width, (height + 1) // 2, (width + 1) // 2
        self.stacks = nn.Sequential(*stacks)
        self.head = Linear(channels * height * width, features)
        for layer in self.modules():
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (..., H, W, C) -> (..., features)
        x = images.reshape(-1, *images.shape[-3:]).float().div(255).movedim(-1, 1)
        x = F.relu(self.stacks(x)).flatten(1)
        return gelu_tanh(self.head(x)).reshape(*images.shape[:-3], -1)


def make_encoder(observation_shape: tuple[int, ...], cfg: Config) -> tuple[nn.Module, int]:
    """(encoder, feature size): an IMPALA encoder for images, the identity for state vectors."""
    if cfg.encoder is None:
        return nn.Identity(), observation_shape[0]
    return ImpalaEncoder(observation_shape, cfg.encoder), 512


class MLP(nn.Module):
    """Hidden layers Linear -> GELU(tanh), then a plain Linear output; Xavier-uniform weights everywhere,
    zero biases (flax's MLP in the official code, without LayerNorm for the actors). The observation,
    the first input, goes through `encoder` first, unless it comes `encoded` already."""

    def __init__(self, in_dim: int, hidden_dims: tuple[int, ...], out_dim: int, encoder: nn.Module = None):
        super().__init__()
        self.encoder = encoder if encoder is not None else nn.Identity()
        layers, dim = [], in_dim
        for width in hidden_dims:
            layers += [Linear(dim, width), GELUTanh()]
            dim = width
        layers.append(Linear(dim, out_dim))
        self.net = nn.Sequential(*layers)
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self, obs: torch.Tensor, *inputs: torch.Tensor, encoded: bool = False) -> torch.Tensor:
        return self.net(torch.cat([obs if encoded else self.encoder(obs), *inputs], dim=-1))


class EnsembleLinear(nn.Module):
    """`members` independent Linear layers computed as one batched matmul. Weights are stored (in, out)
    like flax kernels, each member drawn independently from Xavier uniform; biases zero."""

    def __init__(self, members: int, in_dim: int, out_dim: int):
        super().__init__()
        bound = math.sqrt(6 / (in_dim + out_dim))
        self.weight = nn.Parameter(torch.empty(members, in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(members, 1, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, in) or (members, batch, in)
        if not on_onednn(x):
            return x @ self.weight + self.bias  # -> (members, batch, out)
        # oneDNN's linear takes one 2-D weight: one call per member
        inputs = x.unbind(0) if x.dim() == 3 else [x] * len(self.weight)
        return torch.stack([onednn_linear(member_x, weight.t(), bias[0])
                            for member_x, weight, bias in zip(inputs, self.weight, self.bias)])


class EnsembleLayerNorm(nn.Module):
    """LayerNorm (eps 1e-6) with its own scale and shift per member, as flax's vmapped LayerNorm."""

    def __init__(self, members: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(members, 1, dim))
        self.bias = nn.Parameter(torch.zeros(members, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], eps=1e-6) * self.weight + self.bias


class Critic(nn.Module):
    """Two Q(s, a) members with independent weights, evaluated together: one batched matmul per layer
    instead of two networks one after the other. Hidden layers Linear -> GELU(tanh) -> LayerNorm.
    With an encoder, both members read the same encoded observation, as in the official code."""

    def __init__(self, feature_dim: int, action_dim: int, hidden_dims: tuple[int, ...], members: int = 2,
                 encoder: nn.Module = None):
        super().__init__()
        self.encoder = encoder if encoder is not None else nn.Identity()
        layers, dim = [], feature_dim + action_dim
        for width in hidden_dims:
            layers += [EnsembleLinear(members, dim, width), GELUTanh(),
                       EnsembleLayerNorm(members, width)]
            dim = width
        layers.append(EnsembleLinear(members, dim, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([self.encoder(obs), actions], dim=-1)).squeeze(-1)  # (members, batch)


class FQLNetworks(nn.Module):
    """The critic and its target, the BC flow and the one-step policy; each with its own encoder for pixels."""

    def __init__(self, observation_shape: tuple[int, ...], action_dim: int, cfg: Config):
        super().__init__()
        self.observation_shape = tuple(observation_shape)
        encoder, dim = make_encoder(observation_shape, cfg)
        self.critic = Critic(dim, action_dim, cfg.value_hidden_dims, encoder=encoder)
        self.target_critic = copy.deepcopy(self.critic).requires_grad_(False)
        # v(s, x_t, t): t enters as a raw scalar column, as in the official code
        self.actor_bc_flow = MLP(dim + action_dim + 1, cfg.actor_hidden_dims, action_dim,
                                 encoder=make_encoder(observation_shape, cfg)[0])
        # mu(s, z): one network call maps noise to an action
        self.actor_onestep = MLP(dim + action_dim, cfg.actor_hidden_dims, action_dim,
                                 encoder=make_encoder(observation_shape, cfg)[0])

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]


def with_frozen_params(module: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    """Call `module` with detached parameters: gradients reach the inputs but never the weights
    (the official code calls the critic without `grad_params` for the actor's Q term)."""
    params = {name: p.detach() for name, p in module.named_parameters()}
    return torch.func.functional_call(module, params, inputs)


def flow_actions(actor_bc_flow: nn.Module, obs: torch.Tensor, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """Euler-integrate the BC flow from x_0 = noise over t = 0, 1/steps, ..., then clip to [-1, 1]."""
    features, x = actor_bc_flow.encoder(obs), noise  # the observation is encoded once, as the official code
    for i in range(steps):
        t = torch.full_like(x[..., :1], i / steps)
        x = x + actor_bc_flow(features, x, t, encoded=True) / steps
    return x.clamp(-1, 1)


# ----------------------------------------------------------------------------------------------
# Losses (paper Section 4 and Algorithm 1)
# ----------------------------------------------------------------------------------------------
def draw_noise(batch_size: int, action_dim: int, device) -> dict:
    """All random draws of one update, in one place, so tests can fix them."""
    shape = (batch_size, action_dim)
    return dict(
        x0=torch.randn(shape, device=device),  # BC flow: source sample
        t=torch.rand((batch_size, 1), device=device),  # BC flow: time, per sample
        z=torch.randn(shape, device=device),  # one-step policy noise for distillation and Q term
        z_next=torch.randn(shape, device=device),  # one-step policy noise for the next actions a'
    )


def fql_losses(nets: FQLNetworks, batch: dict, noise: dict, cfg: Config, with_metrics: bool = False):
    """Return (critic loss + actor loss, metrics). Pure: all randomness comes in `noise`.
    Metrics (official keys) are only computed when asked for, at log steps."""
    obs, actions = batch["observations"], batch["actions"]

    # Critic, L_Q(phi): TD target from the target critic at a' = clip(mu(s', z'))
    with torch.no_grad():
        next_actions = nets.actor_onestep(batch["next_observations"], noise["z_next"]).clamp(-1, 1)
        next_qs = nets.target_critic(batch["next_observations"], next_actions)
        next_q = next_qs.min(dim=0).values if cfg.q_agg == "min" else next_qs.mean(dim=0)
        target_q = batch["rewards"] + cfg.discount * batch["masks"] * next_q
    q = nets.critic(obs, actions)
    critic_loss = (q - target_q).pow(2).mean()

    # BC flow matching, L_Flow(theta): regress the velocity x_1 - x_0 at x_t = (1 - t) x_0 + t x_1
    x0, x1, t = noise["x0"], actions, noise["t"]
    x_t = (1 - t) * x0 + t * x1
    bc_flow_loss = (nets.actor_bc_flow(obs, x_t, t) - (x1 - x0)).pow(2).mean()

    # One-step distillation, L_Distill(omega): match the BC flow's action for the same noise; no gradient into the flow
    with torch.no_grad():
        target_flow_actions = flow_actions(nets.actor_bc_flow, obs, noise["z"], cfg.flow_steps)
    onestep_actions = nets.actor_onestep(obs, noise["z"])
    distill_loss = (onestep_actions - target_flow_actions).pow(2).mean()

    # Q term of the one-step policy loss L_pi(omega): maximise Q at the clipped one-step action;
    # the critic's weights get no gradient from it
    policy_actions = onestep_actions.clamp(-1, 1)
    policy_q = with_frozen_params(nets.critic, obs, policy_actions).mean(dim=0)
    q_loss = -policy_q.mean()
    if cfg.normalize_q_loss:
        q_loss = q_loss / policy_q.abs().mean().detach()

    actor_loss = bc_flow_loss + cfg.alpha * distill_loss + q_loss
    if not with_metrics:
        return critic_loss + actor_loss, {}
    metrics = {
        "critic/critic_loss": critic_loss, "critic/q_mean": q.mean(), "critic/q_max": q.max(), "critic/q_min": q.min(),
        "actor/actor_loss": actor_loss, "actor/bc_flow_loss": bc_flow_loss, "actor/distill_loss": distill_loss,
        "actor/q_loss": q_loss, "actor/q": policy_q.mean(),
        # the official code draws separate noise for this diagnostic; the same z is as good a sample
        "actor/mse": (policy_actions - actions).pow(2).mean(),
    }
    return critic_loss + actor_loss, {k: v.detach() for k, v in metrics.items()}


# ----------------------------------------------------------------------------------------------
# Agent: one Adam step on the summed loss, then the Polyak target update
# ----------------------------------------------------------------------------------------------
class FQLAgent:
    def __init__(self, nets: FQLNetworks, cfg: Config):
        self.nets, self.cfg = nets, cfg
        self.observation_shape, self.action_dim = nets.observation_shape, nets.actor_onestep.net[-1].out_features
        on_cuda = torch.device(cfg.device).type == "cuda"
        # fused: one kernel for all parameters; capturable: Adam's step counters live on the GPU,
        # so the whole update can be recorded in a CUDA graph
        self.optimizer = torch.optim.Adam(nets.trainable_parameters(), lr=cfg.lr, fused=True, capturable=on_cuda)
        self.critic_params = list(nets.critic.parameters())
        self.target_params = list(nets.target_critic.parameters())
        # torch.compile fuses the losses' forward and backward; Adam is already one fused kernel
        self.losses = torch.compile(fql_losses) if cfg.compile else fql_losses
        self.sample_actions = self.sample_actions_eager
        if cfg.compile:  # on CUDA, also replayed as a CUDA graph per input shape
            self.sample_actions = torch.compile(self.sample_actions_eager,
                                                mode="reduce-overhead" if on_cuda else "default")

    def update(self, batch: dict, noise: dict, with_metrics: bool = False) -> dict:
        loss, metrics = self.losses(self.nets, batch, noise, self.cfg, with_metrics)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # The official code moves the target towards the critic's parameters from before this step,
        # so the lerp comes before optimizer.step().
        with torch.no_grad():
            torch._foreach_lerp_(self.target_params, self.critic_params, self.cfg.tau)
        self.optimizer.step()
        return metrics

    def train_step(self, sample, with_metrics: bool = False) -> dict:
        """Sample a batch (`sample(batch_size)`) and the noise on the device, then update."""
        noise = draw_noise(self.cfg.batch_size, self.action_dim, self.cfg.device)
        return self.update(sample(self.cfg.batch_size), noise, with_metrics)

    def sample_actions_eager(self, obs: torch.Tensor) -> torch.Tensor:
        """Stochastic policy: mu(s, z) with fresh z ~ N(0, I), clipped to [-1, 1]."""
        batch_shape = obs.shape[: obs.dim() - len(self.observation_shape)]
        z = torch.randn((*batch_shape, self.action_dim), device=obs.device)
        return self.nets.actor_onestep(obs, z).clamp(-1, 1)

    @torch.no_grad()
    def act(self, observations: np.ndarray) -> np.ndarray:
        obs = torch.as_tensor(observations, dtype=torch.float32, device=self.cfg.device)
        return self.sample_actions(obs).cpu().numpy()

    def state_dict(self) -> dict:
        return dict(nets=self.nets.state_dict(), optimizer=self.optimizer.state_dict())

    def load_state_dict(self, state: dict):
        self.nets.load_state_dict(state["nets"])
        self.optimizer.load_state_dict(state["optimizer"])


class CUDAGraphStep:
    """Record `fn` (no arguments) once as a CUDA graph, then replay it: one launch per training step
    instead of hundreds of small kernels. The first call runs `fn` for real (which also compiles it and
    creates Adam's state), the recording does not run it, and every later call replays the recording.
    `fn` must read and write only tensors at fixed addresses: the dataset, parameters, Adam's state."""

    def __init__(self, fn):
        self.fn, self.graph, self.outputs = fn, None, None

    def __call__(self) -> dict:
        if self.graph is not None:
            self.graph.replay()
            return self.outputs
        side_stream = torch.cuda.Stream()  # as PyTorch's docs ask: the eager run before capture on a side stream
        side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side_stream):
            outputs = self.fn()
        torch.cuda.current_stream().wait_stream(side_stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = self.fn()
        return outputs


def make_train_step(agent: FQLAgent, sample):
    """The step the training loop calls: `step(with_metrics) -> metrics`. On CUDA, unless --no_cuda_graph,
    each variant (plain, and with the metrics of log steps) is a CUDA graph recorded once."""
    variants = {m: functools.partial(agent.train_step, sample, m) for m in (False, True)}
    if agent.cfg.cuda_graph and torch.device(agent.cfg.device).type == "cuda":
        variants = {m: CUDAGraphStep(fn) for m, fn in variants.items()}
    return lambda with_metrics: variants[with_metrics]()


# ----------------------------------------------------------------------------------------------
# Checkpoints and logs: nothing written is lost when a run is killed
# ----------------------------------------------------------------------------------------------
# Fields that may change between a killed run and its resumption
RESUMABLE_CHANGES = {"resume", "offline_steps", "online_steps", "log_interval", "eval_interval", "eval_episodes",
                     "save_interval", "device", "compile", "cuda_graph", "wandb_project", "dataset_dir",
                     "benchmark"}


def save_checkpoint(path: str, agent: FQLAgent, step: int, cfg: Config, buffer=None):
    """Write to a temporary file, then rename: a kill mid-write leaves the previous checkpoint intact.
    `buffer`: the fine-tuning replay buffer (eval.ReplayBuffer), whose online transitions travel along."""
    state = dict(agent.state_dict(), step=step, config=dataclasses.asdict(cfg), action_dim=agent.action_dim,
                 observation_shape=agent.observation_shape, buffer=buffer.state_dict() if buffer else None, rng=dict(
                     torch=torch.get_rng_state(), numpy=np.random.get_state(),
                     cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None))
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str, agent: FQLAgent, cfg: Config, buffer=None) -> int:
    """Restore a killed run: networks, optimiser, RNG states and the fine-tuning buffer; returns its step."""
    if not os.path.exists(path):
        raise UsageError(f"--resume: no checkpoint at {path}; start without --resume, or pass the run's --run_dir")
    state = torch.load(path, map_location="cpu", weights_only=False)
    changed = [k for k, v in dataclasses.asdict(cfg).items()
               if k not in RESUMABLE_CHANGES and state["config"].get(k) != v]
    if changed:
        raise UsageError(f"--resume: this command differs from the checkpoint's run in {', '.join(changed)}; "
                         "give the same flags as the original run")
    agent.load_state_dict(state)
    if buffer is not None and state["buffer"] is not None:
        buffer.load_state_dict(state["buffer"])
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"]


class CSVLog:
    """Rows of metrics in a CSV file, rewritten atomically at each row (a few hundred rows per run), so
    columns that appear later (fine-tuning's) widen the file. Rows after `keep_until_step` (written
    after the checkpoint a run resumes from) are dropped."""

    def __init__(self, path: str, keep_until_step: int):
        self.path, self.rows = path, []
        if os.path.exists(path):
            with open(path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= keep_until_step]

    def write(self, row: dict):
        self.rows.append(row)
        fields = list(dict.fromkeys(k for r in self.rows for k in r))
        with open(self.path + ".tmp", "w", newline="") as f:
            writer = csv.DictWriter(f, fields)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(self.path + ".tmp", self.path)


# ----------------------------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------------------------
def train(cfg: Config, init_checkpoint: str | None = None) -> FQLAgent:
    """Offline training, then online fine-tuning if --online_steps. `init_checkpoint` starts from a saved
    agent (networks, optimiser, step) instead of from scratch: eval.py finetune uses it."""
    import eval  # imported here because eval.py builds on this file

    cfg = resolve_config(cfg)
    ckpt_path = os.path.join(cfg.run_dir, "checkpoint.pt")
    if not cfg.resume and os.path.exists(ckpt_path):
        raise UsageError(f"{cfg.run_dir} already holds a run; add --resume to continue it, "
                         "or pass another --run_dir")
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    if cfg.device.startswith("cuda"):
        torch.set_float32_matmul_precision("high")  # TF32 matmuls, as JAX uses by default on GPU

    if cfg.env in envs.D4RL:  # D4RL has no validation split
        env, train_set, val_set = envs.make_env(cfg.env), envs.load_d4rl(cfg.env), None
    else:
        env, train_set, val_set = envs.load_ogbench(cfg.env, cfg.dataset_dir)
    train_data = envs.to_device(train_set, cfg.device)
    val_data = envs.to_device(val_set, cfg.device) if val_set else None
    observation_shape, action_dim = envs.stacked_shape(train_data, cfg.frame_stack), train_data["actions"].shape[1]
    agent = FQLAgent(FQLNetworks(observation_shape, action_dim, cfg).to(cfg.device), cfg)
    offline_step = make_train_step(agent, envs.make_sampler(train_data, cfg.frame_stack, cfg.p_aug))
    buffer = online_step = None
    if cfg.online_steps:  # the official layout: the offline data, then online transitions appended
        if cfg.balanced_sampling:
            buffer = eval.ReplayBuffer({k: v[:0] for k, v in train_data.items()}, cfg.buffer_size)
            online_step = make_train_step(agent, functools.partial(eval.sample_balanced, train_data, buffer))
        else:
            buffer = eval.ReplayBuffer(train_data, cfg.buffer_size)
            online_step = make_train_step(agent, buffer.sample)

    os.makedirs(cfg.run_dir, exist_ok=True)
    with open(os.path.join(cfg.run_dir, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=1)
    start = 0
    if cfg.resume:
        start = load_checkpoint(ckpt_path, agent, cfg, buffer)
    elif init_checkpoint:
        state = torch.load(init_checkpoint, map_location="cpu", weights_only=False)
        agent.load_state_dict(state)
        start = state["step"]
    train_log = CSVLog(os.path.join(cfg.run_dir, "train.csv"), keep_until_step=start)
    eval_log = CSVLog(os.path.join(cfg.run_dir, "eval.csv"), keep_until_step=start)
    wandb = None
    if cfg.wandb_project:
        try:
            import wandb
        except ImportError:
            raise UsageError("--wandb_project needs wandb: pip install wandb") from None
        wandb.init(project=cfg.wandb_project, name=os.path.basename(cfg.run_dir), config=dataclasses.asdict(cfg))
    eval_envs = None
    if cfg.eval_interval:
        eval_envs = envs.make_vector_env(cfg.env, min(cfg.eval_episodes, os.cpu_count()), cfg.frame_stack)
    collector = None

    total_steps = cfg.offline_steps + cfg.online_steps
    print(f"FQL on {cfg.env}: {len(train_data['actions'])} rows, observation {observation_shape}, action "
          f"{action_dim}, alpha {cfg.alpha}, device {cfg.device}, compile {cfg.compile}, run dir {cfg.run_dir}")
    progress = tqdm(range(start + 1, total_steps + 1), initial=start, total=total_steps, unit="update",
                    smoothing=0.05)
    last_time, last_step = time.time(), start
    for step in progress:
        log_now = step % cfg.log_interval == 0
        if step <= cfg.offline_steps:
            metrics = offline_step(with_metrics=log_now)
        else:  # fine-tuning: one environment step, then one update on the growing buffer
            if collector is None:
                # the official code shifts D4RL antmaze rewards online as it does offline
                reward_shift = -1.0 if cfg.env in envs.D4RL and cfg.env.startswith("antmaze") else 0.0
                collector = eval.OnlineCollector(env, seed=cfg.seed + step, reward_shift=reward_shift)
            collector.step(agent.act, buffer)
            metrics = online_step(with_metrics=log_now)

        if log_now:  # the only host synchronisation between steps
            row = {"step": step, **{k: v.item() for k, v in metrics.items()}}
            if val_data is not None:
                with torch.no_grad():
                    val_batch = envs.make_sampler(val_data, cfg.frame_stack, p_aug=0)(cfg.batch_size)
                    val_noise = draw_noise(cfg.batch_size, action_dim, cfg.device)
                    _, val_metrics = fql_losses(agent.nets, val_batch, val_noise, cfg, with_metrics=True)
                row.update({f"validation/{k}": v.item() for k, v in val_metrics.items()})
            if collector is not None:
                row.update(collector.last_episode, **{"exploration/buffer_size": buffer.count})
            row["time/updates_per_sec"] = (step - last_step) / (time.time() - last_time)
            last_time, last_step = time.time(), step
            if not all(math.isfinite(v) for v in row.values()):
                progress.write(f"warning: non-finite metrics at step {step}")
            train_log.write(row)
            progress.set_postfix(critic=f"{row['critic/critic_loss']:.3g}", bc=f"{row['actor/bc_flow_loss']:.3g}")
            if wandb:
                wandb.log(row, step=step)

        if eval_envs and (step % cfg.eval_interval == 0 or step == total_steps):
            result = envs.with_score(cfg.env, eval.evaluate_parallel(agent.act, eval_envs, cfg.eval_episodes,
                                                                     seed=cfg.seed + step))
            eval_log.write({"step": step, **{f"evaluation/{k}": v for k, v in result.items()}})
            progress.write(f"step {step}: success {result['success']:.3f}, return {result['return']:.1f}")
            if wandb:
                wandb.log({f"evaluation/{k}": v for k, v in result.items()}, step=step)
            last_time = time.time()  # evaluation time does not count against updates/s

        if step % cfg.save_interval == 0 or step == total_steps:
            save_checkpoint(ckpt_path, agent, step, cfg, buffer if step > cfg.offline_steps else None)
    progress.close()
    if eval_envs:
        eval_envs.close()
    return agent


def main(argv: list[str] | None = None):
    cfg = tyro.cli(Config, args=argv, use_underscores=True, description=__doc__.split("\n")[0])
    try:
        if cfg.benchmark:
            import eval  # the benchmark lives with the other tools around training

            return eval.benchmark(cfg)
        return train(cfg)
    except UsageError as err:
        sys.exit(f"fql.py: error: {err}")


if __name__ == "__main__":
    main()
