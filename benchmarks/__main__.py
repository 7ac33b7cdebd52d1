import sys

from benchmarks import http, p2p

# `python -m benchmarks [http] [p2p]`: both by default.
wanted = sys.argv[1:] or ["http", "p2p"]
for name in wanted:
    {"http": http.main, "p2p": p2p.main}[name]()
