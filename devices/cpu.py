"""Host CPU detection: architecture, SIMD features, core count, model name.

Sources, in order: /proc/cpuinfo (Linux), sysctl (macOS arm64), torch's CPU dispatch level.
Detection never raises: a host that tells us nothing gets an empty feature list.
"""

from __future__ import annotations

from dataclasses import dataclass

from devices.probe import Probe

# SIMD features we report, in this order. Names are the Linux /proc/cpuinfo spellings
# (arch/x86/include/asm/cpufeatures.h; arch/arm64/kernel/cpuinfo.c hwcap_str).
X86_FEATURES = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni",
    "avx512_bf16", "avx_vnni", "amx_bf16", "amx_int8",
)  # fmt: skip
ARM_FEATURES = ("asimd", "asimdhp", "asimddp", "sve", "sve2", "bf16", "i8mm")
ARM_ALIASES = {"dotprod": "asimddp"}

# macOS arm64 sysctl keys -> our feature names (sysctl hw.optional; Apple silicon has no SVE).
DARWIN_ARM_SYSCTL = {
    "hw.optional.AdvSIMD": "asimd",
    "hw.optional.arm.FEAT_FP16": "asimdhp",
    "hw.optional.arm.FEAT_DotProd": "asimddp",
    "hw.optional.arm.FEAT_BF16": "bf16",
    "hw.optional.arm.FEAT_I8MM": "i8mm",
}

# torch.backends.cpu.get_cpu_capability() -> features it implies (the last resort).
TORCH_CAPABILITY_FEATURES = {
    "AVX512": ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw"),
    "AVX2": ("sse4_2", "avx", "avx2", "fma"),
    "SVE256": ("asimd", "sve"),
}


@dataclass(frozen=True)
class CpuInfo:
    """The host CPU: arch ("x86_64", "arm64" or the raw machine name), SIMD features, cores."""

    arch: str
    features: tuple[str, ...]
    cores: int
    name: str

    def has(self, feature: str) -> bool:
        return feature in self.features


def normalize_arch(machine: str) -> str:
    m = machine.strip().lower()
    if m in ("x86_64", "amd64", "x64"):
        return "x86_64"
    if m in ("aarch64", "arm64", "armv8l"):
        return "arm64"
    return m or "unknown"


def _cpuinfo_field(text: str, key: str) -> str | None:
    # First "key : value" line; /proc/cpuinfo repeats blocks per logical CPU.
    for line in text.splitlines():
        k, sep, v = line.partition(":")
        if sep and k.strip().lower() == key:
            return v.strip()
    return None


def parse_cpuinfo_features(text: str, arch: str) -> tuple[str, ...]:
    """Known SIMD features listed in /proc/cpuinfo text ("flags" on x86, "Features" on arm64)."""
    if arch == "x86_64":
        field, known = _cpuinfo_field(text, "flags"), X86_FEATURES
    elif arch == "arm64":
        field, known = _cpuinfo_field(text, "features"), ARM_FEATURES
    else:
        return ()
    present = {ARM_ALIASES.get(f, f) for f in (field or "").split()}
    return tuple(f for f in known if f in present)


def _darwin_arm_features(probe: Probe) -> tuple[str, ...]:
    found = {feat for key, feat in DARWIN_ARM_SYSCTL.items() if probe.sysctl(key) == "1"}
    found.add("asimd")  # every Apple silicon core has NEON
    return tuple(f for f in ARM_FEATURES if f in found)


def _features(probe: Probe, arch: str, cpuinfo: str) -> tuple[str, ...]:
    if feats := parse_cpuinfo_features(cpuinfo, arch):
        return feats
    if arch == "arm64" and probe.system() == "Darwin":
        return _darwin_arm_features(probe)
    return TORCH_CAPABILITY_FEATURES.get(probe.torch_cpu_capability().upper(), ())


def _name(probe: Probe, arch: str, cpuinfo: str) -> str:
    name = _cpuinfo_field(cpuinfo, "model name")
    if not name and probe.system() == "Darwin":
        name = probe.sysctl("machdep.cpu.brand_string")
    return name or probe.processor() or f"{arch} CPU"


def cpu_info(probe: Probe | None = None) -> CpuInfo:
    """Detect the host CPU.

    Args:
        probe: hardware queries to use; the real `Probe()` by default.

    Returns:
        CpuInfo with the normalized arch, the known SIMD features present (possibly empty),
        the physical core count and the CPU model name.
    """
    probe = probe or Probe()
    arch = normalize_arch(probe.machine())
    text = probe.cpuinfo_text()
    return CpuInfo(
        arch=arch,
        features=_features(probe, arch, text),
        cores=max(1, probe.cpu_count()),
        name=_name(probe, arch, text),
    )
