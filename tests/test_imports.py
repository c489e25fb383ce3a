"""The module boundaries DESIGN.md states: what samples, evaluates or exports never imports the training step."""

from tests.conftest import run_python

USERS_OF_A_CHECKPOINT = ("sampler", "sample", "evaluate", "export", "checkpoint", "data.held_out", "rollouts", "run")


def test_sampling_and_export_do_not_import_the_train_step_or_the_optimizer():
  out = run_python(
    f"""
    import importlib, sys
    for name in {USERS_OF_A_CHECKPOINT!r}:
      importlib.import_module("vgpt_jax." + name)
    print("loaded", sorted(m for m in ("vgpt_jax.train_step", "vgpt_jax.train", "optax") if m in sys.modules))
    """
  )
  assert "loaded []" in out, out
