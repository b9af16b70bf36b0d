"""Environments and their datasets, for fql.py and eval.py: the env names with their per-env settings,
OGBench and D4RL datasets (loaded, moved to the device once, sampled there), and the environments
themselves, D4RL's AntMaze and Adroit rebuilt without d4rl or mujoco-py.
"""
import functools
import os
import re
import shutil
import socket
import urllib.request
from importlib.metadata import version

import numpy as np

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; must be set before MuJoCo loads
import gymnasium  # noqa: E402
import ogbench  # noqa: E402  (registers the OGBench environments with gymnasium)
import torch  # noqa: E402
from ogbench.locomaze.maze import make_maze_env  # noqa: E402


class UsageError(ValueError):
    """Bad input from the user: reported as one line, without a traceback."""


# ----------------------------------------------------------------------------------------------
# Env names and per-env settings (the paper's hyperparameter tables; the official README)
# ----------------------------------------------------------------------------------------------
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
    """Map a user's env name to (full OGBench single-task name, per-env defaults)."""
    for d4rl_name, (_, alpha, extra) in D4RL.items():
        if name in (d4rl_name, "d4rl-" + d4rl_name.rsplit("-", 1)[0]):
            return d4rl_name, dict(alpha=alpha, offline_steps=500_000, **extra)
    alias = re.fullmatch(r"ogbench-(.+?)(?:-task(\d+))?", name)
    if alias and alias[1] in ENVS:
        dataset, default_task, alpha, extra = ENVS[alias[1]]
        task = int(alias[2] or default_task)
        if not 1 <= task <= 5:
            raise UsageError(f"{name}: OGBench single-task envs have tasks 1 to 5")
        return f"{dataset}-singletask-task{task}-v0", dict(alpha=alpha, **extra)
    full = re.fullmatch(r"(.+)-(\w+)-singletask(-task\d+)?-v0", name)
    if full and f"{full[1]}-singletask{full[3] or ''}-v0" in gymnasium.registry:
        for dataset, _, alpha, extra in ENVS.values():
            if dataset == f"{full[1]}-{full[2]}":
                return name, dict(alpha=alpha, **extra)
        return name, {}
    valid = ", ".join(f"ogbench-{a}" for a in ENVS)
    d4rl = ", ".join("d4rl-" + n.rsplit("-", 1)[0] for n in D4RL)
    raise UsageError(f"unknown env {name!r}. Valid: {valid} (add -task1..-task5 for another task), "
                     f"a full OGBench single-task name such as cube-single-play-singletask-task2-v0, or {d4rl}")


# ----------------------------------------------------------------------------------------------
# Data: OGBench and D4RL datasets, moved to the device once; batches are sampled there
# ----------------------------------------------------------------------------------------------
ACTION_CLIP = 1 - 1e-5  # dataset actions are clipped so the flow never has to reach exactly +-1


def load_ogbench(env_name: str, dataset_dir: str):
    """Return (env, train, val) for an OGBench single-task env, with rewards and masks for its task."""
    splits = env_name.split("-")
    dataset_name = "-".join(splits[: splits.index("singletask")] + splits[-1:])
    dataset_dir = os.path.expanduser(dataset_dir)
    files = [f"{dataset_name}.npz", f"{dataset_name}-val.npz"]
    if not all(os.path.exists(os.path.join(dataset_dir, f)) for f in files):
        old_timeout = socket.getdefaulttimeout()
        socket.setdefaulttimeout(60)  # a blocked network should fail, not hang forever
        try:
            ogbench.download_datasets([dataset_name], dataset_dir)
        except OSError as err:
            raise UsageError(f"dataset files {files[0]} and {files[1]} are not in {dataset_dir} and could not be "
                             f"downloaded ({err}). Copy them there, or pass --dataset_dir DIR.") from None
        finally:
            socket.setdefaulttimeout(old_timeout)
    # Pixel datasets stay compact (each frame once, s' = the next row), not doubled by next_observations
    compact = env_name.startswith("visual-")
    return ogbench.make_env_and_datasets(env_name, dataset_dir=dataset_dir, compact_dataset=compact)


