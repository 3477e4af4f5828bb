"""TI device profiles as data: what each SoC's TIDL accepts for prequantized (QDQ) models.

Source: ``shared/reference/tidl.md`` §1 (device table), §2 (quantization rules), §3 (compile limits) and §4
(``quantization_scale_type``). Rules and passes read these fields; none of them hard-code a device name. What does
not differ between devices (operator tables, opset limits) is in :mod:`tiexport.tidl_spec`, reached through
:attr:`DeviceProfile.spec` for the profile's SDK release.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from tiexport.errors import UsageError
from tiexport.tidl_spec import DEFAULT_SDK, TidlSpec, get_spec

__all__ = ["DEVICES", "DeviceProfile", "device_names", "get_device", "resolve_devices"]


@dataclass(frozen=True)
class DeviceProfile:
    """What one TI SoC's TIDL import accepts for an 8-bit prequantized model."""

    name: str
    soc: str
    """The ``tidl-tools`` SOC name (``am68pa`` for TDA4VM)."""
    mma_version: int
    """Matrix-multiply accelerator generation: 1 (TDA4VM), 2 (AM6xA), 0 for none (AM62)."""
    aliases: tuple[str, ...] = ()
    per_channel_weights: bool = True
    """Weights may be per-channel (MMAv2); TDA4VM takes per-tensor only (tidl.md §1)."""
    asymmetric_activations: bool = True
    """Layers that allow it may take asymmetric (zero point != 0) activations; TDA4VM: symmetric only (tidl.md §1)."""
    power_of_two_scales: bool = False
    """Every scale must be an exact power of two (TDA4VM, tidl.md §1)."""
    quantize_bias: bool = False
    """The fix pipeline writes Conv/Gemm bias as int32 + DequantizeLinear (tidl.md §2 "Bias"). Off on every device,
    as in TI's optimizer: TIDL quantizes a float bias itself, and rounding it here would move the ONNX model away
    from the PyTorch fake-quant model (which keeps float bias); ``tiexport fix --quantize-bias`` turns it on."""
    bias_bits: int = 32
    """TIDL clips bias to this many bits by default (16 on TDA4VM, tidl.md §2 "Bias")."""
    align_add_scales: bool = False
    """Align the scales of Add inputs, not only Concat inputs (inference in tidl.md §2: TIDL requantizes otherwise)."""
    lut_nonlinearities: bool = True
    """Sigmoid/Tanh/GELU... accelerated by lookup tables (AM62A has none, tidl.md §1)."""
    conv_3x3_stride_3: bool = True
    """3x3 stride-3 convolution supported (not on AM62A/AM67A, tidl.md §1)."""
    quantization_scale_type: int = 4
    """``advanced_options:quantization_scale_type`` for prequantized models on this device (tidl.md §4)."""
    max_num_subgraphs: int = 16
    """Compile option ``max_num_subgraphs`` (its default; tidl.md §3 "Other compile limits")."""
    max_num_subgraph_nodes: int = 2048
    """Node limit per TIDL subgraph that rule TIDL041 applies (tidl.md §3 "Other compile limits")."""
    notes: tuple[str, ...] = field(default_factory=tuple)
    sdk: str = DEFAULT_SDK
    """The TIDL SDK release whose facts (:attr:`spec`) the rules and passes apply."""

    @cached_property
    def spec(self) -> TidlSpec:
        """The TIDL facts of :attr:`sdk` (operator tables, op sets, opset and IR limits)."""
        return get_spec(self.sdk)

    @property
    def accelerator(self) -> bool:
        """False when everything runs on the Arm cores (AM62)."""
        return self.mma_version > 0


_MMAV2 = dict(mma_version=2, quantization_scale_type=4)

DEVICES: dict[str, DeviceProfile] = {
    p.name: p
    for p in (
        DeviceProfile(
            name="TDA4VM",
            soc="am68pa",
            mma_version=1,
            aliases=("J721E", "AM68PA", "DRA829", "TDA4VH-LEGACY"),
            per_channel_weights=False,
            asymmetric_activations=False,
            power_of_two_scales=True,
            bias_bits=16,
            align_add_scales=True,
            quantization_scale_type=1,
            notes=("MMAv1: per-tensor symmetric power-of-2 only (WT8SYMP2_AT8SYMP2).",),
        ),
        DeviceProfile(
            name="AM62A",
            soc="am62a",
            aliases=("AM62AX",),
            lut_nonlinearities=False,
            conv_3x3_stride_3=False,
            **_MMAV2,  # type: ignore[arg-type]
        ),
        DeviceProfile(
            name="AM67A",
            soc="am67a",
            aliases=("J722S", "TDA4AEN", "AM67"),
            conv_3x3_stride_3=False,
            **_MMAV2,  # type: ignore[arg-type]
        ),
        DeviceProfile(
            name="AM68A",
            soc="am68a",
            aliases=("J721S2", "TDA4AL", "TDA4VL", "TDA4VE"),
            **_MMAV2,  # type: ignore[arg-type]
        ),
        DeviceProfile(
            name="AM69A",
            soc="am69a",
            aliases=("J784S4", "TDA4AP", "TDA4VP", "TDA4AH", "TDA4VH"),
            **_MMAV2,  # type: ignore[arg-type]
        ),
        DeviceProfile(
            name="AM62",
            soc="am62",
            mma_version=0,
            aliases=("AM62X",),
            quantization_scale_type=0,
            notes=("No accelerator: the whole model runs in ONNX Runtime on the Arm cores.",),
        ),
    )
}

_LOOKUP: dict[str, str] = {}
for _p in DEVICES.values():
    for _key in (_p.name, _p.soc, *_p.aliases):
        _LOOKUP.setdefault(_key.upper(), _p.name)


def device_names() -> list[str]:
    """Canonical device names, in table order."""
    return list(DEVICES)


def get_device(name: str | DeviceProfile) -> DeviceProfile:
    """Look a device up by its name, tidl-tools SOC name or an alias (case-insensitive)."""
    if isinstance(name, DeviceProfile):
        return name
    key = _LOOKUP.get(str(name).strip().upper())
    if key is None:
        raise UsageError(f"unknown device {name!r}; known: {', '.join(DEVICES)} (or 'all')")
    return DEVICES[key]


def resolve_devices(names: str | DeviceProfile | list[str | DeviceProfile] | tuple[str | DeviceProfile, ...] | None,
                    ) -> list[DeviceProfile]:
    """Turn a device argument (one name, a list, ``'all'`` or None = all) into profiles, without duplicates."""
    if names is None:
        return list(DEVICES.values())
    if isinstance(names, (str, DeviceProfile)):
        names = [names]
    out: list[DeviceProfile] = []
    for n in names:
        profiles = list(DEVICES.values()) if isinstance(n, str) and n.strip().lower() == "all" else [get_device(n)]
        for p in profiles:
            if p not in out:
                out.append(p)
    if not out:
        raise UsageError("no device given")
    return out
