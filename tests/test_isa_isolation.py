"""The per-instruction-set CPU kernels keep their AVX code to themselves.

Each CPU kernel is compiled once per instruction set (csrc/cpu/isa_target.h). An inline
function or template instantiation that an AVX2 or AVX-512 translation unit shares with the
portable code (``std::vector<float>``, an ATen inline method) is emitted in both, and the linker
keeps one copy: if it kept the AVX-512 one, the DEFAULT path would die of an illegal
instruction on a CPU without AVX-512 (or worse, ``lzcnt`` would silently compute ``bsr``).
csrc/cpu/isa_prelude.h prevents it; this test reads the built library's machine code and
checks that every function using an instruction beyond x86-64's baseline belongs to an
instruction-set namespace (headops' or ATen's ``AVX2``, ``AVX512``, ``AVX512_BF16``; headops'
AMX tile loops in ``AMX``, which csrc/cpu/amx_tiles.cpp runs only where the CPU has AMX).
The DEFAULT and AVX2 variants are also run for real by tests/test_cpu_variants.py.
"""

import functools
import platform
import re
import shutil
import subprocess

import pytest

import headops

FUNCTION = re.compile(r"^[0-9a-f]+ <(.+)>:$")
# AVX/AVX2/AVX-512 (VEX/EVEX: v-prefixed SIMD mnemonics, ymm/zmm and opmask registers), AMX (tmm
# registers, tile configuration) and the BMI/LZCNT/POPCNT instructions the ISA targets enable;
# none is in x86-64's baseline
BEYOND_BASELINE = re.compile(
    r"^\s*[0-9a-f]+:\s+(v\w+\s.*%[xyz]mm|\S.*%[yz]mm\d|\S.*%k[1-7]\b|\S.*%tmm\d|(ldtilecfg|tilerelease)\b"
    r"|(shlx|shrx|sarx|rorx|bzhi|pdep|pext|mulx|andn|lzcnt|tzcnt|popcnt)\s)")
ISA_NAMESPACES = ("::AVX2::", "::AVX512::", "::AVX512_BF16::", "::AMX::")


@functools.lru_cache(maxsize=None)
def disassembly(library):
    """The library's .text as objdump lists it (demangled; read once for the tests here)."""
    return subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", "-j", ".text", library],
                          capture_output=True, text=True, check=True).stdout


def functions_beyond_baseline(library):
    """{demangled function name: first instruction beyond the baseline} of the library's .text."""
    found, current = {}, None
    for line in disassembly(library).splitlines():
        header = FUNCTION.match(line)
        if header:
            current = header.group(1)
        elif current is not None and current not in found and BEYOND_BASELINE.match(line):
            found[current] = line.strip()
    return found


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the ISA variants exist on x86-64 only")
@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils)")
def test_no_avx_code_outside_isa_namespaces():
    found = functions_beyond_baseline(headops._C.__file__)
    inside = [name for name in found if any(ns in name for ns in ISA_NAMESPACES)]
    leaked = {name: insn for name, insn in found.items() if name not in inside}
    # the scan must see the kernels' own AVX code, or it checks nothing
    assert any("headops::cpu::AVX2::" in name for name in inside), "no AVX2 kernel code found: scan broken?"
    assert any("headops::cpu::AVX512::" in name for name in inside), "no AVX-512 kernel code found: scan broken?"
    if platform.system() == "Linux":
        assert any("headops::cpu::AMX::" in name for name in inside), "no AMX tile code found: scan broken?"
    assert not leaked, (f"{len(leaked)} function(s) outside an ISA namespace use instructions beyond x86-64's "
                        "baseline (shared code compiled for an ISA target):\n" +
                        "\n".join(f"{name}\n    {insn}" for name, insn in sorted(leaked.items())[:20]))


# the per-vector helpers of the softmax's exp (csrc/cpu/row_ops.h): a call per vector through
# the PLT cost the AVX2 forward 2-5 % on the Zen 3 EPYC until they were forced inline (9b82ae9)
CALL = re.compile(r"^\s*[0-9a-f]+:\s+call\s")
PER_VECTOR_EXP = re.compile(r"\bcall\s.*\bheadops::cpu::(AVX2|AVX512|AVX512_BF16)::(pow2|exp2_of_fraction)<")


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the ISA variants exist on x86-64 only")
@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils)")
def test_softmax_exp_is_inlined_in_every_isa_variant():
    calls = [line.strip() for line in disassembly(headops._C.__file__).splitlines() if CALL.search(line)]
    assert calls, "no call instruction found: scan broken?"
    out_of_line = [line for line in calls if PER_VECTOR_EXP.search(line)]
    assert not out_of_line, f"{len(out_of_line)} call(s) of the per-vector exp:\n" + "\n".join(out_of_line[:10])