def load_d4rl(name: str) -> dict:
    """Transitions of a D4RL dataset read from d4rl's own hdf5 file (no d4rl, no mujoco-py): converted as
    d4rl.qlearning_dataset does, then post-processed as the official FQL code does."""
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
    with h5py.File(path, "r") as f:
        if "timeouts" not in f:
            raise UsageError(f"{path} has no 'timeouts'; the D4RL v2 antmaze and v1 adroit files have them")
        observations, actions = f["observations"][:].astype(np.float32), f["actions"][:].astype(np.float32)
        rewards, dones, timeouts = f["rewards"][:].astype(np.float32), f["terminals"][:], f["timeouts"][:]

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
    """Keep what the update needs on the device: float32 transitions, or for a compact pixel dataset the
    uint8 frames with the rows that start a transition and the first row of each row's episode."""
    keys = ("actions", "rewards", "masks") + (("observations", "next_observations") if "valids" not in dataset else ())
    data = {k: torch.as_tensor(np.asarray(dataset[k], dtype=np.float32), device=device) for k in keys}
    data["actions"] = data["actions"].clamp(-ACTION_CLIP, ACTION_CLIP)
    if "valids" in dataset:
        rows = np.arange(len(dataset["valids"]))
        starts = np.concatenate([[True], dataset["valids"][:-1] == 0])  # a row after an episode's last frame
        data["observations"] = torch.as_tensor(dataset["observations"], device=device)  # uint8, not copied again
        data["valid_rows"] = torch.as_tensor(np.flatnonzero(dataset["valids"]), device=device)
        data["episode_start"] = torch.as_tensor(np.maximum.accumulate(np.where(starts, rows, 0)), device=device)
    return data


def sample_batch(data: dict, batch_size: int) -> dict:
    """Uniform transitions, indexed on the device (no host-to-device copy per step)."""
    n = data["observations"].shape[0]
    idx = torch.randint(n, (batch_size,), device=data["observations"].device)
    return {k: v[idx] for k, v in data.items()}


def sample_pixels(data: dict, batch_size: int, frame_stack: int, p_aug: float) -> dict:
    """Uniform transitions of a compact pixel dataset: s stacks the frame_stack latest frames (oldest
    first along the channels, the episode's first frame repeated before it starts) and s' the same one
    row later. With probability p_aug the batch is randomly shifted, as the official code does."""
    idx = data["valid_rows"][torch.randint(len(data["valid_rows"]), (batch_size,), device=data["actions"].device)]
    start = data["episode_start"][idx]
    batch = {k: data[k][idx] for k in ("actions", "rewards", "masks")}
    for key, last in (("observations", idx), ("next_observations", idx + 1)):
        frames = [data["observations"][torch.maximum(last - k, start)] for k in reversed(range(frame_stack))]
        batch[key] = torch.cat(frames, dim=-1)
    if p_aug:
        batch["observations"], batch["next_observations"] = random_shift(
            batch["observations"], batch["next_observations"], p_aug)
    return batch


def random_shift(observations: torch.Tensor, next_observations: torch.Tensor, p_aug: float, pad: int = 3):
    """With probability p_aug, shift each image by up to `pad` pixels (edge padding then a crop back to the
    image size), s and s' of a sample by the same offset and each sample by its own, as the official code.
    Both branches are computed and one is kept, so a recorded CUDA graph stays valid."""
    batch, height, width = observations.shape[:3]
    offsets = torch.randint(0, 2 * pad + 1, (batch, 2), device=observations.device) - pad
    rows = (torch.arange(height, device=observations.device) + offsets[:, :1]).clamp(0, height - 1)
    cols = (torch.arange(width, device=observations.device) + offsets[:, 1:]).clamp(0, width - 1)
    apply = torch.rand((), device=observations.device) < p_aug
    samples = torch.arange(batch, device=observations.device)[:, None, None]
    return [torch.where(apply, images[samples, rows[:, :, None], cols[:, None, :]], images)
            for images in (observations, next_observations)]


def stacked_shape(data: dict, frame_stack: int | None) -> tuple[int, ...]:
    """The shape of one observation as the networks see it: pixel frames stacked along the channels."""
    shape = tuple(data["observations"].shape[1:])
    return (*shape[:-1], shape[-1] * frame_stack) if "valid_rows" in data else shape


