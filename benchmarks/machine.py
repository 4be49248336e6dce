"""The machine a benchmark ran on, in one line (every table names it): the GPU, or the CPU model and its threads."""

from __future__ import annotations

import platform
import subprocess

import torch


def machine(device: str | torch.device = "cpu") -> str:
    if str(device).startswith("cuda"):
        return f"{torch.cuda.get_device_name(torch.device(device))}; torch {torch.__version__}"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{torch.get_num_threads()}-thread CPU, {model} ({platform.machine()}); torch {torch.__version__}"
