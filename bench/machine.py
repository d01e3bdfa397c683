"""One line naming the machine a benchmark ran on, for its results file.

The 2-core VMs this project is measured on are not all alike: the same code measured on
different processors differs by more than most changes do, so every result names the
processor (model name, x86 family / model numbers, the widest vector extensions), not only
the host name and core count.
"""

import os
import platform


def _cpuinfo():
    """The first processor's fields of ``/proc/cpuinfo`` (empty off Linux)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def describe():
    """E.g. ``"vm: AMD EPYC (family 26, model 2; avx2, avx512f), 2 CPUs, x86_64"``."""
    info = _cpuinfo()
    name = info.get("model name") or platform.processor() or "unknown processor"
    details = []
    if "cpu family" in info:
        details.append(f"family {info['cpu family']}, model {info.get('model', '?')}")
    flags = set(info.get("flags", "").split())
    vector = [f for f in ("avx2", "avx512f", "amx_tile") if f in flags]
    if vector:
        details.append(", ".join(vector))
    detail = f" ({'; '.join(details)})" if details else ""
    return f"{platform.node()}: {name}{detail}, {os.cpu_count()} CPUs, {platform.machine()}"
