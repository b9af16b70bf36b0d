"""Evaluation of FQL policies in OGBench environments.

fql.py calls `evaluate` every `--eval_interval` steps. Success follows OGBench: `info['success']`
at the last step of an episode, averaged over episodes.
"""
from collections.abc import Callable

import numpy as np


def evaluate(policy: Callable[[np.ndarray], np.ndarray], env, episodes: int, seed: int) -> dict:
    """Run `episodes` episodes of `policy` (observation -> action in [-1, 1]) in `env`.

    Episode i is reset with seed `seed + i`, so the same seed replays the same starts.
    Returns the success rate, mean return and mean length.
    """
    successes, returns, lengths = [], [], []
    for episode in range(episodes):
        observation, info = env.reset(seed=seed + episode)
        done, episode_return, length = False, 0.0, 0
        while not done:
            action = np.clip(policy(observation), -1, 1)
            observation, reward, terminated, truncated, info = env.step(action)
            done = terminated or truncated
            episode_return += float(reward)
            length += 1
        successes.append(float(info["success"]))
        returns.append(episode_return)
        lengths.append(length)
    return {"success": float(np.mean(successes)), "return": float(np.mean(returns)), "length": float(np.mean(lengths))}