def make_sampler(data: dict, frame_stack: int | None = None, p_aug: float | None = None):
    """`sample(batch_size) -> batch` for the dataset's layout (frame_stack and p_aug: pixels only)."""
    if "valid_rows" in data:
        return functools.partial(sample_pixels, data, frame_stack=frame_stack, p_aug=p_aug)
    return functools.partial(sample_batch, data)


# ----------------------------------------------------------------------------------------------
# Environments
# ----------------------------------------------------------------------------------------------
def make_env(env_name: str, frame_stack: int | None = None, **kwargs) -> gymnasium.Env:
    """The OGBench single-task or D4RL environment (no dataset needed); pixel observations stack the
    `frame_stack` latest frames as the training data does."""
    if frame_stack:
        return FrameStack(make_env(env_name, **kwargs), frame_stack)
    if env_name.startswith("antmaze") and env_name in D4RL:
        maze, goal_cell, episode_length = D4RL_MAZES[env_name.split("-")[1]]
        return gymnasium.wrappers.TimeLimit(d4rl_antmaze_class()(maze, goal_cell, **kwargs), episode_length)
    if env_name in D4RL:
        return make_adroit_env(env_name.split("-")[0], **kwargs)
    return ogbench.make_env_and_datasets(env_name, env_only=True, **kwargs)


def make_vector_env(env_name: str, num_envs: int, frame_stack: int | None = None) -> gymnasium.vector.VectorEnv:
    """`num_envs` copies stepping in parallel worker processes. forkserver, not fork: the parent may
    hold CUDA and OpenMP threads, which fork would copy in a broken state."""
    return gymnasium.vector.AsyncVectorEnv([functools.partial(make_env, env_name, frame_stack)] * num_envs,
                                           context="forkserver")


class FrameStack(gymnasium.ObservationWrapper):
    """Observations of the `frames` latest frames along the channels, oldest first; after a reset the
    first frame stands in for the ones before it (as the official code and the datasets' stacking)."""

    def __init__(self, env: gymnasium.Env, frames: int):
        super().__init__(env)
        self.frames, self.stack = frames, []
        shape = env.observation_space.shape
        self.observation_space = gymnasium.spaces.Box(0, 255, (*shape[:-1], shape[-1] * frames), np.uint8)

    def reset(self, **kwargs):
        observation, info = self.env.reset(**kwargs)
        self.stack = [observation] * self.frames
        return np.concatenate(self.stack, axis=-1), info

    def observation(self, observation):
        self.stack = self.stack[1:] + [observation]
        return np.concatenate(self.stack, axis=-1)


# D4RL's AntMaze evaluation mazes (its *_TEST maps): 1 wall, 0 free; the ant starts in cell (1, 1)
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
D4RL_MAZES = {"umaze": (U_MAZE, (3, 1), 700), "medium": (BIG_MAZE, (6, 6), 1000),  # map, goal cell, steps
              "large": (HARDEST_MAZE, (7, 9), 1000)}


@functools.cache
def d4rl_antmaze_class() -> type:
    """D4RL's AntMaze (v2 evaluation) on OGBench's ant, which has D4RL's ant model and coordinates. The ant
    starts at cell (1, 1) = (0, 0) with the ant's reset noise; each episode draws the goal as D4RL does
    (goal cell + U(0, 1) + U(0, 0.5) per axis, floored at 0); reward 1 and the end of the episode within
    0.5 of the goal, else reward 0. (OGBench defines its maze class inside a factory, hence this function.)"""
    ogbench_antmaze = type(make_maze_env("ant", "maze", maze_type="arena"))

    class D4RLAntMaze(ogbench_antmaze):
        def __init__(self, maze_map: list, goal_cell: tuple, **kwargs):
            self.d4rl_map, self.goal_cell = maze_map, goal_cell
            super().__init__(maze_type="arena", terminate_at_goal=True, success_timing="post", **kwargs)

        def update_tree(self, tree):  # OGBench builds the walls from self.maze_map here
            self.maze_map = np.array(self.d4rl_map)
            super().update_tree(tree)

        def reset(self, *, seed=None, options=None):
            _, info = super(ogbench_antmaze, self).reset(seed=seed)  # the ant's own reset, no OGBench task
            goal = np.array(self.ij_to_xy(self.goal_cell)) + self.np_random.uniform(0, 1, 2)
            self.set_goal(goal_xy=np.maximum(goal + self.np_random.uniform(0, 0.5, 2), 0))
            return self.get_ob(), info

    return D4RLAntMaze


