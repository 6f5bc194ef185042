"""Per-conversation chat settings and the screen that edits them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from textual.app import ComposeResult
from textual.containers import Grid, Horizontal, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label

from edgeinfer.sampling import SamplingParams

_DEFAULTS = SamplingParams()


@dataclass(frozen=True)
class ChatSettings:
    system_prompt: str = ""
    temperature: float = _DEFAULTS.temperature
    top_k: int = _DEFAULTS.top_k
    top_p: float = _DEFAULTS.top_p
    min_p: float = _DEFAULTS.min_p
    repeat_penalty: float = _DEFAULTS.repeat_penalty
    max_tokens: int = -1  # -1: until end of generation or a full context
    seed: int | None = None
    context: int | None = None  # None: the model's, at most the engine's default

    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                              repeat_penalty=self.repeat_penalty, seed=self.seed)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ChatSettings":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# field -> (label, parser); an empty box means None where None is allowed.
_FIELDS = {
    "system_prompt": ("System prompt", str),
    "temperature": ("Temperature (0 = greedy)", float),
    "top_k": ("Top-k (0 = off)", int),
    "top_p": ("Top-p (1 = off)", float),
    "min_p": ("Min-p (0 = off)", float),
    "repeat_penalty": ("Repetition penalty (1 = off)", float),
    "max_tokens": ("Max tokens (-1 = no limit)", int),
    "seed": ("Seed (empty = random)", int),
    "context": ("Context size (empty = model's)", int),
}


class SettingsScreen(ModalScreen[ChatSettings | None]):
    """Edit the settings; dismisses with the new settings, or None when cancelled."""

    DEFAULT_CSS = """
    SettingsScreen { align: center middle; }
    SettingsScreen > VerticalScroll { width: 70; height: auto; max-height: 90%; border: thick $primary;
                                      background: $surface; padding: 1 2; }
    SettingsScreen Grid { grid-size: 2; grid-columns: 30 1fr; grid-rows: 1; grid-gutter: 1 0; height: auto; }
    SettingsScreen #buttons { height: 3; align-horizontal: right; }
    SettingsScreen #error { color: $error; padding: 0; }
    """
    BINDINGS = [("escape", "cancel", "Cancel"), ("ctrl+s", "save", "Save")]

    def __init__(self, settings: ChatSettings):
        super().__init__()
        self.settings = settings

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            with Grid():
                for name, (label, _) in _FIELDS.items():
                    value = getattr(self.settings, name)
                    yield Label(label)
                    yield Input("" if value is None else str(value), id=name, compact=True)
            yield Label("", id="error")
            with Horizontal(id="buttons"):
                yield Button("Save", variant="primary", id="save")
                yield Button("Cancel", id="cancel")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "cancel":
            self.dismiss(None)
        else:
            self.action_save()

    def action_save(self) -> None:
        values: dict[str, Any] = {}
        for name, (label, parse) in _FIELDS.items():
            text = self.query_one(f"#{name}", Input).value.strip()
            optional = name in ("seed", "context")
            try:
                values[name] = None if optional and not text else parse(text)
            except ValueError:
                self.query_one("#error", Label).update(f"{label}: {text!r} is not a valid value")
                return
        self.dismiss(ChatSettings(**values))

    def action_cancel(self) -> None:
        self.dismiss(None)
