"""devices: string parsing, resolution on this machine, and CUDA/MPS paths via a fake Probe."""

from __future__ import annotations

import json

import psutil
import pytest
import torch

from devices import CpuInfo, Device, DeviceProfile, Probe, cpu_info, parse_device, resolve_device
from edge_rt.errors import DeviceError

GIB = 1024**3

# Trimmed real /proc/cpuinfo blocks.
X86_CPUINFO = """\
processor	: 0
vendor_id	: GenuineIntel
model name	: Intel(R) Xeon(R) Platinum 8480+
flags		: fpu vme sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 avx512f avx512bw \
avx512vl avx_vnni avx512_bf16 amx_bf16 amx_tile amx_int8 avx512_vnni

processor	: 1
model name	: Intel(R) Xeon(R) Platinum 8480+
flags		: fpu vme sse sse2
"""
OLD_X86_CPUINFO = """\
processor	: 0
model name	: Intel(R) Core(TM)2 Duo CPU E8400 @ 3.00GHz
flags		: fpu sse sse2 ssse3 sse4_1
"""
GRAVITON3_CPUINFO = """\
processor	: 0
BogoMIPS	: 2100.00
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm \
jscvt fcma lrcpc dcpop sha3 asimddp sha512 sve asimdfhm dit uscat svei8mm svebf16 i8mm bf16 rng
CPU implementer	: 0x41
"""
RPI4_CPUINFO = """\
processor	: 0
BogoMIPS	: 108.00
Features	: fp asimd evtstrm crc32 cpuid
CPU implementer	: 0x41
"""


class FakeProbe(Probe):
    """A machine described by constructor arguments; touches no hardware."""

    def __init__(
        self,
        gpus: list[tuple[str, int, int, tuple[int, int]]] = (),  # (name, free, total, capability)
        mps: bool = False,
        machine: str = "x86_64",
        system: str = "Linux",
        cpuinfo: str = X86_CPUINFO,
        torch_capability: str = "DEFAULT",
        sysctl: dict[str, str] | None = None,
        cores: int = 8,
        ram: tuple[int, int] = (32 * GIB, 20 * GIB),
        mps_max: int | None = None,
    ):
        self.gpus, self.mps, self._machine, self._system = list(gpus), mps, machine, system
        self.cpuinfo, self.torch_capability, self._sysctl = cpuinfo, torch_capability, sysctl or {}
        self.cores, self.ram, self.mps_max = cores, ram, mps_max

    def cuda_available(self):
        return bool(self.gpus)

    def torch_cuda_version(self):
        return None

    def cuda_device_count(self):
        return len(self.gpus)

    def cuda_name(self, index):
        return self.gpus[index][0]

    def cuda_mem_info(self, index):
        return self.gpus[index][1], self.gpus[index][2]

    def cuda_capability(self, index):
        return self.gpus[index][3]

    def mps_available(self):
        return self.mps

    def mps_recommended_max_memory(self):
        return self.mps_max

    def machine(self):
        return self._machine

    def system(self):
        return self._system

    def processor(self):
        return ""

    def cpuinfo_text(self):
        return self.cpuinfo

    def sysctl(self, name):
        return self._sysctl.get(name)

    def torch_cpu_capability(self):
        return self.torch_capability

    def cpu_count(self):
        return self.cores

    def virtual_memory(self):
        return self.ram


TWO_GPUS = [
    ("NVIDIA GeForce RTX 2080", 6 * GIB, 8 * GIB, (7, 5)),
    ("NVIDIA GeForce RTX 3090", 20 * GIB, 24 * GIB, (8, 6)),
]

# --- parsing ---


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("auto", ("auto", None)),
        ("cpu", ("cpu", None)),
        ("cuda", ("cuda", 0)),
        ("cuda:0", ("cuda", 0)),
        ("cuda:3", ("cuda", 3)),
        ("mps", ("mps", None)),
        ("  CUDA:1 \n", ("cuda", 1)),
        ("Auto", ("auto", None)),
        ("MPS", ("mps", None)),
    ],
)
def test_parse_valid(spec, expected):
    assert parse_device(spec) == expected


