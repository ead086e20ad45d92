# syntax=docker/dockerfile:1
#
# The consumer image: the `consumer` command in a virtual environment on a
# slim Python base, run as an unprivileged user.
#
#   docker build -t consumer:local .
#   docker run --rm consumer:local --help
#
# Bring your own handler by building FROM this image and installing your
# package into /opt/consumer (docs/deploy.md shows both ways).

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# ---------------------------------------------------------------------------
# builder: build the wheel and install it with its dependencies into a venv.
# Only this stage downloads packages; the runtime stage copies the venv.
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/consumer
ENV PATH=/opt/consumer/bin:$PATH

WORKDIR /src
# .dockerignore keeps tests, caches and the git history out of the context.
COPY . .
RUN pip wheel --no-deps --wheel-dir /wheels . \
    && pip install /wheels/*.whl

# ---------------------------------------------------------------------------
# runtime: the venv and the examples, nothing that compiles or downloads.
FROM ${PYTHON_IMAGE} AS runtime

ARG UID=10001
ARG GID=10001
RUN groupadd --system --gid "${GID}" consumer \
    && useradd --system --uid "${UID}" --gid consumer --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin consumer

# Same path as in the builder, because a venv's scripts hard-code it.
COPY --from=builder /opt/consumer /opt/consumer
# The example handlers, so `docker compose up` runs without a second image.
COPY examples /app/examples
RUN python -m compileall -q /app/examples

# PYTHONPATH=/app makes `examples.quakes.handler:QuakeHandler` importable by
# the `consumer` script, whose own folder (not the working directory) starts
# sys.path. Bytecode is compiled at build time because the Helm chart mounts
# the root filesystem read-only.
ENV PATH=/opt/consumer/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CONSUMER_WORKER__HEALTH_PORT=8080

WORKDIR /app
USER 10001:10001
EXPOSE 8080

# Passes when the worker's /readyz answers; needs CONSUMER_WORKER__HEALTH_PORT.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["consumer", "healthcheck"]

ENTRYPOINT ["consumer"]
CMD ["--help"]
