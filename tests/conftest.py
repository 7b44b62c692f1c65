"""Shared test setup.

Without a CUDA GPU the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1), which must be
set before triton is first imported, hence here.
"""

import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
