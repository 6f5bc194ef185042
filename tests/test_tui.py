"""The chat app, driven by Textual's pilot against the real engine on a tiny random model."""

from __future__ import annotations

import asyncio
import contextlib
import time

from edgeinfer.tui.app import ChatApp, ChatMessage
from edgeinfer.tui.history import HistoryStore
from edgeinfer.tui.settings import SettingsScreen

from edgeinfer.session import SessionOptions

SIZE = (110, 32)


async def until(pilot, condition, timeout: float = 60.0) -> None:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, "timed out waiting for the app"
        await pilot.pause(0.02)


@contextlib.asynccontextmanager
async def running(model, context=None, **kwargs):
    """The app on `model`, under the pilot, once the model has loaded."""
    app = ChatApp(SessionOptions(str(model), context), **kwargs)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.engine is not None)
        yield app, pilot


async def send(pilot, app: ChatApp, text: str) -> None:
    await pilot.click("#prompt")
    await pilot.press(*text, "enter")


async def reply_done(pilot, app: ChatApp, previous=None) -> None:
    await until(pilot, lambda: app.generation is None and app.last_reply is not previous)
    await pilot.pause(0.1)


def run(scenario) -> None:
    asyncio.run(scenario())


def test_send_a_message_and_see_the_reply_stream_in(endless_single, tmp_path):
    async def scenario():
        async with running(endless_single, context=8192, history_path=tmp_path / "h.sqlite3") as (app, pilot):
            await send(pilot, app, "hello there")
            await until(pilot, lambda: app.generation is not None)
            seen_while_streaming = []
            while app.generation is not None:
                if app._reply is not None and app._reply.source:
                    seen_while_streaming.append(len(app._reply.source))
                await pilot.pause(0.05)
            await reply_done(pilot, app)
            shown = list(app.query(ChatMessage))
            assert [m.role for m in shown] == ["user", "assistant"]
            assert shown[1].source == app.last_reply.text and app.last_reply.text
            assert seen_while_streaming and seen_while_streaming[0] < len(app.last_reply.text)
            stored = app.history.get(app.conversation_id).messages
            assert stored == [{"role": "user", "content": "hello there"},
                              {"role": "assistant", "content": app.last_reply.text}]
    run(scenario)


def test_escape_stops_a_long_reply_within_a_few_tokens(endless_single, tmp_path):
    async def scenario():
        async with running(endless_single, context=8192, history_path=tmp_path / "h.sqlite3") as (app, pilot):
            await send(pilot, app, "tell me everything")
            await until(pilot, lambda: app.generation is not None and len(app.generation.token_ids) >= 20)
            await pilot.press("escape")
            await reply_done(pilot, app)
            gen = app.last_reply
            assert gen.stats.finish_reason == "cancelled"
            assert app.tokens_at_cancel is not None and len(gen.token_ids) - app.tokens_at_cancel <= 3
            assert len(gen.token_ids) < 8000
            assert app.history.get(app.conversation_id).messages[-1]["content"] == gen.text  # kept
    run(scenario)


def test_history_survives_a_restart(tiny_single, tmp_path):
    db = tmp_path / "h.sqlite3"

    async def first():
        async with running(tiny_single, history_path=db) as (app, pilot):
            await send(pilot, app, "remember me")
            await reply_done(pilot, app)
            return app.conversation_id, app.last_reply.text

    conv_id, reply = asyncio.run(first())

    async def second():
        async with running(tiny_single, history_path=db) as (app, pilot):
            await pilot.click(f"#conv-{conv_id}")
            await until(pilot, lambda: len(app.query(ChatMessage)) == 2)
            assert [m.source for m in app.query(ChatMessage)] == ["remember me", reply]
            assert app.conversation_id == conv_id
    run(second)


def test_settings_change_what_the_engine_receives(tiny_single, tmp_path):
    async def scenario():
        async with running(tiny_single, history_path=tmp_path / "h.sqlite3") as (app, pilot):
            await pilot.press("ctrl+s")
            await until(pilot, lambda: isinstance(app.screen, SettingsScreen))
            app.screen.query_one("#temperature").value = "0"
            app.screen.query_one("#max_tokens").value = "3"
            app.screen.query_one("#system_prompt").value = "Be brief."
            await pilot.click("#save")
            await until(pilot, lambda: not isinstance(app.screen, SettingsScreen))
            await send(pilot, app, "count")
            await reply_done(pilot, app)
            first = app.last_reply
            assert first.stats.generated_tokens == 3 and first.stats.finish_reason == "length"
            stored = app.history.get(app.conversation_id).settings
            assert stored["max_tokens"] == 3 and stored["temperature"] == 0.0
            # Greedy now: regenerating gives the same reply, and the system prompt reached the template.
            await pilot.press("ctrl+g")
            await reply_done(pilot, app, previous=first)
            assert app.last_reply.token_ids == first.token_ids
            prompt_text = app.engine.tokenizer.decode(app.engine.cached_tokens, skip_special=False)
            assert "Be brief." in prompt_text
            assert [m["role"] for m in app.history.get(app.conversation_id).messages] == ["user", "assistant"]
    run(scenario)


