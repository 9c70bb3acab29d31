"""``python -m headops info``: what this installation is and which kernels a call takes.

    python -m headops info

Versions (headops, torch, and the torch the kernels were compiled against), the CPU, the kernel
variant ATen's dispatcher chose for it (ATEN_CPU_CAPABILITY overrides), how bf16/fp16 tiles are
multiplied, the CUDA architectures compiled (or why none), and for each visible GPU its
capability and the CUDA forward kernel a bf16 and a float32 call would take.
"""

from __future__ import annotations

import os
import platform

HELP = "versions, CPU variant, CUDA architectures compiled, and which kernels a call takes"
_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def add_arguments(p) -> None:
    p.add_argument("--head-dim", type=int, default=128, help="the head dim of the calls described (default 128)")


def _cpu() -> tuple:
    """(model name, the flags of _CPU_FLAGS it has) from /proc/cpuinfo (Linux; else platform's)."""
    name, flags = platform.processor() or "unknown", set()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    return name, [flag for flag in _CPU_FLAGS if flag in flags]


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _tiles(shape) -> str:
    return "x".join(map(str, shape))


def describe(head_dim: int = 128) -> list:
    """The report's lines."""
    import torch

    import headops
    from headops import _C
    from headops._build import build_info

    info = build_info()
    lines = [f"headops {headops.__version__} ({os.path.dirname(headops.__file__)})",
             f"torch {torch.__version__} (kernels compiled against "
             f"{info['torch_version'] if info else 'an unrecorded version: a build tree older than the record'})",
             f"python {platform.python_version()}"]
    name, flags = _cpu()
    variant = _C.cpu_capability()
    lines += [f"CPU: {name}; {torch.get_num_threads()} torch threads; flags: {' '.join(flags) or 'none of ' + ', '.join(_CPU_FLAGS)}",
              f"  kernel variant: {variant} (ATen's choice for this CPU; ATEN_CPU_CAPABILITY=DEFAULT|AVX2|AVX512 overrides)",
              f"  float32/float64 tiles: {'the BLAS torch links' if _C.cpu_have_native_blas() else 'the built-in loops'}"
              + ("; float32 through brgemm (AVX-512) when each key meets at least {} query rows (forward) / {} "
                 "(backward)".format(_C.cpu_float_packing_rows(False), _C.cpu_float_packing_rows(True))
                 if _C.cpu_uses_packed_operands(torch.float32, head_dim) else "")]
    for dtype in (torch.bfloat16, torch.float16):
        packed = _C.cpu_uses_packed_operands(dtype, head_dim)
        if _C.cpu_runs_own_amx_tiles(dtype, head_dim):
            how = "headops' own AMX tile loops in the input dtype (HEADOPS_CPU_AMX_BY_ONEDNN=1: brgemm)"
        elif dtype == torch.float16 and _C.cpu_splits_half_into_bf16_tiles(head_dim):
            how = ("each operand as two bfloat16 parts on headops' own AMX tile loops (no AMX-FP16; "
                   "HEADOPS_CPU_AMX_BY_ONEDNN=1: brgemm) where each key meets enough query rows, forward and "
                   "backward; a call that learns softmax_scale, sink_logit, alpha or key_bias keeps float32 "
                   "tiles for P (and, for softmax_scale and key_bias, its backward), and the rest (few rows a "
                   "key, inputs holding inf or NaN) take brgemm in float16 forward, float32 backward")
        elif packed:
            layout = "VNNI pairs" if _C.cpu_brgemm_pairs(dtype) == 2 else "plain rows"
            how = f"brgemm in the input dtype, B in {layout} (AMX / AVX512-BF16 / AVX512-FP16 where the CPU has them)"
            if dtype == torch.float16:
                how += "; calls saved for the backward keep P in float32 (converted tiles)"
        elif dtype == torch.float16 and _C.cpu_widens_half_to_float_tiles(head_dim):
            how = ("widened to float32 and run through float32 brgemm on K and V packed once (no float16 "
                   "brgemm here) where each key meets as many query rows as a float32 call packs for; the "
                   "backward converts to float32")
        else:
            how = "converted to float32 tiles (no packed bf16/fp16 unit)"
        lines.append(f"  {_dtype_name(dtype)} tiles (D = {head_dim}): {how}")
    l2 = _C.cpu_l2_cache_bytes()
    shapes = ", ".join(f"{_dtype_name(dtype)} {_tiles(_C.cpu_tile_shape(dtype, head_dim))}"
                       f" / {_tiles(_C.cpu_backward_tile_shape(dtype, head_dim))}" for dtype in (torch.float32, torch.bfloat16))
    lines.append(f"  tile shapes (queries x keys, forward / backward, D = {head_dim}; the longest a call's sequences "
                 f"allow): {shapes}; L2 per core {f'{l2 >> 10} KiB' if l2 else 'unknown'}")
    if _C.cuda_compiled:
        archs = info["cuda_archs"] if info else "not recorded"
        lines.append(f"CUDA kernels: compiled for {archs} (torch's CUDA {torch.version.cuda})")
    else:
        lines.append("CUDA kernels: not compiled" + (f" ({info['why_not_cuda']})" if info and info["why_not_cuda"] else ""))
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(index)
            line = f"  cuda:{index}: {torch.cuda.get_device_name(index)}, capability {major}.{minor}"
            if _C.cuda_compiled:
                kernels = []
                for dtype in (torch.bfloat16, torch.float32):
                    q = torch.empty(1, 16, 4, head_dim, dtype=dtype, device=f"cuda:{index}")
                    kernels.append(f"{_dtype_name(dtype)} -> {_C.cuda_kernel_for(q, q, q, False)}")
                line += "; forward kernel: " + ", ".join(kernels)
            lines.append(line)
    else:
        lines.append("  no CUDA device visible")
    return lines


def run(args) -> int:
    print("\n".join(describe(args.head_dim)))
    return 0
