"""Bucketing version 1: the vectors published in docs/flags-bucketing.md, the reference
implementations on that page, and the promises the page makes (a fair share, the same answer
from a fresh parse and after a restart)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tenfold.flags.evaluation import (
    SPLIT,
    TARGETING_KEY_MISSING,
    Ruleset,
    bucket,
    bucket_text,
)
from tests.backends import IN_CI

DOC = Path(__file__).resolve().parents[2] / "docs" / "flags-bucketing.md"
TABLE_HEADER = "| # | salt | context value | hashed text | bucket | 30% roll-out |"
JS_SAFE_INTEGER = 2**53 - 1


@dataclass(frozen=True)
class Vector:
    number: int
    salt: str
    value: Any  # the attribute as the context holds it
    text: str  # what is hashed
    bucket: int
    in_30: bool  # in a 30% roll-out


def _cell(cell: str) -> Any:
    assert cell.startswith("`") and cell.endswith("`"), cell
    return json.loads(cell[1:-1])


def read_vectors() -> list[Vector]:
    lines = DOC.read_text(encoding="utf-8").splitlines()
    start = lines.index(TABLE_HEADER) + 2  # past the header and its separator
    vectors = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        number, salt, value, text, bucket_, rollout = (
            c.strip() for c in line.strip()[1:-1].split(" | ")
        )
        assert rollout in ("in", "out"), line
        vectors.append(
            Vector(
                int(number), _cell(salt), _cell(value), _cell(text), int(bucket_), rollout == "in"
            )
        )
    return vectors


def code_block(language: str) -> str:
    found = re.search(rf"```{language}\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)
    assert found, f"docs/flags-bucketing.md has no {language} block"
    return found.group(1)


VECTORS = read_vectors()


def split_flag(key: str, *, salt: str | None = None, on: float = 30) -> dict[str, Any]:
    """A boolean flag whose default rule shares everyone out: `on`% on, the rest off."""
    flag: dict[str, Any] = {
        "flag_key": key,
        "flag_type": "boolean",
        "default_value": False,
        "targeting": {
            "enabled": True,
            "default_rule": {
                "split": [
                    {"variation": "on", "weight": on},
                    {"variation": "off", "weight": 100 - on},
                ]
            },
        },
    }
    if salt is not None:
        flag["salt"] = salt
    return flag


def ruleset(*flags: dict[str, Any]) -> Ruleset:
    return Ruleset.from_dict({"environment": "test", "revision": 1, "flags": list(flags)})


# --- the table -------------------------------------------------------------------------------


def test_the_page_publishes_enough_kinds_of_vectors() -> None:
    assert len(VECTORS) >= 20
    assert [v.number for v in VECTORS] == list(range(1, len(VECTORS) + 1))
    values = [v.value for v in VECTORS]
    assert any(isinstance(x, str) and not x.isascii() for x in values)  # unicode
    assert any(isinstance(x, str) and len(x.encode("utf-16-le")) > 2 * len(x) for x in values)
    assert "" in values and " " in values  # empty-ish
    assert any(isinstance(x, int) and not isinstance(x, bool) for x in values)  # integers
    assert any(isinstance(x, bool) for x in values)
    assert any(not v.salt.isascii() for v in VECTORS)
    assert any(v.in_30 for v in VECTORS) and not all(v.in_30 for v in VECTORS)


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: f"row{v.number}")
def test_tenfold_buckets_every_vector(vector: Vector) -> None:
    assert bucket_text(vector.value) == vector.text
    assert bucket(vector.salt, vector.text) == vector.bucket
    assert (vector.bucket < 30_000) is vector.in_30


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: f"row{v.number}")
def test_a_ruleset_splits_every_vector_by_its_bucket(vector: Vector) -> None:
    # The whole path: the salt from the flag, the value from the context, the 30/70 split.
    flags = ruleset(split_flag("bucketed", salt=vector.salt))
    got = flags.evaluate("bucketed", {"user_id": vector.value})
    assert (got.reason, got.variation) == (SPLIT, "on" if vector.in_30 else "off")
    same = flags.evaluate("bucketed", {"targetingKey": vector.value})  # OpenFeature's name
    assert same.variation == got.variation


def test_the_salt_defaults_to_the_flag_key() -> None:
    # The worked example: checkout-v2, user-42, bucket 2945, in the 30% roll-out.
    flags = ruleset(split_flag("checkout-v2"), split_flag("other", salt="checkout-v2", on=2.946))
    assert flags.evaluate("checkout-v2", {"user_id": "user-42"}).variation == "on"
    assert flags.evaluate("other", {"user_id": "user-42"}).variation == "on"  # 2945 < 2946
    narrower = ruleset(split_flag("other", salt="checkout-v2", on=2.945))
    assert narrower.evaluate("other", {"user_id": "user-42"}).variation == "off"


@pytest.mark.parametrize("value", [None, 42.0, 4.5, ["user-42"], {"id": "user-42"}])
def test_values_without_a_bucket(value: Any) -> None:
    assert bucket_text(value) is None
    got = ruleset(split_flag("bucketed")).evaluate("bucketed", {"user_id": value})
    assert got.error_code == TARGETING_KEY_MISSING
    assert got.value is False  # the flag's default value


# --- the reference implementations on the page -----------------------------------------------


def test_the_python_reference_reproduces_the_table() -> None:
    namespace: dict[str, Any] = {}
    exec(compile(code_block("python"), str(DOC), "exec"), namespace)
    for v in VECTORS:
        assert namespace["bucket_text"](v.value) == v.text, v
        assert namespace["bucket"](v.salt, v.text) == v.bucket, v
        assert namespace["in_rollout"](v.salt, v.text, 30) is v.in_30, v


def test_the_javascript_reference_reproduces_the_table(tmp_path: Path) -> None:
    node = shutil.which("node")
    if node is None:
        message = "node is not on the PATH: the JavaScript reference is not checked"
        if IN_CI:
            pytest.fail(f"CI requires {message}", pytrace=False)
        pytest.skip(message)
    script = tmp_path / "bucketing.cjs"
    script.write_text(
        code_block("js")
        + """
