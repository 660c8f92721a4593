"""Markdown to one self-contained HTML page: every local image is inlined as a base64 data URI.

Uses markdown-it-py (already installed with rich) with tables on and raw HTML off, so the page
has no scripts and loads nothing from anywhere: it can be mailed or archived as one file.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from tleg_deploy.errors import TlegError

_MIME = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
_IMG_SRC = re.compile(r'(<img\b[^>]*?\bsrc=")([^"]+)(")')

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #1b1b1b; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { border-bottom: 1px solid #eee; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: .3em .6em; }
th { background: #f4f4f4; }
img { max-width: 100%; height: auto; display: block; margin: 1em 0; }
code { background: #f4f4f4; padding: 0 .25em; border-radius: 3px; font-size: 0.92em; }
blockquote { border-left: 4px solid #e0a000; margin: 1em 0; padding: .2em 1em; background: #fff8e6; }
"""


def inline_images(body: str, base_dir: Path) -> str:
    """Replace each ``<img src="relative/path">`` with a data URI of that file."""

    def repl(m: re.Match[str]) -> str:
        src = html.unescape(m.group(2))
        if src.startswith("data:"):
            return m.group(0)
        path = (base_dir / src).resolve()
        mime = _MIME.get(path.suffix.lower())
        if mime is None or not path.is_file():
            raise TlegError(f"the report links {src!r}, which is not a local image file",
                            hint="this is a bug in the report builder; please report it")
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f"{m.group(1)}data:{mime};base64,{data}{m.group(3)}"

    return _IMG_SRC.sub(repl, body)


def markdown_to_html(text: str, *, base_dir: Path, title: str) -> str:
    """A complete HTML document for ``text``, images under ``base_dir`` inlined."""
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    body = inline_images(md.render(text), base_dir)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n{body}</body>\n</html>\n")
