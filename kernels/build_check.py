"""Compile every Triton kernel of this package for real GPU targets, without a GPU.

    python -m kernels.build_check            # sm_70, sm_80 and sm_90
    python -m kernels.build_check --arch 70

`triton.compile` with an explicit `GPUTarget` runs the whole pipeline (Triton IR, TritonGPU IR,
LLVM IR, PTX, and a cubin from the `ptxas` that ships inside the triton wheel) on any machine,
so a kernel that only breaks on a real GPU compiler fails here, in CI. The two halves are timed
and reported apart: IR -> PTX (Triton's own lowering) and PTX -> cubin (NVIDIA's ptxas), so a
failure says which side refused. Each `*_triton` module lists its kernel variants in
`build_specs()`: (kernel, signature, constexprs). Must run without TRITON_INTERPRET set (the
interpreter replaces the kernels by Python functions). Every build goes through a fresh, empty
Triton cache, so nothing is skipped.

kernels/dispatch.py selects the kernels on sm_70 (V100) only under the Triton versions for which
this check passed at sm_70 (`SM70_TRITON_VERSIONS` there).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MODULES = (
    "kernels.layer_norm_triton",
    "kernels.bias_gelu_triton",
    "kernels.cross_entropy_triton",
    "kernels.lamb_triton",
)
DEFAULT_ARCHS = (70, 80, 90)


@dataclass
class Built:
    kernel: str
    arch: int
    ptx_bytes: int  # 0 when IR -> PTX failed
    ptx_seconds: float  # from the Triton source to PTX
    cubin_bytes: int  # 0 when either half failed
    cubin_seconds: float  # ptxas alone
    error: str | None  # the first line of the failure, None when both halves passed


def compile_all(archs: tuple[int, ...] = DEFAULT_ARCHS) -> list[Built]:
    """Compile each kernel variant for each `cuda` compute capability in `archs`; failures are
    recorded in the results, not raised."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("kernels.build_check needs TRITON_INTERPRET unset")
    import importlib

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    built = []
    with tempfile.TemporaryDirectory() as cache:
        knobs.cache.dir = cache
        for name in MODULES:
            module = importlib.import_module(name)
            for kernel, signature, constexprs in module.build_specs():
                for arch in archs:
                    src = ASTSource(kernel, signature=signature, constexprs=constexprs)
                    options = {"enable_fp_fusion": module.LAUNCH_OPTIONS["enable_fp_fusion"]}
                    stages: dict[str, tuple[Any, float]] = {}
                    knobs.runtime.add_stages_inspection_hook = _stage_timer(stages)
                    start = time.perf_counter()
                    error = None
                    try:
                        triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
                    except Exception as exc:  # recorded: the report names the failing half
                        error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
                    finally:
                        knobs.runtime.add_stages_inspection_hook = None
                    ptx, ptx_end = stages.get("ptx", ("", 0.0))
                    cubin, cubin_end = stages.get("cubin", (b"", ptx_end))
                    built.append(
                        Built(
                            kernel=f"{kernel.__name__}{_describe(signature, constexprs)}",
                            arch=arch,
                            ptx_bytes=len(ptx),
                            ptx_seconds=(ptx_end - start) if ptx else 0.0,
                            cubin_bytes=len(cubin),
                            cubin_seconds=(cubin_end - ptx_end) if cubin else 0.0,
                            error=error,
                        )
                    )
    return built


def _stage_timer(stages: dict[str, tuple[Any, float]]) -> Callable[..., Any]:
    """A Triton `add_stages_inspection_hook` that records the output of the "ptx" and "cubin"
    stages and the time each finished. Called without arguments, Triton asks it for a cache
    key; the cache directory is fresh anyway."""

    def hook(*args: Any) -> Any:
        if not args:
            return "kernels.build_check", "stage-timer"
        pipeline = args[1]
        for name in ("ptx", "cubin"):
            pipeline[name] = _recorded(pipeline[name], name, stages)
        return None

    return hook


def _recorded(stage: Callable, name: str, stages: dict[str, tuple[Any, float]]) -> Callable:
    def run(src: Any, metadata: dict) -> Any:
        out = stage(src, metadata)
        stages[name] = (out, time.perf_counter())
        return out

    return run


def _describe(signature: dict[str, str], constexprs: dict[str, object]) -> str:
    first_pointer = next((v for v in signature.values() if v.startswith("*")), "")
    flags = ",".join(f"{k}={v}" for k, v in constexprs.items() if isinstance(v, bool))
    return f"[{first_pointer[1:]}{',' + flags if flags else ''}]"


def _ptxas_version() -> str:
    """The version line of the ptxas Triton uses (for the report)."""
    import subprocess

    from triton import knobs

    ptxas = knobs.nvidia.ptxas.path
    out = subprocess.run([ptxas, "--version"], capture_output=True, text=True, check=False)
    release = [line for line in out.stdout.splitlines() if "release" in line]
    return release[0] if release else "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability x10")
    args = parser.parse_args(argv)
    try:
        built = compile_all(tuple(args.arch or DEFAULT_ARCHS))
    except Exception as error:  # a one-line message, as every command here gives
        print(f"build_check: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    import triton

    print(f"triton {triton.__version__}; ptxas: {_ptxas_version()}")
    for b in built:
        ptx = (
            f"IR->PTX {b.ptx_bytes:>7} B ptx {b.ptx_seconds:5.2f} s"
            if b.ptx_bytes
            else ("IR->PTX FAILED")
        )
        cubin = (
            f"PTX->cubin {b.cubin_bytes:>7} B cubin {b.cubin_seconds:5.2f} s"
            if b.cubin_bytes
            else "PTX->cubin FAILED"
            if b.ptx_bytes
            else "PTX->cubin not reached"
        )
        print(f"sm_{b.arch}  {b.kernel:<56} {ptx}  {cubin}")
        if b.error:
            print(f"    {b.error}")
    failed = [b for b in built if b.error]
    print(f"{len(built)} kernel builds, {len(built) - len(failed)} to cubin, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
