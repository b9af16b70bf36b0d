"""Evaluate, film, plot and fine-tune FQL runs made by fql.py, and the environments they run in.

  python eval.py --checkpoint runs/<run> --episodes 50        # success / return / length
  python eval.py --checkpoint runs/<run> --video_episodes 2   # also mp4 files of rollouts
  python eval.py finetune --checkpoint runs/<run> --online_steps 1000000 --eval_interval 100000
  python eval.py plot runs/run_a runs/run_b                   # PNG of success and losses
  python eval.py table runs/*                                 # final success per group of seeds

The environments are OGBench's single-task envs and D4RL's AntMaze and Adroit rebuilt without d4rl
or mujoco-py. Success follows OGBench: `info['success']` at the last step of an episode, averaged
over episodes. fql.py's training loop gets its evaluation and fine-tuning from here (`train`), and
its --benchmark (`benchmark`).
"""
import contextlib
import csv
import io
import json
import multiprocessing
import os
import re
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from functools import cache, partial

import numpy as np
import torch
import tyro
from tqdm import tqdm

import fql
from fql import UsageError

fql.headless_mujoco()  # before MuJoCo loads
import gymnasium  # noqa: E402
import ogbench  # noqa: E402  (registers the OGBench environments with gymnasium)
from ogbench.locomaze.maze import make_maze_env  # noqa: E402

# A policy (FQLAgent.act) maps observations with a leading agent dimension, (agents, ...,
# *observation), and a list of torch.Generators, one for each row, to actions in [-1, 1], (agents,
# ..., action), each row's noise from its own generator


# ---- Environments --------------------------------------------------------------------------------
def make_env(env_name, frame_stack=None, **kwargs):
    """The OGBench single-task or D4RL environment (no dataset needed); pixel observations stack
    the `frame_stack` latest frames as the training data does."""
    if frame_stack:
        return FrameStack(make_env(env_name, **kwargs), frame_stack)
    if env_name in fql.D4RL:  # <domain>-<maze size or dataset>-v<version>
        domain, maze_size, *_ = env_name.split("-")
        if domain != "antmaze":
            return make_adroit_env(domain, **kwargs)
        maze, goal_cell, episode_length = D4RL_MAZES[maze_size]
        env = d4rl_antmaze_class()(maze, goal_cell, **kwargs)
        return gymnasium.wrappers.TimeLimit(env, episode_length)
    if env_name.startswith("minari:"):
        return make_minari_env(env_name, **kwargs)
    return ogbench.make_env_and_datasets(env_name, env_only=True, **kwargs)


def make_minari_env(env_name, **kwargs):
    """A Minari dataset's evaluation environment as its data looks to FQL: Dict observations
    flattened (in the Dict's order, as fql.load_minari does), the policy's actions in [-1, 1]
    scaled to the action space's bounds."""
    dataset = fql.open_minari_dataset(env_name)
    try:  # (gymnasium-robotics' import prints a notice of its Adroit rewards: README says it)
        with contextlib.redirect_stderr(io.StringIO()):
            env = dataset.recover_environment(eval_env=True, **kwargs)
    except (ValueError, gymnasium.error.Error) as err:  # a user's own data: no environment
        raise UsageError(f"{env_name} has no environment to evaluate or fine-tune in ({err}); "
                         "train on it offline: --eval_interval 0, no --online_steps") from None
    if isinstance(env.observation_space, gymnasium.spaces.Dict):
        env = gymnasium.wrappers.FlattenObservation(env)
    return gymnasium.wrappers.RescaleAction(env, -1.0, 1.0)


def make_vector_env(env_names, frame_stack=None):
    """An environment of each name (the tasks of one dataset, say), stepping in parallel worker
    processes, reset only when asked to (Rollouts). forkserver, not fork: the parent may hold CUDA
    and OpenMP threads, which fork would copy in a broken state. The workers fork from one server
    process that imports torch, MuJoCo and OGBench once, instead of each (seconds apiece)."""
    multiprocessing.set_forkserver_preload(["eval"])
    makes = [partial(make_worker_env, name, frame_stack) for name in env_names]
    return gymnasium.vector.AsyncVectorEnv(makes, context="forkserver", autoreset_mode="Disabled")


def make_worker_env(env_name, frame_stack):
    """make_env for a worker process, which ignores SIGTERM: a cluster sends it to every process of
    a job, and the main process finishes the step it is in (an evaluation, say) before it stops.
    (gymnasium also makes one in the main process, to read the spaces.)"""
    if multiprocessing.parent_process():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return Replay(make_env(env_name, frame_stack))


class Replay(gymnasium.Wrapper):
    """An environment that replays an episode where it runs: vector_env.set_attr("episode", [(reset
    seed, actions), ...]), then vector_env.call("replay") -> each one's (observation, return)."""

    def replay(self):
        seed, actions = self.episode
        observation, _ = self.env.reset(seed=seed)
        episode_return = 0.0
        for action in actions:
            observation, reward, *_ = self.env.step(action)
            episode_return += reward
        return observation, episode_return


def env_shapes(env_name):
    """(observation shape, action size) of an env; for pixel envs one frame, before stacking."""
    env = make_env(env_name)
    shapes = tuple(env.observation_space.shape), env.action_space.shape[0]
    env.close()
    return shapes


class FrameStack(gymnasium.ObservationWrapper):
    """Observations of the `frames` latest frames along the channels, oldest first; after a reset
    the first frame stands in for the ones before it (as the official code and the datasets)."""

    def __init__(self, env, frames):
        super().__init__(env)
        self.frames = frames
        shape = env.observation_space.shape
        stacked = (*shape[:-1], shape[-1] * frames)
        self.observation_space = gymnasium.spaces.Box(0, 255, stacked, np.uint8)

    def reset(self, **kwargs):
        observation, info = self.env.reset(**kwargs)
        self.stack = [observation] * self.frames
        return np.concatenate(self.stack, axis=-1), info

    def observation(self, observation):
        self.stack = self.stack[1:] + [observation]
        return np.concatenate(self.stack, axis=-1)


