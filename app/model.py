"""OM-Net + CGA network definitions (docs/ALGORITHM.md, "The network" and "Cross-task guided attention").

Every network takes (N, 4, D, H, W) input, channel order FLAIR, T1, T1c, T2, with D, H, W multiples of 8,
and returns logits at full resolution. Multi-task variants return (task1, task2, task3) logits with 5, 5
and 2 classes; ``single`` returns one tensor (the cascade's building block).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .options import Variant, parse_option

NUM_CHANNELS = 4
TASK_CLASSES = (5, 5, 2)
# Internal class indices (docs/ALGORITHM.md, "Classes and regions").
TUMOUR_CLASSES = (1, 2, 3)
CORE_CLASSES = (1, 3)
# A patch without tumour must not divide by zero in CSCI's L1 normalisation.
CSCI_EPS = 1e-6


def _conv(a: int, b: int, k: int = 3) -> nn.Conv3d:
    return nn.Conv3d(a, b, kernel_size=k, padding=k // 2, bias=True)


class CBR(nn.Sequential):
    """3x3x3 conv -> BatchNorm -> ReLU."""

    def __init__(self, a: int, b: int):
        super().__init__(_conv(a, b), nn.BatchNorm3d(b, eps=1e-5), nn.ReLU(inplace=True))


class ResidualBlock(nn.Module):
    """CBR -> CBR -> conv+BN, added to the input, then ReLU."""

    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(CBR(c, c), CBR(c, c), _conv(c, c), nn.BatchNorm3d(c, eps=1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


class Stage(nn.Sequential):
    """CBR(a->b) -> RB(b) -> CBR(b->b)."""

    def __init__(self, a: int, b: int):
        super().__init__(CBR(a, b), ResidualBlock(b), CBR(b, b))


class Up(nn.Sequential):
    """Transposed conv k2 s2 -> BN -> ReLU."""

    def __init__(self, a: int, b: int):
        super().__init__(
            nn.ConvTranspose3d(a, b, kernel_size=2, stride=2, bias=True),
            nn.BatchNorm3d(b, eps=1e-5),
            nn.ReLU(inplace=True),
        )


class Backbone(nn.Module):
    """The shared 3D FusionNet encoder-decoder; returns the feature map F (w channels, >= 0)."""

    def __init__(self, width: int):
        super().__init__()
        w = width
        self.enc0, self.enc1 = Stage(NUM_CHANNELS, w), Stage(w, 2 * w)
        self.enc2, self.enc3 = Stage(2 * w, 4 * w), Stage(4 * w, 8 * w)
        self.dropout = nn.Dropout3d(0.5)
        self.up2, self.dec2 = Up(8 * w, 4 * w), Stage(4 * w, 4 * w)
        self.up1, self.dec1 = Up(4 * w, 2 * w), Stage(2 * w, 2 * w)
        self.up0, self.dec0 = Up(2 * w, w), nn.Sequential(CBR(w, w), ResidualBlock(w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s0 = self.enc0(x)
        s1 = self.enc1(F.max_pool3d(s0, 2))
        s2 = self.enc2(F.max_pool3d(s1, 2))
        bottom = self.dropout(self.enc3(F.max_pool3d(s2, 2)))
        y = self.dec2(self.up2(bottom) + s2)
        y = self.dec1(self.up1(y) + s1)
        return self.dec0(self.up0(y) + s0)


class SqueezeExcitation(nn.Module):
    """SE block (Hu et al.): global average pool -> FC -> ReLU -> FC -> sigmoid -> channel scale.

    The paper does not give the reduction ratio; we use SE's default of 16, with at least 2 hidden units so
    narrow networks keep a bottleneck that can still express something.
    """

    def __init__(self, c: int, reduction: int = 16):
        super().__init__()
        hidden = max(2, c // reduction)
        self.fc = nn.Sequential(nn.Linear(c, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, c), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.fc(x.mean(dim=(2, 3, 4)))
        return x * scale[:, :, None, None, None]


class Head(nn.Sequential):
    """Plain task head: CBR(w->w) [-> SE] -> 1x1x1 conv to C classes."""

    def __init__(self, w: int, classes: int, squeeze_excitation: bool = False):
        layers: list[nn.Module] = [CBR(w, w)]
        if squeeze_excitation:
            layers.append(SqueezeExcitation(w))
        layers.append(nn.Conv3d(w, classes, kernel_size=1, bias=True))
        super().__init__(*layers)


class CrossTaskGuidedAttention(nn.Module):
    """CGA module (CSCI + CompSeg), acting directly on the shared feature map F.

    ``guide_probs`` are the preceding task's 5-class probabilities; ``target_classes`` picks which of them
    form the "target" mask Pt (tumour for CGA-tumour, core for CGA-core); Pn = 1 - Pt. The guidance is
    detached here so gradients never flow back into the guiding task.
    """

    def __init__(self, w: int, classes: int, target_classes: tuple[int, ...]):
        super().__init__()
        self.target_classes = target_classes
        self.score_target = nn.Conv3d(w, classes, kernel_size=1, bias=True)
        self.score_non_target = nn.Conv3d(w, classes, kernel_size=1, bias=True)
        self.classifier = nn.Conv3d(classes, classes, kernel_size=1, bias=True)

    def forward(self, features: torch.Tensor, guide_probs: torch.Tensor) -> torch.Tensor:
        guide = guide_probs.detach()
        p_target = guide[:, list(self.target_classes)].sum(dim=1, keepdim=True)
        p_non = guide.sum(dim=1, keepdim=True) - p_target
        n = features.shape[0]
        flat = features.flatten(2)  # (N, w, V); a view for channels-first and channels-last tensors alike
        masks = torch.cat([p_target, p_non], dim=1).flatten(2)  # (N, 2, V)
        # CSCI: class-specific channel descriptors, L1-normalised over channels: sum_v F(v) P(v) for both
        # masks in one batched matrix product instead of materialising F * P.
        m_target, m_non = _l1_normalise(torch.bmm(flat, masks.transpose(1, 2).to(flat.dtype))).unbind(dim=2)
        # CompSeg: conv1x1(m * F) = (W diag(m)) F + b, so the descriptors scale the 1x1 conv weights per
        # sample and both scores come from one matrix product (far cheaper than scaling the w-channel F).
        weight_t = self.score_target.weight.flatten(1)[None] * m_target[:, None, :]
        weight_n = self.score_non_target.weight.flatten(1)[None] * m_non[:, None, :]
        scores = torch.bmm(torch.cat([weight_t, weight_n], dim=1).to(flat.dtype), flat)  # (N, 2C, V)
        s_target, s_non = scores.view(n, 2, -1, *features.shape[2:]).unbind(dim=1)
        bias_t = self.score_target.bias.view(1, -1, 1, 1, 1)
        bias_n = self.score_non_target.bias.view(1, -1, 1, 1, 1)
        return self.classifier(p_target * (s_target + bias_t) + p_non * (s_non + bias_n))


def _l1_normalise(v: torch.Tensor) -> torch.Tensor:
    return v / (v.sum(dim=1, keepdim=True) + CSCI_EPS)


class SingleTaskNet(nn.Module):
    """One backbone with one head: a stage of the three-model cascade (MC3)."""

    def __init__(self, width: int, classes: int = 5):
        super().__init__()
        self.backbone = Backbone(width)
        self.head = Head(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class OMNet(nn.Module):
    """One-pass multi-task network: one backbone, three task heads (plain, SE or CGA)."""

    def __init__(self, width: int, variant: Variant):
        super().__init__()
        self.variant = variant
        self.backbone = Backbone(width)
        se = variant is Variant.OMNET_SE
        self.head1 = Head(width, TASK_CLASSES[0], squeeze_excitation=se)
        if variant is Variant.OMNET_CGA:
            self.head2 = CrossTaskGuidedAttention(width, TASK_CLASSES[1], TUMOUR_CLASSES)
            self.head3 = CrossTaskGuidedAttention(width, TASK_CLASSES[2], CORE_CLASSES)
        else:
            self.head2 = Head(width, TASK_CLASSES[1], squeeze_excitation=se)
            self.head3 = Head(width, TASK_CLASSES[2], squeeze_excitation=se)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.heads(self.backbone(x))

    def heads(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits1 = self.head1(features)
        if self.variant is not Variant.OMNET_CGA:
            return logits1, self.head2(features), self.head3(features)
        # Guidance flows forward only: task 1 guides task 2, task 2 guides task 3 (detached in CGA).
        logits2 = self.head2(features, torch.softmax(logits1.float(), dim=1).to(features.dtype))
        logits3 = self.head3(features, torch.softmax(logits2.float(), dim=1).to(features.dtype))
        return logits1, logits2, logits3


def build_model(variant: str | Variant, width: int = 32, classes: int = 5) -> nn.Module:
    """Build a network of the paper's Table I with He-normal weights and 0.1 biases (first conv 0).

    ``classes`` only applies to ``single`` (5 for the cascade's first two stages, 2 for its third).
    """
    variant = parse_option(Variant, variant, "variant")
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be a positive integer, got {width!r}")
    if variant is Variant.CASCADE:
        return Cascade(width)  # its three networks are initialised as they are built
    model = SingleTaskNet(width, classes) if variant is Variant.SINGLE else OMNet(width, variant)
    _initialise(model)
    return model


def _initialise(model: nn.Module) -> None:
    first = True
    for module in model.modules():
        if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
            # Caffe's "msra" filler: He-normal over count / shape[0], which is PyTorch's fan_in for
            # both Conv3d (in*k^3) and ConvTranspose3d (out*k^3, as Caffe's deconvolution blob).
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            nn.init.constant_(module.bias, 0.0 if first else 0.1)
            first = False
        elif isinstance(module, nn.BatchNorm3d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def conv_weight_count(model: nn.Module) -> int:
    """Number of conv/deconv weights, biases and BN excluded (the paper's way of counting)."""
    return sum(
        m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))
    )


def task_outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Logits as a tuple for any variant (``single`` gives a 1-tuple)."""
    out = model(x)
    return out if isinstance(out, tuple) else (out,)


class Cascade(nn.Module):
    """The paper's three-model cascade (MC3): three single-task networks, one per task.

    Each network sees the same tile; the fusion step applies the cascade's region restrictions, so the
    output has the same form as OM-Net's.
    """

    def __init__(self, width: int):
        super().__init__()
        self.nets = nn.ModuleList(SingleTaskNet(width, c) for c in TASK_CLASSES)
        _initialise(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(net(x) for net in self.nets)  # type: ignore[return-value]
