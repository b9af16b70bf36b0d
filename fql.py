"""Flow Q-Learning (FQL) in one PyTorch file: the whole training side, from the datasets to the loop.

Paper: Park, Li, Levine. "Flow Q-Learning", ICML 2025. https://arxiv.org/abs/2502.02538
Official JAX code (whose numbers are the paper's): https://github.com/seohongpark/fql

FQL trains from one summed loss a BC flow policy v(s, x_t, t) (flow matching on the dataset actions), a one-step
policy mu(s, z) (distilled from the flow, pushed up the critic) and a two-member critic Q(s, a) (TD learning).

Examples:
  python fql.py --env ogbench-cube-single --seeds 0 1 2 3  # alpha 300, task2, 1M steps, 4 seeds at once
  python fql.py --env d4rl-antmaze-large-play              # D4RL from its hdf5 files, 500K steps
  python fql.py --env ogbench-visual-cube-single           # pixels: IMPALA encoders, 3 frames, shifts
  python fql.py --env ogbench-cube-double --online_steps 1000000   # then offline-to-online fine-tuning
  python fql.py --env ogbench-cube-single --resume          # continue a killed run
  python fql.py --benchmark                                # updates/s of the training step
It imports numpy, torch, tyro and tqdm at the top (ogbench and h5py where datasets are read), so it can be
copied alone; eval.py, with the environments, evaluation and fine-tuning, builds on it.
"""
import copy
import csv
import dataclasses
import functools
import json
import math
import os
import re
import shutil
import socket
import sys
import time
import urllib.request
import zipfile
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
import tyro
from torch import nn
from tqdm import tqdm


class UsageError(ValueError):
    """Bad input, or a run that cannot go on: reported as one line, without a traceback."""


# ---- Config --------------------------------------------------------------------------------------
@dataclass
class Config:
    env: str = "ogbench-cube-single"
    """ogbench-<env>[-task<N>], an OGBench name (cube-single-play-singletask-task2-v0), d4rl-<dataset> or a D4RL name"""
    seed: int | None = None
    """seed of the networks, batches, noise and evaluation episodes; the same as --seeds N (default 0)"""
    seeds: tuple[int, ...] | None = None
    """one independent agent per seed, trained as one batched computation; each equals its --seed N run alone"""
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
    """image encoder of each network; default: impala_small for visual-* envs (impala_debug: tiny, for CPU checks)"""
    frame_stack: int | None = None
    """pixel observations stack this many latest frames along the channels; default: 3 for visual-* envs"""
    p_aug: float | None = None
    """probability that a batch of pixel observations is randomly shifted (pad 3, crop); default: 0.5 for visual-*"""
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
    """folder of train.csv, eval.csv, checkpoint.pt; default: runs/<env>__seed<seed>; a group: <run_dir>/seed<seed>"""
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
    """print the training step's updates/s in each mode, one seed and the --seeds group, on random data; then exit"""


# ---- Env names and per-env defaults (the paper's hyperparameter tables; the official README) -----
DEFAULTS = dict(alpha=10.0, discount=0.99, q_agg="mean", offline_steps=1_000_000)  # the official agent's

# alias: (OGBench dataset, default task, alpha, extra flags)
ENVS = {
    "antmaze-large": ("antmaze-large-navigate", 1, 10, dict(q_agg="min")),
    "antmaze-giant": ("antmaze-giant-navigate", 1, 10, dict(discount=0.995, q_agg="min")),
    "humanoidmaze-medium": ("humanoidmaze-medium-navigate", 1, 30, dict(discount=0.995)),
    "humanoidmaze-large": ("humanoidmaze-large-navigate", 1, 30, dict(discount=0.995)),
    "antsoccer-arena": ("antsoccer-arena-navigate", 4, 10, dict(discount=0.995)),
    "cube-single": ("cube-single-play", 2, 300, {}),
    "cube-double": ("cube-double-play", 2, 300, {}),
    "scene": ("scene-play", 2, 300, {}),
    "puzzle-3x3": ("puzzle-3x3-play", 4, 1000, {}),
    "puzzle-4x4": ("puzzle-4x4-play", 4, 1000, {}),
    **{f"visual-{env}": (f"visual-{env}-play", 1, alpha, dict(encoder="impala_small", frame_stack=3, p_aug=0.5,
                                                               offline_steps=500_000))
       for env, alpha in {"cube-single": 300, "cube-double": 100, "scene": 100, "puzzle-3x3": 300,
                          "puzzle-4x4": 300}.items()},
}

# D4RL: name -> (d4rl's file name, alpha, extra flags); the official README's settings, 500K steps
D4RL_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl/"
ANTMAZE_FILE = "ant_maze_v2/Ant_maze_{}_noisy_multistart_{}_multigoal_{}_sparse_fixed.hdf5"
D4RL = {
    "antmaze-umaze-v2": (ANTMAZE_FILE.format("u-maze", False, False), 10, {}),
    "antmaze-umaze-diverse-v2": (ANTMAZE_FILE.format("u-maze", True, True), 10, {}),
    "antmaze-medium-play-v2": (ANTMAZE_FILE.format("big-maze", True, False), 10, {}),
    "antmaze-medium-diverse-v2": (ANTMAZE_FILE.format("big-maze", True, True), 10, {}),
    "antmaze-large-play-v2": (ANTMAZE_FILE.format("hardest-maze", True, False), 3, {}),
    "antmaze-large-diverse-v2": (ANTMAZE_FILE.format("hardest-maze", True, True), 3, {}),
    **{f"{task}-{kind}-v1": (f"hand_dapg_v1/{task}-{kind}-v1.hdf5", alpha, dict(q_agg="min"))
       for task, alphas in dict(pen=(10000, 10000, 3000), door=(30000, 30000, 30000),
                                hammer=(30000, 10000, 30000), relocate=(10000, 30000, 30000)).items()
       for kind, alpha in zip(("human", "cloned", "expert"), alphas, strict=True)},
}


