"""Models with external data are fixed file to file (issue 18, items 12 and 14): OUT's weights go to a data file of
their own, OUT is renamed into place only once that file is complete and every check has passed on it, the data
file an earlier OUT used is removed (when tiexport made it), and nothing is appended to or written in place."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

import tiexport
import tiexport.workflows.fix as fix_module
from fixtures.malformed import save_external
from fixtures.models import tiny_conv
from tests.robustness.helpers import assert_loadable, cli, folder_digest
from tiexport.onnx_io import external_data_files, save_model


def _external_model(folder: Path, **over: object) -> Path:
    return save_external(tiny_conv(w_per_channel=True, **over), folder / "model.onnx")


def _data_names(path: Path) -> list[str]:
    return [p.name for p in external_data_files(path)]


def test_fix_writes_external_data_beside_out_and_checks_it(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    model = _external_model(src)
    before = folder_digest(src)
    out = tmp_path / "fixed.onnx"
    fixed, report = tiexport.fix(str(model), "TDA4VM", output=out, num_samples=3)
    assert folder_digest(src) == before
    assert report.numerics_changed and report.parity_passed and report.parity["samples"] == 3
    assert _data_names(out) == ["fixed.onnx.data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fixed.onnx", "fixed.onnx.data", "src"]
    assert_loadable(onnx.load(str(out)))  # onnx.load reads the data file beside OUT
    # the returned model references OUT's data file, as onnx.load(OUT, load_external_data=False) would
    assert [t.name for t in fixed.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    again = tiexport.check_parity(str(model), str(out), num_samples=2)
    assert again.passed


def test_rewriting_out_uses_a_new_data_file_and_removes_the_old(tmp_path: Path) -> None:
    model = _external_model(tmp_path)
    out = tmp_path / "fixed.onnx"
    names = []
    for _ in range(3):
        rc, _, err = cli("fix", str(model), "-d", "TDA4VM", "-o", str(out), "-n", "1")
        assert rc == 0, err
        names.append(_data_names(out))
        assert_loadable(onnx.load(str(out)))
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left
    assert names == [["fixed.onnx.data"], ["fixed.onnx.1.data"], ["fixed.onnx.data"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fixed.onnx", "fixed.onnx.data", "model.onnx",
                                                          "model.onnx.data"]


def test_a_data_file_tiexport_did_not_name_is_left_alone(tmp_path: Path) -> None:
    model = _external_model(tmp_path)
    out = tmp_path / "fixed.onnx"
    save_external(tiny_conv(), out, location="shared_weights.bin")  # OUT from elsewhere, a data file of its own
    shared = (tmp_path / "shared_weights.bin").read_bytes()
    rc, _, err = cli("fix", str(model), "-d", "TDA4VM", "-o", str(out), "-n", "1")
    assert rc == 0, err
    assert (tmp_path / "shared_weights.bin").read_bytes() == shared
    assert _data_names(out) == ["fixed.onnx.data"]


def test_a_failed_check_leaves_the_old_out_and_no_new_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _external_model(tmp_path)
    out = tmp_path / "fixed.onnx"
    assert cli("fix", str(model), "-d", "TDA4VM", "-o", str(out), "-n", "1")[0] == 0
    before = folder_digest(tmp_path)

    def fail(*args: object, **kwargs: object) -> None:
        raise tiexport.TiexportError("checks failed")

    monkeypatch.setattr(fix_module, "_prove", fail)
    rc, _, err = cli("fix", str(model), "-d", "TDA4VM", "-o", str(out), "-n", "1")
    assert rc == 2 and "checks failed" in err
    assert folder_digest(tmp_path) == before  # old OUT and its data intact, nothing new


def test_in_place_on_an_external_model(tmp_path: Path) -> None:
    model = _external_model(tmp_path)
    rc, _, err = cli("fix", str(model), "-d", "TDA4VM", "--in-place", "-n", "2")
    assert rc == 0, err
    assert _data_names(model) == ["model.onnx.1.data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.1.data"]
    assert_loadable(onnx.load(str(model)))


def test_save_model_over_the_protobuf_limit_is_staged(tmp_path: Path) -> None:
    """Models over 2 GB go to a data file of their own (threshold lowered here): never appended to."""
    out = tmp_path / "big.onnx"
    model = tiny_conv(channels=16, out_channels=64)  # a 9 KB weight: moved out (small tensors stay in the proto)
    for _ in range(2):
        save_model(model, out, external_data_threshold=16)
        assert_loadable(onnx.load(str(out)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.1.data"]
    size = (tmp_path / "big.onnx.1.data").stat().st_size
    save_model(model, out, external_data_threshold=16)
    assert (tmp_path / "big.onnx.data").stat().st_size == size  # a fresh file, same size: nothing appended
    assert model.graph.initializer[0].data_location == onnx.TensorProto.DEFAULT  # the caller's model is intact


def test_requantized_weights_are_spilled_not_held_twice(tmp_path: Path) -> None:
    """Every 1 MiB weight requantized (per-tensor, power of two on TDA4VM): the replaced weights go through a spill
    file beside OUT (removed afterwards) into OUT's data file; the result loads and keeps parity."""
    from bench.bench_fix_memory import _with_scales
    from bench.bench_robustness import build_external_model

    model, size = build_external_model(tmp_path, 1024, 2, "chain")
    requant = _with_scales(model, tmp_path / "chain_np2.onnx")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "fixed.onnx"
    _, report = tiexport.fix(str(requant), "TDA4VM", output=out, num_samples=2)
    in_memory, memory_report = tiexport.fix(str(requant), "TDA4VM", num_samples=2)  # no output: weights in memory
    assert report.numerics_changed and report.parity is not None and memory_report.parity is not None
    assert report.parity["outputs"] == memory_report.parity["outputs"]  # same rewrite, same numbers
    assert sorted(p.name for p in out_dir.iterdir()) == ["fixed.onnx", "fixed.onnx.data"]  # no spill file left
    assert (out_dir / "fixed.onnx.data").stat().st_size >= size
    m = onnx.load(str(out), load_external_data=False)
    locations = {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"fixed.onnx.data"}  # nothing points at the spill file
    written = onnx.load(str(out))
    assert_loadable(written)
    from onnx import numpy_helper

    assert {t.name: numpy_helper.to_array(t).tobytes() for t in written.graph.initializer} == \
        {t.name: numpy_helper.to_array(t).tobytes() for t in in_memory.graph.initializer}
