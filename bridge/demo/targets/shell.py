"""The canned shell of the demo's Linux hosts: a few commands over a virtual file system."""

from __future__ import annotations

import fnmatch
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field

from bridge.demo.targets.network import LinuxHost


def _split(text: str, separators: Sequence[str]) -> list[tuple[str, str]]:
    """``text`` cut at the top-level ``separators`` (outside quotes and parentheses):
    ``[(separator before, piece), ...]``, the first with separator ``""``."""
    parts: list[tuple[str, str]] = []
    depth = 0
    quote = ""
    start = 0
    before = ""
    i = 0
    while i < len(text):
        char = text[i]
        if quote:
            if char == quote:
                quote = ""
            elif char == "\\" and quote == '"':
                i += 1
        elif char in "'\"":
            quote = char
        elif char == "\\":
            i += 1
        elif char == "(":
            depth += 1
        elif char == ")":
            depth = max(0, depth - 1)
        elif depth == 0:
            for sep in separators:
                if text.startswith(sep, i):
                    parts.append((before, text[start:i]))
                    before = sep
                    i += len(sep)
                    start = i
                    break
            else:
                i += 1
            continue
        i += 1
    parts.append((before, text[start:]))
    return parts


@dataclass(slots=True)
class _Output:
    out: list[str] = field(default_factory=list)
    err: list[str] = field(default_factory=list)


class CannedShell:
    """A few shell commands over a virtual file system; ``run(line)`` → (out, err, status)."""

    def __init__(self, host: LinuxHost, user: str) -> None:
        self.host = host
        self.user = user
        self.files = host.files()

    def run(self, line: str) -> tuple[str, str, int]:
        output = _Output()
        status = self._list(line, output)
        return "".join(output.out), "".join(output.err), status

    def _list(self, text: str, output: _Output) -> int:
        status = 0
        for _sep, statement in _split(text, (";", "\n")):
            if statement.strip():
                status = self._and_or(statement, output)
        return status

    def _and_or(self, text: str, output: _Output) -> int:
        status = 0
        for sep, piece in _split(text, ("||", "&&")):
            if (sep == "||" and status == 0) or (sep == "&&" and status != 0):
                continue
            status = self._command(piece.strip(), output)
        return status

    def _command(self, text: str, output: _Output) -> int:
        if text.startswith("(") and text.endswith(")"):
            return self._list(text[1:-1], output)
        try:
            words = shlex.split(text)
        except ValueError:
            output.err.append("sh: 1: Syntax error: unterminated quoted string\n")
            return 2
        quiet = False
        args: list[str] = []
        for word in words:
            if word in ("2>/dev/null", "2>&1", ">/dev/null", "&>/dev/null"):
                quiet = quiet or word.startswith(("2>/", "&>"))
                continue
            args.append(word)
        if not args:
            return 0
        sink = _Output(output.out, [] if quiet else output.err)
        handler = getattr(self, "_cmd_" + args[0].replace("-", "_"), None)
        if handler is None:
            sink.err.append(f"sh: 1: {args[0]}: not found\n")
            return 127
        status: int = handler(args[1:], sink)
        return status

    # commands ------------------------------------------------------------------------

    def _cmd_echo(self, args: list[str], output: _Output) -> int:
        newline = "\n"
        if args and args[0] == "-n":
            args, newline = args[1:], ""
        output.out.append(" ".join(args) + newline)
        return 0

    def _cmd_true(self, args: list[str], output: _Output) -> int:
        return 0

    def _cmd_false(self, args: list[str], output: _Output) -> int:
        return 1

    def _cmd_uname(self, args: list[str], output: _Output) -> int:
        host = self.host
        fields = {
            "s": "Linux",
            "n": host.hostname.split(".")[0],
            "r": host.kernel,
            "v": host.version,
            "m": "x86_64",
            "o": "GNU/Linux",
        }
        flags = "".join(a.lstrip("-") for a in args if a.startswith("-")) or "s"
        if "a" in flags:
            flags = "snrvmo"
        unknown = [f for f in flags if f not in fields]
        if unknown:
            output.err.append(f"uname: invalid option -- '{unknown[0]}'\n")
            return 1
        output.out.append(" ".join(fields[f] for f in "snrvmo" if f in flags) + "\n")
        return 0

    def _cmd_hostname(self, args: list[str], output: _Output) -> int:
        name = self.host.hostname
        output.out.append((name.split(".")[0] if "-s" in args else name) + "\n")
        return 0

    def _cmd_whoami(self, args: list[str], output: _Output) -> int:
        output.out.append(self.user + "\n")
        return 0

    def _cmd_id(self, args: list[str], output: _Output) -> int:
        output.out.append(f"uid=1001({self.user}) gid=1001({self.user}) groups=1001({self.user})\n")
        return 0

    def _cmd_cat(self, args: list[str], output: _Output) -> int:
        status = 0
        for path in args:
            text = self.files.get(path)
            if text is None:
                output.err.append(f"cat: {path}: No such file or directory\n")
                status = 1
            else:
                output.out.append(text)
        return status

    def _glob(self, pattern: str) -> list[str]:
        if not any(c in pattern for c in "*?["):
            return [pattern]
        parts = pattern.split("/")
        found = [
            path
            for path in self.files
            if len(path.split("/")) == len(parts)
            and all(fnmatch.fnmatchcase(a, b) for a, b in zip(path.split("/"), parts, strict=True))
        ]
        return sorted(found) or [pattern]

    def _cmd_grep(self, args: list[str], output: _Output) -> int:
        with_name = "-H" in args
        words = [a for a in args if not a.startswith("-")]
        if len(words) < 2 or words[0] != ".":
            output.err.append("grep: only 'grep [-H] . FILE...' is known here\n")
            return 2
        status = 1
        paths = [path for pattern in words[1:] for path in self._glob(pattern)]
        for path in paths:
            text = self.files.get(path)
            if text is None:
                output.err.append(f"grep: {path}: No such file or directory\n")
                continue
            for line in text.splitlines():
                if line:
                    output.out.append(f"{path}:{line}\n" if with_name or len(paths) > 1 else line)
                    status = 0
        return status
