"""Builds the compiled kernels `bnmem_kernels._C`.

C++/OpenMP sources (`csrc/*.cpp`, `csrc/cpu/*.cpp`) are always built. CUDA sources
(`csrc/cuda/*.cu`) are built when torch has CUDA and nvcc is found. Switches:
  BNMEM_FORCE_CPU=1   never build CUDA sources
  BNMEM_FORCE_CUDA=1  build CUDA sources even when no GPU is visible (needs a CUDA torch + nvcc)
  BNMEM_NO_EXTENSION=1  install the pure-Python packages only (reference and Triton backends)
  MAX_JOBS=N          parallel compile jobs (ninja)
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# One C++ standard for the C++ and the CUDA sources (.ci/compile_cuda.sh reads this line): torch 2.13's
# headers use C++20 constructs (gcc/nvcc only warn under C++17), torch >= 2.14 refuses C++17, and
# torch's own cpp_extension defaults to C++20 since 2.12; torch 2.11's headers build under C++20 too.
CXX_STD = "-std=c++20"


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _packages():
    kernels = find_packages(include=["bnmem_kernels", "bnmem_kernels.*"])
    suite = ["bnmem"] + ["bnmem." + p for p in find_packages(os.path.join(ROOT, "python", "bnmem"))]
    return kernels + suite


def _extensions():
    if _flag("BNMEM_NO_EXTENSION"):
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    rel = lambda paths: sorted(os.path.relpath(p, ROOT) for p in paths)  # noqa: E731
    cpp = rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    cu = rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    with_cuda = (
        not _flag("BNMEM_FORCE_CPU")
        and torch.version.cuda is not None
        and CUDA_HOME is not None
        and (torch.cuda.is_available() or _flag("BNMEM_FORCE_CUDA"))
    )
    if _flag("BNMEM_FORCE_CUDA") and not with_cuda:
        sys.exit("BNMEM_FORCE_CUDA=1 but torch has no CUDA (torch.version.cuda=%r) or nvcc was not found "
                 "(CUDA_HOME=%r)" % (torch.version.cuda, CUDA_HOME))
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx = ["-O3", CXX_STD] + openmp
    define_macros = [("BNMEM_WITH_CUDA", "1"), ("BNMEM_ATEN_CUDA", "1")] if with_cuda else []
    if with_cuda:
        ext = CUDAExtension(
            "bnmem_kernels._C", cpp + cu, define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", CXX_STD, "--expt-relaxed-constexpr", "-lineinfo"]},
            extra_link_args=openmp,
        )
    else:
        ext = CppExtension("bnmem_kernels._C", cpp, define_macros=define_macros,
                           extra_compile_args={"cxx": cxx}, extra_link_args=openmp)
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _extensions()
setup(
    packages=_packages(),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
