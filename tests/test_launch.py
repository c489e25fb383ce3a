"""Launchers: exact dry-run commands, the slurm script run under bash with stand-in srun, a real local
multi-process run of a stand-in job (including failure and signal handling), and sweep expansion."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from launch import common, local, slurm, sweep, tpu_pod

REPO = Path(__file__).resolve().parents[1]

# A stand-in for vgpt_jax.train: reports its flags, records its pid, and behaves as its --config says.
FAKE_JOB = """
import os, signal, sys, time
flags = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
pid = int(flags.get("process_id", 0))
mode = os.path.basename(flags["config"])
workdir = flags["workdir"]
os.makedirs(workdir, exist_ok=True)
print(f"process {pid} of {flags.get('num_processes')} at {flags.get('coordinator_address')} "
      f"on {os.environ.get('JAX_PLATFORMS')} overrides {sorted(k for k in flags if k.startswith('config.'))}")
with open(os.path.join(workdir, f"pid{pid}"), "w") as f:
  f.write(str(os.getpid()))
if mode == "stubborn":
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
if mode in ("fail", "stubborn") and pid == 1:
  for _ in range(100):  # let process 0 start before failing
    if os.path.exists(os.path.join(workdir, "pid0")):
      break
    time.sleep(0.05)
  sys.exit(1 if mode == "fail" else 3)
if mode in ("fail", "stubborn", "sleep"):
  print("sleeping", flush=True)
  time.sleep(60)
"""


@pytest.fixture
def fake_job(tmp_path: Path, monkeypatch) -> str:
  """Module name of the stand-in job, importable by children (PYTHONPATH) and by this process's children."""
  (tmp_path / "fake_job.py").write_text(FAKE_JOB)
  path = os.pathsep.join([str(tmp_path), str(REPO), os.environ.get("PYTHONPATH", "")])
  monkeypatch.setenv("PYTHONPATH", path)
  return "fake_job"


# ---------------------------------------------------------------- common


def test_train_command_and_overrides():
  assert common.format_value(1e-3) == "0.001"
  assert common.format_value([1, 2]) == "(1, 2)"
  assert common.format_value(True) == "True"
  assert common.parse_override("optim.lr=3e-4") == ("optim.lr", "3e-4")
  assert common.parse_override("data.name=a=b") == ("data.name", "a=b")
  for bad in ("optim.lr", "=1", "config.optim.lr=1", "a b=1"):
    with pytest.raises(Exception, match="KEY=VALUE"):
      common.parse_override(bad)
  assert common.train_command("configs/tiny.py", "w", [("train.steps", 5)], distributed="on", process_id=0) == [
    "python",
    "-m",
    "vgpt_jax.train",
    "--config=configs/tiny.py",
    "--workdir=w",
    "--config.train.steps=5",
    "--distributed=on",
    "--process_id=0",
  ]
  assert common.remote_shell(["python3", "x y"], cwd="~/my dir", env={"A": "1 2"}) == (
    "cd ~/'my dir' && env 'A=1 2' python3 'x y'"
  )
  assert common.render([["a"], ["b c"]]) == ["a &", "'b c' &", "wait"]


# ---------------------------------------------------------------- tpu_pod


def test_tpu_pod_dry_run_exact(capsys):
  argv = ["--tpu_name=my-tpu", "--zone=us-central2-b", "--project=proj", "--config=configs/paper.py:stage=1"]
  argv += ["--workdir=gs://bucket/run", "--override", "train.steps=10", "--setup", "--dry_run"]
  assert tpu_pod.main(argv) == 0
  ssh = "gcloud compute tpus tpu-vm ssh my-tpu --zone=us-central2-b --project=proj --worker=all"
  assert capsys.readouterr().out.splitlines() == [
    f"{ssh} '--command=cd ~/vgpt_jax && python3 -m pip install -r requirements.txt'",
    f"{ssh} '--command=cd ~/vgpt_jax && python3 -m vgpt_jax.train --config=configs/paper.py:stage=1 "
    "--workdir=gs://bucket/run --config.train.steps=10 --distributed=on'",
  ]


