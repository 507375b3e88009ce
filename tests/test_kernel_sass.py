"""benchmarks/kernel_sass.py: the SASS parser finds a kernel's main loop (CPU, no triton needed)."""

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "kernel_sass.py"

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;                  /* 0x00000a0000017a02 */
        /*0010*/                   S2R R0, SR_CTAID.X ;                    /* 0x0000000000007919 */
        /*0020*/               @P0 BRA 0x0090 ;                            /* 0x0000006000000947 */
.L_x_1:
        /*0030*/                   LDG.E.U16 R2, [R4.64] ;                 /* 0x0000000404027981 */
        /*0040*/                   MUFU.EX2 R3, R2 ;                       /* 0x0000000200037308 */
        /*0050*/                   FFMA R6, R3, R6, R5 ;                   /* 0x0000000603067223 */
        /*0060*/              @!P1 BRA 0x0040 ;                            /* 0xffffffd000009947 */
        /*0070*/                   FFMA R6, R3, R6, R5 ;                   /* 0x0000000603067223 */
        /*0080*/               @P2 BRA `(.L_x_1) ;                         /* 0xffffffa000008947 */
        /*0090*/                   EXIT ;                                  /* 0x000000000000794d */
"""


def load():
    spec = importlib.util.spec_from_file_location("kernel_sass", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_main_loop_is_the_longest_backward_branch_and_guards_are_dropped():
    sass = load()
    loop = sass.main_loop(SASS)
    # the inner loop 0x40-0x60 is shorter than the labelled loop 0x30-0x80; forward branches are not loops
    assert [sass.opcode(text) for text in loop] == ["LDG.E.U16", "MUFU.EX2", "FFMA", "BRA", "FFMA", "BRA"]
    assert loop[-1].startswith("BRA")  # the "@P2 " guard is stripped


def test_code_without_a_backward_branch_has_no_loop():
    sass = load()
    straight = "\n".join(line for line in SASS.splitlines() if "0x0040 ;" not in line and "L_x_1) ;" not in line)
    assert sass.main_loop(straight) == []
    assert len(sass.instructions(straight)) == 8
