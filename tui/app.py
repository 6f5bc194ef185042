"""`edgeinfer chat`: a Textual chat app over the engine's token stream.

The engine runs in a worker thread; the UI sees it only through a Generation (text pieces, stats,
cancel). Pieces are gathered under a lock and drawn 20 times a second, so typing never stalls.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from pathlib import Path

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Footer, Input, Label, ListItem, ListView, Markdown, ProgressBar, Static, TextArea

from edgeinfer.engine import Engine, Generation
from edgeinfer.session import SessionOptions, close_session, open_session
from edgeinfer.storage.fetch import resolve_model

from .history import HistoryStore
from .settings import ChatSettings, SettingsScreen

FLUSH_HZ = 20


class PromptInput(TextArea):
    """Multi-line input: Enter sends, Ctrl+J (or Shift+Enter) adds a line, Up on the first line recalls."""

    class Submitted(Message):
        def __init__(self, text: str):
            super().__init__()
            self.text = text

    def __init__(self, **kwargs):
        super().__init__(soft_wrap=True, show_line_numbers=False, **kwargs)
        self.recall: list[str] = []
        self._recall_at: int | None = None

    async def _on_key(self, event) -> None:
        key = event.key
        if key == "enter":
            event.stop()
            event.prevent_default()
            if self.text.strip():
                self.post_message(self.Submitted(self.text))
                self.recall.append(self.text)
                self._recall_at = None
                self.clear()
            return
        if key in ("ctrl+j", "shift+enter"):
            event.stop()
            event.prevent_default()
            self.insert("\n")
            return
        if key == "up" and self.cursor_location[0] == 0 and self.recall:
            event.stop()
            event.prevent_default()
            self._recall_at = len(self.recall) - 1 if self._recall_at is None else max(0, self._recall_at - 1)
            self.load_text(self.recall[self._recall_at])
            return
        if key == "down" and self._recall_at is not None and self.cursor_location[0] == self.document.line_count - 1:
            event.stop()
            event.prevent_default()
            self._recall_at += 1
            self.load_text(self.recall[self._recall_at] if self._recall_at < len(self.recall) else "")
            if self._recall_at >= len(self.recall):
                self._recall_at = None
            return
        await super()._on_key(event)


class _NoticeHandler(logging.Handler):
    """Log records (the cluster's events) to a function, as "cluster: ..." lines."""

    def __init__(self, notice):
        super().__init__(logging.INFO)
        self.notice = notice

    def emit(self, record: logging.LogRecord) -> None:
        self.notice(f"cluster: {record.getMessage()}")


class ChatMessage(Markdown):
    def __init__(self, role: str, content: str = ""):
        super().__init__(content, classes=role)
        self.role = role
        self.border_title = {"user": "you", "assistant": "assistant"}.get(role, role)


class RenameScreen(ModalScreen[str | None]):
    DEFAULT_CSS = """
    RenameScreen { align: center middle; }
    RenameScreen > Vertical { width: 60; height: auto; border: thick $primary; background: $surface; padding: 1; }
    """
    BINDINGS = [("escape", "cancel", "Cancel")]

    def __init__(self, title: str):
        super().__init__()
        self.initial = title

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("Rename conversation (Enter to save, Esc to cancel)")
            yield Input(self.initial, id="title")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)

    def action_cancel(self) -> None:
        self.dismiss(None)


