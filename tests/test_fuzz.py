"""Fuzzing every tool with malformed inputs (tests/fuzz_cases.py): exit 0, 2 or 3 and never a traceback; after 2
the output tree is byte-identical; after 0 every written file parses. Seconds per tool; the large campaign is
benchmarks/fuzz_campaign.py."""

from __future__ import annotations

import functools

import pytest
from fault_server import RunningServer
from fuzz_cases import CASES, make_material
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mire_factory.cot

# deadline off: on a loaded 2-core machine single examples are slow for reasons that are not findings
FUZZ = settings(max_examples=30, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    return make_material(tmp_path_factory.mktemp("fuzz"))


@pytest.fixture(scope="module")
def server():
    with RunningServer() as running:
        yield running


@pytest.fixture(autouse=True, scope="module")
def _tokenizer_once():
    """merge_cot loads the real Qwen2 tokenizer per call; once is enough here."""
    original = mire_factory.cot.qwen2_token_counter
    mire_factory.cot.qwen2_token_counter = functools.lru_cache(maxsize=1)(original)
    yield
    mire_factory.cot.qwen2_token_counter = original


@pytest.mark.parametrize("name", list(CASES))
def test_fuzz(material, server, name):
    @FUZZ
    @given(data=st.data())
    def check(data):
        for result in CASES[name](material, server, data):
            assert not result.problems, "\n".join(result.problems) + f"\nstderr: {result.stderr[-1500:]}"

    check()