def resolve_env(name: str) -> tuple[str, dict]:
    """Map a user's env name to (full OGBench single-task or D4RL name, per-env defaults)."""
    for d4rl_name, (_, alpha, extra) in D4RL.items():
        if name in (d4rl_name, "d4rl-" + d4rl_name.rsplit("-", 1)[0]):
            return d4rl_name, dict(alpha=alpha, offline_steps=500_000, **extra)
    alias = re.fullmatch(r"ogbench-(.+?)(?:-task(\d+))?", name)
    if alias and alias[1] in ENVS:
        dataset, default_task, alpha, extra = ENVS[alias[1]]
        name = f"{dataset}-singletask-task{alias[2] or default_task}-v0"
    full = re.fullmatch(r"(.+)-(\w+)-singletask(?:-task(\d+))?-v0", name)
    if full and full[3] and not 1 <= int(full[3]) <= 5:
        raise UsageError(f"{name}: OGBench single-task envs have tasks 1 to 5")
    if full:
        for dataset, _, alpha, extra in ENVS.values():
            if dataset == f"{full[1]}-{full[2]}":
                return name, dict(alpha=alpha, **extra)
        import gymnasium
        import ogbench  # noqa: F401  (registers OGBench's environments with gymnasium)
        if f"{full[1]}-singletask{'-task' + full[3] if full[3] else ''}-v0" in gymnasium.registry:
            return name, {}  # another OGBench dataset: the official defaults
    raise UsageError(f"unknown env {name!r}. Valid: {', '.join(f'ogbench-{a}' for a in ENVS)} (add -task1..-task5 "
                     "for another task), a full OGBench single-task name such as cube-single-play-singletask-task2-v0, "
                     f"or {', '.join('d4rl-' + n.rsplit('-', 1)[0] for n in D4RL)}")


def resolve_config(cfg: Config) -> Config:
    """Fill the per-environment defaults the user did not set, then check the config."""
    env_name, env_defaults = resolve_env(cfg.env)
    filled = {k: v if getattr(cfg, k) is None else getattr(cfg, k) for k, v in {**DEFAULTS, **env_defaults}.items()}
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    gpus = torch.cuda.device_count()
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device) or device != "cpu" and (torch.device(device).index or 0) >= gpus:
        raise UsageError(f"--device {device}: give auto, cpu, or cuda[:N] for one of this machine's {gpus} CUDA GPUs")
    if cfg.seed is not None and cfg.seeds and cfg.seed != cfg.seeds[0]:
        raise UsageError("give --seed N or --seeds N1 N2 ..., not both")
    seeds = tuple(cfg.seeds or (cfg.seed or 0,))
    if len(set(seeds)) < len(seeds):
        raise UsageError(f"--seeds has a seed twice: {' '.join(map(str, seeds))}")
    run_dir = os.path.normpath(cfg.run_dir or os.path.join("runs", f"{cfg.env}__seed{{seed}}"))
    if len(seeds) > 1 and "{seed}" not in run_dir:
        run_dir = os.path.join(run_dir, "seed{seed}")  # a group's runs: one folder per seed
    run_dir = run_dir.replace("{seed}", str(seeds[0])) if len(seeds) == 1 else run_dir
    cfg = dataclasses.replace(cfg, env=env_name, device=device, run_dir=run_dir, seed=seeds[0], seeds=seeds, **filled)
    rules = {"positive": (lambda v: v > 0, "buffer_size batch_size flow_steps log_interval save_interval lr "
                                           "eval_episodes"),
             ">= 0": (lambda v: v >= 0, "offline_steps online_steps eval_interval alpha"),
             "in [0, 1]": (lambda v: 0 <= v <= 1, "discount p_aug"), "in (0, 1]": (lambda v: 0 < v <= 1, "tau")}
    for allowed, (valid, names) in rules.items():
        for name in names.split():
            value = getattr(cfg, name)
            if value is not None and not (math.isfinite(value) and valid(value)):  # nan fails every comparison
                raise UsageError(f"--{name} must be {allowed}, got {value}")
    if cfg.offline_steps + cfg.online_steps == 0:
        raise UsageError("nothing to train: --offline_steps and --online_steps are both 0")
    pixels = cfg.env.startswith("visual-")
    if not pixels and (cfg.encoder or cfg.frame_stack or cfg.p_aug is not None):
        raise UsageError(f"--encoder, --frame_stack and --p_aug are for pixel (visual-*) envs; {cfg.env} has states")
    if pixels and not (cfg.encoder and cfg.frame_stack and cfg.frame_stack >= 1):
        raise UsageError(f"{cfg.env} has pixel observations: give --encoder and --frame_stack >= 1")
    if pixels and cfg.online_steps:
        raise UsageError("fine-tuning on pixels is not supported: its buffer would hold stacked frames per step")
    if len(seeds) > 1 and (cfg.online_steps or cfg.wandb_project):
        raise UsageError("--online_steps and --wandb_project take one seed; fine-tune each seed's run with "
                         "eval.py finetune, or log one --seed per run")
    return cfg


def seed_config(cfg: Config, seed: int) -> Config:  # a seed's run in a group: the config `--seed seed` gives alone
    return dataclasses.replace(cfg, seed=seed, seeds=(seed,), run_dir=cfg.run_dir.replace("{seed}", str(seed)))


# ---- Datasets: OGBench and D4RL, moved to the device once; batches are sampled there -------------
def load_datasets(env_name: str, dataset_dir: str) -> tuple[dict, dict | None]:
    """(train, validation) transitions, rewards and masks for the env's task (D4RL: no validation); downloads."""
    if env_name in D4RL:
        return load_d4rl(env_name), None
    import ogbench
    splits, dataset_dir = env_name.split("-"), os.path.expanduser(dataset_dir)
    dataset_name = "-".join(splits[: splits.index("singletask")] + splits[-1:])
    files = [os.path.join(dataset_dir, f"{dataset_name}{split}.npz") for split in ("", "-val")]
    missing, timeout = not all(map(os.path.exists, files)), socket.getdefaulttimeout()
    socket.setdefaulttimeout(60)  # a blocked network should fail, not hang forever
    try:  # downloads missing files; pixel datasets stay compact (each frame once, s' = the next row)
        env, train, val = ogbench.make_env_and_datasets(env_name, dataset_dir=dataset_dir,
                                                        compact_dataset=env_name.startswith("visual-"))
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
        if missing:
            raise UsageError(f"dataset files {files[0]} and {files[1]} are missing and could not be downloaded "
                             f"({err}). Copy them there, or pass --dataset_dir DIR.") from None
        broken = [file for file in files if not zipfile.is_zipfile(file)] or files
        raise UsageError(f"{' or '.join(broken)} is not a readable OGBench dataset ({type(err).__name__}; an "
                         "interrupted download?): delete it to download it again, or copy a whole one there") from None
    finally:
        socket.setdefaulttimeout(timeout)
    env.close()  # it relabelled the rewards for its task; eval.py makes its own environments
    return train, val


