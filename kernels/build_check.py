"""Compile every Triton kernel of this package for real GPU targets, without a GPU.

    python -m kernels.build_check            # sm_80 and sm_90
    python -m kernels.build_check --arch 80

`triton.compile` with an explicit `GPUTarget` runs the whole pipeline (Triton IR, TritonGPU IR,
LLVM IR, PTX, and a cubin from the `ptxas` that ships inside the triton wheel) on any machine,
so a kernel that only breaks on a real GPU compiler fails here, in CI. Each `*_triton` module
lists its kernel variants in `build_specs()`: (kernel, signature, constexprs). Must run without
TRITON_INTERPRET set (the interpreter replaces the kernels by Python functions).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

MODULES = (
    "kernels.layer_norm_triton",
    "kernels.bias_gelu_triton",
    "kernels.cross_entropy_triton",
    "kernels.lamb_triton",
)


@dataclass
class Built:
    kernel: str
    arch: int
    stages: list[str]  # the IR levels produced, ending in "cubin" when complete
    cubin_bytes: int
    seconds: float


def compile_all(archs: tuple[int, ...] = (80, 90)) -> list[Built]:
    """Compile each kernel variant for each `cuda` compute capability in `archs`."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("kernels.build_check needs TRITON_INTERPRET unset")
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    built = []
    for name in MODULES:
        module = importlib.import_module(name)
        for kernel, signature, constexprs in module.build_specs():
            for arch in archs:
                start = time.perf_counter()
                src = ASTSource(kernel, signature=signature, constexprs=constexprs)
                options = {"enable_fp_fusion": module.LAUNCH_OPTIONS["enable_fp_fusion"]}
                compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
                built.append(
                    Built(
                        kernel=f"{kernel.__name__}{_describe(signature, constexprs)}",
                        arch=arch,
                        stages=list(compiled.asm),
                        cubin_bytes=len(compiled.asm.get("cubin", b"")),
                        seconds=time.perf_counter() - start,
                    )
                )
    return built


def _describe(signature: dict[str, str], constexprs: dict[str, object]) -> str:
    first_pointer = next((v for v in signature.values() if v.startswith("*")), "")
    flags = ",".join(f"{k}={v}" for k, v in constexprs.items() if isinstance(v, bool))
    return f"[{first_pointer[1:]}{',' + flags if flags else ''}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability x10")
    args = parser.parse_args(argv)
    try:
        built = compile_all(tuple(args.arch or (80, 90)))
    except Exception as error:  # a one-line message, as every command here gives
        print(f"build_check: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    for b in built:
        print(f"sm_{b.arch}  {b.kernel:<60} {b.cubin_bytes:>7} B cubin  {b.seconds:5.2f} s")
    print(f"{len(built)} kernel builds, all to cubin")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
