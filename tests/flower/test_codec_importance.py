"""Kept-weight importance on the wire: values at the mask only, put back in place by the server."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr", reason="the Flower path needs the flower extra (pip install 'prfl[flower]')")

from prfl.flower import codec  # noqa: E402


def _round_trip(scope: str, mask: torch.Tensor, grad_sq: torch.Tensor) -> tuple[codec.ResultMessage, torch.Tensor]:
    task = codec.decode_task(codec.encode_task(
        task_id=7, client=1, num_clients=2, version=3, density=0.5, width=1.0, want_importance=True, seed=0,
        kind=codec.KIND_DENSE, total=6, num_prunable=4, arrays={}, importance_scope=scope))
    assert task.importance_scope == scope
    weights = torch.tensor([0.0, 2.0, 0.0, 4.0, 0.5, 0.5])
    content = codec.encode_result(
        task=task, weights=weights, mask=mask, grad_sq=grad_sq, num_samples=5, mean_loss=0.0, steps=1,
        compute_seconds=0.0, delay_seconds=0.0, received_payload_bytes=0, received_record_bytes=0, partition_id=1)
    msg = codec.decode_result(content)
    w, g = codec.result_weights(msg, mask, 6, 4, scope)
    assert torch.equal(w, weights)
    return msg, g


def test_kept_scope_sends_one_score_per_kept_weight_and_the_server_puts_them_back():
    mask = torch.tensor([False, True, False, True])
    msg, g = _round_trip("kept", mask, torch.tensor([9.0, 3.0, 7.0, 5.0]))
    assert msg.importance_bytes == 4 * 2
    assert torch.equal(g, torch.tensor([0.0, 3.0, 0.0, 5.0]))
    msg, g = _round_trip("all", mask, torch.tensor([9.0, 3.0, 7.0, 5.0]))
    assert msg.importance_bytes == 4 * 4 and torch.equal(g, torch.tensor([9.0, 3.0, 7.0, 5.0]))


def test_a_kept_scope_reply_with_the_wrong_count_is_refused():
    mask = torch.tensor([False, True, False, True])
    msg, _ = _round_trip("all", mask, torch.tensor([9.0, 3.0, 7.0, 5.0]))  # 4 scores where 2 are due
    with pytest.raises(ValueError, match="one per kept weight"):
        codec.result_weights(msg, mask, 6, 4, "kept")
