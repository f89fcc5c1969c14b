"""Alignment-tax controls and monitors as Lightning callbacks."""

from callbacks.elastic_reset import ElasticReset
from callbacks.gradient_entanglement import GradientEntanglementMonitor
from callbacks.online_merging import OnlineMerging
from callbacks.reference_soup import ReferenceSoup
from callbacks.reference_sync import ReferenceSync
from callbacks.reward_drift_plot import RewardDriftPlot
from callbacks.task_score import TaskScore
from callbacks.weight_interpolation import WeightInterpolation

__all__ = [
    "ElasticReset",
    "GradientEntanglementMonitor",
    "OnlineMerging",
    "ReferenceSoup",
    "ReferenceSync",
    "RewardDriftPlot",
    "TaskScore",
    "WeightInterpolation",
]
