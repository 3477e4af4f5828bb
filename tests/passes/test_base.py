"""Pass, PassResult and PassManager: naming, fixed point, bounded iterations, failure reporting."""

from __future__ import annotations

import onnx_graphsurgeon as gs
import pytest

from fixtures.models import tiny_conv
from tiexport.errors import TiexportError, UsageError
from tiexport.passes.base import Pass, PassError, PassManager, PassResult
from tiexport.passes.dead_nodes import RemoveDeadNodesPass
from tiexport.passes.fold_weights import FoldWeightQuantizationPass


class CountdownPass(Pass):
    """Modifies the graph ``n`` times, then reports nothing to do (a pass that converges)."""

    def __init__(self, n: int) -> None:
        self.left = n
        self.calls = 0

    def run(self, graph: gs.Graph) -> PassResult:
        self.calls += 1
        if self.left:
            self.left -= 1
            return PassResult(graph, modified=True, changes=1)
        return PassResult(graph, modified=False)


class AlwaysPass(Pass):
    """A broken pass that never reaches a fixed point."""

    def run(self, graph: gs.Graph) -> PassResult:
        return PassResult(graph, modified=True, changes=1, numerics_changed=True)


class BoomPass(Pass):
    def run(self, graph: gs.Graph) -> PassResult:
        raise ValueError("tensor 'x' has no producer")


class UserErrorPass(Pass):
    def run(self, graph: gs.Graph) -> PassResult:
        raise UsageError("--input-shape: no input named 'y'")


def _graph() -> gs.Graph:
    return gs.import_onnx(tiny_conv())


def test_pass_name_defaults_to_class_name() -> None:
    assert FoldWeightQuantizationPass.name == "FoldWeightQuantizationPass"
    assert CountdownPass(0).name == "CountdownPass"


def test_a_result_with_changes_counts_as_modified() -> None:
    class Liar(Pass):
        def run(self, graph: gs.Graph) -> PassResult:
            return PassResult(graph, modified=False, changes=2)

    assert Liar().call(_graph()).modified is True


def test_manager_runs_to_a_fixed_point_and_sums_changes() -> None:
    p = CountdownPass(3)
    result = PassManager([p], max_iterations=10).run(_graph())
    assert result.converged
    assert result.iterations == 4  # three modifying iterations, then one that changes nothing
    assert p.calls == 4
    assert result.passes[0].changes == 3


def test_manager_stops_after_max_iterations_and_says_so() -> None:
    result = PassManager([AlwaysPass()], max_iterations=3).run(_graph())
    assert not result.converged
    assert result.iterations == 3
    assert result.passes[0].changes == 3
    assert result.numerics_changed


def test_manager_on_an_unmodified_graph_takes_one_iteration() -> None:
    result = PassManager([RemoveDeadNodesPass()]).run(_graph())
    assert result.converged and result.iterations == 1 and not result.modified


def test_failure_names_the_pass_and_those_before_it() -> None:
    manager = PassManager([CountdownPass(0), RemoveDeadNodesPass(), BoomPass(), CountdownPass(0)])
    with pytest.raises(PassError) as info:
        manager.run(_graph())
    err = info.value
    assert err.failed == "BoomPass"
    assert err.before == ["CountdownPass", "RemoveDeadNodesPass"]
    assert "BoomPass" in str(err) and "CountdownPass, RemoveDeadNodesPass" in str(err)
    assert "tensor 'x' has no producer" in str(err)
    assert isinstance(err.__cause__, ValueError)
    assert isinstance(err, TiexportError)  # the CLI prints it as one line


def test_failure_of_the_first_pass_says_none_ran_before() -> None:
    with pytest.raises(PassError, match="passes run before it: none"):
        PassManager([BoomPass()]).run(_graph())


def test_user_errors_from_a_pass_pass_through_unchanged() -> None:
    with pytest.raises(UsageError, match="no input named 'y'"):
        PassManager([UserErrorPass()]).run(_graph())


def test_max_iterations_must_be_positive() -> None:
    with pytest.raises(ValueError):
        PassManager([], max_iterations=0)
