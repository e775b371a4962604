"""The `merged_adapters` field as clients send it: lorax-client's nulls, LoRAX's defaults,
and errors naming the sub-field."""

from __future__ import annotations

import pytest

from loramux.adapter_store.merge import MergeSpec
from loramux.server.merge_request import parse_merge_spec
from loramux.server.service import InvalidRequest


def test_lorax_client_nulls_and_defaults():
    sent = {"ids": ["a", "b"], "weights": [0.5, 0.5], "merge_strategy": None, "density": 1.0,
            "majority_sign_method": None}
    assert parse_merge_spec(sent, 8) == MergeSpec(("a", "b"), (0.5, 0.5), "linear", 1.0, "total")
    assert parse_merge_spec({"ids": ["a"]}, 8).weights == (1.0,)  # LoRAX: weights default to 1
    assert parse_merge_spec({"ids": ["a"], "merge_strategy": "TIES", "density": 0.5}, 8).merge_strategy == "ties"


@pytest.mark.parametrize("raw,param", [
    ("ties", "merged_adapters"),
    ({"ids": "a"}, "merged_adapters.ids"),
    ({"ids": ["a"], "density": "x"}, "merged_adapters.density"),
    ({"ids": ["a"], "weights": [float("inf")]}, "merged_adapters.weights"),
    ({"ids": ["a", "b", "c"]}, "merged_adapters.ids"),  # more than max_ids
    ({"ids": ["a"], "surprise": True}, "merged_adapters.surprise"),
])
def test_errors_name_the_field(raw, param):
    with pytest.raises(InvalidRequest) as info:
        parse_merge_spec(raw, 2)
    assert info.value.param == param and param in info.value.message
