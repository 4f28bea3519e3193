"""Serving: the front process (front/: HTTP and everything about text), the
engine every rank runs (engine/), and the channel between them (channel.py:
every message that crosses the process boundary). structured.py (grammars)
serves both: the front checks a request's grammar, rank 0 applies it."""
