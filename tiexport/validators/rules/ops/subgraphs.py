"""TIDL041: the TIDL partition against the compile limits of edgeai-tidl-tools ``examples/osrt_python/README.md``.

More subgraphs than ``max_num_subgraphs`` (at most 16, default 16) is a warning: TIDL offloads that many and
delegates the rest to Arm. A subgraph over ``advanced_options:max_num_subgraph_nodes`` (default 864, documented from
11.0) is info: TIDL divides it evenly.
"""

from __future__ import annotations

from collections.abc import Iterator

from tiexport.context import ModelContext
from tiexport.devices import DeviceProfile
from tiexport.tidl_spec.sources import OSRT_MAX_SUBGRAPH_NODES, OSRT_MAX_SUBGRAPHS
from tiexport.validators.report import Finding
from tiexport.validators.rules.base import Rule
from tiexport.validators.rules.ops.support import Partition, partition

__all__ = ["SubgraphLimitRule"]


class SubgraphLimitRule(Rule):
    """TIDL041: the nodes left to Arm split the model into more TIDL subgraphs than TIDL compiles, or one subgraph
    is larger than TIDL's node limit.

    What: the TIDL partition (:func:`partition`: connected components of offloaded nodes) has more than
    ``max_num_subgraphs`` (16) components -> warning: "maximum number of subgraphs to be offloaded to TIDL for
    acceleration, rest to be delegated to ARM"; a component with more than ``advanced_options:max_num_subgraph_nodes``
    nodes (default 864 in the 11.0 option table; earlier releases document none) -> info: "If it exceeds this
    number, it will try to evenly divide the network".
    Fix: make the Arm nodes (TIDL040/TIDL05x-07x findings) TIDL-supported so subgraphs merge; raise
    ``advanced_options:max_num_subgraph_nodes`` for a large subgraph (edgeai-benchmark sets 2000).
    """

    id = "TIDL041"
    title = "more TIDL subgraphs than are offloaded, or a subgraph over the node limit"
    category = "subgraph_limit"
    severity = "warning"
    needs_qdq = False
    sources = (OSRT_MAX_SUBGRAPHS, OSRT_MAX_SUBGRAPH_NODES)

    def check(self, ctx: ModelContext, device: DeviceProfile) -> Iterator[Finding]:
        part = partition(ctx, device)
        n = len(part.subgraphs)
        limit = device.max_num_subgraphs or device.spec.max_num_subgraphs
        if n > limit:
            yield self.finding(
                ctx, None,
                f"{_causes(ctx, part)}: these {len(part.arm)} node(s) left to Arm split the model into {n} TIDL "
                f"subgraphs; TIDL offloads "
                f"{limit} (max_num_subgraphs) and delegates the rest to Arm",
                "make the Arm nodes TIDL-supported (see the TIDL040 and op_constraint findings) so subgraphs merge",
            )
        node_limit = device.max_num_subgraph_nodes or device.spec.max_num_subgraph_nodes
        for sub in part.subgraphs:
            if node_limit is not None and len(sub) > node_limit:
                yield self.finding(
                    ctx, sub[0],
                    f"the TIDL subgraph starting here has {len(sub)} nodes, more than "
                    f"max_num_subgraph_nodes = {node_limit}: TIDL divides it evenly",
                    f"set advanced_options:max_num_subgraph_nodes to at least {len(sub)} to keep it whole",
                    severity="info", source=OSRT_MAX_SUBGRAPH_NODES,
                )


def _causes(ctx: ModelContext, part: Partition, k: int = 3) -> str:
    """The Arm nodes by cause: ``44 BatchNormalization (TIDL063: training_mode 1 ...), 8 Slice (...)``, the most
    frequent op types with the first reason found for each, so the finding leads with what to change rather than
    only its consequence."""
    by_op: dict[str, list[str]] = {}
    for node in part.arm:
        by_op.setdefault(node.op_type, []).append(ctx.node_name(node))
    parts = []
    for op, names in sorted(by_op.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:k]:
        reason = next((r for name in names for r in part.reasons.get(name, [])), "")
        reason = reason.split(";")[0]
        parts.append(f"{len(names)} {op}" + (f" ({reason})" if reason else ""))
    more = len(by_op) - len(parts)
    tail = f", {more} other op type(s)" if more > 0 else ""
    return f"{', '.join(parts)}{tail}"