@pytest.mark.parametrize(
    "spec", ["gpu", "cuda:-1", "cuda:x", "tpu", "", "   ", "cuda:", "cpu:0", "mps:0", "cuda:1:2",
             "cuda 1", "cuda:\u0661", "bad\nname", None]
)  # fmt: skip
def test_parse_invalid_is_one_line_device_error(spec):
    with pytest.raises(DeviceError) as ei:
        parse_device(spec)
    msg = str(ei.value)
    assert "\n" not in msg
    assert repr(spec) in msg
    for form in ("auto", "cpu", "cuda:N", "mps"):
        assert f'"{form}' in msg


def test_resolve_rejects_bad_string_before_probing():
    class ExplodingProbe(Probe):
        def cuda_available(self):
            raise AssertionError("probed hardware for an invalid string")

    with pytest.raises(DeviceError, match="'gpu'"):
        resolve_device("gpu", probe=ExplodingProbe())


# --- this real machine (CPU-only in CI) ---


def test_resolve_cpu_on_this_machine():
    real = Probe()
    d = resolve_device("cpu")
    assert d.kind == "cpu" and d.index is None
    assert d.torch_device == torch.device("cpu")
    assert d.total_memory == psutil.virtual_memory().total
    assert 0 < d.free_memory <= d.total_memory
    assert d.cpu == cpu_info(real)
    assert d.cpu.cores >= 1 and d.name
    # Default dtype follows the documented rule for this host's features.
    wants_bf16 = (d.cpu.arch == "x86_64" and (d.cpu.has("avx2") or d.cpu.has("avx512f"))) or (
        d.cpu.arch == "arm64" and d.cpu.has("bf16")
    )
    assert d.default_dtype == (torch.bfloat16 if wants_bf16 else torch.float32)
    assert d.profile.memory_bandwidth_gbps > 0 and d.profile.peak_gflops > 0


def test_resolve_auto_on_this_machine():
    real = Probe()
    if real.cuda_available() or real.mps_available():
        pytest.skip("this machine has a GPU; the fake-probe tests cover auto -> gpu")
    d = resolve_device()
    assert d.kind == "cpu"
    assert d.total_memory > 0 and d.free_memory <= d.total_memory


def test_real_cuda_unavailable_message():
    real = Probe()
    if real.cuda_available():
        pytest.skip("CUDA present")
    with pytest.raises(DeviceError) as ei:
        resolve_device("cuda")
    msg = str(ei.value)
    assert msg.startswith("CUDA device requested but torch.cuda is not available here (")
    assert msg.endswith("; use --device cpu or auto") and "\n" not in msg


def test_host_features_match_torch_dispatch_level():
    # An independent reference: ATen's own dispatch choice must agree with what we parsed.
    info = cpu_info()
    level = torch.backends.cpu.get_cpu_capability()
    if level == "AVX512":
        assert info.has("avx512f") and info.has("avx2")
    elif level == "AVX2":
        assert info.has("avx2") and info.has("fma")
    else:
        pytest.skip(f"torch dispatch level {level} implies no x86 features to check")


# --- fake CUDA machine ---


def test_fake_cuda_auto_picks_cuda0():
    d = resolve_device("auto", probe=FakeProbe(gpus=TWO_GPUS, mps=True))
    assert (d.kind, d.index, d.name) == ("cuda", 0, "NVIDIA GeForce RTX 2080")
    assert d.torch_device == torch.device("cuda", 0)


def test_fake_cuda_plain_cuda_is_index_0():
    d = resolve_device("cuda", probe=FakeProbe(gpus=TWO_GPUS))
    assert (d.index, d.total_memory, d.free_memory) == (0, 8 * GIB, 6 * GIB)


