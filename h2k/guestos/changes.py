"""What a fix changes in a guest, described before it is made.

Every fix first works out its changes as :class:`Change` records (file,
before, after) without touching the guest; a dry run reports them as they
are, a real run applies them with :func:`apply`. The report a person reads
and the change made are therefore the same thing, not two descriptions that
may drift apart.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from h2k.guestos.tree import GuestTree

log = logging.getLogger(__name__)

MODIFY = "modify"
CREATE = "create"
REMOVE = "remove"
# Text is reported whole up to this size; past it only the diff is.
MAX_REPORTED_TEXT = 16 * 1024
MAX_DIFF_LINES = 200


@dataclass(frozen=True)
class Change:
    """One guest path to write, create or remove.

    ``before``/``after`` are the text of a file; for a removed symlink or
    directory ``before`` is None and ``detail`` says what it was.
    """

    path: str
    action: str
    summary: str
    before: str | None = None
    after: str | None = None
    kind: str = "file"
    detail: str | None = None
    mode: int = 0o644

    def diff(self) -> list[str]:
        """A unified diff of the text, without file headers, capped."""
        if self.kind != "file":
            return []
        lines = list(
            difflib.unified_diff(
                (self.before or "").splitlines(),
                (self.after or "").splitlines(),
                lineterm="",
                n=1,
            )
        )[2:]
        if len(lines) > MAX_DIFF_LINES:
            hidden = len(lines) - MAX_DIFF_LINES
            lines = [*lines[:MAX_DIFF_LINES], f"... {hidden} more lines"]
        return lines

    def as_dict(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "path": self.path,
            "action": self.action,
            "kind": self.kind,
            "summary": self.summary,
        }
        if self.detail is not None:
            entry["detail"] = self.detail
        if self.kind == "file":
            entry["diff"] = self.diff()
            for name, text in (("before", self.before), ("after", self.after)):
                if text is None or len(text) <= MAX_REPORTED_TEXT:
                    entry[name] = text
                else:
                    entry[name] = None
                    entry[f"{name}_bytes"] = len(text.encode("utf-8", "replace"))
        return entry


@dataclass
class FixPlan:
    """A fix's findings and the changes it makes (or would make)."""

    name: str
    changes: list[Change] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    found: dict[str, Any] = field(default_factory=dict)
    applicable: bool = True

    @property
    def status(self) -> str:
        if not self.applicable:
            return "not_applicable"
        return "changed" if self.changes else "unchanged"

    def as_dict(self, *, applied: bool) -> dict[str, Any]:
        status = self.status
        if status == "changed" and not applied:
            status = "would_change"
        return {
            "status": status,
            "files_changed": [c.path for c in self.changes],
            "changes": [c.as_dict() for c in self.changes],
            "notes": list(self.notes),
            "found": self.found,
        }


def modify(path: str, before: str, after: str, summary: str) -> Change:
    return Change(path, MODIFY, summary, before=before, after=after)


def create(path: str, after: str, summary: str, mode: int = 0o644) -> Change:
    return Change(path, CREATE, summary, before=None, after=after, mode=mode)


def remove_file(tree: GuestTree, path: str, summary: str) -> Change:
    """Removing ``path``: its text (a file), target (a link) or contents (a dir)."""
    if tree.is_symlink(path):
        return Change(
            path,
            REMOVE,
            summary,
            kind="symlink",
            detail=f"-> {tree.readlink(path)}",
        )
    if tree.is_dir(path):
        return Change(
            path,
            REMOVE,
            summary,
            kind="directory",
            detail=f"{len(_walk(tree, path))} entries inside",
        )
    data = tree.read_bytes(path)
    if data is not None and b"\0" not in data[:8192]:
        text = data.decode("utf-8", "surrogateescape")
        return Change(path, REMOVE, summary, before=text, after=None)
    size = 0 if data is None else len(data)
    return Change(path, REMOVE, summary, kind="binary", detail=f"{size} bytes")


def _walk(tree: GuestTree, directory: str) -> list[str]:
    found = []
    for name in tree.listdir(directory):
        path = f"{directory.rstrip('/')}/{name}"
        found.append(path)
        if tree.is_dir(path) and not tree.is_symlink(path):
            found.extend(_walk(tree, path))
    return found


def apply(tree: GuestTree, changes: Sequence[Change]) -> None:
    """Make ``changes`` in the guest, in order."""
    for change in changes:
        if change.action == REMOVE:
            if tree.lexists(change.path):
                tree.remove(change.path)
            continue
        assert change.after is not None
        parent = change.path.rsplit("/", 1)[0] or "/"
        if not tree.is_dir(parent):
            tree.make_dirs(parent)
        tree.write_text(change.path, change.after, mode=change.mode)
        log.info("%s %s: %s", change.action, change.path, change.summary)
