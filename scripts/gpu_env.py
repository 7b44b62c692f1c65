"""What the benchmark scripts record about their GPU: a file-name form of its name, and nvidia-smi's answer."""

import re
import subprocess


def gpu_slug(name: str) -> str:
    """File-name form of a GPU name: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def nvidia_smi(*args: str) -> str:
    """nvidia-smi's output for args (e.g. "--query-gpu=clocks.sm", "--format=csv"), or why there is none."""
    try:
        return subprocess.run(
            ["nvidia-smi", *args], capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as err:
        return f"unavailable: {err}"
