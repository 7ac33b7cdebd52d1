# p2pdiff in a container: docker build -t p2pdiff . && docker run -p 3000:3000 -v p2pdiff-data:/data p2pdiff
# Secrets come from the environment (docker run -e P2PDIFF_SERVER_ADMIN_TOKEN=... or an env file).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY p2pdiff ./p2pdiff
COPY signaling ./signaling
# Every dependency (aiortc, av, cryptography, coincurve) ships manylinux wheels: no compiler needed.
RUN pip install . && rm -rf /src

# An unprivileged user owns the data volume and nothing else.
RUN useradd --system --uid 10001 --user-group --home-dir /data --no-create-home --shell /usr/sbin/nologin p2pdiff \
    && mkdir -p /data \
    && chown p2pdiff:p2pdiff /data

ENV P2PDIFF_STORE_PATH=/data/p2pdiff.sqlite3 \
    P2PDIFF_SERVER_HOST=0.0.0.0 \
    P2PDIFF_SERVER_PORT=3000
VOLUME ["/data"]
# A config file is optional: mount one at /data/config.toml (the working directory) or set P2PDIFF_CONFIG.
WORKDIR /data
USER p2pdiff
EXPOSE 3000

HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('P2PDIFF_SERVER_PORT', '3000'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/api/health', timeout=4).status == 200 else 1)"]

# docker stop sends SIGTERM and waits 10 s: p2pdiff is done in about 3 (see README, "Shutdown").
STOPSIGNAL SIGTERM
CMD ["p2pdiff"]
