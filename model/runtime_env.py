"""What this library sets in the process environment, and an environment without it for other programs.

Rule: the library sets only `OMP_WAIT_POLICY=PASSIVE`, and only when the user set no policy,
before torch loads (its OpenMP runtime reads the variable once, at load): torch's own threads
then sleep between its parallel regions, which on a small PC keeps them off the cores the
engine's kernels need (the kernels run on their own pool, see model/kernels/pool.c). A program
this process starts that is not the engine (a peer in a benchmark, a tool) gets
`foreign_env()`: the environment as the user had it, with nothing of ours in it.
No torch here: this runs when `model` is imported.
"""
from __future__ import annotations

import os

OUR_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}
_added: dict[str, str] = {}


def apply() -> None:
    """Set our defaults where the user chose nothing (called by `model/__init__`, before torch)."""
    for name, value in OUR_DEFAULTS.items():
        if name not in os.environ:
            os.environ[name] = value
            _added[name] = value


def added() -> dict[str, str]:
    """The variables this library put into the environment (and their values)."""
    return dict(_added)


def foreign_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) without the variables this library added,
    unless something changed them since (then they are someone's choice, and stay)."""
    env = dict(os.environ if base is None else base)
    for name, value in _added.items():
        if env.get(name) == value:
            del env[name]
    return env
