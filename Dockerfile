# One image for every role: migrations, scheduler (beat), GPU workers.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
# CUDA-enabled torch from PyPI at the release this project is tested with.
RUN pip install --no-cache-dir torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml README.md ./
COPY enrichment enrichment
COPY worker worker
COPY migrations migrations
RUN pip install --no-cache-dir . && useradd --create-home enrich
USER enrich
ENTRYPOINT ["enrich"]
CMD ["--help"]
