"""Shared test setup.

Without a CUDA GPU the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1), which must be
set before triton is first imported, hence here.
"""

import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # One config per kernel and head dim keeps GPU test compile time small; the benchmark autotunes
    # and cross-checks every tuned configuration against SDPA.
    os.environ.setdefault("FLASHREPRO_AUTOTUNE", "0")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
