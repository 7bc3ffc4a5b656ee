"""Fidelity to the authors' code (T-Ratchatorn/AACE at 9324cfd): the initialisation of their model variants and
their label-smoothing form, each against its closed form."""
import math

import pytest
import torch
from torch import nn

from aace import build_model, cross_entropy
from aace.config import profile_config
from aace.train import loss_functions


def conv_stds(model):
    return [(m, float(m.weight.detach().std())) for m in model.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("variant,fan", [("authors", "in"), ("standard", "out")])
def test_wrn_convolutions_follow_kaiming_normal_over_the_variants_fan(variant, fan):
    # The authors' _initialize: kaiming_normal_(mode="fan_in") on every convolution; torchvision-style fan_out
    # for the standard variant. WRN-16-8 on 3 channels: the first convolution's fans differ 16/3-fold.
    torch.manual_seed(0)
    model = build_model("wrn-16-8", 10, 3, variant)
    for conv, std in conv_stds(model):
        k = conv.kernel_size[0] * conv.kernel_size[1]
        fans = {"in": conv.in_channels * k, "out": conv.out_channels * k}
        expected = math.sqrt(2.0 / fans[fan])
        other = math.sqrt(2.0 / fans["out" if fan == "in" else "in"])
        assert abs(std / expected - 1) < 0.15, (conv, std, expected)
        if abs(other / expected - 1) > 0.5:  # where the two fans differ, the other one is clearly rejected
            assert abs(std / other - 1) > 0.3


def test_pyramidnet_final_bias_torch_default_for_the_authors_zero_for_standard():
    torch.manual_seed(0)
    authors = build_model("pyramidnet-14-8", 10, 3, "authors").fc
    bound = 1 / math.sqrt(authors.in_features)  # nn.Linear's default: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert authors.bias.abs().max() <= bound and authors.bias.abs().min() > 0
    assert float(authors.bias.detach().std()) > 0.2 * bound
    assert torch.count_nonzero(build_model("pyramidnet-20-8", 10, 3, "standard").fc.bias) == 0


def smooth_crossentropy_by_hand(logits, target, eps):
    """The authors' form, written out: -(1 - eps) log p_y - eps / (K - 1) * sum over k != y of log p_k."""
    log_p = torch.log_softmax(logits.double(), dim=1)
    k = logits.shape[1]
    total = []
    for i in range(len(target)):
        y = int(target[i])
        others = sum(float(log_p[i, j]) for j in range(k) if j != y)
        total.append(-(1 - eps) * float(log_p[i, y]) - eps / (k - 1) * others)
    return sum(total) / len(total)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_authors_label_smoothing_matches_its_closed_form_and_differs_from_torchs(eps):
    torch.manual_seed(1)
    logits, target = torch.randn(16, 10, dtype=torch.float64) * 3, torch.randint(0, 10, (16,))
    ours = float(cross_entropy(logits, target, eps, smoothing_form="authors"))
    assert ours == pytest.approx(smooth_crossentropy_by_hand(logits, target, eps), rel=1e-12)
    torch_form = float(cross_entropy(logits, target, eps))
    if eps == 0:
        assert ours == torch_form
    else:
        assert abs(ours - torch_form) > 1e-3
    grad = torch.autograd.grad(cross_entropy(logits.requires_grad_(), target, eps, smoothing_form="authors"), logits)[0]
    # d/dz of the smoothed CE is softmax(z) - t, averaged over the batch: t = 1 - eps on y, eps / (K - 1) elsewhere
    t = torch.full_like(logits, eps / 9).scatter_(1, target[:, None], 1 - eps)
    assert torch.allclose(grad, (torch.softmax(logits.detach(), 1) - t) / 16, atol=1e-12)


def test_smoothing_form_is_a_named_option_of_the_run_and_reaches_the_update_loss():
    with pytest.raises(ValueError, match="smoothing_form"):
        cross_entropy(torch.zeros(2, 3), torch.tensor([0, 1]), 0.1, smoothing_form="davda")
    with pytest.raises(ValueError, match="label_smoothing_form"):
        profile_config("smoke", label_smoothing_form="davda")
    logits, target = torch.randn(8, 10), torch.randint(0, 10, (8,))
    for form in ("torch", "authors"):
        config = profile_config("smoke", method="aace", label_smoothing=0.2, label_smoothing_form=form)
        _, update = loss_functions(config)
        assert torch.equal(update(logits, target), cross_entropy(logits, target, 0.2, smoothing_form=form))