# D4RL's AntMaze evaluation mazes (its *_TEST maps), row i of the map first: # wall, . free; the ant
# starts in cell (1, 1)
U_MAZE = """
#####
#...#
###.#
#...#
#####
"""
BIG_MAZE = """
########
#..##..#
#..#...#
##...###
#..#...#
#.#..#.#
#...#..#
########
"""
HARDEST_MAZE = """
############
#....#.....#
#.##.#.#.#.#
#......#...#
#.####.###.#
#..#.#.....#
##.#.#.#.###
#..#...#...#
############
"""
D4RL_MAZES = {  # map, goal cell, episode length
    "umaze": (U_MAZE, (3, 1), 700),
    "medium": (BIG_MAZE, (6, 6), 1000),
    "large": (HARDEST_MAZE, (7, 9), 1000),
}


@cache
def d4rl_antmaze_class():
    """D4RL's AntMaze (v2 evaluation) on OGBench's ant, which has D4RL's ant model and coordinates.
    The ant starts at cell (1, 1) = (0, 0) with the ant's reset noise; each episode draws the goal
    as D4RL does (goal cell + U(0, 1) + U(0, 0.5) per axis, floored at 0); reward 1 and the end of
    the episode within 0.5 of the goal, else reward 0. (OGBench defines its maze class inside a
    factory, hence this function.)"""
    ogbench_antmaze = type(make_maze_env("ant", "maze", maze_type="arena"))

    class D4RLAntMaze(ogbench_antmaze):
        def __init__(self, maze_map, goal_cell, **kwargs):
            self.d4rl_map = maze_map
            self.goal_cell = goal_cell
            super().__init__(maze_type="arena", terminate_at_goal=True, success_timing="post",
                             **kwargs)

        def update_tree(self, tree):  # OGBench builds the walls from self.maze_map here
            rows = self.d4rl_map.split()
            self.maze_map = np.array([[cell == "#" for cell in row] for row in rows], dtype=int)
            super().update_tree(tree)

        def reset(self, *, seed=None, options=None):
            _, info = super(ogbench_antmaze, self).reset(seed=seed)  # the ant's reset, no task
            goal = np.array(self.ij_to_xy(self.goal_cell)) + self.np_random.uniform(0, 1, 2)
            self.set_goal(goal_xy=np.maximum(goal + self.np_random.uniform(0, 0.5, 2), 0))
            return self.get_ob(), info

    return D4RLAntMaze


def make_adroit_env(task, **kwargs):
    """gymnasium-robotics' Adroit hand with D4RL's rewards and episode lengths (pen: 100 steps,
    and the episode ends when the pen drops, as in D4RL)."""
    # its import prints a notice of the reward change that D4RLAdroit undoes below
    with contextlib.redirect_stderr(io.StringIO()):
        import gymnasium_robotics

    gymnasium.register_envs(gymnasium_robotics)
    steps = 100 if task == "pen" else 200
    env = gymnasium.make(f"AdroitHand{task.capitalize()}-v1", max_episode_steps=steps, **kwargs)
    return D4RLAdroit(env, task)


class D4RLAdroit(gymnasium.Wrapper):
    """The door, hammer and relocate rewards are D4RL's, recomputed from the simulator's state:
    gymnasium-robotics 1.2.1 to 1.4.2 flipped the sign of their hand-to-object term
    (Gymnasium-Robotics PR 220), and the recomputed reward is D4RL's on any release."""

    def __init__(self, env, task):
        super().__init__(env)
        self.task = task

    def step(self, action):
        observation, reward, terminated, truncated, info = self.env.step(action)
        hand = self.env.unwrapped
        if self.task == "pen":
            terminated = bool(hand.data.xpos[hand.obj_body_id][2] < 0.075)
        else:
            reward = d4rl_adroit_reward(self.task, hand)
        return observation, reward, terminated, truncated, info


def d4rl_adroit_reward(task, env):
    """D4RL's dense reward of the door, hammer and relocate tasks (with its bonuses) at the current
    state."""
    data = env.data
    sites = data.site_xpos
    if task == "door":
        door = data.qpos[env.door_hinge_addrs]
        reward = -0.1 * np.linalg.norm(sites[env.grasp_site_id] - sites[env.handle_site_id])
        reward += -0.1 * (door - 1.57) ** 2 - 1e-5 * np.sum(data.qvel ** 2)
        return float(reward + 2 * (door > 0.2) + 8 * (door > 1.0) + 10 * (door > 1.35))
    obj = data.xpos[env.obj_body_id]
    palm = sites[env.S_grasp_site_id]
    if task == "hammer":
        tool = sites[env.tool_site_id]
        nail = sites[env.target_obj_site_id]
        nail_to_goal = np.linalg.norm(nail - sites[env.goal_site_id])
        reward = -0.1 * np.linalg.norm(palm - obj) - np.linalg.norm(tool - nail) - 10 * nail_to_goal
        reward -= 1e-2 * np.linalg.norm(data.qvel)
        lifted = obj[2] > 0.04 and tool[2] > 0.04
        return float(reward + 2 * lifted + 25 * (nail_to_goal < 0.02) + 75 * (nail_to_goal < 0.01))
    target = sites[env.target_obj_site_id]  # relocate
    obj_to_target = np.linalg.norm(obj - target)
    reward = -0.1 * np.linalg.norm(palm - obj)
    if obj[2] > 0.04:
        reward += 1.0 - 0.5 * np.linalg.norm(palm - target) - 0.5 * obj_to_target
    return float(reward + 10 * (obj_to_target < 0.1) + 20 * (obj_to_target < 0.05))


