"""Where does in-kernel dropout time go? Per-kernel times of our kernels with variants of the Philox words.

Paper setting (batch 16, 8 heads, head dim 64, bf16, non-causal). Each variant runs in its own process,
through autotuners of this script's own (`tuning.autotuners`) whose configs set the kernels' DROPOUT_WORDS
constexpr to the variant's word function. Variants:

    nodrop      dropout_p = 0 (the baseline)
    ours        the kernels' dropout: one Philox4x32-7 call per 16 thread-owned elements
    ours0       the same with 0 Philox rounds: everything but the rounds
    allkeep     all-zero words, so every element is kept: the selects and the word plumbing alone

For each variant and sequence length the autotuner times every config of the forward, dK/dV and dQ
kernels with CUDA-graph replays; the script prints the five fastest of each (kernel time alone) and
writes all of them to kernel_dev/results/<gpu>-dropout-cost-triton<version>.json (--out: another folder).
`--extra-configs` adds candidate tiles that the kernels do not list (more warps, register caps);
`--jobs J` first compiles every config in J parallel processes so that the timed pass finds them in
Triton's cache. Not a correctness test: ours0 and allkeep do not draw the kernels' dropout mask.

    python kernel_dev/dropout_cost.py [--seqlens 1024 2048 4096] [--variants nodrop,ours] [--jobs 14]
    python kernel_dev/dropout_cost.py --inspect     # no GPU: layout conversions and spills of each variant

`--inspect` compiles each kernel with dropout for sm_90 (`kernels.aot`, as scripts/compile_kernels.py does)
and counts the layout conversions (`ttg.convert_layout`) in its Triton GPU IR, then runs ptxas -v for
registers and spills.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import triton
import triton.language as tl
from tuning import autotuners, fwd_bwd, tile_times

from kernels.flash_fwd import dropout_words

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ["nodrop", "ours", "ours0", "allkeep"]
KERNELS = ["fwd", "dkdv", "dq"]
# Candidate tiles beyond the kernels' own lists: (BLOCK_M, BLOCK_N, num_warps, num_stages, maxnreg).
EXTRA_CONFIGS = {
    "fwd": [(128, 64, 8, 3, 128), (64, 128, 4, 2, None), (128, 128, 4, 2, None), (256, 64, 16, 2, None)],
    "dkdv": [(128, 64, 4, 2, None), (128, 64, 4, 3, None), (128, 32, 4, 3, None), (64, 128, 4, 2, None)],
    "dq": [(128, 64, 4, 2, None), (64, 64, 4, 3, None), (64, 128, 4, 2, None), (128, 128, 4, 2, None)],
}


@triton.jit
def ours0(seed, bh, rows, start_n, BLOCK_N: tl.constexpr):
    return dropout_words(seed, bh, rows, start_n, BLOCK_N, 0)


@triton.jit
def allkeep(seed, bh, rows, start_n, BLOCK_N: tl.constexpr):
    r0, r1, r2, r3 = dropout_words(seed, bh, rows, start_n, BLOCK_N, 0)
    return r0 * 0, r1 * 0, r2 * 0, r3 * 0  # number 0 is below every bound: kept


def words(variant: str):
    """The variant's Philox word function, passed to the kernels as DROPOUT_WORDS (`dropout_words`'s
    arguments)."""
    return {"ours0": ours0, "allkeep": allkeep}.get(variant, dropout_words)


def measure(variant: str, seqlens: list[int], extra: bool, compile_only: str | None) -> list[dict]:
    """Autotune the three kernels at each sequence length; every config's median kernel time (ms).

    compile_only: run each config of that kernel once, untimed (the other kernels keep one config).
    """
    import torch

    def once(kernel_call, quantiles=None):
        kernel_call()
        torch.cuda.synchronize()
        return [1.0, 1.0, 1.0]

    tuners = autotuners(
        EXTRA_CONFIGS if extra else None, {"DROPOUT_WORDS": words(variant)}, once if compile_only else None
    )
    if compile_only:  # the other kernels keep their first config
        for name, tuner in tuners.items():
            if name != compile_only:
                tuner.configs = tuner.configs[:1]
    p = 0.0 if variant == "nodrop" else 0.1
    rows = []
    for n in seqlens:
        torch.manual_seed(0)
        q, k, v = (
            torch.randn(16, n, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(3)
        )
        fwd_bwd(tuners, q, k, v, torch.randn_like(q), dropout_p=p)
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

    from kernels.aot import compile_kernel, first_configs

    bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    for variant in variants:
        flags = dict(IS_CAUSAL=False, DROPOUT_MODE=1, IS_VARLEN=False, DROPOUT_WORDS=words(variant))
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
    ap.add_argument("--out", default=str(RESULTS), help="folder for <gpu>-dropout-cost-triton<version>.json")
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
        for variant in variants:  # one process per variant, as in the timed runs
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
    from kernels.benchmark import environment, gpu_slug

    data = {"env": environment(), "rows": []}
    path = Path(args.out) / f"{gpu_slug(data['env']['gpu'])}-dropout-cost-triton{triton.__version__}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
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
        path.write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
