"""Conversation persistence in SQLite (stdlib ``sqlite3``).

One database file per user (see :mod:`moechat.app.paths`). The schema version lives in
``PRAGMA user_version``; :data:`MIGRATIONS` upgrades older files step by step, each step in
its own transaction. Every write is one transaction, so a crash leaves either the old or
the new state, never half of it.

Tables:

* ``conversations``: id, title, model, created_at, updated_at, settings (JSON: the sampling
  parameters and system prompt in force for the conversation).
* ``messages``: id, conversation_id, seq (order within the conversation), role, content,
  partial (1 while a reply is streaming or when it was stopped/cut off), finish_reason,
  stats (JSON), settings (JSON: the sampling parameters and system prompt a reply was
  generated with; NULL for user messages and for replies saved before schema v3),
  created_at.
"""

from __future__ import annotations

import functools
import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moechat.runtime.errors import MoechatError

ROLES = ("system", "user", "assistant")


class MessageConflict(MoechatError):
    """Another writer holds the position a message was to be saved at (nothing changed)."""


class DatabaseDamaged(MoechatError):
    """The conversations database cannot be read: tables missing, pages corrupt, not a
    database. :func:`move_aside` keeps the file and makes room for a new one."""

    def __init__(self, path: str, detail: str, opening: bool = False) -> None:
        self.path = path
        super().__init__(
            f"cannot {'open' if opening else 'use'} the conversations database {path}: it is "
            f"damaged ({detail}); moechat chat offers to move it aside and start a new one"
        )


def move_aside(path: Path | str) -> Path:
    """Rename a damaged database (and its -wal/-shm files) to ``NAME.damaged-TIME``; the
    returned path is the kept copy. Nothing is deleted."""
    path = Path(path)
    aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    for suffix in ("-wal", "-shm", ""):
        part = path.with_name(path.name + suffix)
        if part.exists():
            part.rename(aside.with_name(aside.name + suffix))
    return aside


def _guarded(method: Callable[..., Any]) -> Callable[..., Any]:
    """SQLite errors of a store call as one-line MoechatErrors naming the file."""

    @functools.wraps(method)
    def call(self: ConversationStore, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.OperationalError as err:
            if "locked" in str(err) or "busy" in str(err):
                raise MoechatError(
                    f"the conversations database {self.path} is busy (another moechat is "
                    "writing to it); try again"
                ) from None
            if "readonly" in str(err) or "read-only" in str(err) or "disk" in str(err):
                raise MoechatError(
                    f"cannot write the conversations database {self.path}: {err}"
                ) from None
            raise DatabaseDamaged(self.path, str(err)) from None
        except sqlite3.DatabaseError as err:  # malformed pages, not a database, ...
            raise DatabaseDamaged(self.path, str(err)) from None

    return call


def _migrate_1(conn: sqlite3.Connection) -> None:
    conn.execute(
        """
        CREATE TABLE conversations (
            id INTEGER PRIMARY KEY,
            title TEXT NOT NULL,
            model TEXT NOT NULL DEFAULT '',
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            settings TEXT NOT NULL DEFAULT '{}'
        )
        """
    )
    conn.execute(
        """
        CREATE TABLE messages (
            id INTEGER PRIMARY KEY,
            conversation_id INTEGER NOT NULL
                REFERENCES conversations(id) ON DELETE CASCADE,
            seq INTEGER NOT NULL,
            role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
            content TEXT NOT NULL,
            partial INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL,
            UNIQUE (conversation_id, seq)
        )
        """
    )


def _migrate_2(conn: sqlite3.Connection) -> None:
    """v2: why a reply ended and its generation stats; list conversations by recency."""
    conn.execute("ALTER TABLE messages ADD COLUMN finish_reason TEXT")
    conn.execute("ALTER TABLE messages ADD COLUMN stats TEXT")
    conn.execute("CREATE INDEX conversations_by_update ON conversations (updated_at DESC)")


def _migrate_3(conn: sqlite3.Connection) -> None:
    """v3: the sampling settings each reply was generated with (exports list them)."""
    conn.execute("ALTER TABLE messages ADD COLUMN settings TEXT")


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_migrate_1, _migrate_2, _migrate_3]
"""MIGRATIONS[i] upgrades a database from schema version i to i + 1."""

SCHEMA_VERSION = len(MIGRATIONS)


@dataclass
class Conversation:
    id: int
    title: str
    model: str
    created_at: float
    updated_at: float
    settings: dict[str, Any] = field(default_factory=dict)
    message_count: int = 0


