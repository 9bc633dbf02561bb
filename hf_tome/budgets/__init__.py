"""Searched prune + merge budgets: the candidate space, staged random search, DiffRate and ``hf-tome search``,
which writes a budget table into a model's ``ToMeConfig`` (picked at inference by ``hf_tome.apply``)."""
