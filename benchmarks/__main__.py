import sys

from benchmarks import cluster, http, join022, p2p

# `python -m benchmarks [http] [cluster] [p2p] [join022]`: all by default.
wanted = sys.argv[1:] or ["http", "cluster", "p2p", "join022"]
for name in wanted:
    {"http": http.main, "cluster": cluster.main, "p2p": p2p.main, "join022": join022.main}[name]()
