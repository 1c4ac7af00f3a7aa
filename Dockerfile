# One image for every Spider process; the command picks the role (see docker-compose.yml).
FROM python:3.11-slim-bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends firejail python3-venv redis-tools git \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY spider ./spider
ARG EXTRAS=server,vllm,tinker
RUN pip install --no-cache-dir -e ".[${EXTRAS}]"
ENV SPIDER_DATA_DIR=/data SPIDER_CACHE_DIR=/cache
EXPOSE 9000
CMD ["spider", "serve", "--host", "0.0.0.0", "--port", "9000"]
