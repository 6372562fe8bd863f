"""A stand-in for the pynvml module that answers from a recording (`nvml.record`'s output).

It is how recorded machines (topology/fixtures/*.json) become `HostTopology`s on a machine
without those GPUs, and how the tests drive the NVML probe: `nvml.record(ReplayNvml(rec))` calls
the same functions with the same arguments as on real hardware, and must reproduce `rec`
exactly. Like NVML it refuses every query before nvmlInit and after nvmlShutdown, so a probe
that forgets either fails here too. A function recorded as {"error": "NotInPynvml"} is absent
from the stand-in, as from an older nvidia-ml-py (`missing`); MIG instances answer through MIG
handles (`nvmlDeviceGetMigDeviceHandleByIndex`) from their parent's "migs" entries.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from dsl.topology.nvml import NOT_IN_PYNVML

# nvml.h return codes of the errors a recording may hold.
ERROR_CODES = {
    "Uninitialized": 1, "InvalidArgument": 2, "NotSupported": 3, "NoPermission": 4,
    "AlreadyInitialized": 5, "NotFound": 6, "InsufficientSize": 7, "DriverNotLoaded": 9,
    "Timeout": 10, "GpuIsLost": 15, "LibraryNotFound": 12, "FunctionNotFound": 13,
    "NotRecorded": 998, "Unknown": 999,
}
_NAMES = {code: name for name, code in ERROR_CODES.items()}


class NVMLError(Exception):
    """Mirrors pynvml.NVMLError: NVMLError(code) is an instance of NVMLError_<Name>."""

    _subclasses: dict[int, type] = {}

    def __new__(cls, value: int = 999, message: str | None = None):  # noqa: D102
        if cls is NVMLError:
            cls = NVMLError._subclasses.get(value, NVMLError._subclasses[999])
        return Exception.__new__(cls)

    def __init__(self, value: int = 999, message: str | None = None) -> None:
        super().__init__(message or _NAMES.get(value, "Unknown"))
        self.value = value


for _name, _code in ERROR_CODES.items():
    NVMLError._subclasses[_code] = type(f"NVMLError_{_name}", (NVMLError,), {})


class _Handle:
    def __init__(self, index: int, mig: int | None = None) -> None:
        self.index = index
        self.mig = mig
        """The MIG device index on GPU `index`, for a MIG handle."""

    def __repr__(self) -> str:
        return f"<replayed GPU {self.index}{'' if self.mig is None else f' MIG {self.mig}'}>"


def _absent(recording: Any) -> set[str]:
    """Names of the functions a recording says the recording machine's nvidia-ml-py lacked."""
    found: set[str] = set()
    if isinstance(recording, dict):
        for key, value in recording.items():
            if value == {"error": NOT_IN_PYNVML}:
                found.add(key)
            found |= _absent(value)
    elif isinstance(recording, list):
        for value in recording:
            found |= _absent(value)
    return found


