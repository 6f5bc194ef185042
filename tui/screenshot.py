"""Save an SVG screenshot of the app answering a question: python -m edgeinfer.tui.screenshot OUT.svg"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile

from edgeinfer.session import SessionOptions

from .app import ChatApp


async def screenshot(out: str, model: str | None, question: str, size: tuple[int, int]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        app = ChatApp(SessionOptions(model), history_path=os.path.join(tmp, "history.sqlite3"))
        async with app.run_test(size=size) as pilot:
            while app.engine is None:
                await pilot.pause(0.1)
            await pilot.click("#prompt")
            await pilot.press(*question, "enter")
            while app.generation is not None or app.last_reply is None:
                await pilot.pause(0.1)
            await pilot.pause(0.5)
            folder, name = os.path.split(os.path.abspath(out))
            app.save_screenshot(name, folder)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out")
    p.add_argument("--model")
    p.add_argument("--question", default="What is the capital of France?")
    args = p.parse_args()
    asyncio.run(screenshot(args.out, args.model, args.question, (110, 30)))


if __name__ == "__main__":
    main()
