"""Core of the attention contract: validation, the dense reference oracle, lse merging."""