def test_fake_cuda_index_1_name_and_memory():
    d = resolve_device("cuda:1", probe=FakeProbe(gpus=TWO_GPUS))
    assert (d.kind, d.index) == ("cuda", 1)
    assert d.name == "NVIDIA GeForce RTX 3090"
    assert (d.total_memory, d.free_memory) == (24 * GIB, 20 * GIB)
    assert str(d.torch_device) == "cuda:1"
    assert d.profile.memory_bandwidth_gbps == 450.0  # capability 8.6 row
    assert d.describe() == "cuda:1 NVIDIA GeForce RTX 3090 (24.0 GiB, 20.0 GiB free, bfloat16)"


def test_fake_cuda_index_out_of_range_names_count():
    with pytest.raises(DeviceError) as ei:
        resolve_device("cuda:2", probe=FakeProbe(gpus=TWO_GPUS))
    msg = str(ei.value)
    assert "cuda:2" in msg and "only 2 CUDA device" in msg and "cuda:0..cuda:1" in msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    "cap, dtype",
    [((7, 5), torch.float16), ((6, 1), torch.float16), ((8, 0), torch.bfloat16),
     ((8, 6), torch.bfloat16), ((9, 0), torch.bfloat16)],
)  # fmt: skip
def test_fake_cuda_dtype_by_capability(cap, dtype):
    probe = FakeProbe(gpus=[("GPU", GIB, 2 * GIB, cap)])
    assert resolve_device("cuda:0", probe=probe).default_dtype == dtype


def test_fake_cuda_requested_but_absent():
    with pytest.raises(DeviceError) as ei:
        resolve_device("cuda", probe=FakeProbe(mps=True))
    msg = str(ei.value)
    assert msg.startswith("CUDA device requested but torch.cuda is not available here (")
    assert msg.endswith("; use --device cpu or auto")


# --- fake MPS machine ---


def test_fake_mps_only():
    probe = FakeProbe(
        mps=True, machine="arm64", system="Darwin", cpuinfo="",
        sysctl={"machdep.cpu.brand_string": "Apple M2", "hw.optional.arm.FEAT_BF16": "1"},
        ram=(16 * GIB, 9 * GIB), mps_max=11 * GIB,
    )  # fmt: skip
    d = resolve_device("auto", probe=probe)
    assert (d.kind, d.index) == ("mps", None)
    assert d.default_dtype == torch.float16
    assert d.torch_device == torch.device("mps")
    assert (d.total_memory, d.free_memory) == (11 * GIB, 9 * GIB)
    assert "Apple M2" in d.name
    assert d.cpu.features == ("asimd", "bf16")
    # The same probe resolves "cpu" to the Apple CPU with bf16 -> bfloat16.
    c = resolve_device("cpu", probe=probe)
    assert (c.name, c.default_dtype, c.total_memory) == ("Apple M2", torch.bfloat16, 16 * GIB)
    assert c.profile.memory_bandwidth_gbps == 100.0


def test_fake_mps_unavailable():
    with pytest.raises(DeviceError, match=r"^MPS device requested .*; use --device cpu or auto$"):
        resolve_device("mps", probe=FakeProbe())


def test_fake_no_gpu_auto_is_cpu():
    d = resolve_device("auto", probe=FakeProbe())
    assert d.kind == "cpu" and d.name == "Intel(R) Xeon(R) Platinum 8480+"
    assert (d.total_memory, d.free_memory) == (32 * GIB, 20 * GIB)


def test_free_memory_never_exceeds_total():
    # Some hosts (containers, swap accounting) report available > total; we clamp.
    assert resolve_device("cpu", probe=FakeProbe(ram=(8 * GIB, 9 * GIB))).free_memory == 8 * GIB
    gpu = [("GPU", 3 * GIB, 2 * GIB, (8, 0))]
    assert resolve_device("cuda", probe=FakeProbe(gpus=gpu)).free_memory == 2 * GIB


# --- /proc/cpuinfo parsing ---