# D4RL's normalised score: 100 * (return - random) / (expert - random)
D4RL_REFERENCE_RETURNS = {
    "antmaze": (0.0, 1.0),
    "pen": (96.262799, 3076.8331017826877),
    "door": (-56.512833, 2880.5693087298737),
    "hammer": (-274.856578, 12794.134825156867),
    "relocate": (-6.425911, 4233.877797728884),
}


def with_score(env_name, result):
    """Add the normalised score of the mean return: D4RL's, or a Minari dataset's (where it has
    reference scores)."""
    if env_name.startswith("minari:"):
        import minari

        try:
            score = minari.get_normalized_score(fql.open_minari_dataset(env_name), result["return"])
        except ValueError:  # no reference scores
            return result
        return dict(result, score=100 * float(score))
    if env_name not in fql.D4RL:
        return result
    low, high = D4RL_REFERENCE_RETURNS[env_name.split("-")[0]]
    return dict(result, score=100 * (result["return"] - low) / (high - low))


# ---- Rollouts ------------------------------------------------------------------------------------
class Rollouts:
    """The environments of a vector env stepping on, each its own episodes: an episode starts from
    reset(seed=the seed given for it), its actions come from a queue of chunks of --horizon actions
    run open-loop (as QC's evaluation and main.py; emptied at the episode's end), which one batched
    policy call refills for the environments whose queue is empty, and the policy's noise in it
    comes from a generator seeded as its reset: an episode depends on its seed alone. The
    environments form one equal block per agent (the policy's leading dimension)."""

    def __init__(self, vector_env, agents):
        self.vector_env = vector_env
        self.agents = agents
        count = vector_env.num_envs
        self.ended = np.ones(count, dtype=bool)  # the next step starts a new episode
        self.steps = np.zeros(count, dtype=int)  # into the episode, and its return so far
        self.returns = np.zeros(count)
        self.queues = [[] for _ in range(count)]
        self.generators = [torch.Generator() for _ in range(count)]

    def step(self, policy, seeds):
        """One step of every environment, those whose episode ended reset first, from `seeds` (one
        for each environment); returns (observations, actions, the step's results, next
        observations)."""
        if self.ended.any():
            seeds = seeds.tolist()
            self.observations, _ = self.vector_env.reset(seed=seeds,
                                                         options={"reset_mask": self.ended})
            for k in np.flatnonzero(self.ended):
                self.generators[k] = torch.Generator().manual_seed(seeds[k])
                self.queues[k] = []
            self.steps[self.ended] = 0
            self.returns[self.ended] = 0.0
        calling = [not queue for queue in self.queues]
        if any(calling):  # the environments that have actions queued draw no noise
            generators = [g if c else torch.Generator() for g, c in zip(self.generators, calling)]
            blocks = self.observations.reshape(self.agents, -1, *self.observations.shape[1:])
            action_size = self.vector_env.single_action_space.shape[0]
            # One CPU thread: torch's threads busy-wait between calls and would take the cores
            # the environment workers need (half the speed on 2 cores). Always one, also where
            # the updates use them all: a compiled policy recompiles when their number changes
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            chunks = policy(blocks, generators).reshape(len(calling), -1, action_size)
            torch.set_num_threads(threads)
            for k in np.flatnonzero(calling):
                self.queues[k] = list(np.clip(chunks[k], -1, 1))
        observations = self.observations
        actions = np.stack([queue.pop(0) for queue in self.queues])
        self.observations, *results = self.vector_env.step(actions)
        self.ended = results[1] | results[2]  # terminated or truncated
        self.steps += 1
        self.returns += results[0]
        return observations, actions, *results, self.observations