def test_status_bar_shows_speed_and_context_after_a_reply(tiny_single, tmp_path):
    async def scenario():
        async with running(tiny_single, history_path=tmp_path / "h.sqlite3") as (app, pilot):
            await send(pilot, app, "hi")
            await reply_done(pilot, app)
            status = str(app.query_one("#status").render())
            s = app.last_reply.stats
            assert f"decode {s.decode_tok_s:.1f} tok/s" in status and "prefill" in status
            assert f"ctx {app.engine.cache.length}/{app.engine.context}" in status and "RAM" in status
    run(scenario)


def test_rename_export_delete(tiny_single, tmp_path):
    async def scenario():
        async with running(tiny_single, history_path=tmp_path / "h.sqlite3", export_dir=tmp_path) as (app, pilot):
            await send(pilot, app, "first chat")
            await reply_done(pilot, app)
            conv = app.conversation_id
            await pilot.press("f2")
            await until(pilot, lambda: app.screen.query("#title"))
            app.screen.query_one("#title").value = "Renamed"
            await pilot.press("enter")
            await until(pilot, lambda: app.history.get(conv).title == "Renamed")
            await pilot.press("f4")
            exported = (tmp_path / f"conversation-{conv}.md").read_bytes().decode()  # exact, no newline translation
            assert exported.startswith("# Renamed") and "first chat" in exported and app.last_reply.text in exported
            await pilot.press("f8")
            await until(pilot, lambda: app.history.conversations() == [])
            assert app.conversation_id is None and not app.query(ChatMessage)
    run(scenario)


def test_a_model_that_fails_to_load_is_a_notification(tmp_path):
    async def scenario():
        # A path that is also broken Rich markup: error text is shown as text.
        app = ChatApp(SessionOptions(str(tmp_path / "[/bold]missing.gguf")), history_path=tmp_path / "h.sqlite3")
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: "cannot load" in str(app.query_one("#loading-label").render()))
            assert "model not found" in str(app.query_one("#loading-label").render())
            assert any("model not found" in n.message for n in app._notifications)
            await send(pilot, app, "hello")  # no engine: a warning, the app stays up
            await pilot.pause(0.1)
            assert app.engine is None and app.is_running
    run(scenario)


def test_history_store_round_trip(tmp_path):
    store = HistoryStore(tmp_path / "h.sqlite3")
    cid = store.create("t", "m", {"temperature": 0.5})
    store.add_message(cid, "user", "a")
    store.add_message(cid, "assistant", "b")
    store.drop_last_message(cid)
    store.close()
    again = HistoryStore(tmp_path / "h.sqlite3")
    conv = again.get(cid)
    assert (conv.title, conv.model, conv.settings, conv.messages) == ("t", "m", {"temperature": 0.5},
                                                                      [{"role": "user", "content": "a"}])


def test_multiline_input_recall_and_copy(tiny_single, tmp_path):
    async def scenario():
        async with running(tiny_single, history_path=tmp_path / "h.sqlite3") as (app, pilot):
            await pilot.click("#prompt")
            await pilot.press(*"[bold]line one[/", "ctrl+j", *"line two", "enter")
            await reply_done(pilot, app)
            messages = app.history.get(app.conversation_id).messages
            assert messages[0] == {"role": "user", "content": "[bold]line one[/\nline two"}
            assert str(app.query_one(f"#conv-{app.conversation_id} Label").render()) == "[bold]line one[/ line two"
            prompt = app.query_one("#prompt")
            assert prompt.text == ""
            await pilot.press("up")
            assert prompt.text == "[bold]line one[/\nline two"
            await pilot.press("f3")
            assert app.clipboard == messages[1]["content"]
    run(scenario)


def test_a_line_on_stderr_while_the_app_runs_does_not_break_it(tiny_single, tmp_path):
    """Textual captures stderr while it runs and flushes it through App._flush: a method of that name
    in the app broke every flushed print (a library warning, a cluster log line)."""
    import sys

    async def scenario():
        async with running(tiny_single, history_path=tmp_path / "h.sqlite3") as (app, pilot):
            print("a warning from some library", file=sys.stderr, flush=True)
            await send(pilot, app, "hi")
            await reply_done(pilot, app)
            assert app.last_reply.stats.finish_reason in ("stop", "length", "context")  # ran to its end
            assert app.history.get(app.conversation_id).messages[-1] == {"role": "assistant",
                                                                         "content": app.last_reply.text}
    run(scenario)
