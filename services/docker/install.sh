#!/bin/sh
# Shared by every service image; runs in the builder stage on the build context copied to /tmp/src. It fills /out,
# which the final stage copies to / in one step (under the vfs storage driver every step copies the whole image);
# nothing else is taken from the builder:
#   /opt/venv  one virtual environment with torch and the project (with the extras named in $1)
#   /app       pyproject, README, the packages and configs/ (the working directory: configs are read from there)
#   the non-root user `app` (passwd, group, home) and the mount points it owns (/models, /checkpoints, /cache)
# The final stage starts from the same BASE_IMAGE, so the passwd and group copied from here are the base's plus `app`.
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
rm -rf /app/build /app/*.egg-info  # what building the wheel left in the source tree
# The one-shot `setup` service of docker-compose.yml (tiny kit, hub pre-download) runs this.
install -m 0755 "$src/services/docker/setup.sh" /opt/venv/bin/rlhf-setup
useradd --create-home --uid 10001 app
mkdir -p /out/opt /out/etc /out/home /out/models /out/checkpoints /out/cache
# Renames, not copies: the venv's scripts name /opt/venv, where the final stage puts it back.
mv /opt/venv /out/opt/venv
mv /app /out/app
cp -p /etc/passwd /etc/group /out/etc/
cp -a /home/app /out/home/
# Named volumes start as a copy of these mount points, so they are the app user's to write.
chown app:app /out/models /out/checkpoints /out/cache
