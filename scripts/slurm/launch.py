"""Submit train.py to SLURM: one task per GPU, on one node or many, requeued and resumed on preemption.

    python scripts/slurm/launch.py experiment=gpt2 --nodes 2 --gpus-per-node 8 --time 24:00:00
    python scripts/slurm/launch.py experiment=gpt2 --nodes 1 --gpus-per-node 8 --time 2-00:00:00 \\
        --partition gpu --account myproj data.batch_size=16      # any Hydra override of train.py
    python scripts/slurm/launch.py experiment=gpt2 --nodes 2 --time 24:00:00 --dry-run   # only print it
    python scripts/slurm/launch.py --gpus-per-node 0 --tasks-per-node 2 --time 10:00    # CPU DDP (gloo)

The Hydra overrides are checked by composing the config here, before anything is queued. The batch script
(scripts/slurm/train.sbatch, filled in) is written to the run's output directory (`outputs/<name>`, as
train.py uses) as `job.sbatch`, next to the job's log `slurm-<jobid>.out`, and submitted with sbatch.
Submitting the same command again continues the same run from its last checkpoint.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = Path(__file__).with_name("train.sbatch")
# SLURM's --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
TIME_RE = re.compile(r"(?:(\d+)-(\d+)(?::(\d+))?(?::(\d+))?|(\d+)(?::(\d+))?(?::(\d+))?)")
SIGNAL_LEAD_S = 90  # the template's --signal=SIGUSR1@90
LAUNCHER_KEYS = ("trainer.devices", "trainer.num_nodes")  # set from --gpus-per-node/--tasks-per-node, --nodes


def time_seconds(time: str) -> int:
    """Seconds in a SLURM --time value ('24:00:00', '2-00:00:00', '90', ...); ValueError if malformed."""
    m = TIME_RE.fullmatch(time)
    if not m:
        raise ValueError(
            f"--time {time!r} is not a SLURM time. Use minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS "
            "(e.g. 24:00:00 or 2-00:00:00)."
        )
    d, dh, dm, ds, m_, ms, hms = (int(g) if g else None for g in m.groups())
    if d is not None:  # D-H[:M[:S]]
        return ((d * 24 + dh) * 60 + (dm or 0)) * 60 + (ds or 0)
    if hms is not None:  # H:M:S
        return (m_ * 60 + ms) * 60 + hms
    return m_ * 60 + (ms or 0)  # M or M:S


def compose_config(overrides: list[str]):
    """train.py's config with these overrides (raises Hydra's error for an unknown key or option)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


def render(template: str, fields: dict[str, str]) -> str:
    """Fill the template's {{name}} fields; every field must be given and used."""
    for name, value in fields.items():
        key = "{{" + name + "}}"
        if key not in template:
            raise KeyError(f"{TEMPLATE} has no field {key}")
        template = template.replace(key, value)
    left = re.findall(r"\{\{\w+\}\}", template)
    if left:
        raise KeyError(f"{TEMPLATE}: fields {left} were not filled in")
    # Empty optional directives leave blank lines; drop them.
    return re.sub(r"\n{2,}(?=#SBATCH|\nset -euo)", "\n", template)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra overrides for train.py, e.g. experiment=gpt2")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node, one task each (default 8)")
    p.add_argument("--tasks-per-node", type=int, help="tasks per node (default: --gpus-per-node)")
    p.add_argument("--time", default="24:00:00", help="time limit, SLURM format (default 24:00:00)")
    p.add_argument("--partition", help="SLURM partition")
    p.add_argument("--account", help="SLURM account")
    p.add_argument("--cpus-per-task", type=int, help="CPU cores per task (dataloader workers + main process)")
    p.add_argument("--mem", help="memory per node, e.g. 400G (default: the cluster's)")
    p.add_argument("--job-name", help="job name (default: the run's name)")
    p.add_argument(
        "--sbatch-arg", action="append", default=[], help="any other sbatch option, e.g. --qos=high"
    )
    p.add_argument("--python", default=sys.executable, help="Python on the nodes (default: this one)")
    p.add_argument("--wait", action="store_true", help="wait for the job to end; exit with its exit code")
    p.add_argument("--dry-run", action="store_true", help="print the batch script, submit nothing")
    return p.parse_intermixed_args(argv)


