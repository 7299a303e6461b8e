"""Ingest throughput and memory: N and 10N pairs of 512x512 images, with 1 and 2 workers.

Side by side, in one run: the ``ingest`` stage (``python -m tasks.ingest``,
as DVC runs it) over generated folders of N and 10N RGB 512x512 image/mask
pairs, each with one and with two decoding workers, for two kinds of source:
PNG images (already stored as ingest stores them: decoded, checked, hashed
and copied) and JPEG images (decoded, checked and encoded again as PNG, the
expensive path). Memory is the peak of the
whole process tree's proportional set size (PSS: shared pages split between
the processes that share them, so forked workers are not counted twice),
sampled every 20 ms from /proc. The bar: streaming keeps the peak at 10N
within 1.2x the peak at N.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from bench._util import BIN, env

TITLE = "Ingest: pairs per second and peak memory at N and 10N pairs"
SIZE = 512


def make_pairs(root: Path, count: int, seed: int = 0, ext: str = "png") -> None:
    """``count`` distinct RGB image / class-id mask pairs under ``root/images`` and ``root/masks``."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        cx, cy = rng.integers(64, SIZE - 64, 2).tolist()
        r = int(rng.integers(20, 60))
        mask = (((xx - cx) ** 2 + (yy - cy) ** 2) < r * r).astype(np.uint8)
        image = rng.integers(0, 40, (SIZE, SIZE, 3), dtype=np.uint8) + (mask[..., None] * rng.integers(60, 200, 3))
        options = {"compress_level": 1} if ext == "png" else {"quality": 90}
        Image.fromarray(image.astype(np.uint8)).save(root / "images" / f"p{index:05d}.{ext}", **options)
        Image.fromarray(mask).save(root / "masks" / f"p{index:05d}.png")


def _tree_pss_kb(pid: int) -> int:
    """PSS of ``pid`` and all its descendants, in KiB (0 once it has exited)."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            for line in Path(f"/proc/{current}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
            for task in Path(f"/proc/{current}/task").iterdir():
                stack += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


def measure(project: Path, dataset: Path, workers: int) -> tuple[float, float]:
    """Run the stage once; return (wall seconds, peak tree PSS in MiB)."""
    params = {
        "classes": ["background", "disk"],
        "ingest": {"source": "folder", "path": str(dataset), "workers": workers},
    }
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    started = time.perf_counter()
    proc = subprocess.Popen(
        [str(BIN / "python"), "-m", "tasks.ingest"],
        cwd=project,
        env=env(PYTHONPATH=str(Path(__file__).resolve().parents[1])),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_pss_kb(proc.pid))
        time.sleep(0.02)
    seconds = time.perf_counter() - started
    output = proc.stdout.read()
    if proc.returncode != 0:
        raise RuntimeError(f"ingest failed:\n{output[-3000:]}")
    return seconds, peak / 1024


def run(work: Path, n: int = 100) -> str:
    """Measure; return the markdown section for docs/benchmarks.md."""
    project = work / "project"
    project.mkdir(parents=True, exist_ok=True)
    results = {}
    for ext in ("png", "jpg"):
        for count in (n, 10 * n):
            folder = work / f"{ext}-{count}"
            make_pairs(folder, count, ext=ext)
            for workers in (1, 2):
                results[ext, count, workers] = measure(project, folder, workers)
    lines = [
        "| source images | pairs | workers | wall s | pairs/s | peak memory (PSS, MiB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for (ext, count, workers), (seconds, peak) in results.items():
        lines.append(f"| {ext.upper()} | {count} | {workers} | {seconds:.1f} | {count / seconds:.1f} | {peak:.0f} |")
    lines.append("")
    for ext in ("png", "jpg"):
        for workers in (1, 2):
            ratio = results[ext, 10 * n, workers][1] / results[ext, n, workers][1]
            verdict = "meets" if ratio <= 1.2 else "MISSES"
            lines.append(
                f"- {ext.upper()}, {workers} worker(s): peak memory at {10 * n} pairs is {ratio:.2f}x that at {n} "
                f"({verdict} the 1.2x bar)."
            )
        for count in (n, 10 * n):
            speedup = results[ext, count, 1][0] / results[ext, count, 2][0]
            lines.append(f"- {ext.upper()}, {count} pairs: 2 workers are {speedup:.2f}x as fast as 1.")
    lines.append(
        f"- Each pair: a {SIZE}x{SIZE} RGB image and a one-channel mask PNG. Wall time includes starting Python "
        "and the stage's imports (about 1 s)."
    )
    return "\n".join(lines)
