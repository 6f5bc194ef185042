"""Conversation history in SQLite, in the user's data dir, so chats survive a restart."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY,
    title TEXT NOT NULL,
    model TEXT NOT NULL,
    settings TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    created REAL NOT NULL
);
"""


def default_history_path() -> Path:
    base = os.environ.get("EDGEINFER_DATA") or os.path.join(
        os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share", "edgeinfer")
    return Path(base) / "history.sqlite3"


@dataclass
class Conversation:
    id: int
    title: str
    model: str
    settings: dict[str, Any]
    messages: list[dict[str, str]]  # {"role", "content"}, oldest first


class HistoryStore:
    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path else default_history_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path)
        self._db.execute("PRAGMA foreign_keys = ON")
        self._db.executescript(SCHEMA)

    def create(self, title: str, model: str, settings: dict[str, Any]) -> int:
        now = time.time()
        with self._db:
            cur = self._db.execute("INSERT INTO conversations (title, model, settings, created, updated) "
                                   "VALUES (?, ?, ?, ?, ?)", (title, model, json.dumps(settings), now, now))
        return int(cur.lastrowid)

    def conversations(self) -> list[tuple[int, str]]:
        """(id, title), most recently updated first."""
        return list(self._db.execute("SELECT id, title FROM conversations ORDER BY updated DESC, id DESC"))

    def get(self, conv_id: int) -> Conversation:
        row = self._db.execute("SELECT title, model, settings FROM conversations WHERE id = ?", (conv_id,)).fetchone()
        if row is None:
            raise KeyError(conv_id)
        messages = [{"role": r, "content": c} for r, c in self._db.execute(
            "SELECT role, content FROM messages WHERE conversation_id = ? ORDER BY id", (conv_id,))]
        return Conversation(conv_id, row[0], row[1], json.loads(row[2]), messages)

    def add_message(self, conv_id: int, role: str, content: str) -> None:
        now = time.time()
        with self._db:
            self._db.execute("INSERT INTO messages (conversation_id, role, content, created) VALUES (?, ?, ?, ?)",
                             (conv_id, role, content, now))
            self._db.execute("UPDATE conversations SET updated = ? WHERE id = ?", (now, conv_id))

    def drop_last_message(self, conv_id: int) -> None:
        with self._db:
            self._db.execute("DELETE FROM messages WHERE id = (SELECT MAX(id) FROM messages WHERE conversation_id = ?)",
                             (conv_id,))

    def rename(self, conv_id: int, title: str) -> None:
        with self._db:
            self._db.execute("UPDATE conversations SET title = ? WHERE id = ?", (title, conv_id))

    def set_settings(self, conv_id: int, settings: dict[str, Any]) -> None:
        with self._db:
            self._db.execute("UPDATE conversations SET settings = ? WHERE id = ?", (json.dumps(settings), conv_id))

    def delete(self, conv_id: int) -> None:
        with self._db:
            self._db.execute("DELETE FROM conversations WHERE id = ?", (conv_id,))

    def export_markdown(self, conv_id: int) -> str:
        conv = self.get(conv_id)
        lines = [f"# {conv.title}", "", f"Model: `{conv.model}`", ""]
        if conv.settings.get("system_prompt"):
            lines += ["**System:** " + conv.settings["system_prompt"], ""]
        for m in conv.messages:
            lines += [f"## {m['role'].capitalize()}", "", m["content"], ""]
        return "\n".join(lines)

    def close(self) -> None:
        self._db.close()
