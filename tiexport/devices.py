"""TI device profiles as data: what each SoC's TIDL accepts for prequantized (QDQ) models.

Sources (:mod:`tiexport.tidl_spec.sources`): edgeai-tidl-tools ``docs/supported_ops_rts_versions.md`` "Feature set
comparison across devices" and ``docs/tidl_fsg_quantization.md`` (TDA4VM, listed as AM68PA/J721E, supports neither
asymmetric nor per-channel quantization), edgeai-tensorlab torchmodelopt's quantization README (TDA4VM uses
per-tensor power-of-2 quantization) and edgeai-benchmark's device presets (``quantization_scale_type`` 1 on TDA4VM,
4 on the MMAv2 devices, no TIDL offload on AM62). Rules and passes read these fields; none of them hard-code a device
name. What is the same for every device of a TIDL release (operator tables, opset limits, device lists inside
operator rows) is in :mod:`tiexport.tidl_spec`, reached through :attr:`DeviceProfile.spec` for the profile's SDK.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
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
    """Weights may be per-channel (MMAv2); TDA4VM does not support per-channel quantization."""
    asymmetric_activations: bool = True
    """Layers that allow it may take asymmetric (zero point != 0) activations; TDA4VM supports symmetric only."""
    power_of_two_scales: bool = False
    """TIDL quantizes with power-of-2 scales (TDA4VM: scale type 1 in edgeai-benchmark's preset)."""
    quantize_bias: bool = False
    """The fix pipeline writes Conv/Gemm bias as int32 + DequantizeLinear (TI's optimizer rule ``add_bias_qdq``). Off
    on every device, as in TI's optimizer: TIDL quantizes a float bias itself, and rounding it here would move the ONNX
    model away from the PyTorch fake-quant model (which keeps float bias); ``tiexport fix --quantize-bias`` turns it
    on."""
    bias_bits: int = 32
    """Bias width TIDL keeps (16 on TDA4VM: edgeai-benchmark's runtime options, "the bias is clipped to 16bits
    (default in TDA4VM)"; TIDL adjusts the weight scale to avoid clipping unless ``bias_clipping`` is 1)."""
    align_add_scales: bool = False
    """``fix --align-scales`` aligns Add inputs too, not only Concat inputs (tiexport advice, TIDL032)."""
    quantization_scale_type: int = 4
    """``advanced_options:quantization_scale_type`` edgeai-benchmark's preset gives this device (1 on TDA4VM: power of
    2; 4 on MMAv2: non-power-of-2 per-channel; edgeai-tidl-tools ``examples/osrt_python/README.md`` lists them)."""
    max_num_subgraphs: int | None = None
    """Compile option ``max_num_subgraphs`` the user sets (None: the SDK's default, ``spec.max_num_subgraphs``)."""
    max_num_subgraph_nodes: int | None = None
    """``advanced_options:max_num_subgraph_nodes`` the user sets (None: the SDK's default, when it documents one)."""
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
            **_MMAV2,  # type: ignore[arg-type]
        ),
        DeviceProfile(
            name="AM67A",
            soc="am67a",
            aliases=("J722S", "TDA4AEN", "AM67"),
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


def get_device(name: str | DeviceProfile, sdk: str | None = None) -> DeviceProfile:
    """Look a device up by its name, tidl-tools SOC name or an alias (case-insensitive). ``sdk``: the TIDL SDK
    release whose facts apply (``"10.1"``...; None: the profile's own, by default the latest known)."""
    if isinstance(name, DeviceProfile):
        profile = name
    elif not isinstance(name, str):
        raise UsageError(f"a device is a name such as 'AM68A' (or a DeviceProfile), not {type(name).__name__} "
                         f"{name!r:.40}")
    else:
        key = _LOOKUP.get(str(name).strip().upper())
        if key is None:
            raise UsageError(f"unknown device {name!r}; known: {', '.join(DEVICES)} (or 'all')")
        profile = DEVICES[key]
    if sdk is not None:
        spec = get_spec(sdk)  # UsageError for an unknown release
        if spec.sdk != profile.sdk:
            profile = replace(profile, sdk=spec.sdk)
    return profile


def resolve_devices(names: str | DeviceProfile | list[str | DeviceProfile] | tuple[str | DeviceProfile, ...] | None,
                    sdk: str | None = None) -> list[DeviceProfile]:
    """Turn a device argument (one name, a list, ``'all'`` or None = all) into profiles, without duplicates, for
    TIDL SDK ``sdk`` (None: each profile's own)."""
    if names is None:
        names = ["all"]
    if isinstance(names, (str, DeviceProfile)):
        names = [names]
    elif not isinstance(names, (list, tuple)):
        raise UsageError(f"device must be a name such as 'AM68A', 'all', or a list of names, not "
                         f"{type(names).__name__} {names!r:.40}")
    out: list[DeviceProfile] = []
    for n in names:
        profiles = list(DEVICES.values()) if isinstance(n, str) and n.strip().lower() == "all" else [get_device(n)]
        for p in profiles:
            p = get_device(p, sdk)
            if p not in out:
                out.append(p)
    if not out:
        raise UsageError("no device given")
    return out
