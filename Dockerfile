# SQ-VAE Explorer: the Streamlit app on the shipped checkpoints, CPU by default.
#   docker build -t sqvae-explorer .
#   docker run -p 8501:8501 sqvae-explorer          # then open http://localhost:8501
# Sweeps started from the app run a local Ray (requirements.txt: ray[tune]); give it shared memory:
#   docker run --shm-size=512m -p 8501:8501 sqvae-explorer
# CUDA wheels instead of the CPU build:
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t sqvae-explorer:cuda .
FROM python:3.11-slim-bookworm

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

# SQVAE_READ_ONLY=1 (docker run -e SQVAE_READ_ONLY=1 ...): visitors explore and compare only; no control
# starts, stops or resumes trainings or sweeps, uploads bundles or imports checkpoints (README, "Deployment").
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SQVAE_RUNS=/data/runs \
    SQVAE_READ_ONLY=0

# Fashion-MNIST from Debian, so training works offline inside the container.
RUN apt-get update \
    && apt-get install -y --no-install-recommends dataset-fashion-mnist=0.0~git20200523.55506a9-1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/sqvae
# torch first from the chosen index; requirements.txt's range then installs nothing more.
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
COPY requirements.txt pyproject.toml README.md ./
RUN pip install -r requirements.txt
COPY sqvae_core ./sqvae_core
COPY app ./app
COPY checkpoints ./checkpoints
COPY .streamlit ./.streamlit
RUN pip install --no-deps -e . \
    && useradd --create-home --uid 10001 app \
    && mkdir -p /data/runs \
    && chown -R app:app /data

USER 10001
EXPOSE 8501
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8501/_stcore/health', timeout=4).status == 200 else 1)"]
# Inside the container the app must listen on all interfaces to be reachable from the host.
CMD ["streamlit", "run", "app/main.py", "--server.address=0.0.0.0", "--server.port=8501", "--server.headless=true"]
