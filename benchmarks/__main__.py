import sys

from benchmarks import cluster, http, join022, p2p, relay

# `python -m benchmarks [http] [cluster] [p2p] [join022] [relay]`: all by default.
wanted = sys.argv[1:] or ["http", "cluster", "p2p", "join022", "relay"]
mains = {
    "http": http.main,
    "cluster": cluster.main,
    "p2p": p2p.main,
    "join022": join022.main,
    "relay": relay.main,
}
for name in wanted:
    mains[name]()