class ReplayNvml:
    """The functions of pynvml that `nvml.record` calls, answered from `recording`."""

    NVMLError = NVMLError

    def __init__(self, recording: dict[str, Any]) -> None:
        self.recording = recording
        self.initialized = False
        self.init_calls = 0
        self.shutdown_calls = 0
        self.fail: dict[str, str] = {}
        """Function name -> error name to raise instead of the recorded answer (fault injection)."""
        self.missing: set[str] = _absent(recording)
        """Functions this stand-in lacks, as an older nvidia-ml-py does (AttributeError)."""

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("nvml") and name in object.__getattribute__(self, "missing"):
            raise AttributeError(f"module 'pynvml' has no attribute {name!r}")
        return object.__getattribute__(self, name)

    # Lifecycle

    def nvmlInit(self) -> None:
        self.init_calls += 1
        init = self.recording.get("nvmlInit")
        if isinstance(init, dict) and "error" in init:
            raise NVMLError(ERROR_CODES.get(init["error"], 999), init.get("message"))
        self.initialized = True

    def nvmlShutdown(self) -> None:
        self._check("nvmlShutdown")
        self.shutdown_calls += 1
        self.initialized = False

    # Helpers

    def _check(self, name: str) -> None:
        if not self.initialized:
            raise NVMLError(ERROR_CODES["Uninitialized"])
        if name in self.fail:
            raise NVMLError(ERROR_CODES[self.fail[name]])

    @staticmethod
    def _answer(value: Any) -> Any:
        if isinstance(value, dict) and set(value) <= {"error", "message"} and "error" in value:
            raise NVMLError(ERROR_CODES.get(value["error"], 999), value.get("message"))
        return value

    def _device(self, handle: _Handle, name: str) -> Any:
        self._check(name)
        answers = self.recording["devices"][handle.index]
        if handle.mig is not None:
            answers = answers["migs"][handle.mig]
        return self._answer(answers.get(name, {"error": "NotRecorded"}))

    def _link(self, handle: _Handle, link: int, name: str) -> Any:
        self._check(name)
        links = self.recording["devices"][handle.index].get("nvlinks", [])
        if link >= len(links):
            raise NVMLError(ERROR_CODES["InvalidArgument"])
        return self._answer(links[link].get(name, {"error": "NotRecorded"}))

    def _pair(self, a: _Handle, b: _Handle, name: str) -> Any:
        self._check(name)
        lo, hi = sorted((a.index, b.index))
        return self._answer(self.recording["pairs"][f"{lo},{hi}"][name])

    # System

    def nvmlSystemGetDriverVersion(self) -> str:
        self._check("nvmlSystemGetDriverVersion")
        return self._answer(self.recording["nvmlSystemGetDriverVersion"])

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        self._check("nvmlSystemGetCudaDriverVersion")
        return self._answer(self.recording["nvmlSystemGetCudaDriverVersion"])

    def nvmlDeviceGetCount(self) -> int:
        self._check("nvmlDeviceGetCount")
        return self.recording["nvmlDeviceGetCount"]

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:
        self._check("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < self.recording["nvmlDeviceGetCount"]:
            raise NVMLError(ERROR_CODES["InvalidArgument"])
        return _Handle(index)

    # Device

    def nvmlDeviceGetName(self, h: _Handle) -> str:
        return self._device(h, "nvmlDeviceGetName")

    def nvmlDeviceGetUUID(self, h: _Handle) -> str:
        return self._device(h, "nvmlDeviceGetUUID")

    def nvmlDeviceGetPciInfo(self, h: _Handle) -> Any:
        return SimpleNamespace(**self._device(h, "nvmlDeviceGetPciInfo"))

    def nvmlDeviceGetMemoryInfo(self, h: _Handle) -> Any:
        return SimpleNamespace(**self._device(h, "nvmlDeviceGetMemoryInfo"))

    def nvmlDeviceGetCudaComputeCapability(self, h: _Handle) -> tuple[int, int]:
        return tuple(self._device(h, "nvmlDeviceGetCudaComputeCapability"))  # type: ignore[return-value]

    def nvmlDeviceGetMaxPcieLinkGeneration(self, h: _Handle) -> int:
        return self._device(h, "nvmlDeviceGetMaxPcieLinkGeneration")

    def nvmlDeviceGetMaxPcieLinkWidth(self, h: _Handle) -> int:
        return self._device(h, "nvmlDeviceGetMaxPcieLinkWidth")

    def nvmlDeviceGetCurrPcieLinkGeneration(self, h: _Handle) -> int:
        return self._device(h, "nvmlDeviceGetCurrPcieLinkGeneration")

    def nvmlDeviceGetCurrPcieLinkWidth(self, h: _Handle) -> int:
        return self._device(h, "nvmlDeviceGetCurrPcieLinkWidth")

    def nvmlDeviceGetNumaNodeId(self, h: _Handle) -> int:
        return self._device(h, "nvmlDeviceGetNumaNodeId")

    def nvmlDeviceGetCpuAffinity(self, h: _Handle, cpu_set_size: int) -> list[int]:
        words = self._device(h, "nvmlDeviceGetCpuAffinity")
        return (list(words) + [0] * cpu_set_size)[:cpu_set_size]

    def nvmlDeviceGetC2cModeInfoV(self, h: _Handle) -> Any:
        return SimpleNamespace(**self._device(h, "nvmlDeviceGetC2cModeInfoV"))

    def nvmlDeviceGetFieldValues(self, h: _Handle, field_ids: list[Any]) -> list[Any]:
        recorded = self._device(h, "nvmlDeviceGetFieldValues")
        out = []
        for spec in field_ids:
            fid, scope = spec if isinstance(spec, tuple) else (spec, 0)
            key = f"{fid}@{scope}" if isinstance(spec, tuple) else str(fid)
            value = recorded.get(key, {"error": "NotSupported"})
            if isinstance(value, dict):
                out.append(SimpleNamespace(fieldId=fid, scopeId=scope, valueType=3,
                                           nvmlReturn=ERROR_CODES.get(value["error"], 999), value=None))
            else:
                union = SimpleNamespace(dVal=float(value), uiVal=value, ulVal=value, ullVal=value,
                                        sllVal=value, siVal=value, usVal=value)
                out.append(SimpleNamespace(fieldId=fid, scopeId=scope, valueType=3, nvmlReturn=0, value=union))
        return out

    def nvmlDeviceGetMigMode(self, h: _Handle) -> list[int]:
        return list(self._device(h, "nvmlDeviceGetMigMode"))

    def nvmlDeviceGetMaxMigDeviceCount(self, h: _Handle) -> int:
        return self._device(h, "nvmlDeviceGetMaxMigDeviceCount")

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h: _Handle, index: int) -> _Handle:
        self._check("nvmlDeviceGetMigDeviceHandleByIndex")
        migs = self.recording["devices"][h.index].get("migs", [])
        if h.mig is not None or not 0 <= index < len(migs):
            raise NVMLError(ERROR_CODES["InvalidArgument"])
        self._answer(migs[index]["nvmlDeviceGetMigDeviceHandleByIndex"])
        return _Handle(h.index, index)

    def nvmlDeviceGetGpuInstanceId(self, h: _Handle) -> int:
        return self._device(h, "nvmlDeviceGetGpuInstanceId")

    def nvmlDeviceGetComputeInstanceId(self, h: _Handle) -> int:
        return self._device(h, "nvmlDeviceGetComputeInstanceId")

    def nvmlDeviceGetNvLinkState(self, h: _Handle, link: int) -> int:
        return self._link(h, link, "nvmlDeviceGetNvLinkState")

    def nvmlDeviceGetNvLinkVersion(self, h: _Handle, link: int) -> int:
        return self._link(h, link, "nvmlDeviceGetNvLinkVersion")

    def nvmlDeviceGetNvLinkRemoteDeviceType(self, h: _Handle, link: int) -> int:
        return self._link(h, link, "nvmlDeviceGetNvLinkRemoteDeviceType")

    def nvmlDeviceGetNvLinkRemotePciInfo(self, h: _Handle, link: int) -> Any:
        return SimpleNamespace(**self._link(h, link, "nvmlDeviceGetNvLinkRemotePciInfo"))

    # Pairs

    def nvmlDeviceGetTopologyCommonAncestor(self, a: _Handle, b: _Handle) -> int:
        return self._pair(a, b, "nvmlDeviceGetTopologyCommonAncestor")

    def nvmlDeviceGetP2PStatus(self, a: _Handle, b: _Handle, index: int) -> int:
        if index != 0:
            raise NVMLError(ERROR_CODES["NotRecorded"])
        return self._pair(a, b, "nvmlDeviceGetP2PStatus")
