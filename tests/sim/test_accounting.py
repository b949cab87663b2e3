"""The reference accounting's byte sizes, checked by hand and against the reference's own format,
and the step-closing rule of :class:`prfl.policies.base.StepTiming` on hand-computed numbers.

The small model is the digits MLP with one hidden layer of 8: prunable weights 64*8 = 512 and
8*10 = 80, so N = 592; biases 8 + 10, so M = 18; dense fp32 4 * 610 = 2,440 bytes.
"""

from __future__ import annotations

import dataclasses
import json

import io
import pickle

import pytest
import torch

from prfl.data import load_dataset
from prfl.models import build_model
from prfl.params import ParamLayout
from prfl.policies.base import StepTiming, TaskSpec
from prfl.sim.accounting import (
    ReferenceBroadcast,
    ReferenceSizes,
    VersionPublication,
    check_accounting,
    reference_model_bytes,
    values_only_bytes,
)
from prfl.sim.engine import SimSettings

N, M = 592, 18


@pytest.fixture(scope="module")
def mlp() -> tuple[torch.nn.Module, ParamLayout]:
    ds = load_dataset("digits")
    torch.manual_seed(0)
    model = build_model("mlp", ds.input_shape, ds.num_classes, hidden=[8])
    layout = ParamLayout(model)
    assert (layout.num_prunable, layout.total) == (N, N + M)
    return model, layout


def spec(mask: torch.Tensor | None = None, *, version: int = 0, pieces: tuple[str, ...] = (), density: float = 1.0,
         width: float = 1.0, weights: torch.Tensor | None = None, up: int = 0, index: int = 0, imp: int = 0,
         client: int = 0) -> TaskSpec:
    return TaskSpec(task_id=0, client=client, version=version,
                    weights=weights if weights is not None else torch.zeros(N + M),
                    mask=mask, density=density, download_bytes=0, upload_bytes=up, pieces=pieces, width=width,
                    upload_index_bytes=index, upload_importance_bytes=imp)


def prefix_mask(kept: int) -> torch.Tensor:
    m = torch.zeros(N, dtype=torch.bool)
    m[:kept] = True
    return m


def reference_state_dict(model: torch.nn.Module, layout: ParamLayout, mask: torch.Tensor | None) -> dict:
    """The state dict the reference pickles for a client (R:666-691): each prunable weight, masked
    and viewed as 2-D, as a sparse COO tensor; every other tensor dense."""
    prunable = {e.name: e for e in layout.prunable_entries}
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach().clone()
        if name in prunable:
            e = prunable[name]
            if mask is not None:
                t = t * mask[e.offset : e.offset + e.numel].view_as(t)
            out[name] = t.view(t.size(0), -1).to_sparse()
        else:
            out[name] = t
    return out


def pickled_size(obj: object) -> int:
    buf = io.BytesIO()
    pickle.dump(obj, buf)
    return len(buf.getvalue())


# ---------------------------------------------------------------------------- byte sizes
def test_reference_download_bytes_by_hand(mlp) -> None:
    _, layout = mlp
    sizes = ReferenceSizes(N, N + M)
    # dense: 592 kept weights * (4 value + 2 * 8 index) + 18 biases * 4 = 11,840 + 72 = 11,912
    assert sizes.download_bytes(spec()) == 11_912
    assert reference_model_bytes(N, M) == 11_912
    assert 11_912 / (4 * (N + M)) == pytest.approx(4.882, abs=1e-3)  # ~5x the dense fp32 model
    # a mask keeping 100 weights: 100 * 20 + 72 = 2,072
    assert sizes.download_bytes(spec(prefix_mask(100), density=0.17)) == 2_072
    # a width-sliced task keeps round(density N) prunable weights of its own vector:
    # density 0.25 of 592 = 148 kept, a 160-value vector -> 12 dense: 148 * 20 + 12 * 4 = 3,008
    assert sizes.download_bytes(spec(width=0.5, density=0.25, weights=torch.zeros(160))) == 3_008


