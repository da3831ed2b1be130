"""Loads the ``.lua`` files that live beside the package's modules.

A script whose text contains ``-- needs: <file>.lua`` gets that helper file prepended, so
shared Lua functions (calendar periods, server time) are written once.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources
from typing import Any

from redis.commands.core import AsyncScript

_NEEDS = re.compile(r"^-- needs: (\S+\.lua)$", re.MULTILINE)


@cache
def lua_source(name: str) -> str:
    """The full text of script ``name`` with its helpers prepended."""
    text = resources.files("budgeter").joinpath(name).read_text(encoding="utf-8")
    helpers = [lua_source(helper) for helper in _NEEDS.findall(text)]
    return "\n".join([*helpers, text])


def register(redis: Any, name: str) -> AsyncScript:
    """Register a script with an async Redis (or RedisCluster) client."""
    script: AsyncScript = redis.register_script(lua_source(name))
    return script
