"""The transformers-free core: token matching, merging and pruning ops, the two token reducers, r schedules,
reduction plans and the MACs formula. Needs torch only; nothing here knows a model class."""
