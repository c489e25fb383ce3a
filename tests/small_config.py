"""The test suite's small config as a config file, for command-line runs in tests.

python -m vgpt_jax.train --config=tests/small_config.py --workdir=...
"""

from tests.conftest import small_config


def get_config(arg: str | None = None):
  del arg
  return small_config()
