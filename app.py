"""Story Arena entry point: settings -> database -> job worker -> UI -> launch.

    python app.py [--data-dir DIR] [--host H] [--port P] [--starter smollm2|tiny]
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import sys

from rlhf.jobs import JobWorker
from rlhf.settings import Settings, add_arguments, from_args
from rlhf.starters import needs_prepare
from storage import jobs as job_rows


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def check_exposure(settings: Settings) -> None:
    """Refuse to serve researcher actions to a network on names alone. With the Hugging Face
    login (hf_oauth on a Space) researchers sign in through it and the name form refuses
    their names, so no key is needed then."""
    if (settings.researchers and settings.researcher_key is None and not settings.hub_oauth
            and not _is_loopback(settings.host)):
        raise SystemExit(
            "Researchers are configured and the app listens beyond this machine: set "
            "STORY_ARENA_RESEARCHER_KEY so a researcher name alone grants nothing."
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Story Arena: vote on stories, train on the votes.")
    add_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 on a Space)")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)
    settings = from_args(args, os.environ)
    check_exposure(settings)
    store = settings.store()
    if needs_prepare(store, settings):
        job_rows.create_job(store.db, "prepare", {})
    worker = JobWorker(settings).start()
    # SIGTERM (docker stop, a Space restart) unwinds through `finally`, so the running job's
    # process is stopped too instead of running on as an orphan.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    # uvicorn believes X-Forwarded-For only from these hosts (by default it trusts 127.0.0.1,
    # so a local client could pick any address for the per-address limits).
    os.environ["FORWARDED_ALLOW_IPS"] = ",".join(settings.trusted_proxies)
    # Imported only now: Gradio and the tabs take seconds to import, and the first start's
    # prepare job (converting the starter, writing the first pair) runs meanwhile.
    from ui.app import build_ui

    demo, launch_kwargs = build_ui(settings, store)
    print(f"Story Arena: data in {settings.data_dir}", file=sys.stderr)
    try:
        demo.queue(default_concurrency_limit=16).launch(
            server_name=settings.host, server_port=settings.port, **launch_kwargs
        )
    finally:
        worker.stop()


if __name__ == "__main__":
    main()
