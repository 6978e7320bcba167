"""Offline checks of the Bicep templates in ``infra/``: what a compiler would catch first.

The Bicep CLI is a standalone binary that this project's machines cannot download, so this script
checks what it can without it:

* structure (standard library only): balanced braces, brackets and parentheses outside strings
  and comments; every resource type carries an ``@api-version``; every module path exists; every
  parameter passed to a module is declared there and every required one is passed; every
  ``<module>.outputs.<name>`` exists; no unused parameters or variables, none named like a function
  the file calls (``param description`` hides ``@description``); ``main.parameters.json``
  names only declared parameters and covers every required one;
* grammar, when the parsers are installed (``scripts/validate-infra.sh`` installs them): each file
  parses with the tree-sitter Bicep grammar (``tree-sitter-bicep``) and with ``pycep-parser``
  (the parser checkov uses), so a syntax error fails here rather than at ``azd up``.

Usage: ``python scripts/validate_infra.py [--require-parsers] [INFRA_DIR]``; exit status 1 lists
every problem. ``tests/test_infra_drift.py`` imports :func:`read_bicep` and
:func:`structural_problems` from here.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
API_VERSION = re.compile(r"^[A-Za-z0-9.]+/[A-Za-z0-9./]+@\d{4}-\d{2}-\d{2}(-preview)?$")
_KEY_LINE = re.compile(rf"^\s*(?:'(?P<quoted>[^']*)'|(?P<bare>{IDENT}))\s*:")
_PAIRS = {"}": "{", "]": "[", ")": "("}
_COLON = re.compile(r"\s*:")


class BicepSyntaxError(ValueError):
    """A Bicep file cannot be scanned: an unterminated string or comment, or unbalanced brackets."""


def mask(text: str) -> str:
    """The text with string contents and comments blanked (newlines kept), interpolations kept.

    Positions do not move, so an index in the masked text is the same index in the original.
    Inside ``'...${expr}...'`` the expression stays visible (its identifiers count as uses) but
    the ``${`` and its closing ``}`` are blanked, so brace counting sees only code braces.
    """
    out = list(text)
    i, n = 0, len(text)
    # stack of contexts: "code" (inside an interpolation, with its own brace depth) or "str"
    stack: list[list] = []

    def blank(a: int, b: int) -> None:
        for k in range(a, b):
            if out[k] != "\n":
                out[k] = " "

    while i < n:
        in_string = bool(stack) and stack[-1][0] == "str"
        if in_string:
            c = text[i]
            if c == "\\" and i + 1 < n:
                blank(i, i + 2)
                i += 2
            elif c == "'":
                stack.pop()
                i += 1
            elif text.startswith("${", i):
                blank(i, i + 2)
                stack.append(["code", 0])
                i += 2
            elif c == "\n":
                raise BicepSyntaxError(f"unterminated string at offset {i}")
            else:
                blank(i, i + 1)
                i += 1
            continue
        if text.startswith("'''", i):
            end = text.find("'''", i + 3)
            if end < 0:
                raise BicepSyntaxError(f"unterminated multi-line string at offset {i}")
            blank(i + 3, end)
            i = end + 3
        elif text.startswith("//", i):
            end = text.find("\n", i)
            end = n if end < 0 else end
            blank(i, end)
            i = end
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            if end < 0:
                raise BicepSyntaxError(f"unterminated block comment at offset {i}")
            blank(i, end + 2)
            i = end + 2
        elif text[i] == "'":
            stack.append(["str"])
            i += 1
        elif text[i] == "{" and stack:
            stack[-1][1] += 1
            i += 1
        elif text[i] == "}" and stack:
            if stack[-1][1] == 0:  # closes the interpolation
                out[i] = " "
                stack.pop()
            else:
                stack[-1][1] -= 1
            i += 1
        else:
            i += 1
    if stack:
        raise BicepSyntaxError("unterminated string or interpolation at end of file")
    return "".join(out)


def bracket_problems(masked: str) -> list[str]:
    """Unbalanced or mismatched braces, brackets and parentheses (line numbers are 1-based)."""
    problems: list[str] = []
    stack: list[tuple[str, int]] = []
    line = 1
    for ch in masked:
        if ch == "\n":
            line += 1
        elif ch in "{[(":
            stack.append((ch, line))
        elif ch in "}])":
            if not stack or stack[-1][0] != _PAIRS[ch]:
                problems.append(f"line {line}: unexpected {ch!r}")
                return problems
            stack.pop()
    problems += [f"line {ln}: {ch!r} is never closed" for ch, ln in stack]
    return problems


@dataclass
class Module:
    symbol: str
    path: str
    params: set[str]


@dataclass
class BicepFile:
    """The top-level declarations of one Bicep file, read structurally."""

    path: Path
    text: str
    masked: str
    target_scope: str = "resourceGroup"
    params: dict[str, bool] = field(default_factory=dict)  # name -> has a default
    allowed: dict[str, list[str]] = field(default_factory=dict)  # param -> its @allowed values
    variables: set[str] = field(default_factory=set)
    resources: dict[str, str] = field(default_factory=dict)  # symbol -> 'Type@version'
    modules: dict[str, Module] = field(default_factory=dict)
    outputs: set[str] = field(default_factory=set)

    def block(self, start: int) -> tuple[int, int]:
        """(open, close) indices of the ``{...}`` or ``[...]`` block that opens at or after start."""
        i = start
        while self.masked[i] not in "{[":
            i += 1
        opener = self.masked[i]
        closer = "}" if opener == "{" else "]"
        depth = 0
        for j in range(i, len(self.masked)):
            if self.masked[j] == opener:
                depth += 1
            elif self.masked[j] == closer:
                depth -= 1
                if depth == 0:
                    return i, j
        raise BicepSyntaxError(f"{self.path}: block at offset {start} is never closed")

    def object_entries(self, open_index: int) -> dict[str, str]:
        """Keys of the object literal opening at ``open_index`` and their value text (one line)."""
        start, end = self.block(open_index)
        entries: dict[str, str] = {}
        depth = 0
        pos = start
        for line in self.masked[start:end + 1].splitlines(keepends=True):
            original = self.text[pos:pos + len(line)]
            if depth == 1:
                m = _KEY_LINE.match(line)
                if m:
                    om = _KEY_LINE.match(original)
                    key = om.group("quoted") if om.group("quoted") is not None else om.group("bare")
                    value_end = len(line.rstrip())  # the masked line ends before any comment
                    entries[key] = original[om.end():value_end].strip()
            depth += sum(line.count(c) for c in "{[(") - sum(line.count(c) for c in "}])")
            pos += len(line)
        return entries

    def variable_object(self, name: str) -> dict[str, str]:
        """Entries of ``var <name> = { ... }``."""
        m = re.search(rf"^var\s+{name}\s*=\s*\{{", self.masked, re.M)
        if not m:
            raise KeyError(f"{self.path}: no object variable {name!r}")
        return self.object_entries(m.end() - 1)

    def uses(self, name: str, declared_at: int) -> bool:
        """Whether an identifier is referenced anywhere but in its declaration (object keys don't count)."""
        for m in re.finditer(rf"(?<![\w.]){re.escape(name)}\b", self.masked):
            if m.start() == declared_at:
                continue
            line_start = self.masked.rfind("\n", 0, m.start()) + 1
            before = self.masked[line_start:m.start()].strip()
            if _COLON.match(self.masked, m.end()) and before in ("", "{", ","):
                continue  # an object key that happens to share the name
            return True
        return False


_DECL = re.compile(
    rf"^(?P<kind>param|var|resource|module|output)\s+(?P<name>{IDENT})\b(?P<rest>[^\n]*)", re.M)


def read_bicep(path: Path) -> BicepFile:
    """Read a Bicep file's top-level declarations (raises BicepSyntaxError on unscannable text)."""
    text = path.read_text(encoding="utf-8")
    masked = mask(text)
    bf = BicepFile(path=path, text=text, masked=masked)
    scope = re.search(r"^targetScope\s*=\s*'(\w+)'", text, re.M)
    if scope:
        bf.target_scope = scope.group(1)
    for m in _DECL.finditer(masked):
        kind, name = m.group("kind"), m.group("name")
        original_rest = text[m.start("rest"):m.end("rest")]
        if kind == "param":
            bf.params[name] = "=" in m.group("rest")
        elif kind == "var":
            bf.variables.add(name)
        elif kind == "output":
            bf.outputs.add(name)
        elif kind == "resource":
            typ = re.match(r"\s*'([^']*)'", original_rest)
            bf.resources[name] = typ.group(1) if typ else ""
        else:
            mod_path = re.match(r"\s*'([^']*)'", original_rest)
            params: set[str] = set()
            open_i, close_i = bf.block(m.end("name"))
            body = masked[open_i:close_i]
            pm = re.search(r"^\s*params\s*:\s*\{", body, re.M)
            if pm:
                params = set(bf.object_entries(open_i + pm.end() - 1))
            bf.modules[name] = Module(name, mod_path.group(1) if mod_path else "", params)
    for m in re.finditer(r"@allowed\(\s*\[(?P<values>.*?)\]\s*\)", text, re.S):
        following = _DECL.search(masked, m.end())
        if following and following.group("kind") == "param":
            values = re.findall(r"'([^']*)'|(-?\d+)", m.group("values"))
            bf.allowed[following.group("name")] = [quoted or number for quoted, number in values]
    return bf


def structural_problems(infra_dir: Path) -> list[str]:
    """Every structural problem of the templates under ``infra_dir`` (empty list = clean)."""
    problems: list[str] = []
    files: dict[Path, BicepFile] = {}
    for path in sorted(infra_dir.rglob("*.bicep")):
        rel = path.relative_to(infra_dir.parent)
        try:
            bf = read_bicep(path)
        except BicepSyntaxError as exc:
            problems.append(f"{rel}: {exc}")
            continue
        problems += [f"{rel}: {p}" for p in bracket_problems(bf.masked)]
        files[path.resolve()] = bf
    for path, bf in files.items():
        rel = path.relative_to(infra_dir.resolve().parent)
        for symbol, typ in bf.resources.items():
            if not API_VERSION.match(typ):
                problems.append(f"{rel}: resource {symbol} type {typ!r} has no valid @api-version")
        for decl_kind, names in (("param", bf.params), ("var", bf.variables)):
            for name in names:
                decl = re.search(rf"^{decl_kind}\s+({name})\b", bf.masked, re.M)
                if decl and not bf.uses(name, decl.start(1)):
                    problems.append(f"{rel}: {decl_kind} {name} is declared but never used")
                if re.search(rf"(?<![\w.]){name}\s*\(", bf.masked):
                    # a symbol named like a function hides it: @description(...) or filter(...) break
                    problems.append(f"{rel}: {decl_kind} {name} shadows the function {name}() used in the file")
        for symbol, mod in bf.modules.items():
            target = (path.parent / mod.path).resolve()
            if target not in files:
                problems.append(f"{rel}: module {symbol} path {mod.path!r} does not exist")
                continue
            callee = files[target]
            for p in sorted(mod.params - set(callee.params)):
                problems.append(f"{rel}: module {symbol} passes {p!r}, not a param of {mod.path}")
            for p, has_default in sorted(callee.params.items()):
                if not has_default and p not in mod.params:
                    problems.append(f"{rel}: module {symbol} does not pass required param {p!r} of {mod.path}")
            for out in set(re.findall(rf"\b{symbol}\.outputs\.({IDENT})", bf.masked)):
                if out not in callee.outputs:
                    problems.append(f"{rel}: {symbol}.outputs.{out} is not an output of {mod.path}")
    main = files.get((infra_dir / "main.bicep").resolve())
    params_file = infra_dir / "main.parameters.json"
    if main is None:
        problems.append("infra/main.bicep is missing")
    elif params_file.exists():
        try:
            given = json.loads(params_file.read_text(encoding="utf-8"))["parameters"]
        except (ValueError, KeyError) as exc:
            problems.append(f"infra/main.parameters.json is not a deployment parameters file: {exc}")
        else:
            for p in sorted(set(given) - set(main.params)):
                problems.append(f"infra/main.parameters.json sets {p!r}, not a param of main.bicep")
            for p, has_default in sorted(main.params.items()):
                if not has_default and p not in given:
                    problems.append(f"infra/main.parameters.json lacks required param {p!r}")
    return problems


def grammar_problems(infra_dir: Path, require: bool) -> list[str]:
    """Parse every file with tree-sitter-bicep and pycep-parser, when they are installed."""
    problems: list[str] = []
    paths = sorted(infra_dir.rglob("*.bicep"))
    try:
        import tree_sitter
        import tree_sitter_bicep
    except ImportError:
        if require:
            problems.append("tree-sitter-bicep is not installed (scripts/validate-infra.sh installs it)")
    else:
        parser = tree_sitter.Parser(tree_sitter.Language(tree_sitter_bicep.language()))
        for path in paths:
            tree = parser.parse(path.read_bytes())
            if tree.root_node.has_error:
                problems.append(f"{_rel(path, infra_dir)}: tree-sitter: syntax error near line "
                                f"{_first_error_line(tree.root_node)}")
    try:
        from pycep import BicepParser
    except ImportError:
        if require:
            problems.append("pycep-parser is not installed (scripts/validate-infra.sh installs it)")
    else:
        parser = BicepParser()
        for path in paths:
            try:
                parser.parse(file_path=path)
            except Exception as exc:  # noqa: BLE001 - lark raises many types; each is reported, not swallowed
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                problems.append(f"{_rel(path, infra_dir)}: pycep: {first}")
    return problems


def _rel(path: Path, infra_dir: Path) -> Path:
    return path.resolve().relative_to(infra_dir.resolve().parent)


def _first_error_line(node) -> int:
    """1-based line of the first ERROR or MISSING node in a tree-sitter tree."""
    stack = [node]
    while stack:
        current = stack.pop(0)
        if current.type == "ERROR" or current.is_missing:
            return current.start_point[0] + 1
        stack[0:0] = list(current.children)
    return node.start_point[0] + 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("infra_dir", nargs="?", default=str(Path(__file__).resolve().parent.parent / "infra"))
    ap.add_argument("--require-parsers", action="store_true",
                    help="fail when tree-sitter-bicep or pycep-parser is missing")
    args = ap.parse_args(argv)
    infra_dir = Path(args.infra_dir)
    problems = structural_problems(infra_dir) + grammar_problems(infra_dir, args.require_parsers)
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    n_files = len(list(infra_dir.rglob("*.bicep")))
    print(f"validate_infra: {n_files} Bicep files, {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
