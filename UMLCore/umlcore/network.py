"""The UML network: encoders -> feature mixer -> mutual decoder -> navigator / instructor.

Input ``x: (B, C_in, H, W)`` with ``H, W`` multiples of 8. Both encoders share the resolution ladder
``H, H/2, H/4, H/8``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import UMLConfig
from .evidential import alpha_from_logits, uncertainty

__all__ = ["UMLNet", "UMLOutput", "UMLFeatures"]

# Added to the weight mass (in H/8 cells, 64 pixels each) of the lesion-weighted pool. The weights are the
# expected foreground probability, which includes a share of the uncertainty mass: a background pixel the model
# is sure of still weighs ~1/S (about 0.002 with the shipped 1.2.0 weights, ~1.8 cells over a 256x256 slice), so
# on a lesion-free slice this pool tends to a global average, and a small lesion's vector is partly background.
LESION_POOL_EPS = 0.05


class UMLOutput(NamedTuple):
    """Typed output of :class:`UMLNet`.

    Attributes:
        seg_alpha: ``(B, K_seg, H, W)`` Dirichlet parameters of the final (navigator) segmentation.
        mutual_alpha: ``(B, K_seg, H, W)`` Dirichlet parameters of the mutual decoder.
        deep_logits: Deep-supervision logits, finest first: ``(B, K_seg, H/2, W/2)``, ``(.., H/4, ..)``, ``(.., H/8, ..)``.
        cls_alpha: ``(B, K_cls)`` image-level Dirichlet parameters.
    """

    seg_alpha: torch.Tensor
    mutual_alpha: torch.Tensor
    deep_logits: tuple[torch.Tensor, ...]
    cls_alpha: torch.Tensor


class UMLFeatures(NamedTuple):
    """Features shared by the heads: encoder pyramids and mixed features, finest first."""

    cls: tuple[torch.Tensor, ...]
    seg: tuple[torch.Tensor, ...]
    mixed: tuple[torch.Tensor, ...]


def conv_bn_act(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ResidualBlock(nn.Module):
    """Basic residual block (two 3x3 convs); optional stride-2 downsampling."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv_bn_act(cin, cout, 3, stride)
        self.conv2 = nn.Sequential(nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout))
        self.skip = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(self.conv1(x)) + self.skip(x), inplace=True)


class Encoder(nn.Module):
    """Compact residual CNN returning features at ``H, H/2, H/4, H/8``."""

    def __init__(self, in_channels: int, widths: tuple[int, ...], blocks: tuple[int, ...]) -> None:
        super().__init__()
        self.stem = conv_bn_act(in_channels, widths[0])
        stages = []
        cin = widths[0]
        for level, (w, n) in enumerate(zip(widths, blocks)):
            layers = [ResidualBlock(cin, w, stride=1 if level == 0 else 2)]
            layers += [ResidualBlock(w, w) for _ in range(n - 1)]
            stages.append(nn.Sequential(*layers))
            cin = w
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feats = []
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return tuple(feats)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class PolarizedSelfAttention(nn.Module):
    """Polarized self-attention (parallel layout): ``x * channel_gate + x * spatial_gate``, both sigmoid."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        inner = max(channels // 2, 1)
        self.ch_q = nn.Conv2d(channels, 1, 1)
        self.ch_v = nn.Conv2d(channels, inner, 1)
        self.ch_up = nn.Conv2d(inner, channels, 1)
        self.ch_norm = nn.LayerNorm(channels)
        self.sp_q = nn.Conv2d(channels, inner, 1)
        self.sp_v = nn.Conv2d(channels, inner, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # channel-only branch: attention over space collapses to one vector of channel weights
        q = torch.softmax(self.ch_q(x).view(b, 1, h * w), dim=-1)  # (B, 1, HW)
        v = self.ch_v(x).view(b, -1, h * w)  # (B, C/2, HW)
        ctx = torch.bmm(v, q.transpose(1, 2)).unsqueeze(-1)  # (B, C/2, 1, 1)
        ch_gate = torch.sigmoid(self.ch_norm(self.ch_up(ctx).view(b, c)).view(b, c, 1, 1))
        # spatial-only branch: a global channel query attends over channel values at every pixel
        sq = torch.softmax(self.sp_q(x).mean(dim=(2, 3)), dim=-1).unsqueeze(1)  # (B, 1, C/2)
        sv = self.sp_v(x).view(b, -1, h * w)  # (B, C/2, HW)
        sp_gate = torch.sigmoid(torch.bmm(sq, sv).view(b, 1, h, w))
        return x * ch_gate + x * sp_gate


class FeatureMixer(nn.Module):
    """Project both encoders' features to a common width, concatenate, shuffle, attend, project."""

    def __init__(self, cls_ch: int, seg_ch: int, out_ch: int) -> None:
        super().__init__()
        self.proj_cls = conv_bn_act(cls_ch, out_ch, 1)
        self.proj_seg = conv_bn_act(seg_ch, out_ch, 1)
        self.attn = PolarizedSelfAttention(2 * out_ch)
        self.out = conv_bn_act(2 * out_ch, out_ch, 1)

    def forward(self, f_cls: torch.Tensor, f_seg: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.proj_cls(f_cls), self.proj_seg(f_seg)], dim=1)
        return self.out(self.attn(channel_shuffle(x, 2)))