def load_d4rl(name: str) -> dict:
    """A D4RL dataset from d4rl's hdf5 file, converted as d4rl.qlearning_dataset, then as the official FQL code."""
    import h5py
    directory = os.path.expanduser(os.environ.get("D4RL_DATASET_DIR", "~/.d4rl/datasets"))
    url = D4RL_URL + D4RL[name][0]
    path = os.path.join(directory, os.path.basename(url))
    if not os.path.exists(path):
        try:
            os.makedirs(directory, exist_ok=True)
            print(f"downloading {url}")
            with urllib.request.urlopen(url, timeout=60) as response, open(path + ".tmp", "wb") as f:
                shutil.copyfileobj(response, f)
            os.replace(path + ".tmp", path)
        except OSError as err:
            raise UsageError(f"D4RL file {os.path.basename(path)} is not in {directory} and could not be downloaded "
                             f"({err}). Download {url} into that folder (or set D4RL_DATASET_DIR).") from None
    try:
        with h5py.File(path, "r") as f:
            if "timeouts" not in f:
                raise UsageError(f"{path} has no 'timeouts'; the D4RL v2 antmaze and v1 adroit files have them")
            observations, actions = f["observations"][:].astype(np.float32), f["actions"][:].astype(np.float32)
            rewards, dones, timeouts = f["rewards"][:].astype(np.float32), f["terminals"][:], f["timeouts"][:]
    except (OSError, KeyError) as err:
        raise UsageError(f"{path} is not a readable D4RL file ({err}): delete it to download it again, or copy "
                         "a whole one there") from None

    # d4rl.qlearning_dataset: transition i goes to i + 1; the last step of a timed-out episode is dropped
    keep = ~timeouts[:-1].astype(bool)
    dataset = dict(observations=observations[:-1][keep], actions=actions[:-1][keep], rewards=rewards[:-1][keep],
                   next_observations=observations[1:][keep], masks=1.0 - dones[:-1][keep].astype(np.float32))
    # Official FQL: an episode ends where the next transition does not start from this one's next
    # observation (or, for adroit, at a terminal); antmaze rewards shift from {0, 1} to {-1, 0}
    breaks = np.linalg.norm(dataset["observations"][1:] - dataset["next_observations"][:-1], axis=-1) > 1e-6
    if not name.startswith("antmaze"):
        breaks |= dones[:-1][keep][:-1].astype(bool)
    dataset["terminals"] = np.append(breaks, True).astype(np.float32)
    if name.startswith("antmaze"):
        dataset["rewards"] = dataset["rewards"] - 1.0
    return dataset


def to_device(dataset: dict, device) -> dict:
    """What the update needs, on the device: float32 transitions; for compact pixels, uint8 frames and row indices."""
    keys = ("actions", "rewards", "masks") + (("observations", "next_observations") if "valids" not in dataset else ())
    data = {k: torch.as_tensor(np.asarray(dataset[k], dtype=np.float32), device=device) for k in keys}
    data["actions"] = data["actions"].clamp(-1 + 1e-5, 1 - 1e-5)  # so the flow never has to reach exactly +-1
    if "valids" in dataset:
        rows = np.arange(len(dataset["valids"]))
        starts = np.concatenate([[True], dataset["valids"][:-1] == 0])  # a row after an episode's last frame
        data["observations"] = torch.as_tensor(dataset["observations"], device=device)  # uint8, not copied again
        data["valid_rows"] = torch.as_tensor(np.flatnonzero(dataset["valids"]), device=device)
        data["episode_start"] = torch.as_tensor(np.maximum.accumulate(np.where(starts, rows, 0)), device=device)
    return data


def sample_batch(data: dict, batch_size: int, generators: list = (None,)) -> dict:
    """Uniform transitions, a batch per generator (a seed's) stacked along a leading seed dimension: each seed draws its
    own indices, then one gather per array on the device serves every seed (no host-to-device copy per step)."""
    n, device = data["observations"].shape[0], data["observations"].device
    idx = torch.stack([torch.randint(n, (batch_size,), device=device, generator=g) for g in generators])
    return {k: v[idx] for k, v in data.items()}


def sample_pixels(data: dict, batch_size: int, generators: list = (None,), *, frame_stack: int, p_aug: float) -> dict:
    """sample_batch for a compact pixel dataset: s stacks the frame_stack latest frames (oldest first along the
    channels, the episode's first frame repeated before it starts), s' the same one row later; randomly shifted."""
    rows = torch.stack([torch.randint(len(data["valid_rows"]), (batch_size,), device=data["actions"].device,
                                      generator=g) for g in generators])
    idx = data["valid_rows"][rows]
    start = data["episode_start"][idx]
    batch = {k: data[k][idx] for k in ("actions", "rewards", "masks")}
    for key, last in (("observations", idx), ("next_observations", idx + 1)):
        frames = [data["observations"][torch.maximum(last - k, start)] for k in reversed(range(frame_stack))]
        batch[key] = torch.cat(frames, dim=-1)
    if p_aug:
        batch["observations"], batch["next_observations"] = random_shift(
            batch["observations"], batch["next_observations"], p_aug, generators)
    return batch


def random_shift(observations: torch.Tensor, next_observations: torch.Tensor, p_aug: float,
                 generators: list = (None,), pad: int = 3):
    """With probability p_aug (per seed and update), shift each image of (seed, sample, H, W, C) batches by up to `pad`
    pixels (edge padding, crop), s and s' alike, each sample its own way; both branches run, so a CUDA graph holds."""
    (seeds, batch, height, width), device = observations.shape[:4], observations.device
    offsets = torch.stack([torch.randint(0, 2 * pad + 1, (batch, 2), device=device, generator=g) for g in generators])
    apply = torch.stack([torch.rand((), device=device, generator=g) for g in generators]) < p_aug
    rows = (torch.arange(height, device=device) + offsets[..., :1] - pad).clamp(0, height - 1)[..., :, None]
    cols = (torch.arange(width, device=device) + offsets[..., 1:] - pad).clamp(0, width - 1)[..., None, :]
    seed = torch.arange(seeds, device=device)[:, None, None, None]
    sample = torch.arange(batch, device=device)[:, None, None]
    return [torch.where(apply[:, None, None, None, None], images[seed, sample, rows, cols], images)
            for images in (observations, next_observations)]


