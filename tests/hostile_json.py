"""Hypothesis generators for the input classes of issue 16: JSON values that Python's `json`
accepts but that hurt downstream (huge numbers, deep nesting, duplicate keys, lone surrogates),
ids with a trailing newline, and regular expressions with catastrophic backtracking.

Each JSON generator yields raw JSON *text* (so it can hold what `json.dumps` cannot write)."""

from __future__ import annotations

from hypothesis import strategies as st

HUGE_NUMBERS = st.one_of(
    st.integers(21, 6000).map(lambda n: "7" * n),                     # beyond u64 / int() digit limits
    st.integers(21, 6000).map(lambda n: "-" + "9" * n),
    st.sampled_from(["1e400", "-1e999", "1E309", "10" + "0" * 400, "1e300", "3e38", "-3.5e38", "1e-400"]),
)
DEEP_NESTING = st.one_of(
    st.integers(33, 60_000).map(lambda n: "[" * n + "]" * n),
    st.integers(33, 20_000).map(lambda n: '{"a": ' * n + "1" + "}" * n),
)
LONE_SURROGATES = st.sampled_from(["\\ud800", "\\udfff", "\\ud83d", "x\\udc00y", "\\ud800\\ud800"]).map(
    lambda escaped: f'"{escaped}"')
NON_FINITE = st.sampled_from(["NaN", "Infinity", "-Infinity"])
HOSTILE_VALUES = st.one_of(HUGE_NUMBERS, DEEP_NESTING, LONE_SURROGATES, NON_FINITE)


def duplicate_key_object(key: str, first: str, second: str) -> str:
    """`{"key": first, "key": second}` as JSON text."""
    return f'{{"{key}": {first}, "{key}": {second}}}'


TRAILING_NEWLINE_IDS = st.one_of(
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True).map(lambda s: s + "\n"),
    st.sampled_from(["kept-adapter\n", "a\n", "name@1\n", "x\r\n", "ok\n\n"]),
)

PATHOLOGICAL_REGEXES = st.builds(
    lambda prefix, body: prefix + body,
    st.sampled_from(["", r"model\.layers\.0\.", r"model\.layers\.\d+\.", ".*"]),
    st.one_of(
        st.integers(2, 6).map(lambda k: "(?:" + "|".join(["."] * k) + ")*Z"),
        st.sampled_from([r"(a*)*b", r"(x+x+)+y", r"(.*a){12}", r"(?:\w|\w\w)+!", r"(.*)*q_projZ",
                         r"(?:[a-z_.0-9]+)*\$"]),
    ),
)
