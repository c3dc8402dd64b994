import pytest

from actstore.errors import UsageError
from actstore.units import parse_count


@pytest.mark.parametrize(
    "text, value",
    [("2M", 2_000_000), ("500k", 500_000), ("1e6", 1_000_000), ("1_000", 1000), ("128", 128), ("1.5k", 1500)],
)
def test_parse_count_reads_human_token_counts(text, value):
    assert parse_count(text) == value


@pytest.mark.parametrize("text", ["two", "1.5", "-3", "1e-4k"])
def test_parse_count_refuses_what_is_not_a_whole_count(text):
    with pytest.raises(UsageError):
        parse_count(text)


def test_one_decimal_counts_survive_float_rounding_and_round_trip():
    from actstore.units import format_count

    for n in (16_100, 32_200, 64_100, 1_500_000, 250_000, 2_000_000_000):
        assert parse_count(format_count(n)) == n
