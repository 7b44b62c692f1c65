"""Can scheduling hide the dropout mask's integer work behind the tensor cores? Two loop forms, timed.

The kernels' dQ and forward loops wait on each product right after issuing it, so the mask's Philox and
select work runs while the tensor cores idle (kernel_dev/NOTES.md, session 10). This script times the two
schedules Triton offers without a rewrite of the kernels, each with and without dropout 0.1 (the kernels'
own `dropout_words` / `dropout_numbers` / `dropout_select`), dense, non-causal, paper setting (batch 16,
8 heads, head dim 64, bf16):

    fwd  ptr     the forward loop as in kernels/flash_fwd.py (pointer loads, cp.async pipeline)
    fwd  tma     the same loop with K/V through device-side tensor descriptors (TMA, mbarrier pipeline)
    fwd  tma-ws  tma with `tl.range(..., warp_specialize=True)`: Triton's producer/consumer partitions
    dq   plain   the dQ loop as in kernels/flash_bwd.py
    dq   ahead   the next block's Q K^T issued at the end of each iteration, so it runs under the
                 iteration's tail and the next block's Philox words

Each variant's output is checked against the plain one of the same loop (same mask: max abs difference).
A variant that does not compile is recorded with its error. Writes
kernel_dev/results/<gpu>-dropout-schedule-triton<version>.{json,md}.

    python kernel_dev/dropout_schedule.py [--seqlens 1024 4096] [--out kernel_dev/results]
"""

import argparse
import itertools
import json
from pathlib import Path

import torch
import triton
import triton.language as tl

from kernels.benchmark import environment, gpu_slug
from kernels.flash_fwd import dropout_numbers, dropout_params, dropout_select, dropout_words

RESULTS = Path(__file__).resolve().parent / "results"
BATCH, HEADS, HEAD_DIM = 16, 8, 64
# (BLOCK_M, BLOCK_N, num_warps, num_stages); Triton splits a loop into partitions only at 4 warps.
TILES = {
    "fwd": [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 4, 2), (128, 128, 8, 2)],
    "dq": [(128, 32, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3)],
}
VARIANTS = {"fwd": ["ptr", "tma", "tma-ws"], "dq": ["plain", "ahead"]}