@dataclass
class StoredMessage:
    id: int
    conversation_id: int
    seq: int
    role: str
    content: str
    partial: bool = False
    finish_reason: str | None = None
    stats: dict[str, Any] | None = None
    created_at: float = 0.0
    settings: dict[str, Any] | None = None

    def chatml(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


class ConversationStore:
    """All reads and writes of conversations. Use it from one thread (the UI thread)."""

    def __init__(self, path: Path | str, *, target_version: int = SCHEMA_VERSION) -> None:
        self.path = str(path)
        # (conversation, seq) -> id of each message row this store wrote: only those
        # are overwritten by upsert_message (another writer's message never is)
        self._written: dict[tuple[int, int], int] = {}
        if self.path != ":memory:":
            try:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:  # a read-only file system, a file in the way
                raise MoechatError(
                    f"cannot create the data dir {Path(self.path).parent}: "
                    f"{err.strerror or err} (set MOECHAT_DATA_DIR to a writable folder)"
                ) from None
        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=5.0)
            self._conn: sqlite3.Connection = conn
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA foreign_keys = ON")
            if self.path != ":memory:":
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = NORMAL")
            self._migrate(target_version)
            self._check_intact()
        except (sqlite3.DatabaseError, MoechatError) as err:
            if conn is not None:
                conn.close()
            if isinstance(err, MoechatError):
                raise
            if isinstance(err, sqlite3.OperationalError) and any(
                word in str(err) for word in ("unable to open", "readonly", "read-only", "locked")
            ):  # a read-only file system or folder, or a database held by another program
                raise MoechatError(
                    f"cannot open the conversations database {self.path}: {err} "
                    "(set MOECHAT_DATA_DIR to a writable folder)"
                ) from None
            raise DatabaseDamaged(self.path, str(err), opening=True) from None

    def _check_intact(self) -> None:
        """The tables are there and SQLite's quick check passes (milliseconds for a
        chat history), so damage is found at start, not halfway through a session."""
        tables = {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master")}
        missing = {"conversations", "messages"} - tables
        if missing and self.schema_version:
            raise DatabaseDamaged(self.path, f"no table {sorted(missing)[0]!r}", opening=True)
        result = self._conn.execute("PRAGMA quick_check").fetchone()[0]
        if result != "ok":
            raise DatabaseDamaged(self.path, str(result).splitlines()[0], opening=True)

    # -- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> ConversationStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        return int(self._conn.execute("PRAGMA user_version").fetchone()[0])

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        else:
            self._conn.execute("COMMIT")

    def _migrate(self, target_version: int) -> None:
        version = self.schema_version
        if version > SCHEMA_VERSION:
            raise MoechatError(
                f"the conversations database {self.path} has schema version {version}, "
                f"newer than this moechat supports ({SCHEMA_VERSION}); upgrade moechat"
            )
        for step in range(version, target_version):
            with self._transaction() as conn:
                MIGRATIONS[step](conn)
                conn.execute(f"PRAGMA user_version = {step + 1}")

    # -- conversations ---------------------------------------------------------------

    def create_conversation(
        self, title: str, *, model: str = "", settings: dict[str, Any] | None = None
    ) -> int:
        now = time.time()
        with self._transaction() as conn:
            cur = conn.execute(
                "INSERT INTO conversations (title, model, created_at, updated_at, settings)"
                " VALUES (?, ?, ?, ?, ?)",
                (title, model, now, now, json.dumps(settings or {})),
            )
            row_id = cur.lastrowid
            assert row_id is not None  # set by every INSERT that added a row
            return row_id

    def _conversation(self, row: sqlite3.Row) -> Conversation:
        try:
            settings = json.loads(row["settings"] or "{}")
        except ValueError:
            settings = {}
        return Conversation(
            id=row["id"],
            title=row["title"],
            model=row["model"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            settings=settings if isinstance(settings, dict) else {},
            message_count=row["message_count"],
        )

    _SELECT_CONVERSATIONS = (
        "SELECT c.*, (SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id)"
        " AS message_count FROM conversations c"
    )

    def list_conversations(self) -> list[Conversation]:
        """All conversations, most recently updated first."""
        rows = self._conn.execute(
            self._SELECT_CONVERSATIONS + " ORDER BY c.updated_at DESC, c.id DESC"
        ).fetchall()
        return [self._conversation(r) for r in rows]

    def get_conversation(self, conversation_id: int) -> Conversation | None:
        row = self._conn.execute(
            self._SELECT_CONVERSATIONS + " WHERE c.id = ?", (conversation_id,)
        ).fetchone()
        return self._conversation(row) if row else None

    def rename_conversation(self, conversation_id: int, title: str) -> None:
        title = title.strip()
        if not title:
            raise MoechatError("a conversation title cannot be empty")
        with self._transaction() as conn:
            conn.execute(
                "UPDATE conversations SET title = ?, updated_at = ? WHERE id = ?",
                (title, time.time(), conversation_id),
            )

    def update_settings(self, conversation_id: int, settings: dict[str, Any]) -> None:
        with self._transaction() as conn:
            conn.execute(
                "UPDATE conversations SET settings = ? WHERE id = ?",
                (json.dumps(settings), conversation_id),
            )

    def delete_conversation(self, conversation_id: int) -> None:
        with self._transaction() as conn:
            conn.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    # -- messages --------------------------------------------------------------------

    def messages(self, conversation_id: int) -> list[StoredMessage]:
        rows = self._conn.execute(
            "SELECT * FROM messages WHERE conversation_id = ? ORDER BY seq", (conversation_id,)
        ).fetchall()
        out = []
        for r in rows:
            try:
                stats = json.loads(r["stats"]) if r["stats"] else None
            except ValueError:
                stats = None
            try:
                settings = json.loads(r["settings"]) if r["settings"] else None
            except ValueError:
                settings = None
            out.append(
                StoredMessage(
                    id=r["id"],
                    conversation_id=r["conversation_id"],
                    seq=r["seq"],
                    role=r["role"],
                    content=r["content"],
                    partial=bool(r["partial"]),
                    finish_reason=r["finish_reason"],
                    stats=stats,
                    created_at=r["created_at"],
                    settings=settings if isinstance(settings, dict) else None,
                )
            )
        return out

    def next_seq(self, conversation_id: int) -> int:
        row = self._conn.execute(
            "SELECT COALESCE(MAX(seq), -1) + 1 FROM messages WHERE conversation_id = ?",
            (conversation_id,),
        ).fetchone()
        return int(row[0])

    def add_message(
        self,
        conversation_id: int,
        role: str,
        content: str,
        *,
        partial: bool = False,
        finish_reason: str | None = None,
        stats: dict[str, Any] | None = None,
        settings: dict[str, Any] | None = None,
    ) -> int:
        """Append a message at the end of the conversation; returns its seq. The position
        is chosen inside the write transaction: two writers never get the same one."""
        return self._write_message(
            conversation_id, None, role, content, partial, finish_reason, stats, settings
        )

    def upsert_message(
        self,
        conversation_id: int,
        seq: int,
        role: str,
        content: str,
        *,
        partial: bool = False,
        finish_reason: str | None = None,
        stats: dict[str, Any] | None = None,
        settings: dict[str, Any] | None = None,
    ) -> None:
        """Insert the message at ``seq`` or overwrite it (used for the streaming reply).

        Only a message this store wrote itself is overwritten: when another writer (a
        second app on the same database) took ``seq`` in the meantime, this raises a
        :class:`MessageConflict` and its message stays as it was.
        ``settings`` None keeps what the row has (a failed regenerate restores a reply)."""
        self._write_message(
            conversation_id, seq, role, content, partial, finish_reason, stats, settings
        )

    def _write_message(
        self,
        conversation_id: int,
        seq: int | None,
        role: str,
        content: str,
        partial: bool,
        finish_reason: str | None,
        stats: dict[str, Any] | None,
        settings: dict[str, Any] | None,
    ) -> int:
        if role not in ROLES:
            raise MoechatError(f"unknown message role {role!r}")
        now = time.time()
        with self._transaction() as conn:
            if seq is None:
                seq = int(
                    conn.execute(
                        "SELECT COALESCE(MAX(seq), -1) + 1 FROM messages WHERE conversation_id = ?",
                        (conversation_id,),
                    ).fetchone()[0]
                )
            row = conn.execute(
                "SELECT id FROM messages WHERE conversation_id = ? AND seq = ?",
                (conversation_id, seq),
            ).fetchone()
            if row is not None and self._written.get((conversation_id, seq)) != row[0]:
                raise MessageConflict(
                    f"message {seq} of this conversation was written by another moechat "
                    "(a second window on the same conversations?); it was kept and this "
                    "one was not saved over it: reopen the conversation to see it"
                )
            conn.execute(
                "INSERT INTO messages (conversation_id, seq, role, content, partial,"
                " finish_reason, stats, settings, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (conversation_id, seq) DO UPDATE SET role = excluded.role,"
                " content = excluded.content, partial = excluded.partial,"
                " finish_reason = excluded.finish_reason, stats = excluded.stats,"
                " settings = COALESCE(excluded.settings, messages.settings)",
                (
                    conversation_id,
                    seq,
                    role,
                    content,
                    int(partial),
                    finish_reason,
                    json.dumps(stats) if stats is not None else None,
                    json.dumps(settings) if settings is not None else None,
                    now,
                ),
            )
            conn.execute(
                "UPDATE conversations SET updated_at = ? WHERE id = ?", (now, conversation_id)
            )
            written = conn.execute(
                "SELECT id FROM messages WHERE conversation_id = ? AND seq = ?",
                (conversation_id, seq),
            ).fetchone()[0]
        self._written[(conversation_id, seq)] = int(written)
        return seq

    def delete_messages_from(self, conversation_id: int, seq: int) -> None:
        """Delete the messages at ``seq`` and after (regenerate, edit, failed replies)."""
        with self._transaction() as conn:
            conn.execute(
                "DELETE FROM messages WHERE conversation_id = ? AND seq >= ?",
                (conversation_id, seq),
            )

    def clear_messages(self, conversation_id: int) -> None:
        self.delete_messages_from(conversation_id, 0)


for _name in (
    "create_conversation", "list_conversations", "get_conversation", "rename_conversation",
    "update_settings", "delete_conversation", "messages", "next_seq", "add_message",
    "upsert_message", "delete_messages_from", "clear_messages",
):  # fmt: skip
    setattr(ConversationStore, _name, _guarded(getattr(ConversationStore, _name)))