class UpBlock(nn.Module):
    """Reduce to ``cout`` (1x1 at low resolution), upsample x2, concatenate the skip, 3x3 conv-bn-relu."""

    def __init__(self, cin: int, skip: int, cout: int) -> None:
        super().__init__()
        self.reduce = conv_bn_act(cin, cout, 1)
        self.body = conv_bn_act(cout + skip, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(self.reduce(x), size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.body(torch.cat([x, skip], dim=1))


class MutualDecoder(nn.Module):
    """U-Net up path over the mixed features, ending in an evidential head."""

    def __init__(self, widths: tuple[int, ...], num_labels: int) -> None:
        super().__init__()
        self.ups = nn.ModuleList([UpBlock(widths[i + 1], widths[i], widths[i]) for i in reversed(range(3))])
        self.head = nn.Conv2d(widths[0], num_labels, 1)

    def forward(self, mixed: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x = mixed[3]
        for up, skip in zip(self.ups, (mixed[2], mixed[1], mixed[0])):
            x = up(x, skip)
        return self.head(x)  # logits


def _resize(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if t.shape[-2:] == like.shape[-2:]:
        return t
    return F.interpolate(t, size=like.shape[-2:], mode="bilinear", align_corners=False)


class UncertaintyNavigator(nn.Module):
    """Segmentation decoder guided by the mutual uncertainty.

    Skips are damped by ``exp(-u)``; a reliable mask ``(coarse_logits + e_mutual) * exp(-u)`` is encoded
    to H/8 and fused with the damped deepest feature; a U-Net up path gives deep-supervision logits at
    H/8, H/4, H/2 and final logits at H.
    """

    def __init__(self, seg_widths: tuple[int, ...], num_labels: int) -> None:
        super().__init__()
        w = seg_widths
        self.coarse_head = nn.Conv2d(w[3], num_labels, 1)
        self.mask_encoder = nn.Sequential(
            conv_bn_act(num_labels, w[0], 3, 2),
            conv_bn_act(w[0], w[1], 3, 2),
            conv_bn_act(w[1], w[3], 3, 2),
        )
        self.fuse = conv_bn_act(2 * w[3], w[3], 1)
        self.ups = nn.ModuleList([UpBlock(w[i + 1], w[i], w[i]) for i in reversed(range(3))])
        self.ds_heads = nn.ModuleList([nn.Conv2d(w[i], num_labels, 1) for i in (3, 2, 1)])
        self.head = nn.Conv2d(w[0], num_labels, 1)

    def forward(
        self, seg_feats: tuple[torch.Tensor, ...], mutual_logits: torch.Tensor, mutual_u: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]:
        """Returns ``(final_logits, deep_logits finest-first, top_feature)``."""
        trust = torch.exp(-mutual_u)  # (B, 1, H, W)
        damped = [f * _resize(trust, f) for f in seg_feats]
        coarse = _resize(self.coarse_head(seg_feats[3]), mutual_logits)
        reliable = (coarse + F.softplus(mutual_logits)) * trust
        x = self.fuse(torch.cat([damped[3], _resize(self.mask_encoder(reliable), damped[3])], dim=1))
        deep = [self.ds_heads[0](x)]
        for i, (up, skip) in enumerate(zip(self.ups, (damped[2], damped[1], damped[0]))):
            x = up(x, skip)
            if i < 2:
                deep.append(self.ds_heads[i + 1](x))
        return self.head(x), tuple(reversed(deep)), x


class UncertaintyInstructor(nn.Module):
    """Image-level evidential classifier: ``F' = F + F * eta`` -> global pool -> linear -> softplus evidence.

    The pool is a global average (``pool="avg"``, the paper's); the average and the maximum concatenated
    (``"avg+max"``), so a lesion covering a few cells of the H/8 map is not averaged away; or those two and
    the average of ``F'`` weighted by the segmentation's expected foreground probability (``"avg+max+lesion"``),
    so the opinion is read mostly from the segmented lesion (see :data:`LESION_POOL_EPS` for what else it
    weighs). The weights are detached: the classification loss does not reshape the segmentation through them.
    The weighted sum is taken in float32, so half-precision inference cannot overflow on large slices.
    """

    def __init__(self, cls_ch: int, mutual_ch: int, nav_ch: int, width: int, num_classes: int, dropout: float,
                 pool: str = "avg") -> None:
        super().__init__()
        self.pool = pool
        self.feat = conv_bn_act(cls_ch + mutual_ch, width)
        self.eta = nn.Sequential(nn.Conv2d(nav_ch, width, 1), nn.Sigmoid())
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(width * (pool.count("+") + 1), num_classes)

    def forward(self, f_cls: torch.Tensor, f_mutual: torch.Tensor, nav_top: torch.Tensor,
                foreground: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Class logits ``(B, num_classes)``.

        Args:
            f_cls: ``(B, cls_ch, H/8, W/8)`` classification-encoder features.
            f_mutual: ``(B, mutual_ch, h, w)`` mixed features (resized to ``f_cls``).
            nav_top: ``(B, nav_ch, H, W)`` navigator features (the uncertainty-informed gate ``eta``).
            foreground: ``(B, 1, H, W)`` segmentation foreground probability; required by ``"avg+max+lesion"``.
        """
        f = self.feat(torch.cat([f_cls, _resize(f_mutual, f_cls)], dim=1))
        eta = self.eta(F.adaptive_avg_pool2d(nav_top, f.shape[-2:]))
        f = f + f * eta
        pooled = [f.mean(dim=(2, 3))]
        if self.pool != "avg":
            pooled.append(f.amax(dim=(2, 3)))
        if self.pool == "avg+max+lesion":
            if foreground is None:
                raise ValueError("cls_pool 'avg+max+lesion' needs the segmentation foreground probability")
            w = F.adaptive_avg_pool2d(foreground.detach().float(), f.shape[-2:])
            lesion = (f.float() * w).sum(dim=(2, 3)) / (w.sum(dim=(2, 3)) + LESION_POOL_EPS)
            pooled.append(lesion.to(f.dtype))
        return self.fc(self.drop(torch.cat(pooled, dim=1)))  # logits


class UMLNet(nn.Module):
    """Uncertainty-informed Mutual Learning network for joint classification and segmentation.

    Example:
        >>> net = UMLNet(UMLConfig.preset("small"))
        >>> out = net(torch.zeros(2, 3, 64, 64))
        >>> out.seg_alpha.shape, out.cls_alpha.shape
        (torch.Size([2, 2, 64, 64]), torch.Size([2, 2]))
    """

    def __init__(self, config: UMLConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.cls_encoder = Encoder(c.in_channels, c.cls_widths, c.cls_blocks)
        self.seg_encoder = Encoder(c.in_channels, c.seg_widths, c.seg_blocks)
        self.mixers = nn.ModuleList(
            [FeatureMixer(c.cls_widths[i], c.seg_widths[i], c.mutual_widths[i]) for i in range(4)]
        )
        self.mutual_decoder = MutualDecoder(c.mutual_widths, c.num_seg_labels)
        self.navigator = UncertaintyNavigator(c.seg_widths, c.num_seg_labels)
        self.instructor = UncertaintyInstructor(
            c.cls_widths[3], c.mutual_widths[3], c.seg_widths[0], c.cls_head_width, c.num_classes, c.dropout, c.cls_pool
        )

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4:
            raise ValueError(f"UMLNet expects (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.config.in_channels:
            raise ValueError(f"UMLNet expects {self.config.in_channels} input channels, got {x.shape[1]}")
        m = self.config.pad_multiple
        if x.shape[2] % m or x.shape[3] % m:
            raise ValueError(f"H and W must be multiples of {m}, got {tuple(x.shape[2:])}; pad the input first")

    def forward_features(self, x: torch.Tensor) -> UMLFeatures:
        self._check_input(x)
        f_cls = self.cls_encoder(x)
        f_seg = self.seg_encoder(x)
        mixed = tuple(mix(a, b) for mix, a, b in zip(self.mixers, f_cls, f_seg))
        return UMLFeatures(f_cls, f_seg, mixed)

    def forward_head(self, feats: UMLFeatures) -> UMLOutput:
        mutual_logits = self.mutual_decoder(feats.mixed)
        mutual_alpha = alpha_from_logits(mutual_logits)
        mutual_u = uncertainty(mutual_alpha).unsqueeze(1)
        seg_logits, deep_logits, nav_top = self.navigator(feats.seg, mutual_logits, mutual_u)
        seg_alpha = alpha_from_logits(seg_logits)
        foreground = None
        if self.config.cls_pool == "avg+max+lesion":
            foreground = 1.0 - seg_alpha[:, :1] / seg_alpha.sum(dim=1, keepdim=True)  # expected P(not background)
        cls_logits = self.instructor(feats.cls[3], feats.mixed[3], nav_top, foreground)
        return UMLOutput(
            seg_alpha=seg_alpha,
            mutual_alpha=mutual_alpha,
            deep_logits=deep_logits,
            cls_alpha=alpha_from_logits(cls_logits),
        )

    def forward(self, x: torch.Tensor) -> UMLOutput:
        return self.forward_head(self.forward_features(x))
