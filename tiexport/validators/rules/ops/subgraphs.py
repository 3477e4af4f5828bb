"""TIDL041: the TIDL partition against the compile limits (tidl.md §3 "Other compile limits").

``max_num_subgraphs`` <= 16 is an error (TIDL does not compile the model); a subgraph over
``max_num_subgraph_nodes`` is a warning.
"""

from __future__ import annotations

from collections.abc import Iterator

from tiexport.context import ModelContext
from tiexport.devices import DeviceProfile
from tiexport.validators.report import Finding
from tiexport.validators.rules.base import Rule
from tiexport.validators.rules.ops.support import partition

__all__ = ["SubgraphLimitRule"]


class SubgraphLimitRule(Rule):
    """TIDL041: the nodes left to Arm split the model into more TIDL subgraphs than TIDL compiles, or one subgraph
    is larger than TIDL's node limit.

    What: the TIDL partition (:func:`partition`: connected components of offloaded nodes) has more than
    ``device.max_num_subgraphs`` (16) components -> error; a component with more than
    ``device.max_num_subgraph_nodes`` (2048 for QDQ models) nodes -> warning.
    Why: compile limits ``max_num_subgraphs`` <= 16 and ``advanced_options:max_num_subgraph_nodes`` default 2048
    for QDQ models (tidl.md §3 "Other compile limits"; edgeai-benchmark sets 2000, tidl.md §5).
    Fix: make the Arm nodes (TIDL040/TIDL05x-07x findings) TIDL-supported so subgraphs merge; raise
    ``advanced_options:max_num_subgraph_nodes`` for a large subgraph.
    """

    id = "TIDL041"
    title = "too many TIDL subgraphs, or a subgraph over the node limit"
    category = "subgraph_limit"
    needs_qdq = False

    def check(self, ctx: ModelContext, device: DeviceProfile) -> Iterator[Finding]:
        part = partition(ctx, device)
        n = len(part.subgraphs)
        if n > device.max_num_subgraphs:
            yield self.finding(
                ctx, None,
                f"{len(part.arm)} node(s) left to Arm split the model into {n} TIDL subgraphs; TIDL compiles at most "
                f"{device.max_num_subgraphs} (max_num_subgraphs)",
                "make the Arm nodes TIDL-supported (see the TIDL040 and op_constraint findings) so subgraphs merge",
            )
        for sub in part.subgraphs:
            if len(sub) > device.max_num_subgraph_nodes:
                yield self.finding(
                    ctx, sub[0],
                    f"the TIDL subgraph starting here has {len(sub)} nodes, more than "
                    f"max_num_subgraph_nodes = {device.max_num_subgraph_nodes}",
                    f"set advanced_options:max_num_subgraph_nodes to at least {len(sub)} in the runtime options",
                    severity="warning",
                )
