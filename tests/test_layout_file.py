"""masa_rt.layout_file: declared layouts are checked in one line, registered by name, and
travel in sequence files, manifests and input specs (properties by hypothesis)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from masa_rt.layout_file import (
    LayoutFileError,
    declaration_of,
    declare,
    hello_layout,
    load_layout_file,
    parse_declaration,
)
from masa_rt.preprocess import InputSpec
from masa_rt.sequence import (
    ManifestError,
    Sequence,
    load_sequence,
    save_sequence,
    write_dataset_files,
)
from masa_rt.skeleton import (
    apply_map,
    conversion_map,
    get_layout,
    mirror,
    normalise,
    topological_order,
)

ROOT = Path(__file__).resolve().parents[1]
SPORTS23 = ROOT / "examples" / "layouts" / "sports23.yaml"


@pytest.fixture(autouse=True, scope="module")
def _forget_declarations(forget_layout_declarations):
    """The layouts this module declares are forgotten at its end (conftest.py)."""


def example() -> dict:
    """The shipped example's contents (a fresh copy to break)."""
    return yaml.safe_load(SPORTS23.read_text())


def renamed(name: str) -> dict:
    d = example()
    d["name"] = name
    return d


# --------------------------------------------------------------------------- the example

def test_the_shipped_example_declares_a_23_joint_skeleton_that_converts_to_penn13():
    lay = load_layout_file(SPORTS23)
    assert get_layout("sports23") is lay
    assert (lay.num_joints, lay.dims, lay.root) == (23, 2, (lay.index("pelvis"),))
    assert lay.mirror[lay.index("l_knee")] == lay.index("r_knee")
    assert lay.mirror[lay.index("spine")] == lay.index("spine")
    m = conversion_map("sports23", "penn13")
    penn = get_layout("penn13")
    assert [lay.joint_names[i] for i in m] == list(penn.joint_names)  # same names here
    load_layout_file(SPORTS23)  # declaring the same file again is a no-op


# --------------------------------------------------------------------------- bad files

def _break(path: str, value) -> dict:
    """The example with one field (``a.b`` path) set to ``value`` (``...``: removed)."""
    d = example()
    *keys, last = path.split(".")
    node = d
    for k in keys:
        node = node[k]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return d


BAD = [
    (_break("parents.spine", "tail"), "parents['spine']: parent: unknown joint 'tail'"),
    (_break("parents.neck", "head"), "a cycle"),
    (_break("joints", example()["joints"] + ["neck"]), "duplicate name 'neck'"),
    (_break("mirror", example()["mirror"] + [["l_toe", "r_heel"]]), "in two pairs"),
    (_break("mirror", [["l_shoulder", "r_shoulder"], ["l_elbow", "r_knee"]]),
     "not symmetric"),
    (_break("mirror", [["l_elbow", "r_elbow"]]), "not symmetric"),
    (_break("mirror", [["neck", "neck"]]), "paired with itself"),
    (_break("dims", 4), "dims: expected 2 or 3, found 4"),
    (_break("dims", True), "dims: expected 2 or 3"),
    (_break("up_axis", 2), "up_axis"),
    (_break("parents.pelvis", "spine"), "the root 'pelvis' has a parent"),
    (_break("parents.l_toe", ...), "joint 'l_toe' has no parent"),
    (_break("root", "tail"), "root: unknown joint 'tail'"),
    (_break("ref_bone", ["neck", "neck"]), "both ends are 'neck'"),
    (_break("ref_bone", "neck"), "ref_bone"),
    (_break("name", "penn13"), "'penn13' is a built-in layout"),
    (_break("name", "two words"), "name: expected"),
    (_break("joints", []), "joints: expected a non-empty list"),
    (_break("ref_bone", ...), "missing 'ref_bone'"),
    (_break("colour", "red"), "unknown key 'colour'"),
    (_break("convert_to.coco18", {"nose": "nose"}), "unknown layout 'coco18'"),
    (_break("convert_to.h2o_hands", {"l_wrist": "l_wrist"}), "3 coordinates per joint"),
    (_break("convert_to.penn13.tail", "pelvis"), "penn13 has no joint 'tail'"),
    (_break("convert_to.penn13.head", "tail"), "unknown joint 'tail'"),
    (_break("convert_to.bad23", {"neck": "neck"}), "converts to itself"),
]


