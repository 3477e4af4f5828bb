"""The device-generic path (what CUDA runs) exercised on CPU with the CPU fast paths switched off: it computes what
the fast paths compute, bit for bit, and reads nothing back to the host in a training step (every such read is a
host sync on CUDA)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from tests.quantization._models import TinyCNN, batches, seeded  # noqa: E402
from tiexport.quantization import kernels  # noqa: E402
from tiexport.wrappers import QATFxModule  # noqa: E402


@contextlib.contextmanager
def _no_host_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a tensor value was read on the host")

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
            m.setattr(torch.Tensor, name, refuse)
        yield


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = model(x)
    nn.functional.cross_entropy(out, y).backward()
    return out


@pytest.mark.parametrize("qconfig_type", ["WC8_AT8", "WT8SYMP2_AT8SYMP2", "WC8SYMP2_AT8SYMP2", "MSA_WC8P2_AT8P2"])
def test_generic_path_equals_the_cpu_fast_paths_and_reads_nothing_back(
    qconfig_type: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = batches((16, 1, 8, 8), 3, seed=7)
    labels = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(7))
    fast = QATFxModule(seeded(TinyCNN(channels=8, classes=10)), total_epochs=4, qconfig_type=qconfig_type,
                       example_inputs=data[0])
    generic = copy.deepcopy(fast)
    for w in (fast, generic):
        w.train()  # first epoch: batch norm and observers updating
    outs = [_step(fast, x, labels) for x in data]
    monkeypatch.setattr(kernels, "CPU_FAST_PATHS", False)
    generic_outs = [_step(generic, data[0], labels)]  # the first call reads the fake-quant flags once
    with _no_host_reads(monkeypatch):
        generic_outs += [_step(generic, x, labels) for x in data[1:]]
    for a, b in zip(outs, generic_outs, strict=True):
        assert torch.equal(a, b)
    grads = dict(generic.named_parameters())
    for name, p in fast.named_parameters():
        assert torch.equal(p.grad, grads[name].grad), name
    buffers = dict(generic.named_buffers())
    for name, b in fast.named_buffers():
        assert torch.equal(b, buffers[name]), name


def test_generic_path_ptc_calibration_and_evaluation_read_nothing_back(monkeypatch: pytest.MonkeyPatch) -> None:
    from tiexport.wrappers import PTCFxModule

    data = batches((16, 1, 8, 8), 3, seed=8)
    fast = PTCFxModule(seeded(TinyCNN(channels=8, classes=10)), qconfig_type="WT8SYMP2_AT8SYMP2",
                       example_inputs=data[0], bias_calibration_factor=0.01)
    generic = copy.deepcopy(fast)
    fast.train()
    generic.train()
    with torch.no_grad():
        outs = [fast(x) for x in data]
        monkeypatch.setattr(kernels, "CPU_FAST_PATHS", False)
        generic_outs = [generic(data[0])]  # flags read once
        with _no_host_reads(monkeypatch):
            generic_outs += [generic(x) for x in data[1:]]
    for a, b in zip(outs, generic_outs, strict=True):
        assert torch.equal(a, b)
    for (name, b), (_, c) in zip(fast.named_buffers(), generic.named_buffers(), strict=True):
        assert torch.equal(b, c), name
    fast.eval()
    generic.eval()
    with torch.no_grad():
        monkeypatch.setattr(kernels, "CPU_FAST_PATHS", True)
        expected = fast(data[0])
        monkeypatch.setattr(kernels, "CPU_FAST_PATHS", False)
        generic(data[0])  # flags changed by eval(): read once
        with _no_host_reads(monkeypatch):
            assert torch.equal(generic(data[0]), expected)


def _host_reads(run: object) -> list[str]:
    """Ops that read a tensor value back to the host (``aten::_local_scalar_dense``) while ``run()`` runs, each as
    the chain of ops above it. CPU kernels that read their scalar parameters on the host, where the CUDA kernel
    reads them on the device, are left out: torch's per-tensor fake-quant with tensor qparams."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()  # type: ignore[operator]
    reads = []
    for event in prof.profiler.function_events:
        if event.name != "aten::_local_scalar_dense":
            continue
        chain, parent = [], event.cpu_parent
        while parent is not None:
            chain.append(parent.name)
            parent = parent.cpu_parent
        if "aten::_fake_quantize_per_tensor_affine_cachemask_tensor_qparams" in chain:
            continue
        reads.append(" < ".join(chain[:4]))
    return reads


@pytest.mark.parametrize("freeze", [False, True])
def test_generic_path_training_step_has_no_host_reads_in_torch_kernels(
    freeze: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # torch's per-channel fake-quant reads min and max of the zero points on the host (a range check): two CUDA
    # syncs per weight per step, which the weight path avoids; with observers frozen too
    data = batches((16, 1, 8, 8), 3, seed=9)
    labels = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(9))
    monkeypatch.setattr(kernels, "CPU_FAST_PATHS", False)
    w = QATFxModule(seeded(TinyCNN(channels=8, classes=10)), total_epochs=4, qconfig_type="WC8SYMP2_AT8SYMP2",
                    example_inputs=data[0])
    w.train()
    _step(w, data[0], labels)  # observe once, read the flags once
    if freeze:
        w.freeze(freeze_bn=True, freeze_observers=True)
        _step(w, data[1], labels)
    assert _host_reads(lambda: _step(w, data[2], labels)) == []


@pytest.mark.parametrize("qconfig_type", ["WC8_AT8", "WT8SYMP2_AT8SYMP2"])
def test_generic_path_ptc_step_has_no_host_reads_in_torch_kernels(
    qconfig_type: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tiexport.wrappers import PTCFxModule

    data = batches((16, 1, 8, 8), 2, seed=10)
    monkeypatch.setattr(kernels, "CPU_FAST_PATHS", False)
    w = PTCFxModule(seeded(TinyCNN(channels=8, classes=10)), qconfig_type=qconfig_type, example_inputs=data[0],
                    bias_calibration_factor=0.01)
    w.train()
    with torch.no_grad():
        w(data[0])
        assert _host_reads(lambda: w(data[1])) == []
