"""Every configuration field with its value, its default and its one-line meaning.

``prfl config`` prints :func:`resolved_config` (the experiment with every policy's options filled
in from the policy's defaults) and, with ``--explain``, :func:`explained_yaml` (the same YAML with
each field's meaning as a comment above it). The report shows :func:`resolved_policy` per method.

Where a field's meaning comes from:

* the experiment's sections (:mod:`prfl.config`, pydantic models): each ``Field``'s ``description``;
* a policy's options (the dataclass ``config_cls`` of each registered policy), in this order:

  1. ``field(metadata={"help": "..."})``;
  2. the comment on the field's own line: ``interval: int = 50  # rounds between ...``;
  3. the block of comment lines directly above the field;
  4. an entry of the class docstring: ``name``: text, or ``name`` (qualifier): text, or several
     names sharing one text (``fraction``, ``min_clients``: text); its first sentence is used.

  Options are read from the dataclass fields themselves, so a new option shows up with its default
  at once, and with its meaning as soon as it has one of the four.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import re
import textwrap
import tokenize
import types
import typing
from collections.abc import Mapping
from typing import Any

import yaml
from pydantic import BaseModel

from prfl.config import ConfigError, ExperimentConfig, PolicyConfig

NO_HELP = "(no description)"
REQUIRED = "<required>"


# ---------------------------------------------------------------------------- policy options
def _plain(value: Any) -> Any:
    """A default as YAML shows it: tuples as lists, nested."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def policy_config_class(name: str) -> type:
    from prfl.policies import POLICIES

    return POLICIES[name].config_cls  # type: ignore[attr-defined,no-any-return]


def option_defaults(policy: str) -> dict[str, Any]:
    """Every option of ``policy`` with its default (:data:`REQUIRED` when it has none)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(policy_config_class(policy)):
        if f.default is not dataclasses.MISSING:
            out[f.name] = _plain(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = _plain(f.default_factory())
        else:
            out[f.name] = REQUIRED
    return out


def resolved_policy(pcfg: PolicyConfig | Mapping[str, Any]) -> dict[str, Any]:
    """``{"name": ..., "options": {...}}`` with every option: the given ones, then the defaults.

    An unknown policy or option is kept as given (validation reports it elsewhere).
    """
    data = pcfg.model_dump(mode="json") if isinstance(pcfg, PolicyConfig) else dict(pcfg)
    name = str(data.get("name"))
    given = dict(data.get("options") or {})
    try:
        defaults = option_defaults(name)
    except KeyError:
        return {"name": name, "options": given}
    options = {k: _plain(given.get(k, v)) for k, v in defaults.items()}
    options.update({k: v for k, v in given.items() if k not in defaults})
    return {"name": name, "options": options}


def resolved_config(cfg: ExperimentConfig) -> dict[str, Any]:
    """The experiment as plain data, with the policy's and every baseline's options resolved."""
    data = cfg.model_dump(mode="json")
    data["policy"] = resolved_policy(cfg.policy)
    data["baselines"] = [resolved_policy(b) for b in cfg.baselines]
    return data


def missing_options(cfg: ExperimentConfig) -> list[str]:
    """``policy fedfix: dt`` for every option without default that the configuration lacks."""
    out = []
    for p in [cfg.policy, *cfg.baselines]:
        for k, v in resolved_policy(p)["options"].items():
            if v == REQUIRED:
                out.append(f"policy {p.name}: option {k}")
    return out


def check_policy(pcfg: PolicyConfig, where: str = "policy") -> None:
    """Raise :class:`ConfigError` naming ``where`` (``policy``, ``baselines[0]``) when the policy's
    options are unknown, missing or invalid; the run would fail on them later."""
    cls = policy_config_class(pcfg.name)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(pcfg.options) - set(fields))
    if unknown:
        raise ConfigError(f"{where}.options: unknown option {unknown[0]!r} for policy {pcfg.name!r}\n"
                          f"valid options: {', '.join(fields)} (`prfl config --explain` says what each does)")
    missing = [n for n, v in option_defaults(pcfg.name).items() if v == REQUIRED and n not in pcfg.options]
    if missing:
        raise ConfigError(f"{where}.options: policy {pcfg.name!r} needs option {missing[0]!r}\n"
                          f"set it, e.g. --set {where}.options.{missing[0]}=...")
    try:
        cls(**pcfg.options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}.options: policy {pcfg.name!r}: {exc}") from None


_ENTRY = re.compile(r"((?:``\w+``(?:,\s*|\s+and\s+|,\s+and\s+)?)+)(?:\s*\(([^)]*)\))?:\s")
_NAME = re.compile(r"``(\w+)``")


def _first_sentence(text: str) -> str:
    text = " ".join(text.split())
    m = re.search(r"\.(?:\s|$)", text)
    return (text[: m.start()] if m else text).strip().rstrip(".,;")


def _docstring_entries(doc: str) -> dict[str, str]:
    """``name``: text entries of a docstring (see the module docstring, rule 4)."""
    out: dict[str, str] = {}
    matches = list(_ENTRY.finditer(doc))
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(doc)
        body = doc[m.end():end].split("\n\n")[0]
        text = _first_sentence(body)
        if m.group(2):
            text = f"{m.group(2)}: {text}"
        for name in _NAME.findall(m.group(1)):
            out.setdefault(name, text)
    return out


def _source_comments(cls: type) -> dict[str, str]:
    """Field name -> its line comment, else the comment block above it (rules 2 and 3)."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = src.splitlines()
    comments: dict[int, tuple[bool, str]] = {}  # line -> (stands alone, text)
    try:
        for tok in tokenize.generate_tokens(io.StringIO(src).readline):
            if tok.type == tokenize.COMMENT:
                row, col = tok.start
                alone = not lines[row - 1][:col].strip()
                comments[row] = (alone, tok.string.lstrip("#").strip())
        tree = ast.parse(src)
    except (tokenize.TokenError, SyntaxError):
        return {}
    classdef = next((n for n in tree.body if isinstance(n, ast.ClassDef)), None)
    if classdef is None:
        return {}
    out: dict[str, str] = {}
    for node in classdef.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        end = node.end_lineno or node.lineno
        trailing = [comments[r][1] for r in range(node.lineno, end + 1) if r in comments and not comments[r][0]]
        if trailing:
            out[node.target.id] = " ".join(trailing)
            continue
        above: list[str] = []
        row = node.lineno - 1
        while row in comments and comments[row][0]:
            above.insert(0, comments[row][1])
            row -= 1
        if above:
            out[node.target.id] = " ".join(above)
    return out


