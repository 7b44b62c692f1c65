"""Which backward is fastest? Times the three ways our backward can form dQ, with and without dropout.

    fused_dq = 0   separate dQ kernel (`_bwd_dq_kernel`): the dropout mask is made twice in the backward
    fused_dq = 1   dQ folded into the dK/dV kernel, adds ordered by counters: deterministic
    fused_dq = 2   dQ folded into the dK/dV kernel, float32 atomics in any order (deterministic=False)

Settings: the paper's (batch 16, 8 heads, head dim 64, non-causal; the padding mask is lengths uniform in
N-20..N through the varlen API) and GPT-2 small's attention at 4K (batch 4, 12 heads, head dim 64,
causal). bf16, autotuned, fwd+bwd timed as in `scripts/bench_attention.py` (CUDA graphs up to 4K).
`kernels.flash_bwd.fused_dq_mode` is the policy these numbers set.

    python scripts/bwd_paths.py [--seqlens 1024 2048 4096 8192] [--out results/attention]

Writes <out>/<gpu>-bwd-paths.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_attention import environment, make_inputs, phases, warm_up_graphs  # noqa: E402

import kernels.attention as attention  # noqa: E402
from kernels import flash_attn_func, flash_attn_varlen_func  # noqa: E402

PATHS = {0: "dQ kernel", 1: "fused, ordered", 2: "fused, atomic"}


def time_case(name, fn, sets, douts, use_graph, rows, **info):
    """fwd and fwd+bwd ms of fn on each dQ path (the policy `fused_dq_mode` pinned while it runs)."""
    policy = attention.fused_dq_mode
    for fused in PATHS:
        attention.fused_dq_mode = lambda *_, fused=fused: fused
        try:
            res = phases(fn, sets, douts, use_graph=use_graph)
        finally:
            attention.fused_dq_mode = policy
        rows.append({"case": name, "fused_dq": fused, **info, **res})
        print(
            f"  {name:14s} {PATHS[fused]:15s} fwd {res['fwd_ms']:.3f}  fwd+bwd {res['fwd_bwd_ms']:.3f} ms",
            flush=True,
        )


def paper_rows(n: int, rows: list) -> None:
    b, h, d = 16, 8, 64
    sets, douts = make_inputs(b, n, h, d)
    gen = torch.Generator().manual_seed(n)
    lengths = torch.randint(max(1, n - 20), n + 1, (b,), generator=gen)
    cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32).cuda()
    total = int(lengths.sum())
    vsets = [[x.detach().reshape(b * n, h, d)[:total].clone().requires_grad_() for x in a] for a in sets]
    vdouts = [dd.reshape(b * n, h, d)[:total].clone() for dd in douts]
    graph = n <= 4096
    print(f"[paper] N={n}", flush=True)
    time_case(
        "nodrop",
        lambda q, k, v: flash_attn_func(q, k, v),
        sets,
        douts,
        graph,
        rows,
        setting="paper",
        seqlen=n,
    )
    time_case(
        "dropout_mask",
        lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu, n, n, dropout_p=0.1),
        vsets, vdouts, graph, rows, setting="paper", seqlen=n,
    )  # fmt: skip


def gpt2_rows(rows: list) -> None:
    b, n, h, d = 4, 4096, 12, 64
    sets, douts = make_inputs(b, n, h, d)
    print(f"[gpt2] B={b} N={n} H={h} causal", flush=True)
    for name, p in (("nodrop", 0.0), ("dropout", 0.1)):
        time_case(
            name, lambda q, k, v, p=p: flash_attn_func(q, k, v, dropout_p=p, causal=True),
            sets, douts, True, rows, setting="gpt2-small-4k-causal", seqlen=n,
        )  # fmt: skip


def overheads(rows: list) -> list[dict]:
    """Dropout (+ mask) fwd+bwd over the no-dropout fwd+bwd, for each pairing of dQ paths."""
    out = []
    keys = sorted({(r["setting"], r["seqlen"]) for r in rows})
    for setting, n in keys:
        sel = [r for r in rows if (r["setting"], r["seqlen"]) == (setting, n)]
        base = {r["fused_dq"]: r["fwd_bwd_ms"] for r in sel if r["case"] == "nodrop"}
        drop = {r["fused_dq"]: r["fwd_bwd_ms"] for r in sel if r["case"] != "nodrop"}
        for fb in base:
            for fd in drop:
                out.append({
                    "setting": setting, "seqlen": n, "nodrop_path": PATHS[fb], "dropout_path": PATHS[fd],
                    "overhead": drop[fd] / base[fb] - 1,
                })  # fmt: skip
    return out


def write(out_dir: Path, data: dict) -> None:
    slug = data["env"]["gpu"].lower().replace(" ", "-")
    (out_dir / f"{slug}-bwd-paths.json").write_text(json.dumps(data, indent=1))
    lines = [
        f"# Backward dQ paths: {data['env']['gpu']}",
        "",
        f"torch {data['env']['torch']}, triton {data['env']['triton']}, {data['env']['date']}; "
        f"`{data['env']['command']}`",
        "",
        "```",
        data["env"]["nvidia_smi"],
        "```",
        "",
        "| setting | N | case | dQ path | fwd ms | fwd+bwd ms |",
        "|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        lines.append(
            f"| {r['setting']} | {r['seqlen']} | {r['case']} | {PATHS[r['fused_dq']]} "
            f"| {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} |"
        )
    lines += ["", "Dropout (+ padding mask in the paper setting) cost over no dropout, fwd+bwd:", ""]
    lines += ["| setting | N | no-dropout path | dropout path | extra time |", "|---|---|---|---|---|"]
    for o in data["overheads"]:
        lines.append(
            f"| {o['setting']} | {o['seqlen']} | {o['nodrop_path']} | {o['dropout_path']} | {o['overhead']:+.1%} |"
        )
    (out_dir / f"{slug}-bwd-paths.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlens", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--skip-gpt2", action="store_true")
    ap.add_argument("--out", default="results/attention")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bwd_paths.py times GPU kernels: run it on a machine with a CUDA GPU")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    warm_up_graphs()
    rows: list = []
    data = {"env": environment(), "rows": rows}
    for n in args.seqlens:
        paper_rows(n, rows)
        data["overheads"] = overheads(rows)
        write(out_dir, data)
        torch.cuda.empty_cache()
    if not args.skip_gpt2:
        gpt2_rows(rows)
    data["overheads"] = overheads(rows)
    write(out_dir, data)


if __name__ == "__main__":
    main()