class ChatApp(App):
    TITLE = "edgeinfer chat"
    CSS = """
    #sidebar { width: 30; border-right: solid $primary-background; }
    #sidebar > Label { padding: 0 1; text-style: bold; }
    #messages { height: 1fr; padding: 0 1; }
    ChatMessage { margin: 1 0 0 0; padding: 0 1; border: round $primary; }
    ChatMessage.user { border: round $accent; }
    #prompt { height: auto; min-height: 3; max-height: 10; }
    #loading { height: auto; padding: 0 1; }
    #loading.-hidden { display: none; }
    #status { height: 1; background: $primary-background; padding: 0 1; }
    """
    BINDINGS = [
        Binding("escape", "stop", "Stop", priority=True),
        Binding("ctrl+n", "new_chat", "New"),
        Binding("f2", "rename", "Rename"),
        Binding("ctrl+g", "regenerate", "Regenerate"),
        Binding("ctrl+s", "settings", "Settings"),
        # Function keys: the input's text area already uses Ctrl+E, Ctrl+D and Ctrl+Y.
        Binding("f3", "copy_reply", "Copy reply"),
        Binding("f4", "export", "Export"),
        Binding("f8", "delete_chat", "Delete"),
    ]

    def __init__(self, options: SessionOptions, history_path: str | os.PathLike | None = None,
                 export_dir: str | os.PathLike | None = None):
        """options: the model and how to run it (session.py), the master of a cluster too."""
        super().__init__()
        self.options = options
        self.cluster = options.cluster
        self.join_line = ""
        self.cluster_events: list[str] = []
        self.history = HistoryStore(history_path)
        self.export_dir = Path(export_dir or os.getcwd())
        self.engine: Engine | None = None
        self.model_name = options.model or "default model"
        self.conversation_id: int | None = None
        self.settings = ChatSettings(context=options.context)
        self._log_handler = _NoticeHandler(self._cluster_event)
        self.generation: Generation | None = None
        self.last_reply: Generation | None = None
        self.tokens_at_cancel: int | None = None
        self._lock = threading.Lock()
        self._pending = ""
        self._reply: ChatMessage | None = None

    def compose(self) -> ComposeResult:
        with Horizontal():
            with Vertical(id="sidebar"):
                yield Label("Conversations")
                yield ListView(id="conversations")
            with Vertical():
                yield Vertical(Label("loading model", id="loading-label", markup=False), ProgressBar(id="loading-bar"),
                               id="loading")
                yield VerticalScroll(id="messages")
                yield PromptInput(id="prompt")
        yield Static("", id="status", markup=False)
        yield Footer()

    async def on_mount(self) -> None:
        # The main screen's widgets, reachable while a modal screen is on top.
        self._status = self.query_one("#status", Static)
        self._loading_label = self.query_one("#loading-label", Label)
        self._loading_bar = self.query_one("#loading-bar", ProgressBar)
        self._messages_view = self.query_one("#messages", VerticalScroll)
        self._sidebar = self.query_one("#conversations", ListView)
        self._prompt = self.query_one(PromptInput)
        await self._refresh_sidebar()
        self.set_interval(1 / FLUSH_HZ, self._flush_reply)
        self.set_interval(1.0, self._refresh_status)
        self._prompt.focus()
        if self.cluster is not None:
            logger = logging.getLogger("edgeinfer.cluster")
            logger.addHandler(self._log_handler)
            logger.setLevel(logging.INFO)
        self.load_engine()

    # --- model loading ------------------------------------------------------------------------

    @work(thread=True, group="load")
    def load_engine(self) -> None:
        def progress(stage: str, done: int, total: int) -> None:
            self.call_from_thread(self._show_progress, stage, done, total)

        def report(line: str) -> None:
            if "join with:" in line:  # a cluster's join command stays in the status line
                self.join_line = line.split("join with: ", 1)[1]
            self.call_from_thread(self._show_progress, line, 0, None)

        try:
            path = resolve_model(self.options.model, progress)
            self.call_from_thread(self._show_progress, "loading weights", 0, None)
            engine = open_session(dataclasses.replace(self.options, model=path), report)
        except Exception as exc:  # anything that stops loading is shown, never a traceback
            self.call_from_thread(self._fail, "cannot load the model", exc)
            return
        self.call_from_thread(self._engine_ready, engine, path)

    def _cluster_event(self, line: str) -> None:
        """A cluster event as a notification (the last 200 kept, beyond the toasts)."""
        self.cluster_events = [*self.cluster_events[-199:], line]
        if threading.current_thread() is threading.main_thread():
            self.notify(line, timeout=8, markup=False)
        else:
            self.call_from_thread(self.notify, line, timeout=8, markup=False)

    def close_session(self) -> None:
        """Say bye to a cluster's workers (after the app has ended)."""
        logging.getLogger("edgeinfer.cluster").removeHandler(self._log_handler)
        close_session(self.engine)

    def _show_progress(self, stage: str, done: int, total: int | None) -> None:
        self._loading_label.update(stage)
        self._loading_bar.update(total=total, progress=done)

    def _engine_ready(self, engine: Engine, path: str) -> None:
        self.engine = engine
        self.model_name = Path(path).stem
        self._loading_label.parent.add_class("-hidden")
        self._refresh_status()

    def _fail(self, what: str, exc: BaseException) -> None:
        message = str(exc) or type(exc).__name__
        if isinstance(exc, MemoryError):
            message = "out of memory"
        self.notify(f"{what}: {message}", severity="error", timeout=10, markup=False)
        self._loading_label.update(f"{what}: {message}")

    # --- conversations --------------------------------------------------------------------------

    async def _refresh_sidebar(self) -> None:
        view = self._sidebar
        await view.clear()
        items = [ListItem(Label(title, markup=False), id=f"conv-{cid}")  # titles are user text, not markup
                 for cid, title in self.history.conversations()]
        await view.extend(items)
        ids = [cid for cid, _ in self.history.conversations()]
        if self.conversation_id in ids:
            view.index = ids.index(self.conversation_id)

    async def on_list_view_selected(self, event: ListView.Selected) -> None:
        if event.item.id and not self.generation:
            await self.open_conversation(int(event.item.id.removeprefix("conv-")))

    async def open_conversation(self, conv_id: int | None) -> None:
        self.conversation_id = conv_id
        messages_view = self._messages_view
        await messages_view.remove_children()
        prompt = self._prompt
        if conv_id is None:
            self.settings = ChatSettings(context=self.options.context)
            return
        conv = self.history.get(conv_id)
        self.settings = ChatSettings.from_dict(conv.settings)
        await messages_view.mount_all([ChatMessage(m["role"], m["content"]) for m in conv.messages])
        prompt.recall = [m["content"] for m in conv.messages if m["role"] == "user"]
        messages_view.scroll_end(animate=False)

    def _messages(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.settings.system_prompt}] if self.settings.system_prompt else []
        return system + (self.history.get(self.conversation_id).messages if self.conversation_id else [])

    # --- generation -----------------------------------------------------------------------------

    async def on_prompt_input_submitted(self, event: PromptInput.Submitted) -> None:
        if self.engine is None:
            self.notify("the model is still loading", severity="warning")
            return
        if self.generation is not None:
            self.notify("a reply is still streaming: Esc stops it", severity="warning")
            return
        if self.conversation_id is None:
            title = " ".join(event.text.split())[:40]
            self.conversation_id = self.history.create(title, self.model_name, self.settings.to_dict())
            await self._refresh_sidebar()
        self.history.add_message(self.conversation_id, "user", event.text)
        await self._messages_view.mount(ChatMessage("user", event.text))
        await self._start_reply()

    async def _start_reply(self) -> None:
        self._reply = ChatMessage("assistant")
        await self._messages_view.mount(self._reply)
        self._messages_view.anchor()  # follow the bottom unless the user scrolls up
        self.tokens_at_cancel = None
        self.run_generation(self._messages(), self.settings)

    @work(thread=True, exclusive=True, group="generate")
    def run_generation(self, messages: list[dict[str, str]], settings: ChatSettings) -> None:
        gen = None
        try:
            engine = self._engine_for(settings)
            ids = engine.chat_ids(messages)
            gen = engine.generate(ids, settings.sampling(), settings.max_tokens)
            self.generation = gen
            for piece in gen:
                with self._lock:
                    self._pending += piece
        except Exception as exc:  # shown in the app, never a traceback
            self.call_from_thread(self.notify, f"generation failed: {exc or type(exc).__name__}",
                                  severity="error", timeout=10, markup=False)
        finally:
            self.call_from_thread(self._reply_done, gen)

    def _engine_for(self, settings: ChatSettings) -> Engine:
        """The engine, rebuilt around the same weights when the context size changes."""
        engine = self.engine
        assert engine is not None
        if settings.context and settings.context != engine.context and self.cluster is not None:
            # every worker sized its KV cache shard for the context the cluster started with
            self.call_from_thread(self.notify, f"a cluster keeps its context of {engine.context} tokens",
                                  markup=False)
        elif settings.context and settings.context != engine.context:
            engine = self.engine = Engine(engine.model, engine.tokenizer, settings.context)
        return engine

    async def _flush_reply(self) -> None:
        with self._lock:
            chunk, self._pending = self._pending, ""
        if chunk and self._reply is not None:
            await self._reply.append(chunk)

    async def _reply_done(self, gen: Generation | None) -> None:
        await self._flush_reply()
        self.generation = None
        if gen is not None:
            self.last_reply = gen
            if self.conversation_id is not None:  # what was generated is kept, even when stopped
                self.history.add_message(self.conversation_id, "assistant", gen.text)
        elif self._reply is not None:
            await self._reply.remove()
        self._reply = None
        self._refresh_status()

    def action_stop(self) -> None:
        gen = self.generation
        if gen is not None:
            self.tokens_at_cancel = len(gen.token_ids)
            gen.cancel()

    # --- other actions --------------------------------------------------------------------------

    async def action_new_chat(self) -> None:
        if self.generation is None:
            await self.open_conversation(None)
            await self._refresh_sidebar()

    def action_rename(self) -> None:
        if self.conversation_id is None:
            return
        cid = self.conversation_id

        async def done(title: str | None) -> None:
            if title:
                self.history.rename(cid, title)
                await self._refresh_sidebar()

        self.push_screen(RenameScreen(self.history.get(cid).title), done)

    async def action_delete_chat(self) -> None:
        if self.conversation_id is None or self.generation is not None:
            return
        self.history.delete(self.conversation_id)
        remaining = self.history.conversations()
        await self.open_conversation(remaining[0][0] if remaining else None)
        await self._refresh_sidebar()

    def action_export(self) -> None:
        if self.conversation_id is None:
            return
        target = self.export_dir / f"conversation-{self.conversation_id}.md"
        tmp = target.with_suffix(".md.tmp")
        tmp.write_text(self.history.export_markdown(self.conversation_id), encoding="utf-8")
        os.replace(tmp, target)
        self.notify(f"exported to {target}", markup=False)

    async def action_regenerate(self) -> None:
        if self.engine is None or self.generation is not None or self.conversation_id is None:
            return
        messages = self.history.get(self.conversation_id).messages
        if not messages or messages[-1]["role"] != "assistant":
            return
        self.history.drop_last_message(self.conversation_id)
        replies = self._messages_view.query(ChatMessage)
        if replies:
            await replies.last().remove()
        await self._start_reply()

    def action_copy_reply(self) -> None:
        messages = self.history.get(self.conversation_id).messages if self.conversation_id else []
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        if replies:
            self.copy_to_clipboard(replies[-1])
            self.notify("reply copied")

    def action_settings(self) -> None:
        def done(settings: ChatSettings | None) -> None:
            if settings is not None:
                self.settings = settings
                if self.conversation_id is not None:
                    self.history.set_settings(self.conversation_id, settings.to_dict())

        self.push_screen(SettingsScreen(self.settings), done)

    # --- status ---------------------------------------------------------------------------------

    def _refresh_status(self) -> None:
        parts = [self.model_name]
        if self.engine is not None:
            parts.append(self.engine.model.precision)
            if self.cluster is not None:
                parts.append(f"cluster of {len(self.engine.model.master.workers) + 1} · join: {self.join_line}")
            s = self.last_reply.stats if self.last_reply else None
            if s is not None:
                parts.append(f"prefill {s.prefill_tok_s:.0f} tok/s · decode {s.decode_tok_s:.1f} tok/s")
            parts.append(f"ctx {self.engine.cache.length}/{self.engine.context}")
        parts.append(f"RAM {_rss_mb():.0f} MB")
        if self.generation is not None:
            parts.append("streaming…")
        self._status.update(" · ".join(parts))


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
