"""The code's shape: every config key does something, and no function outgrows a screen.

Both read the source (ast), so they run in a second and fail as soon as a change adds a key
that nothing reads or a function that does too much.
"""

from __future__ import annotations

import ast
import dataclasses
import gc
from pathlib import Path

from lsa_dist.config import RunConfig, flatten

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(ROOT / "lsa_dist").rglob("*.py"), *(ROOT / "launch").glob("*.py")])
MAX_FUNCTION_LINES = 60
SAMPLE = """
def build(cfg: RunConfig) -> None:
    aug = cfg.data.augment
    run(aug.hflip, cfg.engine.zero_stage)

class Loader:
    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg

    def go(self) -> None:
        print(self.cfg.batch_size)
"""


def parse_sources() -> tuple[dict[Path, ast.Module], ast.Module]:
    """Parse every source (and the scan's sample) once, at collection, with the garbage collector paused.

    CPython 3.11's AST builder keeps its recursion depth in per-interpreter state: a collection
    that runs finalizers mid-build, or another thread (earlier tests leave compile and tracking
    threads behind) parsing at the same time, makes it fail with "AST constructor recursion depth
    mismatch". Parsing here, before any test has run, with gc off, rules both out.
    """
    gc.disable()
    try:
        sources = {path: ast.parse(path.read_text(), filename=str(path)) for path in SOURCES}
        return sources, ast.parse(SAMPLE)
    finally:
        gc.enable()


TREES, SAMPLE_TREE = parse_sources()


def section_classes() -> dict[str, str]:
    """Config section class name -> its dotted path in the schema ('' for RunConfig)."""
    out = {RunConfig.__name__: ""}

    def walk(cls: type, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                path = f"{prefix}{f.name}"
                out[type(default).__name__] = path
                walk(type(default), path + ".")

    walk(RunConfig, "")
    return out


class KeyReads(ast.NodeVisitor):
    """Dotted config keys read in one module: attribute chains rooted at a name (or a self
    attribute) known to hold a config section: an annotated parameter, or an assignment from
    such a chain."""

    def __init__(self, sections: dict[str, str]) -> None:
        self.sections = sections
        self.reads: set[str] = set()
        self.self_attrs: dict[str, str] = {}
        self.names: dict[str, str] = {}
        self.section: str | None = None  # inside a section's own class, `self` is that section

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        outer, outer_section = self.self_attrs, self.section
        self.self_attrs, self.section = {}, self.sections.get(node.name)
        for _ in range(2):  # first pass learns self.<attr> = <section>, the second uses it everywhere
            for item in node.body:
                self.visit(item)
        self.self_attrs, self.section = outer, outer_section

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        if node.name.lstrip("_").startswith("validate"):  # checking a key is not using it
            return
        outer = self.names
        self.names = {"cfg": ""}  # a bare `cfg` is a RunConfig unless annotated otherwise
        if self.section is not None:
            self.names["self"] = self.section
        for arg in [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]:
            annotation = ast.unparse(arg.annotation) if arg.annotation else ""
            if annotation in self.sections:
                self.names[arg.arg] = self.sections[annotation]
        self.generic_visit(node)
        self.names = outer

    def visit_Assign(self, node: ast.Assign) -> None:
        for target in node.targets:
            pairs = [(target, node.value)]
            if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                pairs = list(zip(target.elts, node.value.elts))
            for left, right in pairs:
                path = self.resolve(right)
                if path is None:
                    continue
                if isinstance(left, ast.Name):
                    self.names[left.id] = path
                elif isinstance(left, ast.Attribute) and isinstance(left.value, ast.Name) and left.value.id == "self":
                    self.self_attrs[left.attr] = path
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if isinstance(node.ctx, ast.Load):
            path = self.resolve(node)
            if path:
                self.reads.add(path)
        self.generic_visit(node)

    def resolve(self, node: ast.AST) -> str | None:
        """The config path an expression stands for, or None."""
        if isinstance(node, ast.Name):
            return self.names.get(node.id)
        if not isinstance(node, ast.Attribute):
            return None
        if isinstance(node.value, ast.Name) and node.value.id == "self" and node.attr in self.self_attrs:
            return self.self_attrs[node.attr]
        base = self.resolve(node.value)
        if base is None:
            return None
        return f"{base}.{node.attr}" if base else node.attr


def test_every_config_key_is_read_by_the_code() -> None:
    sections = section_classes()
    reads: set[str] = set()
    for tree in TREES.values():
        visitor = KeyReads(sections)
        visitor.visit(tree)
        reads |= visitor.reads
    keys = set(flatten(RunConfig()))
    unread = sorted(k for k in keys if k not in reads)
    assert not unread, f"config keys that no code in lsa_dist/ or launch/ reads: {unread}"


def test_the_key_scan_sees_a_key_that_is_read_and_misses_one_that_is_not() -> None:
    visitor = KeyReads(section_classes())
    visitor.visit(SAMPLE_TREE)
    assert visitor.reads >= {"data.augment.hflip", "engine.zero_stage", "data.batch_size"}
    assert "engine.compile" not in visitor.reads


def test_no_function_in_the_library_or_launchers_is_longer_than_a_screen() -> None:
    long = []
    for path, tree in TREES.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"functions longer than {MAX_FUNCTION_LINES} lines: " + ", ".join(long)
