"""One layout's plan: the memory of each pp rank and the step time, on a cluster."""

from __future__ import annotations

from dataclasses import dataclass

from titan.config import ClusterConfig, PretrainConfig
from titan.planner.facts import model_facts
from titan.planner.layout import PlannedLayout, plan_layout
from titan.planner.memory import RankMemory, predict_memory
from titan.planner.timing import StepTime, predict_time


@dataclass(frozen=True)
class Plan:
    layout: PlannedLayout
    cluster: ClusterConfig
    memory: tuple[RankMemory, ...]  # per pp rank
    time: StepTime

    @property
    def peak_gb(self) -> float:
        """The largest rank's peak."""
        return max(r.peak for r in self.memory) / 1e9

    @property
    def budget_gb(self) -> float:
        return self.cluster.device_memory_gb * self.cluster.usable_memory_fraction

    @property
    def fits(self) -> bool:
        return self.peak_gb <= self.budget_gb


def world_size(cluster: ClusterConfig) -> int:
    return cluster.nodes * cluster.devices_per_node


def make_plan(cfg: PretrainConfig, cluster: ClusterConfig, ranks: int | None = None) -> Plan:
    """The plan of `cfg`'s layout on `ranks` ranks (default: every device of the cluster); raises the
    recipe's `ConfigError` / `LayoutError` for an impossible layout."""
    facts = model_facts(cfg.model)
    layout = plan_layout(cfg, ranks or world_size(cluster), cluster.device, facts.plan)
    return Plan(layout, cluster, tuple(predict_memory(facts, layout, cluster)), predict_time(facts, layout, cluster))
