# Story Arena as a Hugging Face Space (Docker SDK): non-root, port 7860, data in /data
# when the Space has persistent storage (else ./data inside the container).
FROM python:3.11-slim

RUN useradd --create-home --uid 1000 user
USER user
ENV HOME=/home/user PATH=/home/user/.local/bin:$PATH PYTHONUNBUFFERED=1
WORKDIR /home/user/app

COPY --chown=user requirements.txt requirements-starter.txt ./
RUN pip install --no-cache-dir --user torch==2.13.0 \
 && pip install --no-cache-dir --user -r requirements.txt \
 && pip install --no-cache-dir --user --no-deps -r requirements-starter.txt

COPY --chown=user . .

EXPOSE 7860
CMD ["python", "app.py", "--host", "0.0.0.0", "--port", "7860"]
