# A GPU worker for segflow's scheduled retraining (the `retrain` deployment on a `process` work pool).
#
# The image holds the environment; the project is a git clone mounted at /project (the worker runs the
# flow from the project's own flows/pipeline.py, and DVC and GTO work in its repository):
#
#   docker build -t segflow-worker .
#   docker run --gpus all --restart unless-stopped \
#     -e PREFECT_API_URL=http://prefect.internal:4200/api \
#     -e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY \
#     -v /srv/segflow:/project segflow-worker
#
# torch's Linux wheels from PyPI carry their CUDA libraries, so a slim Python base is enough; the host
# needs the NVIDIA driver and the NVIDIA container toolkit (`--gpus all`). Not built on the machine this
# was written on (it has no Docker engine): see README, Team.
FROM python:3.11-slim-bookworm

RUN apt-get update \
    && apt-get install -y --no-install-recommends git tini \
    && rm -rf /var/lib/apt/lists/* \
    # The mounted clone belongs to the host's user, not root: let git (and DVC, GTO) work in it.
    && git config --system --add safe.directory '*'

WORKDIR /opt/segflow
# Dependencies first (a code change does not reinstall torch), then the package itself.
COPY pyproject.toml README.md ./
RUN mkdir segflow && touch segflow/__init__.py \
    && pip install --no-cache-dir '.[s3]' \
    && pip uninstall -y segflow
COPY segflow ./segflow
RUN pip install --no-cache-dir --no-deps '.[s3]'

ENV HF_HUB_OFFLINE=1 \
    DVC_NO_ANALYTICS=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    PYTHONUNBUFFERED=1
WORKDIR /project
# tini as PID 1: signals reach segflow worker (a `docker stop` ends its runs cleanly) and zombies are reaped.
ENTRYPOINT ["tini", "--", "segflow", "worker"]
