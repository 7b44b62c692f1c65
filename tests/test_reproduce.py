"""scripts/reproduce.py prints each paper table with the paper's numbers and ours, read from results/."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def reproduce(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "scripts/reproduce.py", *args], cwd=REPO, capture_output=True, text=True
    )


@pytest.mark.parametrize(
    "table,paper,no_result",
    [("1", "17.4 +- 1.4 min", True), ("3", "59.8", True), ("5", "57.1", True), ("6", "61.4", True),
     ("2", "3.5x", False), ("4", "17.5", False), ("fig3", "up to 20x", False)],
)  # fmt: skip
def test_every_table_prints_the_paper_and_ours(table, paper, no_result):
    r = reproduce("--table", table)
    assert r.returncode == 0, r.stderr
    assert paper in r.stdout
    assert ("no result yet" in r.stdout) == no_result


def test_our_numbers_come_from_the_results_files():
    train = json.loads((REPO / "results/train/nvidia-h100-80gb-hbm3.json").read_text())
    rate = {row["name"]: row.get("tokens_per_s") for row in train["results"]}
    ratio = rate["small-1k:ours-flash+compile"] / rate["small-1k:hf-eager"]
    out = reproduce("--table", "2").stdout
    assert f"{ratio:.2f}x" in out and train["gpu"]["name"] in out
    conv = json.loads((REPO / "results/convergence/nvidia-h100-80gb-hbm3.json").read_text())
    assert f"{conv['final_val_ppl']['flash-4k']:.1f}" in reproduce("--table", "4").stdout
    att = json.loads((REPO / "results/attention/nvidia-h100-80gb-hbm3.json").read_text())
    memory = att["targets"]["memory_reduction_vs_standard_at_4k"]["value"]
    assert f"{memory:.0f}x" in reproduce("--table", "fig3").stdout


def test_unknown_table_names_the_choices():
    r = reproduce("--table", "9")
    assert r.returncode != 0
    assert "choose one of 1, 2, 3, 4, 5, 6, fig3, all" in r.stderr
