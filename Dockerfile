# Story Arena as a Hugging Face Space (Docker SDK): a non-root user, port 7860, and every
# file the app writes under /data (the Space's persistent storage when it is enabled;
# without it /data lives in the container and is lost on restart).
FROM python:3.11-slim

RUN useradd --create-home --uid 1000 user && mkdir /data && chown user:user /data
USER user
ENV HOME=/home/user PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HOME=/data/.huggingface
# X-Forwarded-For is believed only from STORY_ARENA_TRUSTED_PROXIES (default none: the
# per-address limits count the connecting address). On a Space set it, as a Space variable, to
# the proxy's network (README, Security); never "*", which lets any client pick its address.
WORKDIR /home/user/app

# The same install steps as a local setup, from the same pinned files: install.sh.
COPY --chown=user install.sh requirements.txt requirements-starter.txt ./
RUN bash install.sh

COPY --chown=user . .

EXPOSE 7860
CMD [".venv/bin/python", "app.py", "--host", "0.0.0.0", "--port", "7860"]
