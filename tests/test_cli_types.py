import argparse

import pytest

from sglang_dflash.cli_types import int_list


def test_int_list_keeps_order_or_sorts_distinct():
    assert int_list(1, "levels")("8,1, 32,8") == [8, 1, 32, 8]
    assert int_list(2, "widths", distinct_sorted=True)("8,2,8,4") == [2, 4, 8]


@pytest.mark.parametrize("text, message", [("1,x", "comma-separated integers, got '1,x'"),
                                           ("", "widths >= 2, got ''"), ("4,1", "widths >= 2, got '4,1'")])
def test_int_list_errors_name_what_was_expected(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        int_list(2, "widths")(text)
