"""What ranks must agree on: every field of a rank's statement that differs
from rank 0's is reported with the host, the field and both values."""

import pytest

from mlx_moe.cluster.consistency import FIXES, mismatches


def _statement(**changes):
    base = {
        "host": "mac1",
        "checkpoint": {"config.json": "c0", "model-1.safetensors": "h1", "model-2.safetensors": "h2"},
        "plan": "expert on 2 ranks, 4 blocks (digest p)",
        "placement": "contiguous ranges",
        "max_collective_bytes": 524288,
        "tokenizer and chat template": "t",
        "mlx-moe version": "0.1.0",
        "mlx version": "0.32.4",
    }
    return {**base, **changes}


def test_agreeing_ranks_pass_even_with_different_files_downloaded():
    # A pipeline stage may have downloaded only some files: only shared ones are compared.
    partial = _statement(host="mac2", checkpoint={"config.json": "c0", "model-2.safetensors": "h2"})
    assert mismatches([_statement(), partial]) == []


@pytest.mark.parametrize("field", [f for f in FIXES if f != "checkpoint"])
def test_each_field_that_differs_is_named_with_both_values(field):
    found = mismatches([_statement(), _statement(host="mac2", **{field: "other"})])
    assert len(found) == 1
    assert found[0].startswith(f"rank 1 (host mac2) and rank 0 (host mac1) differ in {field}: 'other' vs ")
    assert FIXES[field] in found[0]


def test_a_different_weight_file_names_the_file():
    other = _statement(host="mac3", checkpoint={"config.json": "c0", "model-1.safetensors": "x"})
    found = mismatches([_statement(), _statement(host="mac2"), other])
    assert found == [f"rank 2 (host mac3) loaded a different checkpoint than rank 0 (host mac1): "
                     f"model-1.safetensors differ (x vs h1); {FIXES['checkpoint']}"]
