"""Runtime resolution: CPU description, cgroup/affinity CPU counts, precision, threads, and the
per-device choice of the first convolution's im2col path."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F

from tinyset import runtime
from tinyset.errors import ConfigError
from tinyset.models import create_model
from tinyset.models import layers
from tinyset.runtime import (
    CpuInfo, available_cpus, cgroup_cpu_limit, configure_threads, cpu_info, describe_machine,
    im2col_first_conv, native_bf16, parse_cfs_quota, parse_cpu_max, resolve_precision,
    resolve_runtime, resolve_threads,
)

CPUINFO_BF16 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14 96-Core Processor
flags\t\t: fpu sse sse2 avx avx2 avx512f avx512bw avx512_bf16 avx512_vnni
bogomips\t: 5200.00

processor\t: 1
model name\t: AMD EPYC 9R14 96-Core Processor
flags\t\t: fpu sse sse2 avx avx2 avx512f avx512bw avx512_bf16 avx512_vnni
"""

CPUINFO_AMX = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8488C
flags\t\t: fpu avx avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8
"""

CPUINFO_AVX2 = """processor\t: 0
model name\t: Intel(R) Core(TM) i7-8700 CPU @ 3.20GHz
flags\t\t: fpu sse sse2 avx avx2 fma
"""


def fake_cpu(**overrides) -> CpuInfo:
    fields = dict(model="Fake CPU", avx2=True, avx512f=False, avx512_bf16=False, amx_bf16=False,
                  amx_tile=False, capability="AVX2", logical_cpus=8, affinity_cpus=4, cgroup_cpus=2,
                  available_cpus=2)
    fields.update(overrides)
    return CpuInfo(**fields)


AVX2_ONLY = fake_cpu()
AVX512_BF16 = fake_cpu(avx512f=True, avx512_bf16=True, capability="AVX512")
AMX = fake_cpu(avx512f=True, avx512_bf16=True, amx_bf16=True, amx_tile=True, capability="AMX")


@pytest.fixture
def no_cgroup(tmp_path):
    """Paths of an empty cgroup tree (no quota anywhere)."""
    root = tmp_path / "cgroup"
    root.mkdir()
    self_cg = tmp_path / "self_cgroup"
    self_cg.write_text("0::/\n")
    return root, self_cg


def write_cpuinfo(tmp_path, text):
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- cpu_info

def test_cpu_info_reads_model_and_bf16_flags(tmp_path, no_cgroup):
    root, self_cg = no_cgroup
    info = cpu_info(write_cpuinfo(tmp_path, CPUINFO_BF16), root, self_cg, affinity=[0, 1, 2],
                    capability="AVX512", logical_cpus=192)
    assert info.model == "AMD EPYC 9R14 96-Core Processor"
    assert (info.avx2, info.avx512f, info.avx512_bf16, info.amx_bf16, info.amx_tile) == (
        True, True, True, False, False)
    assert info.flags() == ["avx2", "avx512f", "avx512_bf16"]
    assert info.capability == "AVX512"
    assert (info.logical_cpus, info.affinity_cpus, info.cgroup_cpus, info.available_cpus) == (192, 3, None, 3)
    assert json.loads(json.dumps(info.to_dict()))["avx512_bf16"] is True
    assert native_bf16("cpu", info)


def test_cpu_info_amx_flags(tmp_path, no_cgroup):
    info = cpu_info(write_cpuinfo(tmp_path, CPUINFO_AMX), *no_cgroup, affinity=[0], capability="AMX")
    assert info.amx_bf16 and info.amx_tile and info.avx512_bf16
    assert info.model.startswith("Intel(R) Xeon(R)")


def test_cpu_info_without_bf16_flags(tmp_path, no_cgroup):
    info = cpu_info(write_cpuinfo(tmp_path, CPUINFO_AVX2), *no_cgroup, affinity=[0, 1], capability="AVX2")
    assert info.avx2 and not (info.avx512f or info.avx512_bf16 or info.amx_bf16 or info.amx_tile)
    assert info.flags() == ["avx2"]
    assert not native_bf16("cpu", info)


def test_cpu_info_model_falls_back_to_platform(tmp_path, no_cgroup, monkeypatch):
    monkeypatch.setattr(runtime.platform, "processor", lambda: "x86_64-fallback")
    info = cpu_info(write_cpuinfo(tmp_path, "processor : 0\nflags : avx2\n"), *no_cgroup, capability="AVX2")
    assert info.model == "x86_64-fallback" and info.avx2
    missing = cpu_info(tmp_path / "does-not-exist", *no_cgroup, capability="AVX2")
    assert missing.model == "x86_64-fallback"
    assert missing.flags() == []


def test_cpu_info_of_this_machine_is_consistent():
    info = cpu_info()
    assert info.model
    assert info.capability == torch.backends.cpu.get_cpu_capability()
    assert info.logical_cpus == os.cpu_count()
    assert 1 <= info.available_cpus <= info.affinity_cpus
    if hasattr(os, "sched_getaffinity"):
        assert info.affinity_cpus == len(os.sched_getaffinity(0))


# --------------------------------------------------------------------------- cgroup quota and affinity

@pytest.mark.parametrize("text,expected", [
    ("max 100000\n", None),
    ("150000 100000\n", 2),
    ("200000 100000", 2),
    ("50000 100000", 1),
    ("400000 100000", 4),
    ("", None),
    ("garbage here", None),
])
def test_parse_cpu_max(text, expected):
    assert parse_cpu_max(text) == expected


@pytest.mark.parametrize("quota,period,expected", [
    ("-1\n", "100000\n", None),
    ("300000\n", "100000\n", 3),
    ("250000", "100000", 3),
    ("10000", "100000", 1),
    ("x", "100000", None),
])
def test_parse_cfs_quota(quota, period, expected):
    assert parse_cfs_quota(quota, period) == expected


def test_cgroup_v2_quota(tmp_path):
    root = tmp_path / "cg"
    root.mkdir()
    (root / "cpu.max").write_text("150000 100000\n")
    self_cg = tmp_path / "self"
    self_cg.write_text("0::/\n")
    assert cgroup_cpu_limit(root, self_cg) == 2
    (root / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(root, self_cg) is None


def test_cgroup_v2_limit_of_a_parent_cgroup_applies(tmp_path):
    root = tmp_path / "cg"
    job = root / "user.slice" / "job.scope"
    job.mkdir(parents=True)
    (root / "user.slice" / "cpu.max").write_text("300000 100000\n")
    (job / "cpu.max").write_text("max 100000\n")
    self_cg = tmp_path / "self"
    self_cg.write_text("0::/user.slice/job.scope\n")
    assert cgroup_cpu_limit(root, self_cg) == 3
    (job / "cpu.max").write_text("100000 100000\n")  # the tighter one wins
    assert cgroup_cpu_limit(root, self_cg) == 1


def test_cgroup_v1_quota(tmp_path):
    root = tmp_path / "cg"
    cpu = root / "cpu,cpuacct"
    cpu.mkdir(parents=True)
    (cpu / "cpu.cfs_quota_us").write_text("250000\n")
    (cpu / "cpu.cfs_period_us").write_text("100000\n")
    self_cg = tmp_path / "self"
    self_cg.write_text("4:memory:/\n2:cpu,cpuacct:/\n1:name=systemd:/\n")
    assert cgroup_cpu_limit(root, self_cg) == 3
    (cpu / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(root, self_cg) is None


def test_no_cgroup_files_means_no_limit(tmp_path):
    assert cgroup_cpu_limit(tmp_path / "missing", tmp_path / "missing-self") is None


def test_available_cpus_is_affinity_capped_by_quota(tmp_path):
    root = tmp_path / "cg"
    root.mkdir()
    self_cg = tmp_path / "self"
    self_cg.write_text("0::/\n")
    assert available_cpus(root, self_cg, affinity=range(8)) == 8  # no quota file
    (root / "cpu.max").write_text("150000 100000\n")
    assert available_cpus(root, self_cg, affinity=range(8)) == 2
    assert available_cpus(root, self_cg, affinity=[3]) == 1  # affinity smaller than the quota
    (root / "cpu.max").write_text("1000 100000\n")
    assert available_cpus(root, self_cg, affinity=range(8)) == 1  # at least one


def test_available_cpus_follows_this_process_affinity():
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no sched_getaffinity on this platform")
    assert 1 <= available_cpus() <= len(os.sched_getaffinity(0))


# --------------------------------------------------------------------------- precision

def test_native_bf16_needs_flags_and_torch_kernels():
    assert not native_bf16(torch.device("cpu"), AVX2_ONLY)
    assert native_bf16(torch.device("cpu"), AVX512_BF16)
    assert native_bf16("cpu", AMX)
    # the CPU has the instructions but torch runs AVX2 kernels (e.g. ATEN_CPU_CAPABILITY=avx2)
    assert not native_bf16("cpu", fake_cpu(avx512f=True, avx512_bf16=True, capability="AVX2"))
    assert not native_bf16("meta", AVX512_BF16)


def test_auto_precision_on_cpu_follows_native_bf16():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu, cpu=AVX2_ONLY) == "fp32"
    assert resolve_precision("auto", cpu, cpu=AVX512_BF16) == "bf16"
    assert resolve_precision("auto", cpu, cpu=AMX) == "bf16"
    assert runtime._precision_choice("auto", cpu, AVX2_ONLY)[1] == "auto: no native bf16 on this CPU (AVX2)"
    assert runtime._precision_choice("auto", cpu, AVX512_BF16)[1] == "auto: native AVX512-BF16"
    assert runtime._precision_choice("auto", cpu, AMX)[1] == "auto: native AMX-BF16"


def test_auto_precision_on_cuda_is_fp32_without_cuda_calls(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a CUDA API was called for precision auto")

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", boom)
    monkeypatch.setattr(torch.cuda, "is_available", boom)
    assert resolve_precision("auto", torch.device("cuda")) == "fp32"
    assert resolve_precision("auto", torch.device("cuda:1")) == "fp32"
    assert runtime._precision_choice("auto", torch.device("cuda"))[1] == \
        "auto: fp32 on CUDA (bf16 autocast measured slower)"


def test_explicit_precision_is_honoured():
    cpu = torch.device("cpu")
    assert resolve_precision("bf16", cpu, cpu=AVX2_ONLY) == "bf16"
    assert resolve_precision("fp32", cpu, cpu=AVX512_BF16) == "fp32"
    assert resolve_precision("bf16", torch.device("cuda")) == "bf16"
    assert runtime._precision_choice("fp32", cpu, AVX512_BF16)[1] == "requested"
    assert runtime._precision_choice("bf16", cpu, AVX2_ONLY)[1].startswith("requested (no native bf16")


@pytest.mark.parametrize("bad", ["fp16", "BF16", "", None, "float32"])
def test_bad_precision_names_value_and_choices(bad):
    with pytest.raises(ConfigError) as exc:
        resolve_precision(bad, torch.device("cpu"), cpu=AVX2_ONLY)
    assert repr(bad) in str(exc.value)
    assert "auto, fp32, bf16" in str(exc.value)


def test_cpu_supports_bf16_matches_native_bf16():
    assert runtime.cpu_supports_bf16() == native_bf16("cpu", cpu_info())


# --------------------------------------------------------------------------- im2col path choice

@pytest.mark.parametrize("device", [torch.device("cpu"), "cpu", torch.device("cuda"), "cuda:1",
                                    torch.device("meta"), "mps"])
def test_im2col_first_conv_never_in_eager_code(device):
    """Eager code takes oneDNN's direct convolution on every device (measured faster on AVX2 and on
    AVX512/AMX CPUs, in fp32 and bf16)."""
    assert im2col_first_conv(device) is False


@pytest.mark.parametrize("device,expected", [("cpu", True), ("cuda", False), ("meta", False)])
def test_im2col_first_conv_inside_compiled_graphs_on_cpu_only(device, expected):
    def choice(x):
        return x + float(im2col_first_conv(device))

    assert float(choice(torch.zeros(()))) == 0.0  # eager: direct convolution
    assert float(torch.compile(choice, backend="eager", fullgraph=True)(torch.zeros(()))) == float(expected)


def test_conv2d_takes_im2col_only_inside_a_compiled_cpu_graph(monkeypatch):
    calls = []
    original = layers.Conv2d._forward_matmul

    def spy(self, x, bias):
        calls.append(torch.compiler.is_compiling())
        return original(self, x, bias)

    monkeypatch.setattr(layers.Conv2d, "_forward_matmul", spy)
    conv = layers.Conv2d(1, 4, 3, padding=1)
    conv.reset_parameters(torch.Generator().manual_seed(0))
    x = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    eager = conv(x)
    assert calls == []
    compiled = torch.compile(conv, backend="eager", fullgraph=True)(x)
    assert calls == [True]
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.fixture
def matmul_calls(monkeypatch):
    """Counts calls of Conv2d._forward_matmul (the im2col path); eager CPU code is made to take that
    path (as compiled CPU graphs do)."""
    monkeypatch.setattr(layers, "im2col_first_conv", lambda device: device.type == "cpu")
    calls = []
    original = layers.Conv2d._forward_matmul

    def spy(self, x, bias):
        calls.append(x.device.type)
        return original(self, x, bias)

    monkeypatch.setattr(layers.Conv2d, "_forward_matmul", spy)
    return calls


@pytest.mark.parametrize("members", [1, 3])
def test_im2col_weight_gradient_reduces_into_output_channel_columns(members, matmul_calls):
    """The weight gradient of the im2col product is formed as cols^T @ grad ([cin*k*k, cout]), not as
    grad^T @ cols ([cout, cin*k*k]): autograd picks the second for a column-major weight matrix, and its
    few output columns ran 4-8x slower in fp32 (MKL, AVX512 and AVX2 kernels alike)."""
    from torch.profiler import ProfilerActivity, profile

    conv = layers.Conv2d(1, 16, 3, padding=3, members=members)
    conv.reset_parameters(torch.Generator().manual_seed(0))
    x = torch.randn(5, members, 12, 12, generator=torch.Generator().manual_seed(1))
    y = conv(x)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        torch.autograd.grad(y.square().sum(), conv.weight)
    rows = 5 * 16 * 16  # images x output positions (12 + 2*3 - 3 + 1 = 16)
    shapes = [e.input_shapes[:2] for e in prof.events() if e.name == "aten::mm"]
    assert [[9 * members, rows], [rows, 16 * members]] in shapes, shapes
    assert [[16 * members, rows], [rows, 9 * members]] not in shapes, shapes


@pytest.mark.parametrize("members", [1, 3])
def test_conv2d_paths_agree_and_cpu_takes_im2col(members, matmul_calls, monkeypatch):
    conv = layers.Conv2d(3, 8, 3, padding=1, members=members)
    conv.reset_parameters(torch.Generator().manual_seed(0))
    assert conv.use_matmul  # 3*3*3 = 27: eligible
    x = torch.randn(4, 3 * members, 10, 10, generator=torch.Generator().manual_seed(1), requires_grad=True)

    y_mm = conv(x)
    assert matmul_calls == ["cpu"]
    g_mm = torch.autograd.grad(y_mm.square().sum(), [x, conv.weight, conv.bias])

    conv_calls = []
    real_conv2d = F.conv2d

    def conv2d_spy(*args, **kwargs):
        conv_calls.append(1)
        return real_conv2d(*args, **kwargs)

    monkeypatch.setattr(layers, "im2col_first_conv", lambda device: False)
    monkeypatch.setattr(layers.F, "conv2d", conv2d_spy)
    y_direct = conv(x)
    assert matmul_calls == ["cpu"] and conv_calls == [1]  # direct convolution this time
    g_direct = torch.autograd.grad(y_direct.square().sum(), [x, conv.weight, conv.bias])

    assert y_mm.shape == y_direct.shape == (4, 8 * members, 10, 10)
    torch.testing.assert_close(y_mm, y_direct, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_mm, g_direct):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_ineligible_conv_never_takes_im2col(matmul_calls):
    conv = layers.Conv2d(16, 8, 3, padding=1)  # 16*3*3 > 27
    conv.reset_parameters(torch.Generator().manual_seed(0))
    assert not conv.use_matmul
    conv(torch.randn(2, 16, 6, 6))
    assert matmul_calls == []


def test_convnet_on_cpu_uses_im2col_for_first_conv_only(matmul_calls):
    model = create_model("convnet", 1, 10, 28, seed=0)
    model(torch.randn(2, 1, 28, 28))
    assert matmul_calls == ["cpu"]


# --------------------------------------------------------------------------- threads

def test_resolve_threads_explicit_env_and_default(monkeypatch):
    monkeypatch.delenv(runtime.THREADS_ENV, raising=False)
    assert resolve_threads(3, environ={runtime.THREADS_ENV: "7"}) == 3  # explicit wins
    assert resolve_threads(None, environ={runtime.THREADS_ENV: "7"}) == 7
    assert resolve_threads(None, environ={runtime.THREADS_ENV: " 5 "}) == 5
    assert resolve_threads(None, environ={runtime.THREADS_ENV: ""}, cpu_count=6) == 6  # empty: unset
    assert resolve_threads(None, environ={}, cpu_count=6) == 6
    assert resolve_threads() == available_cpus()
    monkeypatch.setenv(runtime.THREADS_ENV, "4")
    assert resolve_threads() == 4


@pytest.mark.parametrize("bad", [0, -2, True, 2.0, "2"])
def test_bad_explicit_threads(bad):
    with pytest.raises(ConfigError, match=r"--threads must be an integer from 1 to 1024; got"):
        resolve_threads(bad)


@pytest.mark.parametrize("bad", ["abc", "0", "-3", "2.5"])
def test_bad_threads_env(bad, monkeypatch):
    monkeypatch.setenv(runtime.THREADS_ENV, bad)
    with pytest.raises(ConfigError) as exc:
        resolve_threads()
    assert f"TINYSET_THREADS={bad!r}" in str(exc.value)


def test_configure_threads_sets_torch(monkeypatch):
    monkeypatch.delenv(runtime.THREADS_ENV, raising=False)
    assert configure_threads(2) == 2 and torch.get_num_threads() == 2
    assert configure_threads(1) == 1 and torch.get_num_threads() == 1
    monkeypatch.setenv(runtime.THREADS_ENV, "2")
    assert configure_threads() == 2 and torch.get_num_threads() == 2


# --------------------------------------------------------------------------- Runtime

def test_resolve_runtime_on_cpu(monkeypatch):
    monkeypatch.delenv(runtime.THREADS_ENV, raising=False)
    rt = resolve_runtime("cpu", "auto", threads=None, configure=True, cpu=AVX2_ONLY)
    assert rt.device == torch.device("cpu")
    assert (rt.precision, rt.precision_reason) == ("fp32", "auto: no native bf16 on this CPU (AVX2)")
    assert rt.threads == AVX2_ONLY.available_cpus == torch.get_num_threads()
    assert rt.bit_repeatable
    d = json.loads(json.dumps(rt.to_dict()))
    assert d["device"] == "cpu" and d["precision"] == "fp32" and d["threads"] == 2
    assert d["bit_repeatable"] is True
    assert d["cpu"]["model"] == "Fake CPU" and d["cpu"]["capability"] == "AVX2"

    rt = resolve_runtime("cpu", "auto", cpu=AVX512_BF16, threads=1)
    assert (rt.precision, rt.precision_reason, rt.threads) == ("bf16", "auto: native AVX512-BF16", 1)


def test_resolve_runtime_without_configure_leaves_torch_alone():
    torch.set_num_threads(1)
    rt = resolve_runtime("cpu", "fp32", threads=2, configure=False, cpu=AVX2_ONLY)
    assert torch.get_num_threads() == 1 and rt.threads == 1
    assert rt.precision_reason == "requested"
    with pytest.raises(ConfigError, match="--threads"):
        resolve_runtime("cpu", "fp32", threads=0, configure=False, cpu=AVX2_ONLY)


def test_resolve_runtime_bad_values():
    with pytest.raises(ConfigError, match="'not-a-device'"):
        resolve_runtime("not-a-device", configure=False)
    with pytest.raises(ConfigError, match="'fp8'"):
        resolve_runtime("cpu", "fp8", configure=False)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_runtime("cuda", configure=False)
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_runtime(torch.device("cuda"), configure=False)


def test_resolve_runtime_auto_device():
    rt = resolve_runtime("auto", configure=False)
    assert rt.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert rt.bit_repeatable == (rt.device.type == "cpu")


def test_describe_machine_line():
    rt = resolve_runtime("cpu", "auto", threads=1, configure=False, cpu=AVX2_ONLY)
    line = describe_machine(rt)
    assert line == (f"CPU: Fake CPU | avx2, no amx | torch capability AVX2 | threads {rt.threads} "
                    f"(2 available, 8 logical) | precision fp32 (auto: no native bf16 on this CPU (AVX2))")
    rt = resolve_runtime("cpu", "auto", configure=False, cpu=AMX)
    assert "| avx2 avx512f avx512_bf16, amx_bf16 amx_tile | torch capability AMX |" in describe_machine(rt)
    assert "precision bf16 (auto: native AMX-BF16)" in describe_machine(rt)


def test_describe_machine_default_describes_this_cpu():
    torch.set_num_threads(1)
    line = describe_machine()
    info = cpu_info()
    assert line.startswith(f"CPU: {info.model} | ")
    assert f"torch capability {info.capability}" in line
    assert f"threads 1 ({info.available_cpus} available, {info.logical_cpus} logical)" in line
    assert "precision " in line and "\n" not in line


# --------------------------------------------------------------------------- CUDA

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_convnet_on_cuda_skips_im2col_and_matches_cpu(matmul_calls, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model = create_model("convnet", 3, 10, 32, seed=0)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out_cpu = model(x)
        assert matmul_calls == ["cpu"]
        out_gpu = copy.deepcopy(model).to("cuda")(x.to("cuda"))
    assert matmul_calls == ["cpu"]  # nothing new: CUDA took F.conv2d
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_resolve_runtime_on_cuda():
    rt = resolve_runtime("cuda", "auto", configure=False)
    assert rt.device.type == "cuda"
    assert rt.precision == "fp32" and not rt.bit_repeatable
    assert "device cuda" in describe_machine(rt)
    assert native_bf16(rt.device) == torch.cuda.is_bf16_supported()