@pytest.mark.parametrize("kept", [N, 296, 100])
def test_reference_size_matches_the_reference_pickle_up_to_its_framing(mlp, kept) -> None:
    """The formula is the payload of the reference's pickled COO state dict; what the pickle adds
    is torch's framing, a few hundred bytes per stored tensor whatever the density."""
    model, layout = mlp
    mask = None if kept == N else prefix_mask(kept)
    sd = reference_state_dict(model, layout, mask)
    nnz = sum(t._nnz() for t in sd.values() if t.is_sparse)
    assert nnz == kept  # no initial weight is exactly 0
    formula = ReferenceSizes(N, N + M).download_bytes(spec(mask))
    framing = pickled_size(sd) - formula
    assert 0 < framing < 1024 * len(sd), framing


def test_values_only_upload() -> None:
    assert values_only_bytes(spec(up=1_000, index=150, imp=400)) == 450
    assert values_only_bytes(spec(up=1_000)) == 1_000


def test_broadcast_pushes_each_steps_model_once() -> None:
    sizes = ReferenceSizes(N, N + M)
    b = ReferenceBroadcast(sizes)
    p = ("v1/p0", "v1/p1")
    # residual pieces, version 3: the first task (100 kept) pushes 100 * 20 + 18 * 4 = 2,072;
    # one of 300 kept pushes the 200 more: 4,000; one of 200 kept nothing; dense the last 292: 5,840
    assert b.egress(spec(prefix_mask(100), version=3, pieces=p)) == 2_072
    assert b.egress(spec(prefix_mask(300), version=3, pieces=p)) == 4_000
    assert b.egress(spec(prefix_mask(200), version=3, pieces=p)) == 0
    assert b.egress(spec(None, version=3, pieces=p)) == 292 * 20
    # the next step pushes again from scratch
    assert b.egress(spec(prefix_mask(100), version=4, pieces=p)) == 2_072
    # whole sub-models: each (density, width) once per step
    assert b.egress(spec(None, version=5)) == 11_912
    assert b.egress(spec(None, version=5, client=1)) == 0
    assert b.egress(spec(prefix_mask(100), version=5, density=0.17)) == 2_072
    state = b.state_dict()
    c = ReferenceBroadcast(sizes)
    c.load_state_dict(state)
    assert c.egress(spec(prefix_mask(100), version=5, density=0.17)) == 0
    assert c.egress(spec(None, version=5)) == 0
    # content a policy names itself is pushed again when its name changes within a step (a roll-back)
    named = ReferenceBroadcast(sizes)
    assert named.egress(dataclasses.replace(spec(None, version=6), content_key=(3, 1, 1.0))) == 11_912
    assert named.egress(dataclasses.replace(spec(None, version=6, client=1), content_key=(3, 1, 1.0))) == 0
    assert named.egress(dataclasses.replace(spec(None, version=6), content_key=(4, 1, 1.0))) == 11_912


def test_model_relay_publishes_each_versions_sub_models_once() -> None:
    pub = VersionPublication()

    def task(down: int, *, version: int, density: float = 1.0, width: float = 1.0, egress: int | None = None,
             client: int = 0) -> TaskSpec:
        return dataclasses.replace(spec(version=version, density=density, width=width, client=client),
                                   download_bytes=down, server_egress_bytes=egress)

    # version 2: the dense model crosses the uplink once; the next client of version 2 gets it from the relay
    assert pub.egress(task(1_000, version=2)) == 1_000
    assert pub.egress(task(1_000, version=2, client=1)) == 0
    # another sub-model of the same version (HeteroFL's widths or masks) is published once too
    assert pub.egress(task(400, version=2, density=0.4)) == 400
    assert pub.egress(task(250, version=2, width=0.5)) == 250
    assert pub.egress(task(400, version=2, density=0.4, client=3)) == 0
    # a policy that sizes its own egress (PR-FL's pieces) keeps it, capped at the download
    assert pub.egress(task(900, version=2, egress=120)) == 120
    assert pub.egress(task(900, version=2, egress=5_000)) == 900
    # a new version is new content: published again
    assert pub.egress(task(1_000, version=3)) == 1_000
    state = json.loads(json.dumps(pub.state_dict()))  # checkpoints keep it as JSON
    again = VersionPublication()
    again.load_state_dict(state)
    assert again.egress(task(1_000, version=3, client=4)) == 0
    assert again.egress(task(400, version=3, density=0.4)) == 400
    fresh = VersionPublication()
    fresh.load_state_dict({})  # a checkpoint written before the rule existed
    assert fresh.egress(task(1_000, version=3)) == 1_000
    # content a policy names itself (PR-FL's whole sub-models: its model, ranking and density) is
    # new when the name is, within one version too (a roll-back changes the weights, not the version)
    named = VersionPublication()
    assert named.egress(dataclasses.replace(task(600, version=7), content_key=(4, 1, 0.5))) == 600
    assert named.egress(dataclasses.replace(task(600, version=7, client=2), content_key=(4, 1, 0.5))) == 0
    assert named.egress(dataclasses.replace(task(600, version=7), content_key=(5, 1, 0.5))) == 600
    back = VersionPublication()
    back.load_state_dict(json.loads(json.dumps(named.state_dict())))
    assert back.egress(dataclasses.replace(task(600, version=7, client=3), content_key=(5, 1, 0.5))) == 0