def stacked_shape(data: dict, frame_stack: int | None) -> tuple[int, ...]:  # an observation as the networks see it
    shape = tuple(data["observations"].shape[1:])
    return (*shape[:-1], shape[-1] * frame_stack) if "valid_rows" in data else shape


def make_sampler(data: dict, frame_stack: int | None = None, p_aug: float | None = None):
    """`sample(batch_size, generators) -> batches` for the dataset's layout (frame_stack and p_aug: pixels only)."""
    if "valid_rows" in data:
        return functools.partial(sample_pixels, data, frame_stack=frame_stack, p_aug=p_aug)
    return functools.partial(sample_batch, data)


# ---- Networks ------------------------------------------------------------------------------------
class Dense(nn.Module):
    """flax's Dense: x @ weight + bias, weight (in, out), Xavier-uniform (the official code's initialisation); with
    `members`, that many independent layers as one batched matmul. In this layout the gradient x^T g comes in the
    weight's own layout (an nn.Linear weight, (out, in), gets a transposed one under vmap: a copy at each step)."""

    def __init__(self, in_dim: int, out_dim: int, members: int | None = None):
        super().__init__()
        bound, leading = math.sqrt(6 / (in_dim + out_dim)), (members,) if members else ()
        self.weight = nn.Parameter(torch.empty(*leading, in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(members, 1, out_dim) if members else torch.zeros(out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, in) or (members, batch, in) -> (members?, batch, out)
        return x @ self.weight + self.bias


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
    """The official IMPALA encoder: uint8 images (..., H, W, C) in [0, 1], ResNet stacks, ReLU, Dense -> GELU."""

    SIZES = {"impala_small": ((16, 32, 32), 1), "impala_debug": ((4, 4), 1)}  # stack widths, blocks each

    def __init__(self, image_shape: tuple[int, ...], kind: str, features: int = 512):
        super().__init__()
        (widths, blocks), (height, width, channels) = self.SIZES[kind], image_shape
        self.stacks = nn.Sequential(*(ResnetStack(a, b, blocks) for a, b in zip((channels, *widths), widths)))
        self.head = Dense(self.stacks(torch.zeros(1, channels, height, width)).numel(), features)  # flattened
        for conv in self.modules():  # flax's initialisation in the official code
            if isinstance(conv, nn.Conv2d):
                nn.init.xavier_uniform_(conv.weight)
                nn.init.zeros_(conv.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (..., H, W, C) -> (..., features)
        x = images.reshape(-1, *images.shape[-3:]).float().div(255).movedim(-1, 1)
        x = F.relu(self.stacks(x)).flatten(1)
        return F.gelu(self.head(x), approximate="tanh").reshape(*images.shape[:-3], -1)


class MLP(nn.Module):
    """Hidden layers Dense -> GELU (tanh form, flax's nn.gelu), then a Dense output: the official actors' MLP. The
    observation, the first input, goes through `encoder` first, unless it comes `encoded` already."""

    def __init__(self, in_dim: int, hidden_dims: tuple[int, ...], out_dim: int, encoder: nn.Module):
        super().__init__()
        self.encoder, layers, dim = encoder, [], in_dim
        for width in hidden_dims:
            layers += [Dense(dim, width), nn.GELU(approximate="tanh")]
            dim = width
        self.net = nn.Sequential(*layers, Dense(dim, out_dim))

    def forward(self, obs: torch.Tensor, *inputs: torch.Tensor, encoded: bool = False) -> torch.Tensor:
        return self.net(torch.cat([obs if encoded else self.encoder(obs), *inputs], dim=-1))


class EnsembleLayerNorm(nn.Module):
    """LayerNorm (eps 1e-6) with its own scale and shift per member, as flax's vmapped LayerNorm."""

    def __init__(self, members: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(members, 1, dim))
        self.bias = nn.Parameter(torch.zeros(members, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], eps=1e-6) * self.weight + self.bias


class Critic(nn.Module):
    """Two Q(s, a) members with independent weights, as one batched matmul per layer; hidden layers Dense -> GELU ->
    LayerNorm. With an encoder, both members read the same encoded observation, as in the official code."""

    def __init__(self, in_dim: int, hidden_dims: tuple[int, ...], encoder: nn.Module, members: int = 2):
        super().__init__()
        self.encoder, layers, dim = encoder, [], in_dim
        for width in hidden_dims:
            layers += [Dense(dim, width, members), nn.GELU("tanh"), EnsembleLayerNorm(members, width)]
            dim = width
        self.net = nn.Sequential(*layers, Dense(dim, 1, members))

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([self.encoder(obs), actions], dim=-1)).squeeze(-1)  # (members, batch)


class FQLNetworks(nn.Module):
    """The critic and its target, the BC flow and the one-step policy; each with its own encoder for pixels."""

    def __init__(self, observation_shape: tuple[int, ...], action_dim: int, cfg: Config):
        super().__init__()
        self.observation_shape = tuple(observation_shape)
        dim = 512 if cfg.encoder else observation_shape[0]  # an IMPALA encoder's features, or the state vector
        encoders = [ImpalaEncoder(observation_shape, cfg.encoder) if cfg.encoder else nn.Identity() for _ in range(3)]
        self.critic = Critic(dim + action_dim, cfg.value_hidden_dims, encoders[0])
        self.target_critic = copy.deepcopy(self.critic).requires_grad_(False)
        # v(s, x_t, t): t enters as a raw scalar column, as in the official code
        self.actor_bc_flow = MLP(dim + action_dim + 1, cfg.actor_hidden_dims, action_dim, encoders[1])
        # mu(s, z): one network call maps noise to an action
        self.actor_onestep = MLP(dim + action_dim, cfg.actor_hidden_dims, action_dim, encoders[2])

    def forward(self, batch: dict, noise: dict, cfg: Config, with_metrics: bool = False):
        """fql_losses of these networks: the call torch.func.functional_call makes with a seed's parameters."""
        return fql_losses(self, batch, noise, cfg, with_metrics)


def flow_actions(actor_bc_flow: nn.Module, obs: torch.Tensor, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """Euler-integrate the BC flow from x_0 = noise over t = 0, 1/steps, ..., then clip to [-1, 1]."""
    features, x = actor_bc_flow.encoder(obs), noise  # the observation is encoded once, as the official code
    for i in range(steps):
        t = torch.full_like(x[..., :1], i / steps)
        x = x + actor_bc_flow(features, x, t, encoded=True) / steps
    return x.clamp(-1, 1)


# ---- Losses (paper Section 4 and Algorithm 1) ----------------------------------------------------
def draw_noise(batch_size: int, action_dim: int, device, generator: torch.Generator | None = None) -> dict:
    """All random draws of one update, in one place, so tests can fix them."""
    normal = torch.randn((3, batch_size, action_dim), device=device, generator=generator)  # one kernel for three
    return dict(
        x0=normal[0],  # BC flow: source sample
        t=torch.rand((batch_size, 1), device=device, generator=generator),  # BC flow: time, per sample
        z=normal[1],  # one-step policy noise for distillation and Q term
        z_next=normal[2],  # one-step policy noise for the next actions a'
    )


def fql_losses(nets: FQLNetworks, batch: dict, noise: dict, cfg: Config, with_metrics: bool = False):
    """(critic loss + actor loss, metrics with the official keys, at log steps only). All randomness is in `noise`."""
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

    # Q term of the one-step policy loss L_pi(omega): maximise Q at the clipped one-step action. The critic's weights
    # are detached: gradients reach the actions, never the critic (the official code omits its `grad_params`)
    policy_actions = onestep_actions.clamp(-1, 1)
    frozen_critic = {name: p.detach() for name, p in nets.critic.named_parameters()}
    policy_q = torch.func.functional_call(nets.critic, frozen_critic, (obs, policy_actions)).mean(dim=0)
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


# ---- Agent: one Adam step on the summed loss, then the Polyak target update -------------------------
# A group of seeds trains as one batched computation: each parameter is stored once for all seeds, stacked
# along a leading seed dimension, and torch.vmap maps fql_losses, written for one agent, over it; one Adam
# and, on CUDA, one CUDA graph update every seed. Adam, the Polyak update and every loss are per element or
# per seed, so a group follows its separate trainings exactly.
class FQLAgent:
    """`nets`: an FQLNetworks, or a list of them (a seed group, whose batches, noise, observations, actions and metrics
    have a leading seed dimension). `generators`: each seed's, for its batches and noise (default: new ones)."""

    def __init__(self, nets: FQLNetworks | list, cfg: Config, generators: list | None = None):
        self.grouped = isinstance(nets, list)
        self.seed_nets, self.cfg = nets if self.grouped else [nets], cfg
        self.nets = self.seed_nets[0]  # a single agent's networks (a group's first seed)
        self.generators = generators or [torch.Generator(cfg.device).manual_seed(int(torch.randint(2**62, ())))
                                         for _ in self.seed_nets]
        self.action_dim = self.nets.actor_onestep.net[-1].weight.shape[-1]
        self.params = stack_parameters(self.seed_nets)
        self.critic_params = [p for name, p in self.params.items() if name.startswith("critic.")]
        self.target_params = [p for name, p in self.params.items() if name.startswith("target_critic.")]
        on_cuda = cfg.device.startswith("cuda")
        # fused: one kernel for all parameters; capturable: step counters on the GPU, so a CUDA graph can hold Adam
        self.optimizer = torch.optim.Adam([p for p in self.params.values() if p.requires_grad], lr=cfg.lr,
                                          fused=True, capturable=on_cuda)
        # torch.compile fuses the losses' forward and backward; shapes and config numbers are fixed for a run
        self.losses = torch.compile(self.losses_eager, dynamic=False) if cfg.compile else self.losses_eager
        self.policy = (torch.compile(self.policy_eager, dynamic=False, mode="reduce-overhead" if on_cuda else None)
                       if cfg.compile else self.policy_eager)  # reduce-overhead: replayed as a CUDA graph

    def losses_eager(self, batch: dict, noise: dict, with_metrics: bool = False):
        """The sum of every seed's loss, and each seed's metrics: fql_losses mapped over the seeds."""
        def seed_losses(seed_params, seed_batch, seed_noise):
            return torch.func.functional_call(self.nets, seed_params, (seed_batch, seed_noise, self.cfg, with_metrics))
        inputs_dim = 0 if self.grouped else None  # a single agent's batch and noise have no seed dimension
        losses, metrics = torch.vmap(seed_losses, in_dims=(0, inputs_dim, inputs_dim))(self.params, batch, noise)
        return losses.sum(), metrics

    def update(self, batch: dict, noise: dict, with_metrics: bool = False) -> dict:
        loss, metrics = self.losses(batch, noise, with_metrics)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # the official code moves the target towards the critic from before this step: the lerp comes first
        with torch.no_grad():
            torch._foreach_lerp_(self.target_params, self.critic_params, self.cfg.tau)
        self.optimizer.step()
        return metrics if self.grouped else {k: v[0] for k, v in metrics.items()}

    def draw(self, sample) -> tuple[dict, dict]:
        """(batch, noise) of one update, each seed's from its own generator (`sample(batch_size, generators)`)."""
        batch = sample(self.cfg.batch_size, self.generators)  # every seed's at once: a few kernels, not a few per seed
        noises = [draw_noise(self.cfg.batch_size, self.action_dim, self.cfg.device, g) for g in self.generators]
        if not self.grouped:
            return {k: v[0] for k, v in batch.items()}, noises[0]
        return batch, {k: torch.stack([noise[k] for noise in noises]) for k in noises[0]}

    def train_step(self, sample, with_metrics: bool = False) -> dict:
        return self.update(*self.draw(sample), with_metrics)

    def policy_eager(self, obs: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """mu(s, z) clipped to [-1, 1]; a group maps each seed's observations through its own policy."""
        if self.grouped:
            return torch.stack([nets.actor_onestep(o, n) for nets, o, n in zip(self.seed_nets, obs, z)]).clamp(-1, 1)
        return self.nets.actor_onestep(obs, z).clamp(-1, 1)

    @torch.no_grad()
    def act(self, observations: np.ndarray) -> np.ndarray:
        """The stochastic policy: fresh z ~ N(0, I), drawn outside the compiled policy so both act alike."""
        obs = torch.as_tensor(observations, dtype=torch.float32, device=self.cfg.device)
        z = torch.randn((*obs.shape[:-len(self.nets.observation_shape)], self.action_dim), device=obs.device)
        return self.policy(obs, z).cpu().numpy()

    def state_dict(self, seed_index: int = 0) -> dict:
        """One seed's networks and Adam state, as a single agent's (copies: a view saves the group's storage)."""
        optimizer = self.optimizer.state_dict()
        optimizer["state"] = {i: {k: (v if k == "step" else v[seed_index]).clone() for k, v in state.items()}
                              for i, state in optimizer["state"].items()}
        return dict(nets={k: v.clone() for k, v in self.seed_nets[seed_index].state_dict().items()},
                    optimizer=optimizer)

    def load_state_dict(self, state: dict, seed_index: int = 0):
        """Restore one seed; Adam's own flags (fused, capturable) stay those of this agent's device."""
        try:
            self.seed_nets[seed_index].load_state_dict(state["nets"])
        except RuntimeError:  # shapes that differ: the checkpoint's config built these networks
            raise UsageError("the checkpoint's networks do not fit this fql.py's: an fql.py from before 2026-11-26 "
                             "stored its actors' weights as (out, in); use that version with it") from None
        params = self.optimizer.param_groups[0]["params"]
        for i, saved in state["optimizer"]["state"].items():  # empty before the first update
            current = self.optimizer.state[params[i]]
            if not current:  # a new agent: Adam's state as its first step would create it
                current.update(step=torch.zeros((), device=params[i].device), exp_avg=torch.zeros_like(params[i]),
                               exp_avg_sq=torch.zeros_like(params[i]))
            current["step"].copy_(saved["step"])
            for moment in ("exp_avg", "exp_avg_sq"):
                current[moment][seed_index] = saved[moment]


def stack_parameters(seed_nets: list) -> dict:
    """{name: the seeds' parameters stacked}; each seed's module then holds views of its slices, always current."""
    params = {}
    for name, first in seed_nets[0].named_parameters():
        params[name] = nn.Parameter(torch.stack([nets.get_parameter(name).detach() for nets in seed_nets]),
                                    requires_grad=first.requires_grad)
        module_name, _, param_name = name.rpartition(".")
        for seed, nets in enumerate(seed_nets):
            setattr(nets.get_submodule(module_name), param_name,
                    nn.Parameter(params[name].detach()[seed], requires_grad=first.requires_grad))
    return params


def make_agent(cfg: Config, observation_shape: tuple[int, ...], action_dim: int) -> FQLAgent:
    """An agent for cfg.seeds; each seed's networks and generator come from its own stream, as with `--seed` alone."""
    seed_nets, generators = [], []
    for seed in cfg.seeds:
        torch.manual_seed(seed)
        seed_nets.append(FQLNetworks(observation_shape, action_dim, cfg).to(cfg.device))
        generators.append(torch.Generator(cfg.device).manual_seed(int(torch.randint(2**62, ()))))
    return FQLAgent(seed_nets if len(seed_nets) > 1 else seed_nets[0], cfg, generators)


class CUDAGraphStep:
    """Record `fn` once as a CUDA graph, then replay it: one launch per step instead of hundreds of kernels. The first
    call runs `fn` for real (compiling it, creating Adam's state); `generators` advance at each replay."""

    def __init__(self, fn, generators: list):
        self.fn, self.generators, self.graph, self.outputs = fn, generators, None, None

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
        for generator in self.generators:
            self.graph.register_generator_state(generator)
        with torch.cuda.graph(self.graph):
            self.outputs = self.fn()
        return outputs


def make_train_step(agent: FQLAgent, sample):
    """`step(with_metrics) -> metrics`; on CUDA each variant is a CUDA graph unless --no_cuda_graph."""
    variants = {m: functools.partial(agent.train_step, sample, m) for m in (False, True)}
    if agent.cfg.cuda_graph and torch.device(agent.cfg.device).type == "cuda":
        variants = {m: CUDAGraphStep(fn, agent.generators) for m, fn in variants.items()}
    return lambda with_metrics: variants[with_metrics]()


# ---- Checkpoints and logs: nothing written is lost when a run is killed --------------------------
# Fields that may change between a killed run and its resumption (run_dir: the same folder, spelled otherwise)
RESUMABLE_CHANGES = {"resume", "offline_steps", "online_steps", "log_interval", "eval_interval", "eval_episodes",
                     "run_dir", "save_interval", "device", "compile", "cuda_graph", "wandb_project", "dataset_dir",
                     "benchmark"}


def save_checkpoints(agent: FQLAgent, step: int, runs: list, online_state: dict | None = None):
    """Each seed's checkpoint.pt (with fine-tuning's `online_state`): all written to temporary files, then renamed,
    so a kill leaves the previous ones whole (--resume finishes the renames of a group killed between them)."""
    paths = [os.path.join(run.run_dir, "checkpoint.pt") for run in runs]
    for i, (run, path, generator) in enumerate(zip(runs, paths, agent.generators)):
        rng = dict(generator=generator.get_state(), torch=torch.get_rng_state(), numpy=np.random.get_state(),
                   cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
        torch.save(dict(agent.state_dict(i), step=step, config=dataclasses.asdict(run), action_dim=agent.action_dim,
                        observation_shape=agent.nets.observation_shape, buffer=online_state, rng=rng), path + ".tmp")
    for path in paths:
        os.replace(path + ".tmp", path)


def read_checkpoint(path: str) -> dict:
    """A checkpoint's contents, or one clear line if the file is missing or not a whole checkpoint."""
    if not os.path.exists(path):
        raise UsageError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch.load fails in many ways on a truncated or foreign file
        raise UsageError(f"{path} is not a readable checkpoint ({type(err).__name__}; truncated?); delete it to "
                         "start over, or restore a copy") from None
    if not (isinstance(state, dict) and {"nets", "optimizer", "step", "config"} <= state.keys()):
        raise UsageError(f"{path} is not a checkpoint of fql.py; give a run folder or its checkpoint.pt")
    return state


def check_same_run(saved: dict, cfg: Config):
    """Refuse to resume a run whose config differs beyond RESUMABLE_CHANGES (fields an older fql.py lacked excepted)."""
    saved, new = (json.loads(json.dumps(c)) for c in (saved, dataclasses.asdict(cfg)))  # tuples as lists
    changed = [k for k, v in new.items() if k not in RESUMABLE_CHANGES and saved.get(k, v) != v]
    if changed:
        raise UsageError(f"--resume: this command differs from the run in {cfg.run_dir} in {', '.join(changed)}; "
                         "give the same flags as the original run")


def load_checkpoint(path: str, agent: FQLAgent, cfg: Config, seed_index: int = 0) -> dict:
    """Restore one seed of a killed run: networks, optimiser and RNG states; returns the checkpoint."""
    state = read_checkpoint(path)
    check_same_run(state["config"], cfg)
    agent.load_state_dict(state, seed_index)
    rng = state["rng"]
    try:
        agent.generators[seed_index].set_state(rng["generator"])
    except (KeyError, RuntimeError, TypeError):  # an older checkpoint, or one from another kind of device
        agent.generators[seed_index].manual_seed(cfg.seed * 1_000_003 + state["step"])  # a new stream
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    if rng["cuda"] is not None and len(rng["cuda"]) <= torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state


class CSVLog:
    """Metric rows in a CSV file, rewritten atomically at each row; rows after `keep_until_step` are dropped."""

    def __init__(self, path: str, keep_until_step: int):
        self.path, self.rows = path, []
        if os.path.exists(path):
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
            self.rows = [r for r in rows if int(r["step"]) <= keep_until_step]
            if len(self.rows) < len(rows):
                self.write()

    def write(self, row: dict | None = None):
        self.rows += [row] if row else []
        with open(self.path + ".tmp", "w", newline="") as f:
            writer = csv.DictWriter(f, list(dict.fromkeys(k for r in self.rows for k in r)) or ["step"])
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(self.path + ".tmp", self.path)


# ---- Training loop -------------------------------------------------------------------------------
def train(cfg: Config, evaluate=None, finetuning=None) -> FQLAgent:
    """Offline training of every seed in cfg.seeds, then, with --online_steps, fine-tuning. eval.py gives the env side
    (without it, no evaluation): `evaluate(policy, seeds)` -> a result per seed, its episode i from reset(seed=seeds[k]
    + i); `finetuning(cfg, train_data)` -> an object as eval.Finetuning (collect, sample, log, state dicts)."""
    cfg = resolve_config(cfg)
    runs = [seed_config(cfg, seed) for seed in cfg.seeds]  # each seed's run and its folder
    checkpoints = [os.path.join(run.run_dir, "checkpoint.pt") for run in runs]
    resuming = cfg.resume and any(os.path.exists(path) for path in checkpoints)
    if cfg.online_steps and finetuning is None:
        raise UsageError("--online_steps needs eval.py beside fql.py: it steps the environment")
    for run, path in zip(runs, checkpoints):
        if not cfg.resume and os.path.exists(path):
            raise UsageError(f"{run.run_dir} already holds a run; add --resume to continue it, or another --run_dir")
        if cfg.resume and not resuming and os.path.exists(os.path.join(run.run_dir, "config.json")):
            with open(os.path.join(run.run_dir, "config.json")) as f:  # a run killed before its first checkpoint
                check_same_run(json.load(f), run)
    np.random.seed(cfg.seed)
    torch.set_float32_matmul_precision("high" if cfg.device.startswith("cuda") else "highest")  # TF32 on GPU, as JAX

    train_set, val_set = load_datasets(cfg.env, cfg.dataset_dir)
    train_data = to_device(train_set, cfg.device)  # one copy on the device, shared by all seeds
    val_data = to_device(val_set, cfg.device) if val_set else None
    observation_shape, action_dim = stacked_shape(train_data, cfg.frame_stack), train_data["actions"].shape[1]
    agent = make_agent(cfg, observation_shape, action_dim)
    offline_step = make_train_step(agent, make_sampler(train_data, cfg.frame_stack, cfg.p_aug))
    online = finetuning(cfg, train_data) if cfg.online_steps else None
    online_step = make_train_step(agent, online.sample) if online else None

    start = 0
    if resuming:
        if len({read_checkpoint(path)["step"] for path in checkpoints if os.path.exists(path)}) > 1:
            for path in checkpoints:  # a group killed between its renames: every .tmp was whole before the first
                if os.path.exists(path + ".tmp"):
                    os.replace(path + ".tmp", path)
        states = [load_checkpoint(path, agent, run, i) for i, (run, path) in enumerate(zip(runs, checkpoints))]
        start = states[0]["step"]
        if online and states[0]["buffer"] is not None:
            online.load_state_dict(states[0]["buffer"])
    elif cfg.resume:
        print(f"--resume: no checkpoint in {', '.join(run.run_dir for run in runs)} yet; starting from the beginning")
    for run in runs:  # written once the run is accepted
        os.makedirs(run.run_dir, exist_ok=True)
        with open(os.path.join(run.run_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(run), f, indent=1)
    train_logs = [CSVLog(os.path.join(run.run_dir, "train.csv"), keep_until_step=start) for run in runs]
    eval_logs = [CSVLog(os.path.join(run.run_dir, "eval.csv"), keep_until_step=start) for run in runs]
    if cfg.wandb_project:
        try:
            import wandb
        except ImportError:
            raise UsageError("--wandb_project needs wandb: pip install wandb") from None
        wandb.init(project=cfg.wandb_project, name=os.path.basename(cfg.run_dir), config=dataclasses.asdict(cfg))

    total_steps = cfg.offline_steps + cfg.online_steps
    print(f"FQL on {cfg.env}: {len(train_data['actions'])} rows, observation {observation_shape}, action {action_dim}, "
          f"alpha {cfg.alpha}, device {cfg.device}, compile {cfg.compile}, run in {', '.join(r.run_dir for r in runs)}")
    progress = tqdm(range(start + 1, total_steps + 1), initial=start, total=total_steps, unit="update", smoothing=0.05)
    last_time, last_step = time.time(), start
    for step in progress:
        log_now = step % cfg.log_interval == 0
        if step <= cfg.offline_steps:
            metrics = offline_step(with_metrics=log_now)
        else:  # fine-tuning: one environment step, then one update on the growing buffer
            online.collect(agent.act)
            metrics = online_step(with_metrics=log_now)

        if log_now:  # the only host synchronisation between steps
            if val_data is not None:
                with torch.no_grad():
                    val_metrics = agent.losses_eager(*agent.draw(make_sampler(val_data, cfg.frame_stack, p_aug=0)),
                                                     with_metrics=True)[1]
                metrics = {**metrics, **{f"validation/{k}": v for k, v in val_metrics.items()}}
            rate = (step - last_step) / (time.time() - last_time)
            last_time, last_step = time.time(), step
            for run, log, values in zip(runs, train_logs, torch.stack([v.reshape(-1) for v in metrics.values()]).T):
                row = {"step": step, **dict(zip(metrics, values.tolist())), "time/updates_per_sec": rate}
                log.write({**row, **(online.log() if step > cfg.offline_steps else {})})
                for key, value in row.items():
                    if not math.isfinite(value):
                        stop_diverged(f"{key} is {value} at step {step}", run)
            progress.set_postfix(critic=f"{train_logs[0].rows[-1]['critic/critic_loss']:.3g}")
            if cfg.wandb_project:
                wandb.log(train_logs[0].rows[-1], step=step)

        if evaluate and cfg.eval_interval and (step % cfg.eval_interval == 0 or step == total_steps):
            results = evaluate(agent.act, [seed + step for seed in cfg.seeds])
            for result, log in zip(results, eval_logs):
                log.write({"step": step, **{f"evaluation/{k}": v for k, v in result.items()}})
            progress.write(f"step {step}: success {' '.join(format(r['success'], '.3f') for r in results)}")
            if cfg.wandb_project:
                wandb.log({f"evaluation/{k}": v for k, v in results[0].items()}, step=step)
            last_time = time.time()  # evaluation time does not count against updates/s

        if step % cfg.save_interval == 0 or step == total_steps:
            for run, params in zip(runs, zip(*agent.params.values())):  # one host synchronisation per seed
                if not torch.stack([p.isfinite().all() for p in params]).all():
                    stop_diverged(f"its parameters are not finite at step {step}", run)
            save_checkpoints(agent, step, runs, online.state_dict() if step > cfg.offline_steps else None)
    progress.close()
    return agent


def stop_diverged(what: str, run: Config):
    raise UsageError(f"training diverged in {run.run_dir}: {what}. Stopped before saving, so its last checkpoint "
                     "holds the parameters from before. Try a smaller --lr or --alpha, or --normalize_q_loss")


# ---- Benchmark: the training step in each execution mode, on random data -------------------------
def benchmark(cfg: Config, observation_shape: tuple[int, ...], action_dim: int, repeats: int = 3,
              seconds: float = 2.0) -> dict:
    """--benchmark: median steps/s of `repeats` timings (`seconds` each) of the training step in each mode, one seed and
    the group, on random data of the env's shapes. Returns {(mode, seeds): (steps/s, steps per timing, Adam steps)}."""
    cfg, pixels = resolve_config(cfg), len(observation_shape) == 3
    rng, n = np.random.default_rng(cfg.seed), 10_000 if pixels else 100_000
    observations = (rng.integers(0, 256, (n, *observation_shape), dtype=np.uint8) if pixels  # compact frames
                    else rng.normal(size=(n, *observation_shape)))
    layout = dict(valids=np.arange(n) < n - 1) if pixels else dict(next_observations=observations[::-1])
    data = to_device(dict(observations=observations, actions=rng.uniform(-1, 1, (n, action_dim)),
                          rewards=-rng.integers(0, 2, n), masks=np.ones(n), **layout), cfg.device)
    observation_shape, on_cuda = stacked_shape(data, cfg.frame_stack), torch.device(cfg.device).type == "cuda"
    torch.set_float32_matmul_precision("high" if on_cuda else "highest")  # as in training
    device_name = torch.cuda.get_device_name(cfg.device) if on_cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"FQL training step, observation {observation_shape}, action {action_dim}, batch {cfg.batch_size}, critic "
          f"{cfg.value_hidden_dims}, actors {cfg.actor_hidden_dims}, encoder {cfg.encoder}; {device_name}, "
          f"torch {torch.__version__}")
    modes = {"eager": dict(compile=False, cuda_graph=False), "compile": dict(compile=True, cuda_graph=False),
             **({"compile + CUDA graph": dict(compile=True, cuda_graph=True)} if on_cuda else {})}
    def timed(step, steps: int) -> float:  # seconds for `steps` training steps, the device waited for
        start = time.perf_counter()
        for i in range(steps):
            metrics = step(i == steps - 1)
        metrics["critic/critic_loss"].cpu()
        return time.perf_counter() - start

    results = {}
    for name, flags in modes.items():
        for seeds in dict.fromkeys([cfg.seeds[:1], cfg.seeds]):  # one seed, then the group
            agent = make_agent(dataclasses.replace(cfg, seeds=seeds, **flags), observation_shape, action_dim)
            step = make_train_step(agent, make_sampler(data, cfg.frame_stack, cfg.p_aug))
            warmup = timed(step, 4)  # compilation and graph recording happen here
            updates = max(10, round(seconds * 6 / timed(step, 6)))
            rate = float(np.median([updates / timed(step, updates) for _ in range(repeats)]))
            results[name, len(seeds)] = rate, updates, int(next(iter(agent.optimizer.state.values()))["step"])
            group = (f"steps/s of {len(seeds)} seeds = {rate * len(seeds):.1f} seed-updates/s, "
                     f"{rate * len(seeds) / results[name, 1][0]:.2f}x one seed" if len(seeds) > 1 else "updates/s")
            print(f"{name:<22} {rate:9.1f} {group}   (warm-up {warmup:5.1f} s)", flush=True)
    return results


# ---- Command line --------------------------------------------------------------------------------
def main(argv: list[str] | None = None):
    cfg = tyro.cli(Config, args=argv, use_underscores=True, description=__doc__.split("\n")[0])
    try:
        cfg = resolve_config(cfg)
        if not (cfg.benchmark or cfg.eval_interval or cfg.online_steps):
            return train(cfg)
        try:
            import eval  # the environments: their shapes, evaluation during training, fine-tuning
        except ImportError as err:
            raise UsageError(f"evaluation, fine-tuning and --benchmark need eval.py beside fql.py and its packages "
                             f"({err}); --eval_interval 0 trains without them") from None
        if cfg.benchmark:
            return benchmark(cfg, *eval.env_shapes(cfg.env))
        return eval.train(cfg)
    except UsageError as err:
        sys.exit(f"fql.py: error: {err}")
    except KeyboardInterrupt:
        sys.exit("fql.py: interrupted; the same command with --resume continues from the last checkpoint")


if __name__ == "__main__":
    main()
