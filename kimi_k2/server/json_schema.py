"""A JSON-schema check llguidance does not make: is there any finite JSON value the schema accepts?

llguidance resolves `$ref`s lazily, so a schema whose every value must contain another value of itself (`{"$ref":
"#"}`, an object that requires a child of its own type, an array of at least one of itself) compiles, and decoding
then runs forever or stops on a parser error. This decides, for the recursion, whether each subschema has a finite
value, the way a context-free grammar's productive nonterminals are found: each subschema is an AND of what every
one of its values must satisfy (its `$ref` target, `allOf` members, one `anyOf` / `oneOf` alternative, one of its
types), an object type needs each required property's schema, an array type each of its first `minItems` items'.
Everything else (number bounds, patterns, `enum`, `not`, ...) counts as satisfiable: llguidance itself rejects the
contradictions it finds there. So a schema called empty here has no finite value (the check is sound); a few empty
ones pass it and are caught while decoding, failing only their own request.
"""

from __future__ import annotations

from collections import deque
from urllib.parse import unquote

PRIMITIVE_TYPES = ("null", "boolean", "number", "integer", "string")
ALL_TYPES = (*PRIMITIVE_TYPES, "object", "array")


class _Graph:
    """AND/OR nodes; a node is productive when all (AND) / any (OR) of its children are."""

    def __init__(self):
        self.kind: list[str] = []
        self.children: list[list[int]] = []

    def add(self, kind: str, children: list[int] | None = None) -> int:
        self.kind.append(kind)
        self.children.append(children if children is not None else [])
        return len(self.kind) - 1

    def productive(self) -> list[bool]:
        n = len(self.kind)
        parents: list[list[int]] = [[] for _ in range(n)]
        for p, cs in enumerate(self.children):
            for c in cs:
                parents[c].append(p)
        missing = [len(cs) for cs in self.children]
        done = [False] * n
        queue = deque(i for i in range(n) if self.kind[i] == "and" and not missing[i])
        for i in queue:
            done[i] = True
        while queue:
            for p in parents[queue.popleft()]:
                if done[p]:
                    continue
                missing[p] -= 1
                if self.kind[p] == "or" or not missing[p]:
                    done[p] = True
                    queue.append(p)
        return done


def _resolve(root: object, ref: str) -> tuple[tuple[str, ...], object] | None:
    """A local `#...` JSON-pointer reference -> (pointer, subschema); None for anything else."""
    if not ref.startswith("#"):
        return None
    path = unquote(ref[1:])
    if path and not path.startswith("/"):
        return None  # an anchor name: not followed (counted as satisfiable)
    node, ptr = root, []
    for raw in path.split("/")[1:] if path else []:
        token = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        else:
            return None
        ptr.append(token)
    return tuple(ptr), node


def unproductive_ref(schema: object) -> str | None:
    """None when `schema` may have a finite value; else a `$ref` (as written) through which every value must
    recurse forever, or '#' when the root itself has no finite value."""
    g = _Graph()
    true, false = g.add("and"), g.add("or")
    ids: dict[tuple[str, ...], int] = {}
    todo: deque[tuple[int, tuple[str, ...], object]] = deque()
    refs: list[tuple[str, int]] = []  # ($ref as written, node of its target), in visiting order

    def node(ptr: tuple[str, ...], sub: object) -> int:
        if isinstance(sub, bool):
            return true if sub else false
        if not isinstance(sub, dict):
            return true  # not a schema: llguidance reports it
        if ptr not in ids:
            ids[ptr] = g.add("and")
            todo.append((ids[ptr], ptr, sub))
        return ids[ptr]

    root = node((), schema)
    while todo:
        i, ptr, s = todo.popleft()
        needs = g.children[i]
        ref = s.get("$ref")
        if isinstance(ref, str):
            target = _resolve(schema, ref)
            if target is not None:
                t = node(*target)
                refs.append((ref, t))
                needs.append(t)
        for key in ("allOf", "anyOf", "oneOf"):
            subs = s.get(key)
            if isinstance(subs, list) and subs:
                members = [node((*ptr, key, str(k)), x) for k, x in enumerate(subs)]
                needs += members if key == "allOf" else [g.add("or", members)]
        types = s.get("type", ALL_TYPES)
        types = [types] if isinstance(types, str) else types
        if not isinstance(types, list) or any(t in PRIMITIVE_TYPES for t in types) or "enum" in s or "const" in s:
            continue
        options = []
        if "object" in types:
            props = s.get("properties") if isinstance(s.get("properties"), dict) else {}
            required = [p for p in s.get("required") or () if isinstance(p, str) and p in props]
            options.append(g.add("and", [node((*ptr, "properties", p), props[p]) for p in dict.fromkeys(required)]))
        if "array" in types:
            min_items = s.get("minItems", 0)
            prefix, items = s.get("prefixItems"), s.get("items", True)
            if isinstance(items, list):  # draft 4-7 tuple form
                prefix, items = items, s.get("additionalItems", True)
            prefix = prefix if isinstance(prefix, list) else []
            k = min_items if isinstance(min_items, int) and not isinstance(min_items, bool) else 0
            item_nodes = [node((*ptr, "prefixItems", str(j)), prefix[j]) for j in range(min(k, len(prefix)))]
            if k > len(prefix):
                item_nodes.append(node((*ptr, "items" if "prefixItems" in s else "additionalItems"), items))
            options.append(g.add("and", item_nodes))
        needs.append(g.add("or", options))
    ok = g.productive()
    if ok[root]:
        return None
    return next((ref for ref, t in refs if not ok[t]), "#")


def normalize_types(schema: object) -> object:
    """A copy of `schema` with the JSON-schema type "int" (which some clients send) read as "integer", in `type`
    strings and lists at any depth; everything else unchanged."""
    if isinstance(schema, list):
        return [normalize_types(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for k, v in schema.items():
        if k == "type" and v == "int":
            out[k] = "integer"
        elif k == "type" and isinstance(v, list):
            out[k] = ["integer" if t == "int" else t for t in v]
        elif k in ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas") and \
                isinstance(v, dict):
            out[k] = {name: normalize_types(sub) for name, sub in v.items()}
        elif k in ("enum", "const", "default", "examples"):  # values, not schemas
            out[k] = v
        else:
            out[k] = normalize_types(v)
    return out