def test_model_relay_is_on_by_default() -> None:
    assert SimSettings().model_relay and SimSettings().piece_relay
    # no relay at all and the reference's own broadcast are not refused: model_relay has no effect there
    assert SimSettings(piece_relay=False).model_relay
    assert SimSettings(accounting="reference").model_relay


def test_accounting_mode_is_checked() -> None:
    assert check_accounting("reference") == "reference"
    with pytest.raises(ValueError, match="honest, reference"):
        SimSettings(accounting="fair")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- step closing
def test_step_length_is_the_largest_download_over_the_uplink_plus_margin() -> None:
    timing = StepTiming(server_up_bps=1_000.0, download_bytes=lambda t: 1_000 * (t.client + 1))
    tasks = [spec(client=0), spec(client=2)]
    # largest download 3,000 B at 1,000 B/s = 3 s, + 0.1 s = 3.1 s > window 0.5
    assert timing.step_length(0.5, tasks) == pytest.approx(3.1)
    # a window longer than that wins: max(5, 3.1) = 5
    assert timing.step_length(5.0, tasks) == 5.0
    # nothing dispatched: max(window, 0 + 0.1)
    assert timing.step_length(0.5, []) == 0.5
    assert timing.step_length(0.0, []) == pytest.approx(0.1)
    # without a sizer the rule reads the task's own download_bytes
    assert StepTiming(2_000.0).step_length(0.0, [spec()]) == pytest.approx(0.1)  # 0 bytes


def test_next_close_follows_the_grid_of_empty_steps() -> None:
    timing = StepTiming(server_up_bps=1_000.0)
    # a step started at 10 with length 2.1: boundaries 12.1, then every max(0.5, 0.1) = 0.5 s
    assert timing.next_close(10.0, 2.1, 0.5, 11.0) == pytest.approx(12.1)
    assert timing.next_close(10.0, 2.1, 0.5, 12.1) == pytest.approx(12.1)  # on the boundary: that step
    assert timing.next_close(10.0, 2.1, 0.5, 12.2) == pytest.approx(12.6)
    assert timing.next_close(10.0, 2.1, 0.5, 13.1) == pytest.approx(13.1)
    assert timing.next_close(10.0, 2.1, 0.5, 13.15) == pytest.approx(13.6)
    # window 0 (FedAsync): empty steps last the 0.1 s margin; 0.6 + 4 * 0.1 is 1.0 despite rounding
    assert timing.next_close(0.4, 0.2, 0.0, 1.0) == pytest.approx(1.0)
    assert timing.next_close(0.4, 0.2, 0.0, 1.01) == pytest.approx(1.1)
    for now in (0.7, 1.3, 2.9, 123.4):
        assert timing.next_close(0.4, 0.2, 0.0, now) >= now


def test_step_timing_rejects_a_bad_speed() -> None:
    with pytest.raises(ValueError, match="server_up_bps"):
        StepTiming(server_up_bps=0.0)
    with pytest.raises(ValueError, match="margin"):
        StepTiming(server_up_bps=1.0, margin=-0.1)
