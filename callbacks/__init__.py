"""Alignment-tax controls as Lightning callbacks; each works with every lit-align module."""

from callbacks.elastic_reset import ElasticReset
from callbacks.online_merging import OnlineMerging
from callbacks.reference_soup import ReferenceSoup
from callbacks.reference_sync import ReferenceSync
from callbacks.weight_interpolation import WeightInterpolation

__all__ = ["ElasticReset", "OnlineMerging", "ReferenceSoup", "ReferenceSync", "WeightInterpolation"]