@functools.lru_cache(maxsize=None)
def dataclass_help(cls: type) -> dict[str, str]:
    """One line per field of the dataclass ``cls`` (rules 1-4 of the module docstring)."""
    comments = _source_comments(cls)
    entries = _docstring_entries(inspect.cleandoc(cls.__doc__ or ""))
    out = {}
    for f in dataclasses.fields(cls):
        text = f.metadata.get("help") if f.metadata else None
        text = text or comments.get(f.name) or entries.get(f.name)
        if text:
            out[f.name] = " ".join(str(text).split())
    return out


def option_help(policy: str) -> dict[str, str]:
    """Option name -> one-line meaning, for every documented option of ``policy``."""
    try:
        return dataclass_help(policy_config_class(policy))
    except KeyError:
        return {}


# ---------------------------------------------------------------------------- explained YAML
def _model_class(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside ``Model``, ``Model | None`` or ``Optional[Model]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        for arg in typing.get_args(annotation):
            found = _model_class(arg)
            if found is not None:
                return found
    return None


def _scalar(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False).strip()
    return text[: -len("...")].strip() if text.endswith("\n...") or text == "..." else text


def _model_lines(model_cls: type[BaseModel], data: Mapping[str, Any], indent: int) -> list[str]:
    lines: list[str] = []
    pad = " " * indent
    for name, info in model_cls.model_fields.items():
        value = data.get(name)
        sub = _model_class(info.annotation)
        lines.append(f"{pad}# {info.description or NO_HELP}")
        if name in ("policy",) and isinstance(value, dict):
            lines.append(f"{pad}{name}:")
            lines += _policy_lines(value, indent + 2)
        elif name == "baselines" and isinstance(value, list) and value:
            lines.append(f"{pad}{name}:")
            for item in value:
                lines.append(f"{pad}  -")
                lines += _policy_lines(item, indent + 4)
        elif sub is not None and isinstance(value, dict):
            lines.append(f"{pad}{name}:")
            lines += _model_lines(sub, value, indent + 2)
        else:
            lines.append(f"{pad}{name}: {_scalar(value)}")
    return lines


def _policy_lines(data: Mapping[str, Any], indent: int) -> list[str]:
    pad = " " * indent
    fields = PolicyConfig.model_fields
    lines = [f"{pad}# {fields['name'].description}", f"{pad}name: {_scalar(data.get('name'))}",
             f"{pad}# {fields['options'].description}"]
    options = data.get("options") or {}
    if not options:
        return [*lines, f"{pad}options: {{}}"]
    lines.append(f"{pad}options:")
    helps = option_help(str(data.get("name")))
    for k, v in options.items():
        lines.append(f"{pad}  # {helps.get(k, NO_HELP)}")
        lines.append(f"{pad}  {_scalar(k)}: {_scalar(v)}")
    return lines


def explained_yaml(cfg: ExperimentConfig) -> str:
    """:func:`resolved_config` as YAML with each field's meaning in a comment line above it."""
    return "\n".join(_model_lines(ExperimentConfig, resolved_config(cfg), 0)) + "\n"


def resolved_yaml(cfg: ExperimentConfig) -> str:
    """:func:`resolved_config` as YAML."""
    return yaml.safe_dump(resolved_config(cfg), sort_keys=False, width=10**6)
