"""The documentation stays true: docs/configuration.md is what docs/gen_configuration.py makes from the
schema, it documents every field of every section (nested records too), and every relative link in
README.md and docs/*.md points at a file that exists."""

import dataclasses
import importlib.util
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from opd.configs import schema

ROOT = Path(__file__).resolve().parents[2]
GENERATOR = ROOT / "docs" / "gen_configuration.py"
CONFIGURATION = ROOT / "docs" / "configuration.md"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _generator():
    spec = importlib.util.spec_from_file_location("opd_docs_gen_configuration", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_configuration_md_is_current():
    assert CONFIGURATION.read_text(encoding="utf-8") == _generator().render(), (
        "docs/configuration.md is stale: run `python3 docs/gen_configuration.py`"
    )


def test_check_flag_says_stale_in_one_line(tmp_path):
    stale = tmp_path / "configuration.md"
    stale.write_text("# Configuration\n")
    cmd = [sys.executable, str(GENERATOR), "--check", "--output", str(stale)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and "stale" in result.stderr
    cmd = [sys.executable, str(GENERATOR), "--check"]
    assert subprocess.run(cmd, capture_output=True, text=True, timeout=120).returncode == 0


# An account of the schema's fields made without the generator: dataclasses or pydantic models.


def _field_names(cls) -> list[str]:
    if dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls)]
    return list(cls.model_fields)


def _is_record(tp) -> bool:
    return isinstance(tp, type) and (dataclasses.is_dataclass(tp) or hasattr(tp, "model_fields"))


def _record_of(tp):
    for candidate in (tp, *typing.get_args(tp)):
        if _is_record(candidate):
            return candidate
    return None


def _keys(cls, prefix: str) -> list[str]:
    hints = typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))
    keys = []
    for name in _field_names(cls):
        keys.append(f"{prefix}.{name}")
        record = _record_of(hints[name])
        if record is not None:
            keys += _keys(record, f"{prefix}.{name}")
    return keys


def _schema_keys() -> list[str]:
    top = schema.OpdConfig
    hints = typing.get_type_hints(top, vars(schema))
    return [key for section in _field_names(top) for key in _keys(hints[section], section)]


def test_every_field_of_every_section_is_documented():
    rows = {}
    for line in CONFIGURATION.read_text(encoding="utf-8").splitlines():
        m = re.match(r"\| `([\w.]+)` \| .* \| (.*) \|$", line)
        if m:
            rows[m.group(1)] = m.group(2).strip()
    keys = _schema_keys()
    assert {k.split(".")[0] for k in keys} >= {"run", "rollout", "score", "train", "eval"}
    missing = [k for k in keys if k not in rows]
    assert not missing, f"fields missing from docs/configuration.md: {missing}"
    undocumented = [k for k in keys if not rows[k]]
    assert not undocumented, f"fields without a `# comment` in configs/schema.py: {undocumented}"


def test_the_generator_reads_nested_records_and_wrapped_comments(tmp_path, monkeypatch):
    """A nested record (and a list of them) is documented as section.record.field, and a comment the
    formatter moved inside the parentheses of a wrapped declaration is still found."""
    (tmp_path / "opd_fake_schema.py").write_text(
        "from __future__ import annotations\n"
        "from dataclasses import dataclass, field\n\n\n"
        "@dataclass(frozen=True, kw_only=True)\n"
        "class StopConfig:\n"
        "    rkl_below: float = 0.0  # stop below this\n"
        "    patience: int = (\n"
        "        0  # rounds without a drop\n"
        "    )\n\n\n"
        "@dataclass(frozen=True, kw_only=True)\n"
        "class EvalConfig:\n"
        "    stop: StopConfig = field(default_factory=StopConfig)  # when to stop\n"
        "    extra: list[StopConfig] = field(default_factory=list)  # more rules\n\n\n"
        "@dataclass(frozen=True, kw_only=True)\n"
        "class OpdConfig:\n"
        "    eval: EvalConfig = field(default_factory=EvalConfig)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    gen = _generator()
    monkeypatch.setattr(gen, "SCHEMA_NAME", "opd_fake_schema")
    text = gen.render()
    assert "| `eval.stop` | `StopConfig` | `(table)` | when to stop |" in text
    assert "| `eval.stop.patience` | `int` | `0` | rounds without a drop |" in text
    assert "### `[[eval.extra]]`" in text and "| `eval.extra.rkl_below` | `float` | `0.0` | stop below this |" in text


# Links: [text](target) outside code, relative targets only.

_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)  # fenced code
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code
    return _LINK.findall(text)


def _anchors(page: Path) -> set[str]:
    """The heading anchors GitHub makes: lower case, punctuation dropped, spaces to hyphens, -1, -2 on repeats."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", text, flags=re.M):
        heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        if count:
            seen[f"{slug}-{count}"] = 1
    return set(seen)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in _links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # a URL
            continue
        path, _, anchor = target.partition("#")
        file = page.parent / path if path else page
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{page.relative_to(ROOT)}: links to missing files or headings: {broken}"


def test_the_link_check_sees_links_and_headings(tmp_path):
    page = tmp_path / "p.md"
    page.write_text(
        "# `opd run`: the loop\n## A 3 × 3 λ × β sweep\n## Notes\n## Notes\n"
        "[a](docs/x.md#y) `[b](no.md)`\n```\n[c](no.md)\n# not a heading\n```\n[d](https://e.org)\n"
    )
    assert _links(page) == ["docs/x.md#y", "https://e.org"]
    assert _anchors(page) == {"opd-run-the-loop", "a-3--3-λ--β-sweep", "notes", "notes-1"}
