"""What ``python -m gradkern info`` prints: versions, build flags, backends."""

from __future__ import annotations

import platform

import torch

import gradkern as gk


def build_report() -> dict:
    """The versions, build and backend facts as a dict (also stored in benchmark JSON)."""
    return {
        "gradkern": gk.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "machine": platform.machine(),
        **gk.build_info(),
        "backends": {name: vars(info) for name, info in gk.backends().items()},
        "forced_backend": gk.get_backend(),
    }


def print_info() -> None:
    r = build_report()
    print(f"gradkern {r['gradkern']}  python {r['python']}  torch {r['torch']}"
          f"  ({r['machine']}, torch CUDA {r['torch_cuda']})")
    cpu = r["cpu_build"]
    if cpu:
        print(f"CPU module : {cpu['compiler']}")
        print(f"  flags    : {cpu['flags']}")
        print(f"  OpenMP   : {'yes' if cpu['openmp'] else 'no'} ({cpu['max_threads']} threads)")
        shared = ("small passes stay on the calling thread when the cores are shared"
                  if cpu["cpu_share_measurable"] else
                  "not measurable here: passes always use the whole team")
        print(f"  sharing  : {shared}")
        print(f"  SIMD     : baseline {cpu['simd']}; hot loops built for {cpu['kernel_isas']},"
              f" running {cpu['active_isa']}"
              f"{', reading ahead' if cpu['reads_ahead'] else ''}")
    else:
        print("CPU module : not built")
    print(f"table rows : {r['table_reader']}")
    if r["cuda_table_reader"]:
        print(f"  on a GPU : {r['cuda_table_reader']}")
    cu = r["cuda_build"]
    if cu:
        print(f"CUDA module: runtime {cu['runtime_version']}, archs {cu['archs']}, "
              f"{cu['device_count']} device(s){' - ' + cu['error'] if cu['error'] else ''}")
    else:
        print("CUDA module: not built")
    forced = r["forced_backend"]
    if forced is None:
        print("dispatch   : automatic (the first usable backend for each device)")
    else:
        info = r["backends"][forced]
        state = "usable" if info["usable"] else f"NOT usable: {info['reason']}"
        print(f"dispatch   : forced to {forced} (set_backend or GRADKERN_BACKEND), {state}")
    print("backends:")
    for name, info in r["backends"].items():
        state = "usable" if info["usable"] else ("compiled, not usable" if info["compiled"]
                                                 else "not available")
        why = f" - {info['reason']}" if info["reason"] else ""
        print(f"  {name:10s} {state}{why}")
