"""Reads the fenced code blocks of README.md and docs/*.md (see test_docs.py for the conventions)."""

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# The attributes a ```python block may carry after the language.
ATTRIBUTES = {"signature", "gpu", "aoti"}

_FENCE = re.compile(r"^(`{3,})(.*)$")


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    language: str
    attributes: Tuple[str, ...]
    source: str
    output: Optional[str] = None  # the text block that follows, for a runnable block
    output_line: Optional[int] = None

    @property
    def runnable(self) -> bool:
        return self.language == "python" and "signature" not in self.attributes

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


@dataclass
class Document:
    path: Path
    blocks: List[Block] = field(default_factory=list)
    text: str = ""  # the prose: everything outside fenced blocks

    @property
    def runnable(self) -> List[Block]:
        return [b for b in self.blocks if b.runnable]


def parse(path: Path) -> Document:
    """The fenced blocks of a Markdown file, with each runnable block's quoted output attached."""
    return parse_text(path.read_text(encoding="utf-8"), path)


def parse_text(text: str, path: Path = ROOT / "<text>") -> Document:
    lines = text.splitlines()
    doc = Document(path)
    prose: List[str] = []
    i = 0
    previous: Optional[Block] = None  # the last block, while only blank lines followed it
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            prose.append(lines[i])
            if lines[i].strip():
                previous = None
            i += 1
            continue
        ticks, info = m.group(1), m.group(2).split()
        start = i
        i += 1
        body = []
        while i < len(lines) and lines[i].rstrip() != ticks:
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise ValueError(f"{path}:{start + 1}: unclosed code block")
        i += 1
        language = info[0] if info else ""
        block = Block(path, start + 1, language, tuple(info[1:]), "\n".join(body) + "\n")
        if language == "text" and previous is not None and previous.runnable and previous.output is None:
            previous.output, previous.output_line = block.source, block.line
            previous = None
            continue
        doc.blocks.append(block)
        previous = block
    doc.text = "\n".join(prose)
    return doc


# ----------------------------------------------------------------------------- quoted output

_NUMBER = r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?"
_TOKEN = re.compile(rf"(\.\.\.)|({_NUMBER})")


def _pattern(expected: str) -> Tuple["re.Pattern[str]", List[str]]:
    """A regex matching ``expected`` with its numbers captured and ``...`` matching anything."""
    parts, numbers, pos = [], [], 0
    for m in _TOKEN.finditer(expected):
        parts.append(re.escape(expected[pos : m.start()]))
        if m.group(1):
            parts.append(".*?")
        else:
            parts.append(f"({_NUMBER})")
            numbers.append(m.group(2))
        pos = m.end()
    parts.append(re.escape(expected[pos:]))
    return re.compile("".join(parts), re.DOTALL), numbers


def _normalise(text: str) -> str:
    return " ".join(text.split())


def numbers_agree(expected: str, actual: str) -> bool:
    """Integers exactly; other numbers to 1 % or 1e-6 (last-digit rounding, float noise)."""
    if re.fullmatch(r"[-+]?\d+", expected):
        return re.fullmatch(r"[-+]?\d+", actual) is not None and int(expected) == int(actual)
    return math.isclose(float(expected), float(actual), rel_tol=1e-2, abs_tol=1e-6)


def output_mismatch(expected: str, actual: str) -> Optional[str]:
    """None when ``actual`` is what ``expected`` quotes, else why not."""
    expected, actual = _normalise(expected), _normalise(actual)
    pattern, numbers = _pattern(expected)
    m = pattern.fullmatch(actual)
    if m is None:
        return "the text differs"
    for want, got in zip(numbers, m.groups()):
        if not numbers_agree(want, got):
            return f"{got} where the text says {want}"
    return None
