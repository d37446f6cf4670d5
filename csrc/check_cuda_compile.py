#!/usr/bin/env python
"""Compile (not link, not run) the extension's CUDA sources for sm_80 and sm_90.

    python csrc/check_cuda_compile.py [--arch 80 --arch 90] [--nvcc PATH] [-v]

Works without a GPU and with a CPU-only torch wheel: the wheel ships the ATen/c10 (and
c10/cuda) headers, nvcc brings the CUDA runtime headers, and the .cu sources use nothing
else (no cuBLAS headers; cuBLAS is reached through at::mm). The flags mirror what
torch.utils.cpp_extension passes to nvcc for a CUDAExtension, plus -DMOGU_WITH_CUDA.
The C++ sources are also syntax-checked with -DMOGU_WITH_CUDA (their CUDA registrations).

Exit status: 0 when everything compiles, 1 on a compile error (the compiler output is
printed), 2 when nvcc is not found.
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))


def find_nvcc(explicit: str | None) -> str | None:
    """nvcc from --nvcc, $NVCC, $CUDA_HOME/bin, or PATH (in that order)."""
    candidates = [explicit, os.environ.get("NVCC")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "nvcc"))
    candidates.append(shutil.which("nvcc"))
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def torch_flags() -> tuple[list[str], list[str], list[str]]:
    """(include flags, define flags, nvcc-only flags) matching torch.utils.cpp_extension."""
    import torch
    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{HERE}"]
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", 1))
    defines = ["-DMOGU_WITH_CUDA", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
               f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    if torch.version.cuda is None:
        # A CPU wheel lacks the one generated c10/cuda header, c10/cuda/impl/cuda_cmake_macros.h
        # (it only defines C10_CUDA_BUILD_SHARED_LIBS, which matters for Windows dllimport).
        # c10/cuda/CUDAMacros.h skips it under this macro (the switch the HIP build uses).
        defines.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    nvcc_only = list(cpp_extension.COMMON_NVCC_FLAGS)
    return includes, defines, nvcc_only


def cxx_std() -> str:
    """The C++ standard cpp_extension passes for this torch (c++20 since torch 2.10, c++17 before)."""
    import inspect

    from torch.utils import cpp_extension
    return "c++20" if "-std=c++20" in inspect.getsource(cpp_extension) else "c++17"


def run(cmd: list[str], verbose: bool) -> tuple[int, str]:
    if verbose:
        print("+ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", action="append", default=None, help="SM version, repeatable (default: 80 and 90)")
    p.add_argument("--nvcc", default=None, help="path of nvcc")
    p.add_argument("--skip-cxx", action="store_true", help="only the .cu files")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    archs = args.arch or ["80", "90"]

    nvcc = find_nvcc(args.nvcc)
    if nvcc is None:
        print("check_cuda_compile: nvcc not found (set --nvcc, $NVCC or $CUDA_HOME)", file=sys.stderr)
        return 2
    includes, defines, nvcc_only = torch_flags()
    std = cxx_std()
    cu_sources = sorted(glob.glob(os.path.join(HERE, "*.cu")))
    cpp_sources = [] if args.skip_cxx else sorted(glob.glob(os.path.join(HERE, "*.cpp")))
    if not cu_sources:
        print("check_cuda_compile: no .cu sources in csrc/", file=sys.stderr)
        return 1

    jobs = []
    with tempfile.TemporaryDirectory() as tmp:
        for src in cu_sources:
            gencode = [f for a in archs for f in ("-gencode", f"arch=compute_{a},code=sm_{a}")]
            obj = os.path.join(tmp, os.path.basename(src) + ".o")
            jobs.append((src, [nvcc, "-c", src, "-o", obj, f"-std={std}", "-O3", "--compiler-options", "-fPIC"]
                         + nvcc_only + gencode + includes + defines))
        cxx = os.environ.get("CXX", "c++")
        py_include = f"-I{sysconfig.get_paths()['include']}"
        for src in cpp_sources:
            jobs.append((src, [cxx, "-fsyntax-only", src, f"-std={std}", "-fopenmp", py_include]
                         + includes + defines))
        workers = max(1, min(len(jobs), int(os.environ.get("MAX_JOBS", os.cpu_count() or 1))))
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(lambda job: (job[0], *run(job[1], args.verbose)), jobs))

    failed = 0
    for src, rc, out in results:
        name = os.path.relpath(src, os.path.dirname(HERE))
        kind = f"nvcc sm_{',sm_'.join(archs)}" if src.endswith(".cu") else "c++ -DMOGU_WITH_CUDA"
        print(f"{'ok  ' if rc == 0 else 'FAIL'} {name} ({kind})")
        if rc != 0:
            failed += 1
            print(out)
        elif args.verbose and out.strip():
            print(out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
