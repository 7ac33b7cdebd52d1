"""Process-level chaos: the real server under floods, stalls, signals and dying services.

Each test starts ``python -m p2pdiff`` (tests/server_process.py) with what it needs around it
(mosquitto, a nostr relay, real Trystero peers) and checks a documented promise from the outside:
the shutdown bound, bounded logs under a connection flood, no secret on any surface. They take
seconds each; the 30-minute mixed load is ``make soak`` (benchmarks/soak.py), not part of the suite.
"""