def test_cpuinfo_x86_sample():
    info = cpu_info(FakeProbe(cpuinfo=X86_CPUINFO, cores=56))
    assert info == CpuInfo(
        arch="x86_64",
        features=("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni",
                  "avx512_bf16", "avx_vnni", "amx_bf16", "amx_int8"),  # fmt: skip
        cores=56,
        name="Intel(R) Xeon(R) Platinum 8480+",
    )
    d = resolve_device("cpu", probe=FakeProbe(cpuinfo=X86_CPUINFO))
    assert d.default_dtype == torch.bfloat16


def test_cpuinfo_old_x86_is_float32():
    d = resolve_device("cpu", probe=FakeProbe(cpuinfo=OLD_X86_CPUINFO, machine="AMD64", cores=2))
    assert d.cpu.arch == "x86_64"
    assert d.cpu.features == ()
    assert d.default_dtype == torch.float32
    assert d.profile.peak_gflops == 2 * 3.0 * 4  # scalar fallback


def test_cpuinfo_arm64_sample():
    probe = FakeProbe(machine="aarch64", cpuinfo=GRAVITON3_CPUINFO, cores=64)
    d = resolve_device("cpu", probe=probe)
    # svebf16 / svei8mm must not be mistaken for bf16 / i8mm; sve2 is absent on Graviton3.
    assert d.cpu.arch == "arm64"
    assert d.cpu.features == ("asimd", "asimdhp", "asimddp", "sve", "bf16", "i8mm")
    assert d.default_dtype == torch.bfloat16
    assert d.name == "arm64 CPU"  # no "model name" on arm64 Linux, no processor() string


def test_cpuinfo_arm64_dotprod_alias_and_no_bf16():
    rpi = FakeProbe(machine="aarch64", cpuinfo=RPI4_CPUINFO, cores=4)
    assert resolve_device("cpu", probe=rpi).cpu.features == ("asimd",)
    assert resolve_device("cpu", probe=rpi).default_dtype == torch.float32
    alias = FakeProbe(machine="arm64", cpuinfo="Features : asimd dotprod\n")
    assert cpu_info(alias).features == ("asimd", "asimddp")


def test_cpuinfo_fallback_to_torch_capability():
    probe = FakeProbe(cpuinfo="", torch_capability="AVX2")
    assert cpu_info(probe).features == ("sse4_2", "avx", "avx2", "fma")


def test_unreadable_cpuinfo_gives_empty_features(tmp_path):
    class NoFiles(Probe):
        cpuinfo_path = str(tmp_path / "missing")

        def machine(self):
            return "x86_64"

        def system(self):
            return "Linux"

        def torch_cpu_capability(self):
            return "DEFAULT"

    assert NoFiles().cpuinfo_text() == ""
    info = cpu_info(NoFiles())
    assert info.features == () and info.arch == "x86_64" and info.cores >= 1


def test_unknown_arch_has_no_features():
    info = cpu_info(FakeProbe(machine="riscv64", cpuinfo=X86_CPUINFO))
    assert (info.arch, info.features) == ("riscv64", ())


# --- serialisation ---


def test_to_dict_is_json_and_describe_is_one_line():
    d = resolve_device("cuda:0", probe=FakeProbe(gpus=TWO_GPUS))
    back = json.loads(json.dumps(d.to_dict()))
    assert back["device"] == "cuda:0" and back["default_dtype"] == "float16"
    assert back["total_memory"] == 8 * GIB and back["cpu"]["arch"] == "x86_64"
    assert back["profile"] == {
        "memory_bandwidth_gbps": 320.0, "peak_gflops": 60_000.0,
        "source": "estimate: CUDA capability 7.5",
    }  # fmt: skip
    assert isinstance(d, Device) and isinstance(d.profile, DeviceProfile)
    cpu = resolve_device("cpu", probe=FakeProbe(cores=8))
    assert cpu.describe().startswith("cpu Intel(R) Xeon(R) Platinum 8480+ (x86_64, 8 cores, sse4_2")
    assert "\n" not in cpu.describe()