const rows = JSON.parse(require("node:fs").readFileSync(0, "utf8"));
const out = rows.map(([salt, text, value]) =>
  [bucket(salt, text), bucketText(value), inRollout(salt, text, 30)]);
process.stdout.write(JSON.stringify(out));
""",
        encoding="utf-8",
    )
    rows = [[v.salt, v.text, v.value] for v in VECTORS]
    proc = subprocess.run(
        [node, str(script)],
        input=json.dumps(rows),  # ASCII with \\u escapes: no encoding in the way
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    for v, (got_bucket, got_text, got_in) in zip(VECTORS, json.loads(proc.stdout), strict=True):
        assert got_bucket == v.bucket, v
        assert got_in is v.in_30, v
        # An integer past 2**53 reaches JavaScript rounded: the reference refuses it (see page).
        unsafe = type(v.value) is int and abs(v.value) > JS_SAFE_INTEGER
        assert got_text == (None if unsafe else v.text), v


# --- the promises ----------------------------------------------------------------------------


def test_a_30_percent_rollout_of_a_million_users_is_30_percent() -> None:
    evaluate = ruleset(split_flag("rollout-30")).evaluate
    counts = {"on": 0, "off": 0}
    ctx: dict[str, Any] = {}
    for i in range(1_000_000):
        ctx["user_id"] = f"user-{i}"
        counts[str(evaluate("rollout-30", ctx).variation)] += 1
    assert counts["on"] + counts["off"] == 1_000_000
    share = counts["on"] / 1_000_000
    assert abs(share - 0.30) <= 0.005, share


RULES_DOC: dict[str, Any] = {
    "environment": "production",
    "revision": 7,
    "flags": [
        {
            "flag_key": "checkout-v2",
            "flag_type": "boolean",
            "default_value": False,
            "targeting": {
                "enabled": True,
                "rules": [
                    {
                        "id": "eu",
                        "conditions": [
                            {"attribute": "country", "operator": "in", "values": ["DE", "FR"]}
                        ],
                        "variation": "on",
                        "rollout_percentage": 50,
                    }
                ],
                "default_rule": {
                    "split": [{"variation": "on", "weight": 30}, {"variation": "off", "weight": 70}]
                },
            },
        },
        {
            "flag_key": "pricing",
            "flag_type": "string",
            "default_value": "a",
            "salt": "pricing-2024",
            "variations": [
                {"key": "a", "value": "a"},
                {"key": "b", "value": "b"},
                {"key": "c", "value": "c"},
            ],
            "targeting": {
                "enabled": True,
                "default_rule": {
                    "split": [
                        {"variation": "a", "weight": 33.333},
                        {"variation": "b", "weight": 33.333},
                        {"variation": "c", "weight": 33.334},
                    ]
                },
            },
        },
    ],
}
COUNTRIES = ("DE", "FR", "US", "GB")


def answers(flags: Ruleset, n: int) -> list[list[str | None]]:
    return [
        [e.variation for e in flags.evaluate_all({"user_id": f"u{i}", "country": COUNTRIES[i % 4]})]
        for i in range(n)
    ]


def test_two_fresh_parses_answer_alike() -> None:
    text = json.dumps(RULES_DOC)
    first, second = (Ruleset.from_dict(json.loads(text)) for _ in range(2))
    assert first.flags["checkout-v2"] is not second.flags["checkout-v2"]
    got = answers(first, 20_000)
    assert got == answers(second, 20_000)
    assert len({tuple(a) for a in got}) == 6  # every pair of answers occurs: real bucketing


RESTARTED = """
import json, sys
from tenfold.flags.evaluation import Ruleset
doc, countries, n = json.load(sys.stdin)
flags = Ruleset.from_dict(doc)
print(json.dumps([
    [e.variation for e in flags.evaluate_all({"user_id": f"u{i}", "country": countries[i % 4]})]
    for i in range(n)
]))
"""


@pytest.mark.parametrize("hash_seed", ["0", "4242"])
def test_a_restarted_process_answers_alike(hash_seed: str) -> None:
    # Another interpreter, with another str hash seed: nothing may depend on hash() or ids.
    n = 3_000
    proc = subprocess.run(
        [sys.executable, "-c", RESTARTED],
        input=json.dumps([RULES_DOC, COUNTRIES, n]),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONHASHSEED": hash_seed},
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == answers(Ruleset.from_dict(RULES_DOC), n)
