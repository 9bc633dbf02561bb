"""Pure tensor operations (matching, merging, pruning) that know nothing of transformers."""

from .matching import Matching, bipartite_soft_matching
from .merging import initial_positions, merge_source, merge_weighted, unmerge

__all__ = ["Matching", "bipartite_soft_matching", "initial_positions", "merge_source", "merge_weighted", "unmerge"]
