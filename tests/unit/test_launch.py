"""`python -m launch`: the torchrun line it builds, its refusals, and the SLURM / Kubernetes files it
writes (the sbatch script is run with stand-ins for `scontrol` and `srun`)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
import yaml

from launch.cli import main
from launch.spec import LaunchSpec
from launch.torchrun import torchrun_args

TWO_NODES = ["--nnodes", "2", "--nproc-per-node", "2", "--rdzv-endpoint", "127.0.0.1:29611", "--iface", "lo"]


def _dry_run(argv: list[str], capsys) -> str:
    assert main(["--dry-run", *argv]) == 0
    return capsys.readouterr().out.strip()


def test_single_node_runs_standalone_with_threads_split_between_ranks(capsys):
    line = _dry_run(["--nproc-per-node", "2", "--threads-per-rank", "3", "model=debug"], capsys)
    assert line == ("OMP_NUM_THREADS=3 torchrun --nnodes=1 --nproc-per-node=2 --max-restarts=0 --standalone "
                    "-m recipes.pretrain model=debug")


def test_two_nodes_share_the_rendezvous_and_only_node_zero_hosts_it(capsys, tmp_path):
    run_dir = str(tmp_path / "run")
    lines = [_dry_run([*TWO_NODES, "--node-rank", str(rank), "--run-dir", run_dir, "model=debug"], capsys)
             for rank in (0, 1)]
    for rank, line in enumerate(lines):
        assert line.startswith("OMP_NUM_THREADS=") and "GLOO_SOCKET_IFNAME=lo NCCL_SOCKET_IFNAME=lo torchrun" in line
        assert f"--rdzv-conf=is_host={'true' if rank == 0 else 'false'},join_timeout=600,last_call_timeout=30" in line
        assert "--rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:29611" in line
        assert "--local-addr=127.0.0.1" in line  # the interface's address
        assert line.endswith(f"-m recipes.pretrain model=debug run.dir={run_dir} parallel.hierarchical=true")
    ids = {part for line in lines for part in line.split() if part.startswith("--rdzv-id=")}
    assert len(ids) == 1  # derived from the run dir: the same on both nodes without coordination


def test_hierarchical_is_left_to_an_explicit_layout():
    spec = LaunchSpec(nnodes="2", run_dir="/r", rdzv_endpoint="h", overrides=["parallel.dp_shard=4"])
    assert "parallel.hierarchical=true" not in torchrun_args(spec)
    assert "parallel.hierarchical=true" not in torchrun_args(LaunchSpec(nnodes="1"))
    assert "parallel.hierarchical=true" in torchrun_args(LaunchSpec(nnodes="1", hierarchical=True))
    explicit = LaunchSpec(nnodes="2", run_dir="/r", rdzv_endpoint="h", overrides=["parallel.hierarchical=false"])
    assert torchrun_args(explicit).count("parallel.hierarchical=false") == 1


@pytest.mark.parametrize(("argv", "option"), [
    (["--nnodes", "2", "--rdzv-endpoint", "h"], "--run-dir"),
    (["--nnodes", "2", "--run-dir", "/r"], "--rdzv-endpoint"),
    (["--nnodes", "3:2"], "--nnodes"),
    (["--nnodes", "two"], "--nnodes"),
    (["--nproc-per-node", "0"], "--nproc-per-node"),
    (["--nnodes", "2", "--node-rank", "2", "--run-dir", "/r", "--rdzv-endpoint", "h"], "--node-rank"),
    (["--run-dir", "/a", "run.dir=/b"], "--run-dir"),
    (["--nnodes", "2", "--run-dir", "/r", "--rdzv-endpoint", "h", "--iface", "nosuchif0"], "--iface"),
])
def test_unusable_options_are_refused_with_the_option_and_a_fix(argv, option, capsys):
    assert main(["--dry-run", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {option}: ") and "Fix: " in err and "Traceback" not in err


def test_command_line_entry_point_prints_the_line():
    proc = subprocess.run([sys.executable, "-m", "launch", "--dry-run", "--nproc-per-node", "2", "model=debug"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "torchrun --nnodes=1 --nproc-per-node=2" in proc.stdout


def _stub(folder, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!/bin/bash\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_slurm_script_runs_one_torchrun_per_node_at_the_first_node(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["slurm", "--nnodes", "2", "--nproc-per-node", "4", "--gpus-per-node", "4", "--partition", "gpu",
                 "--time", "01:00:00", "--iface", "ib0", "--run-dir", str(run_dir), "model=debug"]) == 0
    script = run_dir / "launch.sbatch"
    text = script.read_text()
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=gpu", "#SBATCH --time=01:00:00", "export GLOO_SOCKET_IFNAME=ib0"):
        assert line in text.splitlines()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir, "scontrol", 'printf "gpu-a17\\ngpu-a18\\n"')
    _stub(bin_dir, "srun", 'echo "OMP_NUM_THREADS=$OMP_NUM_THREADS srun $*"')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-a[17-18]",
           "SLURM_JOB_ID": "4242", "SLURM_CPUS_ON_NODE": "32"}
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=30)
    assert proc.returncode == 0, proc.stderr
    srun = proc.stdout.strip()
    assert srun.startswith("OMP_NUM_THREADS=8 srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1 torchrun ")
    assert "--rdzv-backend=c10d --rdzv-endpoint=gpu-a17:29500 --rdzv-id=4242" in srun
    assert srun.endswith(f"-m recipes.pretrain model=debug run.dir={run_dir} parallel.hierarchical=true")
    assert "is_host" not in srun  # every node runs the same line; c10d finds its host by name


def test_k8s_manifest_is_an_elastic_pytorchjob(tmp_path):
    out = tmp_path / "job.yaml"
    assert main(["k8s", "--nnodes", "1:4", "--nproc-per-node", "8", "--gpus-per-node", "8", "--max-restarts", "3",
                 "--job-name", "pt-1b", "--image", "reg/titan:1", "--run-dir", "/runs/pt-1b",
                 "--run-volume-claim", "runs", "--out", str(out), "model=1b"]) == 0
    job = yaml.safe_load(out.read_text())
    assert (job["apiVersion"], job["kind"], job["metadata"]["name"]) == ("kubeflow.org/v1", "PyTorchJob", "pt-1b")
    assert job["spec"]["elasticPolicy"] == {"rdzvBackend": "c10d", "minReplicas": 1, "maxReplicas": 4,
                                            "maxRestarts": 3}
    assert job["spec"]["nprocPerNode"] == "8"
    worker = job["spec"]["pytorchReplicaSpecs"]["Worker"]
    assert worker["replicas"] == 4
    container = worker["template"]["spec"]["containers"][0]
    assert container["name"] == "pytorch" and container["image"] == "reg/titan:1"
    assert container["command"] == ["torchrun", "--nproc-per-node=8", "-m", "recipes.pretrain", "model=1b",
                                    "run.dir=/runs/pt-1b", "parallel.hierarchical=true"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert container["volumeMounts"] == [{"name": "runs", "mountPath": "/runs"}]
    assert worker["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "runs"
