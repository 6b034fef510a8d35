# syntax=docker/dockerfile:1
# The tinyseek image: the Prefect worker that runs the pipeline, and the Prefect and MLflow
# servers of the team stack (docker-compose.yml), all with the exact versions of
# constraints.txt. A builder stage makes the virtual environment; the final stage copies
# it onto a clean slim base and runs as an unprivileged user.
#
#   docker build -t tinyseek .                           # CPU PyTorch
#   docker build --build-arg TORCH_INDEX= -t tinyseek:gpu .  # PyPI's CUDA PyTorch (docker-compose.gpu.yml)
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
# The PyTorch CPU index: a plain `torch` from PyPI pulls the CUDA libraries (GBs) along.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
# Dependencies first, in their own layer, so editing the code does not reinstall PyTorch.
# mlflow[auth] serves the MLflow UI with basic auth; psycopg is the Postgres driver of the
# MLflow server (the Prefect server uses asyncpg, a Prefect dependency).
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && pip install -c constraints.txt ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} \
        -r /tmp/requirements.txt "mlflow[auth]" "psycopg[binary]"
COPY . .
RUN pip install --no-deps -e .

FROM ${PYTHON_IMAGE}
# Debian packages the final image needs at run time; none by default. The team stack
# (docker-compose.yml) adds a C++ compiler: torch.compile builds the fused CPU kernels of
# training with it, and Triton (torch.compile on CUDA) its kernel launchers.
ARG RUNTIME_PACKAGES=
RUN if [ -n "$RUNTIME_PACKAGES" ]; then \
      apt-get update && apt-get install -y --no-install-recommends $RUNTIME_PACKAGES && rm -rf /var/lib/apt/lists/*; \
    fi \
 && useradd --create-home --uid 10001 --user-group tinyseek \
 && mkdir -p /var/lib/tinyseek/workspace /var/lib/tinyseek/mlflow \
 && chown -R tinyseek:tinyseek /var/lib/tinyseek
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /app /app
# The Prefect server writes its UI bundle at start: into the user's home, not site-packages.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PREFECT_UI_STATIC_DIRECTORY=/home/tinyseek/.prefect/ui \
    TINYSEEK_HOME=/app \
    TINYSEEK_WORKSPACE=/var/lib/tinyseek/workspace
USER tinyseek
WORKDIR /app
CMD ["tinyseek", "--help"]
