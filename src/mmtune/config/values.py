"""Reading config values (the layer under :mod:`mmtune.config.parsing`): YAML scalars, conversion to each field's type hint, one-line errors.

A flat YAML file and ``key=value`` overrides reach dataclass fields (mmtune's and transformers'
``TrainingArguments``) as whatever YAML made of them. Each value is converted here to its field's
type hint, so ``learning_rate: 2e-4`` is a float and ``freeze_vision_tower=no`` is ``False``, and a
value that cannot be converted stops the run before anything loads, naming the key, the value, the
expected type and where the value came from.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import re
import types
from collections.abc import Iterable
from typing import Any, Literal, Union, get_args, get_origin

import yaml

NoneType = type(None)


class ConfigError(ValueError):
    """A config file, key or value mmtune cannot use. The message is one line that names the key,
    the value and where it came from (the file, or "command line"), and says what would work; the
    CLI prints it without a traceback."""


class _Loader(yaml.SafeLoader):
    """YAML with the core schema's scalars (YAML 1.2): only true/false are booleans, so
    ``save_strategy: no`` keeps the word "no" (a bool field still reads it as false), and
    ``2e-4`` is a number (YAML 1.1 wants a dot in a float: ``2.0e-4``)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def load_yaml_file(path: str) -> dict[str, Any]:
    """The flat mapping in ``path``; a missing file, a syntax error or a non-mapping is a ConfigError."""
    try:
        with open(path) as fh:
            data = yaml.load(fh, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config is a flat mapping of key: value lines, not a {type(data).__name__}")
    return data


def parse_override(text: str) -> Any:
    """A ``key=value`` value read as one YAML scalar (``[a, b]`` and ``{k: v}`` as a list and a
    mapping); text YAML would read as a mapping without braces (``a: b``) stays text."""
    try:
        value = yaml.load(text, Loader=_Loader)  # noqa: S506
    except yaml.YAMLError:
        return text
    if isinstance(value, (dict, list)) and not text.lstrip().startswith(("{", "[")):
        return text
    return value


class _Mismatch(Exception):
    """Internal: a value that does not convert to a type hint."""


def _is_enum(hint: Any) -> bool:
    return isinstance(hint, type) and issubclass(hint, enum.Enum)


def _is_union(hint: Any) -> bool:
    return get_origin(hint) in (Union, types.UnionType)


def _words(values: Iterable[Any]) -> str:
    return ", ".join(str(v) for v in values)


def describe(hint: Any) -> str:
    """A type hint as a user reads it: ``float``, ``int or none``, ``one of lora, freeze, full``."""
    if hint is Any:
        return "any value"
    if _is_union(hint):
        members = [m for m in get_args(hint) if m is not NoneType]
        if any(_is_enum(m) for m in members) and str in members:
            members = [m for m in members if m is not str]  # the str is an enum's spelling
        text = " or ".join(describe(m) for m in members)
        return text + " or none" if NoneType in get_args(hint) else text
    if get_origin(hint) is Literal:
        return "one of " + _words(get_args(hint))
    if _is_enum(hint):
        return "one of " + _words(m.value for m in hint)
    if hint is bool:
        return "true or false"
    if hint is int:
        return "an integer"
    if hint is float:
        return "a number"
    if hint is str:
        return "text"
    origin = get_origin(hint) or hint
    if origin in (list, tuple, set):
        args = get_args(hint)
        return f"a list of {describe(args[0]) if args else 'values'}"
    if origin is dict:
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


def short_type(hint: Any) -> str:
    """A compact type for listings: ``float``, ``int | None``, ``lora | freeze | full``."""
    if hint is Any:
        return "any"
    if _is_union(hint):
        members = list(get_args(hint))
        if any(_is_enum(m) for m in members) and str in members:
            members.remove(str)
        return " | ".join("None" if m is NoneType else short_type(m) for m in members)
    if get_origin(hint) is Literal:
        return " | ".join(str(v) for v in get_args(hint))
    if _is_enum(hint):
        return " | ".join(str(m.value) for m in hint)
    args = get_args(hint)
    origin = get_origin(hint)
    if origin is not None and args:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(short_type(a) for a in args)}]"
    return getattr(hint, "__name__", str(hint))


def to_bool(value: Any) -> bool:
    """true/false, yes/no, on/off, 1/0 (any case; transformers' ``string_to_bool`` words and on/off)."""
    from argparse import ArgumentTypeError

    from transformers.hf_argparser import string_to_bool

    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ("on", "off"):
            return word == "on"
        try:
            return string_to_bool(word)
        except ArgumentTypeError:
            pass
    raise _Mismatch


def is_true(value: Any) -> bool:
    """``to_bool`` for callers outside this module: a ValueError where the value is no boolean."""
    try:
        return to_bool(value)
    except _Mismatch:
        raise ValueError(f"{value!r} is not true or false") from None


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise _Mismatch
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip().replace("_", "")
        try:
            return int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                raise _Mismatch from None
            if number.is_integer():
                return int(number)
    raise _Mismatch


def _to_float(value: Any) -> float | int:
    if isinstance(value, bool):
        raise _Mismatch
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return float(value.strip().replace("_", ""))
        except ValueError:
            raise _Mismatch from None
    raise _Mismatch


def _is_none_word(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "~"))


