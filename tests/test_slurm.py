"""SLURM integration: a real one-node cluster on localhost (scripts/slurm/local_cluster.sh) runs real jobs.

1. The cluster itself: a 2-task job whose ranks meet in torch.distributed (gloo) and all-reduce.
2. What users run: scripts/slurm/launch.py writes the batch script from scripts/slurm/train.sbatch and
   submits it; srun starts train.py twice (CPU DDP over gloo, ranks from SLURM's variables), and the run
   trains, checkpoints and, submitted again, resumes from its last checkpoint.
3. The launcher's checks of its input, and the batch script it writes.

Needs root and Debian's slurm-wlm + munge (scripts/slurm/ci_install.sh); skipped with the reason otherwise.
"""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_utils import free_port

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO / "scripts" / "slurm"
SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
MISSING = [
    b for b in ("sbatch", "srun", "sinfo", "slurmctld", "slurmd", "munged") if not shutil.which(b, path=SBIN)
]

needs_slurm = pytest.mark.skipif(
    bool(MISSING) or os.geteuid() != 0,
    reason=f"needs root and SLURM + munge ({', '.join(MISSING) or 'not root'}); "
    "install them with scripts/slurm/ci_install.sh",
)


def slurm_env(conf: Path) -> dict[str, str]:
    """This process's environment pointed at the test cluster, without an enclosing job's SLURM settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
    env["SLURM_CONF"] = str(conf)
    env["PATH"] = SBIN
    return env


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A running one-node cluster: (environment for sbatch, its directory). Stopped after the module."""
    state = tmp_path_factory.mktemp("slurm")
    script = SLURM_DIR / "local_cluster.sh"
    r = subprocess.run(
        ["bash", script, "start", state],
        capture_output=True,
        text=True,
        timeout=120,
        env=slurm_env(state / "slurm.conf"),
    )
    if r.returncode != 0:
        pytest.skip(f"the local SLURM cluster did not start:\n{r.stdout[-1500:]}{r.stderr[-3000:]}")
    yield slurm_env(state / "slurm.conf"), state
    subprocess.run(["bash", script, "stop", state], timeout=60)


ALL_REDUCE = """
import os, socket, torch, torch.distributed as dist
rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=rank, world_size=world)
x = torch.tensor([float(rank + 1), float(os.getpid())], dtype=torch.float64)
dist.all_reduce(x)
print(f"rank {{rank}}/{{world}} sum {{x[0].item():g}} pids {{int(x[1].item())}}", flush=True)
dist.destroy_process_group()
"""


TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}


def job_info(job_id: str, env: dict[str, str]) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...)."""
    out = subprocess.run(
        ["scontrol", "show", "job", "--oneliner", job_id], capture_output=True, text=True, env=env, timeout=30
    ).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def wait_for_job(job_id: str, env: dict[str, str], restarts: int = 0, timeout: float = 150) -> dict[str, str]:
    """Poll until the job has ended after `restarts` requeues (faster than `sbatch --wait`'s backoff)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(job_id, env)
        if info.get("JobState") in TERMINAL and int(info.get("Restarts", 0)) >= restarts:
            return info
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], env=env, timeout=30)
    raise AssertionError(f"job {job_id} did not end within {timeout} s: {job_info(job_id, env)}")


def submitted_job_id(stdout: str) -> str:
    m = re.search(r"Submitted batch job (\d+)", stdout)
    assert m, stdout
    return m.group(1)


@needs_slurm
def test_cluster_runs_two_rank_gloo_all_reduce(cluster, tmp_path):
    env, _ = cluster
    (tmp_path / "all_reduce.py").write_text(ALL_REDUCE.format(port=free_port()))
    (tmp_path / "job.sbatch").write_text(
        "#!/bin/bash\n"
        "#SBATCH --nodes=1\n#SBATCH --ntasks-per-node=2\n#SBATCH --time=00:05:00\n"
        f"#SBATCH --output={tmp_path}/job-%j.out\n"
        f"srun {sys.executable} {tmp_path}/all_reduce.py\n"
    )
    r = subprocess.run(
        ["sbatch", tmp_path / "job.sbatch"], capture_output=True, text=True, timeout=60, env=env
    )
    assert r.returncode == 0, r.stderr
    job_id = submitted_job_id(r.stdout)
    info = wait_for_job(job_id, env)
    log = (tmp_path / f"job-{job_id}.out").read_text()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log
    lines = sorted(line for line in log.splitlines() if line.startswith("rank "))
    assert len(lines) == 2, log
    # Both ranks got 1 + 2 = 3 and the same sum of the two (distinct) process ids.
    assert [line.split(" pids")[0] for line in lines] == ["rank 0/2 sum 3", "rank 1/2 sum 3"]
    assert lines[0].split(" pids ")[1] == lines[1].split(" pids ")[1]


def launch(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, SLURM_DIR / "launch.py", *args], capture_output=True, text=True, timeout=120, env=env
    )


