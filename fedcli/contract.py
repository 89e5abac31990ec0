"""Contracts for every document that crosses a boundary: bounded, depth-checked, typed, strict.

Why one module: a security reviewer reads here what "valid" means for everything fedcli
reads from a user or a store. Documents are pydantic v2 models in strict mode with unknown
keys forbidden and non-finite floats refused (pydantic because it is maintained, its errors
carry the path of the bad field, and the spec's reference page is generated from the same
models). pydantic is imported only by the commands that read documents, never by `--help`.

The order for untrusted bytes is always: bound the size (before reading), bound the nesting
depth (before parsing), parse, verify the signature, then validate against the model.
"""

from __future__ import annotations

import difflib
import json
import re
import tomllib
import typing
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from fedcli.errors import ContractError, FedcliError, InputError

if TYPE_CHECKING:
    from pydantic import BaseModel, ConfigDict

MAX_DEPTH = 16  # deeper than any fedcli document needs; json and tomllib recurse per level
_JSON_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_TOML_STRINGS = re.compile(rb'"""(?:[^\\]|\\.)*?"""|\'\'\'.*?\'\'\'|"(?:[^"\\\n]|\\.)*"|\'[^\'\n]*\'|#[^\n]*', re.S)

M = TypeVar("M", bound="BaseModel")


def nesting_depth(data: bytes, strings: re.Pattern = _JSON_STRINGS) -> int:
    """Deepest bracket nesting outside string literals, found without parsing (numpy scan)."""
    stripped = strings.sub(b"", bytes(data))
    arr = np.frombuffer(stripped, dtype=np.uint8)
    step = np.isin(arr, (ord("["), ord("{"))).astype(np.int32) - np.isin(arr, (ord("]"), ord("}"))).astype(np.int32)
    step = step[step != 0]
    return int(np.cumsum(step).max()) if step.size else 0


def check_depth(
    data: bytes,
    what: str,
    max_depth: int = MAX_DEPTH,
    error: type[FedcliError] = ContractError,
    strings: re.Pattern = _JSON_STRINGS,
) -> None:
    depth = nesting_depth(data, strings)
    if depth > max_depth:
        raise error(
            f"{what} nests {depth} levels deep (at most {max_depth}); refused before parsing", reason="too-deep"
        )


def check_size(size: int, max_bytes: int, what: str, error: type[FedcliError] = ContractError) -> None:
    if size > max_bytes:
        raise error(
            f"{what} is {size:,} bytes, more than the {max_bytes:,} allowed; refused before reading", reason="oversize"
        )


def load_json(data: bytes, what: str, max_bytes: int, error: type[FedcliError] = ContractError) -> Any:
    """Parse JSON from an untrusted source: size and depth bounded first, one-line errors."""
    check_size(len(data), max_bytes, what, error)
    check_depth(data, what, error=error)
    try:
        return json.loads(data, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise error(f"{what} is not valid JSON ({str(e).splitlines()[0][:120]})", reason="malformed") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a finite number")


def load_toml(data: bytes, what: str, max_bytes: int, error: type[FedcliError] = InputError) -> dict:
    """Parse TOML from a user or the store: size and depth bounded first, one-line errors."""
    check_size(len(data), max_bytes, what, error)
    check_depth(data, what, error=error, strings=_TOML_STRINGS)
    try:
        return tomllib.loads(data.decode("utf-8-sig"))  # Windows editors save "UTF-8 with BOM"
    except UnicodeDecodeError:
        raise error(f"{what} is not UTF-8 text (is it a binary or a private key file?)", reason="malformed") from None
    except (tomllib.TOMLDecodeError, RecursionError) as e:
        raise error(f"{what} is not valid TOML: {str(e)[:160]}", reason="malformed") from None


def validate(model: type[M], raw: Any, what: str, error: type[FedcliError] = ContractError) -> M:
    """Validate raw (parsed) data against a model; the first problem becomes one line with its path."""
    from pydantic import ValidationError

    try:
        return model.model_validate(raw, strict=True)
    except ValidationError as e:
        # An unknown key first: a typo (`epoch`) is what explains a missing key (`epochs`).
        errors = sorted(e.errors(), key=lambda err: err.get("type") != "extra_forbidden")
        first = {**errors[0], "loc": _without_union_tags(errors[0])}
        raise error(f"{what}: {describe(model, first)}", reason="malformed") from None
    except FedcliError as e:  # a model validator raised one of ours (e.g. an invalid name)
        raise error(f"{what}: {e}", reason="malformed") from None


_UNION_TAGS = {"str", "int", "float", "bool", "constrained-str"}  # pydantic names union members in error paths


def _without_union_tags(err: Mapping[str, Any]) -> tuple:
    """pydantic puts union members ('str', 'int') in a path; an unknown key's own name is kept."""
    loc = tuple(err.get("loc", ()))
    last = loc[-1:] if err.get("type") == "extra_forbidden" else ()
    return tuple(p for p in loc[: len(loc) - len(last)] if p not in _UNION_TAGS) + last


def describe(model: type, err: dict) -> str:
    """One readable sentence for a pydantic error: where, what, and a 'did you mean' for typos."""
    loc = [p for p in err.get("loc", ()) if not (isinstance(p, str) and p.startswith("function-"))]
    where = _path(loc)
    kind = err.get("type", "")
    if kind == "extra_forbidden" and loc:
        known = fields_at(model, loc[:-1])
        hint = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
        did = f"; did you mean '{hint[0]}'?" if hint else (f" (known: {', '.join(sorted(known))})" if known else "")
        return f"unknown key '{where}'{did}"
    if kind == "missing":
        return f"'{where}' is required"
    msg = err.get("msg", "invalid value")
    msg = msg.removeprefix("Value error, ")
    got = err.get("input")
    shown = "" if isinstance(got, (dict, list)) else f" (got {_short(got)})"
    return f"'{where}' {msg[0].lower() + msg[1:] if msg else 'is invalid'}{shown}" if where else f"{msg}{shown}"


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _path(loc) -> str:
    out = ""
    for p in loc:
        if not isinstance(p, int) and not str(p).isprintable():  # a key from the input: keep the message one line
            p = str(p).encode("unicode_escape").decode("ascii")
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def fields_at(model: type, loc) -> list[str]:
    """Field names (aliases where set) of the model reached by following loc from `model`."""
    from pydantic import BaseModel

    current: Any = model
    for part in loc:
        current = _unwrap(current)
        if isinstance(part, int):
            continue
        if isinstance(current, type) and issubclass(current, BaseModel):
            f = next((f for n, f in current.model_fields.items() if (f.alias or n) == part), None)
            if f is None:
                return []
            current = f.annotation
        else:
            return []
    current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return [f.alias or n for n, f in current.model_fields.items()]
    return []


def _unwrap(tp):
    """list[X] / X | None / Annotated[X, ...] -> X (the model a path continues into)."""
    from pydantic import BaseModel

    for _ in range(5):
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            return tp
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        if models:
            return models[0]
        if not args:
            return tp
        tp = args[-1] if typing.get_origin(tp) is dict else args[0]
    return tp


def strict_config() -> ConfigDict:
    """The configuration every document model uses: strict types, no unknown keys, finite floats."""
    from pydantic import ConfigDict

    return ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)