def convert(value: Any, hint: Any) -> Any:
    """``value`` as ``hint`` says: bool, int, float, str, Optional/Union, Literal, Enum, list, dict.

    A union tries its other types before ``str`` (as transformers' HfArgumentParser prefers the
    non-str type), so ``gradient_checkpointing_layers=3`` is the int 3 and ``auto`` stays text; a
    union of an enum and ``str`` takes only the enum's values. Types it does not know pass as they
    are, for their dataclass to judge. Raises ``_Mismatch`` when the value does not fit."""
    if hint is Any or hint is object:
        return value
    if _is_union(hint):
        return _convert_union(value, get_args(hint))
    if value is None:
        raise _Mismatch
    origin = get_origin(hint)
    if origin is Literal:
        choices = get_args(hint)
        for choice in choices:
            if type(choice) is type(value) and choice == value:
                return choice
        if isinstance(value, str):
            for choice in choices:
                if str(choice).lower() == value.strip().lower():
                    return choice
        raise _Mismatch
    if _is_enum(hint):
        if isinstance(value, hint):
            return value
        for candidate in (value, value.strip().lower() if isinstance(value, str) else value):
            try:
                return hint(candidate)
            except ValueError:
                continue
        raise _Mismatch
    if hint is bool:
        return to_bool(value)
    if hint is int:
        return _to_int(value)
    if hint is float:
        return _to_float(value)
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _Mismatch
    container = origin or hint
    if container in (list, tuple, set):
        args = get_args(hint)
        item = args[0] if args else Any
        if isinstance(value, (list, tuple, set)):
            items = list(value)
        elif isinstance(value, str):
            items = [part.strip() for part in value.split(",") if part.strip()]
        else:
            items = [value]
        return [convert(v, item) for v in items]
    if container is dict:
        if isinstance(value, dict):
            return value
        if isinstance(value, str) and value.strip().startswith("{"):
            parsed = parse_override(value)
            if isinstance(parsed, dict):
                return parsed
        raise _Mismatch
    return value


def _convert_union(value: Any, members: tuple[Any, ...]) -> Any:
    if _is_none_word(value) and NoneType in members:
        return None
    if value is None:
        raise _Mismatch
    members = tuple(m for m in members if m is not NoneType)
    has_enum = any(_is_enum(m) for m in members)
    if isinstance(value, str):
        for member in members:
            if member is str:
                continue
            if (get_origin(member) or member) in (list, tuple, set, dict) and str in members:
                continue  # text is the field's own spelling of it (JSON, a regex, a path)
            try:
                return convert(value, member)
            except _Mismatch:
                continue
        if str in members and not has_enum:
            return value
        raise _Mismatch
    for member in members:  # a value already of one of the types stays as it is
        if member is bool and isinstance(value, bool):
            return value
        if member in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
            if member is float or isinstance(value, int):
                return value
    for member in members:
        try:
            return convert(value, member)
        except _Mismatch:
            continue
    raise _Mismatch


def field_hints(cls: type) -> dict[str, Any]:
    """Resolved type hints of a dataclass's init fields (string annotations evaluated)."""
    import typing

    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def convert_field(key: str, value: Any, hint: Any, metadata: Any, where: str, *, hint_may_be_narrow: bool = False) -> Any:
    """``value`` converted for field ``key``, then checked against the field's ``choices`` /
    ``pattern`` metadata; a ConfigError naming key, value, expected type and ``where`` otherwise.

    ``hint_may_be_narrow`` (transformers' TrainingArguments): a union field accepts more than its
    hint says (``fsdp: true``, an ``AcceleratorConfig`` object), so a value that is not text and
    fits none of the union's types passes as it is, for the dataclass to judge. Text is still
    converted, and scalar fields (bool, int, float) stay strict."""
    try:
        converted = convert(value, hint)
    except _Mismatch:
        if hint_may_be_narrow and _is_union(hint) and value is not None and not isinstance(value, str):
            return value
        raise ConfigError(f"{where}: {key}: {value!r} is not {describe(hint)}") from None
    except ValueError as exc:  # an enum list member, a dataclass-typed item
        raise ConfigError(f"{where}: {key}: {value!r} ({exc})") from None
    check_choices(key, converted, metadata or {}, where)
    return converted


def check_choices(key: str, value: Any, metadata: Any, where: str) -> None:
    """A field's ``choices`` (and ``pattern``, a regex of other accepted words) bound the values of
    the choices' own types; values of the field's other types (true for ``compile_cpp_wrapper``) pass."""
    choices = metadata.get("choices")
    pattern = metadata.get("pattern")
    if (not choices and not pattern) or value is None:
        return
    choices = tuple(choices or ())
    kinds = {type(c) for c in choices} or {str}
    if type(value) not in kinds or value in choices:
        return
    if pattern and isinstance(value, str) and re.fullmatch(pattern, value):
        return
    hint = metadata.get("choices_hint")
    allowed = _words(choices) + (f" or {hint}" if hint else "")
    near = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    suggestion = f"; did you mean {near[0]!r}?" if near else ""
    raise ConfigError(f"{where}: {key}: {value!r} is not one of {allowed}{suggestion}")


def did_you_mean(word: str, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest known word, else an empty string."""
    near = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    return f"; did you mean {near[0]!r}?" if near else ""
