import numpy as np
import pytest
import torch

from app.model import Cascade, CrossTaskGuidedAttention, build_model, conv_weight_count


@pytest.mark.parametrize(
    "variant, expected",
    [("single", 13_812_256), ("omnet", 13_867_776), ("omnet_cga", 13_812_733)],
)
def test_conv_weight_counts_match_spec_at_width_32(variant, expected):
    assert conv_weight_count(build_model(variant, 32)) == expected


def test_cascade_is_three_single_networks():
    # Two 5-class stages and one 2-class stage: the paper's MC3 (41.4M).
    assert conv_weight_count(Cascade(32)) == 2 * 13_812_256 + 13_812_256 - 32 * 5 + 32 * 2


@pytest.mark.parametrize("variant", ["omnet", "omnet_cga", "omnet_se"])
@pytest.mark.parametrize("shape", [(16, 32, 32), (24, 40, 48)])
def test_multitask_outputs_have_task_shapes(variant, shape):
    model = build_model(variant, 4).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 4, *shape))
    assert [tuple(o.shape) for o in out] == [(2, 5, *shape), (2, 5, *shape), (2, 2, *shape)]


def test_single_returns_one_tensor():
    model = build_model("single", 4).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 4, 16, 32, 32))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 5, 16, 32, 32)


def test_bad_variant_and_width_are_refused():
    with pytest.raises(ValueError, match="variant must be one of"):
        build_model("unet", 8)
    with pytest.raises(ValueError, match="width"):
        build_model("omnet", 0)


def _numpy_cga(features, guide, target, w_t, b_t, w_n, b_n, w_c, b_c):
    """The CSCI + CompSeg equations of docs/ALGORITHM.md, written independently with NumPy (one sample)."""
    c = features.shape[0]
    flat = features.reshape(c, -1)
    p = guide.reshape(guide.shape[0], -1)
    pt = p[list(target)].sum(0)
    pn = p[[k for k in range(p.shape[0]) if k not in target]].sum(0)
    m_t = flat @ pt
    m_n = flat @ pn
    m_t = m_t / (m_t.sum() + 1e-6)
    m_n = m_n / (m_n.sum() + 1e-6)
    s_t = w_t @ (m_t[:, None] * flat) + b_t[:, None]
    s_n = w_n @ (m_n[:, None] * flat) + b_n[:, None]
    merged = pt * s_t + pn * s_n
    return (w_c @ merged + b_c[:, None]).reshape(-1, *features.shape[1:])


@pytest.mark.parametrize("classes, target", [(5, (1, 2, 3)), (2, (1, 3))])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
def test_cga_matches_numpy_equations(classes, target, layout):
    torch.manual_seed(0)
    w = 6
    module = CrossTaskGuidedAttention(w, classes, target).double()
    for p in module.parameters():
        torch.nn.init.normal_(p)
    features = torch.rand(2, w, 4, 5, 6, dtype=torch.float64).contiguous(memory_format=layout)
    guide = torch.softmax(torch.randn(2, 5, 4, 5, 6, dtype=torch.float64), dim=1)
    got = module(features, guide).detach().numpy()
    def matrix(conv):
        return conv.weight.detach().numpy().reshape(conv.weight.shape[0], -1), conv.bias.detach().numpy()

    weights = [*matrix(module.score_target), *matrix(module.score_non_target), *matrix(module.classifier)]
    for n in range(2):
        expected = _numpy_cga(features[n].numpy(), guide[n].numpy(), target, *weights)
        np.testing.assert_allclose(got[n], expected, rtol=1e-9, atol=1e-9)


def test_cga_guidance_is_detached_from_task_one():
    torch.manual_seed(0)
    model = build_model("omnet_cga", 4).train()
    out = model(torch.randn(2, 4, 16, 32, 32))
    # Task 2's and task 3's losses must not reach task 1's head through the guidance path.
    (out[1].sum() + out[2].sum()).backward()
    head1_grads = [p.grad for p in model.head1.parameters()]
    assert all(g is None or torch.count_nonzero(g) == 0 for g in head1_grads)
    # ...but they do train the shared backbone and their own CGA parameters.
    assert torch.count_nonzero(model.backbone.enc0[0][0].weight.grad) > 0
    assert torch.count_nonzero(model.head2.score_target.weight.grad) > 0


def test_cga_survives_a_patch_without_tumour():
    module = CrossTaskGuidedAttention(4, 5, (1, 2, 3))
    guide = torch.zeros(1, 5, 4, 4, 4)
    guide[:, 4] = 1.0  # all normal brain: Pt is zero everywhere
    out = module(torch.rand(1, 4, 4, 4, 4), guide)
    assert torch.isfinite(out).all()
