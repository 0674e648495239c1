"""Every prompt a user is shown must draw what it names: the example prompts of the README, the docs, the CLI help,
the Makefile and the web page, found in the files themselves and checked with the shipped model.

    python scripts/check_examples.py --data DATA          # writes docs/examples-check.md

A prompt's target is the emoji whose name it contains (the longest such name; `None` for a prompt that names no
emoji, which fails). Each prompt is generated with seeds 0-3 at the model's default step count and scored by the
strict check (`sdxs.eval.strict.score_images`: retrieval among every render at 32x32 on white); it passes when the
target is among the 5 nearest renders for at least 3 of the 4 seeds. `tests/test_doc_claims.py` checks that every
example found in the files today is in docs/examples-check.md and passed, so a new example cannot skip the check.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# Where users read example prompts, relative to the repository root (docs/eval.md, docs/benchmarks.md and the
# experiments log are records of measured prompts and commands, not examples to copy)
SOURCES = (
    "README.md",
    "Makefile",
    "docs/cli.md",
    "docs/pipeline.md",
    "docs/server.md",
    "docs/training-lora.md",
    "src/sdxs/cli.py",
    "src/sdxs/cli_parsers.py",
    "src/sdxs/pipeline.py",
    "src/sdxs/server/static/index.html",
)
PATTERNS = (
    r'pipe\(\s*(?:prompt=)?"([^"]+)"',  # pipe("...") / pipe(prompt="...")
    r'sdxs generate "([^"]+)"',
    r'PROMPT="([^"]+)"',
    r"^PROMPT \?= (.+)$",  # the Makefile's default
    r'id="prompt"[^>]*?placeholder="([^"]+)"',  # the page's prompt box
)
# examples with a style (`pipe("red apple", style="twemoji")`, `sdxs generate "red apple" --style twemoji`): the
# prompt, then the style; such a prompt is checked against the renders of that style
STYLED_PATTERNS = (
    r'pipe\(\s*(?:prompt=)?"([^"]+)",\s*style="([^"]+)"',
    r'sdxs generate "([^"]+)" --style ([\w-]+)',
)
NOT_PROMPTS = {"x", "...", "X"}  # placeholders in argument-error examples


@dataclass
class Example:
    source: str
    prompt: str
    style: str | None = None  # a style of the model (`__call__(style=...)`), or None: the prompt as it is

    @property
    def key(self) -> str:
        """How docs/examples-check.md names it: the prompt, and its style when it has one."""
        return self.prompt if self.style is None else f"{self.prompt} (style {self.style})"


def _clean(text: str) -> str | None:
    prompt = " ".join(text.split())  # a prompt wrapped over two lines of a paragraph
    return prompt if prompt and prompt not in NOT_PROMPTS and not re.search(r"[{$]", prompt) else None


def find_examples(root: str | Path) -> list[Example]:
    """Every example prompt in `SOURCES`, each (source, prompt, style) once, in file order."""
    root = Path(root)
    found: dict[tuple[str, str, str | None], Example] = {}
    for name in SOURCES:
        path = root / name
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        styled_at = set()  # where a styled example's prompt starts: not also an example without the style
        for pattern in STYLED_PATTERNS:
            for m in re.finditer(pattern, text, re.M):
                styled_at.add(m.start(1))
                if prompt := _clean(m.group(1)):
                    found.setdefault((name, prompt, m.group(2)), Example(name, prompt, m.group(2)))
        for pattern in PATTERNS:
            for m in re.finditer(pattern, text, re.M):
                if m.start(1) not in styled_at and (prompt := _clean(m.group(1))):
                    found.setdefault((name, prompt, None), Example(name, prompt))
    return list(found.values())


def target_of(prompt: str, names: Sequence[str]) -> str | None:
    """The emoji name a prompt asks for: the longest name it contains as whole words (case and hyphens ignored)."""

    def norm(s: str) -> str:
        return " " + re.sub(r"[^a-z0-9]+", " ", s.lower()).strip() + " "

    text = norm(prompt)
    hits = [n for n in names if norm(n) in text]
    return max(hits, key=len) if hits else None