def make_adroit_env(task: str, **kwargs) -> gymnasium.Env:
    """gymnasium-robotics' Adroit hand with D4RL's rewards and episode lengths (pen: 100 steps, and the
    episode ends when the pen drops, as in D4RL)."""
    import gymnasium_robotics

    gymnasium.register_envs(gymnasium_robotics)
    env = gymnasium.make(f"AdroitHand{task.capitalize()}-v1", max_episode_steps=100 if task == "pen" else 200,
                         **kwargs)
    # gymnasium-robotics 1.2.1 to 1.4.2 flipped the sign of the hand-to-object term of the door, hammer
    # and relocate rewards (Gymnasium-Robotics PR 220); for those versions D4RL's reward is recomputed
    release = tuple(int(x) for x in version("gymnasium-robotics").split(".")[:3])
    return D4RLAdroit(env, task, recompute_reward=task != "pen" and (1, 2, 1) <= release <= (1, 4, 2))


class D4RLAdroit(gymnasium.Wrapper):
    def __init__(self, env: gymnasium.Env, task: str, recompute_reward: bool):
        super().__init__(env)
        self.task, self.recompute_reward = task, recompute_reward

    def step(self, action):
        observation, reward, terminated, truncated, info = self.env.step(action)
        if self.task == "pen":
            terminated = bool(self.env.unwrapped.data.xpos[self.env.unwrapped.obj_body_id][2] < 0.075)
        if self.recompute_reward:
            reward = d4rl_adroit_reward(self.task, self.env.unwrapped)
        return observation, reward, terminated, truncated, info


def d4rl_adroit_reward(task: str, env) -> float:
    """D4RL's dense reward of the door, hammer and relocate tasks (with its bonuses) at the current state."""
    data, sites = env.data, env.data.site_xpos
    if task == "door":
        door = data.qpos[env.door_hinge_addrs]
        reward = -0.1 * np.linalg.norm(sites[env.grasp_site_id] - sites[env.handle_site_id])
        reward += -0.1 * (door - 1.57) ** 2 - 1e-5 * np.sum(data.qvel ** 2)
        return float(reward + 2 * (door > 0.2) + 8 * (door > 1.0) + 10 * (door > 1.35))
    obj, palm = data.xpos[env.obj_body_id], sites[env.S_grasp_site_id]
    if task == "hammer":
        tool, nail, goal = sites[env.tool_site_id], sites[env.target_obj_site_id], sites[env.goal_site_id]
        nail_to_goal = np.linalg.norm(nail - goal)
        reward = -0.1 * np.linalg.norm(palm - obj) - np.linalg.norm(tool - nail) - 10 * nail_to_goal
        reward -= 1e-2 * np.linalg.norm(data.qvel)
        return float(reward + 2 * (obj[2] > 0.04 and tool[2] > 0.04) + 25 * (nail_to_goal < 0.02)
                     + 75 * (nail_to_goal < 0.01))
    target = sites[env.target_obj_site_id]  # relocate
    reward = -0.1 * np.linalg.norm(palm - obj)
    if obj[2] > 0.04:
        reward += 1.0 - 0.5 * np.linalg.norm(palm - target) - 0.5 * np.linalg.norm(obj - target)
    obj_to_target = np.linalg.norm(obj - target)
    return float(reward + 10 * (obj_to_target < 0.1) + 20 * (obj_to_target < 0.05))


# D4RL's normalised score: 100 * (return - random) / (expert - random)
D4RL_REFERENCE_RETURNS = {"antmaze": (0.0, 1.0), "pen": (96.262799, 3076.8331017826877),
                          "door": (-56.512833, 2880.5693087298737), "hammer": (-274.856578, 12794.134825156867),
                          "relocate": (-6.425911, 4233.877797728884)}


def with_score(env_name: str, result: dict) -> dict:
    """Add D4RL's normalised score of the mean return for D4RL environments."""
    if env_name not in D4RL:
        return result
    low, high = D4RL_REFERENCE_RETURNS[env_name.split("-")[0]]
    return dict(result, score=100 * (result["return"] - low) / (high - low))
