"""Sweep: the tiny model's learning rate (with a warmup that grows with it) over two seeds, 6 runs.

  python -m launch.sweep --sweep=configs/sweeps/tiny_lr.py --launcher=inline --dry_run
The format is described in launch/sweep.py. The two keys of the first axis are zipped (3 pairs), the
second axis multiplies them (x2 seeds).
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  return ml_collections.ConfigDict(
    dict(
      base_config="configs/tiny.py",
      workdir_root="runs/sweeps/tiny_lr",
      fixed={"train.steps": 300, "train.log_every": 10},
      sweep=[
        {"optim.lr": [3e-4, 1e-3, 3e-3], "optim.warmup_steps": [50, 100, 200]},
        {"seed": [0, 1]},
      ],
    ),
    allow_dotted_keys=True,  # the keys are config paths such as "optim.lr"
  )
