"""Devices: detection, capabilities, memory info and profiles; the only parser of device strings."""

from devices.cpu import CpuInfo, cpu_info
from devices.device import Device, parse_device, resolve_device
from devices.probe import Probe
from devices.profile import DeviceProfile

__all__ = [
    "Device",
    "CpuInfo",
    "DeviceProfile",
    "Probe",
    "parse_device",
    "resolve_device",
    "cpu_info",
]
