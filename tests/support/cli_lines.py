"""Check `embedstore ...` command lines written in docs, notebooks and help texts against the CLI.

A documented command that uses an option the CLI does not have (``search --image``) fails only
when a person pastes it. These helpers find such lines in Markdown (fenced blocks and inline
code), notebook cells (``!embedstore``, ``%%bash`` cells, ``subprocess.run(["embedstore", ...])``)
and parse each with the real click command: unknown options, options missing their value,
surplus arguments and bad choice/number values are errors. File arguments are not opened.
"""
from __future__ import annotations

import ast
import re
import shlex

import click

FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", flags=re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
SHELL_FENCES = {"", "bash", "sh", "shell", "console", "zsh"}
SEPARATORS = {"&&", "||", ";", "|"}
UNSET = getattr(click.core, "UNSET", None)  # click >= 8.3 marks an absent parameter with a sentinel


def segments(line: str) -> list[list[str]]:
    """The `embedstore` invocations on one shell line, as argument lists (comments dropped)."""
    line = line.strip()
    for prefix in ("$ ", "!"):
        if line.startswith(prefix):
            line = line[len(prefix):]
    try:
        lex = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lex.whitespace_split = True
        lex.commenters = "#"
        tokens = list(lex)
    except ValueError:  # unbalanced quotes: prose, not a command
        return []
    out, current = [], []
    for tok in tokens + [";"]:
        if tok in SEPARATORS or set(tok) <= set(";&|"):
            if current and current[0] == "embedstore" and "..." not in current:
                out.append([t[1:-1] if t.startswith("[") and t.endswith("]") else t for t in current])
            current = []
        else:
            current.append(tok)
    return out


def markdown_commands(text: str) -> list[tuple[list[str], bool]]:
    """(argv, complete) for every `embedstore` command in Markdown; complete: from a fenced shell
    block (meant to be run as written), so missing and surplus arguments count too."""
    found: list[tuple[list[str], bool]] = []
    for lang, body in FENCE.findall(text):
        if lang.lower() in SHELL_FENCES:
            for line in body.splitlines():
                found += [(argv, True) for argv in segments(line)]
    for span in INLINE.findall(FENCE.sub("", text)):
        found += [(argv, False) for argv in segments(span)]
    return found


def code_cell_commands(source: str) -> list[tuple[list[str], bool]]:
    """`embedstore` commands a notebook code cell runs: shell escapes, %%bash cells, and
    ``subprocess`` calls with a literal argument list."""
    lines = source.splitlines()
    if lines and lines[0].strip() in ("%%bash", "%%sh", "%%script bash"):
        return [(argv, True) for line in lines[1:] for argv in segments(line)]
    found = [(argv, True) for line in lines if line.strip().startswith("!") for argv in segments(line)]
    try:
        tree = ast.parse("\n".join("pass" if line.strip().startswith(("!", "%")) else line for line in lines))
    except SyntaxError:
        return found
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], (ast.List, ast.Tuple)):
            items = node.args[0].elts
            if items and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in items):
                argv = [e.value for e in items]
                if argv[0] == "embedstore":
                    found.append((argv, True))
    return found


def check(argv: list[str], complete: bool = True) -> None:
    """Parse ``argv`` (starting with "embedstore") with the real command; raise click.UsageError
    naming the problem when the CLI would refuse it. ``complete=False`` (a command quoted in
    prose, maybe cut short or followed by words): only options and their values are checked."""
    from embedstore_cli.main import main

    assert argv and argv[0] == "embedstore", argv
    group: click.Command = main
    ctx = click.Context(main, info_name="embedstore")
    args = argv[1:]
    while isinstance(group, click.Group) and args and not args[0].startswith("-"):
        sub = group.get_command(ctx, args[0])
        if sub is None:
            raise click.UsageError(f"no such command {args[0]!r}", ctx)
        ctx = click.Context(sub, info_name=args[0], parent=ctx)
        group, args = sub, args[1:]
    opts, extra, _ = group.make_parser(ctx).parse_args(list(args))
    if complete and extra and not isinstance(group, click.Group):
        raise click.UsageError(f"unexpected extra argument(s) {extra}", ctx)
    for param in group.get_params(ctx):
        value = opts.get(param.name)
        if value is None or value is UNSET:
            if complete and param.required and isinstance(param, click.Argument):
                raise click.UsageError(f"missing argument {param.human_readable_name}", ctx)
            continue
        if not isinstance(param.type, (click.Path, click.File)):
            param.type_cast_value(ctx, value)  # raises BadParameter for a bad choice or number


def problems(commands: list[tuple[list[str], bool]]) -> list[str]:
    """One line per command the CLI would refuse: the command and click's message."""
    bad = []
    for argv, complete in commands:
        try:
            check(argv, complete)
        except click.UsageError as e:
            bad.append(f"{shlex.join(argv)}  ->  {e.format_message()}")
    return bad
