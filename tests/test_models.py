import pytest
import torch

from aace import build_model


def count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,variant,expected", [
    ("wrn-28-10", "standard", 36_479_194),           # Zagoruyko & Komodakis: 36.5M
    ("pyramidnet-272-200", "standard", 26_210_842),  # Han et al.: 26.0M (bottleneck)
])
def test_published_parameter_counts(name, variant, expected):
    assert count(build_model(name, 10, 3, variant)) == expected


@pytest.mark.parametrize("name,low,high", [("wrn-28-10", 46.1e6, 46.3e6), ("pyramidnet-272-200", 41.0e6, 41.2e6)])
def test_authors_variants_match_their_code_sizes(name, low, high):
    assert low <= count(build_model(name, 10, 3, "authors")) <= high


@pytest.mark.parametrize("name", ["wrn-10-1", "wrn-16-2", "pyramidnet-20-12"])
@pytest.mark.parametrize("variant", ["standard", "authors"])
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_output_shapes(name, variant, channels, size):
    if name.startswith("pyramidnet") and variant == "authors":
        name = "pyramidnet-20-12"  # (20 - 2) divisible by 6 and by 9
    model = build_model(name, 7, channels, variant)
    assert model(torch.randn(3, channels, size, size)).shape == (3, 7)


def test_authors_wrn_head_is_zero_and_pools_top_left_corner_on_28x28():
    model = build_model("wrn-10-1", 10, 1, "authors").eval()
    assert torch.count_nonzero(model.fc.weight) == 0
    assert (build_model("wrn-10-1", 10, 1).fc.weight != 0).any()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.fc.weight.copy_(torch.randn(model.fc.weight.shape, generator=generator))
    # float64, seeded: the two poolings sum in different orders, which float32 resolves only to about 1e-6 (an
    # unseeded float32 input failed 1 in 300 on an AVX2 machine); in float64 the comparison is a math check.
    model = model.double()
    features = {}
    model.bn.register_forward_hook(lambda m, i, o: features.setdefault("map", o))
    x = torch.randn(2, 1, 28, 28, generator=generator, dtype=torch.float64)
    out = model(x)
    fmap = torch.relu(features["map"])
    assert fmap.shape[-1] == 7
    torch.testing.assert_close(out, model.fc(fmap[:, :, :4, :4].mean(dim=(2, 3))))


@pytest.mark.parametrize("name", ["wrn-12-2", "wrn-4-1", "wrn-28-0", "resnet-18", "pyramidnet-100-48", "wrn-28"])
def test_impossible_names_rejected(name):
    with pytest.raises(ValueError, match="wrn-D-K"):
        build_model(name, 10)


def test_bad_arguments_rejected():
    with pytest.raises(ValueError, match="variant"):
        build_model("wrn-10-1", 10, variant="paper")
    with pytest.raises(ValueError, match="in_channels"):
        build_model("wrn-10-1", 10, in_channels=2)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("wrn-10-1", 1)