@pytest.mark.parametrize("bad, problem", BAD, ids=[p for _, p in BAD])
def test_a_bad_file_is_one_line_naming_the_file_and_the_problem(tmp_path, bad, problem):
    bad["name"] = bad["name"] if bad["name"] in ("penn13", "two words") else "bad23"
    path = tmp_path / "bad23.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(LayoutFileError) as e:
        load_layout_file(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and problem in msg and "\n" not in msg
    assert "bad23" not in _declared_names()  # nothing registered


def _declared_names() -> list[str]:
    return [n for n in ("bad23",) if declaration_of(n) is not None]


@pytest.mark.parametrize("text, suffix, problem", [
    ("name: [unclosed", ".yaml", "not valid YAML"),
    ("{\"name\": ", ".json", "not valid JSON"),
    ("- just\n- a list\n", ".yaml", "expected a mapping"),
    ("", ".yml", "expected a mapping"),
])
def test_unreadable_files_are_one_line(tmp_path, text, suffix, problem):
    path = tmp_path / f"x{suffix}"
    path.write_text(text)
    with pytest.raises(LayoutFileError, match=problem):
        load_layout_file(path)


def test_a_json_file_works_like_yaml(tmp_path):
    path = tmp_path / "j23.json"
    path.write_text(json.dumps(renamed("json23")))
    assert load_layout_file(path).num_joints == 23


def test_another_declaration_under_a_declared_name_is_refused():
    declare(renamed("twice23"), "first.yaml")
    other = renamed("twice23")
    other["mirror"] = []  # another skeleton under the same name
    with pytest.raises(LayoutFileError, match="differs from the one already declared by "
                                              "first.yaml"):
        declare(other, "second.yaml")


def test_a_redeclaration_may_add_conversions_but_not_change_one():
    bare = renamed("grow23")
    del bare["convert_to"]
    declare(bare, "old.yaml")  # recordings made before the file gained its convert_to
    with pytest.raises(ValueError, match="no joint mapping from grow23 to penn13"):
        conversion_map("grow23", "penn13")
    declare(renamed("grow23"), "new.yaml")
    assert conversion_map("grow23", "penn13").shape == (13,)
    assert "penn13" in declaration_of("grow23")["convert_to"]
    changed = renamed("grow23")
    changed["convert_to"]["penn13"]["head"] = "nose"
    with pytest.raises(LayoutFileError, match=r"convert_to\['penn13'\] differs from the one "
                                              "declared by old.yaml"):
        declare(changed, "changed.yaml")


def test_a_conversion_to_a_layout_unknown_here_is_an_error_in_a_file_only(tmp_path):
    decl = renamed("far23")
    decl["convert_to"]["elsewhere42"] = {"a": "neck"}
    with pytest.raises(LayoutFileError, match="unknown layout 'elsewhere42'"):
        parse_declaration(decl, "far23.yaml")
    # a recording (or model) made where elsewhere42 was declared still loads here
    path = tmp_path / "take.npz"
    np.savez(path, format_version=np.array(1), joints=_motion(), layout=np.array("far23"),
             fps=np.array(30.0), layout_declaration=np.array(json.dumps(decl)))
    assert load_sequence(path).layout == "far23"
    assert list(declaration_of("far23")["convert_to"]) == ["penn13"]


# --------------------------------------------------------------------------- properties

@st.composite
def trees(draw, min_joints: int = 1, max_joints: int = 30):
    """A declaration of a random tree in a random joint order (parents may come after
    their children), with its names -> parent names."""
    n = draw(st.integers(min_joints, max_joints))
    names = [f"j{i}" for i in draw(st.permutations(range(n)))]
    # build the tree over a hidden order, then list the joints in another one
    build = draw(st.permutations(names))
    parents = {build[k]: build[draw(st.integers(0, k - 1))] for k in range(1, n)}
    dims = draw(st.sampled_from([2, 3]))
    bone = [names[0], names[1]] if n > 1 else None
    decl = {"name": "prop", "dims": dims, "joints": names, "root": build[0],
            "parents": parents, "ref_bone": bone or [[names[0], names[0]]]}
    return decl


@settings(max_examples=60, deadline=None)
@given(trees(min_joints=2))
def test_any_tree_in_any_joint_order_is_accepted_and_walkable(decl):
    d = parse_declaration(decl, "prop.yaml")
    lay, names = d.layout, decl["joints"]
    for child, parent in decl["parents"].items():
        assert lay.parents[names.index(child)] == names.index(parent)
    assert lay.parents[names.index(decl["root"])] == -1
    order = topological_order(lay.parents)
    assert sorted(order) == list(range(len(names)))
    seen = set()
    for j in order:  # every parent comes before its children
        assert lay.parents[j] == -1 or lay.parents[j] in seen
        seen.add(j)
    again = parse_declaration(json.loads(json.dumps(d.canonical)), "again")
    assert again.canonical == d.canonical and again.layout == d.layout  # canonical is a fixpoint


@settings(max_examples=60, deadline=None)
@given(trees(min_joints=2), st.data())
def test_a_parent_pointing_down_its_own_branch_is_a_cycle(decl, data):
    parents = decl["parents"]
    child = data.draw(st.sampled_from(sorted(parents)))
    below = [j for j in parents if _ancestor(parents, child, j)]  # child's descendants
    target = data.draw(st.sampled_from(below + [child]))
    broken = copy.deepcopy(decl)
    broken["parents"][child] = target
    with pytest.raises(LayoutFileError, match="cycle"):
        parse_declaration(broken, "prop.yaml")


def _ancestor(parents: dict, a: str, j: str) -> bool:
    """``a`` is a proper ancestor of ``j``."""
    while j in parents:
        j = parents[j]
        if j == a:
            return True
    return False


@st.composite
def symmetric(draw):
    """A body: a midline chain and mirrored limbs hanging off it, in a shuffled order."""
    spine = draw(st.integers(1, 5))
    names = [f"m{i}" for i in range(spine)]
    parents = {f"m{i}": f"m{i - 1}" for i in range(1, spine)}
    pairs = []
    for limb in range(draw(st.integers(1, 4))):
        at = f"m{draw(st.integers(0, spine - 1))}"
        for k in range(draw(st.integers(1, 4))):
            for side in ("l", "r"):
                j = f"{side}{limb}_{k}"
                names.append(j)
                parents[j] = at if k == 0 else f"{side}{limb}_{k - 1}"
            pairs.append([f"l{limb}_{k}", f"r{limb}_{k}"])
    names = draw(st.permutations(names))
    decl = {"name": "sym", "dims": 3, "joints": list(names), "root": "m0",
            "parents": parents, "mirror": pairs, "ref_bone": [pairs[0]]}
    return decl


@settings(max_examples=60, deadline=None)
@given(symmetric(), st.data())
def test_mirror_pairs_give_an_involution_that_maps_the_tree_onto_itself(decl, data):
    lay = parse_declaration(decl, "sym.yaml").layout
    m = lay.mirror
    assert all(m[m[i]] == i for i in range(lay.num_joints))
    for j, p in enumerate(lay.parents):
        assert lay.parents[m[j]] == (-1 if p == -1 else m[p])
    x = np.asarray(data.draw(st.lists(st.floats(-10, 10), min_size=lay.num_joints * 3,
                                      max_size=lay.num_joints * 3)), np.float64)
    x = x.reshape(lay.num_joints, 3)
    np.testing.assert_allclose(mirror(mirror(x, lay), lay), x)  # mirroring twice: identity
    # swapping one pair's sides in only one limb breaks the symmetry
    a, b = data.draw(st.sampled_from(decl["mirror"]))
    broken = copy.deepcopy(decl)
    broken["mirror"] = [p for p in decl["mirror"] if p != [a, b]]
    if any(broken["parents"].get(j) in (a, b) for j in decl["joints"]):  # a child hangs off
        with pytest.raises(LayoutFileError, match="not symmetric"):
            parse_declaration(broken, "sym.yaml")


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_a_convert_to_map_copies_each_named_joint_and_leaves_the_rest_missing(data):
    penn = get_layout("penn13")
    decl = example()
    decl["name"] = "prop_map"
    ours = decl["joints"]
    chosen = data.draw(st.lists(st.sampled_from(penn.joint_names), unique=True, min_size=1))
    joint_map = {t: data.draw(st.sampled_from(ours)) for t in chosen}
    decl["convert_to"] = {"penn13": joint_map}
    d = parse_declaration(decl, "map.yaml")
    x = np.arange(len(ours) * 2, dtype=np.float64).reshape(len(ours), 2)
    y = apply_map(x, d.maps["penn13"])
    for t, name in enumerate(penn.joint_names):
        if name in joint_map:
            np.testing.assert_array_equal(y[t], x[ours.index(joint_map[name])])
        else:
            assert np.isnan(y[t]).all()


# --------------------------------------------------------------------------- where it travels

def _motion(frames: int = 20, joints: int = 23, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(0, 50, (1, joints, 2)) + 5 * rng.normal(size=(frames, joints, 2))
            ).astype(np.float32)


def test_a_sequence_file_carries_its_declaration_and_another_process_reads_it(tmp_path):
    load_layout_file(SPORTS23)
    path = tmp_path / "take.npz"
    save_sequence(path, Sequence(_motion(), "sports23", 30.0, activity="sprint"))
    code = ("import sys; from masa_rt.sequence import load_sequence; "
            "from masa_rt.skeleton import normalise; s = load_sequence(sys.argv[1]); "
            "print(s.layout, s.joints.shape, normalise(s.joints, s.layout).shape)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "sports23 (20, 23, 2) (20, 23, 2)"


def test_an_old_file_of_a_built_in_layout_is_unchanged(tmp_path):
    path = tmp_path / "penn.npz"
    save_sequence(path, Sequence(_motion(joints=13), "penn13", 30.0))
    with np.load(path) as f:
        assert "layout_declaration" not in f.files
    assert load_sequence(path).layout == "penn13"


def test_a_file_whose_declaration_is_broken_is_one_line(tmp_path):
    path = tmp_path / "take.npz"
    np.savez(path, format_version=np.array(1), joints=_motion(), layout=np.array("x23"),
             fps=np.array(30.0), layout_declaration=np.array('{"name": "x23"}'))
    with pytest.raises(ValueError, match=r"take.npz: field 'layout_declaration': expected a "
                                         r"valid layout declaration, found missing 'dims'"):
        load_sequence(path)


def test_a_manifest_names_its_layout_file_relative_to_the_dataset(tmp_path):
    decl = renamed("man23")
    (tmp_path / "layouts").mkdir()
    (tmp_path / "layouts" / "man23.yaml").write_text(yaml.safe_dump(decl))
    # files written by a tool that did not embed the declaration: the manifest names it
    for i in range(2):
        np.savez(tmp_path / f"s{i}.npz", format_version=np.array(1), joints=_motion(seed=i),
                 layout=np.array("man23"), fps=np.array(30.0))
    manifest = {"format_version": 1, "layout": "man23", "fps": 30.0, "activities": ["a"],
                "layout_file": "layouts/man23.yaml",
                "files": [{"file": f"s{i}.npz", "activity": "a", "split": "train"}
                          for i in range(2)]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    code = ("import sys; from masa_rt.sequence import Dataset; d = Dataset(sys.argv[1]); "
            "print(d.manifest.layout, d.load('s1.npz').joints.shape)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "man23 (20, 23, 2)"
    manifest["layout_file"] = "layouts/none.yaml"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="field 'layout_file': expected an existing layout "
                                            "file, found no 'layouts/none.yaml'"):
        from masa_rt.sequence import load_manifest
        load_manifest(tmp_path)


def test_a_written_dataset_carries_the_declaration_inline(tmp_path):
    load_layout_file(SPORTS23)
    m = write_dataset_files(tmp_path, [("a.npz", Sequence(_motion(), "sports23", 30.0,
                                                          activity="a"), "train")])
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk["layout_declaration"] == declaration_of("sports23") == m.layout_declaration


def test_an_input_spec_carries_the_declaration_and_built_in_ones_are_as_before():
    load_layout_file(SPORTS23)
    spec = InputSpec("sports23", 30.0)
    d = spec.to_dict()
    assert d["layout_declaration"] == declaration_of("sports23")
    assert InputSpec.from_dict(json.loads(json.dumps(d))) == spec
    assert spec.input_dim == 23 * 2
    assert "layout_declaration" not in InputSpec("penn13", 30.0).to_dict()
    code = ("import json, sys; from masa_rt.preprocess import InputSpec; "
            "s = InputSpec.from_dict(json.loads(sys.argv[1])); print(s.layout, s.input_dim)")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(d)], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "sports23 46"


def test_normalise_uses_the_declared_root_and_reference_bones():
    lay = load_layout_file(SPORTS23)
    x = _motion(frames=3)
    y = normalise(x, "sports23")
    np.testing.assert_allclose(y[:, lay.index("pelvis")], 0, atol=1e-5)
    bones = [np.linalg.norm(y[:, lay.index(a)] - y[:, lay.index(b)], axis=-1)
             for a, b in (("l_shoulder", "l_hip"), ("r_shoulder", "r_hip"))]
    np.testing.assert_allclose(np.mean(bones, axis=0), 1.0, rtol=1e-5)


# --------------------------------------------------------------------------- hellos

def test_a_hello_declaration_is_served_by_conversion_without_registering_it():
    decl = renamed("hello23")
    lay, m = hello_layout("hello23", decl, "penn13")
    assert lay.num_joints == 23 and m.shape == (13,)
    assert declaration_of("hello23") is None  # a client's declaration stays its own
    with pytest.raises(LayoutFileError, match="declares 'hello23', not 'other'"):
        hello_layout("other", decl, "penn13")
    with pytest.raises(LayoutFileError, match="converts only to: penn13"):
        hello_layout("hello23", decl, "h2o_hands")
    with pytest.raises(LayoutFileError, match="missing 'dims'"):
        hello_layout("hello23", {"name": "hello23"}, "penn13")


def test_a_hello_naming_the_models_declared_layout_must_declare_the_same_skeleton():
    load_layout_file(SPORTS23)
    assert hello_layout("sports23", example(), "sports23")[1] is None
    other = example()
    other["mirror"] = []
    with pytest.raises(LayoutFileError, match="differs from the 'sports23' this model reads"):
        hello_layout("sports23", other, "sports23")


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False)
    | st.sampled_from(["pelvis", "neck", "penn13", "head", "l_hip", "x"]),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(["name", "dims", "joints", "root", "parents", "mirror",
                                       "ref_bone", "convert_to", "penn13", "neck", "head"]),
                      inner, max_size=5),
    max_leaves=20)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_whatever_a_hello_declares_is_a_one_line_refusal_or_a_layout(data):
    """A hostile or buggy client's declaration: the example with any field replaced by
    anything JSON-like, or anything at all; never another exception."""
    decl = example()
    decl["name"] = "fuzz23"
    if data.draw(st.booleans()):
        decl[data.draw(st.sampled_from(sorted(decl)))] = data.draw(JSONISH)
    else:
        decl = data.draw(JSONISH)
    try:
        lay, _ = hello_layout("fuzz23", decl, "penn13")
    except LayoutFileError as e:
        assert "\n" not in str(e)
    else:
        assert lay.name == "fuzz23"


def test_a_hello_declaring_more_joints_than_a_frame_carries_is_refused_at_once():
    decl = example()
    decl["joints"] = [f"j{i}" for i in range(5000)]
    with pytest.raises(LayoutFileError, match="5000 joints, a frame carries at most 128"):
        hello_layout("sports23", decl, "penn13")
