"""Scaled-down convergence evidence: FlashAttention trains like standard attention, and longer context helps.

Three `train.py` runs of GPT-2 small on real text (IMDb reviews, GPT-2 BPE), same seed and same data order:

    flash-1k     attn_impl=flash,    seq 1024, batch B      (--runs role "flash")
    standard-1k  attn_impl=standard, seq 1024, batch B      ("standard"; vs flash-1k: max relative difference)
    flash-4k     attn_impl=flash,    seq 4096, batch B / 4  ("long"; the same tokens per step as flash-1k)

Each run trains `--steps` optimizer steps and evaluates val/loss every `--eval-every` steps on the same
fixed validation tokens (`--val-tokens`, the first windows of the validation split). Dropout is 0 so the
flash and standard runs differ only by the attention kernel's numerics. Writes
`<out>/<device>.json` (per run: steps, tokens seen and val/loss at each evaluation, training throughput,
wall time; the flash-vs-standard maximum relative difference of val/loss) and `<out>/<device>.png`.

    python scripts/convergence.py                                   # GPU: the defaults below
    python scripts/convergence.py --data-root /path/with/tarballs   # where aclImdb_*.tar.xz, text-core.tar.xz are
    python scripts/convergence.py --smoke                           # CPU: tiny model, stdlib bytes, seconds

Time on one H100 (bf16) at the defaults (1000 steps x 16 x 1024 tokens = 16.4M tokens per run), roughly:
flash ~1 min, standard ~1.5-2 min, flash-4k ~1 min, plus ~1 min the first time to extract and tokenize IMDb
(cached afterwards in $FLASHREPRO_CACHE) and Triton's kernel compilation: about 5-6 minutes in all.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from kernels.benchmark import gpu_slug, read_metrics

REPO = Path(__file__).resolve().parents[1]

# Tiny settings for a CPU check of the whole pipeline (FlashAttention then runs in Triton's interpreter).
SMOKE = dict(
    model="gpt2-tiny",
    steps=10,
    eval_every=5,
    batch_size=4,
    seq_len=32,
    long_seq_len=128,
    val_tokens=1024,
    overrides=[
        "model.n_layer=1",
        "model.n_head=2",
        "model.n_embd=32",
        "model.vocab_size=${data.vocab_size}",
        "data.num_workers=0",
    ],
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="data config (configs/data/<name>.yaml); default imdb (--smoke: stdlib)")
    p.add_argument("--data-root", help="folder with the data files (data.data_root); default: the config's")
    p.add_argument("--model", default="gpt2-small", help="model config (configs/model/<name>.yaml)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps per run")
    p.add_argument("--eval-every", type=int, default=100, help="steps between validations")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step at --seq-len")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument(
        "--long-seq-len", type=int, default=4096, help="context of the long run (same tokens/step)"
    )
    p.add_argument("--val-tokens", type=int, default=131072, help="fixed validation set size, in tokens")
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--runs", default="flash,standard,long", help="comma-separated subset of these runs")
    p.add_argument("--out", default="results/convergence", help="folder for <device>.json and .png")
    p.add_argument("--smoke", action="store_true", help="tiny CPU settings (pipeline check, not evidence)")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every train.py run")
    args = p.parse_args(argv)
    args.extra = list(args.overrides)
    if args.smoke:
        for k, v in SMOKE.items():
            if k == "overrides":
                args.extra = v + args.extra
            else:
                setattr(args, k, v)
    if args.data is None:
        args.data = "stdlib" if args.smoke else "imdb"
    if args.smoke and args.data == "stdlib":
        args.extra = ["data.stdlib_max_bytes=200000", *args.extra]
    if args.batch_size * args.seq_len % args.long_seq_len:
        p.error(f"--batch-size x --seq-len must be a multiple of --long-seq-len ({args.long_seq_len})")
    return args


def device_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def run_specs(args: argparse.Namespace) -> dict[str, dict]:
    """{run name: spec} of the runs asked for by --runs (roles flash, standard, long)."""
    k = lambda n: f"{n // 1024}k" if n % 1024 == 0 else str(n)  # noqa: E731
    long_batch = args.batch_size * args.seq_len // args.long_seq_len
    specs = {
        "flash": dict(attn_impl="flash", seq_len=args.seq_len, batch_size=args.batch_size),
        "standard": dict(attn_impl="standard", seq_len=args.seq_len, batch_size=args.batch_size),
        "long": dict(attn_impl="flash", seq_len=args.long_seq_len, batch_size=long_batch),
    }
    roles = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in roles if r not in specs]
    if unknown:
        raise SystemExit(f"unknown run(s) {unknown} in --runs; choose from {list(specs)}")
    return {f"{specs[r]['attn_impl']}-{k(specs[r]['seq_len'])}": {**specs[r], "role": r} for r in roles}


def train_overrides(args: argparse.Namespace, name: str, spec: dict, run_dir: Path) -> list[str]:
    on_gpu = torch.cuda.is_available()
    overrides = [
        f"data={args.data}",
        f"model={args.model}",
        f"trainer={'gpu' if on_gpu else 'cpu'}",
        "logger=csv",
        f"name=convergence-{name}",
        f"hydra.run.dir={run_dir}",
        "ckpt_path=null",
        "test=false",
        f"seed={args.seed}",
        "global_batch_size=null",
        f"val_every_n_steps={args.eval_every}",
        f"model.attn_impl={spec['attn_impl']}",
        f"model.n_positions={spec['seq_len']}",
        "model.dropout=0.0",
        f"data.seq_len={spec['seq_len']}",
        f"data.batch_size={spec['batch_size']}",
        f"data.val_tokens={args.val_tokens}",
        f"data.seed={args.seed}",
        f"optim.lr={args.lr}",
        f"trainer.max_steps={args.steps}",
        "trainer.num_sanity_val_steps=0",
        "trainer.log_every_n_steps=10",
        "trainer.enable_checkpointing=false",
        "~callbacks.best_checkpoint",
        "~callbacks.last_checkpoint",
        "callbacks.progress_bar.refresh_rate=50",
    ]
    if args.data_root:
        overrides.append(f"data.data_root={Path(args.data_root).resolve()}")
    return overrides + args.extra


def curves(rows: list[dict[str, float]], tokens_per_step: int) -> dict:
    """Evaluation curve (steps done, tokens seen, val/loss), training loss and median throughput."""
    val = sorted((int(r["step"]) + 1, r["val/loss"]) for r in rows if "val/loss" in r)  # logged at step - 1
    train = sorted((int(r["step"]) + 1, r["train/loss"]) for r in rows if "train/loss" in r)
    tps = [r["throughput/tokens_per_sec"] for r in rows if "throughput/tokens_per_sec" in r]
    return {
        "eval_steps": [s for s, _ in val],
        "eval_tokens": [s * tokens_per_step for s, _ in val],
        "val_loss": [v for _, v in val],
        "train_steps": [s for s, _ in train],
        "train_loss": [v for _, v in train],
        "tokens_per_sec": statistics.median(tps) if tps else None,
    }


def max_relative_difference(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    panels = [
        ("FlashAttention vs standard attention", [n for n, r in runs.items() if r["role"] != "long"]),
        ("context length, equal tokens", [n for n, r in runs.items() if r["role"] != "standard"]),
    ]
    for ax, (title, names) in zip(axes, panels, strict=True):
        for n in names:
            ax.plot([t / 1e6 for t in runs[n]["eval_tokens"]], runs[n]["val_loss"], marker="o", ms=3, label=n)
        ax.set_title(title)
        ax.set_xlabel("training tokens (M)")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("validation loss (nats/token)")
    fig.suptitle(f"GPT-2 ({result['model']}) on {result['data']}, {result['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_results(result: dict, out: Path, device: str, wall: float) -> dict:
    """Summaries over the finished runs, then <out>/<device>.json and .png."""
    runs = result["runs"]
    by_role = {r["role"]: r for r in runs.values()}
    if "flash" in by_role and "standard" in by_role:
        result["flash_vs_standard_max_rel_diff"] = max_relative_difference(
            by_role["flash"]["val_loss"], by_role["standard"]["val_loss"]
        )
    result["final_val_loss"] = {n: r["val_loss"][-1] for n, r in runs.items()}
    result["final_val_ppl"] = {n: math.exp(r["val_loss"][-1]) for n, r in runs.items()}
    result["total_wall_s"] = round(wall, 1)
    json_path = out / f"{gpu_slug(device)}.json"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out / f"{gpu_slug(device)}.png")
    print(f"[convergence] wrote {json_path} and {json_path.with_suffix('.png')}", flush=True)
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = device_name()
    out = REPO / args.out
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("TRITON_INTERPRET", "1")  # FlashAttention's Triton kernels on the CPU

    result = {
        "device": device,
        "data": args.data,
        "model": args.model,
        "steps": args.steps,
        "eval_every": args.eval_every,
        "val_tokens": args.val_tokens,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "long_seq_len": args.long_seq_len,
        "lr": args.lr,
        "seed": args.seed,
        "dropout": 0.0,
        "extra_overrides": args.extra,
        "runs": {},
    }
    json_path = out / f"{gpu_slug(device)}.json"
    if json_path.exists():  # runs finished by an earlier call with the same settings are kept
        earlier = json.loads(json_path.read_text())
        if all(earlier.get(k) == v for k, v in result.items() if k != "runs"):
            result["runs"] = earlier.get("runs", {})
    total = time.monotonic()
    for name, spec in run_specs(args).items():
        run_dir = out / "runs" / gpu_slug(device) / name
        cmd = [sys.executable, "train.py", *train_overrides(args, name, spec, run_dir)]
        print(f"[convergence] {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.monotonic()
        log_path = out / "runs" / gpu_slug(device) / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "w") as log:
            rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        wall = time.monotonic() - t0
        if rc != 0:
            tail = log_path.read_text()[-4000:]
            raise SystemExit(f"[convergence] {name} failed (exit {rc}); log {log_path}:\n{tail}")
        tokens_per_step = spec["batch_size"] * spec["seq_len"]
        result["runs"][name] = {**spec, "tokens_per_step": tokens_per_step, "wall_s": round(wall, 1)}
        result["runs"][name].update(curves(read_metrics(run_dir), tokens_per_step))
        r = result["runs"][name]
        print(
            f"[convergence] {name}: {wall:.0f} s, final val/loss {r['val_loss'][-1]:.4f}, "
            f"{r['tokens_per_sec'] or float('nan'):,.0f} tokens/s",
            flush=True,
        )
        write_results(result, out, device, time.monotonic() - total)  # a cut-off call keeps finished runs
    result = write_results(result, out, device, time.monotonic() - total)
    if "flash_vs_standard_max_rel_diff" in result:
        print(f"[convergence] flash vs standard: max relative val/loss difference "
              f"{result['flash_vs_standard_max_rel_diff']:.2e}")  # fmt: skip
    return result


if __name__ == "__main__":
    main()
