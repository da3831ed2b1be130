"""The organisation tree: a tenant's policy may name a ``parent`` tenant (org → team →
tenant), at most :data:`MAX_DEPTH` levels below a root. Pure functions over the map
tenant → parent (None for a root); :class:`~budgeter.tenants.store.TenantStore` keeps that
map in Redis and checks every change with :func:`check_parent` before it writes."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

MAX_DEPTH = 4  # levels below a root (the root is level 0)

Parents = Mapping[str, str | None]


class TreeError(ValueError):
    """A parent that would break the tree; the message names the chain."""


class HasChildrenError(ValueError):
    """A tenant with children cannot be deleted; ``children`` names them."""

    def __init__(self, tenant: str, children: list[str]) -> None:
        shown = ", ".join(repr(c) for c in children[:20]) + (" ..." if len(children) > 20 else "")
        super().__init__(
            f"tenant {tenant!r} has children ({shown}): delete them or give them another "
            "parent first"
        )
        self.children = children


def chain(parents: Parents, tenant: str) -> list[str]:
    """``tenant``, its parent, ..., its root (stops at a cycle's first repeat)."""
    out = [tenant]
    seen = {tenant}
    parent = parents.get(tenant)
    while parent is not None and parent not in seen:
        out.append(parent)
        seen.add(parent)
        parent = parents.get(parent)
    return out


def ancestors(parents: Parents, tenant: str) -> list[str]:
    """The parent, grandparent, ... of ``tenant``, nearest first."""
    return chain(parents, tenant)[1:]


def children(parents: Parents, tenant: str) -> list[str]:
    """The tenants whose parent is ``tenant``, sorted."""
    return sorted(t for t, p in parents.items() if p == tenant)


def height(parents: Parents, tenant: str) -> int:
    """Levels below ``tenant`` (0 for a leaf)."""
    below: dict[str, list[str]] = {}
    for child, parent in parents.items():
        if parent is not None:
            below.setdefault(parent, []).append(child)
    deepest, todo, seen = 0, [(tenant, 0)], {tenant}
    while todo:
        node, level = todo.pop()
        deepest = max(deepest, level)
        for child in below.get(node, ()):
            if child not in seen:
                seen.add(child)
                todo.append((child, level + 1))
    return deepest


def _arrows(names: Iterable[str]) -> str:
    return " → ".join(names)


def check_parent(parents: Parents, tenant: str, parent: str | None) -> None:
    """Refuse (:class:`TreeError`) a ``parent`` for ``tenant`` that has no policy (is not
    in ``parents``), makes a cycle, or puts ``tenant`` or anything below it more than
    :data:`MAX_DEPTH` levels below its root."""
    if parent is None:
        return
    if parent == tenant:
        raise TreeError(f"parent: tenant {tenant!r} cannot be its own parent")
    if parent not in parents:
        raise TreeError(f"parent: tenant {parent!r} not found (create the parent first)")
    above = chain(parents, parent)
    if tenant in above:
        loop = [tenant, *above[: above.index(tenant) + 1]]
        raise TreeError(f"parent: {parent!r} would make a cycle: {_arrows(loop)}")
    below = height(parents, tenant)
    level = len(above)  # of tenant, once under parent (the root is level 0)
    if level + below > MAX_DEPTH:
        path = _arrows([tenant, *above])
        deepest = f" and the deepest of the {below} level(s) below it {level + below}"
        raise TreeError(
            f"parent: {parent!r} would put {tenant!r} {level} levels below the root"
            f"{deepest if below else ''} ({path}); at most {MAX_DEPTH}"
        )


def check_tree(parents: Parents) -> list[str]:
    """Every problem of a whole tree (for ``tenants apply``): missing parents, cycles,
    depth; one line each, sorted by tenant."""
    problems = []
    for tenant in sorted(parents):
        parent = parents[tenant]
        rest = {t: p for t, p in parents.items() if t != tenant}
        rest[tenant] = None  # check the edge tenant → parent against all the others
        try:
            check_parent(rest, tenant, parent)
        except TreeError as exc:
            problems.append(f"{tenant}: {exc}")
    return problems


def parents_first(parents: Parents, tenants: Iterable[str]) -> list[str]:
    """``tenants`` ordered so that a tenant comes after its ancestors (then by id)."""
    return sorted(tenants, key=lambda t: (len(chain(parents, t)), t))
