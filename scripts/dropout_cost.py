"""Where does in-kernel dropout time go? Per-kernel times of our kernels with variants of the Philox words.

Paper setting (batch 16, 8 heads, head dim 64, bf16, non-causal). Each variant runs in its own process
(Triton resolves `dropout_words` when it first compiles a kernel). Variants:

    nodrop      dropout_p = 0 (the baseline)
    ours        the kernels' dropout: one Philox4x32-7 call per 16 thread-owned elements
    ours0       the same with 0 Philox rounds: everything but the rounds
    allkeep     all-zero words, so every element is kept: the selects and the word plumbing alone

For each variant and sequence length the autotuner times every config of the forward, dK/dV and dQ
kernels with CUDA-graph replays; the script prints the five fastest of each (kernel time alone) and
writes all of them to --out. `--extra-configs` adds candidate tiles that the kernels do not list (more
warps, register caps); `--jobs J` first compiles every config in J parallel processes so that the timed
pass finds them in Triton's cache. Not a correctness test: ours0 and allkeep do not draw the kernels'
dropout mask.

    python scripts/dropout_cost.py [--seqlens 1024 2048 4096] [--variants nodrop,ours] [--jobs 14]
    python scripts/dropout_cost.py --inspect     # no GPU: layout conversions and spills of each variant

`--inspect` compiles each kernel with dropout for sm_90 (as scripts/compile_kernels.py does) and counts the
layout conversions (`ttg.convert_layout`) in its Triton GPU IR, then runs ptxas -v for registers and spills.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = ["nodrop", "ours", "ours0", "allkeep"]
KERNELS = ["fwd", "dkdv", "dq"]
# Candidate tiles beyond the kernels' own lists: (BLOCK_M, BLOCK_N, num_warps, num_stages, maxnreg).
EXTRA_CONFIGS = {
    "fwd": [(128, 64, 8, 3, 128), (64, 128, 4, 2, None), (128, 128, 4, 2, None), (256, 64, 16, 2, None)],
    "dkdv": [(128, 64, 4, 2, None), (128, 64, 4, 3, None), (128, 32, 4, 3, None), (64, 128, 4, 2, None)],
    "dq": [(128, 64, 4, 2, None), (64, 64, 4, 3, None), (64, 128, 4, 2, None), (128, 128, 4, 2, None)],
}


def variant_functions() -> dict:
    from kernels.flash_fwd import dropout_words

    @triton.jit
    def ours0(seed, bh, rows, start_n, BLOCK_N: tl.constexpr):
        return dropout_words(seed, bh, rows, start_n, BLOCK_N, 0)

    @triton.jit
    def allkeep(seed, bh, rows, start_n, BLOCK_N: tl.constexpr):
        r0, r1, r2, r3 = dropout_words(seed, bh, rows, start_n, BLOCK_N, 0)
        return r0 * 0, r1 * 0, r2 * 0, r3 * 0  # number 0 is below every bound: kept

    return dict(ours0=ours0, allkeep=allkeep)


def use_variant(variant: str) -> None:
    import kernels.flash_bwd
    import kernels.flash_fwd

    fn = variant_functions().get(variant)
    if fn is not None:
        kernels.flash_fwd.dropout_words = kernels.flash_bwd.dropout_words = fn


def autotuners() -> dict:
    import kernels.flash_bwd as b
    import kernels.flash_fwd as f

    return {"fwd": f._fwd_kernel, "dkdv": b._bwd_dkdv_kernel, "dq": b._bwd_dq_kernel}


def config_name(c) -> str:
    k = c.kwargs
    cap = f" r{c.maxnreg}" if c.maxnreg else ""
    return f"{k['BLOCK_M']}x{k['BLOCK_N']} w{c.num_warps} s{c.num_stages}{cap}"


def add_tiles(tuner, tiles) -> None:
    """Append tiles (BLOCK_M, BLOCK_N, num_warps, num_stages, maxnreg) to an autotuner's configs."""
    tuner.configs = tuner.configs + [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s, maxnreg=r)
        for bm, bn, w, s, r in tiles
    ]


def tile_times(tuner) -> dict:
    """`config_name` -> median time (ms) of every config the autotuner timed at its last tuning."""
    return {config_name(c): t[0] for c, t in tuner.configs_timings.items()}


