"""What every tab needs: the signed-in session, role checks, and safe story rendering."""

from __future__ import annotations

import html

import gradio as gr

from rlhf.params import check_whole

MAX_ROW_ID = 2**63 - 1  # SQLite's largest integer: a larger id fails inside sqlite3


def story_html(text: str, css_class: str = "story") -> str:
    """Untrusted text as inert HTML: escaped, line breaks kept by CSS."""
    return f'<div class="{css_class}">{html.escape(text or "")}</div>'


def require_signed_in(session: dict | None) -> dict:
    if not session:
        raise gr.Error("Sign in with a name first (top of the page).")
    return session


def require_researcher(session: dict | None) -> dict:
    """Server-side guard for researcher actions; the session state cannot be set by a client."""
    session = require_signed_in(session)
    if session.get("role") not in ("researcher", "admin"):
        raise gr.Error("This action needs the researcher role.")
    return session


def row_id(value, field: str) -> int:
    """An id from a form or an API call, or a one-line error naming the field."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    try:
        return check_whole(field, value, 1, MAX_ROW_ID)
    except ValueError as exc:
        raise gr.Error(str(exc)) from exc
