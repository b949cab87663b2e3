import pytest
import torch
from torch import nn

from prfl.params import ParamLayout


def test_prunable_prefix_holds_conv_and_linear_weights_only(tiny_cnn):
    layout = ParamLayout(tiny_cnn)
    pruned = [e.name for e in layout.prunable_entries]
    assert pruned == ["conv.weight", "fc1.weight", "fc2.weight"]
    assert layout.num_prunable == 4 * 9 + 64 * 16 + 16 * 10
    assert layout.total == sum(p.numel() for p in tiny_cnn.parameters())
    # prefix first, then the biases
    assert all(e.prunable for e in layout.entries[:3])
    assert not any(e.prunable for e in layout.entries[3:])
    assert layout.entries[0].offset == 0


def test_lstm_matrices_are_prunable_embedding_is_not():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 4)
            self.lstm = nn.LSTM(4, 8, num_layers=2, batch_first=True)
            self.out = nn.Linear(8, 20)

    layout = ParamLayout(M())
    names = {e.name for e in layout.prunable_entries}
    assert names == {"lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.weight_ih_l1", "lstm.weight_hh_l1", "out.weight"}


def test_flatten_load_round_trip(tiny_cnn):
    layout = ParamLayout(tiny_cnn)
    flat = layout.flatten(tiny_cnn)
    other = type(tiny_cnn)()
    layout.load(other, flat)
    for (n1, p1), (n2, p2) in zip(tiny_cnn.named_parameters(), other.named_parameters()):
        assert torch.equal(p1, p2), n1
    assert torch.equal(layout.flatten(other), flat)


def test_bind_makes_parameters_and_gradients_views(tiny_cnn):
    layout = ParamLayout(tiny_cnn)
    w = layout.flatten(tiny_cnn)
    g = torch.zeros_like(w)
    layout.bind(tiny_cnn, w, g)
    w[0] = 123.0
    assert tiny_cnn.conv.weight.flatten()[0].item() == 123.0
    loss = tiny_cnn(torch.randn(2, 1, 8, 8)).sum()
    loss.backward()
    # gradients accumulated in place into the flat gradient vector
    e = layout.entry("fc2.bias")
    assert torch.equal(g[e.offset : e.stop], tiny_cnn.fc2.bias.grad)
    assert g.abs().sum() > 0
    assert tiny_cnn.fc2.bias.grad.data_ptr() == g[e.offset :].data_ptr()


def test_bad_vectors_and_masks_are_rejected(tiny_cnn):
    layout = ParamLayout(tiny_cnn)
    with pytest.raises(ValueError, match="flat vector of"):
        layout.check(torch.zeros(3))
    with pytest.raises(ValueError, match="prunable weights"):
        layout.full_mask(torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="not in the model"):
        ParamLayout(tiny_cnn, prunable=["nope.weight"])
