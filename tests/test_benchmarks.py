"""The benchmark scripts that compare against PyTorch and break a step down by op still run and report sanely."""

from __future__ import annotations

import argparse
import os
import re
import sys

from vgpt_jax.benchmarks import compile_time, op_profile, reference_step
from vgpt_jax.layout import interleaved_layout, training_layout

TINY = ["--frames=4", "--size=16", "--layers=1", "--hidden=32", "--heads=2", "--mlp=64"]


def test_reference_step_runs_both_steps_on_the_same_split_and_prints_the_ratio(monkeypatch, capsys):
  """Needs torch and transformers (requirements-test.txt); both steps run, alternated, and the table names their
  token counts: the project's fixed-length layout and the reference's interleaved one for the same clips."""
  monkeypatch.setattr(sys, "argv", ["reference_step", *TINY, "--clips=1,3", "--repeats=2"])
  reference_step.main()
  row = capsys.readouterr().out.strip().splitlines()[-1]
  cells = [c.strip() for c in row.strip("|").split("|")]
  assert cells[0] == "4" and cells[1] == "4"  # frames, tokens per frame (16x16 frames -> 4x4 latents -> 4 patches)
  assert int(cells[2]) == training_layout(4, 4).length
  assert int(cells[5]) == interleaved_layout([1, 3], 4).length
  project_s, torch_s = float(cells[4]), float(cells[6])
  assert project_s > 0 and torch_s > 0
  assert float(cells[7].rstrip("x")) > 0  # pytorch / project (from the unrounded medians)
  # The project's forward pass (s) and backward / forward: a number, of any sign at this size (timing noise).
  assert float(cells[8]) > 0 and float(cells[9]) == float(cells[9])


def test_op_profile_splits_a_step_into_forward_and_backward_ops(monkeypatch, capsys):
  monkeypatch.setattr(sys, "argv", ["op_profile", "--preset=test", *TINY, "--top=3", "--repeats=1"])
  op_profile.main()
  out = capsys.readouterr().out
  table = re.search(r"\| forward \| ([\d| .]+)\|\n\| backward \| ([\d| .]+)\|", out)
  assert table, out
  forward, backward = ([float(x) for x in g.split("|")] for g in table.groups())
  assert forward[-1] > 0 and backward[-1] > 0
  assert backward[1] > 0  # the backward pass has matmuls (weight and input gradients)
  for p in ("forward", "backward"):
    block = out.split(f"top 3 ops, {p}")[1]
    assert len(re.findall(r"^\| [\d.]+ \| \S+ \|", block, flags=re.M)) >= 3


def test_compile_time_measures_tracing_compiling_and_a_step():
  """The in-process half of the compile-time benchmark (the table runs it once per setting, in fresh processes)."""
  args = argparse.Namespace(preset="test", frames=5, size=16, batch_size=2, steps=2)
  measured = compile_time.measure(args)
  assert set(measured) == {"trace_lower_s", "compile_cpu_s", "step_s"}
  assert all(value > 0 for value in measured.values()), measured
  # This session compiles the way the table's last row measures.
  assert os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] == "1"
  assert set(compile_time.CHEAP_COMPILES["XLA_FLAGS"].split()) <= set(os.environ["XLA_FLAGS"].split())


def test_attention_benchmark_runs_in_the_dtype_asked_and_auto_is_float32_on_cpu():
  from vgpt_jax.benchmarks import benchmark_dtype
  from vgpt_jax.benchmarks.attention import measure

  assert benchmark_dtype("auto") == "float32" and benchmark_dtype("bfloat16") == "bfloat16"
  row = measure(4, 20, heads=1, head_dim=16, path="chunked", block=16, max_gib=1.0, dtype="bfloat16")
  assert row["dtype"] == "bfloat16" and row["tokens"] == 154 and row["time (s)"] > 0
  assert 0 < row["visible share"] <= row["tiles kept"] <= 1


def test_device_check_runs_at_toy_sizes_and_writes_its_table_as_json(tmp_path, capsys):
  """On CPU: the tiled path against dense (forward and gradients, bfloat16 and float32), the attention timings
  and a train step, one table printed and the same rows in JSON."""
  import json

  from vgpt_jax.benchmarks import device_check

  rows = device_check.main(["--output", str(tmp_path / "check.json")])
  assert json.loads((tmp_path / "check.json").read_text()) == json.loads(json.dumps(rows))
  correct = [r for r in rows if r["part"] == "correct"]
  assert {(r["path"], r["dtype"]) for r in correct} == {("chunked", "bfloat16"), ("chunked", "float32")}
  assert all(r["ok"] and r["max_rel_error"] < device_check.TOLERANCE[r["dtype"]] for r in correct)
  assert {r["path"] for r in rows if r["part"] == "attention"} == {"dense", "chunked"}
  (step,) = [r for r in rows if r["part"] == "train step"]
  assert step["step (s)"] > 0 and "| correct | chunked |" in capsys.readouterr().out


def test_device_check_tpu_baseline_lowers_for_tpu_and_is_causal_attention():
  """Without a TPU: the splash causal baseline of device_check, forward and backward, passes the Mosaic lowering
  and equals causal attention (the GPU one, cuDNN, cannot lower without cuDNN present)."""
  import jax
  import jax.numpy as jnp

  from vgpt_jax.benchmarks import device_check

  name, attend = device_check.causal_flash("tpu", 512, 2, 128)
  shape = jax.ShapeDtypeStruct((1, 512, 2, 128), jnp.bfloat16)
  text = device_check.flash_step(attend).trace(shape, shape, shape).lower(lowering_platforms=("tpu",)).as_text()
  assert name == "splash causal" and text.count("tpu_custom_call") >= 2  # forward and backward kernels
  assert device_check.causal_flash("cpu", 512, 2, 128) is None
  # And it computes causal attention (Pallas interpret mode on CPU).
  _, attend = device_check.causal_flash("tpu", 256, 2, 128, interpret=True)
  q, k, v = (jax.random.normal(jax.random.key(i), (1, 256, 2, 128)) for i in range(3))
  got, want = jax.jit(attend)(q, k, v), jax.nn.dot_product_attention(q, k, v, is_causal=True)
  assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 1e-5