def evaluate(policy, vector_env, episodes, seeds, progress=None):
    """`episodes` episodes per agent, a result each (success rate, mean return, mean length): the
    environments form one equal block per agent (built with its env), and environment j of a
    block runs its agent's episodes j, j + block, ...; episode i of agent k from reset(seed=seeds[k]
    + i) (Rollouts), so that an agent's episodes are the same whatever is evaluated beside it."""
    rollouts = Rollouts(vector_env, len(seeds))
    block = vector_env.num_envs // len(seeds)
    episode = np.tile(np.arange(block), len(seeds)) - block  # each environment's, before the first
    finished = [[] for _ in seeds]  # (success, return, length) of each episode, per agent
    while min(map(len, finished)) < episodes:
        episode += block * rollouts.ended
        *_, infos, _ = rollouts.step(policy, np.repeat(seeds, block) + episode)
        for k in np.flatnonzero(rollouts.ended & (episode < episodes)):
            success = infos["success"][k] if "success" in infos else np.nan  # (not every env's)
            finished[k // block].append((success, rollouts.returns[k], rollouts.steps[k]))
            if progress is not None:
                progress.update(1)
    means = [np.mean(agent_episodes, axis=0).tolist() for agent_episodes in finished]
    return [{k: v for k, v in zip(("success", "return", "length"), mean) if not np.isnan(v)}
            for mean in means]


def record_videos(policy, env_name, episodes, seed, directory, frame_skip, frame_stack=None):
    """Render `episodes` episodes offscreen (every `frame_skip`-th frame) into mp4 files; pixel
    envs render at their observations' size, which is what the policy sees."""
    import imageio

    size = {} if env_name.startswith("visual-") else dict(width=256, height=256)
    try:
        env = make_env(env_name, frame_stack, render_mode="rgb_array", **size)
        env.reset(seed=seed)
        env.render()
    except Exception as err:  # MuJoCo raises several types when no OpenGL platform loads
        print(f"no videos: offscreen rendering failed ({err}). Install EGL (libegl1) and keep "
              "MUJOCO_GL=egl, or install OSMesa and set MUJOCO_GL=osmesa.", file=sys.stderr)
        return []
    os.makedirs(directory, exist_ok=True)
    paths = []
    for episode in range(episodes):
        observation, _ = env.reset(seed=seed + episode)
        generator = torch.Generator().manual_seed(seed + episode)  # as in evaluate
        frames = [env.render()]
        done = False
        t = 0
        queue = []
        while not done:
            if not queue:  # a one-agent policy's action, or chunk of actions run open-loop
                chunk = policy(observation[None], [generator])[0]
                queue = list(np.clip(chunk, -1, 1).reshape(-1, env.action_space.shape[0]))
            observation, _, terminated, truncated, _ = env.step(queue.pop(0))
            done = terminated or truncated
            t += 1
            if t % frame_skip == 0 or done:
                frames.append(env.render())
        paths.append(os.path.join(directory, f"episode{episode}.mp4"))
        imageio.mimwrite(paths[-1], frames, fps=max(1, 30 // frame_skip), macro_block_size=1)
    env.close()
    return paths


# ---- Online fine-tuning: the replay buffer and the env side (fql.train runs the updates) -------
class ReplayBuffer:
    """Fine-tuning's transitions on the device: the `offline` ones (the dataset; none with
    balanced sampling) once, then each agent's online ones, room for `capacity` each. Agent k
    samples its own buffer as QC and the official code sample theirs: the offline rows, then its
    online rows, windows of --horizon rows anywhere in it, never another agent's rows. (The
    official buffer of 2M rows never fills with 1M offline and 1M online steps, so it never drops
    a row either.) `size` lives on the device, so sampling stays inside a recorded CUDA graph
    while the buffers grow."""

    def __init__(self, offline, agents, capacity, cfg):
        self.cfg = cfg
        self.offline = len(offline["actions"])
        self.added = 0  # online transitions of each agent so far
        # agent k's j-th online transition at row offline + k * capacity + j
        self.data = {k: torch.cat([v, v.new_zeros((agents * capacity, *v.shape[1:]))])
                     for k, v in offline.items()}
        self.first_rows = self.offline + capacity * torch.arange(agents, device=cfg.device)
        self.size = torch.tensor(float(self.offline), device=cfg.device)  # of each agent's buffer

    def add(self, transitions):
        """One transition for each agent: arrays with a leading agent dimension."""
        for k, v in transitions.items():
            self.data[k][self.first_rows + self.added] = torch.as_tensor(
                v, dtype=torch.float32, device=self.cfg.device)
        self.added += 1
        self.size.fill_(self.offline + self.added)

    def sample(self, batch_size, generators=(None,), tasks=(0,)):
        """As fql.sample_batch (uniform window starts), each agent in its own buffer."""
        draws = torch.stack([torch.rand(batch_size, device=self.size.device, generator=g)
                             for g in generators])
        starts = (draws * (self.size - self.cfg.horizon + 1).clamp(min=1)).long()
        rows = starts[..., None] + torch.arange(self.cfg.horizon, device=starts.device)
        online = self.first_rows[:, None, None] + rows - self.offline
        rows = torch.where(rows < self.offline, rows, online)
        return fql.gather(self.data, rows, tasks, self.cfg)

    def online_rows(self, agent):
        return self.first_rows[agent] + torch.arange(self.added, device=self.cfg.device)

    def state_dict(self, agent):
        """Agent `agent`'s online rows: one reward and mask column (every task's holds its own)."""
        rows = self.online_rows(agent)
        columns = {k: (v[rows][:, :1] if k in ("rewards", "masks") else v[rows]).cpu()
                   for k, v in self.data.items()}
        return dict(added=self.added, rows=columns)

    def load_state_dicts(self, states):
        """Each agent's online rows from its state_dict."""
        self.added = states[0]["added"]
        self.size.fill_(self.offline + self.added)
        for agent, state in enumerate(states):
            for k, v in state["rows"].items():
                self.data[k][self.online_rows(agent)] = v.to(self.cfg.device)


def sample_balanced(offline, buffer, batch_size, generators=(None,), tasks=(0,)):
    """Half of each batch from the offline dataset, half from each agent's online transitions."""
    first = fql.sample_batch(offline, batch_size // 2, generators, tasks, cfg=buffer.cfg)
    second = buffer.sample(batch_size - batch_size // 2, generators, tasks)
    return {k: torch.cat([first[k], second[k]], dim=1) for k in first}


class Finetuning:
    """The environment side of offline-to-online fine-tuning for fql.train, for every agent of a
    grid: its own environment (its task's) in one vector env of worker processes, its own
    episodes and chunk queue (Rollouts), its own online rows (ReplayBuffer). Every executed action
    is its own transition (mask = 1 - terminated, terminal = the episode's end). An agent's episode
    starts from reset(seed=its seed + the online transitions so far), so that a resumed run can
    replay the episodes it was killed in. `workers(env_names)` makes the vector env (eval.train)."""

    def __init__(self, cfg, runs, train_data, workers):
        self.cfg = cfg
        # the official code shifts D4RL antmaze rewards online as it does offline
        self.reward_shift = -1.0 if cfg.env in fql.D4RL and cfg.env.startswith("antmaze") else 0.0
        self.seeds = np.array([run.seed for run in runs])
        self.rollouts = Rollouts(workers([run.env for run in runs]), len(runs))
        offline = {k: v[:0] for k, v in train_data.items()} if cfg.balanced_sampling else train_data
        self.buffer = ReplayBuffer(offline, len(runs), cfg.online_steps, cfg)
        self.sample = self.buffer.sample
        if cfg.balanced_sampling:
            self.sample = partial(sample_balanced, train_data, self.buffer)
        self.last_episode = [{} for _ in runs]

    def collect(self, policy):
        observations, actions, rewards, terminated, _, infos, next_observations = \
            self.rollouts.step(policy, self.seeds + self.buffer.added)
        # as offline: QC's --sparse, or the D4RL antmaze shift
        stored = -1.0 * (rewards != 0) if self.cfg.sparse else rewards + self.reward_shift
        self.buffer.add(dict(observations=observations, actions=actions, rewards=stored[:, None],
                             masks=1.0 - terminated[:, None], terminals=self.rollouts.ended,
                             next_observations=next_observations))
        for k in np.flatnonzero(self.rollouts.ended):
            self.last_episode[k] = {"exploration/return": float(self.rollouts.returns[k]),
                                    "exploration/length": int(self.rollouts.steps[k])}
            if "success" in infos:  # (not every env's)
                self.last_episode[k]["exploration/success"] = float(infos["success"][k])

    def log(self):
        size = self.buffer.offline + self.buffer.added
        return [dict(episode, **{"exploration/buffer_size": size}) for episode in self.last_episode]

    def state_dict(self, agent):
        """Agent `agent`'s part: its online rows, steps into its episode, the rest of its chunk."""
        steps = 0 if self.rollouts.ended[agent] else int(self.rollouts.steps[agent])
        collector = dict(steps=steps, queue=np.array(self.rollouts.queues[agent]).tolist(),
                         last_episode=self.last_episode[agent],
                         noise=self.rollouts.generators[agent].get_state() if steps else None)
        return dict(self.buffer.state_dict(agent), collector=collector)

    def load_state_dicts(self, states):
        """Where a killed run left off: each agent's episode replayed by its worker from its reset
        with the actions its buffer holds (exact where the reset's seed decides the start, as in
        OGBench's manipulation environments)."""
        self.buffer.load_state_dicts(states)
        collectors = [state["collector"] for state in states]
        rollouts = self.rollouts
        rollouts.steps = np.array([collector["steps"] for collector in collectors])
        rollouts.ended = rollouts.steps == 0
        self.last_episode = [collector["last_episode"] for collector in collectors]
        seeds = (self.seeds + self.buffer.added - rollouts.steps).tolist()  # of each one's episode
        episodes = []
        for k, steps in enumerate(rollouts.steps):  # each one's last `steps` online actions
            rows = self.buffer.online_rows(k)
            actions = self.buffer.data["actions"][rows[len(rows) - steps:]]
            episodes.append((seeds[k], actions.cpu().numpy()))
        rollouts.vector_env.set_attr("episode", episodes)
        observations, returns = zip(*rollouts.vector_env.call("replay"))
        rollouts.observations = np.stack(observations)
        rollouts.returns = np.array(returns)
        for k, collector in enumerate(collectors):
            rollouts.queues[k] = list(np.float32(collector["queue"]))
            if collector["noise"] is not None:  # in an episode
                rollouts.generators[k].set_state(collector["noise"])


@contextlib.contextmanager
def worker_pool(frame_stack=None):
    """`workers(env_names)`: a vector env (make_vector_env) whose worker processes end with the
    `with` block, whatever ends it; after an error, Ctrl-C or SIGTERM they are killed, not waited
    for."""
    vector_envs = []

    def workers(env_names):
        vector_envs.append(make_vector_env(env_names, frame_stack))
        return vector_envs[-1]

    error = True
    try:
        yield workers
        error = False
    finally:
        for vector_env in vector_envs:
            if error:
                for worker in vector_env.processes:
                    worker.kill()
            vector_env.close(terminate=error)


def train(cfg):
    """fql.train with evaluation in the environment and, with --online_steps, fine-tuning."""
    cfg = fql.resolve_config(cfg)
    if cfg.env.startswith("minari:"):  # one without an environment says so before the data loads
        make_env(cfg.env).close()
    with worker_pool(cfg.frame_stack) as workers:
        vector_envs = []

        def evaluation(policy, runs, step):
            """fql.train's `evaluate`: each agent's episodes in its run's env (its task's), all in
            one vector env made at the first evaluation (a worker per core, one per agent at
            least)."""
            if not vector_envs:
                per_agent = max(1, min(cfg.eval_episodes, os.cpu_count() // len(runs)))
                vector_envs.append(workers([run.env for run in runs for _ in range(per_agent)]))
            seeds = [run.seed + step for run in runs]
            results = evaluate(policy, vector_envs[0], cfg.eval_episodes, seeds)
            return [with_score(run.env, result) for run, result in zip(runs, results)]

        return fql.train(cfg, evaluation, partial(Finetuning, workers=workers))


# ---- Checkpoints ---------------------------------------------------------------------------------
def checkpoint_path(path):
    """A run folder means its checkpoint.pt."""
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.pt")
    if not os.path.isfile(path):
        raise UsageError(
            f"no checkpoint at {path}: give a run folder that holds checkpoint.pt, or the file")
    return path


def load_agent(path, device):
    """The one-seed agent saved in a checkpoint, on `device`, and the checkpoint's contents."""
    state = fql.read_checkpoint(path)
    cfg = fql.resolve_config(fql.Config(**dict(state["config"], device=device)))
    agent = fql.make_agent(cfg, state["observation_shape"], state["action_dim"])
    agent.load_state_dicts([state])
    return agent, state


# ---- Plots ---------------------------------------------------------------------------------------
PLOTTED = {
    "eval.csv": ["evaluation/success"],
    "train.csv": ["critic/critic_loss", "actor/bc_flow_loss", "actor/distill_loss", "actor/q"],
}
NOT_CONFIG = {"seed", "seeds", "run_dir", "resume", "device", "compile", "cuda_graph",
              "wandb_project", "dataset_dir", "benchmark", "eval_interval", "eval_episodes",
              "log_interval", "save_interval"}


def run_groups(run_dirs):
    """[(settings, config, runs, seeds)]: the run folders grouped by config, all but the seed (a
    grid's (task, alpha)), with config["env"] the dataset and config["task"] its task (or None);
    `settings` names what differs between the groups, the env and task aside."""
    if not run_dirs:
        raise UsageError("give one or more run folders")
    groups = {}
    for run in run_dirs:
        config_file = os.path.join(run, "config.json")
        if not os.path.isfile(config_file):
            raise UsageError(f"{run} is not an fql.py run folder (no config.json)")
        with open(config_file) as f:
            config = json.load(f)
        env, task = re.fullmatch(r"(.+?)(?:-singletask-task(\d+)-v0)?", config["env"]).groups()
        config.update(env=env, task=task and int(task))
        key = json.dumps({k: v for k, v in config.items() if k not in NOT_CONFIG}, sort_keys=True)
        groups.setdefault(key, []).append((run, config["seed"]))
    configs = [json.loads(key) for key in groups]
    varying = sorted({k for c in configs for k, v in c.items() if k not in ("env", "task")
                      and any(other.get(k) != v for other in configs)})
    settings = [", ".join(f"{k}={c[k]}" for k in varying) for c in configs]
    return [(s, c, *zip(*runs)) for s, c, runs in zip(settings, configs, groups.values())]


def plot_runs(args):
    """One panel per metric against steps; runs that share a config (all but the seed) are one
    line: their mean, with the range across seeds shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [(file, key) for file, keys in PLOTTED.items() for key in keys]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.6))
    for color, (settings, config, runs, _) in enumerate(run_groups(args.runs)):
        task = config["task"] and f"task {config['task']}"
        label = ", ".join(filter(None, [config["env"], task, settings])) + f" (n={len(runs)})"
        for ax, (file, metric) in zip(axes, metrics, strict=True):
            curves = [read_curve(os.path.join(run, file), metric) for run in runs]
            steps = sorted(set.intersection(*map(set, curves)))
            if not steps:
                continue
            values = np.array([[c[s] for s in steps] for c in curves])
            ax.plot(steps, values.mean(0), marker=".", color=f"C{color}", label=label)
            if len(runs) > 1:
                ax.fill_between(steps, values.min(0), values.max(0), color=f"C{color}", alpha=0.2)
    for ax, (_, metric) in zip(axes, metrics, strict=True):
        ax.set_title(metric)
        ax.set_xlabel("step")
    lines = {line.get_label(): line for ax in axes for line in ax.lines}  # a group's, once
    if not lines:
        plt.close(fig)
        raise UsageError("nothing to plot yet: these runs have no rows in train.csv or eval.csv")
    fig.legend(lines.values(), lines, loc="lower center", ncol=min(len(lines), 3), fontsize=8)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(args.output, dpi=100)
    plt.close(fig)
    print(f"wrote {args.output}")


def table_runs(args):
    """A row for each group of runs whose configs differ only in the seed (a grid's task and
    alpha): the mean and standard deviation over its seeds of each seed's score, computed as the
    paper's are: OGBench, the success in % averaged over the last three evaluations that all its
    seeds reached (`steps`); D4RL and Minari, the normalised score of the last (a Minari dataset
    without reference scores: its mean return). Runs of several tasks of one env add a row for
    their mean over those tasks, each seed's averaged first: the paper's figure for the env is that
    mean over its five (and shown for all five only). Printed as a Markdown table; CSV in
    `output`."""
    rows = []
    tasks = {}  # (env, settings): {task: {seed: score}}
    for settings, config, runs, seeds in run_groups(args.runs):
        env = config["env"]
        task = config["task"]
        last = env in fql.D4RL or env.startswith("minari:")  # a score, or else the return
        paths = [os.path.join(run, "eval.csv") for run in runs]
        curves = [read_curve(path, "evaluation/success") for path in paths]
        if last:
            curves = [read_curve(path, "evaluation/score") or read_curve(path, "evaluation/return")
                      for path in paths]
        steps = sorted(set.intersection(*map(set, curves)))[-1 if last else -3:]
        if not steps:
            raise UsageError(f"{', '.join(runs)}: no evaluation at a step all these runs reached")
        scores = [np.mean([curve[step] for step in steps]) * (1 if last else 100)
                  for curve in curves]
        tasks.setdefault((env, settings), {})[task] = dict(zip(seeds, scores))
        task_env = f"{env}-singletask-task{task}-v0" if task else env
        paper = fql.PAPER.get(task_env, "")  # OGBench's per-env figures are means over its tasks
        rows.append(table_row(env, task, settings, steps, scores, paper))
    for (env, settings), by_task in tasks.items():
        common = sorted(set.intersection(*map(set, by_task.values())))  # seeds of every task
        if len(by_task) > 1 and common:
            scores = [np.mean([scores[seed] for scores in by_task.values()]) for seed in common]
            task = "mean of " + " ".join(map(str, by_task))
            paper = fql.PAPER.get(env, "") if len(by_task) == 5 else ""  # the paper's: all five
            rows.append(table_row(env, task, settings, "", scores, paper))
    for line in [rows[0], ["---"] * len(rows[0]), *map(dict.values, rows)]:  # Markdown
        print("|", " | ".join(map(str, line)), "|")
    if args.output:
        fql.write_csv(rows, args.output)
    return rows


def table_row(env, task, settings, steps, scores, paper):
    return dict(env=env, task=task or "", settings=settings, seeds=len(scores),
                steps=" ".join(map(str, steps)), mean=f"{np.mean(scores):.1f}",
                std=f"{np.std(scores):.1f}", paper=paper)


def read_curve(path, metric):
    if not os.path.isfile(path):
        return {}
    with open(path, newline="") as f:
        return {int(r["step"]): float(r[metric]) for r in csv.DictReader(f) if r.get(metric)}


# ---- Benchmark: the training step in each execution mode, on random data -------------------------
def benchmark(cfg, shapes=None, seconds=3.0):
    """--benchmark: updates/s of the training step in each mode (--no_compile: eager only), for
    one agent and for the grid, on random data of the env's shapes (or `shapes`: (observation
    shape, action size)); then, for the env's own state shapes, env steps/s of the online loop:
    every agent's environment one step (worker processes) and one batched policy call. Returns
    {(mode, agents): steps/s}."""
    # writes nothing: every agent's folder inside /dev/null
    cfg = replace(fql.resolve_config(cfg), run_dir=os.devnull + "/{task}_{alpha}_{seed}",
                  online_steps=10**5)
    observation_shape, action_dim = shapes or env_shapes(cfg.env)
    pixels = len(observation_shape) == 3
    data = random_data(cfg, observation_shape, action_dim)
    observation_shape = fql.stacked_shape(data)
    on_cuda = cfg.device.startswith("cuda")
    torch.set_float32_matmul_precision("high" if on_cuda else "highest")  # as in training
    device_name = torch.cuda.get_device_name(cfg.device) if on_cuda else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"FQL training step, observation {observation_shape}, action {action_dim}, horizon "
          f"{cfg.horizon}, batch {cfg.batch_size}, critic {cfg.value_hidden_dims}, actors "
          f"{cfg.actor_hidden_dims}, encoder {cfg.encoder}; {device_name}, "
          f"torch {torch.__version__}")
    modes = {"eager": dict(compile=False, cuda_graph=False)}
    if cfg.compile:
        modes["compile"] = dict(compile=True, cuda_graph=False)
    if cfg.compile and on_cuda:
        modes["compile + CUDA graph"] = dict(compile=True, cuda_graph=True)
    if not (pixels or shapes):  # (no fine-tuning on pixels)
        modes["online loop"] = {}
    one = fql.agent_runs(cfg)[0]
    results = {}
    with worker_pool(cfg.frame_stack) as workers:
        for name, flags in modes.items():
            for grid in [one] + [cfg] * (len(fql.agent_grid(cfg)) > 1):  # one agent, then the grid
                agents = len(fql.agent_grid(grid))
                agent = fql.make_agent(replace(grid, **flags), observation_shape,
                                       action_dim)
                if flags:
                    step = fql.make_train_step(agent, partial(
                        fql.sample_batch, data, p_aug=cfg.p_aug, cfg=cfg))
                    rate = steps_per_second(lambda: step(False), seconds,
                                            lambda: step(True)["critic/critic_loss"].cpu())
                else:
                    online = Finetuning(grid, fql.agent_runs(grid), data, workers)
                    rate = steps_per_second(lambda: online.collect(agent.act), seconds)
                results[name, agents] = rate
                unit = "updates/s" if flags else "env steps/s"
                if agents > 1:
                    unit = (f"{unit} of {agents} agents = {rate * agents:.1f} agent-{unit}, "
                            f"{rate * agents / results[name, 1]:.2f}x one agent")
                print(f"{name:<22} {rate:9.1f} {unit}", flush=True)
    return results


def random_data(cfg, observation_shape, action_dim):
    """A random dataset of these shapes on the device, as fql.to_device gives it: 100K transitions
    (pixels: 10K compact frames, as the pixel datasets), a column of rewards and masks per task."""
    rng = np.random.default_rng(cfg.seed)
    if len(observation_shape) == 3:
        n = 10_000
        observations = rng.integers(0, 256, (n, *observation_shape), dtype=np.uint8)
        layout = dict(valids=np.arange(n) < n - 1)
    else:
        n = 100_000
        observations = rng.normal(size=(n, *observation_shape))
        layout = dict(next_observations=observations[::-1])
    tasks = len(cfg.tasks or [0])
    dataset = dict(observations=observations, actions=rng.uniform(-1, 1, (n, action_dim)),
                   rewards=-rng.integers(0, 2, (n, tasks)), masks=np.ones((n, tasks)),
                   terminals=np.arange(n) % 1000 == 999, **layout)
    return fql.to_device(dataset, cfg.device, cfg.frame_stack)


def steps_per_second(step, seconds, wait=lambda: None):
    """Calls of step() per second over `seconds` (the device waited for by wait()), after four:
    compilation, graph recording and the environments' first resets happen there."""
    for _ in range(4):
        step()
    wait()
    start = time.perf_counter()
    steps = 0
    while time.perf_counter() - start < seconds:
        step()
        steps += 1
    wait()
    return steps / (time.perf_counter() - start)


# ---- Command line --------------------------------------------------------------------------------
@dataclass
class EvalArgs:
    checkpoint: str
    """run folder (its checkpoint.pt) or checkpoint file"""
    episodes: int = 50
    """episodes to evaluate"""
    num_envs: int = 0
    """environments stepping in parallel; 0: one per CPU core, at most `episodes`"""
    seed: int = 0
    """episode i starts from env.reset(seed=seed + i)"""
    video_episodes: int = 0
    """also render this many episodes to mp4 files in <run>/videos"""
    frame_skip: int = 2
    """keep every frame_skip-th frame in videos"""
    device: str = "auto"
    """torch device; auto: cuda when available, else cpu"""


@dataclass
class FinetuneArgs:
    checkpoint: tuple[str, ...]
    """run folders (their checkpoint.pt) or checkpoint files to start from: one run, or a grid's
    runs (every combination of some tasks, alphas and seeds, such as runs/<env>__seed*)"""
    online_steps: int = 1_000_000
    """environment steps, one update each"""
    eval_interval: int = 100_000
    """steps between evaluations (0: never)"""
    eval_episodes: int = 50
    """episodes per evaluation"""
    balanced_sampling: bool = False
    """batches half from the offline dataset, half from the online transitions"""
    log_interval: int = 5_000
    """steps between rows of train.csv"""
    save_interval: int = 100_000
    """steps between checkpoints"""
    run_dir: str | None = None
    """where the fine-tuning run goes (a grid's: <run_dir>/task<t>__...); default <run>-finetune"""
    resume: bool = False
    """continue a killed fine-tuning run in run_dir"""
    device: str = "auto"
    """torch device; auto: cuda when available, else cpu"""


@dataclass
class PlotArgs:
    runs: tyro.conf.Positional[list[str]]
    """run folders made by fql.py"""
    output: str = "runs.png"
    """PNG file to write"""


@dataclass
class TableArgs:
    runs: tyro.conf.Positional[list[str]]
    """run folders made by fql.py"""
    output: str | None = None
    """also write the table to this CSV file"""


def run_evaluation(args):
    """Evaluate, film, plot and fine-tune FQL runs made by fql.py (python eval.py [finetune | plot |
    table] ...); this command: a checkpoint's success, return and length, and videos."""
    if args.episodes <= 0 or args.video_episodes < 0 or args.frame_skip <= 0:
        raise UsageError("--episodes and --frame_skip must be positive, --video_episodes >= 0")
    path = checkpoint_path(args.checkpoint)
    agent, state = load_agent(path, args.device)
    env_name = agent.cfg.env  # its task's, for an agent of a grid
    with worker_pool(agent.cfg.frame_stack) as workers:
        vector_env = workers([env_name] * min(args.episodes, args.num_envs or os.cpu_count()))
        with tqdm(total=args.episodes, unit="episode") as progress:
            (result,) = evaluate(agent.act, vector_env, args.episodes, [args.seed], progress)
    result = dict(with_score(env_name, result), env=env_name, episodes=args.episodes,
                  seed=args.seed, step=state["step"], checkpoint=path)
    run_dir = os.path.dirname(path)
    if args.video_episodes:
        videos = os.path.join(run_dir, "videos", f"step{state['step']}")
        result["videos"] = record_videos(agent.act, env_name, args.video_episodes, args.seed,
                                         videos, args.frame_skip, agent.cfg.frame_stack)
    with open(os.path.join(run_dir, f"eval_step{state['step']}_seed{args.seed}.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"{env_name} at step {state['step']}: success {result['success']:.3f}, return "
          f"{result['return']:.1f}, length {result['length']:.1f} over {args.episodes} episodes")
    return result


def run_finetune(args):
    """The checkpoints (one, or a grid's: every combination of some tasks, alphas and seeds, all
    else equal) fine-tuned as one grid, each agent from a copy of its checkpoint in its own new
    folder: its run's folder + "-finetune", or in --run_dir. Nothing is written before all are
    checked."""
    saved = {}  # (env, alpha, seed): its checkpoint and run (load_agent refuses a bad one)
    for path in map(checkpoint_path, args.checkpoint):
        state = load_agent(path, "cpu")[1]
        run = fql.Config(**dict(state["config"], run_dir=os.path.dirname(os.path.abspath(path))))
        saved[grid_key(run)] = state, run
    envs, alphas, seeds = (sorted(set(axis)) for axis in zip(*saved))
    state, first = next(iter(saved.values()))
    changes = {k: v for k, v in asdict(args).items() if k != "checkpoint"}
    changes.update(offline_steps=state["step"], resume=True, seed=None, seeds=tuple(seeds),
                   run_dir=args.run_dir or folder_template(first) + "-finetune",
                   alphas=tuple(alphas) if len(alphas) > 1 else None)
    if len(envs) > 1:  # ...-task<N>-v0
        changes.update(env=re.sub(r"-task\d+-v0$", "-v0", first.env),
                       tasks=tuple(int(env[-4]) for env in envs))
    cfg = fql.resolve_config(replace(first, **changes))
    runs = fql.agent_runs(cfg)
    if len(runs) != len(args.checkpoint) or any(grid_key(run) not in saved for run in runs):
        raise UsageError("these checkpoints are not a grid (every combination of their tasks, "
                         "alphas and seeds, each once): fine-tune them apart")
    for run in runs:
        state, saved_run = saved[grid_key(run)]
        free = fql.RESUMABLE_CHANGES | changes.keys()
        if state["step"] != cfg.offline_steps or any(
                getattr(saved_run, k) != v for k, v in asdict(run).items() if k not in free):
            raise UsageError(f"{saved_run.run_dir} and {first.run_dir} differ in more than task, "
                             "alpha and seed (or their checkpoints' step): fine-tune them apart")
        if os.path.exists(run.checkpoint) and not args.resume:
            raise UsageError(f"{run.run_dir} already holds a run; add --resume to continue it, or "
                             "pass another --run_dir")
    for run in runs:  # a new fine-tuning run continues the offline agent, in its own folder
        if not os.path.exists(run.checkpoint):
            os.makedirs(run.run_dir, exist_ok=True)
            state = saved[grid_key(run)][0]
            fql.write_atomically(run.checkpoint, partial(
                torch.save, dict(state, config=asdict(run), buffer=None)))
    return train(cfg)


def grid_key(run):
    """A run's place in a grid: (env, alpha, seed)."""
    return run.env, run.alpha, run.seed


def folder_template(run):
    """A run's folder with its task, alpha and seed where it names them as placeholders."""
    task = re.search(r"(?<=-task)\d+(?=-v0$)", run.env)
    folder = run.run_dir
    for name, value in (("task", task and task[0]), ("alpha", f"{run.alpha:g}"),
                        ("seed", run.seed)):
        folder = re.sub(rf"{name}{value}(?![\d.])", f"{name}{{{name}}}", folder)
    return folder


COMMANDS = {"evaluate": (EvalArgs, run_evaluation), "finetune": (FinetuneArgs, run_finetune),
            "plot": (PlotArgs, plot_runs), "table": (TableArgs, table_runs)}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv and argv[0] in COMMANDS else "evaluate"
    args_type, run = COMMANDS[command]
    try:
        args = tyro.cli(args_type, args=argv[command != "evaluate":], use_underscores=True,
                        prog=f"eval.py {command}", description=run.__doc__)
        return run(args)
    except UsageError as err:
        sys.exit(f"eval.py: error: {err}")
    except KeyboardInterrupt:
        hint = "; the same command with --resume continues the fine-tuning run"
        sys.exit("eval.py: interrupted" + (hint if command == "finetune" else ""))


if __name__ == "__main__":
    main()
