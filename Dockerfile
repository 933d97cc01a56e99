# CPU image that serves one trained checkpoint on port 8000.
#
#   docker build --build-arg CHECKPOINT=checkpoints/<run>/best.ckpt -t purchasenet-serve .
#   docker run --rm -p 8000:8000 purchasenet-serve
#   docker run --rm -p 8000:8000 -e LIT_SERVER_API_KEY=<secret> purchasenet-serve
#
# For a CUDA build pass another wheel index, e.g. --build-arg TORCH_INDEX_URL=<cu index>.
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
ARG CHECKPOINT=model.ckpt

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Torch first, from its own index, so installing the project does not pull the CUDA build.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

COPY pyproject.toml README.md ./
COPY src/ src/
RUN pip install . && rm -rf src build

COPY conf/ conf/
COPY scripts/ scripts/
COPY ${CHECKPOINT} /app/model.ckpt

RUN useradd --create-home --uid 10001 purchasenet
USER purchasenet

EXPOSE 8000

# /health needs no API key; it answers 503 until the model is loaded and while a worker is down.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 CMD python -c "\
import urllib.request as http; \
http.urlopen('http://127.0.0.1:8000/health', timeout=4)"

# docker stop sends SIGTERM; the server stops every process within a few seconds.
CMD ["python", "scripts/serve.py", "ckpt_path=/app/model.ckpt", "host=0.0.0.0", "port=8000"]
