"""The machine a run or an export is made on: what decides a CPU run's last bits (CPU model, instruction set,
thread count) and the library versions, recorded in every run's config.json and every export's study.json."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), which with the instruction set decides a CPU run's last bits."""
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def environment(device: torch.device) -> dict:
    import torchvision
    info = {"torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version(),
            "device": str(device), "threads": torch.get_num_threads(), "machine": platform.machine(),
            "cpu": cpu_model(), "instruction_set": torch.backends.cpu.get_cpu_capability()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def machine() -> dict:
    """The machine an export or a build report is written on: CPU model, instruction set torch uses, cores, GPU."""
    info = {"cpu": cpu_model(), "instruction_set": torch.backends.cpu.get_cpu_capability(),
            "cores": os.cpu_count(), "machine": platform.machine()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
