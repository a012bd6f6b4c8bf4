"""One task example: a context (cached and compressed), a question asked after it, answers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Example:
    id: str
    context: str
    question: str
    answers: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    answer_prefix: str = ""  # put in the assistant's mouth before generation (RULER-style)

    def to_dict(self) -> dict:
        return {"id": self.id, "question": self.question, "answers": list(self.answers), **self.meta}
