"""The ranks as processes on hosts: hosts checked over ssh (hosts.py),
starting ranks (launch.py, cores.py), the memory a host has (memory.py),
loading progress (progress.py), what every rank must agree on
(consistency.py) and how a failing rank says why (failures.py)."""
