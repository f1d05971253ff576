"""Conversation store: schema version, migrations, CRUD, partial replies, export."""

from __future__ import annotations

import json
import sqlite3

import pytest

from moechat.app import paths
from moechat.app.export_conversation import export_conversation, to_json, to_markdown
from moechat.app.store import MIGRATIONS, SCHEMA_VERSION, ConversationStore
from moechat.runtime.errors import MoechatError


@pytest.fixture
def store(tmp_path):
    with ConversationStore(tmp_path / "db.sqlite3") as s:
        yield s


def test_new_database_has_current_schema(store):
    assert store.schema_version == SCHEMA_VERSION == len(MIGRATIONS)
    cols = {r[1] for r in store._conn.execute("PRAGMA table_info(messages)")}
    assert {"partial", "finish_reason", "stats", "seq", "role", "content"} <= cols


def test_migrates_a_version_1_database_keeping_its_rows(tmp_path):
    path = tmp_path / "old.sqlite3"
    with ConversationStore(path, target_version=1) as old:
        assert old.schema_version == 1
        cid = old.create_conversation("kept")
        old._conn.execute(
            "INSERT INTO messages (conversation_id, seq, role, content, partial, created_at)"
            " VALUES (?, 0, 'user', 'hi', 0, 0)",
            (cid,),
        )
    with ConversationStore(path) as new:
        assert new.schema_version == SCHEMA_VERSION
        [msg] = new.messages(cid)
        assert (msg.role, msg.content, msg.finish_reason, msg.stats) == ("user", "hi", None, None)
        new.upsert_message(cid, 1, "assistant", "yo", finish_reason="eos", stats={"a": 1})
        assert new.messages(cid)[1].stats == {"a": 1}


def test_failed_migration_rolls_back(tmp_path):
    path = tmp_path / "db.sqlite3"
    ConversationStore(path, target_version=1).close()

    def broken(conn):
        conn.execute("ALTER TABLE messages ADD COLUMN finish_reason TEXT")
        raise sqlite3.OperationalError("boom")

    good = MIGRATIONS[1]
    MIGRATIONS[1] = broken
    try:
        with pytest.raises(MoechatError, match="boom"):
            ConversationStore(path)
        conn = sqlite3.connect(path)
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
        conn.close()
    finally:
        MIGRATIONS[1] = good
    with ConversationStore(path) as s:  # the half-done step left nothing behind
        assert s.schema_version == SCHEMA_VERSION


