"""Declared layouts: a skeleton masa-rt does not know, described in a small YAML/JSON file.

A tracker with its own skeleton (a 23-joint sports skeleton, SMPL-24, ...) is declared once
(format: ``docs/formats.md``, "Layout files"; example: ``examples/layouts/sports23.yaml``)
and then works wherever a built-in layout does, by name: ``masa-rt ... --layout-file FILE``
on the commands that read data, ``layout_file`` in a dataset manifest, or the declaration
carried inside a sequence file, a checkpoint's input spec, an ONNX export's metadata and a
client's hello.

Everything that travels carries the *declaration*: the checked file contents in one
canonical form (:attr:`Declaration.canonical`, plain JSON types). :func:`declare` turns
a declaration into a :class:`~masa_rt.skeleton.Layout` registered under its name (with its
``convert_to`` joint maps), so ``get_layout``, ``normalise``, ``convert`` and every file
reader see it as they see ``penn13``. One process holds at most one declaration per name:
a second, different one is refused, never silently swapped.

Numpy and pyyaml only: the serving path imports this module (it must stay torch-free).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from masa_rt.skeleton import LAYOUTS, Layout, get_layout, register_layout

__all__ = [
    "Declaration",
    "LayoutFileError",
    "conversion_targets",
    "declaration_of",
    "declare",
    "declare_json",
    "declared_layouts",
    "hello_layout",
    "is_declared",
    "load_layout_file",
    "parse_declaration",
    "same_skeleton",
]

NAME_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
_KEYS = ("name", "dims", "up_axis", "joints", "root", "parents", "mirror", "ref_bone",
         "convert_to")
_REQUIRED = ("name", "dims", "joints", "root", "parents", "ref_bone")


class LayoutFileError(ValueError):
    """A layout declaration that cannot be used; one line naming its source and the problem."""

    def __init__(self, source: str, problem: str) -> None:
        self.source, self.problem = source, problem
        super().__init__(f"{source}: {problem}".replace("\n", " "))


@dataclass(frozen=True)
class Declaration:
    """A checked declaration: the ``Layout``, its joint maps to other layouts (target name
    -> for each target joint the source joint index, -1 missing), its canonical form and
    where it came from (for messages)."""

    layout: Layout
    maps: dict[str, np.ndarray]
    canonical: dict[str, Any]
    source: str


# ---------------------------------------------------------------------------------------
# Parsing and validation
# ---------------------------------------------------------------------------------------

class _Parser:
    """Checks one declaration field by field; every failure is a :class:`LayoutFileError`."""

    def __init__(self, source: str, strict: bool = True) -> None:
        self.source = source
        # strict: a conversion to a layout this process does not know is an error (a
        # typo in a user's file); else it is dropped (a declaration read back from a
        # recording or a model may name a layout declared elsewhere).
        self.strict = strict

    def fail(self, problem: str) -> LayoutFileError:
        return LayoutFileError(self.source, problem)

    def parse(self, obj: Any) -> Declaration:
        if not isinstance(obj, dict):
            raise self.fail(f"expected a mapping of {', '.join(_REQUIRED)}, ..., found "
                            f"{type(obj).__name__}")
        unknown = sorted(str(k) for k in obj if k not in _KEYS)
        if unknown:
            raise self.fail(f"unknown key {unknown[0]!r} (known: {', '.join(_KEYS)})")
        for key in _REQUIRED:
            if key not in obj:
                raise self.fail(f"missing {key!r}")
        name = self.name(obj["name"])
        dims, up_axis = self.dims(obj["dims"], obj.get("up_axis", 1))
        joints = self.joints(obj["joints"])
        root = self.joint("root", obj["root"], joints)
        parents = self.parents(obj["parents"], joints, root)
        mirror = self.mirror(obj.get("mirror") or [], joints, parents)
        ref_bone = self.ref_bone(obj["ref_bone"], joints)
        convert_to = self.convert_to(obj.get("convert_to") or {}, name, dims, joints)
        canonical = {"name": name, "dims": dims, "up_axis": up_axis, "joints": joints,
                     "root": root, "parents": parents, "mirror": mirror,
                     "ref_bone": ref_bone, "convert_to": convert_to}
        return _build(canonical, self.source)

    # --- scalars --------------------------------------------------------------------------

    def name(self, value: Any) -> str:
        if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
            raise self.fail(f"name: expected a letter then up to 63 letters, digits, '_', "
                            f"'.', '-', found {value!r}")
        if value in LAYOUTS and not is_declared(value):
            raise self.fail(f"name: {value!r} is a built-in layout; pick another name")
        return value

    def dims(self, dims: Any, up_axis: Any) -> tuple[int, int]:
        if not _is_int(dims) or dims not in (2, 3):
            raise self.fail(f"dims: expected 2 or 3, found {dims!r}")
        if not _is_int(up_axis) or not 0 <= up_axis < dims:
            raise self.fail(f"up_axis: expected an integer in [0, {dims}), found {up_axis!r}")
        return int(dims), int(up_axis)

    def joints(self, value: Any) -> list[str]:
        if not isinstance(value, list) or not value:
            raise self.fail(f"joints: expected a non-empty list of names, found {value!r:.60}")
        seen: set[str] = set()
        for i, j in enumerate(value):
            if not isinstance(j, str) or not j.strip():
                raise self.fail(f"joints[{i}]: expected a non-empty name, found {j!r}")
            if j in seen:
                raise self.fail(f"joints: duplicate name {j!r}")
            seen.add(j)
        return list(value)

    def joint(self, field: str, value: Any, joints: list[str]) -> str:
        if not isinstance(value, str) or value not in joints:
            raise self.fail(f"{field}: unknown joint {value!r}")
        return value

    # --- the tree -------------------------------------------------------------------------

    def parents(self, value: Any, joints: list[str], root: str) -> dict[str, str]:
        """child -> parent for every joint but the root: one tree, rooted at ``root``."""
        if not isinstance(value, dict):
            raise self.fail(f"parents: expected a mapping joint -> parent joint, found "
                            f"{type(value).__name__}")
        for child, parent in value.items():
            self.joint("parents", child, joints)
            if child == root and parent is not None:
                raise self.fail(f"parents: the root {root!r} has a parent ({parent!r}); "
                                "the root is the top of the tree")
            if child != root:
                self.joint(f"parents[{child!r}]: parent", parent, joints)
        out = {j: value[j] for j in joints if j != root and j in value}
        missing = [j for j in joints if j != root and j not in out]
        if missing:
            raise self.fail(f"parents: joint {missing[0]!r} has no parent (every joint but "
                            f"the root {root!r} needs one)")
        reaches_root = {root}  # climbs already known to end at the root: linear overall
        for start in joints:
            path, on_path, j = [], set(), start
            while j not in reaches_root:
                if j in on_path:
                    cycle = path[path.index(j):]
                    raise self.fail(f"parents: a cycle: {' -> '.join(cycle)} -> {j}")
                path.append(j)
                on_path.add(j)
                j = out[j]
            reaches_root.update(path)
        return out

    def mirror(self, value: Any, joints: list[str], parents: dict[str, str]) -> list[list[str]]:
        """Left/right pairs; every other joint is its own mirror image (the midline)."""
        if not isinstance(value, list):
            raise self.fail(f"mirror: expected a list of [left, right] pairs, found "
                            f"{type(value).__name__}")
        other: dict[str, str] = {}
        pairs = []
        for i, pair in enumerate(value):
            if not isinstance(pair, list | tuple) or len(pair) != 2:
                raise self.fail(f"mirror[{i}]: expected a [left, right] pair, found {pair!r}")
            a, b = (self.joint(f"mirror[{i}]", j, joints) for j in pair)
            if a == b:
                raise self.fail(f"mirror[{i}]: a joint paired with itself ({a!r}); leave "
                                "midline joints out")
            for j in (a, b):
                if j in other:
                    raise self.fail(f"mirror: joint {j!r} is in two pairs")
            other[a], other[b] = b, a
            pairs.append([a, b])
        for j in joints:  # mirroring must map the bone tree onto itself
            m = other.get(j, j)
            pj, pm = parents.get(j), parents.get(m)
            if other.get(pj, pj) != pm:
                what = f"pair ({j!r}, {m!r})" if m != j else f"midline joint {j!r}"
                raise self.fail(f"mirror: {what} is not symmetric: the parents {pj!r} and "
                                f"{pm!r} are not each other's mirror image")
        return pairs

    def ref_bone(self, value: Any, joints: list[str]) -> list[list[str]]:
        """One ``[a, b]`` or a list of them (the unit of scale is their mean length)."""
        bones = [value] if isinstance(value, list) and value and isinstance(value[0], str) \
            else value
        if not isinstance(bones, list) or not bones:
            raise self.fail(f"ref_bone: expected [joint, joint] or a list of such pairs, "
                            f"found {value!r:.60}")
        out = []
        for i, bone in enumerate(bones):
            if not isinstance(bone, list | tuple) or len(bone) != 2:
                raise self.fail(f"ref_bone[{i}]: expected [joint, joint], found {bone!r:.60}")
            a, b = (self.joint(f"ref_bone[{i}]", j, joints) for j in bone)
            if a == b:
                raise self.fail(f"ref_bone[{i}]: both ends are {a!r} (a bone of length 0)")
            out.append([a, b])
        return out

    # --- conversions ----------------------------------------------------------------------

    def convert_to(self, value: Any, name: str, dims: int,
                   joints: list[str]) -> dict[str, dict[str, str]]:
        """target layout -> {target joint: our joint}; target joints left out are missing."""
        if not isinstance(value, dict):
            raise self.fail(f"convert_to: expected a mapping target layout -> joint map, "
                            f"found {type(value).__name__}")
        out = {}
        for target, joint_map in value.items():
            field = f"convert_to[{target!r}]"
            if target == name:
                raise self.fail(f"{field}: a layout converts to itself already")
            try:
                dst = get_layout(target)
            except ValueError:
                if not self.strict:
                    continue
                raise self.fail(f"{field}: unknown layout {target!r} (known: "
                                f"{', '.join(sorted(LAYOUTS))})") from None
            if dst.dims != dims:
                raise self.fail(f"{field}: {target} has {dst.dims} coordinates per joint, "
                                f"this layout {dims}")
            if not isinstance(joint_map, dict) or not joint_map:
                raise self.fail(f"{field}: expected a non-empty mapping {target} joint -> "
                                "joint of this layout")
            for t_joint, s_joint in joint_map.items():
                if t_joint not in dst.joint_names:
                    raise self.fail(f"{field}: {target} has no joint {t_joint!r}")
                self.joint(f"{field}[{t_joint!r}]", s_joint, joints)
            out[str(target)] = dict(joint_map)
        return out


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _build(c: dict[str, Any], source: str) -> Declaration:
    """The Layout and joint maps of a canonical declaration."""
    index = {j: i for i, j in enumerate(c["joints"])}
    parents = tuple(index[c["parents"][j]] if j in c["parents"] else -1 for j in c["joints"])
    mirror = list(range(len(index)))
    for a, b in c["mirror"]:
        mirror[index[a]], mirror[index[b]] = index[b], index[a]
    layout = Layout(c["name"], tuple(c["joints"]), parents, tuple(mirror),
                    root=(index[c["root"]],),
                    ref_bone=tuple((index[a], index[b]) for a, b in c["ref_bone"]),
                    dims=c["dims"], up_axis=c["up_axis"])
    maps = {}
    for target, joint_map in c["convert_to"].items():
        dst = get_layout(target)
        maps[target] = np.array([index[joint_map[t]] if t in joint_map else -1
                                 for t in dst.joint_names], dtype=np.int64)
    return Declaration(layout, maps, c, source)


def parse_declaration(obj: Any, source: str = "<declaration>",
                      strict: bool = True) -> Declaration:
    """Check a declaration (a file's parsed contents, or a canonical dict) without
    registering it; raises :class:`LayoutFileError` naming ``source``. ``strict=False``
    drops conversions to layouts this process does not know instead of refusing them."""
    return _Parser(source, strict).parse(obj)


# ---------------------------------------------------------------------------------------
# Files and the registry
# ---------------------------------------------------------------------------------------

_DECLARED: dict[str, Declaration] = {}


def load_layout_file(path: str | os.PathLike[str]) -> Layout:
    """Read, check and :func:`declare` a layout file (``.yaml``, ``.yml`` or ``.json``)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"layout file {p} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LayoutFileError(str(p), f"unreadable ({type(e).__name__}: {e})") from None
    try:
        # YAML is a superset of JSON, but JSON's own parser gives the better message there.
        obj = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        kind = "JSON" if p.suffix.lower() == ".json" else "YAML"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LayoutFileError(str(p), f"not valid {kind} ({first})") from None
    return declare(obj, str(p))


def declare(obj: Any, source: str = "<declaration>", strict: bool = True) -> Layout:
    """Check a declaration and register its layout (and conversions) in this process.

    Declaring the same skeleton again adds the conversions it has and the known one lacks
    (a layout file may gain a ``convert_to`` after recordings were made); a *different*
    skeleton, or another map to the same target, under a declared name is refused (data
    written for one must never be read as the other). ``strict``: see
    :func:`parse_declaration` (False for declarations read back from files and models).
    """
    decl = obj if isinstance(obj, Declaration) else parse_declaration(obj, source, strict)
    known = _DECLARED.get(decl.layout.name)
    if known is None:
        _DECLARED[decl.layout.name] = decl
        register_layout(decl.layout, decl.maps)
        return decl.layout
    if not same_skeleton(known.canonical, decl.canonical):
        raise LayoutFileError(decl.source, f"layout {decl.layout.name!r} differs from the one "
                                           f"already declared by {known.source}")
    _merge_conversions(known, decl)
    return known.layout


def _merge_conversions(known: Declaration, new: Declaration) -> None:
    """Register ``new``'s conversions that ``known`` (the same skeleton) lacks."""
    ours, theirs = known.canonical["convert_to"], new.canonical["convert_to"]
    for target in set(ours) & set(theirs):
        if ours[target] != theirs[target]:
            raise LayoutFileError(new.source, f"convert_to[{target!r}] differs from the one "
                                              f"declared by {known.source}")
    added = {t: m for t, m in new.maps.items() if t not in known.maps}
    if not added:
        return
    canonical = dict(known.canonical, convert_to={**ours, **{t: theirs[t] for t in added}})
    _DECLARED[known.layout.name] = Declaration(known.layout, {**known.maps, **added},
                                               canonical, known.source)
    register_layout(known.layout, added)


def declare_json(text: str, source: str) -> Layout:
    """:func:`declare` a declaration stored as JSON text (sequence files; not strict)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise LayoutFileError(source, f"layout declaration is not valid JSON ({e})") from None
    return declare(obj, source, strict=False)


def is_declared(name: str) -> bool:
    """``name`` is a layout declared in this process (not a built-in one)."""
    return name in _DECLARED


def declaration_of(name: str) -> dict[str, Any] | None:
    """The canonical declaration of a declared layout (a copy); None for a built-in one."""
    decl = _DECLARED.get(name)
    return None if decl is None else json.loads(json.dumps(decl.canonical))


def declared_layouts() -> list[dict[str, Any]]:
    """Every declaration of this process, canonical: what a child process is handed so
    that it knows the same layouts (``engine.serve_commands.prepare``)."""
    return [declaration_of(name) for name in _DECLARED]


def conversion_targets(name: str | None) -> list[str]:
    """The layouts a declared layout converts to (its ``convert_to``); [] for others."""
    decl = _DECLARED.get(name) if name is not None else None
    return [] if decl is None else list(decl.maps)


def same_skeleton(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two canonical declarations describe the same skeleton (their conversions aside)."""
    return ({k: v for k, v in a.items() if k != "convert_to"}
            == {k: v for k, v in b.items() if k != "convert_to"})


# ---------------------------------------------------------------------------------------
# Sessions (the server)
# ---------------------------------------------------------------------------------------

def hello_layout(name: str, declaration: Any, model_layout: str, max_joints: int = 128
                 ) -> tuple[Layout, np.ndarray | None]:
    """For a client's hello that declares its layout ``name``: the declared ``Layout`` and
    the joint map from it to ``model_layout`` (None: the model reads it as it is).

    A ``LayoutFileError`` (one line) when the declaration is invalid, declares another
    name, differs from the model's own layout of that name, or has no ``convert_to`` the
    model's layout, or has more than ``max_joints`` joints (no frame could carry them).
    Nothing is registered (a server must not let one client's declaration change what a
    name means for the others).
    """
    source = f"hello: layout_declaration of {name!r}"
    joints = declaration.get("joints") if isinstance(declaration, dict) else None
    if isinstance(joints, list) and len(joints) > max_joints:  # before any work on it
        raise LayoutFileError(source, f"{len(joints)} joints, a frame carries at most "
                                      f"{max_joints}")
    decl = parse_declaration(declaration, source, strict=False)
    if decl.layout.name != name:
        raise LayoutFileError(source, f"declares {decl.layout.name!r}, not {name!r}")
    if name == model_layout:
        mine = declaration_of(name)
        if mine is None or not same_skeleton(mine, decl.canonical):
            raise LayoutFileError(source, f"differs from the {name!r} this model reads")
        return decl.layout, None
    if model_layout not in decl.maps:
        targets = ", ".join(decl.maps) or "none"
        raise LayoutFileError(source, f"this model reads {model_layout!r} and the "
                                      f"declaration converts only to: {targets}")
    return decl.layout, decl.maps[model_layout].copy()

