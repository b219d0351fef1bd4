"""People who vote, their role, and who may use a name.

A name belongs to the first browser that signs in with it: the row keeps a hash of that
browser's secret token. Names are compared by `name_key`, so look-alikes of a name
(other case, fullwidth or Cyrillic letters) are the same name.
"""

from __future__ import annotations

import hashlib
import hmac
import time
import unicodedata

from confusable_homoglyphs.confusables import confusables_data
from sqlite_utils import Database

from storage.db import write_transaction

ROLES = ("annotator", "researcher", "admin")


def _ascii_look_alike(char: str) -> str:
    """The ASCII letter or digit `char` is confusable with (Unicode's confusables.txt), else char."""
    if char.isascii():
        return char
    twins = sorted(h["c"] for h in confusables_data.get(char, ())
                   if len(h["c"]) == 1 and h["c"].isascii() and h["c"].isalnum())
    return twins[0].casefold() if twins else char


def name_key(name: str) -> str:
    """What two names must differ in to be different people: NFKC (fullwidth -> ASCII),
    casefold, then every letter that looks like an ASCII one replaced by it ("rіta" with a
    Cyrillic і gives "rita")."""
    folded = unicodedata.normalize("NFKC", name).casefold()
    return "".join(_ascii_look_alike(char) for char in folded)


def token_hash(token: str) -> str:
    """Tokens are random 128-bit secrets, so a plain SHA-256 is enough to store them."""
    return hashlib.sha256(token.encode()).hexdigest()


def token_matches(row: dict, token: str) -> bool:
    return row["token_hash"] is not None and hmac.compare_digest(row["token_hash"], token_hash(token))


def find(db: Database, name: str) -> dict | None:
    """The annotator whose name has the same name_key as `name` (the oldest, if several)."""
    return next(db["annotators"].rows_where("name_key = ?", [name_key(name)], order_by="id", limit=1), None)


def sign_in(db: Database, name: str, role: str, token: str | None = None) -> dict:
    """Find the annotator by name_key or create it claimed by `token`; an unclaimed row
    (made before tokens, or by a local tool without one) is claimed by the first token.
    The role follows the configuration.

    Returns the row: the caller refuses the sign-in when its token does not match.
    """
    if role not in ROLES:
        raise ValueError(f"Unknown role {role!r}.")
    hashed = token_hash(token) if token else None
    with write_transaction(db):
        row = find(db, name)
        if row is None:
            row_id = db["annotators"].insert({
                "name": name, "name_key": name_key(name), "role": role,
                "token_hash": hashed, "created_at": time.time(),
            }).last_pk
        else:
            row_id = row["id"]
            db.execute("UPDATE annotators SET role = ?, token_hash = coalesce(token_hash, ?) WHERE id = ?",
                       [role, hashed, row_id])
    return db["annotators"].get(row_id)


def sign_in_hub(db: Database, username: str, role: str) -> dict:
    """Find or create the annotator for a Hugging Face login (display name "@username")."""
    if role not in ROLES:
        raise ValueError(f"Unknown role {role!r}.")
    with write_transaction(db):
        db["annotators"].insert(
            {"name": f"@{username}", "name_key": name_key(f"@{username}"), "hub_username": username,
             "role": role, "created_at": time.time()},
            ignore=True,
        )
        db.execute("UPDATE annotators SET role = ? WHERE hub_username = ?", [role, username])
    return next(db["annotators"].rows_where("hub_username = ?", [username]))