@triton.jit
def _block(N, H: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's head bh, its first row and column in the (batch * N, H * D) layout, its query rows
    offs_m, and the key and head-dim offsets of one tile."""
    bh = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    return bh, (bh // H) * N, (bh % H) * D, offs_m, tl.arange(0, BLOCK_N), tl.arange(0, D)


@triton.jit
def _fwd_loop(
    Q, K, V, Out, N, qk_scale, seed, bound,
    DROP: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr, H: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Dense forward of one query block. Q, K, V, Out: (batch * N, H * D) contiguous."""
    bh, row0, col0, offs_m, offs_n, offs_d = _block(N, H, D, BLOCK_M, BLOCK_N)
    rows = (row0 + offs_m)[:, None].to(tl.int64) * (H * D) + col0 + offs_d[None, :]
    q = tl.load(Q + rows)
    if TMA:
        total = tl.num_programs(1) // H * N
        desc_k = tl.make_tensor_descriptor(K, [total, H * D], [H * D, 1], [BLOCK_N, D])
        desc_v = tl.make_tensor_descriptor(V, [total, H * D], [H * D, 1], [BLOCK_N, D])
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    if DROP:
        w0, w1, w2, w3 = dropout_words(seed, bh, offs_m, 0, BLOCK_N)
    for start_n in tl.range(0, N, BLOCK_N, warp_specialize=WS):
        if TMA:
            kT = desc_k.load([row0 + start_n, col0]).T
            v = desc_v.load([row0 + start_n, col0])
        else:
            keys = (row0 + start_n + offs_n).to(tl.int64) * (H * D) + col0
            kT = tl.load(K + keys[None, :] + offs_d[:, None])
            v = tl.load(V + keys[:, None] + offs_d[None, :])
        s = tl.dot(q, kT)
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        p16 = p.to(v.dtype)
        if DROP:
            p16 = dropout_select(dropout_numbers(w0, w1, w2, w3, BLOCK_N), bound, p16, p16 * 0, 1)
        acc = tl.dot(p16, v, acc)
        if DROP:
            w0, w1, w2, w3 = dropout_words(seed, bh, offs_m, start_n + BLOCK_N, BLOCK_N)
        m_i = m_new
    tl.store(Out + rows, (acc / l_i[:, None]).to(Out.dtype.element_ty))


@triton.jit
def _dq_loop(
    Q, K, V, DO, Lse, Delta, DQ, N, qk_scale, seed, bound,
    DROP: tl.constexpr, AHEAD: tl.constexpr, H: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dQ of one query block (no scaling). Q, K, V, DO, DQ: (batch * N, H * D); Lse, Delta: (batch * H * N,)."""
    bh, row0, col0, offs_m, offs_n, offs_d = _block(N, H, D, BLOCK_M, BLOCK_N)
    rows = (row0 + offs_m)[:, None].to(tl.int64) * (H * D) + col0 + offs_d[None, :]
    q = tl.load(Q + rows)
    do = tl.load(DO + rows)
    lse2 = tl.load(Lse + bh * N + offs_m) * 1.4426950408889634
    delta = tl.load(Delta + bh * N + offs_m)
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    if DROP:
        w0, w1, w2, w3 = dropout_words(seed, bh, offs_m, 0, BLOCK_N)
    if AHEAD:
        keys = (row0 + offs_n).to(tl.int64) * (H * D) + col0
        kT = tl.load(K + keys[None, :] + offs_d[:, None])
        s = tl.dot(q, kT)
    for start_n in tl.range(0, N, BLOCK_N):
        keys = (row0 + start_n + offs_n).to(tl.int64) * (H * D) + col0
        vT = tl.load(V + keys[None, :] + offs_d[:, None])
        if not AHEAD:
            kT = tl.load(K + keys[None, :] + offs_d[:, None])
            s = tl.dot(q, kT)
        p = tl.math.exp2(s * qk_scale - lse2[:, None])
        dp = tl.dot(do, vT)
        if DROP:
            p_d = p * -delta[:, None]
            x = dropout_numbers(w0, w1, w2, w3, BLOCK_N)
            ds = dropout_select(x, bound, (p * dp + p_d).to(kT.dtype), p_d.to(kT.dtype), 1)
        else:
            ds = (p * (dp - delta[:, None])).to(kT.dtype)
        dq = tl.dot(ds, tl.trans(kT), dq)
        if AHEAD:  # the next block's scores (the last iteration recomputes its own: unused)
            nxt = (row0 + tl.minimum(start_n + BLOCK_N, N - BLOCK_N) + offs_n).to(tl.int64) * (H * D) + col0
            kT = tl.load(K + nxt[None, :] + offs_d[:, None])
            s = tl.dot(q, kT)
        if DROP:
            w0, w1, w2, w3 = dropout_words(seed, bh, offs_m, start_n + BLOCK_N, BLOCK_N)
    tl.store(DQ + rows, dq.to(DQ.dtype.element_ty))


def run_variant(loop: str, variant: str, tile, drop: bool, t: dict, n: int):
    bm, bn, w, s = tile
    _, bound, _ = dropout_params(0.1)
    grid = (n // bm, BATCH * HEADS)
    common = dict(H=HEADS, D=HEAD_DIM, BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
    if loop == "fwd":
        tma, ws = variant != "ptr", variant == "tma-ws"
        args = (t["q"], t["k"], t["v"], t["out"], n, 0.18, 1234, bound)
        return lambda: _fwd_loop[grid](*args, DROP=drop, TMA=tma, WS=ws, **common)
    args = (t["q"], t["k"], t["v"], t["do"], t["lse"], t["delta"], t["out"], n, 0.18, 1234, bound)
    return lambda: _dq_loop[grid](*args, DROP=drop, AHEAD=variant == "ahead", **common)


def measure(seqlens: list[int]) -> list[dict]:
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    rows = []
    for n in seqlens:
        torch.manual_seed(0)
        t = {x: torch.randn(BATCH * n, HEADS * HEAD_DIM, device="cuda", dtype=torch.bfloat16) for x in "qkv"}
        t["do"], t["out"] = torch.randn_like(t["q"]), torch.empty_like(t["q"])
        t["lse"] = torch.randn(BATCH * HEADS * n, device="cuda") + 8
        t["delta"] = torch.randn(BATCH * HEADS * n, device="cuda")
        for loop, tiles in TILES.items():
            for tile, drop in itertools.product(tiles, (False, True)):
                ref = None
                for variant in VARIANTS[loop]:
                    row = dict(loop=loop, variant=variant, seqlen=n, tile=list(tile), dropout=drop)
                    f = run_variant(loop, variant, tile, drop, t, n)
                    try:
                        f()
                        torch.cuda.synchronize()
                    except Exception as err:  # a variant Triton cannot compile: record why
                        row["error"] = (str(err).strip().splitlines() or [type(err).__name__])[-1][:200]
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                        continue
                    out = t["out"].float()
                    if ref is None:
                        ref = out.clone()
                    row["max_diff_vs_first"] = (out - ref).abs().max().item()
                    row["ms"] = triton.testing.do_bench(f, warmup=30, rep=150)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    return rows


def report(rows: list[dict]) -> list[str]:
    """Markdown: per loop, seqlen and tile, each variant's time without / with dropout and the cost."""
    lines = ["| loop | N | tile (M x N, warps, stages) | variant | no dropout ms | dropout ms | cost |"]
    lines.append("|---|---|---|---|---|---|---|")
    key = lambda r: (r["loop"], r["seqlen"], tuple(r["tile"]), r["variant"])  # noqa: E731
    groups: dict = {}
    for r in rows:
        groups.setdefault(key(r), {})[r["dropout"]] = r
    for (loop, n, tile, variant), g in groups.items():
        cells = [g.get(d, {}).get("ms") for d in (False, True)]
        ms = [
            f"{g[d]['ms']:.3f}" if g.get(d, {}).get("ms") else g.get(d, {}).get("error", "-")[:60]
            for d in (False, True)
        ]
        cost = f"{100 * (cells[1] / cells[0] - 1):+.0f}%" if all(cells) else "-"
        bm, bn, w, s = tile
        lines.append(f"| {loop} | {n} | {bm}x{bn} w{w} s{s} | {variant} | {ms[0]} | {ms[1]} | {cost} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqlens", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()

    data = {"env": environment(), "rows": measure(args.seqlens)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{gpu_slug(data['env']['gpu'])}-dropout-schedule-triton{triton.__version__}"
    (out / f"{stem}.json").write_text(json.dumps(data, indent=1))
    e = data["env"]
    head = [f"# Dropout under two loop schedules: {e['gpu']}, torch {e['torch']}, triton {e['triton']}", ""]
    head += [f"{e['date']}, `{e['command']}`; nvidia-smi: {e['nvidia_smi']}", ""]
    (out / f"{stem}.md").write_text("\n".join(head + report(data["rows"])) + "\n")


if __name__ == "__main__":
    main()
