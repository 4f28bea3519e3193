"""The message-size guard, in one process (a group of one)."""

import mlx.core as mx
import pytest

from mlx_moe.parallel import comm


@pytest.fixture
def bound():
    before = comm.max_message_bytes()
    comm.set_max_message_bytes(4096)
    comm.reset_comm_stats()
    yield 4096
    comm.set_max_message_bytes(before)


def test_large_all_sum_goes_as_bounded_messages(bound):
    group = mx.distributed.init()
    x = mx.random.normal((1, 100, 33))  # 13200 bytes: 4 messages
    y = comm.all_sum(x, group)
    assert mx.array_equal(y, x * group.size())
    stats = comm.comm_stats()
    assert stats == {"collectives": 1, "messages": 4, "max_message_bytes": 4096, "total_bytes": x.nbytes}


def test_large_all_gather_goes_as_bounded_messages(bound):
    group = mx.distributed.init()
    x = mx.random.normal((3, 100, 11))  # 13200 bytes: 4 messages
    y = comm.all_gather(x, group)
    assert y.shape == (3 * group.size(), 100, 11) and mx.array_equal(y[:3], x)
    assert comm.comm_stats()["messages"] == 4 and comm.comm_stats()["max_message_bytes"] == 4096


def test_small_message_is_one_piece(bound):
    comm.all_sum(mx.ones((1, 1, 64)), mx.distributed.init())
    assert comm.comm_stats()["messages"] == 1


def test_bound_must_be_sane():
    with pytest.raises(ValueError, match="at least 1024"):
        comm.set_max_message_bytes(10)