def test_tpu_pod_multislice_env_per_slice(capsys):
  argv = ["--tpu_name=ms", "--zone=z", "--num_slices=3", "--coordinator_host=10.0.0.2", "--config=c.py"]
  argv += ["--workdir=gs://b/r", "--override=data.name=a b", "--dry_run"]
  assert tpu_pod.main(argv) == 0
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 4 and lines[-1] == "wait"
  for i, line in enumerate(lines[:3]):
    assert line.endswith(" &")
    words = shlex.split(line[: -len(" &")])
    assert words[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", f"ms-{i}"]
    remote = words[-1].removeprefix("--command=")
    assert shlex.split(remote) == [
      "cd",
      "~/vgpt_jax",
      "&&",
      "env",
      "MEGASCALE_COORDINATOR_ADDRESS=10.0.0.2:8080",
      "MEGASCALE_NUM_SLICES=3",
      f"MEGASCALE_SLICE_ID={i}",
      "python3",
      "-m",
      "vgpt_jax.train",
      "--config=c.py",
      "--workdir=gs://b/r",
      "--config.data.name=a b",
      "--distributed=on",
    ]
  with pytest.raises(SystemExit, match="coordinator_host"):
    tpu_pod.main(["--tpu_name=ms", "--zone=z", "--num_slices=2", "--config=c.py", "--workdir=w", "--dry_run"])


def test_tpu_pod_stop_kills_only_the_train_job(capsys):
  assert tpu_pod.main(["--tpu_name=t", "--zone=z", "--stop", "--dry_run"]) == 0
  (line,) = capsys.readouterr().out.splitlines()
  remote = shlex.split(line)[-1].removeprefix("--command=")
  pattern = tpu_pod.stop_pattern()
  quoted = shlex.quote(pattern)
  assert remote == f"if pkill -TERM -f {quoted}; then sleep 10; pkill -KILL -f {quoted} || true; fi"
  assert "pkill python" not in remote and not re.search(r"pkill (-\w+ )*python", remote)
  for cmdline in (
    "python -m vgpt_jax.train --config=c",
    "/usr/bin/python3.11 -m vgpt_jax.train",
    "bash -c cd ~/vgpt_jax && python3 -m vgpt_jax.train --distributed=on",
  ):
    assert re.search(pattern, cmdline), cmdline
  for cmdline in ("python", "python3", "python train.py", "python -m vgpt_jax.train_step", "python -m other", remote):
    assert not re.search(pattern, cmdline), cmdline  # never bare Python, nor the shell running pkill


def test_stop_pattern_under_pgrep():
  """The same regex through procps' ERE: it finds a decoy train process and not a decoy bare python."""
  decoy = subprocess.Popen(["bash", "-c", 'exec -a "python3 -m vgpt_jax.train --decoy" sleep 30'])
  bare = subprocess.Popen(["bash", "-c", 'exec -a "python3" sleep 30'])
  try:
    time.sleep(0.3)
    found = subprocess.run(["pgrep", "-f", tpu_pod.stop_pattern()], capture_output=True, text=True).stdout.split()
    assert str(decoy.pid) in found and str(bare.pid) not in found
  finally:
    for p in (decoy, bare):
      p.kill()
      p.wait()


# ---------------------------------------------------------------- slurm


def test_slurm_script_lines():
  script = slurm.build_script(
    "configs/paper.py:stage=1",
    "/shared/runs/s1",
    nodes=4,
    gpus_per_node=8,
    cpus_per_task=32,
    time="02:00:00",
    job_name="vgpt-s1",
    partition="gpu",
    account="acct",
    overrides=[("train.steps", 10)],
    repo_dir="/shared/vgpt_jax",
  )
  lines = script.splitlines()
  assert lines[0] == "#!/bin/bash"
  assert [line for line in lines if line.startswith("#SBATCH")] == [
    "#SBATCH --job-name=vgpt-s1",
    "#SBATCH --nodes=4",
    "#SBATCH --ntasks-per-node=1",
    "#SBATCH --gpus-per-node=8",
    "#SBATCH --cpus-per-task=32",
    "#SBATCH --time=02:00:00",
    "#SBATCH --partition=gpu",
    "#SBATCH --account=acct",
    "#SBATCH --output=/shared/runs/s1/slurm-%j.out",
  ]
  assert "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9" in lines
  assert f"export XLA_FLAGS='{slurm.DEFAULT_XLA_FLAGS}'" in lines
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in slurm.DEFAULT_XLA_FLAGS
  assert 'COORD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)' in lines
  (srun,) = [line for line in lines if line.startswith("srun ")]
  # The per-task variables sit inside single quotes: the batch shell must not expand them.
  assert srun.endswith(f"--distributed=on {slurm.PER_TASK_FLAGS}'")
  assert slurm.PER_TASK_FLAGS.endswith('--num_processes="$SLURM_NTASKS" --process_id="$SLURM_PROCID"')
  assert shlex.split(srun)[:4] == ["srun", "--kill-on-bad-exit=1", "--cpus-per-task=32", "bash"]
  with pytest.raises(ValueError, match="log_dir"):
    slurm.build_script("c.py", "gs://b/r", nodes=1)


def test_slurm_script_gives_each_task_its_own_process_id(tmp_path: Path):
  """Run the script under bash with stand-ins for srun (2 tasks), scontrol and python3."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  stubs = {
    "srun": 'while [[ "$1" == --* ]]; do shift; done\nfor ((i=0; i<SLURM_NTASKS; i++)); do SLURM_PROCID=$i "$@"; done',
    "scontrol": "for n in node-a node-b node-c; do echo $n; sleep 0.05; done",  # head -n1 leaves it a SIGPIPE
    "python3": "printf '<%s>' \"$@\"; echo",
  }
  for name, body in stubs.items():
    (bin_dir / name).write_text("#!/bin/bash\n" + body + "\n")
    (bin_dir / name).chmod(0o755)
  script = slurm.build_script("c.py", "w", nodes=2, overrides=[("data.name", "it's a test")], repo_dir=str(tmp_path))
  (tmp_path / "job.sbatch").write_text(script)
  env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node-[a-b]"}
  env.update(SLURM_JOB_ID="123", SLURM_NTASKS="2", SLURM_PROCID="99")  # 99: what an early expansion would see
  result = subprocess.run(["bash", str(tmp_path / "job.sbatch")], env=env, capture_output=True, text=True, timeout=20)
  assert result.returncode == 0, result.stderr
  tasks = [line for line in result.stdout.splitlines() if line.startswith("<")]
  common_args = "<-m><vgpt_jax.train><--config=c.py><--workdir=w><--config.data.name=it's a test><--distributed=on>"
  assert tasks == [
    f"{common_args}<--coordinator_address=node-a:20123><--num_processes=2><--process_id={i}>" for i in range(2)
  ]


def test_slurm_main_dry_run_and_write(tmp_path: Path, capsys):
  workdir = tmp_path / "runs" / "s1"
  argv = ["--nodes=2", "--config=configs/tiny.py", f"--workdir={workdir}", "--partition=gpu"]
  assert slurm.main([*argv, "--dry_run"]) == 0
  out = capsys.readouterr().out.splitlines()
  assert out[0] == "#!/bin/bash" and "#SBATCH --job-name=vgpt-s1" in out
  assert out[-1] == f"sbatch {workdir}/vgpt-s1.sbatch"
  assert not workdir.exists()  # a dry run writes nothing
  assert slurm.main(argv) == 0  # writes the script, does not submit
  assert (workdir / "vgpt-s1.sbatch").read_text().splitlines() == out[:-1]


def test_default_xla_flags_are_known_to_this_jaxlib():
  """XLA aborts on an unknown flag; the GPU flags are parsed on CPU too, so this catches a renamed one."""
  env = {**os.environ, "XLA_FLAGS": slurm.DEFAULT_XLA_FLAGS, "JAX_PLATFORMS": "cpu"}
  code = "import jax, jax.numpy as jnp; print(jnp.ones(2).sum())"
  result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr[-2000:]


# ---------------------------------------------------------------- local


def test_local_commands_distinct_ids_same_coordinator():
  commands = local.build_commands(
    "configs/tiny.py", "runs/l", 3, 1234, overrides=[("train.steps", 5)], devices_per_process=2, python="python"
  )
  assert [shlex.join(c) for c in commands] == [
    "env PYTHONUNBUFFERED=1 JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m "
    "vgpt_jax.train --config=configs/tiny.py --workdir=runs/l --config.train.steps=5 --distributed=on "
    f"--coordinator_address=127.0.0.1:1234 --num_processes=3 --process_id={i}"
    for i in range(3)
  ]
  gpu = local.build_commands("c", "w", 2, 1, platform="cuda", devices_per_process=2, python="python")
  assert [c[3] for c in gpu] == ["CUDA_VISIBLE_DEVICES=0,1", "CUDA_VISIBLE_DEVICES=2,3"]


def test_local_dry_run(capsys):
  assert local.main(["--config=c.py", "--workdir=w", "--num_processes=2", "--dry_run"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 3 and lines[2] == "wait"
  ids = [re.search(r"--process_id=(\d+)", line).group(1) for line in lines[:2]]
  coordinators = {re.search(r"--coordinator_address=(\S+)", line).group(1) for line in lines[:2]}
  assert ids == ["0", "1"] and len(coordinators) == 1 and all("JAX_PLATFORMS=cpu" in line for line in lines[:2])


def _launch_local(fake_job: str, mode: str, workdir: Path, *extra: str) -> subprocess.Popen:
  argv = [sys.executable, "-m", "launch.local", f"--module={fake_job}", f"--config={mode}", f"--workdir={workdir}"]
  return subprocess.Popen(
    [*argv, "--num_processes=2", *extra], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )


def _dead(pid_file: Path) -> bool:
  try:
    os.kill(int(pid_file.read_text()), 0)
  except ProcessLookupError:
    return True
  return False


def test_local_runs_two_processes(fake_job: str, tmp_path: Path):
  proc = _launch_local(fake_job, "ok", tmp_path, "--override=train.steps=1")
  out, err = proc.communicate(timeout=15)
  assert proc.returncode == 0, err
  lines = sorted(out.splitlines())
  assert len(lines) == 2
  for i, line in enumerate(lines):
    assert re.fullmatch(
      rf"\[{i}\] process {i} of 2 at 127\.0\.0\.1:\d+ on cpu overrides \['config\.train\.steps'\]", line
    )
  assert len({line.split(" at ")[1] for line in lines}) == 1  # one coordinator


@pytest.mark.parametrize("mode, code", [("fail", 1), ("stubborn", 3)])
def test_local_stops_the_others_when_one_fails(fake_job: str, tmp_path: Path, mode: str, code: int):
  """Process 1 exits non-zero; process 0 (sleeping 60 s, ignoring SIGTERM when stubborn) is stopped."""
  start = time.monotonic()
  proc = _launch_local(fake_job, mode, tmp_path, "--grace=1")
  out, err = proc.communicate(timeout=20)
  assert time.monotonic() - start < 15
  assert proc.returncode == code, err
  assert "[0] sleeping" in out and f"[1] exited with code {code}" in err
  assert _dead(tmp_path / "pid0") and _dead(tmp_path / "pid1")
  if mode == "stubborn":
    assert "sending SIGKILL" in err


def test_local_forwards_sigterm(fake_job: str, tmp_path: Path):
  proc = _launch_local(fake_job, "sleep", tmp_path)
  deadline = time.monotonic() + 10
  while not all((tmp_path / f"pid{i}").exists() for i in range(2)) and time.monotonic() < deadline:
    time.sleep(0.05)
  time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=15)
  assert proc.returncode == 128 + signal.SIGTERM, err
  assert _dead(tmp_path / "pid0") and _dead(tmp_path / "pid1")


# ---------------------------------------------------------------- sweep


def _write_sweep(tmp_path: Path, body: str, name: str = "s.py") -> str:
  path = tmp_path / name
  path.write_text("import ml_collections\n\n" + textwrap.dedent(body))
  return str(path)


def test_sweep_example_expands():
  s = sweep.load_sweep("configs/sweeps/tiny_lr.py")
  runs = sweep.expand(s)
  assert len(runs) == 6
  assert [r.name for r in runs][:3] == [
    "optim.lr=0.0003,optim.warmup_steps=50,seed=0",
    "optim.lr=0.0003,optim.warmup_steps=50,seed=1",
    "optim.lr=0.001,optim.warmup_steps=100,seed=0",
  ]
  # The zipped axis moves lr and warmup together: 3 pairs, never a mixed one.
  assert {(dict(r.overrides)["optim.lr"], dict(r.overrides)["optim.warmup_steps"]) for r in runs} == {
    (3e-4, 50),
    (1e-3, 100),
    (3e-3, 200),
  }
  assert runs[0].workdir == "runs/sweeps/tiny_lr/optim.lr=0.0003,optim.warmup_steps=50,seed=0"
  assert dict(runs[0].overrides)["train.steps"] == 300
  sweep.check_runs(s, runs)


def test_sweep_unequal_axis_refused(tmp_path: Path):
  path = _write_sweep(
    tmp_path,
    """
    def get_config():
      return dict(base_config="configs/tiny.py", workdir_root="r", sweep=[{"optim.lr": [1, 2], "seed": [0]}])
    """,
  )
  with pytest.raises(sweep.SweepError, match=r"s\.py: the keys of sweep\[0\] are zipped"):
    sweep.load_sweep(path)


def test_sweep_unknown_key_refused_before_launching(tmp_path: Path, capsys):
  path = _write_sweep(
    tmp_path,
    """
    def get_config():
      return ml_collections.ConfigDict(
        dict(base_config="configs/tiny.py", workdir_root=r"ROOT", fixed={"optim.lrr": 1.0}, sweep=[{"seed": [0, 1]}]),
        allow_dotted_keys=True,
      )
    """.replace("ROOT", str(tmp_path / "runs")),
  )
  with pytest.raises(SystemExit) as e:
    sweep.main([f"--sweep={path}", "--launcher=inline", "--module=never_started"])
  assert "optim.lrr" in str(e.value) and path in str(e.value) and "did you mean 'optim.lr'" in str(e.value)
  assert not (tmp_path / "runs").exists() and capsys.readouterr().out == ""


def test_sweep_bad_value_refused(tmp_path: Path):
  path = _write_sweep(
    tmp_path,
    """
    def get_config():
      return dict(base_config="configs/tiny.py", workdir_root="r", sweep=[{"optim.lr": ["fast"]}])
    """,
  )
  s = sweep.load_sweep(path)
  with pytest.raises(sweep.SweepError, match="optim.lr='fast' does not fit"):
    sweep.check_runs(s, sweep.expand(s))


def test_sweep_delegates_to_launchers(capsys):
  assert sweep.main(["--sweep=configs/sweeps/tiny_lr.py", "--launcher=inline", "--python=python", "--dry_run"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[:2] == [
    "# run 1/6: optim.lr=0.0003,optim.warmup_steps=50,seed=0",
    "python -m vgpt_jax.train --config=configs/tiny.py "
    "--workdir=runs/sweeps/tiny_lr/optim.lr=0.0003,optim.warmup_steps=50,seed=0 --config.train.log_every=10 "
    "--config.train.steps=300 --config.optim.lr=0.0003 --config.optim.warmup_steps=50 --config.seed=0",
  ]
  assert len(lines) == 12
  argv = ["--sweep=configs/sweeps/tiny_lr.py", "--launcher=tpu_pod", "--tpu_name=t", "--zone=z", "--dry_run"]
  assert sweep.main([*argv, "--python=python3.11"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 12 and all(line.startswith("gcloud compute tpus tpu-vm ssh t ") for line in lines[1::2])
  assert "&& python3.11 -m vgpt_jax.train" in lines[3] and "--config.seed=1 --distributed=on'" in lines[3]
  with pytest.raises(SystemExit, match="sweep file sets"):
    sweep.main(["--sweep=configs/sweeps/tiny_lr.py", "--launcher=local", "--workdir=x", "--dry_run"])


def test_sweep_runs_inline_and_local(fake_job: str, tmp_path: Path, capfd):
  path = _write_sweep(
    tmp_path,
    f"""
    def get_config():
      return dict(base_config="configs/tiny.py", workdir_root=r"{tmp_path / "runs"}", sweep=[{{"seed": [0, 1]}}])
    """,
  )
  assert sweep.main([f"--sweep={path}", "--launcher=inline", f"--module={fake_job}"]) == 0
  assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["seed=0", "seed=1"]
  assert sweep.main([f"--sweep={path}", "--launcher=local", f"--module={fake_job}", "--num_processes=2"]) == 0
  out = capfd.readouterr().out
  assert out.count("process 0 of None") == 2 and out.count("[1] process 1 of 2") == 2
