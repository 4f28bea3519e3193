"""The engine every rank runs (core.py: the lockstep step; scheduler.py:
rank 0's batching; exchange.py: the per-step collective; homes.py: data-
parallel attention), the rank program (rank.py) and rank 0's end of the
channel to the front (link.py)."""
