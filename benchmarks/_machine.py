"""What machine a benchmark ran on, in one place: every script in benchmarks/ prints this line first
(and puts the dict in its JSON), because numbers are only comparable on the same machine.

CPU model and cores (/proc/cpuinfo, os.cpu_count), memory (/proc/meminfo), the GPU if there is one,
the versions of Python, torch, polars and numpy, the load average, and the dtype the benchmark chose.
Versions come from the installed packages' metadata, so nothing heavy (torch) is imported just to
name them; the GPU is asked of torch only when the caller already imported it, else of nvidia-smi.

    from _machine import machine, machine_line
    info = machine(dtype="float32")
    print(machine_line(info))
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from typing import Any


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def gpu_name() -> str | None:
    """The first CUDA device's name: from torch if the caller imported it, else nvidia-smi, else None."""
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        except Exception:  # noqa: BLE001 - a broken CUDA setup is "no GPU" here
            return None
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20, check=False).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    return out[0].strip() if out else None


def machine(dtype: str | None = None, device: str | None = None) -> dict[str, Any]:
    """The machine as a dict (for a benchmark's JSON)."""
    try:
        load = round(os.getloadavg()[0], 2)
    except OSError:
        load = None
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "memory_gib": round(memory_gib() or 0, 1) or None,
            "gpu": gpu_name(), "python": platform.python_version(), "torch": _version("torch"),
            "polars": _version("polars"), "numpy": _version("numpy"), "dtype": dtype, "device": device,
            "load_average": load}


def machine_line(info: dict[str, Any] | None = None) -> str:
    """One line: "CPU: AMD EPYC (2 cores), 23.4 GiB RAM; GPU: none; python 3.11.7, torch …; dtype float32; load 1.2"."""
    m = info or machine()
    ram = f", {m['memory_gib']:.1f} GiB RAM" if m.get("memory_gib") else ""
    versions = ", ".join(f"{k} {m[k]}" for k in ("python", "torch", "polars", "numpy") if m.get(k))
    extra = "".join(f"; {k} {m[k]}" for k in ("device", "dtype") if m.get(k))
    load = f"; load average {m['load_average']:.2f}" if m.get("load_average") is not None else ""
    return f"CPU: {m['cpu']} ({m['cores']} cores){ram}; GPU: {m.get('gpu') or 'none'}; {versions}{extra}{load}"


def print_machine(dtype: str | None = None, device: str | None = None) -> dict[str, Any]:
    """Print the machine line (flushed) and return the dict."""
    info = machine(dtype, device)
    print(machine_line(info), flush=True)
    return info


if __name__ == "__main__":
    print_machine()
