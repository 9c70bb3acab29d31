"""Builds headops._C: the C++ CPU kernels always, the CUDA kernels when torch has CUDA and nvcc
is found (HEADOPS_CUDA=0|1 forces either way).

Development builds are incremental through ninja: `python setup.py build_ext --inplace`
(what `make` runs). On a machine with torch installed: `pip install --no-build-isolation .` (or
`-e .`; pip's build isolation would compile against another torch than the one headops runs with).
The build prints one line saying what it compiles, and records it with the torch version in
python/headops/_build_info.py (untracked), which the package checks at import.

HEADOPS_SANITIZE=1 builds the CPU kernels with AddressSanitizer and UndefinedBehaviorSanitizer
(no CUDA; what `make test-asan` uses, into its own build directory).
"""

import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_choice(torch_cuda_version, nvcc):
    """(whether to build the CUDA kernels, why not when not)."""
    flag = os.environ.get("HEADOPS_CUDA", "").strip()
    if flag == "1":
        if torch_cuda_version is None:
            raise RuntimeError("HEADOPS_CUDA=1 but this torch has no CUDA")
        if nvcc is None:
            raise RuntimeError("HEADOPS_CUDA=1 but nvcc was not found (set CUDA_HOME)")
        return True, None
    if flag == "0":
        return False, "HEADOPS_CUDA=0"
    if torch_cuda_version is None:
        return False, "this torch has no CUDA"
    if nvcc is None:
        return False, "nvcc not found (set CUDA_HOME)"
    return True, None


def _nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home and os.path.exists("/usr/local/cuda/bin/nvcc"):
        home = "/usr/local/cuda"
    if home:
        os.environ.setdefault("CUDA_HOME", home)  # before torch.utils.cpp_extension reads it
        candidate = os.path.join(home, "bin", "nvcc")
        return candidate if os.path.exists(candidate) else None
    return shutil.which("nvcc")


def _isolated_build(torch) -> bool:
    """pip's default build isolation: torch imported from a temporary build environment."""
    return "pip-build-env" in os.path.abspath(torch.__file__)


def _write_build_info(torch, cuda_archs, why_not_cuda, *, write=True) -> str:
    """python/headops/_build_info.py (untracked): what this build compiled, against which torch; the
    package refuses another torch at import, and `python -m headops info` prints it. Returns the
    build's one-line summary."""
    info = {"torch_version": torch.__version__, "torch_cuda": torch.version.cuda,
            "cpu_variants": ["DEFAULT", "AVX2", "AVX512"], "cuda_archs": cuda_archs, "why_not_cuda": why_not_cuda}
    path = os.path.join(ROOT, "python", "headops", "_build_info.py")
    text = '"""Written by setup.py at build time (not tracked)."""\n\nBUILD = ' + repr(info) + "\n"
    if write and (not os.path.exists(path) or open(path).read() != text):
        with open(path, "w") as f:
            f.write(text)
    cuda = f"CUDA kernels for {cuda_archs}" if cuda_archs else f"no CUDA kernels ({why_not_cuda})"
    return (f"headops build: CPU kernels ({', '.join(info['cpu_variants'])} variants, chosen at run time); {cuda}; "
            f"against torch {torch.__version__}")


def extensions():
    nvcc = _nvcc()
    import torch

    if _isolated_build(torch):
        raise RuntimeError("headops compiles against the torch it will run with: build it without pip's build "
                           "isolation, `pip install --no-build-isolation .` (with torch installed first)")
    from torch.utils.cpp_extension import CppExtension, CUDAExtension, include_paths

    rel = lambda paths: sorted(os.path.relpath(p, ROOT) for p in paths)
    cpp_sources = rel(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cpp"), recursive=True))
    cu_sources = rel(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True))
    headers = rel(glob.glob(os.path.join(ROOT, "csrc", "**", "*.h"), recursive=True)
                  + glob.glob(os.path.join(ROOT, "csrc", "**", "*.cuh"), recursive=True))
    # torch's headers as system headers: their warnings (hundreds per build) hide the project's own
    # (gcc ignores the -I torch.utils.cpp_extension also passes for these folders)
    system = [f"-isystem{path}" for path in include_paths()]
    cxx = ["-O3", "-fopenmp", "-Wno-psabi"] + system
    link = ["-fopenmp"]
    sanitize = os.environ.get("HEADOPS_SANITIZE", "").strip() == "1"
    if sanitize:
        # -O1 keeps the run time of the sanitized test subset bounded; any report aborts the run
        checks = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
        # -fno-wrapv undoes the -fwrapv that Python's flags add, so signed overflow is reported
        cxx = ["-O1", "-g", "-fno-omit-frame-pointer", "-fno-wrapv", "-fopenmp", "-Wno-psabi"] + system + checks
        link = link + checks
    use_cuda, why = (False, "a sanitizer build") if sanitize else _cuda_choice(torch.version.cuda, nvcc)
    if use_cuda and not cu_sources:
        use_cuda, why = False, "no CUDA sources"
    if not use_cuda:  # host code of the CUDA kernels (csrc/**/cuda/*.cpp) needs the CUDA runtime
        cpp_sources = [s for s in cpp_sources if os.sep + "cuda" + os.sep not in s]
        print(_write_build_info(torch, None, why, write=not sanitize), flush=True)  # (ASan: its own folder)
    if use_cuda:
        # sm_80 and sm_90 images, and PTX of sm_90 that newer GPUs compile at load time; any list builds
        # (below sm_80 the tensor-core kernel compiles to a trap the host never launches)
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        print(_write_build_info(torch, os.environ["TORCH_CUDA_ARCH_LIST"], None), flush=True)
        site = os.path.dirname(os.path.dirname(torch.__file__))
        nv_include = [p for p in glob.glob(os.path.join(site, "nvidia", "*", "include")) if os.path.isdir(p)]
        return [CUDAExtension(
            "headops._C", cpp_sources + cu_sources, depends=headers,
            include_dirs=nv_include,
            define_macros=[("HEADOPS_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )]
    return [CppExtension("headops._C", cpp_sources, depends=headers, extra_compile_args={"cxx": cxx},
                         extra_link_args=link)]


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension
    return BuildExtension.with_options(use_ninja=True)


setup(
    name="headops",
    version="0.1.0",
    description="Per-head attention kernels for PyTorch: gates, windows, sinks, alpha mixing, head-sparse KV cache",
    package_dir={"": "python"},
    packages=find_packages("python"),
    ext_modules=extensions(),
    cmdclass={"build_ext": build_ext_class()},
    python_requires=">=3.9",
    install_requires=["torch>=2.6"],
)
