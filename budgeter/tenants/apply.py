"""Declarative tenants: a YAML file of policies, planned and applied against Redis.

``load_file`` validates the whole file (every problem, with its path and line) and
returns the desired state; ``plan`` compares it with the policies in Redis; ``apply``
makes the changes through the same ``TenantStore`` calls as ``budgeter tenants set`` and
``budgeter tenants delete``. Everything here is generic over ``TenantPolicy``: policies
are compared and diffed as their JSON dumps, never field by field.

File shape (top-level keys starting with ``x-`` are ignored, a place for YAML anchors)::

    prune: false            # optional: delete tenants that are not in the file
    x-small: &small {budgets: {day: 100000}, rate: {rpm: 60}}
    tenants:
      acme: {budgets: {day: 2000000}, rate: {rpm: 600}}
      batch-nightly: {weight: 0.5, on_exhausted: wait}
      intern: *small
      demo: {<<: *small, weight: 0.5}
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, StrictBool, ValidationError

from budgeter.domain.policy import InvalidTenantError, TenantPolicy, check_tenant_id
from budgeter.domain.tree import HasChildrenError, check_tree, children, parents_first
from budgeter.queue.jobqueue import JobQueue
from budgeter.tenants.merge_patch import reparent_note
from budgeter.tenants.store import TenantStore

Action = Literal["create", "update", "unchanged", "delete", "orphan"]
CHANGES: tuple[Action, ...] = ("create", "update", "delete")
UNSET = "(unset)"


class TenantsFileError(ValueError):
    """A bad tenants file: every problem, one line each (``file:line: path: message``)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class StoredPolicyError(RuntimeError):
    """A policy in Redis that this version cannot read: nothing is applied over it."""


@dataclass(frozen=True, slots=True)
class DesiredState:
    tenants: dict[str, TenantPolicy]
    prune: bool


@dataclass(frozen=True, slots=True)
class FieldDiff:
    path: str  # "budgets.day"
    old: Any  # a JSON value, or UNSET_VALUE when absent
    new: Any


@dataclass(frozen=True, slots=True)
class Change:
    action: Action
    tenant: str
    policy: TenantPolicy | None = None  # the desired policy (create, update, unchanged)
    diffs: tuple[FieldDiff, ...] = ()  # update: field by field
    before: TenantPolicy | None = None  # update: the stored policy it replaces

    @property
    def is_change(self) -> bool:
        return self.action in CHANGES


class _Unset:
    def __repr__(self) -> str:
        return UNSET


UNSET_VALUE: Any = _Unset()


# loading ------------------------------------------------------------------------------


