"""The organisation tree's checks (issue 17, item 1), pure: a missing parent, a cycle and
a depth over 4 are refused naming the chain; orders put parents first."""

from __future__ import annotations

import pytest

from budgeter.domain.tree import (
    HasChildrenError,
    TreeError,
    ancestors,
    chain,
    check_parent,
    check_tree,
    children,
    height,
    parents_first,
)

TREE: dict[str, str | None] = {
    "org": None,
    "research": "org",
    "vision": "research",
    "vision-a": "vision",
    "sales": "org",
    "other-org": None,
}


def test_chain_ancestors_children_height() -> None:
    assert chain(TREE, "vision-a") == ["vision-a", "vision", "research", "org"]
    assert ancestors(TREE, "vision") == ["research", "org"]
    assert children(TREE, "org") == ["research", "sales"]
    assert (height(TREE, "org"), height(TREE, "vision-a"), height(TREE, "research")) == (3, 0, 2)


def test_a_missing_parent_is_refused() -> None:
    with pytest.raises(TreeError, match="parent: tenant 'nope' not found"):
        check_parent(TREE, "sales", "nope")


def test_a_cycle_is_refused_naming_it() -> None:
    with pytest.raises(TreeError) as caught:
        check_parent(TREE, "research", "vision-a")
    assert str(caught.value) == (
        "parent: 'vision-a' would make a cycle: research → vision-a → vision → research"
    )
    with pytest.raises(TreeError, match="cannot be its own parent"):
        check_parent(TREE, "sales", "sales")


def test_depth_counts_the_moved_subtree() -> None:
    check_parent(TREE, "new", "vision-a")  # level 4: allowed
    with pytest.raises(TreeError) as caught:
        check_parent({**TREE, "new": "vision-a"}, "newer", "new")
    assert "5 levels below the root (newer → new → vision-a → vision → research → org)" in str(
        caught.value
    )
    # research has 2 levels below it: under s2 (level 3) vision-a would be 6 below org
    deep = {**TREE, "s1": "sales", "s2": "s1"}
    with pytest.raises(TreeError) as caught:
        check_parent(deep, "research", "s2")
    assert str(caught.value) == (
        "parent: 's2' would put 'research' 4 levels below the root and the deepest of the "
        "2 level(s) below it 6 (research → s2 → s1 → sales → org); at most 4"
    )
    check_parent(TREE, "research", "other-org")  # same depth elsewhere: fine
    check_parent(TREE, "research", None)  # to a root: always fine


def test_check_tree_reports_every_problem() -> None:
    bad = {**TREE, "a": "b", "b": "a", "x": "missing"}
    problems = check_tree(bad)
    assert problems == [
        "a: parent: 'b' would make a cycle: a → b → a",
        "b: parent: 'a' would make a cycle: b → a → b",
        "x: parent: tenant 'missing' not found (create the parent first)",
    ]
    assert check_tree(TREE) == []


def test_parents_come_first() -> None:
    assert parents_first(TREE, ["vision-a", "sales", "org", "vision", "research"]) == [
        "org",
        "research",
        "sales",
        "vision",
        "vision-a",
    ]


def test_has_children_names_them() -> None:
    error = HasChildrenError("org", ["research", "sales"])
    assert str(error) == (
        "tenant 'org' has children ('research', 'sales'): delete them or give them another "
        "parent first"
    )
