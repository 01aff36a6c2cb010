FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY orchestrator ./orchestrator
COPY workers ./workers
COPY schemas ./schemas
COPY examples ./examples
RUN pip install --no-cache-dir . && mkdir -p /accounts && chown nobody /accounts
USER nobody
ENTRYPOINT ["orchestrator"]
CMD ["up", "--policy", "examples/policy.yaml"]