class _FileShape(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenants: dict[Any, Any]
    prune: StrictBool = False


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (YAML would keep the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults`: explicit keys may override merged ones
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # the base class reports it
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first on line {seen[key]})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _key_lines(node: yaml.Node | None, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], int]:
    """Line (1-based) of every mapping key, by its path of scalar keys."""
    lines: dict[tuple[str, ...], int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key_path = (*path, str(key_node.value))
                lines[key_path] = key_node.start_mark.line + 1
                lines.update(_key_lines(value_node, key_path))
    return lines


def _where(loc: Iterable[Any]) -> tuple[tuple[str, ...], str]:
    """A pydantic location as (lookup path, dotted path); ``[key]`` marks a bad key."""
    parts = [str(part) for part in loc]
    bad_key = bool(parts) and parts[-1] == "[key]"
    if bad_key:
        parts = parts[:-1]
    dotted = ".".join(parts)
    return tuple(parts), (f"{dotted} (key)" if bad_key else dotted)


def _load_yaml(text: str, name: str) -> tuple[yaml.Node | None, object]:
    """The YAML document's node (for line numbers) and its value."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        data = None if node is None else loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else name
        raise TenantsFileError([f"{where}: {exc.problem or 'invalid YAML'}"]) from None
    except yaml.YAMLError as exc:
        raise TenantsFileError([f"{name}: invalid YAML: {' '.join(str(exc).split())}"]) from None
    finally:
        loader.dispose()
    return node, data


_Problem = Callable[[tuple[str, ...], str, str], None]


def _parse_tenant(tenant: object, raw: object, problem: _Problem) -> TenantPolicy | None:
    """One tenant's policy, or None after reporting what is wrong with it."""
    path = ("tenants", str(tenant))
    dotted = f"tenants.{tenant}"
    if not isinstance(tenant, str):
        problem(path, dotted, "a tenant id must be a string (quote it)")
        return None
    try:
        check_tenant_id(tenant)
    except InvalidTenantError as exc:
        problem(path, dotted, str(exc))
        return None
    if not isinstance(raw, dict):
        problem(path, dotted, "expected a policy mapping ({} for a tenant without limits)")
        return None
    try:
        return TenantPolicy.model_validate(raw)
    except ValidationError as exc:
        for err in exc.errors():
            sub, sub_dotted = _where(err["loc"])
            problem((*path, *sub), f"{dotted}.{sub_dotted}", err["msg"])
        return None


def parse_text(text: str, name: str = "<string>") -> DesiredState:
    """Validate a whole tenants file; raise TenantsFileError with every problem."""
    node, data = _load_yaml(text, name)
    lines = _key_lines(node)
    problems: list[tuple[int, str]] = []  # (line, text): reported in file order

    def problem(path: tuple[str, ...], dotted: str, message: str) -> None:
        line = next((lines[path[:n]] for n in range(len(path), 0, -1) if path[:n] in lines), 0)
        at = f"{name}:{line}" if line else name
        problems.append((line, f"{at}: {dotted}: {message}" if dotted else f"{at}: {message}"))

    if not isinstance(data, dict):
        found = "an empty file" if data is None else f"a {type(data).__name__}"
        raise TenantsFileError([f"{name}: expected a mapping with a 'tenants' key, found {found}"])
    prune = False
    try:  # top-level ``x-`` keys are free, e.g. for YAML anchors (as in docker compose)
        shape = {k: v for k, v in data.items() if not (isinstance(k, str) and k.startswith("x-"))}
        prune = _FileShape.model_validate(shape).prune
    except ValidationError as exc:
        for err in exc.errors():
            path, dotted = _where(err["loc"])
            problem(path, dotted, err["msg"])
    raw_tenants = data.get("tenants")
    tenants: dict[str, TenantPolicy] = {}
    for tenant, raw in (raw_tenants if isinstance(raw_tenants, dict) else {}).items():
        policy = _parse_tenant(tenant, raw, problem)
        if policy is not None:
            tenants[tenant] = policy
    if problems:
        raise TenantsFileError([text for _, text in sorted(problems, key=lambda p: p[0])])
    return DesiredState(tenants=tenants, prune=prune)


def load_file(path: str | Path) -> DesiredState:
    """Read and validate a tenants file (``-`` reads standard input)."""
    if str(path) == "-":
        return parse_text(sys.stdin.read(), "<stdin>")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise TenantsFileError([f"cannot read {str(path)!r}: {reason}"]) from None
    return parse_text(text, str(path))


# planning -----------------------------------------------------------------------------


def canonical(policy: TenantPolicy) -> dict[str, Any]:
    """Every field, defaults included, as JSON values: equal dicts mean equal policies."""
    return policy.model_dump(mode="json")


def _leaves(value: object, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict) and value:
        out: dict[str, object] = {}
        for key, item in value.items():
            out.update(_leaves(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, dict) or value is None:
        return {}  # None and an empty mapping are shown as unset fields
    return {prefix: value}


def diff_policies(old: TenantPolicy, new: TenantPolicy) -> tuple[FieldDiff, ...]:
    """Field-level differences, in the model's field order (leaves of the JSON dump)."""
    old_json, new_json = canonical(old), canonical(new)
    if old_json == new_json:
        return ()
    before, after = _leaves(old_json), _leaves(new_json)
    diffs = [
        FieldDiff(path, before.get(path, UNSET_VALUE), after.get(path, UNSET_VALUE))
        for path in [*before, *(p for p in after if p not in before)]
        if before.get(path, UNSET_VALUE) != after.get(path, UNSET_VALUE)
    ]
    if not diffs:  # differs only by an empty mapping somewhere: show the whole policy
        diffs = [FieldDiff("", old_json, new_json)]
    return tuple(diffs)


def plan(
    current: Mapping[str, TenantPolicy], desired: Mapping[str, TenantPolicy], *, prune: bool
) -> list[Change]:
    """What applying ``desired`` over ``current`` does, one Change per tenant, by id.

    Tenants in ``current`` but not in ``desired`` are deleted with ``prune``, else kept
    (``orphan``)."""
    changes: list[Change] = []
    for tenant in sorted({*current, *desired}):
        want = desired.get(tenant)
        have = current.get(tenant)
        if want is None:
            changes.append(Change("delete" if prune else "orphan", tenant))
        elif have is None:
            changes.append(Change("create", tenant, want))
        else:
            diffs = diff_policies(have, want)
            action: Action = "update" if diffs else "unchanged"
            changes.append(Change(action, tenant, want, diffs, before=have))
    return changes


# Redis --------------------------------------------------------------------------------


async def load_current(store: TenantStore) -> dict[str, TenantPolicy]:
    """Every tenant's policy in Redis; a policy this version cannot read is an error."""
    current: dict[str, TenantPolicy] = {}
    for tenant in await store.list_ids():
        try:
            policy = await store.get(tenant)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(part) for part in err["loc"])
            raise StoredPolicyError(
                f"the stored policy of tenant {tenant!r} is not readable by this version "
                f"of budgeter ({where}: {err['msg']}); nothing was applied"
            ) from None
        if policy is not None:  # deleted meanwhile
            current[tenant] = policy
    return current


async def queued_jobs(store: TenantStore, tenants: Iterable[str]) -> dict[str, int]:
    """Jobs waiting in each tenant's queue (they end errored once its policy is deleted)."""
    return {
        tenant: await JobQueue(store.redis, prefix=store.prefix).queued(tenant)
        for tenant in tenants
    }


def tree_after(
    parents: Mapping[str, str | None], current: Iterable[str], changes: Iterable[Change]
) -> dict[str, str | None]:
    """The organisation tree once ``changes`` are made: ``parents`` (the stored tree) with
    every current tenant in it (one made before the tree existed is a root)."""
    tree = dict(parents)
    for tenant in current:
        tree.setdefault(tenant, None)
    for change in changes:
        if change.action == "delete":
            tree.pop(change.tenant, None)
        elif change.is_change:
            assert change.policy is not None
            tree[change.tenant] = change.policy.parent
    return tree


def tree_problems(
    parents: Mapping[str, str | None], current: Iterable[str], changes: list[Change]
) -> list[str]:
    """What the changes would break in the tree (a missing parent, a cycle, a depth over
    the limit, a deleted tenant's remaining children): one line each, nothing applied."""
    after = tree_after(parents, current, changes)
    problems = [f"tenants.{line}" for line in check_tree(after)]
    for change in changes:
        if change.action == "delete":
            left = children(after, change.tenant)
            if left:
                problems.append(f"tenants.{change.tenant}: {HasChildrenError(change.tenant, left)}")
    return problems


async def apply(store: TenantStore, changes: Iterable[Change]) -> dict[Action, int]:
    """Make the changes: creates and updates first, parents before their children, then
    deletes, children before their parents. Returns counts.

    An update replaces the policy hash only: API keys, queues and budget usage stay.
    A delete is ``TenantStore.delete``, as ``budgeter tenants delete``. Each change is
    its own Redis write; after a failure, applying the file again finishes the job."""
    made = [c for c in changes if c.is_change]
    before = await store.parents()
    after = tree_after(before, [], made)
    writes = {c.tenant: c for c in made if c.action != "delete"}
    deletes = {c.tenant: c for c in made if c.action == "delete"}
    todo = [writes[t] for t in parents_first(after, writes)]
    todo += [deletes[t] for t in reversed(parents_first(before, deletes))]
    counts: dict[Action, int] = {action: 0 for action in CHANGES}
    for change in todo:
        if change.action == "delete":
            await store.delete(change.tenant)
        else:
            assert change.policy is not None
            await store.put(change.tenant, change.policy)
        counts[change.action] += 1
    return counts


# presentation -------------------------------------------------------------------------


def _show(value: object) -> str:
    return UNSET if value is UNSET_VALUE else json.dumps(value, ensure_ascii=False)


def plan_lines(
    changes: Iterable[Change], queued: Mapping[str, int] | None = None
) -> list[tuple[str, str]]:
    """The plan as (text, rich style) lines; unchanged tenants are only counted."""
    queued = queued or {}
    out: list[tuple[str, str]] = []
    for c in changes:
        if c.action == "create":
            assert c.policy is not None
            body = json.dumps(c.policy.model_dump(mode="json", exclude_defaults=True))
            out.append((f"+ {c.tenant}: create {body}", "green"))
        elif c.action == "update":
            out.append((f"~ {c.tenant}: update", "yellow"))
            for d in c.diffs:
                where = f"{c.tenant}.{d.path}" if d.path else c.tenant
                out.append((f"    ~ {where}: {_show(d.old)} → {_show(d.new)}", "yellow"))
            if c.before is not None and c.policy is not None:  # as the API and `tenants set`
                moved = reparent_note(c.before, c.policy).get("note")
                if moved:
                    out.append((f"    note: {moved}", "yellow"))
        elif c.action == "delete":
            jobs = queued.get(c.tenant, 0)
            note = f" ({jobs} queued job(s) will end errored: tenant has no policy)" if jobs else ""
            out.append((f"- {c.tenant}: delete{note}", "red"))
        elif c.action == "orphan":
            out.append((f"? {c.tenant}: not in the file, kept (prune would delete it)", "dim"))
    return out


def summary(changes: Iterable[Change]) -> dict[Action, int]:
    counts: dict[Action, int] = {a: 0 for a in ("create", "update", "delete", "unchanged")}
    for c in changes:
        if c.action in counts:
            counts[c.action] += 1
    return counts


def summary_line(changes: list[Change], *, dry_run: bool) -> str:
    n = summary(changes)
    if not any(c.is_change for c in changes):
        return f"No changes: {n['unchanged']} tenant(s) already match the file."
    if dry_run:
        return (
            f"Plan: {n['create']} to create, {n['update']} to update, {n['delete']} to delete, "
            f"{n['unchanged']} unchanged. Dry run: nothing was changed."
        )
    return (
        f"Applied: {n['create']} created, {n['update']} updated, {n['delete']} deleted, "
        f"{n['unchanged']} unchanged."
    )
