# The MLflow tracking server of docker-compose.yml: PostgreSQL for runs and the model registry, artifacts
# proxied to an S3-compatible store (MinIO). The official MLflow image ships neither psycopg2 nor boto3.
#   docker build -f docker/mlflow.Dockerfile -t biflow-mlflow .
FROM python:3.11.11-slim-bookworm

# mlflow equals the client's (pyproject pins mlflow>=3.17,<4; the venv resolves 3.17.2).
# A non-root user (uid 1000) runs the server.
RUN pip install --no-cache-dir "mlflow==3.17.2" "psycopg2-binary==2.9.13" "boto3==1.44.5" \
    && useradd --create-home --uid 1000 --user-group mlflow
USER 1000:1000
WORKDIR /home/mlflow
EXPOSE 5000

# Everything else (backend store URI with its password, S3 endpoint and keys) comes from the environment
# at run time: MLFLOW_BACKEND_STORE_URI, MLFLOW_ARTIFACTS_DESTINATION, MLFLOW_S3_ENDPOINT_URL, AWS_*.
HEALTHCHECK --interval=10s --timeout=5s --retries=12 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=4)"]
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000", "--workers", "2", \
     "--allowed-hosts", "mlflow:5000,localhost:*,127.0.0.1:*"]
