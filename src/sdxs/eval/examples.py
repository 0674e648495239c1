"""Every prompt a user is shown must draw what it names: the example prompts of the README, the docs, the CLI help,
the Makefile and the web page, found in the files themselves and checked with the shipped model.

    python scripts/check_examples.py --data DATA          # writes docs/examples-check.md

Examples are found in code (`pipe("...")`, `sdxs generate "..."`, a request's `{"prompt": "..."}`, the Makefile's
and the page's defaults) and in the cells of a Markdown table's "example" column (the README's "what you can type"
table: `RED APPLE` / `apple, red`). A table's example is a claim that it works when its row gives it a rate of 50%
or more (its own part of the row: `A` / `B` against `90% / 40%`); below that the row shows a limitation (`gherkin`
for cucumber: 0%), and the check records what it draws without requiring a pass.

A prompt's target is the emoji whose name it asks for (`target_of`: the longest name whose words are all in the
prompt, in any order and any number, case and punctuation ignored; `None` for a prompt that names no emoji, which
fails). A prompt that ends in one of the model's style tags (`red apple, flat`) is scored among that style's
renders. Each prompt is generated with seeds 0-3 at the model's default step count and scored by the strict check
(`sdxs.eval.strict.score_images`: retrieval among every render at 32x32 on white); it passes when the target is
among the 5 nearest renders for at least 3 of the 4 seeds. `tests/test_doc_claims.py` checks that every example
found in the files today is in docs/examples-check.md and passed (a limitation: recorded), so a new example cannot
skip the check.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sdxs.data.captions import word_stem

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
    r'"prompt"\s*:\s*"([^"]+)"',  # a JSON request body (curl -d '{"prompt": "..."}' to the server)
)
# examples with a style (`pipe("red apple", style="twemoji")`, `sdxs generate "red apple" --style twemoji`): the
# prompt, then the style; such a prompt is checked against the renders of that style
STYLED_PATTERNS = (
    r'pipe\(\s*(?:prompt=)?"([^"]+)",\s*style="([^"]+)"',
    r'sdxs generate "([^"]+)" --style ([\w-]+)',
)
NOT_PROMPTS = {"x", "...", "X"}  # placeholders in argument-error examples
CLAIM = 50.0  # a table row's rate (top-5 %) from which its example is shown as working


@dataclass
class Example:
    source: str
    prompt: str
    style: str | None = None  # a style of the model (`__call__(style=...)`), or None: the prompt as it is
    limitation: bool = False  # shown as what the model does not do (a table row's rate under `CLAIM`)

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
        if name.endswith(".md"):
            for prompt, limitation in table_examples(text):
                key = (name, prompt, None)
                if key in found:  # shown both in code and in a table: a claim wherever it is one
                    found[key].limitation = found[key].limitation and limitation
                else:
                    found[key] = Example(name, prompt, limitation=limitation)
    return list(found.values())


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def table_examples(text: str) -> list[tuple[str, bool]]:
    """(prompt, limitation) of every backticked prompt in the "example" column of the Markdown tables in `text`.

    The row's rates (`NN%` in the cells after it) say what each example claims: the example cell and the rates split
    on " / " into as many parts pair up part by part (`A` / `B` with `90% / 40%`), else every example takes the row's
    best rate. A rate under `CLAIM` (or none) marks a limitation."""
    out: list[tuple[str, bool]] = []
    column = None
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not line.lstrip().startswith("|"):
            column = None
            continue
        cells = _cells(line)
        if column is None:
            heads = [c.lower() for c in cells]
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            if "example" in heads and re.fullmatch(r"\s*\|?[\s:|-]+\|?\s*", nxt):
                column = heads.index("example")
            else:
                column = -1  # a table without an example column: skipped to its end
            continue
        if column < 0 or column >= len(cells) or re.fullmatch(r"[\s:-]+", cells[column]):
            continue
        rest = " | ".join(cells[column + 1 :])
        parts = cells[column].split(" / ")
        rate_parts = [[float(x) for x in re.findall(r"(\d+(?:\.\d+)?)%", r)] for r in rest.split(" / ")]
        for j, part in enumerate(parts):
            if len(parts) == len(rate_parts) and rate_parts[j]:
                rates = rate_parts[j]
            else:
                rates = [x for r in rate_parts for x in r]
            limitation = not rates or max(rates) < CLAIM
            for m in re.finditer(r"`([^`]+)`", part):
                if prompt := _clean(m.group(1)):
                    out.append((prompt, limitation))
    return out


def target_of(prompt: str, names: Sequence[str]) -> str | None:
    """The emoji name a prompt asks for: the name with the most words all of which the prompt has, in any order and
    any inflection (`word_stem`: "apples" is "apple"; case, hyphens and punctuation ignored); ties go to the one
    the prompt contains as a phrase, then to the longer. `None`: no name is in the prompt.

    "three red apples" and "apple, red" ask for "red apple"; "grinning face, 3d render" for "grinning face"."""

    def words(s: str) -> list[str]:
        return re.findall(r"[a-z0-9]+", s.lower())

    def phrase(ws: list[str]) -> str:
        return " " + " ".join(ws) + " "

    have = words(prompt)
    stems = Counter(word_stem(w) for w in have)
    best, best_key = None, None
    for name in names:
        ws = words(name)
        need = Counter(word_stem(w) for w in ws)
        if not ws or any(stems[k] < n for k, n in need.items()):
            continue
        key = (len(ws), phrase(ws) in phrase(have), len(name))
        if best_key is None or key > best_key:
            best, best_key = name, key
    return best
