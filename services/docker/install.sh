#!/bin/sh
# Shared by every service image, run once on the build context copied to /tmp/src: the project into /app, one
# virtual environment with torch and the project (with the extras named in $1), a non-root user, and nothing left
# behind. One RUN, one layer: the vfs storage driver copies every layer whole.
set -eu
extras="${1:-}"
src=/tmp/src
mkdir -p /app
cp -r "$src/pyproject.toml" "$src/README.md" "$src/shared" "$src/services" "$src/configs" /app/
rm -rf /app/services/docker
python3 -m venv /opt/venv
/opt/venv/bin/pip install --no-cache-dir --upgrade pip
# torch pinned and first: an open range pulls a multi-GB CUDA build. A wheel in services/docker/wheels wins.
/opt/venv/bin/pip install --no-cache-dir --find-links "$src/services/docker/wheels" "torch==2.13.0"
/opt/venv/bin/pip install --no-cache-dir "/app${extras:+[$extras]}"
useradd --create-home --uid 10001 app
mkdir -p /models /checkpoints
chown app /models /checkpoints
rm -rf "$src" /root/.cache