def tiny_cpu_run(root: Path, name: str, max_steps: int) -> list[str]:
    """Launcher arguments for 2 CPU DDP tasks training the tiny GPT-2 on the stdlib corpus, briefly."""
    return ["--gpus-per-node", "0", "--tasks-per-node", "2", "--time", "00:10:00",
            f"name={name}", f"paths.root_dir={root}", "logger=csv", f"trainer.max_steps={max_steps}",
            "data.seq_len=32", "data.batch_size=2", "data.stdlib_max_bytes=1000000", "data.num_workers=0",
            f"data.cache_dir={root}/cache",
            "val_every_n_steps=1000", "trainer.limit_val_batches=2", "trainer.num_sanity_val_steps=0",
            "callbacks.last_checkpoint.every_n_steps=2", "test=false"]  # fmt: skip


def global_step(ckpt: Path) -> int:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]


@needs_slurm
def test_launcher_runs_two_rank_cpu_ddp_training(cluster, tmp_path):
    env, _ = cluster
    run_dir = tmp_path / "outputs" / "smoke"
    r = launch(*tiny_cpu_run(tmp_path, "smoke", max_steps=3), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    job_id = submitted_job_id(r.stdout)
    info = wait_for_job(job_id, env)
    log = (run_dir / f"slurm-{job_id}.out").read_text()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert (run_dir / "job.sbatch").is_file()
    # Lightning took ranks from SLURM (SLURMEnvironment, on each rank) and formed one group of two.
    assert "Initializing distributed: GLOBAL_RANK: 0, MEMBER: 1/2" in log, log
    assert "All distributed processes registered. Starting with 2 processes" in log, log
    assert log.count("SLURM auto-requeueing enabled") == 2, log
    assert log.count("Final metrics:") == 2, log  # both ranks trained to the end
    assert global_step(run_dir / "checkpoints" / "last.ckpt") == 3


@needs_slurm
def test_preempted_job_requeues_and_resumes(cluster, tmp_path):
    """SIGUSR1 (what --signal sends before the time limit) mid-run: checkpoint, requeue, resume, finish."""
    env, _ = cluster
    run_dir = tmp_path / "outputs" / "preempt"
    max_steps = 30
    r = launch(*tiny_cpu_run(tmp_path, "preempt", max_steps), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    job_id = submitted_job_id(r.stdout)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 90
    while not last.exists():  # training is under way once the first periodic checkpoint is there
        assert time.monotonic() < deadline and job_info(job_id, env).get("JobState") in ("PENDING", "RUNNING")
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", job_id], env=env, check=True, timeout=30)

    info = wait_for_job(job_id, env, restarts=1, timeout=150)
    log = (run_dir / f"slurm-{job_id}.out").read_text()  # both runs, appended
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    stopped = re.search(r"Stopped by SIGUSR1 after step (\d+)", log)
    assert stopped and 2 <= int(stopped.group(1)) < max_steps, log
    assert f"Requeued SLURM job {job_id}" in log, log
    assert "(restart 1)" in log and "Resuming from" in log, log
    assert global_step(last) == max_steps


def dry_run(*args: str) -> subprocess.CompletedProcess:
    return launch(*args, "--dry-run", env=dict(os.environ))


def test_launcher_writes_multi_node_gpu_script():
    r = dry_run("--nodes", "2", "--gpus-per-node", "8", "--time", "2-00:00:00", "--partition", "gpu",
                "--sbatch-arg=--qos=high", "optim.lr=3e-4", "+note=a b")  # fmt: skip
    assert r.returncode == 0, r.stderr
    script = r.stdout
    for line in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --time=2-00:00:00", "#SBATCH --requeue", "#SBATCH --signal=SIGUSR1@90",
                 "#SBATCH --open-mode=append", "#SBATCH --partition=gpu", "#SBATCH --qos=high",
                 "export NCCL_NVLS_ENABLE=0", "export TORCH_SYMM_MEM_DISABLE_MULTICAST=1",
                 "export NVSHMEM_DISABLE_NVLS=1"]:  # fmt: skip
        assert line in script.splitlines(), (line, script)
    assert "train.py optim.lr=3e-4 '+note=a b'" in script  # quoted for the shell
    assert "trainer=ddp trainer.devices=8 trainer.num_nodes=2 ckpt_path=last" in script
    assert "{{" not in script
    # The directives form one block (sbatch stops reading them at the first command).
    first_command = script.index("set -euo pipefail")
    assert all(m.start() < first_command for m in re.finditer("#SBATCH", script))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--time", "25:00:00:00"], "is not a SLURM time"),
        (["--time", "1:00"], "not longer than the 90 s warning"),
        (["trainer.devices=4"], "is set by the launcher"),
        (["--gpus-per-node", "0"], "--tasks-per-node"),
        (["--gpus-per-node", "8", "--tasks-per-node", "4"], "one task per GPU"),
        (["model=no-such-model"], "do not compose with configs/train.yaml"),
        (["experiment"], "is not a Hydra override"),
    ],
)
def test_launcher_rejects_bad_input_before_submitting(args, message):
    r = dry_run(*args)
    assert r.returncode != 0
    assert message in r.stderr, r.stderr


def test_launcher_without_sbatch_says_so(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}  # no sbatch there
    r = launch("--time", "24:00:00", env=env)
    assert r.returncode != 0
    assert "`sbatch` not found" in r.stderr and "--dry-run" in r.stderr