def build_script(args: argparse.Namespace) -> tuple[str, Path]:
    """(batch script, run directory) for these arguments; ValueError for bad input."""
    if args.nodes < 1:
        raise ValueError(f"--nodes {args.nodes}: need at least 1 node.")
    if args.gpus_per_node < 0:
        raise ValueError(f"--gpus-per-node {args.gpus_per_node} is negative.")
    tasks = args.tasks_per_node if args.tasks_per_node is not None else args.gpus_per_node
    if tasks < 1:
        raise ValueError(
            "--gpus-per-node 0 runs on CPUs: give the number of processes with --tasks-per-node N."
        )
    if args.gpus_per_node and tasks != args.gpus_per_node:
        raise ValueError(
            f"--tasks-per-node {tasks} != --gpus-per-node {args.gpus_per_node}: DDP runs one task per GPU."
        )
    seconds = time_seconds(args.time)
    if seconds <= SIGNAL_LEAD_S:
        raise ValueError(
            f"--time {args.time} is not longer than the {SIGNAL_LEAD_S} s warning before the time limit "
            "(--signal=SIGUSR1@90) that lets the run checkpoint and requeue; ask for more time."
        )
    overrides = list(args.overrides)
    for o in overrides:
        if o.startswith("-"):
            raise ValueError(f"unknown option {o!r} (see --help); multirun (-m) is not supported here.")
        if "=" not in o:
            raise ValueError(f"{o!r} is not a Hydra override (key=value), e.g. experiment=gpt2.")
        key = o.split("=", 1)[0].lstrip("+~")
        if key in LAUNCHER_KEYS:
            raise ValueError(
                f"{o!r}: {key} is set by the launcher; use --nodes / --gpus-per-node / --tasks-per-node."
            )
    trainer = next((o.split("=", 1)[1] for o in overrides if o.startswith("trainer=")), None)
    overrides = [o for o in overrides if not o.startswith("trainer=")]
    trainer = trainer or ("ddp" if args.gpus_per_node else "ddp_cpu")
    ckpt_path = next((o.split("=", 1)[1] for o in overrides if o.startswith("ckpt_path=")), "last")
    overrides = [o for o in overrides if not o.startswith("ckpt_path=")]

    launch_overrides = [f"trainer={trainer}", f"trainer.devices={tasks}", f"trainer.num_nodes={args.nodes}"]
    try:
        cfg = compose_config(overrides + launch_overrides + [f"ckpt_path={ckpt_path}"])
    except Exception as e:  # Hydra's own message (its first paragraph) names the bad key or option
        message = str(e).split("\n\n")[0]
        raise ValueError(f"the Hydra overrides do not compose with configs/train.yaml: {message}") from e
    run_dir = Path(str(cfg.hydra.run.dir))
    run_dir = run_dir if run_dir.is_absolute() else REPO / run_dir
    if re.search(r"\s", str(run_dir)):
        raise ValueError(f"run directory {run_dir} contains whitespace, which #SBATCH --output cannot take.")

    directives = [f"--partition={args.partition}" if args.partition else None,
                  f"--account={args.account}" if args.account else None,
                  f"--cpus-per-task={args.cpus_per_task}" if args.cpus_per_task else None,
                  f"--mem={args.mem}" if args.mem else None, *args.sbatch_arg]  # fmt: skip
    script = render(
        TEMPLATE.read_text(),
        {
            "job_name": args.job_name or str(cfg.get("name") or "train"),
            "nodes": str(args.nodes),
            "tasks_per_node": str(tasks),
            "gpu_directive": f"#SBATCH --gpus-per-node={args.gpus_per_node}" if args.gpus_per_node else "",
            "time": args.time,
            "run_dir": str(run_dir),
            "extra_directives": "\n".join(f"#SBATCH {d}" for d in directives if d),
            "repo_dir": shlex.quote(str(REPO)),
            "python": shlex.quote(args.python),
            "overrides": " ".join(shlex.quote(o) for o in overrides),
            "trainer": shlex.quote(trainer),
            "ckpt_path": shlex.quote(ckpt_path),
        },
    )
    return script, run_dir


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.dry_run and shutil.which("sbatch") is None:
        sys.exit(
            "launch: `sbatch` not found on PATH. Run this on a SLURM login node, or add --dry-run to print."
        )
    try:
        script, run_dir = build_script(args)
    except ValueError as e:
        sys.exit(f"launch: {e}")
    if args.dry_run:
        print(script, end="")
        return 0
    run_dir.mkdir(parents=True, exist_ok=True)
    job_file = run_dir / "job.sbatch"
    job_file.write_text(script)
    print(f"launch: wrote {job_file}; log: {run_dir}/slurm-<jobid>.out", flush=True)
    cmd = ["sbatch", *(["--wait"] if args.wait else []), str(job_file)]
    return subprocess.run(cmd).returncode


if __name__ == "__main__":
    sys.exit(main())