def measure(variant: str, seqlens: list[int], extra: bool, compile_only: str | None) -> list[dict]:
    """Autotune the three kernels at each sequence length; every config's median kernel time (ms).

    compile_only: run each config of that kernel once, untimed (the other kernels keep one config).
    """
    import torch

    from kernels import flash_attn_func

    use_variant(variant)
    tuners = autotuners()
    for name, tuner in tuners.items():
        if extra:
            add_tiles(tuner, EXTRA_CONFIGS[name])
        if compile_only:
            if name != compile_only:
                tuner.configs = tuner.configs[:1]

            def once(kernel_call, quantiles=None):
                kernel_call()
                torch.cuda.synchronize()
                return [1.0, 1.0, 1.0]

            tuner._do_bench = once
    p = 0.0 if variant == "nodrop" else 0.1
    rows = []
    for n in seqlens:
        torch.manual_seed(0)
        q, k, v = (
            torch.randn(16, n, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(3)
        )
        flash_attn_func(q, k, v, dropout_p=p).backward(torch.randn_like(q))
        if compile_only:
            continue
        row = dict(variant=variant, seqlen=n)
        for name, tuner in tuners.items():
            row[name] = tile_times(tuner)
        rows.append(row)
    return rows


def inspect(variants: list[str]) -> None:
    """Per variant and kernel: layout conversions in the TTGIR, registers and spill bytes from ptxas."""
    import re
    import tempfile

    from compile_kernels import compile_kernel, first_configs

    flags = dict(IS_CAUSAL=False, DROPOUT_MODE=1, IS_VARLEN=False)
    bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    for variant in variants:
        use_variant(variant)
        for name, (fn, tiles, warps, stages) in first_configs(dropout=True).items():
            k = compile_kernel(fn, {**flags, **tiles}, 90, warps, stages)
            converts = k.asm["ttgir"].count("ttg.convert_layout")
            usage = "no bundled ptxas could assemble it"
            for ptxas in (bindir / "ptxas", bindir / "ptxas-blackwell"):  # newer Triton: the second
                if not ptxas.exists():
                    continue
                with tempfile.TemporaryDirectory() as d:
                    Path(d, "k.ptx").write_text(k.asm["ptx"])
                    cmd = [str(ptxas), "-arch=sm_90a", "-v", "k.ptx", "-o", "k.cubin"]
                    log = subprocess.run(cmd, cwd=d, capture_output=True, text=True)
                found = re.findall(r"Used \d+ registers|\d+ bytes spill stores", log.stdout + log.stderr)
                if found:
                    usage = ", ".join(found)
                    break
            print(f"{variant:10s} {name:20s} convert_layout x{converts:<3d} {usage}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqlens", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--extra-configs", action="store_true", help="also time EXTRA_CONFIGS")
    ap.add_argument("--jobs", type=int, default=0, help="compile every config first, in J processes")
    ap.add_argument("--out", default="dropout_cost.json")
    ap.add_argument("--inspect", action="store_true", help="compile for sm_90 and count, no GPU needed")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--compile-only", help=argparse.SUPPRESS)
    args = ap.parse_args()
    variants = args.variants.split(",")
    if args.child:
        if args.inspect:
            inspect([args.child])
        else:
            rows = measure(args.child, args.seqlens, args.extra_configs, args.compile_only)
            print("RESULT " + json.dumps(rows), flush=True)
        return
    if args.inspect:
        for variant in variants:  # one process per variant: Triton resolves dropout_words once per process
            if variant != "nodrop":
                cmd = [sys.executable, __file__, "--inspect", "--child", variant]
                r = subprocess.run(cmd, capture_output=True, text=True)
                print(r.stdout.strip() or r.stderr[-2000:], flush=True)
        return
    extra = ["--extra-configs"] if args.extra_configs else []
    base = [sys.executable, __file__, *extra, "--seqlens", *map(str, args.seqlens)]
    if args.jobs:  # the compiled code does not depend on the sequence length: compile at the first
        t0 = time.time()
        first = [sys.executable, __file__, *extra, "--seqlens", str(args.seqlens[0])]
        todo = [[*first, "--child", v, "--compile-only", k] for v in variants for k in KERNELS]
        running: list[subprocess.Popen] = []
        while todo or running:
            while todo and len(running) < args.jobs:
                running.append(subprocess.Popen(todo.pop(0), stdout=subprocess.DEVNULL))
            time.sleep(1)
            running = [p for p in running if p.poll() is None]
        print(f"compiled every config in {time.time() - t0:.0f} s", flush=True)
    from bench_attention import environment  # GPU name, clocks, versions, date, command

    data = {"env": environment(), "rows": []}
    for variant in variants:
        r = subprocess.run([*base, "--child", variant], capture_output=True, text=True)
        lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
        if not lines:
            print(f"{variant} failed:", r.stderr[-3000:], flush=True)
            continue
        for row in json.loads(lines[0][len("RESULT ") :]):
            data["rows"].append(row)
            best = {name: min(row[name].values()) for name in KERNELS}
            total = sum(best.values())
            print(f"== {variant} N={row['seqlen']}: sum of the fastest kernels {total:.3f} ms", flush=True)
            for name in KERNELS:
                top = sorted(row[name].items(), key=lambda kv: kv[1])[:5]
                print(f"   {name:5s}", "  ".join(f"{c}: {t * 1000:.0f} us" for c, t in top), flush=True)
        Path(args.out).write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
