"""The conversation store under concurrency, damage and kill -9 (issue 21, items 4 and 5).

Positions are allocated inside the write transaction and a reply never overwrites a
message another writer saved; a damaged database is a one-line error naming the file
(and can be moved aside, nothing deleted); many writers killed at random points leave
a database that passes ``PRAGMA integrity_check`` with every acknowledged message intact.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from moechat.app.store import ConversationStore, DatabaseDamaged, MessageConflict, move_aside
from moechat.runtime.errors import MoechatError

# -- item 4: two writers on one conversation --------------------------------------------------


def test_a_reply_never_overwrites_another_writers_message(tmp_path: Path) -> None:
    a = ConversationStore(tmp_path / "db.sqlite3")
    b = ConversationStore(tmp_path / "db.sqlite3")
    c = a.create_conversation("t")
    s = a.add_message(c, "user", "A")
    assert b.add_message(c, "user", "B") == s + 1  # the next free position, atomically
    with pytest.raises(MessageConflict, match="another moechat"):
        a.upsert_message(c, s + 1, "assistant", "reply to A")
    assert [(m.role, m.content) for m in a.messages(c)] == [("user", "A"), ("user", "B")]
    # a store streams into its own reply as before
    r = b.add_message(c, "assistant", "", partial=True)
    b.upsert_message(c, r, "assistant", "reply to B, complete")
    assert b.messages(c)[-1].content == "reply to B, complete"
    with pytest.raises(MessageConflict):
        a.upsert_message(c, r, "assistant", "overwrite")
    a.close()
    b.close()


def test_add_message_positions_are_unique_under_threads(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    with ConversationStore(path) as s:
        c = s.create_conversation("t")

    def writer(i: int) -> None:
        with ConversationStore(path) as store:
            for j in range(15):
                store.add_message(c, "user", f"{i}-{j}")

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with ConversationStore(path) as s:
        messages = s.messages(c)
    assert sorted(m.content for m in messages) == sorted(
        f"{i}-{j}" for i in range(4) for j in range(15)
    )
    assert [m.seq for m in messages] == list(range(60))


# -- item 5: damaged databases ------------------------------------------------------------------


def _damage(path: Path, how: str) -> None:
    with ConversationStore(path) as s:
        c = s.create_conversation("keep me")
        for i in range(200):
            s.add_message(c, "user", f"message {i} " + "x" * 200)
    if how == "dropped table":
        conn = sqlite3.connect(path)
        conn.execute("DROP TABLE messages")
        conn.commit()
        conn.close()
    else:  # corrupt pages in the middle of the file
        data = bytearray(path.read_bytes())
        data[8192:16384] = os.urandom(8192)
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["dropped table", "corrupt pages"])
def test_damaged_database_is_named_and_can_be_moved_aside(tmp_path: Path, how: str) -> None:
    path = tmp_path / "conversations.sqlite3"
    _damage(path, how)
    damaged = path.read_bytes()
    with pytest.raises(DatabaseDamaged) as err:
        ConversationStore(path)
    message = str(err.value)
    assert str(path) in message and "damaged" in message and "\n" not in message
    aside = move_aside(path)
    assert aside.read_bytes() == damaged and not path.exists()  # kept, not deleted
    with ConversationStore(path) as fresh:
        assert fresh.list_conversations() == []


def test_damage_found_during_a_session_is_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "conversations.sqlite3"
    store = ConversationStore(path)
    c = store.create_conversation("t")
    other = sqlite3.connect(path)
    other.execute("DROP TABLE messages")
    other.commit()
    other.close()
    for call in (lambda: store.messages(c), lambda: store.add_message(c, "user", "x"),
                 store.list_conversations):  # fmt: skip
        with pytest.raises(MoechatError, match=f"{path}.*damaged"):
            call()


def test_read_only_data_dir_is_a_one_line_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(MoechatError, match="cannot create the data dir"):
        ConversationStore(blocker / "sub" / "conversations.sqlite3")
    if os.geteuid() == 0:
        return  # root writes anywhere: the permission case below cannot happen
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(MoechatError, match="MOECHAT_DATA_DIR"):
            ConversationStore(ro / "conversations.sqlite3")
    finally:
        ro.chmod(0o700)


# -- crash safety: many writers, kill -9 ---------------------------------------------------------


def _writer(path: str, conversation: int, name: str, acks: str) -> None:
    """Append user messages and stream replies into them until killed; each message whose
    write returned is acknowledged (one line, flushed) before the next write starts."""
    store = ConversationStore(path)
    with open(acks, "a", buffering=1) as log:
        for i in range(10**6):
            text = f"{name}:{i}"
            try:
                seq = store.add_message(conversation, "user", text)
            except MoechatError:  # busy: another writer holds the lock for too long
                continue
            log.write(f"user {seq} {text}\n")
            try:
                reply = store.add_message(conversation, "assistant", "", partial=True)
                for part in range(3):
                    store.upsert_message(
                        conversation, reply, "assistant", f"reply {text} {part}", partial=part < 2
                    )
                    log.write(f"reply {reply} reply {text} {part}\n")
            except MoechatError:
                continue


def test_many_writers_killed_at_random_points(tmp_path: Path) -> None:
    path = tmp_path / "conversations.sqlite3"
    with ConversationStore(path) as s:
        conversation = s.create_conversation("shared")
    ctx = multiprocessing.get_context("fork" if hasattr(os, "fork") else "spawn")
    rng = random.Random(21)
    acks: list[Path] = []
    deadline = time.monotonic() + 4.0
    round_ = 0
    while time.monotonic() < deadline:
        procs = []
        for i in range(4):
            ack = tmp_path / f"acks-{round_}-{i}.log"
            acks.append(ack)
            p = ctx.Process(
                target=_writer, args=(str(path), conversation, f"p{round_}.{i}", str(ack))
            )
            p.start()
            procs.append(p)
        ack = tmp_path / f"acks-{round_}-t.log"
        acks.append(ack)
        thread = threading.Thread(
            target=_thread_writer, args=(path, conversation, f"t{round_}", ack), daemon=True
        )
        thread.start()
        for p in procs:
            time.sleep(rng.uniform(0.05, 0.4))
            os.kill(p.pid, signal.SIGKILL)  # mid-transaction or between writes
        for p in procs:
            p.join()
        thread.join()
        round_ += 1

    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rows = {
        seq: (role, content)
        for seq, role, content in conn.execute(
            "SELECT seq, role, content FROM messages WHERE conversation_id = ?", (conversation,)
        )
    }
    conn.close()
    users = replies = 0
    for ack in acks:
        if not ack.exists():
            continue
        last_reply: dict[int, str] = {}
        for line in ack.read_text().splitlines():
            kind, seq_text, text = line.split(" ", 2)
            seq = int(seq_text)
            if kind == "user":
                assert rows.get(seq) == ("user", text), f"user message {text} lost or overwritten"
                users += 1
            else:
                last_reply[seq] = text
        for seq, text in last_reply.items():  # a reply holds at least its last acknowledged part
            role, content = rows[seq]
            assert role == "assistant" and content.rsplit(" ", 1)[0] == text.rsplit(" ", 1)[0]
            assert int(content.rsplit(" ", 1)[1]) >= int(text.rsplit(" ", 1)[1])
            replies += 1
    assert users > 20 and replies > 10


def _thread_writer(path: Path, conversation: int, name: str, ack: Path) -> None:
    """A writer thread in the test process: a fixed number of messages beside the
    processes (threads cannot be killed; they share the lock with the processes)."""
    store = ConversationStore(path)
    with open(ack, "a", buffering=1) as log:
        for i in range(20):
            try:
                seq = store.add_message(conversation, "user", f"{name}:{i}")
            except MoechatError:
                continue
            log.write(f"user {seq} {name}:{i}\n")
    store.close()


# -- item 5 in the app: told at start, offered to move it aside ----------------------------------


def test_chat_offers_to_move_a_damaged_database_aside(tmp_path: Path, capsys) -> None:
    from moechat.app.launch import open_store

    path = tmp_path / "conversations.sqlite3"
    _damage(path, "corrupt pages")
    damaged = path.read_bytes()
    questions: list[str] = []
    with pytest.raises(DatabaseDamaged):
        open_store(tmp_path, ask=lambda q: questions.append(q) or False)
    assert str(path) in questions[0] and "Move it aside" in questions[0]
    assert path.read_bytes() == damaged  # declined: untouched
    store = open_store(tmp_path, ask=lambda q: True)
    assert store.list_conversations() == []
    store.close()
    kept = [p for p in tmp_path.iterdir() if ".damaged-" in p.name and p.suffix != ".sqlite3-wal"]
    assert any(p.read_bytes() == damaged for p in kept)
    assert "kept as" in capsys.readouterr().err


def test_chat_cli_with_a_damaged_or_unwritable_data_dir(tiny_package, tmp_path, capsys) -> None:
    from moechat.app.cli import main

    _damage(tmp_path / "conversations.sqlite3", "dropped table")
    assert main(["chat", str(tiny_package), "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("moechat: error: cannot open the conversations database")
    assert "damaged" in err and len(err.splitlines()) == 1
    (tmp_path / "file").write_text("x")
    assert main(["chat", str(tiny_package), "--data-dir", str(tmp_path / "file" / "d")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("moechat: error: cannot create the data dir") and "Traceback" not in err
