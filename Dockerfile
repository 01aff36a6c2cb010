FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY orchestrator ./orchestrator
COPY workers ./workers
COPY schemas ./schemas
COPY examples ./examples
RUN pip install --no-cache-dir .
USER nobody
ENTRYPOINT ["orchestrator"]
CMD ["up", "--policy", "examples/policy.yaml"]
