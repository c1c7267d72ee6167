"""Compiled graphs stay correct when the vector ISA changes between runs on one CPU.

torch 2.13's compiled-graph cache does not key on the vector ISA inductor generated for; a graph
made under ``ATEN_CPU_CAPABILITY=avx2`` and reused without it (or the other way round) writes past
its buffers or leaves them half unwritten. :func:`tinyset.runtime.compile_options` names the width,
so each ISA gets its own cache entries. These tests need a CPU where torch runs AVX512 kernels (two
ISAs to switch between); elsewhere they skip.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tinyset.runtime import compile_options

AVX512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
needs_two_isas = pytest.mark.skipif(not AVX512 or os.environ.get("ATEN_CPU_CAPABILITY"),
                                    reason="needs torch running AVX512 kernels (to switch to AVX2)")

SCRIPT = textwrap.dedent("""
    import torch
    from tinyset.models import create_model
    from tinyset.runtime import compile_function
    torch.set_num_threads(1)
    net = create_model("convnet", 1, 10, 28).requires_grad_(False)
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    y = compile_function(net.embed)(x)
    print("maxdiff", (y - net.embed(x)).abs().max().item())
""")


def _run(cache: str, capability: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    env["TORCHINDUCTOR_CACHE_DIR"] = cache
    if capability:
        env["ATEN_CPU_CAPABILITY"] = capability
    return subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)


def test_options_name_a_vector_width_or_nothing():
    opts = compile_options()
    assert opts is None or (set(opts) == {"cpp.simdlen"} and opts["cpp.simdlen"] in (128, 256, 512, 1024, 2048))


@needs_two_isas
def test_options_follow_aten_cpu_capability():
    code = "from tinyset.runtime import compile_options; print(compile_options())"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert "256" in out
    assert compile_options() == {"cpp.simdlen": 512}


@pytest.mark.slow
@needs_two_isas
@pytest.mark.parametrize("order", [("avx2", None), (None, "avx2")], ids=["avx2-then-native", "native-then-avx2"])
def test_switching_isa_reuses_no_foreign_graph(tmp_path, order):
    # with plain torch.compile the second run dies with "free(): invalid pointer" (avx2 first) or
    # returns NaN (native first): measured on an AMX Xeon, torch 2.13
    for capability in order:
        proc = _run(str(tmp_path), capability)
        assert proc.returncode == 0, proc.stderr[-2000:]
        diff = float(proc.stdout.split("maxdiff")[1])
        assert diff < 1e-4, (capability, proc.stdout)