def test_refuses_a_newer_schema(tmp_path):
    path = tmp_path / "db.sqlite3"
    ConversationStore(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(MoechatError, match="newer"):
        ConversationStore(path)


def test_not_a_database_is_a_clear_error(tmp_path):
    path = tmp_path / "db.sqlite3"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(MoechatError, match="cannot open the conversations database"):
        ConversationStore(path)


def test_conversations_crud_and_order(store):
    a = store.create_conversation("first", model="m", settings={"params": {"temperature": 0.5}})
    b = store.create_conversation("second")
    store.add_message(a, "user", "bump a")  # a becomes the most recent
    convs = store.list_conversations()
    assert [c.id for c in convs] == [a, b]
    assert convs[0].message_count == 1 and convs[0].settings["params"]["temperature"] == 0.5
    store.rename_conversation(b, "  renamed  ")
    assert store.get_conversation(b).title == "renamed"
    with pytest.raises(MoechatError):
        store.rename_conversation(b, "   ")
    store.update_settings(a, {"system_prompt": "terse"})
    assert store.get_conversation(a).settings == {"system_prompt": "terse"}
    store.delete_conversation(a)
    assert store.get_conversation(a) is None
    assert store._conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0  # cascade


def test_partial_reply_upsert_then_final(store):
    cid = store.create_conversation("c")
    user_seq = store.add_message(cid, "user", "question")
    store.upsert_message(cid, user_seq + 1, "assistant", "par", partial=True)
    store.upsert_message(cid, user_seq + 1, "assistant", "partial text", partial=True)
    msgs = store.messages(cid)
    assert [(m.role, m.content, m.partial) for m in msgs] == [
        ("user", "question", False),
        ("assistant", "partial text", True),
    ]
    store.upsert_message(cid, user_seq + 1, "assistant", "final", finish_reason="eos")
    last = store.messages(cid)[-1]
    assert (last.content, last.partial, last.finish_reason) == ("final", False, "eos")
    store.delete_messages_from(cid, user_seq + 1)
    assert len(store.messages(cid)) == 1
    with pytest.raises(MoechatError):
        store.add_message(cid, "tool", "x")


def test_data_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv(paths.ENV_DATA_DIR, str(tmp_path / "d"))
    assert paths.data_dir() == tmp_path / "d"
    assert paths.database_path() == tmp_path / "d" / paths.DB_FILENAME
    monkeypatch.delenv(paths.ENV_DATA_DIR)
    assert "moechat" in str(paths.data_dir())


def test_export_markdown_and_chatml_json(store, tmp_path):
    settings = {"params": {"temperature": 0.2}, "system_prompt": "Be ```terse```"}
    cid = store.create_conversation("My chat: MoE?", model="tiny", settings=settings)
    store.add_message(cid, "user", "hi <|im_start|>")
    store.add_message(cid, "assistant", "```py\nx = 1\n```", finish_reason="eos")
    store.add_message(cid, "user", "more")
    store.add_message(cid, "assistant", "cut", partial=True, finish_reason="cancelled")
    conv, msgs = store.get_conversation(cid), store.messages(cid)
    md = to_markdown(conv, msgs)
    assert md.startswith("# My chat: MoE?")
    assert "## User" in md and "## Assistant (stopped)" in md and "temperature=0.2" in md
    assert "````text\nBe ```terse```\n````" in md
    doc = json.loads(to_json(conv, msgs))
    assert doc["messages"] == [
        {"role": "system", "content": "Be ```terse```"},
        {"role": "user", "content": "hi <|im_start|>"},
        {"role": "assistant", "content": "```py\nx = 1\n```"},
        {"role": "user", "content": "more"},
        {"role": "assistant", "content": "cut"},
    ]
    out = export_conversation(conv, msgs, "md", tmp_path / "exports")
    assert out.name == f"my-chat-moe-{cid}.md" and out.read_text() == md
    out = export_conversation(conv, msgs, "json", tmp_path / "x" / "chat.json")
    assert out == tmp_path / "x" / "chat.json" and json.loads(out.read_text()) == doc
    assert not list((tmp_path / "x").glob("*.tmp"))
    with pytest.raises(MoechatError):
        export_conversation(conv, msgs, "pdf", tmp_path)


def test_migrates_a_version_2_database_and_stores_settings_per_reply(tmp_path):
    path = tmp_path / "v2.sqlite3"
    with ConversationStore(path, target_version=2) as old:
        cid = old.create_conversation("old", settings={"params": {"temperature": 0.5}})
        old._conn.execute(
            "INSERT INTO messages (conversation_id, seq, role, content, partial, finish_reason,"
            " stats, created_at) VALUES (?, 0, 'user', 'hi', 0, NULL, NULL, 0),"
            " (?, 1, 'assistant', 'old reply', 0, 'eos', NULL, 0)",
            (cid, cid),
        )
    with ConversationStore(path) as new:
        assert new.schema_version == SCHEMA_VERSION >= 3
        assert [m.settings for m in new.messages(cid)] == [None, None]
        made_with = {"params": {"temperature": 0.9, "top_p": 0.8}, "system_prompt": None}
        new.add_message(cid, "user", "again")
        new.add_message(cid, "assistant", "new reply", finish_reason="eos", settings=made_with)
        assert new.messages(cid)[3].settings == made_with
        new.upsert_message(cid, 3, "assistant", "restored")  # no settings: the row keeps them
        assert new.messages(cid)[3].settings == made_with
        conv, msgs = new.get_conversation(cid), new.messages(cid)
        md = to_markdown(conv, msgs)
        assert "- Sampling, reply 2: temperature=0.9, top_p=0.8" in md
        assert "- Sampling of 1 earlier reply not recorded; the chat's settings now: " in md
        assert json.loads(to_json(conv, msgs))["reply_settings"] == [None, made_with]


def test_export_header_lists_one_line_when_every_reply_agrees(store):
    cid = store.create_conversation("c", settings={"params": {"temperature": 0.1}})
    made_with = {"params": {"temperature": 0.7, "seed": None, "stop": []}}
    for text in ("a", "b"):
        store.add_message(cid, "user", text)
        store.add_message(cid, "assistant", text.upper(), settings=made_with)
    md = to_markdown(store.get_conversation(cid), store.messages(cid))
    assert "- Sampling (all 2 replies): temperature=0.7\n" in md
    assert "temperature=0.1" not in md  # the conversation's current settings are not the replies'
